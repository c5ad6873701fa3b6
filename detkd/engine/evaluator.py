"""COCO box evaluation of a torchvision-style detector, wrapping pycocotools.

The flow mirrors torchvision's ``references/detection`` ``evaluate``: run the detector over a loader, turn its
detections into COCO result dicts (original category ids, ``xywh`` boxes in original-image pixels), then let
``pycocotools.cocoeval.COCOeval`` score them against the dataset's ground truth. pycocotools is wrapped, never
copied; its printing is silenced with ``contextlib.redirect_stdout``.

Metric convention: every value is a python float in ``[0, 1]``, except that pycocotools' ``-1`` for an
*undefined* metric (no ground truth in that area range / category within the evaluated images) is kept as
``-1.0`` rather than mapped to NaN, so the numbers stay JSON- and TensorBoard-friendly and comparisons like
``ap > best_ap`` never meet a NaN.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from detkd.engine.checkpoint import unwrap
from detkd.files import atomic_write

__all__ = [
    "SUMMARY_KEYS",
    "detections_to_coco_results",
    "coco_evaluate",
    "evaluate",
    "format_metrics_table",
    "save_metrics",
]

#: Names of the first nine numbers of ``COCOeval.stats`` (bbox), in pycocotools' order.
BACKGROUND_LABEL = 0  # the background column of sigmoid heads; never a category
SUMMARY_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def _scalar(value: Any) -> Any:
    """A python number from a python/numpy/tensor scalar."""
    return value.item() if isinstance(value, (torch.Tensor, np.generic)) else value


def _json_default(value: Any) -> Any:
    """``json.dump`` fallback for numpy / tensor scalars and arrays."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def detections_to_coco_results(
    detections: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, Any]],
    label_to_cat_id: Mapping[int, int],
) -> list[dict[str, Any]]:
    """Convert a batch of detector outputs into COCO result dicts in original-image pixels.

    Boxes are mapped back with ``original_xy = transformed_xy / (sx, sy)`` (``scale_xy`` of the target) and
    converted from ``xyxy`` to ``xywh``. A target without ``scale_xy`` is taken as unscaled ``(1, 1)``.

    Args:
        detections: One dict per image with ``boxes`` ``(M, 4)`` xyxy float in the coordinates of the image the
            detector saw, ``scores`` ``(M,)`` and ``labels`` ``(M,)`` int64 in ``1..K``.
        targets: One dict per image, aligned with ``detections``, with ``image_id`` (int or scalar tensor) and
            ``scale_xy`` (float tensor ``(2,)`` holding ``(sx, sy)``).
        label_to_cat_id: Contiguous label -> original COCO category id.

    Returns:
        One ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dict per box; bbox values rounded to
        2 decimals.

    Raises:
        ValueError: If ``detections`` and ``targets`` differ in length or a label has no category id.
    """
    if len(detections) != len(targets):
        raise ValueError(f"got {len(detections)} detections for {len(targets)} targets; they must align per image.")
    results: list[dict[str, Any]] = []
    for det, target in zip(detections, targets):
        boxes = det["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        if boxes.shape[0] == 0:
            continue
        scores = det["scores"].detach().cpu().reshape(-1).tolist()
        labels = det["labels"].detach().cpu().reshape(-1).tolist()
        image_id = int(_scalar(target["image_id"]))
        scale = target.get("scale_xy")
        if scale is not None:
            sx, sy = (float(v) for v in torch.as_tensor(scale, dtype=torch.float64).reshape(-1)[:2])
            boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for bbox, score, label in zip(xywh, scores, labels):
            if int(label) == BACKGROUND_LABEL:
                # sigmoid heads (RetinaNet, FCOS) have a class-0 column that is never a positive in training
                # (torchvision's convention); a detection of it is not an object of any category
                continue
            cat_id = label_to_cat_id.get(int(label))
            if cat_id is None:
                raise ValueError(
                    f"detection label {int(label)} on image {image_id} has no category id; "
                    f"valid labels: {sorted(label_to_cat_id)}."
                )
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat_id),
                    "bbox": [round(v, 2) for v in bbox],
                    "score": float(score),
                }
            )
    return results


