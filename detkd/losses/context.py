"""What losses read: the :class:`StepRecord` of one distillation step and its per-level :class:`LevelContext`.

The Distiller records a step once (:mod:`detkd.models.taps`) and wraps it in a :class:`StepRecord`; head losses
read the record, feature losses the :class:`LevelContext` of each level that :meth:`StepRecord.level_context` builds.
Masks are cached: those that depend only on the boxes, the teacher or the logits are shared by every context of a
level (e.g. ``fgd`` and ``defeat`` both use the box masks, computed once per step), those that depend on the adapted
student feature belong to the context of that adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd import masks

__all__ = ["LevelContext", "StepRecord"]


@dataclass(eq=False)
class LevelContext:
    """Everything a feature loss may need on one FPN level during one step.

    Attributes:
        name: Level name, e.g. ``"p3"``.
        stride: Nominal stride of the level in pixels (``2 ** level``).
        image_hw: Padded canvas ``(H_img, W_img)`` shared by teacher and student.
        boxes: GT boxes per image, each ``(K_i, 4)`` ``xyxy`` pixels on the canvas.
        s_feat: Student feature after its adapter, (N, C, H, W) (requires grad).
        t_feat: Teacher feature, (N, C, H, W) (no grad).
        anchors: Optional (H, W, A, 4) ``xyxy`` anchors of this level (anchor-based detectors).
        t_cls_logits: Optional teacher classification logits of this level, (N, A*K, H, W).
        s_cls_logits: Optional student classification logits of this level, (N, A*K, H, W).
        logits_per_anchor: False when teacher and student have different anchors per location and the logits were
            reduced to (N, K, H, W) by a max over anchors (the difference mask then uses window candidates).
    """

    name: str
    stride: int
    image_hw: tuple[int, int]
    boxes: list[Tensor]
    s_feat: Tensor
    t_feat: Tensor
    anchors: Optional[Tensor] = None
    t_cls_logits: Optional[Tensor] = None
    s_cls_logits: Optional[Tensor] = None
    logits_per_anchor: bool = True  # False when the logits were reduced over anchors (teacher/student A differ)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # masks of this (adapted) student feature
    _shared: dict[Any, Any] = field(default_factory=dict, repr=False)  # masks of the boxes / teacher / logits

    @property
    def feat_hw(self) -> tuple[int, int]:
        """Spatial size ``(H, W)`` of the (teacher) feature map."""
        return int(self.t_feat.shape[-2]), int(self.t_feat.shape[-1])

    def _cached(self, key: Any, compute: Any, student_dependent: bool = False) -> Any:
        cache = self._cache if student_dependent else self._shared
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def _feat(self, which: Literal["t", "s"]) -> Tensor:
        if which == "t":
            return self.t_feat.detach()
        if which == "s":
            return self.s_feat
        raise ValueError(f"which must be 't' or 's', got {which!r}")

    def _boxes(self) -> list[Tensor]:
        return [b.to(self.t_feat.device) for b in self.boxes]

    def box_masks(self) -> tuple[Tensor, Tensor]:
        """``(fg, bg)`` of :func:`detkd.masks.box_masks`, each (N, H, W)."""
        return self._cached("box_masks", lambda: masks.box_masks(self._boxes(), self.feat_hw, self.image_hw))

    def spatial_attention(self, which: Literal["t", "s"], temperature: float) -> Tensor:
        """Spatial attention (N, H, W) of the teacher (detached) or the student (with grad)."""
        key = ("spatial", which, float(temperature))
        return self._cached(key, lambda: masks.spatial_attention(self._feat(which), temperature), which == "s")

    def channel_attention(self, which: Literal["t", "s"], temperature: float) -> Tensor:
        """Channel attention (N, C) of the teacher (detached) or the student (with grad)."""
        key = ("channel", which, float(temperature))
        return self._cached(key, lambda: masks.channel_attention(self._feat(which), temperature), which == "s")

    def level_anchors(self) -> Tensor:
        """``self.anchors`` or, for anchor-free detectors, RetinaNet-style pseudo-anchors (H, W, 9, 4).

        The pseudo-anchors are centred on every cell with sizes ``4 * stride * 2^(k/3)`` and aspect ratios
        0.5, 1, 2 (see :func:`detkd.masks.grid_anchors`).
        """
        if self.anchors is not None:
            return self.anchors
        return self._cached(
            "pseudo_anchors",
            lambda: masks.grid_anchors(
                self.feat_hw, self.image_hw, masks.retinanet_anchor_sizes(self.stride), device=self.t_feat.device
            ),
        )

    def fgfi(self, psi: float = 0.5) -> Tensor:
        """FGFI imitation mask (N, H, W) in {0, 1} from :meth:`level_anchors` (per-level max IoU)."""
        return self._cached(("fgfi", float(psi)), lambda: masks.fgfi_mask(self.level_anchors(), self._boxes(), psi))

    @property
    def has_cls_logits(self) -> bool:
        """Whether both teacher and student classification logits are available on this level."""
        return self.t_cls_logits is not None and self.s_cls_logits is not None

    def difference(self, top_k: int = 10, nms_iou: float = 0.3, window: int = 5, score_thr: float = 0.0) -> Tensor:
        """GID difference mask (N, H, W) of :func:`detkd.masks.difference_mask` from the cls logits.

        Uses ``self.anchors`` as candidate boxes when present, else square windows. Raises ``ValueError`` when the
        logits are missing (check :attr:`has_cls_logits`, or use :meth:`feature_difference`).
        """
        if not self.has_cls_logits:
            raise ValueError(f"level {self.name}: no teacher/student classification logits for the difference mask")
        key = ("difference", top_k, float(nms_iou), window, float(score_thr))
        return self._cached(
            key,
            lambda: masks.difference_mask(
                self.t_cls_logits,
                self.s_cls_logits,
                self.image_hw,
                anchors=self.anchors if self.logits_per_anchor else None,
                top_k=top_k,
                nms_iou=nms_iou,
                window=window,
                score_thr=score_thr,
            ),
        )

    def feature_difference(self, top_k_ratio: float = 0.1) -> Tensor:
        """Feature-distance difference mask (N, H, W) of :func:`detkd.masks.feature_difference_mask`."""
        return self._cached(
            ("feature_difference", float(top_k_ratio)),
            lambda: masks.feature_difference_mask(self.t_feat, self.s_feat, top_k_ratio),
            student_dependent=True,
        )

    def swapped(self) -> LevelContext:
        """This level with the roles exchanged: the teacher's feature (with its graph) is the learner and the adapted
        student's feature (detached) the target; logits swapped too, masks computed afresh. Deep mutual learning's
        reverse term: a loss on this context trains the teacher towards the student (losses detach their target)."""
        return LevelContext(
            name=self.name,
            stride=self.stride,
            image_hw=self.image_hw,
            boxes=self.boxes,
            s_feat=self.t_feat,
            t_feat=self.s_feat.detach(),
            anchors=self.anchors,
            t_cls_logits=None if self.s_cls_logits is None else self.s_cls_logits.detach(),
            s_cls_logits=self.t_cls_logits,
            logits_per_anchor=self.logits_per_anchor,
        )

    def clear(self) -> None:
        """Drop every cached mask of this context (e.g. if the features were replaced)."""
        self._cache.clear()
        self._shared.clear()


class StepRecord:
    """Everything one distillation step recorded, as the losses read it.

    Args:
        student: the student's :class:`~detkd.models.taps.ModelRecord` of this step's (first) pass.
        teacher: the teacher's :class:`~detkd.models.taps.TeacherRecord` on the same padded batch.
        student_model: the student detector (its anchor generator, box coder and proposal matcher are used to derive
            anchors, decoded boxes and ROI labels; it is never run here).
        teacher_model: the teacher detector (its box coder decodes the teacher's codes).
        student_family: the student's :class:`~detkd.models.families.DetectorFamily`.
        teacher_family: the teacher's.
        levels: the levels teacher and student share, finest first.
        strides: ``{level: stride}`` of the student's levels.
        with_anchors: put the student's anchors into the level contexts (a loss needs ``anchors``).
        anchor_cache: a dict kept across steps (by the Distiller): anchors depend only on the canvas and feature
            sizes, so a step with the sizes of an earlier one reuses them instead of generating them again.

    Attributes:
        image_list: the padded batch (``ImageList``) both models saw.
        targets: the student's resized targets (pseudo labels merged where configured).
        image_hw: ``(H, W)`` of the padded canvas.
        head_levels: the student's levels in its dense head's order (finest first).
        head_positions: number of feature locations over ``head_levels``.
        cross_head: the teacher's dense-head outputs on the adapted student features (``cross_head``), else None.
    """

    def __init__(
        self,
        student: Any,
        teacher: Any,
        student_model: nn.Module,
        teacher_model: nn.Module,
        student_family: Any,
        teacher_family: Any,
        levels: Sequence[str],
        strides: dict[str, int],
        with_anchors: bool = False,
        anchor_cache: Optional[dict] = None,
    ) -> None:
        self.student, self.teacher = student, teacher
        self.student_model, self.teacher_model = student_model, teacher_model
        self.student_family, self.teacher_family = student_family, teacher_family
        self.levels, self.strides, self.with_anchors = tuple(levels), strides, with_anchors
        self.image_list = student.image_list
        self.targets = student.targets
        self.image_hw = tuple(self.image_list.tensors.shape[-2:])
        s_feats = student.features
        self.head_levels = sorted(s_feats, key=lambda name: strides[name])
        self.head_positions = sum(s_feats[k].shape[-2] * s_feats[k].shape[-1] for k in self.head_levels)
        self._contexts: dict[tuple[str, int], LevelContext] = {}
        self._shared: dict[str, dict] = {}
        self._anchors: Optional[list[Tensor]] = None
        self._anchor_cache = anchor_cache if anchor_cache is not None else {}
        self._roi_labels: Optional[Tensor] = None
        self._parent: Optional[tuple[StepRecord, int]] = None  # (batch record, image index) of a per-image record
        self.cross_head: Optional[dict[str, Tensor]] = None  # set by the Distiller when a loss needs cross_head
        s_head, t_head = student.head, teacher.head
        self._s_cls = _split(s_head.get("cls_logits"), s_feats)
        self._t_cls = _split(t_head.get("cls_logits"), teacher.features)
        self.logits_per_anchor = True
        if self._s_cls is not None and self._t_cls is not None:
            num_classes = s_head["cls_logits"].shape[-1]
            if any(self._s_cls[k].shape != self._t_cls[k].shape for k in self._s_cls if k in self._t_cls):
                # e.g. FCOS (1 anchor) vs RetinaNet (9): compare per class, max over each head's own anchors
                self._s_cls = {k: _max_over_anchors(v, num_classes) for k, v in self._s_cls.items()}
                self._t_cls = {k: _max_over_anchors(v, num_classes) for k, v in self._t_cls.items()}
                self.logits_per_anchor = False

    @property
    def gt_boxes(self) -> list[Tensor]:
        """The boxes of :attr:`targets`, ``(K_i, 4)`` xyxy canvas pixels per image."""
        return [t["boxes"] for t in self.targets]

    def anchors(self) -> list[Tensor]:
        """The student's anchors per image, ``(sum_l H_l*W_l*A, 4)`` xyxy on the padded canvas (computed once)."""
        if self._anchors is None and self._parent is not None:  # a per-image record: its image's anchors
            parent, index = self._parent
            self._anchors = [parent.anchors()[index]]
        if self._anchors is None:
            feats = [self.student.features[k] for k in self.head_levels]
            tensors = self.image_list.tensors
            key = (tuple(tensors.shape), tuple(tuple(f.shape[-2:]) for f in feats), str(tensors.device), tensors.dtype)
            if key not in self._anchor_cache:
                generator = self.student_family.anchor_generator(self.student_model)
                with torch.no_grad():
                    self._anchor_cache.clear()  # one entry: the batch shape rarely changes within a run
                    self._anchor_cache[key] = generator(self.image_list, feats)
            self._anchors = self._anchor_cache[key]
        return self._anchors

    def level_anchors(self, level: str) -> Optional[Tensor]:
        """The anchors of one level as ``(H, W, A, 4)`` (identical for every image of the padded batch)."""
        counts = self.student_family.anchors_per_location(self.student_model)
        if not counts:
            return None
        all_anchors = self.anchors()[0]
        start = 0
        for name, a in zip(self.head_levels, counts):
            h, w = self.student.features[name].shape[-2:]
            if name == level:
                return all_anchors[start : start + h * w * a].reshape(h, w, a, 4)
            start += h * w * a
        return None

    def decode_student(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        """The student's box codes at ``anchors`` -> boxes ``(P, 4)`` xyxy (its family's decoding)."""
        return self.student_family.decode(self.student_model, rel_codes, anchors)

    def decode_teacher(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        """The teacher's box codes at ``anchors`` -> boxes ``(P, 4)`` xyxy (its family's decoding)."""
        return self.teacher_family.decode(self.teacher_model, rel_codes, anchors)

    def roi_labels(self) -> Tensor:
        """Faster R-CNN: the class each sampled student proposal is matched to (0 = background), ``(sum_i R_i,)``,
        by the student's own proposal matcher (computed once)."""
        if self._roi_labels is None and self.student.roi_labels is not None:
            self._roi_labels = self.student.roi_labels
        if self._roi_labels is None:
            labels = [t["labels"] for t in self.targets]
            roi = self.student_model.roi_heads
            _, assigned = roi.assign_targets_to_proposals(self.student.proposals, self.gt_boxes, labels)
            self._roi_labels = torch.cat(assigned)
        return self._roi_labels

    def image(self, index: int) -> StepRecord:
        """The record of image ``index`` alone, as if the batch had held only it (every per-image tensor sliced,
        the ROIs and their predictions of that image only, its anchors, its cross-head outputs; masks are computed
        afresh). The ``confidence`` weighting of several teachers evaluates each loss this way, image by image."""
        student = _image_of_student(self.student, index)
        teacher = _image_of_teacher(self.teacher, self.student, index)
        sub = StepRecord(
            student,
            teacher,
            self.student_model,
            self.teacher_model,
            self.student_family,
            self.teacher_family,
            self.levels,
            self.strides,
            with_anchors=self.with_anchors,
            anchor_cache={},
        )
        sub._parent = (self, index)
        if self.cross_head is not None:
            sub.cross_head = {k: v[index : index + 1] for k, v in self.cross_head.items()}
        return sub

    def level_context(self, level: str, adapter: Optional[nn.Module] = None) -> LevelContext:
        """The context of ``level`` with the student feature passed through ``adapter`` (one per adapter; contexts
        of one level share the masks that do not depend on the student feature)."""
        key = (level, id(adapter))
        if key in self._contexts:
            return self._contexts[key]
        s_feat = self.student.features[level]
        if adapter is not None:
            s_feat = adapter(s_feat)
        t_feat = self.teacher.features[level]
        if s_feat.shape[-2:] != t_feat.shape[-2:]:
            s_feat = F.interpolate(s_feat, size=t_feat.shape[-2:], mode="bilinear", align_corners=False)
        ctx = LevelContext(
            name=level,
            stride=self.strides[level],
            image_hw=self.image_hw,
            boxes=self.gt_boxes,
            s_feat=s_feat,
            t_feat=t_feat,
            anchors=self.level_anchors(level) if self.with_anchors else None,
            t_cls_logits=self._t_cls.get(level) if self._t_cls is not None else None,
            s_cls_logits=self._s_cls.get(level) if self._s_cls is not None else None,
            logits_per_anchor=self.logits_per_anchor,
            _shared=self._shared.setdefault(level, {}),
        )
        self._contexts[key] = ctx
        return ctx


def _rows(flat: Optional[Tensor], counts: Sequence[int], index: int) -> Optional[Tensor]:
    """The rows of image ``index`` in a tensor that concatenates ``counts[i]`` rows per image."""
    if flat is None:
        return None
    start = sum(counts[:index])
    return flat[start : start + counts[index]]


def _levels_of_one(levels: Optional[list[Tensor]], index: int) -> Optional[list[Tensor]]:
    """Image ``index`` of a per-level list of batched maps (e.g. RPN objectness), or None."""
    return None if levels is None else [level[index : index + 1] for level in levels]


def _batch_of_one(mapping: Any, index: int) -> Any:
    return None if mapping is None else {k: v[index : index + 1] for k, v in mapping.items()}


def _one(items: Optional[Sequence[Any]], index: int) -> Optional[list[Any]]:
    return None if items is None else [items[index]]


def _image_of_student(record: Any, index: int) -> Any:
    """A :class:`~detkd.models.taps.ModelRecord` of image ``index`` alone."""
    from torchvision.models.detection.image_list import ImageList

    from detkd.models.taps import ModelRecord

    il = record.image_list
    counts = [len(p) for p in record.proposals] if record.proposals is not None else []
    return ModelRecord(
        image_list=ImageList(il.tensors[index : index + 1], [il.image_sizes[index]]),
        targets=_one(record.targets, index),
        features=_batch_of_one(record.features, index),
        backbone_out=_batch_of_one(record.backbone_out, index),
        head=_batch_of_one(record.head, index),
        proposals=_one(record.proposals, index),
        image_shapes=_one(record.image_shapes, index),
        roi_logits=_rows(record.roi_logits, counts, index),
        roi_deltas=_rows(record.roi_deltas, counts, index),
        rpn_objectness=_levels_of_one(record.rpn_objectness, index),
        roi_labels=_rows(record.roi_labels, counts, index),
        roi_keep=_one(record.roi_keep, index),
    )


def _image_of_teacher(record: Any, student: Any, index: int) -> Any:
    """A :class:`~detkd.models.taps.TeacherRecord` of image ``index`` alone (its ROI rows are those of the student's
    kept proposals of that image)."""
    from detkd.models.taps import TeacherRecord

    kept = student.kept_proposals()
    counts = [len(p) for p in kept] if kept is not None else []
    return TeacherRecord(
        features=_batch_of_one(record.features, index),
        backbone_out=_batch_of_one(record.backbone_out, index),
        head=_batch_of_one(record.head, index),
        roi_logits=_rows(record.roi_logits, counts, index),
        roi_deltas=_rows(record.roi_deltas, counts, index),
        rpn_objectness=_levels_of_one(record.rpn_objectness, index),
        detections=_one(record.detections, index),
    )


def _split(flat: Optional[Tensor], feats: dict[str, Tensor]) -> Optional[dict[str, Tensor]]:
    from detkd.models.taps import split_per_level

    return None if flat is None else split_per_level(flat, feats)


def _max_over_anchors(logits: Tensor, num_classes: int) -> Tensor:
    """(N, A*K, H, W) -> (N, K, H, W): the highest logit of each class over the anchors of a location."""
    n, ak, h, w = logits.shape
    return logits.reshape(n, ak // num_classes, num_classes, h, w).amax(dim=1)
