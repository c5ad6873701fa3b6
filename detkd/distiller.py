"""The Distiller: the one place where a frozen teacher and a trainable student meet.

One step (see DESIGN.md, "One distillation step"):

1. (pseudo labels only) the teacher detects on the batch; its filtered detections join the targets.
2. The student runs its ordinary forward: its own transform normalises/resizes/pads the batch into one tensor, and
   its detection losses come back as ``task/<name>``. Forward hooks record the padded tensor, the resized targets,
   the FPN features and (dense heads) the raw head outputs — torchvision is never forked.
3. The teacher's backbone+FPN runs on **the same padded tensor** under ``no_grad`` (its head too, when a loss needs
   teacher logits), so teacher and student feature maps align pixel for pixel; levels are matched by stride.
4. Per level, the student feature goes through its adapter (1x1 conv when channels differ, identity otherwise;
   resized when the spatial sizes differ), a :class:`LevelContext` lazily builds and caches the masks, and every
   configured feature loss adds ``distill/<loss>/<level>``; head losses add ``distill/<loss>``.

The teacher is never updated: ``requires_grad_(False)``, always in eval mode (re-asserted in :meth:`train`), never
in the optimizer (the trainer optimises parameters that require grad), and absent from checkpoints
(:meth:`trainable_state_dict`).
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from detkd.losses.context import LevelContext
from detkd.losses.feature import FGFILoss, GIDFeatureLoss
from detkd.models.build import detector_family
from detkd.models.taps import FeatureTap, feature_channels, feature_strides, split_per_level

DENSE_FAMILIES = ("retinanet", "fcos")


@dataclass
class LossSpec:
    """One configured loss: its registry name, the module, its weight, and the levels it applies to."""

    name: str
    module: nn.Module
    weight: float
    levels: tuple[str, ...] = ()


class LevelMismatchError(ValueError):
    """Teacher and student have no FPN level (stride) in common, or a loss names a level they do not share."""


def match_levels(t_strides: dict[str, int], s_strides: dict[str, int]) -> list[str]:
    """The level names (``p<log2 stride>``) both detectors produce, finest first."""
    common = sorted(set(t_strides) & set(s_strides), key=lambda name: s_strides[name])
    if not common:
        raise LevelMismatchError(
            f"teacher and student share no feature stride: teacher levels {_levels_str(t_strides)}, student levels "
            f"{_levels_str(s_strides)}. Pick a pair whose FPNs have at least one stride in common."
        )
    return common


def resolve_levels(requested: Any, common: Sequence[str], loss_name: str) -> tuple[str, ...]:
    """``"all"`` -> every common level; a list must be a subset of the common levels."""
    if requested in ("all", None):
        return tuple(common)
    requested = (requested,) if isinstance(requested, str) else tuple(requested)
    missing = [lvl for lvl in requested if lvl not in common]
    if missing:
        raise LevelMismatchError(
            f"loss '{loss_name}' asks for levels {list(requested)} but {missing} are not shared by teacher and "
            f"student; shared levels: {list(common)}."
        )
    return requested


def _levels_str(strides: dict[str, int]) -> str:
    return "[" + ", ".join(f"{k} (stride {v})" for k, v in sorted(strides.items(), key=lambda kv: kv[1])) + "]"


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class _TransformRecorder:
    """Forward hook on ``detector.transform``: keeps the ImageList (padded batch) and the resized targets."""

    def __init__(self, detector: nn.Module) -> None:
        self.image_list = None
        self.targets = None
        self.handle = detector.transform.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.image_list, self.targets = output

    def clear(self) -> None:
        self.image_list, self.targets = None, None


class Distiller(nn.Module):
    """Frozen teacher + student + per-level adapters + configured losses -> dict of named losses.

    Args:
        teacher: a trained torchvision detector (frozen here).
        student: the torchvision detector to train.
        feature_losses: feature-level losses; each ``module(s_feat, t_feat, ctx) -> scalar``.
        head_losses: head-level losses; each ``module(step) -> dict[str, Tensor] | Tensor`` given a
            :class:`DistillStep` (see detkd.losses.head).
        pseudo_labeler: optional callable ``(teacher_detections, targets) -> (targets, extra_targets)`` (see
            detkd.losses.head.PseudoLabeler); when set, the teacher detects first and its labels join the targets.
        probe_size: image side used once to measure the feature strides and channels of both detectors.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        feature_losses: Sequence[LossSpec] = (),
        head_losses: Sequence[LossSpec] = (),
        pseudo_labeler: Optional[nn.Module] = None,
        probe_size: int = 128,
    ) -> None:
        super().__init__()
        self.teacher = freeze(teacher)
        self.student = student
        self.teacher_family = detector_family(teacher)
        self.student_family = detector_family(student)
        self.t_strides = feature_strides(teacher, probe_size)
        self.s_strides = feature_strides(student, probe_size)
        self.levels = match_levels(self.t_strides, self.s_strides)
        t_channels, s_channels = feature_channels(teacher), feature_channels(student)

        self.feature_specs = [
            LossSpec(s.name, s.module, s.weight, resolve_levels(s.levels, self.levels, s.name)) for s in feature_losses
        ]
        self.head_specs = list(head_losses)
        self.feature_loss_modules = nn.ModuleList([s.module for s in self.feature_specs])
        self.head_loss_modules = nn.ModuleList([s.module for s in self.head_specs])
        self.pseudo_labeler = pseudo_labeler

        used = sorted({lvl for s in self.feature_specs for lvl in s.levels}, key=lambda n: self.s_strides[n])
        self.adapters = nn.ModuleDict(
            {
                lvl: nn.Conv2d(s_channels[lvl], t_channels[lvl], kernel_size=1)
                if s_channels[lvl] != t_channels[lvl]
                else nn.Identity()
                for lvl in used
            }
        )
        for spec in self.feature_specs:  # learnable loss parts (e.g. FGD's GcBlocks) exist before the optimizer
            if hasattr(spec.module, "setup_levels"):
                spec.module.setup_levels({lvl: t_channels[lvl] for lvl in spec.levels})
        self.needs_anchors = any(isinstance(s.module, (FGFILoss, GIDFeatureLoss)) for s in self.feature_specs)
        self.timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=1000))
        self.s_tap = FeatureTap(student)
        self.t_tap = FeatureTap(teacher)
        self._s_transform = _TransformRecorder(student)
        for spec in self.head_specs:  # a head loss checks the pair (fails here, not at step 10,000) and hooks in
            if hasattr(spec.module, "attach"):
                spec.module.attach(self)
        self.needs_teacher_head = any(getattr(s.module, "needs_teacher_head", False) for s in self.head_specs) or any(
            getattr(s.module, "needs_cls_logits", False) for s in self.feature_specs
        )

    # -- frozen-teacher contract -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        freeze(self.teacher)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the teacher: the student, the adapters and any learnable loss parts (e.g. FGD GcBlocks)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def export_student(self) -> dict[str, torch.Tensor]:
        """The student as a plain torchvision state_dict (loads with detkd.models.build, no detkd modules)."""
        return {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}

    # -- one step -----------------------------------------------------------------------------------------------

    def make_step(
        self,
        image_list: Any,
        targets: list[dict[str, torch.Tensor]],
        s_feats: dict[str, torch.Tensor],
        s_head: dict[str, torch.Tensor],
        teacher_detections: Optional[list[dict[str, torch.Tensor]]] = None,
        teacher_head: Optional[bool] = None,
    ) -> DistillStep:
        """Run the teacher's backbone+FPN (and dense head when a loss needs it, or ``teacher_head``) on the
        student's padded batch under ``no_grad``, and bundle the step's records (also used by the mask pictures)."""
        with torch.no_grad():
            self.t_tap.clear()
            t_out = self.teacher.backbone(image_list.tensors)
            if torch.is_tensor(t_out):  # a backbone without FPN returns one map
                t_out = OrderedDict([("0", t_out)])
            t_feats = dict(self.t_tap.features)
            want_head = self.needs_teacher_head if teacher_head is None else teacher_head
            t_head = {}
            if want_head and self.teacher_family in DENSE_FAMILIES:
                t_head = self.teacher.head(list(t_out.values()))
        return DistillStep(
            t_backbone_out=t_out,
            image_list=image_list,
            targets=targets,
            s_feats=s_feats,
            t_feats=t_feats,
            s_head=s_head,
            t_head=t_head,
            student=self.student,
            teacher=self.teacher,
            teacher_detections=teacher_detections,
            levels=self.levels,
            strides=self.s_strides,
            with_anchors=self.needs_anchors,
        )

    def forward(self, images: list[torch.Tensor], targets: Optional[list[dict[str, torch.Tensor]]] = None):
        if not self.training:
            return self.student(images)
        teacher_dets = None
        extra_targets = None
        if self.pseudo_labeler is not None:
            with torch.no_grad():
                teacher_dets = self.teacher(images)
            targets, extra_targets = self.pseudo_labeler(teacher_dets, targets)

        self.s_tap.clear()
        self._s_transform.clear()
        task_losses = self.student(images, targets)
        losses = {f"task/{k}": v for k, v in task_losses.items()}
        image_list, s_targets = self._s_transform.image_list, self._s_transform.targets
        s_feats = dict(self.s_tap.features)
        s_head = dict(self.s_tap.head_outputs)

        if extra_targets is not None:  # the "separate" pseudo-label mode: a second task loss on teacher labels only
            weight = self.pseudo_labeler.separate_weight
            extra = self.student(images, extra_targets)
            losses.update({f"distill/pseudo_label/{k}": weight * v for k, v in extra.items()})

        if not self.feature_specs and not self.head_specs:
            return losses

        step = self.make_step(image_list, s_targets, s_feats, s_head, teacher_dets)
        start = time.perf_counter()  # masks + losses (forward), for benchmarks/speed.py
        for spec in self.feature_specs:
            for lvl in spec.levels:
                ctx = step.level_context(lvl, self.adapters[lvl] if lvl in self.adapters else None)
                losses[f"distill/{spec.name}/{lvl}"] = spec.weight * spec.module(ctx.s_feat, ctx.t_feat, ctx)
        for spec in self.head_specs:
            out = spec.module(step)
            if isinstance(out, dict):
                losses.update({f"distill/{spec.name}/{k}": spec.weight * v for k, v in out.items()})
            else:
                losses[f"distill/{spec.name}"] = spec.weight * out
        self.timings["losses"].append(time.perf_counter() - start)
        return losses


