"""YAML recipes -> validated, frozen dataclasses.

A recipe is a YAML file read with ``yaml.safe_load`` (plus YAML 1.2's floats: ``1e-3`` is a number, not a
string). Its optional ``_base_`` key names one file or a list of files (paths relative to the recipe) that are
merged in order before the recipe itself; the later file wins, and
nested mappings merge key by key (lists and scalars are replaced whole). Command-line overrides
(``--opts train.epochs=2 data.batch_size=4``) are applied last; each value is parsed as a YAML scalar or list.

The merged mapping is converted into the dataclasses below. Every problem is reported as a single
:class:`ConfigError` paragraph naming the file that set the key, the dotted key and the accepted keys or values:
an unknown key, a wrong type, a missing required key, a number outside its range (:data:`RANGES`, listed by
:func:`describe_ranges`), or a ``type:`` that names no registered transform or loss. Loss and transform parameters
are validated against the keyword arguments of the registered constructor, so the constructor's signature is the
only schema for them.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union

import yaml

from detkd.errors import ConfigError
from detkd.files import atomic_write
from detkd.models.spec import DetectorSpec

OPTS_SOURCE = "--opts"

__all__ = ["Config", "ConfigError", "RANGES", "describe_ranges", "load_config", "config_from_dict", "config_to_dict"]

# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitCfg:
    """One COCO-format split: the annotation json and the folder its ``file_name``s are relative to."""

    ann_file: str
    img_dir: str


@dataclass(frozen=True)
class UnlabeledCfg:
    """Images without labels, used with pseudo-label distillation (a folder, or a COCO json without annotations)."""

    img_dir: str
    ann_file: Optional[str] = None
    ratio: float = 0.5  # unlabelled batches per labelled batch


@dataclass(frozen=True)
class SyntheticCfg:
    """Generate the synthetic COCO set (the embedded default) into ``out`` when it is absent."""

    out: str = "data/synthetic"
    num_train: int = 1000
    num_val: int = 200
    size: int = 128
    seed: int = 0
    min_object_size: float = 8.0  # px; larger is easier (see detkd.data.synthetic.render_sample)
    clutter: float = 1.0  # scale of the background clutter; smaller is easier


@dataclass(frozen=True)
class StepCfg:
    """A registered step (transform or loss): its ``type`` and the keyword arguments of its constructor."""

    type: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TransformsCfg:
    train: tuple[StepCfg, ...] = ()
    val: tuple[StepCfg, ...] = ()
    min_visibility: float = 0.3


@dataclass(frozen=True)
class DataCfg:
    train: SplitCfg
    val: SplitCfg
    batch_size: int = 8
    num_workers: int = 2
    keep_empty: bool = True
    transforms: TransformsCfg = TransformsCfg()
    synthetic: Optional[SyntheticCfg] = None
    unlabeled: Optional[UnlabeledCfg] = None


@dataclass(frozen=True)
class ModelCfg(DetectorSpec):
    """A torchvision detector: the fields of :class:`detkd.models.spec.DetectorSpec`, the one parameter
    specification that ``build_detector`` and every family's builder take (documented there)."""


@dataclass(frozen=True)
class TeacherCfg(ModelCfg):
    """The teacher. ``train_if_missing`` names a recipe that trains it (into the folder of ``checkpoint``, which
    must then be named ``best.pth``) when ``checkpoint`` does not exist; ``train_opts`` are ``--opts`` overrides for
    that recipe. ``mode``: ``frozen`` (a trained teacher, never updated), ``ema`` (self-distillation: the teacher
    is an exponential moving average of the student, ``t <- momentum * t + (1 - momentum) * s`` after every step;
    same architecture as the student, no checkpoint) or ``online`` (the teacher trains with the student on the
    ground truth, at ``lr_mult`` x the learning rate; from ``checkpoint`` or from scratch)."""

    train_if_missing: Optional[str] = None
    train_opts: tuple[str, ...] = ()
    mode: Literal["frozen", "ema", "online"] = "frozen"
    momentum: float = 0.999
    lr_mult: float = 1.0


