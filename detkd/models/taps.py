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

One distillation step is *recorded* here (DESIGN.md, "One distillation step"): a :class:`ModelRecorder` hooks the
student (its transform, backbone, dense head and, for Faster R-CNN, the RPN head, the ROI pooler's sampled proposals
and the box predictor) and hands out one :class:`ModelRecord` per forward pass; :func:`run_teacher` runs a frozen
teacher on the student's padded batch (re-normalised to the teacher's own mean/std) and returns a
:class:`TeacherRecord` with exactly the parts the configured losses need. The losses read these records and nothing
else.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from detkd.engine.checkpoint import unwrap

HW = tuple[int, int]


def _unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the model itself)."""
    return unwrap(model)


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


# ----------------------------------------------------------------------------------------------------------------
# Records of one step
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    """What one forward pass of the student left behind (tensors keep their autograd graph).

    Attributes:
        image_list: the ``ImageList`` its transform made (the padded, normalised batch both models see).
        targets: the targets resized by its transform (boxes ``xyxy`` canvas pixels).
        features: ``{level: (N, C_l, H_l, W_l)}``, fine to coarse.
        backbone_out: the backbone's own output dict (keys ``"0"``, ``"1"`` ... ``"pool"``), for ROI pooling.
        head: the dense head's outputs (``cls_logits``, ``bbox_regression``, FCOS ``bbox_ctrness``), or empty.
        proposals: Faster R-CNN: the proposals its ROI head sampled this pass, per image (detached), else None.
        image_shapes: Faster R-CNN: the image sizes passed to the ROI pooler.
        roi_logits: Faster R-CNN: class logits of the sampled proposals ``(sum_i R_i, K)``.
        roi_deltas: Faster R-CNN: box deltas of the sampled proposals ``(sum_i R_i, 4K)``.
        rpn_objectness: Faster R-CNN: the RPN head's objectness per level ``(N, A, H_l, W_l)``.
    """

    image_list: Any = None
    targets: Optional[list[dict[str, Tensor]]] = None
    features: dict[str, Tensor] = field(default_factory=dict)
    backbone_out: Optional[Mapping[str, Tensor]] = None
    head: dict[str, Tensor] = field(default_factory=dict)
    proposals: Optional[list[Tensor]] = None
    image_shapes: Optional[list[tuple[int, int]]] = None
    roi_logits: Optional[Tensor] = None
    roi_deltas: Optional[Tensor] = None
    rpn_objectness: Optional[list[Tensor]] = None
    roi_labels: Optional[Tensor] = None
    roi_keep: Optional[list[Tensor]] = None

    def kept_proposals(self) -> Optional[list[Tensor]]:
        """The proposals distilled this step: all sampled ones, or the subset :attr:`roi_keep` names per image."""
        if self.proposals is None or self.roi_keep is None:
            return self.proposals
        return [p[k] for p, k in zip(self.proposals, self.roi_keep)]

    def roi_keep_flat(self) -> Optional[Tensor]:
        """:attr:`roi_keep` as indices into the concatenated proposals (and ``roi_logits`` rows), or None."""
        if self.roi_keep is None:
            return None
        offsets = torch.tensor([0] + [len(p) for p in self.proposals[:-1]], device=self.roi_keep[0].device).cumsum(0)
        return torch.cat([k + o for k, o in zip(self.roi_keep, offsets)])


def select_rois(labels: Sequence[Tensor], max_rois: int) -> list[Tensor]:
    """Per image, the indices of at most ``max_rois`` sampled proposals: foreground first, then background, each in
    the sampler's order (torchvision keeps the RPN's score order, so the kept background is the most object-like).

    Args:
        labels: the class each proposal is matched to, per image, ``(R_i,)`` (0 = background, -1 = ignored).
        max_rois: the budget per image.
    """
    out = []
    for lab in labels:
        order = torch.argsort((lab <= 0).to(torch.int8), stable=True)  # foreground (label > 0) first
        out.append(order[:max_rois])
    return out


class ModelRecorder:
    """Record every part of a student's forward that a loss may read, one :class:`ModelRecord` per pass.

    Hooks: ``transform`` (padded batch, resized targets), ``backbone`` and the dense ``head`` (through a
    :class:`FeatureTap`); for a model with ``roi_heads``: a pre-hook on ``box_roi_pool`` (the sampled proposals), a
    hook on ``box_predictor`` (their logits and deltas) and, when ``record_rpn``, on ``rpn.head``. Only the first call
    of each hook in a pass is kept, so nothing a later call does overwrites the pass's record.

    Example:
        >>> recorder = ModelRecorder(student)
        >>> losses = student(images, targets)
        >>> record = recorder.take()  # this pass; the recorder is empty again
    """

    def __init__(self, model: nn.Module, record_rpn: bool = False) -> None:
        self.model = _unwrap(model)
        self.tap = FeatureTap(self.model)
        self._record = ModelRecord()
        self._handles = [self.model.transform.register_forward_hook(self._on_transform)]
        roi = getattr(self.model, "roi_heads", None)
        if roi is not None:
            self._handles += [
                roi.box_roi_pool.register_forward_pre_hook(self._on_roi_pool),
                roi.box_predictor.register_forward_hook(self._on_box_predictor),
            ]
            if record_rpn:
                self._handles.append(self.model.rpn.head.register_forward_hook(self._on_rpn_head))

    def _on_transform(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._record.image_list is None:
            self._record.image_list, self._record.targets = output

    def _on_roi_pool(self, module: nn.Module, args: Any) -> None:
        if self._record.proposals is None:
            features, proposals, image_shapes = args
            self._record.backbone_out = features
            self._record.proposals = [p.detach() for p in proposals]
            self._record.image_shapes = image_shapes

    def _on_box_predictor(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._record.roi_logits is None:
            self._record.roi_logits, self._record.roi_deltas = output

    def _on_rpn_head(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._record.rpn_objectness is None:
            self._record.rpn_objectness = list(output[0])

    def take(self) -> ModelRecord:
        """The record of the pass since the last ``take`` (features and head from the tap); then start afresh."""
        record = self._record
        record.features = dict(self.tap.features)
        record.head = dict(self.tap.head_outputs)
        self._record = ModelRecord()
        self.tap.clear()
        return record

    def clear(self) -> None:
        """Drop whatever was recorded since the last ``take``."""
        self._record = ModelRecord()
        self.tap.clear()

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.tap.remove()


@dataclass
class TeacherRecord:
    """What a frozen teacher computed on the student's padded batch (no grad).

    Attributes:
        features: ``{level: (N, C_l, H_l, W_l)}``.
        backbone_out: the teacher backbone's own output dict.
        head: its dense-head outputs when a loss needs them, else empty.
        roi_logits: its ROI head's class logits on the student's sampled proposals (``teacher_rois``), else None.
        roi_deltas: its ROI head's box deltas on those proposals, else None.
        rpn_objectness: its RPN objectness per level (``teacher_rpn``), else None.
        detections: its post-processed detections on the batch images (``teacher_dets``), else None.
    """

    features: dict[str, Tensor] = field(default_factory=dict)
    backbone_out: Optional[Mapping[str, Tensor]] = None
    head: dict[str, Tensor] = field(default_factory=dict)
    roi_logits: Optional[Tensor] = None
    roi_deltas: Optional[Tensor] = None
    rpn_objectness: Optional[list[Tensor]] = None
    detections: Optional[list[dict[str, Tensor]]] = None


def renormalize(
    tensors: Tensor,
    image_sizes: Sequence[tuple[int, int]],
    src: tuple[Sequence[float], Sequence[float]],
    dst: tuple[Sequence[float], Sequence[float]],
) -> Tensor:
    """A padded batch normalised with ``src = (mean, std)`` -> the same batch normalised with ``dst``.

    Inside each image ``x -> ((x * std_s + mean_s) - mean_d) / std_d``; the padding stays 0, as the destination
    model's own transform would pad it. Returns ``tensors`` itself when the two normalisations are equal.

    Args:
        tensors: ``(N, 3, H, W)`` padded batch.
        image_sizes: ``(h, w)`` of each image inside the canvas.
        src: the normalisation the batch has.
        dst: the normalisation wanted.
    """
    if tuple(src[0]) == tuple(dst[0]) and tuple(src[1]) == tuple(dst[1]):
        return tensors
    shape = (1, -1, 1, 1)
    s_mean, s_std, d_mean, d_std = (tensors.new_tensor(list(v)).reshape(shape) for v in (*src, *dst))
    out = (tensors * s_std + s_mean - d_mean) / d_std
    h_max, w_max = tensors.shape[-2:]
    rows = torch.arange(h_max, device=tensors.device)
    cols = torch.arange(w_max, device=tensors.device)
    sizes = torch.as_tensor([list(s) for s in image_sizes], device=tensors.device)  # (N, 2)
    inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
    return out * inside[:, None].to(out.dtype)


def run_teacher(
    teacher: nn.Module,
    tap: FeatureTap,
    canvas: Tensor,
    student: ModelRecord,
    needs: frozenset[str],
    dense_head: bool,
    detections: Optional[list[dict[str, Tensor]]] = None,
    detection_pass: Optional[tuple[Tensor, Mapping[str, Tensor], dict[str, Tensor], dict[str, Tensor]]] = None,
    grad: bool = False,
) -> TeacherRecord:
    """Run the ``teacher`` once on the (already re-normalised) padded batch ``canvas``, computing only what
    ``needs`` asks for (names of :data:`detkd.losses.base.NEEDS`); under ``no_grad`` unless ``grad`` (an online
    teacher in deep mutual learning, which learns from the distillation terms too).

    Args:
        teacher: the teacher detector (eval mode).
        tap: a :class:`FeatureTap` on the teacher (names its levels).
        canvas: ``(N, 3, H, W)`` the student's padded batch in the teacher's normalisation.
        student: the student's record of this step (its sampled proposals, for ``teacher_rois``).
        needs: what to compute beyond the features.
        dense_head: the teacher's family has a dense head (RetinaNet, FCOS) whose outputs ``teacher_head`` means.
        detections: the teacher's detections on this batch when they were made already (pseudo labels are made
            before the student's pass), kept in the record.
        detection_pass: ``(canvas, backbone output, features, head outputs)`` recorded during that detection pass;
            when its canvas equals ``canvas`` exactly, its backbone (and dense-head) outputs are reused instead of
            computed again, so the teacher's backbone runs once per step. (An online teacher's own training pass
            is handed in the same way.)
        grad: record the teacher's outputs with their autograd graph.
    """
    with torch.set_grad_enabled(grad):
        return _run_teacher(teacher, tap, canvas, student, needs, dense_head, detections, detection_pass)


def _run_teacher(teacher, tap, canvas, student, needs, dense_head, detections, detection_pass) -> TeacherRecord:
    record = TeacherRecord(detections=detections)
    head = getattr(teacher, "head", None)
    want_head = "teacher_head" in needs and dense_head and head is not None
    reuse = detection_pass is not None and detection_pass[0].shape == canvas.shape
    reuse = reuse and torch.equal(detection_pass[0], canvas)
    if reuse:
        _, out, record.features, pass_head = detection_pass
        if want_head and pass_head:
            record.head = dict(pass_head)
    else:
        tap.clear()
        out = teacher.backbone(canvas)
        if torch.is_tensor(out):  # a backbone without FPN returns one map
            out = OrderedDict([("0", out)])
        record.features = dict(tap.features)
    record.backbone_out = out
    if want_head and not record.head:
        record.head = dict(head(list(out.values())))
    roi = getattr(teacher, "roi_heads", None)
    if "teacher_rois" in needs and roi is not None and student.proposals is not None:
        pooled = roi.box_roi_pool(out, student.kept_proposals(), student.image_shapes)
        record.roi_logits, record.roi_deltas = roi.box_predictor(roi.box_head(pooled))
    if "teacher_rpn" in needs and roi is not None:
        record.rpn_objectness = list(teacher.rpn.head(list(out.values()))[0])
    tap.clear()
    return record