class DistillStep:
    """Everything one step recorded, with per-level contexts built lazily and cached (masks computed once)."""

    def __init__(self, t_backbone_out, image_list, targets, s_feats, t_feats, s_head, t_head, student, teacher,
                 teacher_detections, levels, strides, with_anchors=False) -> None:  # fmt: skip
        self.with_anchors = with_anchors
        self.t_backbone_out = t_backbone_out  # the teacher backbone's own output dict (keys '0', '1', ... 'pool')
        self.image_list = image_list
        self.targets = targets
        self.s_feats = s_feats
        self.t_feats = t_feats
        self.s_head = s_head
        self.t_head = t_head
        self.student = student
        self.teacher = teacher
        self.teacher_detections = teacher_detections
        self.levels = levels
        self.strides = strides
        self.image_hw = tuple(image_list.tensors.shape[-2:])
        self._contexts: dict[str, LevelContext] = {}
        self._anchors: Optional[list[torch.Tensor]] = None
        # the dense head's levels in its own (finest-first) order, and the number of cells over them
        self.head_levels = sorted(s_feats, key=lambda name: strides[name])
        self.head_positions = sum(s_feats[k].shape[-2] * s_feats[k].shape[-1] for k in self.head_levels)
        self._s_cls = split_per_level(s_head["cls_logits"], s_feats) if "cls_logits" in s_head else None
        self._t_cls = split_per_level(t_head["cls_logits"], t_feats) if "cls_logits" in t_head else None
        self.logits_per_anchor = True
        if self._s_cls is not None and self._t_cls is not None:
            num_classes = s_head["cls_logits"].shape[-1]
            if any(self._s_cls[k].shape != self._t_cls[k].shape for k in self._s_cls if k in self._t_cls):
                # e.g. FCOS (1 anchor) vs RetinaNet (9): compare per class, max over each head's own anchors
                self._s_cls = {k: _max_over_anchors(v, num_classes) for k, v in self._s_cls.items()}
                self._t_cls = {k: _max_over_anchors(v, num_classes) for k, v in self._t_cls.items()}
                self.logits_per_anchor = False

    def anchors(self) -> list[torch.Tensor]:
        """The student's anchors per image, ``(sum_l H_l*W_l*A, 4)`` xyxy on the padded canvas (computed once)."""
        if self._anchors is None:
            generator = getattr(self.student, "anchor_generator", None)
            if generator is None:
                generator = self.student.rpn.anchor_generator
            feats = [self.s_feats[k] for k in self.head_levels]
            with torch.no_grad():
                self._anchors = generator(self.image_list, feats)
        return self._anchors

    def level_anchors(self, level: str) -> Optional[torch.Tensor]:
        """The anchors of one level as ``(H, W, A, 4)`` (identical for every image of the padded batch)."""
        generator = getattr(self.student, "anchor_generator", None) or getattr(
            getattr(self.student, "rpn", None), "anchor_generator", None
        )
        if generator is None or not hasattr(generator, "num_anchors_per_location"):
            return None  # SSD's default boxes: losses fall back to their anchor-free variant
        all_anchors = self.anchors()[0]
        counts = generator.num_anchors_per_location()
        start = 0
        for name, a in zip(self.head_levels, counts):
            h, w = self.s_feats[name].shape[-2:]
            if name == level:
                return all_anchors[start : start + h * w * a].reshape(h, w, a, 4)
            start += h * w * a
        return None

    @property
    def gt_boxes(self) -> list[torch.Tensor]:
        return [t["boxes"] for t in self.targets]

    def level_context(self, level: str, adapter: Optional[nn.Module]) -> LevelContext:
        if level in self._contexts:
            return self._contexts[level]
        s_feat = self.s_feats[level]
        if adapter is not None:
            s_feat = adapter(s_feat)
        t_feat = self.t_feats[level]
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
            t_cls_logits=self._t_cls[level] if self._t_cls is not None and level in self._t_cls else None,
            s_cls_logits=self._s_cls[level] if self._s_cls is not None and level in self._s_cls else None,
            logits_per_anchor=self.logits_per_anchor,
        )
        self._contexts[level] = ctx
        return ctx