@dataclass(frozen=True)
class NamedTeacherCfg(TeacherCfg):
    """One entry of ``teachers:`` (several teachers): the keys of ``teacher:`` plus its ``name`` (letters, digits,
    ``_``, ``-``; it names the log terms ``distill/<loss>/<name>/<level>``) and its ``weight`` (normalised over the
    teachers)."""

    name: str = field(kw_only=True)
    weight: float = 1.0


@dataclass(frozen=True)
class StudentCfg(ModelCfg):
    """The student. ``init``: from scratch, from ``checkpoint``, or inheriting the teacher's neck and head."""

    init: Literal["scratch", "checkpoint", "inherit_teacher"] = "scratch"


@dataclass(frozen=True)
class LossCfg:
    """One distillation loss: registered ``type``, its ``weight``, the FPN ``levels`` it applies to, its params.

    ``weight: auto`` calibrates the weight over the first ``distill.calibration_iters`` iterations so that the term
    equals ``target_ratio`` x the detection (task) loss (see ``detkd.losses.scaling``). ``teachers``: the names of
    the teachers the loss is computed against (default: every teacher; the ``teacher:`` shorthand's is ``teacher``)."""

    type: str
    weight: Union[float, Literal["auto"]] = 1.0
    target_ratio: float = 1.0
    levels: Union[str, tuple[str, ...]] = "all"
    teachers: Optional[tuple[str, ...]] = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherCheckCfg:
    """Evaluate the teacher on the val split (its first ``num_images`` images; default: as many as ``eval``
    uses) before distilling; stop if its AP is below ``min_ap`` (a teacher that failed to load scores ~0)."""

    enabled: bool = True
    num_images: Optional[int] = None
    min_ap: float = 0.01


@dataclass(frozen=True)
class KDScheduleCfg:
    """A scale on every distillation term over training (RTMDet / YOLOv6 practice): linear warm-up from 0 over
    ``warmup_iters``, then ``decay`` (``none``, ``linear`` or ``cosine``) from 1 to ``final_ratio`` at the last
    iteration; from ``stop_at`` (a fraction of training) on, distillation is off (scale 0, nothing computed)."""

    warmup_iters: int = 0
    decay: Literal["none", "linear", "cosine"] = "none"
    final_ratio: float = 0.0
    stop_at: float = 1.0


@dataclass(frozen=True)
class TeacherWeightingCfg:
    """How several teachers combine (``detkd.teachers.weighting``). ``fixed``: the teachers' weights;
    ``confidence``: per image, a softmax at ``temperature`` of minus each teacher's detection loss on the image;
    ``adaptive``: an EXP3 bandit picks the teachers the student follows for ``interval`` steps at a time, rewarded
    by the improvement of the student's detection loss on ``holdout_images`` training images held out of training
    (``gamma``: exploration; ``reward_scale``: the relative improvement that earns the full reward)."""

    mode: Literal["fixed", "confidence", "adaptive"] = "fixed"
    temperature: float = 1.0
    interval: int = 20
    holdout_images: int = 8
    gamma: float = 0.1
    reward_scale: float = 0.05


@dataclass(frozen=True)
class PseudoFusionCfg:
    """Pseudo labels of several teachers: ``wbf`` (weighted box fusion) or class-wise ``nms`` across the teachers, at
    ``iou`` (``detkd.teachers.fusion``)."""

    method: Literal["wbf", "nms"] = "wbf"
    iou: float = 0.55


@dataclass(frozen=True)
class DistillCfg:
    features: tuple[LossCfg, ...] = ()
    head: tuple[LossCfg, ...] = ()
    teacher_check: TeacherCheckCfg = TeacherCheckCfg()
    schedule: Optional[KDScheduleCfg] = None
    calibration_iters: int = 50  # iterations over which `weight: auto` terms are calibrated
    teacher_weighting: TeacherWeightingCfg = TeacherWeightingCfg()
    pseudo_label_fusion: PseudoFusionCfg = PseudoFusionCfg()
    # deep mutual learning: the distillation terms train the online teachers too (otherwise only their task loss)
    mutual: bool = False


