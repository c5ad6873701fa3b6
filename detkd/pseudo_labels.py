"""Teacher detections -> pseudo-label targets for the student (pure tensor functions, no grad).

Teacher outputs follow torchvision's eval contract: one dict per image with ``boxes`` (M, 4) xyxy pixels,
``scores`` (M,) and ``labels`` (M,) int64 in ``1..K``. Targets follow the training contract: ``boxes`` (N, 4)
float32 xyxy and ``labels`` (N,) int64, plus any extra keys (``image_id``, ``area``, ``iscrowd`` ...).

The recipe is the usual one of pseudo-label distillation / semi-supervised detection (e.g. Unbiased Teacher,
Liu et al., ICLR 2021): keep confident teacher boxes (global or per-class score threshold), remove duplicates with
class-wise NMS, cap the count, then either add them to the ground truth (``merge``), use them instead of it
(``replace``), or hand them to a separate loss term (``separate``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

__all__ = ["PSEUDO_LABEL_MODES", "filter_detections", "merge_with_gt", "make_pseudo_targets"]

PSEUDO_LABEL_MODES = ("merge", "replace", "separate")
MIN_BOX_SIDE = 1.0  # px; the dataset drops GT boxes below this too


def _score_thresholds(labels: Tensor, scores: Tensor, score_thr: float, class_score_thr: dict[int, float]) -> Tensor:
    """Per-detection threshold from a lookup table indexed by label. (M,) -> (M,)."""
    size = max(max(class_score_thr) + 1, int(labels.max()) + 1 if labels.numel() else 0)
    table = torch.full((size,), float(score_thr), dtype=scores.dtype, device=scores.device)
    keys = torch.tensor(list(class_score_thr), dtype=torch.long, device=scores.device)
    table[keys] = torch.tensor(list(class_score_thr.values()), dtype=scores.dtype, device=scores.device)
    return table[labels]


@torch.no_grad()
def filter_detections(
    detections: list[dict[str, Tensor]],
    score_thr: float = 0.5,
    class_score_thr: Optional[dict[int, float]] = None,
    nms_iou: Optional[float] = 0.5,
    max_dets: int = 100,
) -> list[dict[str, Tensor]]:
    """Keep the confident, non-duplicate teacher detections of each image.

    Per image: keep detection ``i`` iff ``score_i >= thr(label_i)`` and its box is at least 1 px wide and high,
    where ``thr`` is ``class_score_thr[label]``
    for the labels listed there and ``score_thr`` otherwise; then class-wise NMS
    (``torchvision.ops.batched_nms``: a box only suppresses lower-scoring boxes of its own label with
    IoU > ``nms_iou``; skipped when ``nms_iou`` is None); then the ``max_dets`` highest scores, sorted by
    decreasing score. Batched tensor ops only, no loop over boxes.

    Args:
        detections: Per image, ``boxes`` (M, 4) xyxy, ``scores`` (M,), ``labels`` (M,) integer; other keys ignored.
        score_thr: Global minimum score (inclusive).
        class_score_thr: Optional ``{label: min score}`` overriding ``score_thr`` for those labels.
        nms_iou: IoU threshold of the class-wise NMS, or None for no NMS.
        max_dets: Maximum number of detections kept per image (``>= 0``).

    Returns:
        Per image, a new dict with detached ``boxes`` (K, 4) (input dtype), ``labels`` (K,) int64 and ``scores``
        (K,), ``K <= max_dets``, sorted by decreasing score.
    """
    if max_dets < 0:
        raise ValueError(f"max_dets must be >= 0, got {max_dets}")
    if class_score_thr and min(class_score_thr) < 0:
        raise ValueError(f"class_score_thr keys must be labels >= 0, got {sorted(class_score_thr)}")
    out = []
    for det in detections:
        missing = {"boxes", "scores", "labels"} - det.keys()
        if missing:
            raise KeyError(f"teacher detections are missing keys {sorted(missing)}; got {sorted(det.keys())}")
        boxes = det["boxes"].detach().reshape(-1, 4)
        scores = det["scores"].detach().reshape(-1)
        labels = det["labels"].detach().reshape(-1).long()
        thr = _score_thresholds(labels, scores, score_thr, class_score_thr) if class_score_thr else score_thr
        # a degenerate box (under 1 px wide or high) is no target: torchvision's detectors reject it outright
        sides = boxes[:, 2:] - boxes[:, :2]
        # label 0 is the background column of sigmoid heads, never an object
        keep = ((scores >= thr) & (sides >= MIN_BOX_SIDE).all(dim=1) & (labels > 0)).nonzero().squeeze(1)
        if nms_iou is not None:
            order = batched_nms(boxes[keep].float(), scores[keep].float(), labels[keep], nms_iou)
        else:
            order = torch.argsort(scores[keep], descending=True, stable=True)
        keep = keep[order[:max_dets]]
        out.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
    return out


def _assemble(gt: dict[str, Any], gt_keep: Tensor, extra_boxes: Tensor, extra_labels: Tensor) -> dict[str, Any]:
    """``gt`` with boxes/labels = ``gt[gt_keep]`` followed by the extra boxes, in GT dtype/device.

    Keys other than boxes/labels are copied; the per-box COCO keys ``area`` (box area for the extra boxes) and
    ``iscrowd`` (0 for the extra boxes) are extended so every per-box tensor keeps one row per box.
    """
    gt_boxes = gt["boxes"].reshape(-1, 4)
    extra_boxes = extra_boxes.detach().to(device=gt_boxes.device, dtype=gt_boxes.dtype)
    out = dict(gt)
    out["boxes"] = torch.cat([gt_boxes[gt_keep], extra_boxes])
    out["labels"] = torch.cat([gt["labels"][gt_keep], extra_labels.detach().to(gt["labels"])])
    if isinstance(gt.get("area"), Tensor) and gt["area"].shape[:1] == gt_boxes.shape[:1]:
        extra_area = (extra_boxes[:, 2] - extra_boxes[:, 0]) * (extra_boxes[:, 3] - extra_boxes[:, 1])
        out["area"] = torch.cat([gt["area"][gt_keep], extra_area.to(gt["area"])])
    if isinstance(gt.get("iscrowd"), Tensor) and gt["iscrowd"].shape[:1] == gt_boxes.shape[:1]:
        extra_crowd = gt["iscrowd"].new_zeros((extra_boxes.shape[0],) + gt["iscrowd"].shape[1:])
        out["iscrowd"] = torch.cat([gt["iscrowd"][gt_keep], extra_crowd])
    return out


@torch.no_grad()
def merge_with_gt(gt: dict[str, Any], pseudo: dict[str, Tensor], iou_thr: float = 0.5) -> dict[str, Any]:
    """Add to the ground truth the pseudo boxes that it does not already cover.

    A pseudo box is added iff its IoU with every GT box (of any class) is ``< iou_thr``; all GT boxes are kept,
    first and in order. With no GT box every pseudo box is added.

    Args:
        gt: ``boxes`` (N, 4) xyxy, ``labels`` (N,) and any other keys (copied; ``area``/``iscrowd`` extended).
        pseudo: ``boxes`` (M, 4) xyxy and ``labels`` (M,); other keys (``scores``) ignored.
        iou_thr: A pseudo box overlapping some GT box with IoU >= this is dropped.

    Returns:
        A new target dict; ``boxes`` (N + M', 4) and ``labels`` (N + M',) in the dtype/device of the GT ones.
    """
    gt_boxes = gt["boxes"].reshape(-1, 4)
    p_boxes = pseudo["boxes"].detach().reshape(-1, 4).to(device=gt_boxes.device, dtype=gt_boxes.dtype)
    if gt_boxes.shape[0] == 0 or p_boxes.shape[0] == 0:
        new = torch.ones(p_boxes.shape[0], dtype=torch.bool, device=gt_boxes.device)
    else:
        new = box_iou(p_boxes, gt_boxes).amax(dim=1) < iou_thr
    all_gt = torch.ones(gt_boxes.shape[0], dtype=torch.bool, device=gt_boxes.device)
    return _assemble(gt, all_gt, p_boxes[new], pseudo["labels"].reshape(-1).to(new.device)[new])


@torch.no_grad()
def make_pseudo_targets(
    gt_targets: list[dict[str, Any]],
    teacher_detections: list[dict[str, Tensor]],
    mode: str,
    score_thr: float = 0.5,
    class_score_thr: Optional[dict[int, float]] = None,
    nms_iou: Optional[float] = 0.5,
    max_dets: int = 100,
    merge_iou_thr: float = 0.5,
) -> list[dict[str, Any]]:
    """Turn the teacher's detections into training targets for the student, one dict per image.

    The detections are first cleaned by :func:`filter_detections` (``score_thr``, ``class_score_thr``,
    ``nms_iou``, ``max_dets``). Then, per mode:

    * ``merge``: GT plus the pseudo boxes overlapping no GT box with IoU >= ``merge_iou_thr``
      (:func:`merge_with_gt`);
    * ``replace``: the pseudo boxes only, used *instead of* the GT for the task loss;
    * ``separate``: the pseudo boxes only as well; the caller keeps the GT for the task loss and computes an
      extra loss term against these targets.

    ``replace`` and ``separate`` return the same targets; the mode tells the caller how to use them. In every
    mode the result keeps the GT's other keys (e.g. ``image_id``), its box dtype/device (float32) and its label
    dtype (int64); ``area``/``iscrowd`` are rebuilt to match the boxes. Nothing requires grad.

    Args:
        gt_targets: Per image, ``boxes`` (N, 4) xyxy and ``labels`` (N,) int64, plus optional extra keys.
        teacher_detections: Per image, torchvision eval output ``boxes`` (M, 4), ``scores`` (M,), ``labels`` (M,).
        mode: One of ``PSEUDO_LABEL_MODES``: ``"merge"``, ``"replace"``, ``"separate"``.
        score_thr: See :func:`filter_detections`.
        class_score_thr: See :func:`filter_detections`.
        nms_iou: See :func:`filter_detections`.
        max_dets: See :func:`filter_detections`.
        merge_iou_thr: IoU threshold of :func:`merge_with_gt` (``merge`` mode only).

    Returns:
        One target dict per image.

    Raises:
        ValueError: On an unknown mode or a different number of GT and detection entries.
    """
    if mode not in PSEUDO_LABEL_MODES:
        raise ValueError(f"unknown pseudo-label mode {mode!r}; valid: {', '.join(PSEUDO_LABEL_MODES)}")
    if len(gt_targets) != len(teacher_detections):
        raise ValueError(f"got {len(gt_targets)} GT targets but {len(teacher_detections)} teacher detections")
    pseudo = filter_detections(teacher_detections, score_thr, class_score_thr, nms_iou, max_dets)
    out = []
    for gt, det in zip(gt_targets, pseudo):
        if mode == "merge":
            out.append(merge_with_gt(gt, det, merge_iou_thr))
        else:
            no_gt = torch.zeros(gt["boxes"].reshape(-1, 4).shape[0], dtype=torch.bool, device=gt["boxes"].device)
            out.append(_assemble(gt, no_gt, det["boxes"], det["labels"].to(no_gt.device)))
    return out
