"""The loss protocol: what a distillation loss declares, and what the Distiller gives it.

One distillation step is *record, then compute* (DESIGN.md, "One distillation step"): the Distiller runs the forwards
once and fills a :class:`~detkd.models.taps.StepRecord`; losses read that record and nothing else. They never
register hooks or run a model. So that the Distiller runs only what some loss needs (and knows no concrete loss
class), a loss declares its needs in :attr:`needs`, a set of these names:

==================== =======================================================================================
``teacher_head``     the teacher's raw dense-head outputs on the shared batch (``record.teacher.head``)
``teacher_rois``     the teacher's ROI-head predictions on the student's sampled proposals
                     (``record.teacher.roi_logits`` / ``roi_deltas``) and the proposals' assigned labels
``teacher_rpn``      the teacher's RPN objectness on the shared batch (``record.teacher.rpn_objectness``)
``teacher_dets``     the teacher's post-processed detections on the batch's images
``anchors``          the student's anchors per level (``ctx.anchors`` / ``record.anchors()``)
``cls_logits``       both detectors' per-level classification logits in the level context (difference masks)
``cross_head``       the teacher's dense head run on the student's FPN features after the Distiller's 1x1
                     cross-head adapters, with grad (``record.cross_head``; CrossKD)
==================== =======================================================================================

**Feature losses** subclass :class:`FeatureLoss`: ``forward(s_feat, t_feat, ctx) -> scalar`` per FPN level, with
``ctx`` the level's :class:`~detkd.losses.context.LevelContext` (masks come from it, cached, so losses sharing a mask
compute it once). :meth:`FeatureLoss.weight_map` returns the per-location weight the loss puts on the level (the mask
pictures draw it); :meth:`FeatureLoss.setup_levels` builds learnable parts once the teacher's channels are known.

**Head losses** subclass :class:`HeadLoss`: ``forward(record) -> dict of named scalars | scalar`` once per step,
and :meth:`HeadLoss.check_pair` rejects a teacher/student pair it cannot serve when the Distiller is built. A head
loss that turns the teacher's detections into training targets (pseudo labels) sets :attr:`HeadLoss.makes_targets`
and implements ``make_targets(detections, targets)``; the Distiller calls it before the student's pass.

A loss defined outside detkd joins through :func:`detkd.losses.register_feature_loss` /
:func:`detkd.losses.register_head_loss`; from then on recipes, ``tools/visualize_masks.py`` and the TensorBoard mask
images use it like a built-in one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

__all__ = ["NEEDS", "FeatureLoss", "HeadLoss", "PairInfo", "require_matched_dense_heads"]

NEEDS = frozenset(
    {"teacher_head", "teacher_rois", "teacher_rpn", "teacher_dets", "anchors", "cls_logits", "cross_head"}
)
"""Every name a loss may list in ``needs``."""


@dataclass(frozen=True)
class PairInfo:
    """What a loss may check about a teacher/student pair when the Distiller is built.

    Attributes:
        teacher_family: the teacher's :class:`~detkd.models.families.DetectorFamily`.
        student_family: the student's.
        teacher_strides: ``{level: stride}`` of the teacher's feature levels.
        student_strides: same for the student.
        teacher_anchors: anchors (points) per location and level of the teacher (empty if it has none).
        student_anchors: same for the student.
        levels: the levels both share, finest first.
    """

    teacher_family: Any
    student_family: Any
    teacher_strides: dict[str, int]
    student_strides: dict[str, int]
    teacher_anchors: tuple[int, ...]
    student_anchors: tuple[int, ...]
    levels: tuple[str, ...]


def require_matched_dense_heads(pair: PairInfo, loss: str, purpose: str, alternative: str) -> None:
    """Raise ``ValueError`` unless teacher and student are one dense family (``logit_kd``) with the same anchors per
    location and levels, so their head outputs line up position by position.

    Args:
        pair: the pair.
        loss: the loss's name, for the message.
        purpose: what the loss does with the heads (starts the message after the name).
        alternative: what to use instead for pairs that do not line up.
    """
    t_fam, s_fam = pair.teacher_family, pair.student_family
    if not (t_fam.logit_kd and s_fam.logit_kd and t_fam is s_fam):
        raise ValueError(
            f"{loss} {purpose} and needs a teacher and a student of one family with such a head (RetinaNet->RetinaNet "
            f"or FCOS->FCOS); this recipe pairs a {t_fam.name} teacher with a {s_fam.name} student, whose heads do "
            f"not line up. Use {alternative} for heterogeneous pairs."
        )
    if pair.teacher_anchors != pair.student_anchors or sorted(pair.teacher_strides) != sorted(pair.student_strides):
        raise ValueError(
            f"{loss} needs the same anchors per location and levels in teacher and student: teacher "
            f"{list(pair.teacher_anchors)} anchors on {sorted(pair.teacher_strides)}, student "
            f"{list(pair.student_anchors)} anchors on {sorted(pair.student_strides)}. Build both with the same "
            f"anchor_sizes, or use {alternative}."
        )


class FeatureLoss(nn.Module):
    """Base of the feature losses: ``forward(s_feat, t_feat, ctx) -> scalar`` on one level.

    Attributes:
        needs: names from :data:`NEEDS` this loss reads from the record (through ``ctx``).
        uses_attention_maps: the loss weights by the teacher's spatial/channel attention at
            :attr:`attention_temperature` (FGD, attention-guided); the Distiller then checks on the first step that
            those maps are not one-hot (:mod:`detkd.attention_check`).
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    uses_attention_maps: ClassVar[bool] = False

    def setup_levels(self, channels: dict[str, int]) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Build learnable per-level parts (``{level: teacher channels}``); called before the optimizer exists."""

    @property
    def attention_temperature(self) -> Optional[float]:
        """The attention temperature the loss uses (shown in the mask pictures), or None if it uses no attention."""
        return getattr(self, "temperature", None)

    def weight_map(self, ctx: Any) -> Optional[Tensor]:
        """The weight ``W`` (N, H, W), detached, that the loss's imitation term puts on each location of the level:
        the term is ``sum_{n,h,w} W[n,h,w] * e[n,h,w]`` for a per-location error ``e`` that the loss's docstring
        names; the config weight is not included. None: the loss weighs no location (the pictures show nothing)."""
        return None

    def difference_map(self, ctx: Any) -> Optional[Tensor]:
        """The teacher-student difference mask the loss uses (N, H, W), or None if it uses none (the pictures then
        show the default one of :meth:`~detkd.losses.context.LevelContext.difference`)."""
        return None


class HeadLoss(nn.Module):
    """Base of the head losses: ``forward(record) -> dict[str, Tensor] | Tensor`` once per step.

    Attributes:
        needs: names from :data:`NEEDS` this loss reads from the record.
        makes_targets: the loss turns the teacher's detections into targets of the student's own detection loss
            (``make_targets(detections, targets) -> (targets, separate_targets or None)``) instead of returning a
            loss from the record.
        max_rois: with ``teacher_rois``: how many of each image's sampled student proposals the teacher's ROI head
            scores (foreground first; ``record.student.roi_keep``); None: all of them.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    makes_targets: ClassVar[bool] = False
    max_rois: Optional[int] = None  # teacher_rois: the ROIs per image the teacher's ROI head scores (None: all)

    def check_pair(self, pair: PairInfo) -> None:  # noqa: B027 - optional hook, accepts every pair by default
        """Raise ``ValueError`` (naming both families and what to use instead) for a pair this loss cannot serve."""

    def set_category_map(self, cat_id_to_label: dict[int, int]) -> None:  # noqa: B027 - optional hook
        """Map parameters the recipe gives in dataset category ids to detkd's contiguous labels (called once when
        the Distiller is built from a recipe)."""