@dataclass(frozen=True)
class OptimizerCfg:
    type: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class ScheduleCfg:
    """Decay after warm-up. ``step``: multiply by ``gamma`` at each epoch in ``milestones``; ``cosine``: to
    ``min_lr_ratio * lr`` at the last iteration."""

    type: Literal["step", "cosine", "constant"] = "step"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 12
    optimizer: OptimizerCfg = OptimizerCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    grad_clip: Optional[float] = None  # max global L2 norm of the gradients
    amp: bool = False  # mixed precision: float16 + grad scaler on CUDA, bfloat16 autocast on the CPU
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_iters: Optional[int] = None  # stop after this many iterations in total (smoke runs, benchmarks)
    log_interval: int = 20
    # DistributedDataParallel's find_unused_parameters: only for a recipe whose step leaves some trainable
    # parameter without a gradient (it costs a graph traversal every step)
    find_unused_parameters: bool = False


@dataclass(frozen=True)
class EvalCfg:
    interval: int = 1  # epochs between evaluations; 0 = only at the end
    max_images: Optional[int] = None
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class CheckpointCfg:
    interval: int = 1  # epochs between checkpoints (the last epoch is always saved)


@dataclass(frozen=True)
class LogCfg:
    tensorboard: bool = True
    mask_images_every: Optional[int] = None


@dataclass(frozen=True)
class ReportCfg:
    """What ``train_distill.py`` shows at the end: the teacher/student table, and mask pictures of the first
    ``mask_images`` val images (0 = none), written to ``<work_dir>/mask_vis``. ``baseline``: also train the student
    alone (same data, schedule, seed and initial weights, no distillation) into ``<work_dir>/baseline`` and add it as
    the ``student (baseline)`` row."""

    mask_images: int = 0
    baseline: bool = False


@dataclass(frozen=True)
class Config:
    data: DataCfg
    model: Optional[ModelCfg] = None
    teacher: Optional[TeacherCfg] = None
    teachers: tuple[NamedTeacherCfg, ...] = ()  # several teachers; `teacher` is the one-teacher shorthand
    student: Optional[StudentCfg] = None
    distill: Optional[DistillCfg] = None
    train: TrainCfg = TrainCfg()
    eval: EvalCfg = EvalCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    log: LogCfg = LogCfg()
    report: ReportCfg = ReportCfg()
    work_dir: Optional[str] = None
    name: str = ""  # the recipe's file stem unless set


# ----------------------------------------------------------------------------------------------------------------
# Loading: files, _base_ merging, --opts
# ----------------------------------------------------------------------------------------------------------------


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats. PyYAML follows YAML 1.1, where a float needs a dot and a
    signed exponent, so ``lr: 2e-3`` or ``--opts train.optimizer.lr=1e-4`` would be the *string* ``'2e-3'``."""


RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text_or_file: Any) -> Any:
    """Parse recipe YAML (a string or an open file) with :class:`RecipeLoader`."""
    return yaml.load(text_or_file, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def _read_yaml(path: Path, included_from: Optional[Path]) -> dict:
    if not path.is_file():
        where = f" (named in _base_ of {included_from})" if included_from else ""
        raise ConfigError(f"config file {path} does not exist{where}.")
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}.")
    return data


def _merge(dst: dict, src: dict, origins: dict[str, str], source: str, prefix: str = "") -> None:
    """Merge ``src`` into ``dst`` in place (mappings key by key, everything else replaced); record origins."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            origins.setdefault(dotted, source)
            _merge(dst[key], value, origins, source, dotted + ".")
        else:
            dst[key] = value
            for k in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[k]
            origins[dotted] = source


def _load_merged(path: Path, origins: dict[str, str], stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: _base_ inheritance forms a cycle: {chain}.")
    data = _read_yaml(path, stack[-1] if stack else None)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key '_base_' must be a file path or a list of file paths, got {bases!r}.")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        base_origins: dict[str, str] = {}
        base_data = _load_merged(base_path, base_origins, (*stack, path))
        _merge(merged, base_data, origins, str(base_path))
        origins.update(base_origins)  # the finer origins inside the base (its own _base_ files)
    _merge(merged, data, origins, str(path))
    return merged


def parse_opts(opts: list[str]) -> list[tuple[str, Any]]:
    """Parse ``["a.b=1", "c=[1, 2]"]`` into ``[("a.b", 1), ("c", [1, 2])]`` (values as YAML)."""
    parsed = []
    for item in opts:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{OPTS_SOURCE}: '{item}' is not of the form dotted.key=value.")
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{OPTS_SOURCE}: the value of '{key}' is not valid YAML: {err}") from err
        parsed.append((key.strip(), value))
    return parsed


def _apply_opt(data: dict, dotted: str, value: Any, origins: dict[str, str]) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, here)]
        else:
            if not isinstance(node.get(part, {}), (dict, list)):
                raise ConfigError(f"{OPTS_SOURCE}: cannot set '{dotted}': '{here}' is a value, not a mapping.")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, dotted)] = value
    else:
        node[last] = value
    for k in [k for k in origins if k.startswith(dotted + ".")]:
        del origins[k]
    origins[dotted] = OPTS_SOURCE


