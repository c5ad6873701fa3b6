"""The export run behind ``tools/export.py``: export, check parity on val images, measure latency.

1. Build the recipe's detector, load the checkpoint strictly, wrap it (:func:`detkd.deploy.wrapper.load_detector`).
2. Export it (:func:`detkd.deploy.export.export_detector`), traced on the first val image for ONNX.
3. Parity: run the exported file (onnxruntime / ``torch.jit.load``) and the PyTorch model on the first N val
   images and compare (:mod:`detkd.deploy.parity`).
4. Latency: eager PyTorch, TorchScript and ONNX Runtime, batch 1, on the same images, with the same thread count
   (:mod:`detkd.deploy.latency`). The format not being exported is written to a temporary file for the measurement.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from detkd.deploy.backends import EagerBackend, OnnxBackend, TorchScriptBackend
from detkd.deploy.errors import DeployError
from detkd.deploy.export import DEFAULT_OPSET, check_exportable, export_detector
from detkd.deploy.inputs import to_tensor, val_image_paths
from detkd.deploy.latency import DEFAULT_WARMUP, MIN_RUNS, Latency, measure
from detkd.deploy.parity import ParityReport, compare_runs
from detkd.deploy.wrapper import LoadedDetector, load_detector, model_section

PathLike = Union[str, os.PathLike]


@dataclass
class ExportResult:
    """What :func:`export_and_verify` produced."""

    path: Path
    fmt: str
    loaded: LoadedDetector
    parity: ParityReport
    latency: list[Latency] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_val_images(cfg: Any, num: int) -> tuple[list[torch.Tensor], list[str]]:
    """The first ``num`` val images of the recipe as ``(3, H, W)`` uint8 tensors, and their paths."""
    from detkd.data.build import ensure_data
    from detkd.data.coco import load_image_rgb

    ensure_data(cfg.data, show_progress=False)
    paths = val_image_paths(cfg.data.val.ann_file, cfg.data.val.img_dir, num)
    try:
        return [to_tensor(load_image_rgb(p)) for p in paths], [str(p) for p in paths]
    except (OSError, ValueError) as err:
        raise DeployError(f"parity needs the recipe's val images (data.val.img_dir): {err}") from None


def _open(fmt: str, path: PathLike, threads: int):
    return OnnxBackend(path, threads) if fmt == "onnx" else TorchScriptBackend(path, threads)


def export_and_verify(
    cfg: Any,
    ckpt: PathLike,
    fmt: str,
    out: PathLike,
    model_key: Optional[str] = None,
    num_images: int = 8,
    opset: int = DEFAULT_OPSET,
    input_dtype: str = "uint8",
    threads: int = 1,
    latency_runs: Optional[int] = MIN_RUNS,
    warmup: int = DEFAULT_WARMUP,
) -> ExportResult:
    """Export a recipe's detector to ``fmt`` at ``out``, check parity and (unless ``latency_runs`` is None) time it.

    Args:
        cfg: the recipe (:class:`detkd.config.Config`).
        ckpt: the checkpoint to export.
        fmt: ``onnx`` or ``torchscript``.
        out: the file to write.
        model_key: ``model`` / ``student`` / ``teacher`` (default: ``model`` if present, else ``student``).
        num_images: val images for the parity check (and the latency measurement).
        opset: ONNX opset.
        input_dtype: ONNX input type, ``uint8`` or ``float32``.
        threads: ``torch.set_num_threads`` and onnxruntime's intra-op threads, for parity and latency.
        latency_runs: timed runs per backend (at least 20), or None to skip the latency measurement.
        warmup: untimed runs per backend before them.

    Raises:
        DeployError: a bad recipe section, checkpoint, format or opset (checked before anything is exported), a
            failed export, or an unreadable val image. A parity failure is *not* an error: see ``result.parity``.
    """
    _, section = model_section(cfg, model_key)
    check_exportable(section.arch, fmt, opset, input_dtype)
    if num_images < 1:
        raise DeployError(f"--num-images must be at least 1; got {num_images}.")
    torch.set_num_threads(threads)
    loaded = load_detector(cfg, ckpt, model_key)
    images, names = read_val_images(cfg, num_images)
    path = export_detector(loaded, fmt, out, images[0], cfg.name, opset, input_dtype)

    eager = EagerBackend(loaded.model, threads)
    exported = _open(fmt, path, threads)
    reference = [eager(im) for im in images]
    candidate = [exported(im) for im in images]
    report = compare_runs(
        str(path),
        reference,
        candidate,
        names,
        score_thresh=section.score_thresh,
        max_detections=section.detections_per_img,
    )
    result = ExportResult(path, fmt, loaded, report)
    if latency_runs is None:
        return result

    backends: dict[str, Any] = {"torchscript": None, "onnx": None}
    backends[fmt] = exported
    with tempfile.TemporaryDirectory(prefix="detkd_export_") as tmp:
        other = "onnx" if fmt == "torchscript" else "torchscript"
        try:
            other_path = export_detector(
                loaded, other, Path(tmp) / f"model.{'onnx' if other == 'onnx' else 'pt'}", images[0], cfg.name, opset
            )
            backends[other] = _open(other, other_path, threads)
        except DeployError as err:
            result.notes.append(f"{other}: not measured ({err})")
        result.latency.append(measure(eager.name, eager, images, threads, latency_runs, warmup))
        for key in ("torchscript", "onnx"):
            if backends[key] is not None:
                b = backends[key]
                result.latency.append(measure(b.name, b, images, threads, latency_runs, warmup))
    return result
