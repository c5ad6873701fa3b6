"""The Distiller: the one place where a frozen teacher and a trainable student meet.

One step is *record, then compute* (DESIGN.md, "One distillation step"):

1. (pseudo labels only) the teacher detects on the batch; a target-making head loss turns its detections into the
   student's targets (``makes_targets``).
2. The student runs its ordinary forward; its detection losses come back as ``task/<name>``. A
   :class:`~detkd.models.taps.ModelRecorder` keeps that pass's padded batch, resized targets, FPN features, dense-head
   outputs and (Faster R-CNN) sampled ROIs and their predictions. A second pass (pseudo labels in ``separate`` mode)
   gets its own record, so it overwrites nothing the losses read.
3. The teacher runs once, under ``no_grad``, on **the same padded batch** re-normalised to its own mean/std
   (:func:`~detkd.models.taps.run_teacher`), computing only what the losses' ``needs`` ask for: features, dense-head
   outputs, its ROI head on the student's sampled proposals, its RPN objectness.
4. Feature losses run per matched level on the :class:`~detkd.losses.context.LevelContext` of the student feature
   after its adapter (1x1 conv when channels differ) and add ``distill/<loss>/<level>``; head losses read the
   :class:`~detkd.losses.context.StepRecord` and add ``distill/<loss>[/<term>]``.

The teacher is never updated: frozen (``requires_grad_(False)``, eval mode, re-asserted in :meth:`train`) and kept
**outside** the module tree (not a registered submodule), so it is in no optimizer, no checkpoint, no
``DistributedDataParallel`` wrapper and no buffer broadcast; :meth:`_apply` still moves it with ``.to(device)``.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from detkd.losses.base import HeadLoss, PairInfo
from detkd.losses.context import StepRecord
from detkd.losses.scaling import LossScaler
from detkd.models.families import family_of
from detkd.models.taps import (
    FeatureTap,
    ModelRecorder,
    feature_channels,
    feature_strides,
    renormalize,
    run_teacher,
    select_rois,
)

EMA_PREFIX = "ema_teacher."
"""Checkpoint key prefix of an EMA teacher's weights."""


@dataclass
class LossSpec:
    """One configured loss: its registry name, the module, its weight (a number, or ``"auto"``: calibrated to
    ``target_ratio`` x the task loss, see :mod:`detkd.losses.scaling`), and the levels it applies to."""

    name: str
    module: nn.Module
    weight: Union[float, str]
    levels: tuple[str, ...] = ()
    target_ratio: float = 1.0


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