def _list_index(part: str, node: list, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{OPTS_SOURCE}: '{dotted}' indexes a list of {len(node)} items; use 0..{len(node) - 1}.")
    return int(part)


def load_config(path: Union[str, os.PathLike], opts: Optional[list[str]] = None) -> Config:
    """Read a recipe with its ``_base_`` files and ``--opts`` overrides into a validated :class:`Config`."""
    path = Path(path)
    origins: dict[str, str] = {}
    data = _load_merged(path, origins)
    for key, value in parse_opts(opts or []):
        _apply_opt(data, key, value, origins)
    data.setdefault("name", path.stem)
    ctx = _Context(origins, str(path.resolve()))
    cfg = _convert(Config, data, "", ctx)
    _check_detectors(cfg, ctx)
    _check_teachers(cfg, ctx)
    _check_transforms(cfg, ctx)
    _check_val_transforms(cfg, ctx)
    return cfg


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate an already-resolved mapping (e.g. the one stored in a checkpoint)."""
    ctx = _Context({}, source)
    cfg = _convert(Config, dict(data), "", ctx)
    _check_teachers(cfg, ctx)
    return cfg


SHORTHAND_TEACHER = "teacher"
"""The name of the one teacher of the ``teacher:`` shorthand."""


def teacher_entries(cfg: Config) -> list[tuple[str, str, TeacherCfg, float]]:
    """``(name, dotted key, teacher config, weight)`` of every teacher: the entries of ``teachers:``, or the one
    ``teacher:`` (named ``teacher``, weight 1); empty when the recipe has neither."""
    if cfg.teachers:
        return [(t.name, f"teachers.{i}", t, t.weight) for i, t in enumerate(cfg.teachers)]
    if cfg.teacher is not None:
        return [(SHORTHAND_TEACHER, "teacher", cfg.teacher, 1.0)]
    return []


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists; step params are flattened back)."""
    if isinstance(cfg, (StepCfg, LossCfg)):
        out = {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "params"}
        out.update({k: config_to_dict(v) for k, v in cfg.params.items()})
        return out
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write the fully resolved config as YAML (atomically, :func:`detkd.files.atomic_write`)."""
    atomic_write(path, lambda f: yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False), binary=False)


# ----------------------------------------------------------------------------------------------------------------
# Validation: mapping -> dataclasses
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    origins: dict[str, str]
    root_file: str

    def file_of(self, dotted: str) -> str:
        """The file that set ``dotted`` (or its nearest parent); the recipe itself when unknown."""
        key = dotted
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.root_file

    def error(self, dotted: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file_of(dotted)}: key '{dotted}': {message}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping) or tp is Mapping:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, dotted: str, ctx: _Context) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``dotted``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error (an unknown key deep inside) is the message
            return _convert(candidates[0], value, dotted, ctx)
        for arg in candidates:
            try:
                return _convert(arg, value, dotted, ctx)
            except ConfigError:
                continue
        raise ctx.error(dotted, f"must be {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ctx.error(dotted, f"must be {_type_name(tp)}, got {value!r}.")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ctx.error(dotted, f"must be {_type_name(tp)}, got {value!r}.")
        if args and args[-1] is not Ellipsis and len(args) > 1:  # fixed-length tuple
            if len(value) != len(args):
                raise ctx.error(dotted, f"must be a list of {len(args)} values, got {value!r}.")
            return tuple(_convert(a, v, f"{dotted}.{i}", ctx) for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, f"{dotted}.{i}", ctx) for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is Mapping:
        if not isinstance(value, dict):
            raise ctx.error(dotted, f"must be a mapping, got {value!r}.")
        return dict(value)
    if tp in (StepCfg, LossCfg):
        return _convert_step(tp, value, dotted, ctx)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, dotted, ctx)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(dotted, f"must be a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(dotted, f"must be an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(dotted, f"must be true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ctx.error(dotted, f"must be a string, got {value!r}.")
        return value
    raise TypeError(f"config schema has an unsupported type {tp!r} at {dotted}")  # a bug in detkd, not the recipe


def _convert_dataclass(cls: type, value: Any, dotted: str, ctx: _Context) -> Any:
    if not isinstance(value, dict):
        raise ctx.error(dotted or "<top level>", f"must be a mapping with keys {_field_names(cls)}, got {value!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            where = f"under '{dotted}'" if dotted else "at the top level"
            raise ctx.error(_join(dotted, key), f"unknown key; accepted keys {where}: {_field_names(cls)}.")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], _join(dotted, name), ctx)
            _check_range(cls, name, kwargs[name], _join(dotted, name), ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"{ctx.file_of(dotted)}: missing required key '{_join(dotted, name)}' "
                f"(keys under '{dotted or '<top level>'}': {_field_names(cls)})."
            )
    return cls(**kwargs)


def _convert_step(cls: type, value: Any, dotted: str, ctx: _Context) -> Any:
    """A step mapping ``{type: name, **params}``; params are checked against the registered constructor."""
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or "type" not in value:
        raise ctx.error(dotted, f"must be a mapping with a 'type' key, got {value!r}.")
    own = {f.name for f in dataclasses.fields(cls)} - {"params"}
    fixed = {k: v for k, v in value.items() if k in own}
    params = {k: v for k, v in value.items() if k not in own}
    step = _convert_dataclass(cls, fixed, dotted, ctx)
    registry, kind = _registry_for(dotted)
    if registry is None:
        return dataclasses.replace(step, params=params)
    if step.type not in registry:
        raise ctx.error(f"{dotted}.type", f"unknown {kind} '{step.type}'; valid: {', '.join(sorted(registry))}.")
    checked = validate_params(registry[step.type], params, f"{dotted}", ctx, own)
    return dataclasses.replace(step, params=checked)


def validate_params(fn: Callable, params: Mapping[str, Any], dotted: str, ctx: _Context, reserved=()) -> dict:
    """Check ``params`` against the annotated keyword arguments of ``fn`` (a class or a function)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    hints = typing.get_type_hints(target)
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]
    out = {}
    for key, val in params.items():
        if key not in accepted:
            names = ", ".join(sorted(set(accepted) | set(reserved)))
            raise ctx.error(_join(dotted, key), f"unknown key; accepted keys: {names}.")
        out[key] = _convert(hints.get(key, Any), val, _join(dotted, key), ctx)
    for name in accepted:
        if sig.parameters[name].default is inspect.Parameter.empty and name not in out:
            raise ConfigError(f"{ctx.file_of(dotted)}: missing required key '{_join(dotted, name)}'.")
    return out