# ----------------------------------------------------------------------------------------------------------------
# Config -> Distiller (the one place the distill config is interpreted)
# ----------------------------------------------------------------------------------------------------------------

NECK_AND_HEAD_PREFIXES = ("backbone.fpn.", "head.", "rpn.", "roi_heads.")


def inherit_neck_and_head(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's FPN and head tensors into the student wherever name and shape match.

    Several published results initialise the student this way (e.g. FGD's and PKD's RetinaNet students inherit the
    teacher's neck and head); it only applies where the FPN widths agree. Returns the names copied.
    """
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied = [
        k
        for k, v in s_state.items()
        if k.startswith(NECK_AND_HEAD_PREFIXES) and k in t_state and t_state[k].shape == v.shape
    ]
    student.load_state_dict({**s_state, **{k: t_state[k].clone() for k in copied}})
    return copied


def build_distiller_from_cfg(cfg, num_classes: int, cat_id_to_label: Optional[dict[int, int]] = None) -> Distiller:
    """Teacher (loaded from its checkpoint), student (per ``student.init``), losses and adapters from a recipe."""
    from detkd.losses import FEATURE_LOSSES, HEAD_LOSSES, build_feature_loss
    from detkd.models.build import build_detector_from_cfg

    if cfg.teacher is None or cfg.student is None:
        raise ValueError(f"recipe '{cfg.name}' needs both 'teacher' and 'student' sections to distil.")
    if cfg.teacher.checkpoint is None and cfg.teacher.weights is None:
        raise ValueError(
            f"recipe '{cfg.name}': teacher.checkpoint is not set; a teacher must be trained — give the path of its "
            f"checkpoint (or teacher.train_if_missing: <teacher recipe>)."
        )
    teacher = build_detector_from_cfg(cfg.teacher, num_classes)
    student_cfg = cfg.student
    if student_cfg.init == "checkpoint" and student_cfg.checkpoint is None:
        raise ValueError(f"recipe '{cfg.name}': student.init is 'checkpoint' but student.checkpoint is not set.")
    if student_cfg.init != "checkpoint" and student_cfg.checkpoint is not None:
        raise ValueError(
            f"recipe '{cfg.name}': student.checkpoint is set but student.init is '{student_cfg.init}'; set "
            f"student.init: checkpoint to start from it."
        )
    student = build_detector_from_cfg(student_cfg, num_classes)
    if student_cfg.init == "inherit_teacher":
        copied = inherit_neck_and_head(student, teacher)
        if not copied:
            raise ValueError(
                f"recipe '{cfg.name}': student.init is 'inherit_teacher' but no neck/head tensor of the teacher "
                f"matches the student's shapes (different FPN widths?); use 'scratch' or 'checkpoint'."
            )

    distill = cfg.distill
    feature_specs, head_specs, pseudo_labeler = [], [], None
    if distill is not None:
        names: dict[str, int] = {}
        for loss_cfg in distill.features:
            if loss_cfg.type not in FEATURE_LOSSES:
                raise ValueError(f"unknown feature loss '{loss_cfg.type}'; valid: {', '.join(sorted(FEATURE_LOSSES))}")
            module = build_feature_loss(loss_cfg.type, **dict(loss_cfg.params))
            feature_specs.append(LossSpec(_unique(loss_cfg.type, names), module, loss_cfg.weight, loss_cfg.levels))
        for loss_cfg in distill.head:
            if loss_cfg.type not in HEAD_LOSSES:
                raise ValueError(f"unknown head loss '{loss_cfg.type}'; valid: {', '.join(sorted(HEAD_LOSSES))}")
            module = HEAD_LOSSES[loss_cfg.type](**dict(loss_cfg.params))
            if getattr(module, "is_pseudo_labeler", False):
                module.separate_weight = loss_cfg.weight
                module.set_category_map(cat_id_to_label or {i: i for i in range(1, num_classes)})
                pseudo_labeler = module
                continue
            head_specs.append(LossSpec(_unique(loss_cfg.type, names), module, loss_cfg.weight))
    probe = max(32, student_cfg.min_size)
    return Distiller(teacher, student, feature_specs, head_specs, pseudo_labeler, probe_size=probe)


def _unique(name: str, seen: dict[str, int]) -> str:
    """``fgd``, then ``fgd_1``, ``fgd_2`` ... when a recipe uses one loss type twice."""
    count = seen.get(name, 0)
    seen[name] = count + 1
    return name if count == 0 else f"{name}_{count}"


def _max_over_anchors(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, A*K, H, W) -> (N, K, H, W): the highest logit of each class over the anchors of a location."""
    n, ak, h, w = logits.shape
    return logits.reshape(n, ak // num_classes, num_classes, h, w).amax(dim=1)
