"""The detections of several teachers on one image -> one set of pseudo-label candidates.

Each teacher's detections follow torchvision's eval contract (``boxes`` (M, 4) xyxy, ``scores`` (M,), ``labels``
(M,)). Teacher ``k`` has a weight ``w_k``; the weights are normalised to sum to 1 first. Two methods, chosen by
``distill.pseudo_label_fusion.method``:

* ``wbf`` (weighted box fusion, Solovyev et al., Image and Vision Computing 2021): boxes that several teachers put
  on one object are averaged instead of one of them being kept. With weighted scores ``v_j = w_{k(j)} s_j``:

  1. the clusters are seeded by class-wise NMS over all teachers' boxes at ``iou`` (ranked by ``v``): every kept box
     seeds one cluster, and every box joins the seed of its class it overlaps most (IoU > ``iou``; NMS guarantees
     one exists, and a seed joins itself);
  2. a cluster's box is ``sum_j v_j b_j / sum_j v_j``, its label the seed's, its score ``min(1, sum_j v_j)``: a box
     that all teachers find keeps its mean score, one that only a teacher of weight 1/2 finds keeps half of it, so
     agreement between teachers survives a later score threshold and a single teacher's guess does not.

  The paper matches each box against the running average of a cluster, one box at a time; seeding the clusters by
  NMS gives the same clusters whenever the boxes of one object overlap each other above ``iou``, with batched tensor
  operations instead of a loop over boxes.
* ``nms``: class-wise NMS at ``iou`` over all teachers' boxes with scores ``s_j w_{k(j)} / max_k w_k`` (equal
  weights leave the scores unchanged): the most confident teacher's box of each object is kept as it is.

The fused detections then go through the pseudo-label filter (``score_thr``, NMS, ``max_dets``) like one teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

__all__ = ["FUSION_METHODS", "fuse_detections", "weighted_box_fusion", "nms_fusion"]

FUSION_METHODS = ("wbf", "nms")


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def _concat(
    per_teacher: Sequence[dict[str, Tensor]], weights: Sequence[float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All teachers' detections of one image in one set: boxes (M, 4), scores (M,), labels (M,), weight (M,)."""
    boxes = torch.cat([d["boxes"].detach().reshape(-1, 4) for d in per_teacher])
    scores = torch.cat([d["scores"].detach().reshape(-1) for d in per_teacher])
    labels = torch.cat([d["labels"].detach().reshape(-1).long() for d in per_teacher])
    weight = torch.cat(
        [
            torch.full((d["scores"].numel(),), w, dtype=scores.dtype, device=scores.device)
            for d, w in zip(per_teacher, weights)
        ]
    )
    return boxes, scores, labels, weight


def _sorted(boxes: Tensor, scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
    order = torch.argsort(scores, descending=True, stable=True)
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


@torch.no_grad()
def weighted_box_fusion(
    per_teacher: Sequence[dict[str, Tensor]], weights: Sequence[float], iou: float = 0.55
) -> dict[str, Tensor]:
    """Weighted box fusion of one image's detections from several teachers (formula: module docstring).

    Args:
        per_teacher: one detection dict per teacher (``boxes`` (M_k, 4) xyxy, ``scores`` (M_k,), ``labels`` (M_k,)).
        weights: one weight per teacher (>= 0, positive sum; normalised to sum to 1).
        iou: boxes of one class overlapping a cluster's seed with IoU above this join it.

    Returns:
        ``boxes`` (C, 4), ``scores`` (C,), ``labels`` (C,) of the C clusters, by decreasing score.
    """
    boxes, scores, labels, weight = _concat(per_teacher, _normalised(weights))
    if boxes.shape[0] == 0:
        return {"boxes": boxes, "scores": scores, "labels": labels}
    v = scores * weight
    seeds = batched_nms(boxes.float(), v.float(), labels, iou)  # (S,)
    overlap = box_iou(boxes.float(), boxes[seeds].float())  # (M, S)
    joinable = (overlap > iou) & (labels[:, None] == labels[seeds][None, :])
    joinable[seeds, torch.arange(seeds.numel(), device=seeds.device)] = True  # a seed always joins itself
    cluster = torch.where(joinable, overlap, overlap.new_full((), -1.0)).argmax(dim=1)  # (M,)
    mass = v.new_zeros(seeds.numel()).index_add_(0, cluster, v)
    summed = boxes.new_zeros(seeds.numel(), 4).index_add_(0, cluster, v[:, None] * boxes)
    fused = summed / mass.clamp(min=torch.finfo(mass.dtype).tiny)[:, None]
    return _sorted(fused, mass.clamp(max=1.0), labels[seeds])


@torch.no_grad()
def nms_fusion(
    per_teacher: Sequence[dict[str, Tensor]], weights: Sequence[float], iou: float = 0.55
) -> dict[str, Tensor]:
    """Class-wise NMS across teachers, scores scaled by ``w_k / max_k w_k`` (module docstring). Same contract as
    :func:`weighted_box_fusion`."""
    w = _normalised(weights)
    top = max(w)
    boxes, scores, labels, weight = _concat(per_teacher, [x / top for x in w])
    if boxes.shape[0] == 0:
        return {"boxes": boxes, "scores": scores, "labels": labels}
    v = scores * weight
    keep = batched_nms(boxes.float(), v.float(), labels, iou)
    return _sorted(boxes[keep], v[keep], labels[keep])


def fuse_detections(
    per_teacher: Sequence[Sequence[dict[str, Tensor]]], weights: Sequence[float], method: str = "wbf", iou: float = 0.55
) -> list[dict[str, Tensor]]:
    """Fuse a batch: ``per_teacher[k][i]`` is teacher ``k``'s detections on image ``i``; returns one dict per image.

    Teachers of weight 0 (e.g. not followed this step by the adaptive policy) contribute nothing."""
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown pseudo-label fusion '{method}'; valid: {', '.join(FUSION_METHODS)}")
    if len(per_teacher) != len(weights):
        raise ValueError(f"{len(per_teacher)} teachers' detections but {len(weights)} weights")
    used = [k for k, w in enumerate(weights) if w > 0]
    fuse = weighted_box_fusion if method == "wbf" else nms_fusion
    num_images = len(per_teacher[0])
    return [fuse([per_teacher[k][i] for k in used], [weights[k] for k in used], iou) for i in range(num_images)]