def _empty_results_coco(coco_gt: COCO) -> COCO:
    """A detections ``COCO`` object with no annotations (``COCO.loadRes`` fails on an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "info": copy.deepcopy(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def coco_evaluate(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    image_ids: Optional[Iterable[int]] = None,
    class_names: Optional[Sequence[str]] = None,
    cat_ids: Optional[Sequence[int]] = None,
) -> dict[str, Any]:
    """Score COCO box results against ground truth with ``COCOeval(gt, dt, "bbox")``.

    Crowd ground truth is handled by pycocotools (detections on it are ignored, never false positives).

    Args:
        coco_gt: Ground-truth ``pycocotools.coco.COCO``.
        results: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``); not modified. May be
            empty: every metric with ground truth is then 0.0 (undefined ones stay -1.0).
        image_ids: Evaluate only these images (e.g. the slice of the val set that was run); results on other
            images are ignored. Default: every image of ``coco_gt``.
        class_names: Names for ``per_class_AP``, aligned with ``cat_ids``. Default: the ground-truth names.
        cat_ids: Categories to evaluate, aligned with ``class_names``. Default: every ground-truth category
            (sorted by id).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "per_class_AP": {name: ap}}`` as
        python floats in ``[0, 1]``; ``-1.0`` marks a metric pycocotools cannot define (no ground truth). A
        class's AP is the mean of ``eval["precision"][:, :, k, area=all, maxDets=100]`` over entries > -1.

    Raises:
        ValueError: If ``image_ids`` or the results name images absent from ``coco_gt``, or ``class_names`` and
            ``cat_ids`` differ in length.
    """
    gt_image_ids = set(coco_gt.getImgIds())
    if image_ids is not None:
        eval_image_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(eval_image_ids) - gt_image_ids)
        if unknown:
            raise ValueError(f"image_ids not in the ground truth: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    unknown = sorted({int(r["image_id"]) for r in results} - gt_image_ids)
    if unknown:
        raise ValueError(f"results name images not in the ground truth: {unknown[:10]}")

    if cat_ids is None:
        cat_ids = sorted(coco_gt.getCatIds())
    cat_ids = [int(c) for c in cat_ids]
    if class_names is None:
        class_names = [coco_gt.cats[c]["name"] if c in coco_gt.cats else str(c) for c in cat_ids]
    if len(class_names) != len(cat_ids):
        raise ValueError(f"{len(class_names)} class_names for {len(cat_ids)} cat_ids; they must align.")
    name_of = dict(zip(cat_ids, class_names))

    with contextlib.redirect_stdout(io.StringIO()):
        if len(results) > 0:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes writes into the dicts it gets
        else:
            coco_dt = _empty_results_coco(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.params.catIds = cat_ids
        if image_ids is not None:
            coco_eval.params.imgIds = eval_image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    metrics: dict[str, Any] = {key: float(coco_eval.stats[i]) for i, key in enumerate(SUMMARY_KEYS)}
    # precision: (iou thresholds T, recall thresholds R, categories K, area ranges A, max dets M); K follows the
    # (sorted, de-duplicated) params.catIds; area index 0 = "all", the last maxDets = 100.
    precision = coco_eval.eval["precision"]
    per_class: dict[str, float] = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        per_class[str(name_of[cat_id])] = float(valid.mean()) if valid.size else -1.0
    metrics["per_class_AP"] = per_class
    return metrics


def _write_json_atomic(obj: Any, path: Union[str, os.PathLike], indent: Optional[int] = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`detkd.files.atomic_write`)."""

    def write(f) -> None:
        json.dump(obj, f, indent=indent, default=_json_default)
        f.write("\n")

    atomic_write(path, write, binary=False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    dataset: Any,
    device: Union[str, torch.device],
    max_images: Optional[int] = None,
    results_file: Optional[str] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``model`` over ``data_loader`` and COCO-evaluate it on exactly the images seen.

    Single process: under DDP call it on rank 0 only (the wrapper is unwrapped, no collective is issued). The
    model is put in eval mode and its previous training flag is restored afterwards, even on error.

    Args:
        model: Detector (or a DDP/DataParallel wrapper of one) mapping ``list[Tensor(3, H, W)]`` in eval mode to
            ``list[{"boxes", "scores", "labels"}]`` in the coordinates of the images it was given.
        data_loader: Yields ``(images, targets)``; each target has ``image_id`` and ``scale_xy`` (see
            :func:`detections_to_coco_results`).
        dataset: Anything with ``coco`` (ground-truth ``COCO``), ``label_to_cat_id`` and ``class_names``
            (index = label - 1).
        device: Where to run the model (the model is expected to be there already).
        max_images: Stop after this many images (a quick slice of the val set); None = the whole loader.
        results_file: If given, the COCO results are written there as JSON (atomically).
        progress: Show a tqdm progress bar.

    Returns:
        The metrics of :func:`coco_evaluate` over the images seen.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = torch.device(device)
    label_to_cat_id = {int(k): int(v) for k, v in dataset.label_to_cat_id.items()}
    labels = sorted(label_to_cat_id)
    cat_ids = [label_to_cat_id[label] for label in labels]
    class_names = [dataset.class_names[label - 1] for label in labels]

    results: list[dict[str, Any]] = []
    seen: dict[int, None] = {}  # ordered set of image ids
    try:
        total = len(data_loader) if hasattr(data_loader, "__len__") else None
        for images, targets in tqdm(data_loader, total=total, desc="eval", disable=not progress, leave=False):
            if max_images is not None:
                remaining = max_images - len(seen)
                if remaining <= 0:
                    break
                images, targets = list(images)[:remaining], list(targets)[:remaining]
            outputs = net([img.to(device, non_blocking=True) for img in images])
            outputs = [{k: v.detach().cpu() for k, v in out.items()} for out in outputs]
            results.extend(detections_to_coco_results(outputs, targets, label_to_cat_id))
            for target in targets:
                seen[int(_scalar(target["image_id"]))] = None
            if max_images is not None and len(seen) >= max_images:
                break
    finally:
        net.train(was_training)

    if results_file is not None:
        _write_json_atomic(results, results_file, indent=None)
    return coco_evaluate(dataset.coco, results, image_ids=list(seen), class_names=class_names, cat_ids=cat_ids)


def _pct(value: float) -> str:
    """``0.638 -> "63.8"``; an undefined (negative or NaN) metric -> ``"-"``."""
    return "-" if math.isnan(value) or value < 0 else f"{100.0 * value:.1f}"


def format_metrics_table(metrics: Mapping[str, Any], title: str = "") -> str:
    """A fixed-width text table of the COCO summary (x100, one decimal) and the per-class AP.

    Example::

        val after epoch 3
           AP  AP50  AP75   APs   APm   APl   AR1  AR10 AR100
         63.8  90.1  70.2     -  66.0  80.5  50.1  70.3  71.0
        class        AP
        circle     70.1
        triangle   55.4

    Undefined metrics (-1) print as ``-``.

    Args:
        metrics: Output of :func:`coco_evaluate` / :func:`evaluate`; missing keys print as ``-``.
        title: Optional first line.

    Returns:
        The table, lines joined with ``\\n`` (no trailing newline).
    """
    lines = [title] if title else []
    lines.append(" ".join(f"{key:>5}" for key in SUMMARY_KEYS))
    lines.append(" ".join(f"{_pct(float(metrics.get(key, -1.0))):>5}" for key in SUMMARY_KEYS))
    per_class = metrics.get("per_class_AP") or {}
    if per_class:
        width = max(5, *(len(str(name)) for name in per_class))
        lines.append(f"{'class':<{width}}  {'AP':>5}")
        lines.extend(f"{str(name):<{width}}  {_pct(float(ap)):>5}" for name, ap in per_class.items())
    return "\n".join(lines)


def save_metrics(metrics: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write ``metrics`` as JSON atomically (temporary file in the same directory, then ``os.replace``).

    Args:
        metrics: JSON-serialisable dict (numpy / tensor scalars are converted).
        path: Destination; parent directories are created.
    """
    _write_json_atomic(dict(metrics), path)
