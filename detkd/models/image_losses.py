"""A detector's own detection loss on each image of a recorded batch, from outputs it already computed.

The ``confidence`` weighting of several teachers (:mod:`detkd.teachers.weighting`) asks how wrong each teacher is on
each image. Running every teacher again in training mode would cost a forward per teacher and would move its
BatchNorm statistics; instead these functions reuse what the teacher computed on the step's padded batch (its
backbone output and, for dense heads, its head outputs) and evaluate the family's own loss one image at a time,
under ``no_grad``. Each is ``fn(model, image_list, backbone_out, head, targets) -> Tensor (N,)`` and is registered
as the family's ``image_losses`` (:class:`detkd.models.families.DetectorFamily`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["retinanet_image_losses", "fcos_image_losses", "two_stage_image_losses"]


def _per_image(compute, targets: list[dict[str, Tensor]], head: dict[str, Tensor], anchors: list[Tensor], *extra):
    out = []
    for i, target in enumerate(targets):
        losses = compute([target], {k: v[i : i + 1] for k, v in head.items()}, [anchors[i]], *extra)
        out.append(sum(losses.values()))
    return torch.stack(out)


@torch.no_grad()
def retinanet_image_losses(
    model: nn.Module, image_list: Any, backbone_out: Mapping[str, Tensor], head: dict[str, Tensor], targets: list
) -> Tensor:
    """RetinaNet: focal classification + box regression (``model.compute_loss``), image by image."""
    feats = list(backbone_out.values())
    anchors = model.anchor_generator(image_list, feats)
    return _per_image(model.compute_loss, targets, head, anchors)


@torch.no_grad()
def fcos_image_losses(
    model: nn.Module, image_list: Any, backbone_out: Mapping[str, Tensor], head: dict[str, Tensor], targets: list
) -> Tensor:
    """FCOS: focal classification + GIoU + centerness (``model.compute_loss``), image by image."""
    feats = list(backbone_out.values())
    anchors = model.anchor_generator(image_list, feats)
    num_per_level = [f.size(2) * f.size(3) for f in feats]
    return _per_image(model.compute_loss, targets, head, anchors, num_per_level)


@torch.no_grad()
def two_stage_image_losses(
    model: nn.Module, image_list: Any, backbone_out: Mapping[str, Tensor], head: dict[str, Tensor], targets: list
) -> Tensor:
    """Faster R-CNN: its box head run on the image's GT boxes as proposals, cross-entropy to the GT labels plus the
    smooth-L1 (beta 1/9, as torchvision) of the GT class's deltas to 0 (a GT box regresses to itself), averaged over
    the image's boxes (0 for an image without boxes). Deterministic: no proposal sampling."""
    roi = model.roi_heads
    boxes = [t["boxes"].to(torch.float32) for t in targets]
    labels = torch.cat([t["labels"] for t in targets])
    counts = torch.tensor([len(b) for b in boxes], device=labels.device)
    out = torch.zeros(len(targets), device=labels.device)
    if labels.numel() == 0:
        return out
    pooled = roi.box_roi_pool(dict(backbone_out), boxes, image_list.image_sizes)
    logits, deltas = roi.box_predictor(roi.box_head(pooled))
    per_box = F.cross_entropy(logits, labels, reduction="none")
    chosen = deltas.reshape(deltas.shape[0], -1, 4)[torch.arange(labels.numel(), device=labels.device), labels]
    per_box = per_box + F.smooth_l1_loss(chosen, torch.zeros_like(chosen), beta=1 / 9, reduction="none").sum(dim=1)
    image = torch.repeat_interleave(torch.arange(len(targets), device=labels.device), counts)
    out.index_add_(0, image, per_box.to(out.dtype))
    return out / counts.clamp(min=1).to(out.dtype)