def _registry_for(dotted: str) -> tuple[Optional[Mapping[str, Callable]], str]:
    """Which registry validates the step at ``dotted`` (imported lazily: config stays importable on its own)."""
    if dotted.startswith("data.transforms."):
        from detkd.data.transforms import TRANSFORMS

        return TRANSFORMS, "transform"
    if dotted.startswith("distill.features."):
        from detkd.losses import FEATURE_LOSSES

        return FEATURE_LOSSES, "feature loss"
    if dotted.startswith("distill.head."):
        from detkd.losses import HEAD_LOSSES

        return HEAD_LOSSES, "head loss"
    return None, ""


def _check_detectors(cfg: Config, ctx: _Context) -> None:
    """Arch and backbone names must be registered (the registry lives with the builders)."""
    from detkd.models.build import BACKBONES, DETECTORS

    models = [(key, getattr(cfg, key)) for key in ("model", "teacher", "student")]
    models += [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)]
    for key, model in models:
        if model is None:
            continue
        if model.arch not in DETECTORS:
            raise ctx.error(f"{key}.arch", f"unknown detector '{model.arch}'; valid: {', '.join(sorted(DETECTORS))}.")
        if model.backbone not in BACKBONES:
            valid = ", ".join(sorted(BACKBONES))
            raise ctx.error(f"{key}.backbone", f"unknown backbone '{model.backbone}'; valid: {valid}.")
    for key, teacher in [("teacher", cfg.teacher)] + [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)]:
        _check_ema_teacher(teacher, cfg.student, key, ctx)


