"""Run a detector on image files: pictures with the boxes drawn, and ``predictions.json``.

``predictions.json`` maps each image's path (as found from the inputs) to its detections in the COCO results
format, with the original category ids of the recipe's annotation file and ``xywh`` boxes in the image's pixels::

    {"photos/a.jpg": [{"category_id": 3, "category_name": "ring", "bbox": [x, y, w, h], "score": 0.91}, ...], ...}

Images that could not be read are left out (and reported); an image without detections maps to ``[]``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import cv2
import torch

from detkd.deploy.backends import Detections, EagerBackend, OnnxBackend, TorchScriptBackend
from detkd.deploy.categories import Categories, read_categories
from detkd.deploy.draw import draw_detections
from detkd.deploy.errors import DeployError
from detkd.deploy.inputs import to_tensor
from detkd.deploy.wrapper import load_detector

PathLike = Union[str, os.PathLike]
PREDICTIONS_FILE = "predictions.json"


def open_backend(
    cfg: Any,
    ckpt: Optional[PathLike] = None,
    model_key: Optional[str] = None,
    onnx: Optional[PathLike] = None,
    torchscript: Optional[PathLike] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
) -> tuple[Any, Categories]:
    """The backend ``tools/predict.py`` runs: the checkpoint in eager PyTorch, or an exported file.

    Returns:
        ``(backend, categories)``; categories from the recipe's ``data.train.ann_file``.

    Raises:
        DeployError: both --onnx and --torchscript, neither of them nor a checkpoint, a file that does not load, or
            an exported file whose categories differ from the recipe's.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise DeployError("--device cuda was given but no CUDA device is available; use --device cpu.")
    if onnx is not None and torchscript is not None:
        raise DeployError("give at most one of --onnx and --torchscript.")
    if onnx is None and torchscript is None:
        if ckpt is None:
            raise DeployError("--ckpt is required unless an exported file is given with --onnx or --torchscript.")
        loaded = load_detector(cfg, ckpt, model_key)
        return EagerBackend(loaded.model, threads, device), loaded.categories
    categories = read_categories(cfg.data.train.ann_file)
    if onnx is not None:
        if device != "cpu":
            raise DeployError(f"--onnx runs on the CPU (onnxruntime's CPUExecutionProvider); got --device {device}.")
        backend: Any = OnnxBackend(onnx, threads)
    else:
        if not Path(torchscript).is_file():
            raise DeployError(f"TorchScript file '{torchscript}' does not exist.")
        backend = TorchScriptBackend(torchscript, threads, device)
    stored = [c.get("id") for c in backend.metadata.get("categories", [])]
    if stored and tuple(stored) != categories.ids:
        raise DeployError(
            f"{backend.path} was exported with category ids {stored}, but the recipe's annotation file "
            f"{categories.source} has {list(categories.ids)}; use the recipe it was exported from."
        )
    return backend, categories


def output_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>.jpg`` per input, made unique with ``-2``, ``-3``... when stems repeat."""
    names, used = [], set()
    for path in paths:
        name, k = f"{path.stem}.jpg", 1
        while name.lower() in used:
            k += 1
            name = f"{path.stem}-{k}.jpg"
        used.add(name.lower())
        names.append(name)
    return names


def prepare_out_dir(out_dir: PathLike, names: Sequence[str], overwrite: bool) -> Path:
    """Create ``out_dir``; refuse a file there, or existing outputs without ``overwrite``.

    Raises:
        DeployError: ``out_dir`` is a file, or it already holds files this run would write.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DeployError(f"--out '{out}' is a file; give a folder (it is created if absent).")
    existing = [out / n for n in [PREDICTIONS_FILE, *names] if (out / n).exists()]
    if existing and not overwrite:
        raise DeployError(
            f"--out '{out}' already holds {len(existing)} of the files this run writes (e.g. '{existing[0]}'); "
            f"pass --overwrite to replace them, or choose another --out."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def to_results(detections: Detections, categories: Categories) -> list[dict[str, Any]]:
    """COCO result dicts (``category_id``, ``category_name``, ``bbox`` xywh rounded to 2 decimals, ``score``)."""
    results = []
    for box, score, label in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.labels.tolist()):
        x0, y0, x1, y1 = box
        results.append(
            {
                "category_id": int(label),
                "category_name": categories.name_of(label),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": float(score),
            }
        )
    return results


@dataclass
class PredictSummary:
    """What a predict run did."""

    out_dir: Path
    backend: str
    threads: int
    score_thr: float
    images: int = 0
    boxes: int = 0
    times_ms: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    def format(self) -> str:
        """The summary line the tool ends with."""
        skipped = f" ({len(self.skipped)} unreadable, skipped)" if self.skipped else ""
        return (
            f"{self.images} images{skipped}, {self.boxes} boxes with score >= {self.score_thr:g}, median "
            f"{self.median_ms:.1f} ms per image ({self.backend}, {self.threads} thread(s)) -> {self.out_dir}"
        )


def predict_images(
    backend: Any,
    paths: Sequence[Path],
    out_dir: PathLike,
    categories: Categories,
    score_thr: float = 0.3,
    overwrite: bool = False,
    warn: Optional[Callable[[str], None]] = None,
    progress: bool = True,
) -> PredictSummary:
    """Detect objects in every image, write ``<out_dir>/<stem>.jpg`` with the boxes and ``predictions.json``.

    Args:
        backend: an :class:`~detkd.deploy.backends.EagerBackend`, ``TorchScriptBackend`` or ``OnnxBackend``.
        paths: the images (see :func:`detkd.deploy.inputs.expand_inputs`).
        out_dir: the output folder.
        categories: for the names drawn and written.
        score_thr: detections below this score are dropped.
        overwrite: replace existing outputs.
        warn: called with one message per unreadable image (default ``warnings.warn``); the run goes on.
        progress: show a progress bar.

    Raises:
        DeployError: see :func:`prepare_out_dir`.
    """
    from tqdm import tqdm

    from detkd.data.coco import load_image_rgb

    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    names = output_names(paths)
    out = prepare_out_dir(out_dir, names, overwrite)
    summary = PredictSummary(out, backend.name, backend.threads, score_thr)
    predictions: dict[str, list[dict[str, Any]]] = {}
    for path, name in zip(tqdm(paths, desc="predict", unit="img", disable=not progress), names):
        try:
            image = load_image_rgb(path)
        except (OSError, ValueError) as err:
            summary.skipped.append(str(path))
            warn(f"skipped {path}: {err}")
            continue
        start = time.perf_counter()
        detections = backend(to_tensor(image)).above(score_thr)
        summary.times_ms.append((time.perf_counter() - start) * 1e3)
        cv2.imwrite(str(out / name), draw_detections(image, detections, categories), [cv2.IMWRITE_JPEG_QUALITY, 92])
        predictions[str(path)] = to_results(detections, categories)
        summary.images += 1
        summary.boxes += len(detections)
    tmp = out / f".{PREDICTIONS_FILE}.tmp"
    tmp.write_text(json.dumps(predictions, indent=1))
    os.replace(tmp, out / PREDICTIONS_FILE)
    return summary
