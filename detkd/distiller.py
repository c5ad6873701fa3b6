"""The Distiller: the one place where teachers and a trainable student meet.

One step is *record, then compute* (DESIGN.md, "One distillation step"):

1. (pseudo labels only) every teacher detects on the batch; with several teachers their detections are fused
   (:mod:`detkd.teachers.fusion`); a target-making head loss turns them into the student's targets
   (``makes_targets``).
2. The student runs its ordinary forward; its detection losses come back as ``task/<name>``. A
   :class:`~detkd.models.taps.ModelRecorder` keeps that pass's padded batch, resized targets, FPN features, dense-head
   outputs and (Faster R-CNN) sampled ROIs and their predictions. A second pass (pseudo labels in ``separate`` mode)
   gets its own record, so it overwrites nothing the losses read. An *online* teacher runs its own training forward
   on the ground truth here too (``teacher_task/<name>``).
3. Each teacher runs once, under ``no_grad``, on **the same padded batch** re-normalised to its own mean/std
   (:func:`~detkd.models.taps.run_teacher`), computing only what its losses' ``needs`` ask for: features, dense-head
   outputs, its ROI head on the student's sampled proposals, its RPN objectness. One
   :class:`~detkd.losses.context.StepRecord` per teacher.
4. Feature losses run per matched level on the :class:`~detkd.losses.context.LevelContext` of the student feature
   after that teacher's adapter (1x1 conv when channels differ) and add ``distill/<loss>/<level>``; head losses read
   the :class:`~detkd.losses.context.StepRecord` and add ``distill/<loss>[/<term>]``. With several teachers
   (``teachers:``) every term is computed against each teacher and named ``distill/<loss>/<teacher>/<level>`` (or
   ``distill/<loss>/<teacher>[/<term>]``), multiplied by that teacher's weight (:mod:`detkd.teachers.weighting`).

Teachers and their modes:

* ``frozen`` (default): never updated — ``requires_grad_(False)``, eval mode (re-asserted in :meth:`train`) and kept
  **outside** the module tree (not a registered submodule), so it is in no optimizer, no checkpoint, no
  ``DistributedDataParallel`` wrapper and no buffer broadcast; :meth:`_apply` still moves it with ``.to(device)``.
* ``ema``: a copy of the student that follows its moving average; outside the module tree like a frozen one, but its
  weights are part of the resume state (``ema_teacher.*``).
* ``online``: trains with the student on the ground truth. It *is* a registered submodule (``online_teachers.<name>``)
  so that it is in the optimizer (at ``lr_mult`` x the learning rate, :meth:`lr_mult`), in DDP, in the checkpoint,
  and in train mode (BatchNorm too) when the Distiller is. What reaches it: its own detection loss always
  (``teacher_task/*``); nothing of the student's distillation terms (every loss detaches the teacher's side, and its
  head runs as a fixed function under CrossKD); with ``mutual=True`` (deep mutual learning) also the reverse terms
  ``mutual/*`` (:meth:`Distiller._mutual_terms`), in which it imitates the detached student.

With the one-teacher shorthand (a module, or a single :class:`TeacherSpec`, as ``teacher:`` in a recipe) the term
names and checkpoint keys are those of a one-teacher run (``distill/fgd/p3``, ``adapters.p3``); with a list of
teachers every per-teacher part is nested under the teacher's name (``distill/fgd/<name>/p3``,
``adapters.<name>.p3``, ``feature_loss_modules.<name>.0``, ``ema_teacher.<name>.*``).
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from detkd.losses.base import HeadLoss, PairInfo
from detkd.losses.context import StepRecord
from detkd.losses.scaling import LossScaler
from detkd.masks import attention_spread, flat_attention_temperature
from detkd.models.families import DetectorFamily, family_of
from detkd.models.taps import (
    FeatureTap,
    ModelRecorder,
    feature_channels,
    feature_strides,
    renormalize,
    run_teacher,
    select_rois,
)
from detkd.teachers import Exp3Policy, TeacherWeighting, confidence_weights, fuse_detections, normalized_weights

EMA_PREFIX = "ema_teacher."
"""Checkpoint key prefix of an EMA teacher's weights."""

ONLINE_PREFIX = "online_teachers."
"""Checkpoint (``state_dict``) key prefix of online teachers' weights."""

SHORTHAND_NAME = "teacher"
"""The name of the one teacher of the ``teacher:`` shorthand (what a loss's ``teachers: [...]`` may name)."""

TEACHER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
TEACHER_MODES = ("frozen", "ema", "online")


@dataclass
class LossSpec:
    """One configured loss: its registry name, the module, its weight (a number, or ``"auto"``: calibrated to
    ``target_ratio`` x the task loss, see :mod:`detkd.losses.scaling`), the levels it applies to, and the teachers it
    is computed against (None: every teacher)."""

    name: str
    module: nn.Module
    weight: Union[float, str]
    levels: tuple[str, ...] = ()
    target_ratio: float = 1.0
    teachers: Optional[tuple[str, ...]] = None


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


@dataclass(eq=False)
class TeacherSpec:
    """One teacher of a distillation.

    Attributes:
        name: used in term names (``distill/<loss>/<name>/<level>``) and checkpoint keys; letters, digits, ``_``, ``-``.
        model: the torchvision detector.
        weight: its config weight (normalised over the teachers, :mod:`detkd.teachers.weighting`).
        mode: ``frozen``, ``ema`` (a copy of the student following its moving average, ``momentum``) or ``online``
            (trains with the student on the ground truth, at ``lr_mult`` x the learning rate).
    """

    name: str
    model: nn.Module
    weight: float = 1.0
    mode: str = "frozen"
    momentum: float = 0.999
    lr_mult: float = 1.0