def _check_ema_teacher(teacher: Optional[TeacherCfg], student: Optional[StudentCfg], key: str, ctx: _Context) -> None:
    """An EMA teacher is an average of the student: the same detector, and nothing to load."""
    if teacher is None or teacher.mode != "ema" or student is None:
        return
    for name in ("arch", "backbone", "fpn_channels", "min_size", "max_size", "anchor_sizes", "norm"):
        if getattr(teacher, name) != getattr(student, name):
            raise ctx.error(
                f"{key}.{name}",
                f"is {getattr(teacher, name)!r} but the student's is {getattr(student, name)!r}; a teacher with mode "
                f"'ema' is an average of the student and must be the same detector.",
            )
    for name in ("checkpoint", "weights", "train_if_missing"):
        if getattr(teacher, name) is not None:
            raise ctx.error(
                f"{key}.{name}", "is set, but a teacher with mode 'ema' starts as a copy of the student: remove it."
            )


_TEACHER_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_ADAPTIVE_TEACHERS = 8  # the adaptive bandit has 2^K - 1 arms (detkd.teachers.weighting)


def _check_teachers(cfg: Config, ctx: _Context) -> None:
    """``teacher`` xor ``teachers``; unique, well-formed names; losses naming known teachers; weighting modes and
    mutual learning that the teachers can serve."""
    if cfg.teacher is not None and cfg.teachers:
        raise ctx.error(
            "teachers",
            "is given together with 'teacher'. 'teacher:' is the one-teacher shorthand of 'teachers:'; give one of "
            "them (to use several teachers, move the 'teacher:' entry into the 'teachers:' list with a name and a "
            "weight).",
        )
    seen: dict[str, int] = {}
    for i, t in enumerate(cfg.teachers):
        if not t.name or set(t.name) - _TEACHER_NAME_CHARS:
            raise ctx.error(
                f"teachers.{i}.name",
                f"must be letters, digits, '_' or '-' (it names the log terms distill/<loss>/<name>/...), got "
                f"{t.name!r}.",
            )
        if t.name in seen:
            raise ctx.error(
                f"teachers.{i}.name",
                f"'{t.name}' is also the name of teachers.{seen[t.name]}; every teacher needs its own name.",
            )
        seen[t.name] = i
    entries = teacher_entries(cfg)
    names = [name for name, _, _, _ in entries]
    if entries and sum(w for _, _, _, w in entries) <= 0:
        raise ctx.error("teachers", "the teachers' weights sum to 0; give at least one teacher a weight > 0.")
    distill = cfg.distill
    if distill is None:
        return
    for section in ("features", "head"):
        for i, loss in enumerate(getattr(distill, section)):
            if loss.teachers is None:
                continue
            key = f"distill.{section}.{i}.teachers"
            if not loss.teachers:
                raise ctx.error(key, f"is empty; name at least one of the teachers ({', '.join(names)}) or remove it.")
            unknown = [n for n in loss.teachers if n not in names]
            if unknown:
                raise ctx.error(
                    key,
                    f"names {', '.join(repr(n) for n in unknown)}, which is no teacher of this recipe; the teachers "
                    f"are: {', '.join(names) or 'none'}.",
                )
    mode = distill.teacher_weighting.mode
    if mode != "fixed" and len(entries) < 2:
        raise ctx.error(
            "distill.teacher_weighting.mode",
            f"is '{mode}', which combines several teachers, but the recipe has {len(entries)}; list them under "
            f"'teachers:' or use 'fixed'.",
        )
    if mode == "adaptive" and len(entries) > MAX_ADAPTIVE_TEACHERS:
        raise ctx.error(
            "distill.teacher_weighting.mode",
            f"'adaptive' tries every subset of the teachers and takes at most {MAX_ADAPTIVE_TEACHERS}; the recipe "
            f"has {len(entries)}.",
        )
    online = [key for _, key, t, _ in entries if t.mode == "online"]
    if distill.mutual and not online:
        raise ctx.error(
            "distill.mutual",
            "is true, but no teacher has mode 'online'; deep mutual learning trains a teacher with the student "
            "(set the teacher's mode: online), a frozen or EMA teacher cannot learn.",
        )
    if online and cfg.data.unlabeled is not None:
        raise ctx.error(
            f"{online[0]}.mode",
            "is 'online', but data.unlabeled is set: an online teacher trains on the ground truth, which unlabelled "
            "images do not have.",
        )


