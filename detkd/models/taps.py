"""Reach a torchvision detector's FPN features and dense-head outputs with forward hooks (never a forked forward).

A :class:`FeatureTap` (a *recorder* in MMRazor's vocabulary) hooks ``model.backbone`` and, for the dense detectors,
``model.head``. After any forward that runs them (``model(images, targets)`` in train or eval mode, or a direct
``model.backbone(x)`` call) it holds:

* ``tap.features``: ``{level: Tensor(N, C, H_l, W_l)}``, fine to coarse, named ``p{log2(stride)}`` (stride 8 ->
  ``"p3"``). The tensors are the graph's own (not detached), so a loss on the student's features back-propagates.
* ``tap.head_outputs``: the dict the head returned: ``cls_logits`` ``(N, sum_l H_l W_l A, K)``,
  ``bbox_regression`` ``(N, sum_l H_l W_l A, 4)`` and, for FCOS, ``bbox_ctrness`` ``(N, sum_l H_l W_l A, 1)``
  (RetinaNet, FCOS, SSD). :func:`split_per_level` turns them back into per-level maps.
* ``tap.input_hw``: ``(H, W)`` of the batched, padded tensor that entered the backbone (the ``ImageList`` tensor).

The level strides are measured once, on the first recorded forward, from the padded input size and the feature sizes
(:func:`infer_strides`).

Faster R-CNN: only the backbone/FPN is tapped here. A later ROI-level distillation tap will hook
``model.rpn.head`` (``RPNHead``: per level objectness ``(N, A, H, W)`` and deltas ``(N, 4A, H, W)``), ``model.rpn``
(proposals ``list[Tensor(R_i, 4)]``), ``model.roi_heads.box_roi_pool`` (``MultiScaleRoIAlign`` on backbone keys
``"0".."3"``: ``(sum_i R_i, C, 7, 7)``), ``model.roi_heads.box_head`` (``(sum_i R_i, 1024)``) and
``model.roi_heads.box_predictor`` (class logits ``(sum_i R_i, K)`` and box deltas ``(sum_i R_i, 4K)``). In training
``roi_heads`` samples proposals at random, so teacher and student must be run on the student's sampled ROIs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

HW = tuple[int, int]


def _unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the model itself)."""
    return getattr(model, "module", model)


def level_name(stride: int) -> str:
    """``"p{log2(stride)}"`` for a power-of-two stride (8 -> ``"p3"``)."""
    k = int(round(math.log2(stride)))
    if stride < 1 or 2**k != stride:
        raise ValueError(f"feature stride {stride} is not a power of two")
    return f"p{k}"