@dataclass(eq=False)
class TeacherSlot:
    """A teacher as the Distiller runs it: its spec, family, levels matched with the student, adapters, the losses
    computed against it (their own module instances: learnable parts are per teacher), the pair the losses checked,
    what it computes each step (``needs``) and the tap on its backbone."""

    spec: TeacherSpec
    family: DetectorFamily
    strides: dict[str, int]
    levels: list[str]
    adapters: nn.ModuleDict
    cross_adapters: nn.ModuleDict
    feature_specs: list[LossSpec]
    head_specs: list[LossSpec]
    pair: PairInfo
    needs: frozenset[str]
    tap: FeatureTap
    channels: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model(self) -> nn.Module:
        return self.spec.model

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def distils(self) -> bool:
        """Some feature or head loss is computed against this teacher."""
        return bool(self.feature_specs or self.head_specs)

    def adapter(self, level: str) -> Optional[nn.Module]:
        return self.adapters[level] if level in self.adapters else None


@contextlib.contextmanager
def no_parameter_grad(module: nn.Module) -> Iterator[None]:
    """Run ops that record no gradient for ``module``'s parameters (inputs still get theirs): an online teacher's head
    run on the student's features (``cross_head``) trains the student, never the teacher."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _detached(recorded_pass: Optional[tuple]) -> Optional[tuple]:
    """``(canvas, backbone output, features, head outputs)`` of a pass, cut from its graph."""
    if recorded_pass is None:
        return None
    canvas, out, feats, head = recorded_pass
    cut = lambda d: {k: v.detach() for k, v in d.items()}  # noqa: E731
    return canvas.detach(), cut(out), cut(feats), cut(head)


def _check_teacher_specs(specs: Sequence[TeacherSpec], student: nn.Module) -> None:
    names = [s.name for s in specs]
    if not specs:
        raise ValueError("a distiller needs at least one teacher")
    for spec in specs:
        if not TEACHER_NAME.match(spec.name or ""):
            raise ValueError(f"teacher name {spec.name!r} must be letters, digits, '_' or '-' (it names log terms)")
        if spec.mode not in TEACHER_MODES:
            raise ValueError(f"teacher '{spec.name}': mode '{spec.mode}' is unknown; valid: {', '.join(TEACHER_MODES)}")
        if spec.weight < 0:
            raise ValueError(f"teacher '{spec.name}': weight must be >= 0, got {spec.weight}")
        if spec.mode == "ema":
            if not 0.0 <= spec.momentum < 1.0:
                raise ValueError(f"ema_momentum must be in [0, 1), got {spec.momentum}")
            if spec.model.state_dict().keys() != student.state_dict().keys():
                raise ValueError("an EMA teacher must be a copy of the student (the same architecture)")
        if spec.mode == "online" and spec.lr_mult <= 0:
            raise ValueError(f"teacher '{spec.name}': lr_mult must be > 0, got {spec.lr_mult}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"teacher names must be unique; {duplicates} appear more than once")
    if sum(s.weight for s in specs) <= 0:
        raise ValueError(f"the teachers' weights sum to 0 ({[s.weight for s in specs]}); give one a weight > 0")


class Distiller(nn.Module):
    """Teachers + student + per-level adapters + configured losses -> dict of named losses.

    Args:
        teacher: the teacher(s). A detector (a trained torchvision model, frozen here and kept out of the module
            tree; with ``ema_momentum`` an EMA teacher) or one :class:`TeacherSpec`: the one-teacher shorthand (term
            names and checkpoint keys of a one-teacher run). A list of :class:`TeacherSpec`: several named teachers.
        student: the torchvision detector to train.
        feature_losses: feature losses (:class:`~detkd.losses.base.FeatureLoss`), each on its levels, against the
            teachers its spec names (all by default).
        head_losses: head losses (:class:`~detkd.losses.base.HeadLoss`); at most one may make targets
            (``makes_targets``, pseudo labels); it may also be given as ``pseudo_labeler``.
        pseudo_labeler: a target-making head loss (its recipe ``weight`` is its ``separate_weight``).
        probe_size: image side used once to measure the feature strides and channels of the detectors.
        schedule: ``(warmup_iters, decay, final_ratio, stop_at)`` of the distillation scale
            (:func:`detkd.losses.scaling.kd_schedule_scale`), or None.
        calibration_iters: iterations over which ``weight: auto`` losses are calibrated.
        ema_momentum: self-distillation with a detector as ``teacher``: it is an exponential moving average of the
            student, ``t <- m * t + (1 - m) * s`` before every training forward (so it averages the student up to its
            last step); ``teacher`` must then be a copy of the student. None: a frozen teacher.
        weighting: how several teachers combine (:class:`~detkd.teachers.weighting.TeacherWeighting`; default
            ``fixed``). ``adaptive`` needs :meth:`set_holdout` before training.
        fusion: ``(method, iou)`` of the pseudo labels of several teachers (:mod:`detkd.teachers.fusion`).
        mutual: deep mutual learning: every feature loss against an online teacher also runs reversed (the teacher
            learns towards the detached student), logged as ``mutual/<loss>/...``.

    Attributes:
        slots: the teachers as run (:class:`TeacherSlot`), in order; ``teacher``, ``levels``, ``feature_specs``,
            ``adapters`` ... of a one-teacher distiller are those of ``slots[0]``.
        needs: the union of every loss's ``needs`` (what the teachers compute each step).
        timings: ``{"losses": deque of seconds}`` spent in masks + losses per step (read by benchmarks/speed.py).
        log_scalars: scalars logged beside the losses (``distill/scale``, ``teachers/weight/<name>``,
            ``teachers/bandit/*`` ...), never summed.
        bandit_events: the adaptive policy's rounds since the runner last read them (choices and rewards).
    """

    def __init__(
        self,
        teacher: Union[nn.Module, TeacherSpec, Sequence[TeacherSpec]],
        student: nn.Module,
        feature_losses: Sequence[LossSpec] = (),
        head_losses: Sequence[LossSpec] = (),
        pseudo_labeler: Optional[HeadLoss] = None,
        probe_size: int = 128,
        schedule: Optional[tuple[int, str, float, float]] = None,
        calibration_iters: int = 50,
        ema_momentum: Optional[float] = None,
        weighting: Optional[TeacherWeighting] = None,
        fusion: tuple[str, float] = ("wbf", 0.55),
        mutual: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(teacher, nn.Module):
            mode = "frozen" if ema_momentum is None else "ema"
            specs = [TeacherSpec(SHORTHAND_NAME, teacher, mode=mode, momentum=ema_momentum or 0.0)]
        elif isinstance(teacher, TeacherSpec):
            specs = [teacher]
        else:
            specs = list(teacher)
        self.named = not isinstance(teacher, (nn.Module, TeacherSpec))
        _check_teacher_specs(specs, student)
        self.ema_momentum = ema_momentum
        self.weighting = weighting or TeacherWeighting()
        if self.weighting.mode != "fixed" and len(specs) < 2:
            raise ValueError(f"teacher weighting '{self.weighting.mode}' combines several teachers; this has one")
        self.fusion = fusion
        self.mutual = mutual
        if mutual and not any(s.mode == "online" for s in specs):
            raise ValueError("mutual learning needs an online teacher (mode: online): a frozen teacher cannot learn")
        self.student = student
        self.student_family = family_of(student)
        self.s_strides = feature_strides(student, probe_size)
        s_channels = feature_channels(student)

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
        known = {s.name for s in specs}
        for spec in list(feature_losses) + head_losses:
            unknown = sorted(set(spec.teachers or ()) - known)
            if unknown:
                raise ValueError(f"loss '{spec.name}' names teachers {unknown}; the teachers are {sorted(known)}")

        # a loss module serves its first teacher; later teachers get copies of it as it was before any teacher set
        # up its learnable parts (FGD's GcBlocks have the teacher's width)
        pristine = (
            {id(s.module): copy.deepcopy(s.module) for s in list(feature_losses) + head_losses}
            if len(specs) > 1
            else {}
        )
        used_modules: set[int] = set()
        self.slots: list[TeacherSlot] = []
        for spec in specs:
            self.slots.append(
                self._build_slot(spec, feature_losses, head_losses, s_channels, probe_size, used_modules, pristine)
            )
        for slot in self.slots:
            if slot.mode == "online":
                slot.model.train()
            else:
                freeze(slot.model)  # see the module docstring: frozen and EMA teachers stay outside the module tree
        self._register_parts()
        object.__setattr__(self, "teacher", self.slots[0].model)  # the (first) teacher, for one-teacher callers
        if self.weighting.mode == "confidence":
            missing = [s for s in self.slots if s.family.image_losses is None]
            if missing:
                raise ValueError(
                    f"teacher weighting 'confidence' needs each teacher's detection loss per image; the "
                    f"{missing[0].family.name} family of teacher '{missing[0].name}' does not provide one "
                    f"(image_losses); use fixed or adaptive weighting."
                )
        self.teacher_policy = None
        if self.weighting.mode == "adaptive":
            w = self.weighting
            self.teacher_policy = Exp3Policy(len(self.slots), w.interval, w.gamma, w.reward_scale, w.seed)
        self.bandit_events: list[dict] = []
        self._holdout: Optional[tuple[list[Tensor], list[dict[str, Tensor]]]] = None

        modules = [s.module for slot in self.slots for s in slot.feature_specs + slot.head_specs]
        if pseudo_labeler is not None:
            modules.append(pseudo_labeler)
        self.needs: frozenset[str] = frozenset().union(*(m.needs for m in modules), *(s.needs for s in self.slots))
        all_specs = [s for slot in self.slots for s in slot.feature_specs + slot.head_specs]
        auto = LossScaler.auto_names(all_specs)
        self.scaler = LossScaler(auto, calibration_iters, schedule)
        self._auto_index = {name: i for i, name in enumerate(self.scaler.names)}
        self.log_scalars: dict[str, float] = {}  # logged beside the losses (the trainer reads it), never summed
        self.timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=1000))
        self.recorder = ModelRecorder(student, record_rpn="teacher_rpn" in self.needs)
        self._anchor_cache: dict = {}  # the student's anchors for the last batch shape (see StepRecord)
        # the spread of the teacher's attention maps of FGD-style losses, measured on the first training step
        # (detkd.attention_check); empty until then, and for recipes without such a loss
        self.attention_spread: list[dict] = []
        self._attention_measured = False

    def _build_slot(self, spec, feature_losses, head_losses, s_channels, probe_size, used_modules, pristine):
        """One teacher's levels, adapters, losses (module copies after the first teacher) and pair checks, in the
        order a one-teacher distiller has always built them (adapters, cross adapters, learnable loss parts), so the
        random initialisation of a one-teacher run does not change."""
        model = spec.model
        family = family_of(model)
        t_strides = feature_strides(model, probe_size)
        try:
            levels = match_levels(t_strides, self.s_strides)
        except LevelMismatchError as err:
            raise LevelMismatchError(f"{err} (teacher '{spec.name}')" if self.named else str(err)) from None
        t_channels = feature_channels(model)

        def own(loss: LossSpec) -> nn.Module:
            if id(loss.module) in used_modules:
                return copy.deepcopy(pristine[id(loss.module)])
            used_modules.add(id(loss.module))
            return loss.module

        def serves(loss: LossSpec) -> bool:
            return loss.teachers is None or spec.name in loss.teachers

        feature_specs = [
            LossSpec(s.name, own(s), s.weight, resolve_levels(s.levels, levels, s.name), s.target_ratio, s.teachers)
            for s in feature_losses
            if serves(s)
        ]
        head_specs = [
            LossSpec(s.name, own(s), s.weight, s.levels, s.target_ratio, s.teachers)
            for s in head_losses
            if not s.module.makes_targets and serves(s)
        ]
        used = sorted({lvl for s in feature_specs for lvl in s.levels}, key=lambda n: self.s_strides[n])
        adapters = nn.ModuleDict(
            {
                lvl: nn.Conv2d(s_channels[lvl], t_channels[lvl], kernel_size=1)
                if s_channels[lvl] != t_channels[lvl]
                else nn.Identity()
                for lvl in used
            }
        )
        # CrossKD's connectors: every student head level -> the teacher head's width (only when a loss needs them)
        wants_cross = any("cross_head" in s.module.needs for s in head_specs)
        head_levels = sorted(self.s_strides, key=lambda n: self.s_strides[n]) if wants_cross else []
        cross_adapters = nn.ModuleDict(
            {
                lvl: nn.Conv2d(s_channels[lvl], t_channels[lvl], kernel_size=1)
                if s_channels[lvl] != t_channels.get(lvl, s_channels[lvl])
                else nn.Identity()
                for lvl in head_levels
            }
        )
        for s in feature_specs:  # learnable loss parts (e.g. FGD's GcBlocks) exist before the optimizer
            s.module.setup_levels({lvl: t_channels[lvl] for lvl in s.levels})
        pair = PairInfo(
            teacher_family=family,
            student_family=self.student_family,
            teacher_strides=dict(t_strides),
            student_strides=dict(self.s_strides),
            teacher_anchors=tuple(family.anchors_per_location(model)),
            student_anchors=tuple(self.student_family.anchors_per_location(self.student)),
            levels=tuple(levels),
        )
        for s in head_specs:  # a pair the loss cannot serve fails here, not at step 10,000
            s.module.check_pair(pair)
        needs: frozenset[str] = frozenset().union(*(s.module.needs for s in feature_specs + head_specs))
        if self.pseudo_labeler is not None:
            needs |= self.pseudo_labeler.needs
        if "cls_logits" in needs:  # difference masks compare both dense heads' logits
            needs |= {"teacher_head"}
        if self.weighting.mode == "confidence" and family.image_losses_need_head and (feature_specs or head_specs):
            needs |= {"teacher_head"}  # its per-image detection loss reads its head outputs
        slot = TeacherSlot(spec, family, t_strides, levels, adapters, cross_adapters, feature_specs, head_specs, pair,
                           frozenset(needs), FeatureTap(model), dict(t_channels))  # fmt: skip
        return slot

    def _register_parts(self) -> None:
        """The trainable per-teacher parts as submodules: flat for the one-teacher shorthand (the keys of every
        one-teacher checkpoint), nested under the teacher's name with several teachers; online teachers under
        ``online_teachers.<name>``."""
        if not self.named:
            slot = self.slots[0]
            self.adapters = slot.adapters
            self.cross_adapters = slot.cross_adapters
            self.feature_loss_modules = nn.ModuleList([s.module for s in slot.feature_specs])
            self.head_loss_modules = nn.ModuleList([s.module for s in slot.head_specs])
        else:
            self.adapters = nn.ModuleDict({s.name: s.adapters for s in self.slots})
            self.cross_adapters = nn.ModuleDict({s.name: s.cross_adapters for s in self.slots})
            self.feature_loss_modules = nn.ModuleDict(
                {s.name: nn.ModuleList([f.module for f in s.feature_specs]) for s in self.slots}
            )
            self.head_loss_modules = nn.ModuleDict(
                {s.name: nn.ModuleList([h.module for h in s.head_specs]) for s in self.slots}
            )
        online = {s.name: s.model for s in self.slots if s.mode == "online"}
        self.online_teachers = nn.ModuleDict(online) if online else None

    # -- one-teacher views (the first teacher) ------------------------------------------------------------------

    @property
    def teacher_family(self) -> DetectorFamily:
        return self.slots[0].family

    @property
    def t_strides(self) -> dict[str, int]:
        return self.slots[0].strides

    @property
    def levels(self) -> list[str]:
        """The levels the (first) teacher and the student share, finest first."""
        return self.slots[0].levels

    @property
    def pair(self) -> PairInfo:
        return self.slots[0].pair

    @property
    def t_tap(self) -> FeatureTap:
        return self.slots[0].tap

    @property
    def feature_specs(self) -> list[LossSpec]:
        return self.slots[0].feature_specs

    @property
    def head_specs(self) -> list[LossSpec]:
        return self.slots[0].head_specs

    def adapter(self, level: str) -> Optional[nn.Module]:
        """The (first) teacher's adapter of ``level`` (None where no feature loss distils)."""
        return self.slots[0].adapter(level)

    # -- teacher contracts --------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)  # online teachers are submodules: train mode (BatchNorm too) with the student
        for slot in self.slots:
            if slot.mode != "online":
                freeze(slot.model)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        for slot in self.slots:
            if slot.mode != "online":  # .to() / .cuda() / .half() move the unregistered teachers too
                slot.model._apply(fn, recurse)
        return self

    def lr_mult(self, name: str) -> float:
        """The learning-rate multiplier of parameter ``name`` (the trainer's optimizer asks): an online teacher's
        ``lr_mult``, 1 for everything else."""
        if name.startswith(ONLINE_PREFIX):
            teacher = name[len(ONLINE_PREFIX) :].split(".", 1)[0]
            return next(s.spec.lr_mult for s in self.slots if s.name == teacher)
        return 1.0

    def _ema_prefix(self, slot: TeacherSlot) -> str:
        return f"{EMA_PREFIX}{slot.name}." if self.named else EMA_PREFIX

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs: the student, the adapters, learnable loss parts (e.g. FGD GcBlocks), the
        loss scaler, online teachers (``online_teachers.*``) and the adaptive policy (``teacher_policy.*``); a frozen
        teacher is left out (it is loaded from its own checkpoint), an EMA teacher is kept (under ``ema_teacher.``:
        it is part of the training state)."""
        state = self.state_dict()
        for slot in self.slots:
            if slot.mode == "ema":
                prefix = self._ema_prefix(slot)
                state.update({f"{prefix}{k}": v for k, v in slot.model.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ema = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
        for slot in self.slots:
            if slot.mode != "ema":
                continue
            prefix = self._ema_prefix(slot)
            own = {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}
            if not own:
                raise RuntimeError(f"distiller checkpoint does not fit: it holds no EMA teacher ({prefix}*)")
            slot.model.load_state_dict(own)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if not (self.scaler.names or self.scaler.schedule):  # checkpoints from before the scaler existed
            missing = [k for k in missing if not k.startswith("scaler.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def set_total_iters(self, total_iters: int) -> None:
        """The run's length in iterations (the trainer calls it), for the distillation schedule."""
        self.scaler.set_total_iters(total_iters)

    def set_holdout(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        """The fixed held-out slice of the training set whose student detection loss rewards the adaptive policy."""
        self._holdout = (list(images), list(targets))

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
        """Run the forwards of one training step and record them (:meth:`record_teachers`); returns the record of the
        first teacher (the only one of a one-teacher distiller) and the task losses."""
        records, losses = self.record_teachers(images, targets, extra_needs, run_teacher_always)
        if records is None:
            return None, losses
        return records.get(self.slots[0].name, next(iter(records.values()), None)), losses

    def record_teachers(
        self,
        images: list[torch.Tensor],
        targets: Optional[list[dict[str, torch.Tensor]]],
        extra_needs: frozenset[str] = frozenset(),
        run_teacher_always: bool = False,
    ) -> tuple[Optional[dict[str, StepRecord]], dict[str, torch.Tensor]]:
        """Run the forwards of one training step and record them, one :class:`StepRecord` per teacher.

        An online teacher's own training pass (``teacher_task/*``, on the ground truth, never on pseudo labels) is
        recorded like a detection pass; when its canvas is the student's, its features and head outputs are reused
        for distillation (otherwise its backbone runs again on the student's canvas; its BatchNorm statistics then
        see that pass too). Without ``mutual`` they enter the record **detached**, so only the teacher's own
        detection loss trains it; with ``mutual`` they keep their graph, for the reverse terms of
        :meth:`_mutual_terms` (the student's own terms still cannot reach it: the losses detach their target).

        Args:
            images: the batch, (3, H_i, W_i) float in ``[0, 1]``.
            targets: their targets (boxes xyxy pixels of the images, labels).
            extra_needs: more for the teachers to compute than the losses need (the mask pictures want a head).
            run_teacher_always: run every teacher's feature pass even when no feature/head loss needs it.

        Returns:
            ``({teacher name: record}, task losses)``; the records are None when no loss reads them (a
            pseudo-label-only recipe).
        """
        gt_targets = targets
        passes: dict[str, Any] = {}
        detections: dict[str, list] = {}
        separate_targets = None
        if self.pseudo_labeler is not None:
            for slot in self.slots:
                detections[slot.name], passes[slot.name] = self._teacher_detections(images, slot)
            targets, separate_targets = self.pseudo_labeler.make_targets(self._fused_detections(detections), targets)
            if self.pseudo_labeler.added_per_image is not None:
                self.log_scalars["pseudo_label/added_per_image"] = self.pseudo_labeler.added_per_image

        self.recorder.clear()
        task_losses = self.student(images, targets)
        losses = {f"task/{k}": v for k, v in task_losses.items()}
        s_record = self.recorder.take()
        if separate_targets is not None:  # the "separate" pseudo-label mode: a second task loss on the labels only
            weight = self.pseudo_labeler.separate_weight
            extra = self.student(images, separate_targets)
            self.recorder.clear()  # that pass's record is not the step's
            losses.update({f"distill/pseudo_label/{k}": weight * v for k, v in extra.items()})
        for slot in self.slots:
            if slot.mode == "online":
                teacher_losses, passes[slot.name] = self._online_pass(slot, images, gt_targets)
                losses.update(teacher_losses)

        if not (any(slot.distils for slot in self.slots) or run_teacher_always):
            return None, losses
        if "teacher_rois" in self.needs and s_record.proposals is not None:
            self._choose_rois(s_record)
        records: dict[str, StepRecord] = {}
        for slot in self.slots:
            if not (slot.distils or run_teacher_always):
                continue  # a teacher that only makes pseudo labels
            records[slot.name] = self._teacher_record(slot, s_record, extra_needs, detections, passes)
        return records, losses

    def _teacher_record(self, slot: TeacherSlot, s_record, extra_needs, detections, passes) -> StepRecord:
        canvas = renormalize(
            s_record.image_list.tensors,
            s_record.image_list.image_sizes,
            self.student_family.normalization(self.student),
            slot.family.normalization(slot.model),
        )
        needs = slot.needs | extra_needs
        grad = slot.mode == "online" and self.mutual
        recorded = passes.get(slot.name)
        if not grad:
            recorded = _detached(recorded)
        dense = slot.family.head == "dense"
        t_record = run_teacher(slot.model, slot.tap, canvas, s_record, needs, dense, detections.get(slot.name),
                               recorded, grad=grad)  # fmt: skip
        record = StepRecord(
            s_record,
            t_record,
            student_model=self.student,
            teacher_model=slot.model,
            student_family=self.student_family,
            teacher_family=slot.family,
            levels=slot.levels,
            strides=self.s_strides,
            with_anchors="anchors" in needs,
            anchor_cache=self._anchor_cache,
        )
        if "cross_head" in needs:  # with grad: through the teacher head back to the student and adapters
            feats = [slot.cross_adapters[lvl](s_record.features[lvl]) for lvl in record.head_levels]
            # an online teacher's head is a fixed function here: CrossKD trains the student, never the teacher
            with no_parameter_grad(slot.model.head) if slot.mode == "online" else contextlib.nullcontext():
                record.cross_head = dict(slot.model.head(feats))
        return record

    def _fused_detections(self, detections: dict[str, list]) -> list:
        """One teacher's detections as they are; several teachers' fused (``fusion``), weighted by the config
        weights of the teachers followed this step."""
        if len(self.slots) == 1:
            return detections[self.slots[0].name]
        follow = self.teacher_policy.followed() if self.teacher_policy is not None else None
        weights = normalized_weights([s.spec.weight for s in self.slots], follow)
        method, iou = self.fusion
        return fuse_detections([detections[s.name] for s in self.slots], weights, method, iou)

    @torch.no_grad()
    def _choose_rois(self, s_record) -> None:
        """Match the sampled proposals to the targets once and, under a ``max_rois`` budget, keep a subset."""
        roi = self.student.roi_heads
        gt_boxes = [t["boxes"] for t in s_record.targets]
        gt_labels = [t["labels"] for t in s_record.targets]
        _, labels = roi.assign_targets_to_proposals(s_record.proposals, gt_boxes, gt_labels)
        s_record.roi_labels = torch.cat(labels)
        budgets = [s.module.max_rois for slot in self.slots for s in slot.head_specs if s.module.max_rois is not None]
        if budgets and any(len(p) > min(budgets) for p in s_record.proposals):
            s_record.roi_keep = select_rois(labels, min(budgets))

    def _recorded_pass(self, slot: TeacherSlot, run: Callable[[], Any]) -> tuple[Any, Optional[tuple]]:
        """``run()`` (a forward of the teacher) with the teacher's canvas, backbone output, features and head outputs
        recorded: ``(its output, (canvas, backbone output, features, head outputs) or None)``."""
        seen: dict[str, Any] = {}
        model = slot.model

        def keep(name: str, value: Any) -> None:  # a hook that returns a value would replace the module's output
            seen.setdefault(name, value)

        hooks = [
            model.transform.register_forward_hook(lambda m, a, out: keep("canvas", out[0].tensors)),
            model.backbone.register_forward_hook(lambda m, a, out: keep("out", out)),
        ]
        slot.tap.clear()
        try:
            output = run()
        finally:
            for hook in hooks:
                hook.remove()
        out = seen.get("out")
        recorded = None
        if "canvas" in seen and isinstance(out, dict):
            recorded = (seen["canvas"], out, dict(slot.tap.features), dict(slot.tap.head_outputs))
        slot.tap.clear()
        return output, recorded

    @torch.no_grad()
    def _teacher_detections(self, images: list[torch.Tensor], slot: Optional[TeacherSlot] = None):
        """A teacher's detections, and ``(canvas, backbone output, features, head outputs)`` of that pass (an online
        teacher detects in eval mode, then returns to train mode)."""
        slot = slot or self.slots[0]
        was_training = slot.model.training
        slot.model.eval()
        try:
            return self._recorded_pass(slot, lambda: slot.model(images))
        finally:
            slot.model.train(was_training)

    def _online_pass(self, slot: TeacherSlot, images, targets) -> tuple[dict[str, Tensor], Optional[tuple]]:
        """An online teacher's training forward on the ground truth: ``teacher_task/[<name>/]<loss>`` and the pass."""
        if targets is None or any(t.get("unlabeled", False) for t in targets):
            raise RuntimeError(f"the online teacher '{slot.name}' trains on the ground truth: every image needs labels")
        losses, recorded = self._recorded_pass(slot, lambda: slot.model(images, targets))
        prefix = f"teacher_task/{slot.name}/" if self.named else "teacher_task/"
        return {f"{prefix}{k}": v for k, v in losses.items()}, recorded

    @torch.no_grad()
    def update_ema_teacher(self) -> None:
        """For every EMA teacher: ``t <- m * t + (1 - m) * s`` for every floating-point parameter and buffer
        (BatchNorm statistics too); integer buffers (``num_batches_tracked``) are copied."""
        for slot in self.slots:
            if slot.mode != "ema":
                continue
            m = slot.spec.momentum
            t_state, s_state = slot.model.state_dict(), self.student.state_dict()
            floats = [k for k, v in t_state.items() if v.is_floating_point()]
            torch._foreach_mul_([t_state[k] for k in floats], m)
            torch._foreach_add_([t_state[k] for k in floats], [s_state[k].detach() for k in floats], alpha=1.0 - m)
            for k, v in t_state.items():
                if not v.is_floating_point():
                    v.copy_(s_state[k])

    @torch.no_grad()
    def holdout_loss(self) -> float:
        """The student's detection loss on the held-out slice (:meth:`set_holdout`): a training-mode forward with
        its BatchNorm layers in eval mode, so that measuring moves no statistics; nothing is recorded."""
        if self._holdout is None:
            raise RuntimeError("adaptive teacher weighting needs a held-out training slice: call set_holdout first")
        device = next(self.student.parameters()).device
        images = [img.to(device) for img in self._holdout[0]]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in self._holdout[1]]
        norms = [m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.eval()
        try:
            losses = self.student(images, targets)
        finally:
            for m in norms:
                m.train()
            self.recorder.clear()
        return float(sum(v.detach().double() for v in losses.values()))

    def teacher_weights(self, records: dict[str, StepRecord]) -> dict[str, Union[None, float, Tensor]]:
        """Each teacher's weight this step: None (one-teacher shorthand: the terms as they are), a number
        (``fixed``, ``adaptive``) or a per-image tensor (N,) (``confidence``); logged as
        ``teachers/weight/<name>`` (the mean over the images)."""
        if not self.named:
            return {self.slots[0].name: None}
        names = [s.name for s in self.slots]
        mode = self.weighting.mode
        if mode == "confidence":
            per_image = []
            for slot in self.slots:
                record = records[slot.name]
                t = record.teacher
                per_image.append(slot.family.image_losses(slot.model, record.image_list, t.backbone_out, t.head,
                                                          record.targets))  # fmt: skip
            losses = torch.stack(per_image, dim=1)  # (N, K)
            w = confidence_weights(losses, self.weighting.temperature)
            weights: dict[str, Union[float, Tensor]] = {n: w[:, k] for k, n in enumerate(names)}
            self.log_scalars.update({f"teachers/weight/{n}": float(w[:, k].mean()) for k, n in enumerate(names)})
            self.log_scalars.update(
                {f"teachers/task_loss/{n}": float(losses[:, k].mean()) for k, n in enumerate(names)}
            )
            return weights
        follow = self.teacher_policy.followed() if self.teacher_policy is not None else None
        fixed = normalized_weights([s.spec.weight for s in self.slots], follow)
        self.log_scalars.update({f"teachers/weight/{n}": w for n, w in zip(names, fixed)})
        return dict(zip(names, fixed))

    def _raw_terms(self, slot: TeacherSlot, record: StepRecord) -> list[tuple[LossSpec, Optional[str], Tensor]]:
        """Every loss against one teacher: ``(spec, level or term or None, unweighted value)``."""
        out: list[tuple[LossSpec, Optional[str], Tensor]] = []
        for spec in slot.feature_specs:
            for lvl in spec.levels:
                ctx = record.level_context(lvl, slot.adapter(lvl))
                out.append((spec, lvl, spec.module(ctx.s_feat, ctx.t_feat, ctx)))
        for spec in slot.head_specs:
            value = spec.module(record)
            for k, raw in (value if isinstance(value, dict) else {None: value}).items():
                out.append((spec, k, raw))
        return out

    def _per_image_terms(self, slot: TeacherSlot, record: StepRecord, weight: Tensor) -> list:
        """``(1 / N) sum_i w_i term(image i)`` for every term (``confidence`` weighting)."""
        n = len(record.targets)
        summed: dict[tuple[int, Optional[str]], list] = {}
        for i in range(n):
            for spec, key, raw in self._raw_terms(slot, record.image(i)):
                entry = summed.setdefault((id(spec), key), [spec, key, 0.0])
                entry[2] = entry[2] + weight[i].to(raw.dtype) * raw / n
        return [tuple(v) for v in summed.values()]

    def compute_losses(
        self,
        records: Union[StepRecord, dict[str, StepRecord]],
        unweighted: Optional[dict[str, torch.Tensor]] = None,
        weights: Optional[dict[str, Union[None, float, Tensor]]] = None,
    ) -> dict[str, torch.Tensor]:
        """Every configured distillation term of a recorded step, weighted and named.

        Args:
            records: one teacher's record (the first teacher's) or ``{teacher name: record}``.
            unweighted: if given, receives each ``weight: auto`` loss's total before its loss weight (after the
                teachers' weights), for the calibration.
            weights: each teacher's weight (:meth:`teacher_weights`); default: the config weights normalised (none
                for the one-teacher shorthand).
        """
        if isinstance(records, StepRecord):
            records = {self.slots[0].name: records}
        if not self._attention_measured:
            self._measure_attention(records)
        if weights is None:
            weights = self.teacher_weights(records)
        losses: dict[str, torch.Tensor] = {}
        for slot in self.slots:
            record = records.get(slot.name)
            if record is None:
                continue
            tw = weights.get(slot.name)
            if torch.is_tensor(tw):
                terms = self._per_image_terms(slot, record, tw)
            else:
                terms = [(s, k, raw if tw is None else tw * raw) for s, k, raw in self._raw_terms(slot, record)]
            for spec, key, raw in terms:
                parts = (
                    ["distill", spec.name] + ([slot.name] if self.named else []) + ([key] if key is not None else [])
                )
                losses["/".join(parts)] = self._weight(spec) * raw
                if unweighted is not None and spec.name in self._auto_index:
                    unweighted[spec.name] = unweighted.get(spec.name, 0.0) + raw.detach()
            if slot.mode == "online" and self.mutual:
                losses.update(self._mutual_terms(slot, record))
        return losses

    @torch.no_grad()
    def _measure_attention(self, records: dict[str, StepRecord]) -> None:
        """Once: how far the teacher's attention maps spread (:func:`detkd.masks.attention_spread`) for every loss
        that weights by them (``uses_attention_maps``), per teacher and level, into :attr:`attention_spread`."""
        self._attention_measured = True
        for slot in self.slots:
            record = records.get(slot.name)
            for spec in slot.feature_specs if record is not None else ():
                temperature = spec.module.attention_temperature
                if not getattr(spec.module, "uses_attention_maps", False) or temperature is None:
                    continue
                for lvl in spec.levels:
                    t = record.teacher.features[lvl]
                    cells, channels = attention_spread(t, temperature)
                    self.attention_spread.append({
                        "loss": spec.name, "teacher": slot.name if self.named else None, "level": lvl,
                        "temperature": float(temperature), "cells": cells, "of_cells": t.shape[2] * t.shape[3],
                        "channels": channels, "of_channels": t.shape[1], "mean_abs": float(t.abs().mean()),
                        "flat_temperature": flat_attention_temperature(t, temperature),
                    })  # fmt: skip

    def _mutual_terms(self, slot: TeacherSlot, record: StepRecord) -> dict[str, Tensor]:
        """Deep mutual learning (Zhang et al., CVPR 2018): each model also learns from the other's detached outputs.
        The losses detach their target, so the student's terms never reach the teacher; the reverse terms run every
        feature loss on the swapped context (:meth:`~detkd.losses.context.LevelContext.swapped`): the teacher's
        feature learns towards the adapted student feature (detached), with the loss's own weight (not the
        teacher's: that weighs what the *student* takes from each teacher). Named ``mutual/<loss>/[<teacher>/]<level>``.
        Head losses stay one-way (student from teacher)."""
        out: dict[str, Tensor] = {}
        for spec in slot.feature_specs:
            for lvl in spec.levels:
                ctx = record.level_context(lvl, slot.adapter(lvl)).swapped()
                parts = ["mutual", spec.name] + ([slot.name] if self.named else []) + [lvl]
                out["/".join(parts)] = self._weight(spec) * spec.module(ctx.s_feat, ctx.t_feat, ctx)
        return out

    def _weight(self, spec: LossSpec) -> Union[float, torch.Tensor]:
        if spec.weight != "auto":
            return spec.weight
        return self.scaler.auto_weight[self._auto_index[spec.name]].float()

    def _bandit_round(self) -> None:
        """The adaptive policy's step: at a round boundary it measures the held-out loss, is rewarded, draws."""
        policy = self.teacher_policy
        event = policy.begin_step(self.holdout_loss)
        if event is not None:
            event["followed"] = [s.name for s, f in zip(self.slots, policy.followed()) if f]
            self.bandit_events.append(event)
        self.log_scalars.update(
            {
                "teachers/bandit/arm": float(policy.arm),
                "teachers/bandit/reward": float(policy.last_reward),
                "teachers/bandit/holdout_loss": float(policy.last_loss),
            }
        )

    def forward(self, images: list[torch.Tensor], targets: Optional[list[dict[str, torch.Tensor]]] = None):
        if not self.training:
            return self.student(images)
        self.update_ema_teacher()
        scaler = self.scaler
        scale = scaler.scale()
        self.log_scalars = {"distill/scale": scale} if scaler.schedule is not None else {}
        if scale == 0.0 and not scaler.calibrating:  # distillation is off (schedule's stop_at): nothing to compute
            scaler.step()
            losses = {f"task/{k}": v for k, v in self.student(images, targets).items()}
            for slot in self.slots:  # an online teacher keeps learning from the ground truth
                if slot.mode == "online":
                    losses.update(self._online_pass(slot, images, targets)[0])
            return losses
        if self.teacher_policy is not None:
            self._bandit_round()
        records, losses = self.record_teachers(images, targets)
        if records is not None:
            start = time.perf_counter()  # masks + losses (forward), for benchmarks/speed.py
            unweighted: Optional[dict[str, torch.Tensor]] = {} if scaler.calibrating else None
            losses.update(self.compute_losses(records, unweighted, self.teacher_weights(records)))
            self.timings["losses"].append(time.perf_counter() - start)
            if unweighted is not None:
                task = sum(v.detach() for k, v in losses.items() if k.startswith("task/"))
                scaler.observe(task, unweighted)
        if scaler.names:
            self.log_scalars.update({f"distill/weight/{k}": v for k, v in scaler.weights().items()})
        if scale != 1.0:
            losses = {k: scale * v if k.startswith(("distill/", "mutual/")) else v for k, v in losses.items()}
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
    """Teachers (loaded from their checkpoints), student (per ``student.init``), losses and adapters from a recipe.

    Each teacher (``teacher:`` or every entry of ``teachers:``) is built under its own random seed
    (``train.seed + 1000 + k``) with the global generator restored after, so the student's initialisation does not
    depend on the teachers: it equals the baseline's (``tools/train.py`` on the student alone, same seed)."""
    from detkd.config import teacher_entries
    from detkd.losses import FEATURE_LOSSES, HEAD_LOSSES, build_feature_loss
    from detkd.models.build import build_detector_from_cfg

    entries = teacher_entries(cfg)
    if not entries or cfg.student is None:
        raise ValueError(f"recipe '{cfg.name}' needs both 'teacher' (or 'teachers') and 'student' sections to distil.")
    for _, key, t_cfg, _ in entries:
        if t_cfg.mode == "frozen" and t_cfg.checkpoint is None and t_cfg.weights is None:
            raise ValueError(
                f"recipe '{cfg.name}': {key}.checkpoint is not set; a teacher must be trained — give the path of its "
                f"checkpoint (or {key}.train_if_missing: <teacher recipe>)."
            )
    named = bool(cfg.teachers)
    teachers = []
    for k, (_, _, t_cfg, _) in enumerate(entries):
        # the global generator is left as it was, so the student starts from exactly the weights ``tools/train.py``
        # gives the same detector under the same seed (the baseline's), whatever the teachers are
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 1000 + k)
            teachers.append(build_detector_from_cfg(t_cfg, num_classes))
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
        copied = inherit_neck_and_head(student, teachers[0])
        if not copied:
            raise ValueError(
                f"recipe '{cfg.name}': student.init is 'inherit_teacher' but no neck/head tensor of the teacher "
                f"matches the student's shapes (different FPN widths?); use 'scratch' or 'checkpoint'."
            )
    for model, (_, _, t_cfg, _) in zip(teachers, entries):
        if t_cfg.mode == "ema":  # self-distillation: the teacher starts as the student and follows its moving average
            model.load_state_dict(student.state_dict())

    distill = cfg.distill
    feature_specs, head_specs, pseudo_labeler = [], [], None
    if distill is not None:
        names: dict[str, int] = {}
        for loss_cfg in distill.features:
            if loss_cfg.type not in FEATURE_LOSSES:
                raise ValueError(f"unknown feature loss '{loss_cfg.type}'; valid: {', '.join(sorted(FEATURE_LOSSES))}")
            module = build_feature_loss(loss_cfg.type, **dict(loss_cfg.params))
            name = _unique(loss_cfg.type, names)
            feature_specs.append(
                LossSpec(name, module, loss_cfg.weight, loss_cfg.levels, loss_cfg.target_ratio, loss_cfg.teachers)
            )
        for loss_cfg in distill.head:
            if loss_cfg.type not in HEAD_LOSSES:
                raise ValueError(f"unknown head loss '{loss_cfg.type}'; valid: {', '.join(sorted(HEAD_LOSSES))}")
            module = HEAD_LOSSES[loss_cfg.type](**dict(loss_cfg.params))
            module.set_category_map(cat_id_to_label or {i: i for i in range(1, num_classes)})
            name = _unique(loss_cfg.type, names)
            head_specs.append(
                LossSpec(name, module, loss_cfg.weight, target_ratio=loss_cfg.target_ratio, teachers=loss_cfg.teachers)
            )
    probe = max(32, student_cfg.min_size)
    schedule, calibration_iters = None, 50
    weighting, fusion, mutual = TeacherWeighting(seed=cfg.train.seed), ("wbf", 0.55), False
    if distill is not None:
        calibration_iters = distill.calibration_iters
        if distill.schedule is not None:
            sch = distill.schedule
            schedule = (sch.warmup_iters, sch.decay, sch.final_ratio, sch.stop_at)
        w = distill.teacher_weighting
        weighting = TeacherWeighting(w.mode, w.temperature, w.interval, w.gamma, w.reward_scale, cfg.train.seed)
        fusion = (distill.pseudo_label_fusion.method, distill.pseudo_label_fusion.iou)
        mutual = distill.mutual
    specs = [
        TeacherSpec(name, model, weight, t_cfg.mode, t_cfg.momentum, t_cfg.lr_mult)
        for model, (name, _, t_cfg, weight) in zip(teachers, entries)
    ]
    if named:
        teacher: Union[nn.Module, TeacherSpec, list[TeacherSpec]] = specs
    elif specs[0].mode == "online":
        teacher = specs[0]
    else:
        teacher = teachers[0]
    return Distiller(
        teacher,
        student,
        feature_specs,
        head_specs,
        pseudo_labeler,
        probe_size=probe,
        schedule=schedule,
        calibration_iters=calibration_iters,
        ema_momentum=cfg.teacher.momentum if not named and cfg.teacher.mode == "ema" else None,
        weighting=weighting,
        fusion=fusion,
        mutual=mutual,
    )


def _unique(name: str, seen: dict[str, int]) -> str:
    """``fgd``, then ``fgd_1``, ``fgd_2`` ... when a recipe uses one loss type twice."""
    count = seen.get(name, 0)
    seen[name] = count + 1
    return name if count == 0 else f"{name}_{count}"
