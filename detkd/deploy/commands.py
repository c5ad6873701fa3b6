"""The deploy commands of a finished run, filled in with its paths (printed at the end of training)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


def deploy_commands(
    recipe: PathLike,
    ckpt: PathLike,
    out_dir: PathLike,
    images: Optional[PathLike] = None,
    model_key: Optional[str] = None,
) -> list[str]:
    """The ``tools/predict.py`` and ``tools/export.py`` commands for a trained checkpoint.

    Args:
        recipe: the recipe the checkpoint was trained with.
        ckpt: the checkpoint, e.g. ``work_dirs/quickstart/student_best.pth``.
        out_dir: the run's folder; predictions go to ``<out_dir>/predict``, the export to ``<out_dir>/<stem>.onnx``.
        images: images to predict on (default: the recipe's ``data.val.img_dir``, or ``IMAGES`` if the recipe does
            not load).
        model_key: ``--model`` to pass (default: none, i.e. the tools' default: ``model``, else ``student``).

    Returns:
        ``[predict_command, export_command]``, shell-quoted.
    """
    if images is None:
        try:
            from detkd.config import load_config

            images = load_config(str(recipe)).data.val.img_dir
        except Exception:  # noqa: BLE001 - a hint for the user; never stop the caller over it
            images = "IMAGES"
    q = shlex.quote
    out = Path(out_dir)
    model = f" --model {q(model_key)}" if model_key else ""
    common = f"--cfg {q(str(recipe))} --ckpt {q(str(ckpt))}{model}"
    onnx = out / f"{Path(ckpt).stem}.onnx"
    return [
        f"python tools/predict.py {common} {q(str(images))} --out {q(str(out / 'predict'))}",
        f"python tools/export.py {common} --format onnx --out {q(str(onnx))}",
    ]