class Distiller(nn.Module):
    """Frozen teacher + student + per-level adapters + configured losses -> dict of named losses.

    Args:
        teacher: a trained torchvision detector (frozen here, and kept out of the module tree).
        student: the torchvision detector to train.
        feature_losses: feature losses (:class:`~detkd.losses.base.FeatureLoss`), each on its levels.
        head_losses: head losses (:class:`~detkd.losses.base.HeadLoss`); at most one may make targets
            (``makes_targets``, pseudo labels); it may also be given as ``pseudo_labeler``.
        pseudo_labeler: a target-making head loss (its recipe ``weight`` is its ``separate_weight``).
        probe_size: image side used once to measure the feature strides and channels of both detectors.
        schedule: ``(warmup_iters, decay, final_ratio, stop_at)`` of the distillation scale
            (:func:`detkd.losses.scaling.kd_schedule_scale`), or None.
        calibration_iters: iterations over which ``weight: auto`` losses are calibrated.
        ema_momentum: self-distillation: the teacher is an exponential moving average of the student,
            ``t <- m * t + (1 - m) * s`` before every training forward (so it averages the student up to its last
            step); ``teacher`` must then be a copy of the student. None: a frozen teacher.

    Attributes:
        needs: the union of every loss's ``needs`` (what the teacher computes each step).
        levels: the levels teacher and student share, finest first.
        timings: ``{"losses": deque of seconds}`` spent in masks + losses per step (read by benchmarks/speed.py).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        feature_losses: Sequence[LossSpec] = (),
        head_losses: Sequence[LossSpec] = (),
        pseudo_labeler: Optional[HeadLoss] = None,
        probe_size: int = 128,
        schedule: Optional[tuple[int, str, float, float]] = None,
        calibration_iters: int = 50,
        ema_momentum: Optional[float] = None,
    ) -> None:
        super().__init__()
        if ema_momentum is not None:
            if not 0.0 <= ema_momentum < 1.0:
                raise ValueError(f"ema_momentum must be in [0, 1), got {ema_momentum}")
            if teacher.state_dict().keys() != student.state_dict().keys():
                raise ValueError("an EMA teacher must be a copy of the student (the same architecture)")
        self.ema_momentum = ema_momentum
        object.__setattr__(self, "teacher", freeze(teacher))  # not a submodule: see the module docstring
        self.student = student
        self.teacher_family = family_of(teacher)
        self.student_family = family_of(student)
        self.t_strides = feature_strides(teacher, probe_size)
        self.s_strides = feature_strides(student, probe_size)
        self.levels = match_levels(self.t_strides, self.s_strides)
        t_channels, s_channels = feature_channels(teacher), feature_channels(student)

        head_losses = list(head_losses)
        makers = [s for s in head_losses if s.module.makes_targets]
        if makers:
            if pseudo_labeler is not None or len(makers) > 1:
                raise ValueError("a recipe may have one target-making head loss (pseudo_label), not several")
            pseudo_labeler = makers[0].module
            if makers[0].weight == "auto":
                raise ValueError("pseudo_label's weight (of its separate term) cannot be 'auto'; give a number.")
            pseudo_labeler.separate_weight = makers[0].weight
        self.pseudo_labeler = pseudo_labeler
        self.feature_specs = [
            LossSpec(s.name, s.module, s.weight, resolve_levels(s.levels, self.levels, s.name), s.target_ratio)
            for s in feature_losses
        ]
        self.head_specs = [s for s in head_losses if not s.module.makes_targets]
        self.feature_loss_modules = nn.ModuleList([s.module for s in self.feature_specs])
        self.head_loss_modules = nn.ModuleList([s.module for s in self.head_specs])

        used = sorted({lvl for s in self.feature_specs for lvl in s.levels}, key=lambda n: self.s_strides[n])
        self.adapters = nn.ModuleDict(
            {
                lvl: nn.Conv2d(s_channels[lvl], t_channels[lvl], kernel_size=1)
                if s_channels[lvl] != t_channels[lvl]
                else nn.Identity()
                for lvl in used
            }
        )
        # CrossKD's connectors: every student head level -> the teacher head's width (only when a loss needs them)
        wants_cross = any("cross_head" in s.module.needs for s in head_losses)
        head_levels = sorted(self.s_strides, key=lambda n: self.s_strides[n]) if wants_cross else []
        self.cross_adapters = nn.ModuleDict(
            {
                lvl: nn.Conv2d(s_channels[lvl], t_channels[lvl], kernel_size=1)
                if s_channels[lvl] != t_channels.get(lvl, s_channels[lvl])
                else nn.Identity()
                for lvl in head_levels
            }
        )
        for spec in self.feature_specs:  # learnable loss parts (e.g. FGD's GcBlocks) exist before the optimizer
            spec.module.setup_levels({lvl: t_channels[lvl] for lvl in spec.levels})
        pair = PairInfo(
            teacher_family=self.teacher_family,
            student_family=self.student_family,
            teacher_strides=dict(self.t_strides),
            student_strides=dict(self.s_strides),
            teacher_anchors=tuple(self.teacher_family.anchors_per_location(teacher)),
            student_anchors=tuple(self.student_family.anchors_per_location(student)),
            levels=tuple(self.levels),
        )
        for spec in self.head_specs:  # a pair the loss cannot serve fails here, not at step 10,000
            spec.module.check_pair(pair)
        self.pair = pair
        modules = [s.module for s in self.feature_specs + self.head_specs]
        if pseudo_labeler is not None:
            modules.append(pseudo_labeler)
        self.needs: frozenset[str] = frozenset().union(*(m.needs for m in modules))
        if "cls_logits" in self.needs:  # difference masks compare both dense heads' logits
            self.needs |= {"teacher_head"}
        auto = LossScaler.auto_names(self.feature_specs + self.head_specs)
        self.scaler = LossScaler(auto, calibration_iters, schedule)
        self._auto_index = {name: i for i, name in enumerate(self.scaler.names)}
        self.log_scalars: dict[str, float] = {}  # logged beside the losses (the trainer reads it), never summed
        self.timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=1000))
        self.recorder = ModelRecorder(student, record_rpn="teacher_rpn" in self.needs)
        self._anchor_cache: dict = {}  # the student's anchors for the last batch shape (see StepRecord)
        self.t_tap = FeatureTap(teacher)

    # -- frozen-teacher contract -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        freeze(self.teacher)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)  # .to() / .cuda() / .half() move the unregistered teacher too
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs: the student, the adapters, learnable loss parts (e.g. FGD GcBlocks), the
        loss scaler; a frozen teacher is left out (it is loaded from its own checkpoint), an EMA teacher is kept
        (under ``ema_teacher.``: it is part of the training state)."""
        state = self.state_dict()
        if self.ema_momentum is not None:
            state.update({f"{EMA_PREFIX}{k}": v for k, v in self.teacher.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ema = {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
        if self.ema_momentum is not None:
            if not ema:
                raise RuntimeError("distiller checkpoint does not fit: it holds no EMA teacher (ema_teacher.*)")
            self.teacher.load_state_dict(ema)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if not (self.scaler.names or self.scaler.schedule):  # checkpoints from before the scaler existed
            missing = [k for k in missing if not k.startswith("scaler.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def set_total_iters(self, total_iters: int) -> None:
        """The run's length in iterations (the trainer calls it), for the distillation schedule."""
        self.scaler.set_total_iters(total_iters)

    def export_student(self) -> dict[str, torch.Tensor]:
        """The student as a plain torchvision state_dict (loads with detkd.models.build, no detkd modules)."""
        return {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}

    # -- one step -----------------------------------------------------------------------------------------------

    def record_step(
        self,
        images: list[torch.Tensor],
        targets: Optional[list[dict[str, torch.Tensor]]],
        extra_needs: frozenset[str] = frozenset(),
        run_teacher_always: bool = False,
    ) -> tuple[Optional[StepRecord], dict[str, torch.Tensor]]:
        """Run the forwards of one training step and record them.

        Args:
            images: the batch, (3, H_i, W_i) float in ``[0, 1]``.
            targets: their targets (boxes xyxy pixels of the images, labels).
            extra_needs: more for the teacher to compute than the losses need (the mask pictures want its head).
            run_teacher_always: run the teacher's feature pass even when no feature/head loss needs it.

        Returns:
            ``(record, task losses)``; ``record`` is None when no loss reads it (a pseudo-label-only recipe).
        """
        detections, detection_pass = None, None
        separate_targets = None
        if self.pseudo_labeler is not None:
            detections, detection_pass = self._teacher_detections(images)
            targets, separate_targets = self.pseudo_labeler.make_targets(detections, targets)

        self.recorder.clear()
        task_losses = self.student(images, targets)
        losses = {f"task/{k}": v for k, v in task_losses.items()}
        s_record = self.recorder.take()
        if separate_targets is not None:  # the "separate" pseudo-label mode: a second task loss on the labels only
            weight = self.pseudo_labeler.separate_weight
            extra = self.student(images, separate_targets)
            self.recorder.clear()  # that pass's record is not the step's
            losses.update({f"distill/pseudo_label/{k}": weight * v for k, v in extra.items()})

        if not (self.feature_specs or self.head_specs or run_teacher_always):
            return None, losses
        if "teacher_rois" in self.needs and s_record.proposals is not None:
            self._choose_rois(s_record)
        canvas = renormalize(
            s_record.image_list.tensors,
            s_record.image_list.image_sizes,
            self.student_family.normalization(self.student),
            self.teacher_family.normalization(self.teacher),
        )
        needs = self.needs | extra_needs
        dense = self.teacher_family.head == "dense"
        t_record = run_teacher(self.teacher, self.t_tap, canvas, s_record, needs, dense, detections, detection_pass)
        record = StepRecord(
            s_record,
            t_record,
            student_model=self.student,
            teacher_model=self.teacher,
            student_family=self.student_family,
            teacher_family=self.teacher_family,
            levels=self.levels,
            strides=self.s_strides,
            with_anchors="anchors" in needs,
            anchor_cache=self._anchor_cache,
        )
        if "cross_head" in needs:  # with grad: through the frozen teacher head back to the student and adapters
            feats = [self.cross_adapters[lvl](s_record.features[lvl]) for lvl in record.head_levels]
            record.cross_head = dict(self.teacher.head(feats))
        return record, losses

    @torch.no_grad()
    def _choose_rois(self, s_record) -> None:
        """Match the sampled proposals to the targets once and, under a ``max_rois`` budget, keep a subset."""
        roi = self.student.roi_heads
        gt_boxes = [t["boxes"] for t in s_record.targets]
        gt_labels = [t["labels"] for t in s_record.targets]
        _, labels = roi.assign_targets_to_proposals(s_record.proposals, gt_boxes, gt_labels)
        s_record.roi_labels = torch.cat(labels)
        budgets = [s.module.max_rois for s in self.head_specs if s.module.max_rois is not None]
        if budgets and any(len(p) > min(budgets) for p in s_record.proposals):
            s_record.roi_keep = select_rois(labels, min(budgets))

    @torch.no_grad()
    def _teacher_detections(self, images: list[torch.Tensor]):
        """The teacher's detections, and ``(canvas, backbone output, features, head outputs)`` of that pass."""
        seen: dict[str, Any] = {}

        def keep(name: str, value: Any) -> None:  # a hook that returns a value would replace the module's output
            seen.setdefault(name, value)

        hooks = [
            self.teacher.transform.register_forward_hook(lambda m, a, out: keep("canvas", out[0].tensors)),
            self.teacher.backbone.register_forward_hook(lambda m, a, out: keep("out", out)),
        ]
        self.t_tap.clear()
        try:
            detections = self.teacher(images)
        finally:
            for hook in hooks:
                hook.remove()
        out = seen.get("out")
        if "canvas" not in seen or not isinstance(out, dict):
            return detections, None
        return detections, (seen["canvas"], out, dict(self.t_tap.features), dict(self.t_tap.head_outputs))

    @torch.no_grad()
    def update_ema_teacher(self) -> None:
        """``t <- m * t + (1 - m) * s`` for every floating-point parameter and buffer (BatchNorm statistics too);
        integer buffers (``num_batches_tracked``) are copied."""
        m = self.ema_momentum
        t_state, s_state = self.teacher.state_dict(), self.student.state_dict()
        floats = [k for k, v in t_state.items() if v.is_floating_point()]
        torch._foreach_mul_([t_state[k] for k in floats], m)
        torch._foreach_add_([t_state[k] for k in floats], [s_state[k].detach() for k in floats], alpha=1.0 - m)
        for k, v in t_state.items():
            if not v.is_floating_point():
                v.copy_(s_state[k])

    def adapter(self, level: str) -> Optional[nn.Module]:
        """The adapter of ``level`` (None where no feature loss distils)."""
        return self.adapters[level] if level in self.adapters else None

    def compute_losses(
        self, record: StepRecord, unweighted: Optional[dict[str, torch.Tensor]] = None
    ) -> dict[str, torch.Tensor]:
        """Every configured distillation term of a recorded step, weighted and named. ``unweighted``, if given,
        receives each ``weight: auto`` loss's unweighted total (for the calibration)."""
        losses: dict[str, torch.Tensor] = {}
        for spec in self.feature_specs:
            weight = self._weight(spec)
            for lvl in spec.levels:
                ctx = record.level_context(lvl, self.adapter(lvl))
                raw = spec.module(ctx.s_feat, ctx.t_feat, ctx)
                losses[f"distill/{spec.name}/{lvl}"] = weight * raw
                if unweighted is not None and spec.name in self._auto_index:
                    unweighted[spec.name] = unweighted.get(spec.name, 0.0) + raw.detach()
        for spec in self.head_specs:
            weight = self._weight(spec)
            out = spec.module(record)
            out = out if isinstance(out, dict) else {None: out}
            for k, raw in out.items():
                losses[f"distill/{spec.name}" + ("" if k is None else f"/{k}")] = weight * raw
                if unweighted is not None and spec.name in self._auto_index:
                    unweighted[spec.name] = unweighted.get(spec.name, 0.0) + raw.detach()
        return losses

    def _weight(self, spec: LossSpec) -> Union[float, torch.Tensor]:
        if spec.weight != "auto":
            return spec.weight
        return self.scaler.auto_weight[self._auto_index[spec.name]].float()

    def forward(self, images: list[torch.Tensor], targets: Optional[list[dict[str, torch.Tensor]]] = None):
        if not self.training:
            return self.student(images)
        if self.ema_momentum is not None:
            self.update_ema_teacher()
        scaler = self.scaler
        scale = scaler.scale()
        self.log_scalars = {"distill/scale": scale} if scaler.schedule is not None else {}
        if scale == 0.0 and not scaler.calibrating:  # distillation is off (schedule's stop_at): nothing to compute
            scaler.step()
            return {f"task/{k}": v for k, v in self.student(images, targets).items()}
        record, losses = self.record_step(images, targets)
        if record is not None:
            start = time.perf_counter()  # masks + losses (forward), for benchmarks/speed.py
            unweighted: Optional[dict[str, torch.Tensor]] = {} if scaler.calibrating else None
            losses.update(self.compute_losses(record, unweighted))
            self.timings["losses"].append(time.perf_counter() - start)
            if unweighted is not None:
                task = sum(v.detach() for k, v in losses.items() if k.startswith("task/"))
                scaler.observe(task, unweighted)
        if scaler.names:
            self.log_scalars.update({f"distill/weight/{k}": v for k, v in scaler.weights().items()})
        if scale != 1.0:
            losses = {k: scale * v if k.startswith("distill/") else v for k, v in losses.items()}
        scaler.step()
        return losses


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
    ema = cfg.teacher.mode == "ema"
    if not ema and cfg.teacher.checkpoint is None and cfg.teacher.weights is None:
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
    if ema:  # self-distillation: the teacher starts as the student and follows its moving average
        teacher.load_state_dict(student.state_dict())

    distill = cfg.distill
    feature_specs, head_specs, pseudo_labeler = [], [], None
    if distill is not None:
        names: dict[str, int] = {}
        for loss_cfg in distill.features:
            if loss_cfg.type not in FEATURE_LOSSES:
                raise ValueError(f"unknown feature loss '{loss_cfg.type}'; valid: {', '.join(sorted(FEATURE_LOSSES))}")
            module = build_feature_loss(loss_cfg.type, **dict(loss_cfg.params))
            name = _unique(loss_cfg.type, names)
            feature_specs.append(LossSpec(name, module, loss_cfg.weight, loss_cfg.levels, loss_cfg.target_ratio))
        for loss_cfg in distill.head:
            if loss_cfg.type not in HEAD_LOSSES:
                raise ValueError(f"unknown head loss '{loss_cfg.type}'; valid: {', '.join(sorted(HEAD_LOSSES))}")
            module = HEAD_LOSSES[loss_cfg.type](**dict(loss_cfg.params))
            module.set_category_map(cat_id_to_label or {i: i for i in range(1, num_classes)})
            name = _unique(loss_cfg.type, names)
            head_specs.append(LossSpec(name, module, loss_cfg.weight, target_ratio=loss_cfg.target_ratio))
    probe = max(32, student_cfg.min_size)
    schedule, calibration_iters = None, 50
    if distill is not None:
        calibration_iters = distill.calibration_iters
        if distill.schedule is not None:
            sch = distill.schedule
            schedule = (sch.warmup_iters, sch.decay, sch.final_ratio, sch.stop_at)
    return Distiller(
        teacher,
        student,
        feature_specs,
        head_specs,
        pseudo_labeler,
        probe_size=probe,
        schedule=schedule,
        calibration_iters=calibration_iters,
        ema_momentum=cfg.teacher.momentum if ema else None,
    )


def _unique(name: str, seen: dict[str, int]) -> str:
    """``fgd``, then ``fgd_1``, ``fgd_2`` ... when a recipe uses one loss type twice."""
    count = seen.get(name, 0)
    seen[name] = count + 1
    return name if count == 0 else f"{name}_{count}"