def infer_strides(input_hw: HW, feat_hws: Sequence[HW], max_log2: int = 16) -> list[int]:
    """Power-of-two strides of feature maps (ordered fine to coarse) from the padded input size and their sizes.

    A stride-``s`` stack of stride-2 convolutions/poolings gives ``ceil(H / s)`` (or ``floor`` for unpadded
    kernels), so ``s = round(H / h)`` whenever ``H`` is a multiple of ``s`` — the usual case, torchvision pads the
    batch to a multiple of 32. Levels that collapse to 1x1 (P6/P7 of a 64 px input) or are rounded (SSD at
    320 px) are ambiguous from the ratio alone; each level therefore takes the smallest power of two ``s`` larger
    than the previous level's stride with ``ceil`` (or ``floor``) ``(H / s, W / s) == (h, w)``.

    Args:
        input_hw: ``(H, W)`` of the batched tensor entering the backbone.
        feat_hws: ``(h_l, w_l)`` per level, fine to coarse.
        max_log2: largest stride tried is ``2**max_log2``.

    Returns:
        One stride per level, strictly increasing.

    Raises:
        ValueError: no power-of-two stride explains a level (e.g. two levels of equal stride).
    """
    big_h, big_w = input_hw
    strides: list[int] = []
    prev = 0
    for h, w in feat_hws:
        found = None
        for k in range(max_log2 + 1):
            s = 2**k
            if s <= prev:
                continue
            if (-(-big_h // s), -(-big_w // s)) == (h, w) or (big_h // s, big_w // s) == (h, w):
                found = s
                break
        if found is None:
            raise ValueError(
                f"cannot infer a power-of-two stride for a {h}x{w} feature map of a {big_h}x{big_w} input after "
                f"stride {prev} (feature sizes {list(feat_hws)}); levels must be ordered fine to coarse with strictly "
                f"increasing strides"
            )
        strides.append(found)
        prev = found
    return strides


class FeatureTap:
    """Record a detector's backbone/FPN features (named by stride) and its dense-head outputs via forward hooks.

    Example:
        >>> with FeatureTap(model) as tap:
        ...     losses = model(images, targets)
        ...     p3 = tap.features["p3"]  # (N, C, H/8, W/8)

    Args:
        model: a torchvision RetinaNet, FCOS, FasterRCNN or SSD (a DDP wrapper is unwrapped). Its ``backbone``
            returns an ordered dict of ``(N, C_l, H_l, W_l)`` (or one tensor).
        record_head: also hook ``model.head`` when the model has one (RetinaNet, FCOS, SSD).

    Attributes:
        features: ``{level: Tensor(N, C_l, H_l, W_l)}`` of the last recorded forward, fine to coarse.
        head_outputs: ``{name: Tensor(N, sum_l H_l W_l A_l, K)}`` of the last head forward (empty if none).
        input_hw: ``(H, W)`` of the padded batch tensor that entered the backbone.
        strides: ``{level: stride}``, set on the first recorded forward.
        level_keys: ``{level: backbone output key}`` (e.g. ``"p2" -> "0"``, ``"p6" -> "pool"``), set with ``strides``.

    The recorded tensors keep their autograd graph alive until :meth:`clear` or the next forward.
    """

    def __init__(self, model: nn.Module, record_head: bool = True) -> None:
        self.model = _unwrap(model)
        if not isinstance(getattr(self.model, "backbone", None), nn.Module):
            raise TypeError(f"{type(self.model).__name__} has no 'backbone' module to tap")
        self.features: dict[str, Tensor] = {}
        self.head_outputs: dict[str, Tensor] = {}
        self.input_hw: Optional[HW] = None
        self.strides: Optional[dict[str, int]] = None
        self.level_keys: Optional[dict[str, str]] = None
        self._handles = [self.model.backbone.register_forward_hook(self._on_backbone)]
        head = getattr(self.model, "head", None)
        if record_head and isinstance(head, nn.Module):
            self._handles.append(head.register_forward_hook(self._on_head))

    # -- hooks --------------------------------------------------------------------------------------------------

    def _on_backbone(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0]
        if isinstance(output, Tensor):
            output = OrderedDict([("0", output)])
        self.input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        keys = list(output.keys())
        if self.level_keys is None:
            sizes = [(int(v.shape[-2]), int(v.shape[-1])) for v in output.values()]
            strides = infer_strides(self.input_hw, sizes)
            names = [level_name(s) for s in strides]
            self.strides = dict(zip(names, strides))
            self.level_keys = dict(zip(names, keys))
        elif list(self.level_keys.values()) != keys:
            raise RuntimeError(
                f"backbone output keys changed from {list(self.level_keys.values())} to {keys} after the first forward"
            )
        self.features = {name: output[key] for name, key in self.level_keys.items()}

    def _on_head(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Mapping):
            self.head_outputs = dict(output)

    # -- API ----------------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop the recorded tensors (the measured strides are kept)."""
        self.features = {}
        self.head_outputs = {}
        self.input_hw = None

    def remove(self) -> None:
        """Remove the hooks and drop the recorded tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# ----------------------------------------------------------------------------------------------------------------
# Dense-head layout
# ----------------------------------------------------------------------------------------------------------------


def _hw(value: Union[Tensor, Sequence[int]]) -> HW:
    if isinstance(value, Tensor):
        return int(value.shape[-2]), int(value.shape[-1])
    h, w = value[-2], value[-1]
    return int(h), int(w)


def _anchors_per_level(total: int, hws: Sequence[HW], num_anchors: Union[None, int, Sequence[int]]) -> list[int]:
    if num_anchors is None:
        locations = sum(h * w for h, w in hws)
        if locations == 0 or total % locations:
            raise ValueError(
                f"{total} flat entries are not a multiple of the {locations} locations of levels {list(hws)}; pass "
                f"num_anchors per level"
            )
        return [total // locations] * len(hws)
    if isinstance(num_anchors, int):
        return [num_anchors] * len(hws)
    if len(num_anchors) != len(hws):
        raise ValueError(f"num_anchors has {len(num_anchors)} entries for {len(hws)} levels")
    return [int(a) for a in num_anchors]


def split_per_level(
    flat: Tensor,
    feats: Mapping[str, Union[Tensor, Sequence[int]]],
    num_anchors: Union[None, int, Sequence[int]] = None,
) -> dict[str, Tensor]:
    """Undo torchvision's dense-head flattening: ``(N, sum_l H_l W_l A_l, K)`` -> ``{level: (N, A_l * K, H_l, W_l)}``.

    torchvision's RetinaNet/FCOS/SSD heads turn each level's conv output ``(N, A*K, H, W)`` into
    ``view(N, A, K, H, W).permute(0, 3, 4, 1, 2).reshape(N, H*W*A, K)`` and concatenate the levels in backbone order.
    This slices the levels back out and applies the inverse permutation, so channel ``a * K + k`` at ``(y, x)`` of the
    result is anchor ``a``, class ``k`` at that location — exactly the conv output.

    Args:
        flat: ``(N, sum_l H_l W_l A_l, K)``, e.g. ``tap.head_outputs["cls_logits"]``.
        feats: ``{level: Tensor(N, C, H_l, W_l)}`` or ``{level: (H_l, W_l)}``, in the order the head consumed them.
        num_anchors: anchors per location, one int or one per level; default: inferred, the same on every level.

    Returns:
        ``{level: Tensor(N, A_l * K, H_l, W_l)}`` (views of ``flat`` where possible; gradients flow).
    """
    if flat.dim() != 3:
        raise ValueError(f"expected a flat head output (N, sum HWA, K), got shape {tuple(flat.shape)}")
    n, total, k = flat.shape
    names = list(feats)
    hws = [_hw(feats[name]) for name in names]
    anchors = _anchors_per_level(total, hws, num_anchors)
    counts = [h * w * a for (h, w), a in zip(hws, anchors)]
    if sum(counts) != total:
        raise ValueError(
            f"levels {dict(zip(names, hws))} with {anchors} anchors hold {sum(counts)} entries, not {total}"
        )
    out = {}
    for name, (h, w), a, chunk in zip(names, hws, anchors, flat.split(counts, dim=1)):
        out[name] = chunk.reshape(n, h, w, a, k).permute(0, 3, 4, 1, 2).reshape(n, a * k, h, w)
    return out


def merge_levels(maps: Mapping[str, Tensor], num_columns: int) -> Tensor:
    """The inverse of :func:`split_per_level`: ``{level: (N, A_l * K, H_l, W_l)}`` -> ``(N, sum_l H_l W_l A_l, K)``.

    Args:
        maps: per-level maps, in head order.
        num_columns: ``K`` (classes for ``cls_logits``, 4 for ``bbox_regression``, 1 for ``bbox_ctrness``).
    """
    parts = []
    for m in maps.values():
        n, c, h, w = m.shape
        parts.append(
            m.reshape(n, c // num_columns, num_columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, num_columns)
        )
    return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# One probe forward
# ----------------------------------------------------------------------------------------------------------------


def probe_levels(model: nn.Module, image_size: int = 128) -> tuple[dict[str, int], dict[str, int]]:
    """Strides and channels of every feature level, from one dummy ``image_size`` x ``image_size`` image.

    The image goes through the model's own transform (resize, normalise, pad) and its backbone, in eval mode under
    ``torch.no_grad()``; the model's train/eval mode is restored afterwards.

    Returns:
        ``({level: stride}, {level: channels})``, fine to coarse.
    """
    model = _unwrap(model)
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad(), FeatureTap(model, record_head=False) as tap:
            images, _ = model.transform([torch.full((3, image_size, image_size), 0.5, device=device)])
            model.backbone(images.tensors)
            strides = dict(tap.strides or {})
            channels = {name: int(f.shape[1]) for name, f in tap.features.items()}
    finally:
        model.train(was_training)
    return strides, channels


def feature_strides(model: nn.Module, image_size: int = 128) -> dict[str, int]:
    """``{level: stride}`` of the detector's FPN/backbone levels (e.g. ``{"p3": 8, ..., "p7": 128}``)."""
    return probe_levels(model, image_size)[0]


def feature_channels(model: nn.Module, image_size: int = 128) -> dict[str, int]:
    """``{level: channels}`` of the detector's FPN/backbone levels (e.g. ``{"p3": 256, ...}``)."""
    return probe_levels(model, image_size)[1]