def _check_transforms(cfg: Config, ctx: _Context) -> None:
    """Each transform step is built once, so its own checks (e.g. ``p`` in [0, 1]) fail at load, naming the step."""
    from detkd.data.transforms import build_transforms

    for split in ("train", "val"):
        for i, step in enumerate(getattr(cfg.data.transforms, split)):
            try:
                build_transforms([(step.type, dict(step.params))])
            except ValueError as err:
                raise ctx.error(f"data.transforms.{split}.{i}", str(err)) from None


def _check_val_transforms(cfg: Config, ctx: _Context) -> None:
    """Evaluation maps predictions back to file pixels, which needs a val pipeline of fixed geometry."""
    from detkd.data.transforms import scale_of

    steps = [(step.type, dict(step.params)) for step in cfg.data.transforms.val]
    try:
        scale_of(steps, (100, 100))
    except ValueError as err:
        raise ctx.error("data.transforms.val", f"{err} Evaluation needs fixed geometry (resize, letterbox).") from None


# ----------------------------------------------------------------------------------------------------------------
# Numeric ranges, checked at load (a field not listed here is not a number, or every value is meaningful)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """``lo <= x <= hi`` (``<`` on an open end); ``None`` = unbounded. Applies to each item of a list field."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def _at_least(lo: float) -> Range:
    return Range(lo)


_POSITIVE = Range(0, lo_open=True)
_NON_NEGATIVE = Range(0)
_UNIT = Range(0, 1)

# (class name, field) -> valid range; a subclass inherits its bases' ranges (TeacherCfg/StudentCfg from ModelCfg)
RANGES: dict[tuple[str, str], Range] = {
    ("UnlabeledCfg", "ratio"): _POSITIVE,
    ("SyntheticCfg", "num_train"): _at_least(1),
    ("SyntheticCfg", "num_val"): _at_least(1),
    ("SyntheticCfg", "size"): _at_least(16),
    ("SyntheticCfg", "seed"): _NON_NEGATIVE,
    ("SyntheticCfg", "min_object_size"): _at_least(2),
    ("SyntheticCfg", "clutter"): _NON_NEGATIVE,
    ("TransformsCfg", "min_visibility"): _UNIT,
    ("DataCfg", "batch_size"): _at_least(1),
    ("DataCfg", "num_workers"): _NON_NEGATIVE,
    ("ModelCfg", "fpn_channels"): _at_least(1),
    ("ModelCfg", "min_size"): _at_least(16),
    ("ModelCfg", "max_size"): _at_least(16),
    ("ModelCfg", "score_thresh"): _UNIT,
    ("ModelCfg", "nms_thresh"): _UNIT,
    ("ModelCfg", "detections_per_img"): _at_least(1),
    ("ModelCfg", "anchor_sizes"): _at_least(1),
    ("LossCfg", "weight"): _NON_NEGATIVE,
    ("LossCfg", "target_ratio"): _POSITIVE,
    ("KDScheduleCfg", "warmup_iters"): _NON_NEGATIVE,
    ("KDScheduleCfg", "final_ratio"): _NON_NEGATIVE,
    ("KDScheduleCfg", "stop_at"): Range(0, 1, lo_open=True),
    ("DistillCfg", "calibration_iters"): _at_least(1),
    ("TeacherCfg", "momentum"): Range(0, 1, hi_open=True),
    ("TeacherCfg", "lr_mult"): _POSITIVE,
    ("NamedTeacherCfg", "weight"): _NON_NEGATIVE,
    ("TeacherWeightingCfg", "temperature"): _POSITIVE,
    ("TeacherWeightingCfg", "interval"): _at_least(1),
    ("TeacherWeightingCfg", "holdout_images"): _at_least(1),
    ("TeacherWeightingCfg", "gamma"): Range(0, 1, lo_open=True),
    ("TeacherWeightingCfg", "reward_scale"): _POSITIVE,
    ("PseudoFusionCfg", "iou"): _UNIT,
    ("TeacherCheckCfg", "num_images"): _at_least(1),
    ("TeacherCheckCfg", "min_ap"): _UNIT,
    ("OptimizerCfg", "lr"): _POSITIVE,
    ("OptimizerCfg", "momentum"): Range(0, 1, hi_open=True),
    ("OptimizerCfg", "weight_decay"): _NON_NEGATIVE,
    ("OptimizerCfg", "betas"): Range(0, 1, hi_open=True),
    ("ScheduleCfg", "milestones"): _at_least(1),
    ("ScheduleCfg", "gamma"): _POSITIVE,
    ("ScheduleCfg", "min_lr_ratio"): _UNIT,
    ("TrainCfg", "epochs"): _at_least(1),
    ("TrainCfg", "warmup_iters"): _NON_NEGATIVE,
    ("TrainCfg", "warmup_factor"): Range(0, 1, lo_open=True),
    ("TrainCfg", "grad_clip"): _POSITIVE,
    ("TrainCfg", "seed"): _NON_NEGATIVE,
    ("TrainCfg", "max_iters"): _at_least(1),
    ("TrainCfg", "log_interval"): _at_least(1),
    ("EvalCfg", "interval"): _NON_NEGATIVE,
    ("EvalCfg", "max_images"): _at_least(1),
    ("EvalCfg", "batch_size"): _at_least(1),
    ("CheckpointCfg", "interval"): _NON_NEGATIVE,
    ("LogCfg", "mask_images_every"): _at_least(1),
    ("ReportCfg", "mask_images"): _NON_NEGATIVE,
}


def _range_of(cls: type, name: str) -> Optional[Range]:
    for klass in cls.__mro__:
        found = RANGES.get((klass.__name__, name))
        if found is not None:
            return found
    return None


def _check_range(cls: type, name: str, value: Any, dotted: str, ctx: _Context) -> None:
    valid = _range_of(cls, name)
    if valid is None or value is None:
        return
    items = list(enumerate(value)) if isinstance(value, tuple) else [(None, value)]
    for i, x in items:
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not valid.contains(x):
            key = dotted if i is None else f"{dotted}.{i}"
            raise ctx.error(key, f"must be {valid}, got {x!r}.")


def describe_ranges() -> list[tuple[str, str]]:
    """``(dotted key, range)`` for every range-checked field (the README's table), in schema order."""
    sections = {
        "data.unlabeled": UnlabeledCfg, "data.synthetic": SyntheticCfg, "data.transforms": TransformsCfg,
        "data": DataCfg, "model / teacher / student": ModelCfg, "teacher / teachers[]": TeacherCfg,
        "teachers[]": NamedTeacherCfg, "distill.features[] / distill.head[]": LossCfg,
        "distill.teacher_check": TeacherCheckCfg, "distill.schedule": KDScheduleCfg,
        "distill.teacher_weighting": TeacherWeightingCfg, "distill.pseudo_label_fusion": PseudoFusionCfg,
        "distill": DistillCfg, "train.optimizer": OptimizerCfg, "train.schedule": ScheduleCfg,
        "train": TrainCfg, "eval": EvalCfg, "checkpoint": CheckpointCfg, "log": LogCfg, "report": ReportCfg,
    }  # fmt: skip
    rows = []
    for prefix, cls in sections.items():
        # a field a listed base class already has is in that base's rows (TeacherCfg's fpn_channels is ModelCfg's)
        inherited = {f.name for base in sections.values() if base is not cls and issubclass(cls, base)
                     for f in dataclasses.fields(base)}  # fmt: skip
        for f in dataclasses.fields(cls):
            if f.name in inherited:
                continue
            valid = _range_of(cls, f.name)
            if valid is not None:
                rows.append((f"{prefix}.{f.name}", str(valid)))
    return rows


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))
