"""The runs behind ``tools/train.py`` and ``tools/eval.py``: config in, trained/evaluated detector out."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch

from detkd.config import Config, config_from_dict, config_to_dict
from detkd.data.build import build_dataset, build_eval_loader, ensure_data
from detkd.data.coco import CocoDetection, collate_detection
from detkd.engine.checkpoint import load_checkpoint, load_detector_weights, remove_stale_temporaries, unwrap
from detkd.engine.evaluator import evaluate, format_metrics_table, save_metrics
from detkd.engine.trainer import (
    Trainer,
    barrier,
    init_distributed,
    is_main_process,
    make_train_loader,
    resolve_device,
    seed_everything,
)
from detkd.errors import CheckpointNotFoundError, ConfigError, DetkdError, RunError
from detkd.models.build import build_detector_from_cfg

LOGGER = logging.getLogger("detkd")


def resolve_work_dir(cfg: Config, override: Optional[str] = None) -> Path:
    """``--work-dir`` wins, then ``work_dir`` in the recipe, then ``work_dirs/<recipe name>``."""
    return Path(override or cfg.work_dir or f"work_dirs/{cfg.name}")


def setup_process(cfg: Config) -> torch.device:
    """Device, process group (under torchrun) and seeds for this process."""
    device = resolve_device(cfg.train.device)
    rank, _ = init_distributed(device)
    seed_everything(cfg.train.seed + rank)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # the console shows warnings; progress lines go to train.log
        handler.setLevel(logging.WARNING)
    return device


def make_evaluate_fn(
    cfg: Config, model: torch.nn.Module, val_set: CocoDetection, device: torch.device, work_dir: Path, show: bool
):
    """``evaluate_fn(epoch)`` for the trainer: COCO metrics of ``model`` on the val split, written to work_dir."""
    loader = build_eval_loader(
        val_set, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.num_workers, cfg.eval.max_images
    )

    def evaluate_fn(epoch: int) -> dict[str, Any]:
        metrics = evaluate(unwrap(model), loader, val_set, device, progress=show)
        save_metrics(metrics, work_dir / f"val_epoch{epoch + 1}.json")
        if show:
            print(format_metrics_table(metrics, title=f"val after epoch {epoch + 1}"))
        return metrics

    return evaluate_fn


# ----------------------------------------------------------------------------------------------------------------
# The work dir: one run per folder, resumed or overwritten only when asked
# ----------------------------------------------------------------------------------------------------------------

RUN_MARKERS = ("last.pth", "best.pth", "student_best.pth")  # a folder holding one of these holds a run
RUN_FILES = (*RUN_MARKERS, "metrics.jsonl", "train.log", "config.yaml", "student_init.pth")
RUN_GLOBS = ("val_epoch*.json",)
RUN_DIRS = ("tensorboard", "baseline", "mask_vis")

# keys that may change on --resume (prefixes of dotted keys): the length of the run, logging, evaluation, reports;
# any other change would make the resumed run silently differ from the one its checkpoint continues
RESUME_SAFE_KEYS = (
    "train.epochs",
    "train.max_iters",
    "train.log_interval",
    "train.find_unused_parameters",
    "eval",
    "checkpoint",
    "log",
    "report",
    "data.num_workers",
    "distill.teacher_check",
    "teacher.train_if_missing",
    "teacher.train_opts",
    "work_dir",
    "name",
)


def _rank0() -> bool:
    """Rank 0 of the job (before the process group exists, from torchrun's environment)."""
    return int(os.environ.get("RANK", "0")) == 0


def split_resume_mode(resume: Union[bool, str], overwrite: bool) -> tuple[bool, bool]:
    """``(resume, overwrite)`` from the tools' ``--resume`` / ``--overwrite`` (which share ``args.resume``: the
    latter stores ``"overwrite"``; see :func:`detkd.cli.train_parser`)."""
    if resume == "overwrite":
        return False, True
    return bool(resume), bool(overwrite)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` of every leaf that differs (``<absent>`` where one side lacks it)."""
    a, b = _flatten(old), _flatten(new)
    absent = "<absent>"
    return {
        k: (a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)
    }


def _safe_on_resume(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUME_SAFE_KEYS)


def check_resume(cfg: Config, out: Path) -> dict[str, tuple[Any, Any]]:
    """Compare the recipe with the resolved config stored in ``out/last.pth`` before anything is written.

    Returns the changed keys that may change on resume (:data:`RESUME_SAFE_KEYS`), printed and recorded in
    ``metrics.jsonl`` as a ``"resume"`` record. Raises :class:`RunError` listing the other changed keys.
    """
    last = out / "last.pth"
    if not last.is_file():
        return {}
    stored = load_checkpoint(last, mmap=True).get("config")
    if not isinstance(stored, dict):
        return {}
    try:  # the stored config with today's defaults filled in: a key added to detkd since is not a change
        stored = config_to_dict(config_from_dict(stored, source=str(last)))
    except ConfigError:
        pass  # a config this version cannot read: compare it as stored, key by key
    diff = config_diff(stored, config_to_dict(cfg))
    refused = {k: v for k, v in diff.items() if not _safe_on_resume(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise RunError(
            f"--resume: the recipe differs from the run in {out} (the config stored in {last}) in "
            f"{len(refused)} key(s) that cannot change in the middle of a run: {listed}. Resume with the recipe "
            f"the run started with ({out / 'config.yaml'}), or start over with --overwrite. Keys that may change "
            f"on resume: {', '.join(RESUME_SAFE_KEYS)}."
        )
    if diff and _rank0():
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        print(f"--resume: recipe changes against {last}: {changes}")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            record = {
                "type": "resume",
                "time": round(time.time(), 3),
                "changed": {k: [o, n] for k, (o, n) in diff.items()},
            }
            f.write(json.dumps(record, default=str) + "\n")
    return diff


def _run_summary(out: Path) -> str:
    """What the run in ``out`` is: finished or interrupted, from its last.pth."""
    last = out / "last.pth"
    if not last.is_file():
        return "a run"
    try:
        ckpt = load_checkpoint(last, mmap=True)
        run, train = ckpt["run"], ckpt["config"]["train"]
        done = run["epoch"] >= train["epochs"] or (train.get("max_iters") and run["iteration"] >= train["max_iters"])
    except (DetkdError, KeyError, TypeError):
        return "a run (its last.pth is unreadable)"
    state = "finished" if done else "interrupted"
    return f"a {state} run (epoch {run['epoch']}/{train['epochs']}, iteration {run['iteration']})"


def clear_run(out: Path) -> list[Path]:
    """Delete the files a run writes into ``out`` (checkpoints, logs, TensorBoard events, eval json, the baseline
    sub-run); nothing else in the folder is touched. Returns what was deleted."""
    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(out / name)
    for pattern in RUN_GLOBS:
        for path in out.glob(pattern):
            path.unlink()
            removed.append(path)
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            removed.append(out / name)
    return removed


def check_work_dir(cfg: Config, out: Path, resume: bool, overwrite: bool) -> None:
    """Before a run touches ``out``: it must not be a file; leftover temporary files of killed checkpoint writes
    are removed; a folder that holds a run is only resumed (``--resume``, after :func:`check_resume`) or
    overwritten (``--overwrite``) when asked."""
    if out.exists() and not out.is_dir():
        raise RunError(f"the work dir {out} is an existing file, not a folder; pass another --work-dir.")
    if _rank0():
        removed = remove_stale_temporaries(out)
        if removed:
            size = sum(n for _, n in removed) / 2**20
            names = ", ".join(p.name for p, _ in removed)
            print(
                f"removed {len(removed)} leftover temporary file(s) of an interrupted write in {out}: {names} "
                f"({size:.1f} MB)"
            )
    held = [name for name in RUN_MARKERS if (out / name).is_file()]
    if resume:
        check_resume(cfg, out)
    elif overwrite:
        if held and _rank0():
            clear_run(out)
            print(f"--overwrite: deleted the previous run in {out}")
    elif held:
        raise RunError(
            f"the work dir {out} already holds {_run_summary(out)} ({', '.join(held)}). Continue it with --resume, "
            f"start over with --overwrite (deletes its checkpoints and logs), or pass another --work-dir."
        )


@contextlib.contextmanager
def recipe_errors(cfg: Config) -> Iterator[None]:
    """Building models and losses from a validated recipe: a ``ValueError`` raised there is a recipe problem (an
    unsupported pair, an option a family lacks) and becomes a :class:`ConfigError` naming the recipe."""
    try:
        yield
    except DetkdError:
        raise
    except ValueError as err:
        raise ConfigError(f"recipe '{cfg.name}': {err}") from err


def prepare_run(
    cfg: Config, work_dir: Optional[str], show_progress: bool, resume: bool = False, overwrite: bool = False
):
    """What every run starts with: the work-dir checks (:func:`check_work_dir`), device/process group/seeds, the
    data (generated if the recipe names a synthetic set that is absent) and the train/val datasets. Returns
    ``(work_dir, device, train_set, val_set)``."""
    out = resolve_work_dir(cfg, work_dir)
    check_work_dir(cfg, out, resume, overwrite)
    device = setup_process(cfg)
    if is_main_process():
        ensure_data(cfg.data, show_progress)
    barrier()
    train_set = build_dataset(cfg.data, "train", seed=cfg.train.seed)
    val_set = build_dataset(cfg.data, "val", seed=cfg.train.seed)
    return out, device, train_set, val_set


def train_detector(
    cfg: Config,
    work_dir: Optional[str] = None,
    resume: Union[bool, str] = False,
    show_progress: bool = True,
    stop_after_epochs: Optional[int] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the single detector of ``cfg.model`` (a teacher or a baseline student). Returns a summary dict with
    ``best_ap``, ``best_checkpoint``, ``wall_time_s`` and the run ``history``. ``resume``/``overwrite``: what to do
    with a run already in the work dir (:func:`check_work_dir`)."""
    resume, overwrite = split_resume_mode(resume, overwrite)
    if cfg.model is None:
        raise ConfigError(
            f"recipe '{cfg.name}' has no 'model' section; tools/train.py trains one detector described under "
            f"'model:' (distillation recipes with teacher/student go to tools/train_distill.py)."
        )
    out, device, train_set, val_set = prepare_run(cfg, work_dir, show_progress, resume, overwrite)
    with recipe_errors(cfg):
        model = build_detector_from_cfg(cfg.model, train_set.num_classes)
    loader = make_train_loader(train_set, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed, collate_detection)
    show = show_progress and is_main_process()
    trainer = Trainer(
        cfg,
        model,
        loader,
        device,
        out,
        evaluate_fn=make_evaluate_fn(cfg, model, val_set, device, out, show),
        export_fn=lambda: {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        best_name="best.pth",
        show_progress=show_progress,
    )
    if resume:
        trainer.resume()
    start = time.time()
    state = trainer.fit(stop_after_epochs=stop_after_epochs)
    return {
        "best_ap": state.best_ap,
        "best_epoch": state.best_epoch,
        "best_checkpoint": str(out / "best.pth"),
        "last_checkpoint": str(out / "last.pth"),
        "wall_time_s": time.time() - start,
        "iterations": state.iteration,
        "history": state.history,
        "model": unwrap(trainer.model),
    }


def evaluate_detector_checkpoint(
    cfg: Config, ckpt: str, out_dir: Optional[str] = None, model_key: str = "model", show_progress: bool = True
) -> dict[str, Any]:
    """COCO-evaluate a saved detector on the val split; writes ``results.json`` and ``metrics.json``."""
    model_cfg = cfg.model if model_key == "model" else getattr(cfg, model_key)
    if model_cfg is None:
        raise ConfigError(f"recipe '{cfg.name}' has no '{model_key}' section to evaluate.")
    out = Path(out_dir) if out_dir else Path(ckpt).parent / f"eval_{Path(ckpt).stem}"
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is an existing file, not a folder; pass another --out.")
    device = resolve_device(cfg.train.device)
    load_checkpoint(ckpt, mmap=True)  # a bad --ckpt fails before the data is built
    ensure_data(cfg.data, show_progress)
    val_set = build_dataset(cfg.data, "val", seed=cfg.train.seed)
    with recipe_errors(cfg):
        model = build_detector_from_cfg(model_cfg, val_set.num_classes)
    load_detector_weights(model, ckpt)
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    loader = build_eval_loader(val_set, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.num_workers)
    metrics = evaluate(model, loader, val_set, device, results_file=str(out / "results.json"), progress=show_progress)
    save_metrics(metrics, out / "metrics.json")
    return metrics


def ensure_teacher(cfg: Config, show_progress: bool = True) -> Optional[dict[str, Any]]:
    """Train each teacher with its ``train_if_missing`` when its ``checkpoint`` does not exist yet; returns the
    summary of the first teacher trained (None when every checkpoint existed)."""
    from detkd.config import teacher_entries

    first = None
    for _, key, teacher, _ in teacher_entries(cfg):
        summary = _ensure_one_teacher(teacher, key, show_progress)
        first = first or summary
    return first


def _ensure_one_teacher(teacher, key: str, show_progress: bool) -> Optional[dict[str, Any]]:
    from detkd.config import load_config

    if teacher.checkpoint is None or Path(teacher.checkpoint).is_file():
        return None
    if teacher.train_if_missing is None:
        raise CheckpointNotFoundError(
            f"teacher checkpoint {teacher.checkpoint} does not exist; train it with tools/train.py, or set "
            f"{key}.train_if_missing to the recipe that trains it."
        )
    ckpt = Path(teacher.checkpoint)
    if ckpt.name != "best.pth":
        raise ConfigError(
            f"{key}.train_if_missing trains into the folder of {key}.checkpoint and writes best.pth there; "
            f"name the checkpoint <folder>/best.pth (got {ckpt})."
        )
    teacher_cfg = load_config(teacher.train_if_missing, list(teacher.train_opts))
    model = teacher_cfg.model
    if model is None or (model.arch, model.backbone, model.fpn_channels) != (
        teacher.arch,
        teacher.backbone,
        teacher.fpn_channels,
    ):
        raise ConfigError(
            f"{key}.train_if_missing={teacher.train_if_missing} trains "
            f"{None if model is None else (model.arch, model.backbone, model.fpn_channels)}, but the recipe's "
            f"teacher is {(teacher.arch, teacher.backbone, teacher.fpn_channels)}; they must describe one detector."
        )
    if is_main_process():
        print(f"teacher checkpoint {ckpt} is missing: training it with {teacher.train_if_missing} first")
    resume = (ckpt.parent / "last.pth").is_file()  # a teacher run that was interrupted continues
    summary = train_detector(teacher_cfg, work_dir=str(ckpt.parent), resume=resume, show_progress=show_progress)
    if not ckpt.is_file():
        raise RunError(f"training the teacher with {teacher.train_if_missing} did not produce {ckpt}.")
    return summary


def make_mixed_loader(cfg: Config, train_set: CocoDetection):
    """Labelled batches interleaved with ``data.unlabeled.ratio`` unlabelled batches per labelled batch."""
    import torch.distributed as dist

    from detkd.data.unlabeled import EpochConcatDataset, MixedBatchSampler, UnlabeledImages

    u = cfg.data.unlabeled
    unlabeled = UnlabeledImages(u.img_dir, u.ann_file, transforms=train_set.transforms, seed=cfg.train.seed)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = MixedBatchSampler(
        len(train_set), len(unlabeled), cfg.data.batch_size, u.ratio, cfg.train.seed, rank, world
    )
    return torch.utils.data.DataLoader(
        EpochConcatDataset([train_set, unlabeled]),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_detection,
    )


def check_teacher(
    cfg: Config,
    teacher: torch.nn.Module,
    val_set: CocoDetection,
    device: torch.device,
    show: bool,
    key: str = "teacher",
    teacher_cfg: Any = None,
) -> dict[str, Any]:
    """Evaluate a teacher before distilling; stop when its AP is near zero (a teacher that failed to load).
    ``key``/``teacher_cfg``: which teacher of the recipe it is (``teacher``, or ``teachers.<i>``)."""
    teacher_cfg = teacher_cfg or cfg.teacher
    check = cfg.distill.teacher_check if cfg.distill is not None else None
    num = (check.num_images if check is not None else None) or cfg.eval.max_images
    loader = build_eval_loader(val_set, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.num_workers, num)
    teacher.to(device)
    was_training = teacher.training
    metrics = evaluate(teacher, loader, val_set, device, progress=show)
    teacher.train(was_training)  # an online teacher goes back to training
    if show:
        name = "teacher" if key == "teacher" else f"teacher '{getattr(teacher_cfg, 'name', key)}'"
        print(format_metrics_table(metrics, title=f"{name} ({teacher_cfg.arch}-{teacher_cfg.backbone}) on val"))
    if check is not None and check.enabled and metrics["AP"] < check.min_ap:
        who = "the teacher" if key == "teacher" else f"the teacher '{getattr(teacher_cfg, 'name', key)}' ({key})"
        raise RunError(
            f"{who} scores AP {metrics['AP']:.4f} on {len(loader.dataset)} val images, below "
            f"distill.teacher_check.min_ap={check.min_ap}: it probably did not load ({key}.checkpoint="
            f"{teacher_cfg.checkpoint}) or was trained on other classes. Fix the teacher, or set "
            f"distill.teacher_check.enabled=false to distil anyway."
        )
    return metrics


def check_teachers(
    cfg: Config, distiller: torch.nn.Module, val_set: CocoDetection, device: torch.device, show: bool, out: Path
) -> dict[str, dict[str, Any]]:
    """The sanity check of every teacher that starts trained (frozen ones, and online ones from a checkpoint; an
    EMA teacher starts as the untrained student, by design): ``{name: val metrics}``. Each is written to
    ``teacher_val_<name>.json`` with several teachers; ``teacher_val.json`` (read by tools/diagnose.py) holds the
    one teacher's, or the strongest teacher's."""
    from detkd.config import teacher_entries

    results: dict[str, dict[str, Any]] = {}
    for slot, (name, key, t_cfg, _) in zip(distiller.slots, teacher_entries(cfg)):
        if t_cfg.mode == "ema" or (t_cfg.mode == "online" and t_cfg.checkpoint is None and t_cfg.weights is None):
            continue
        results[name] = check_teacher(cfg, slot.model, val_set, device, show, key, t_cfg)
        if cfg.teachers:
            save_metrics(results[name], out / f"teacher_val_{name}.json")
    if results:
        best = max(results.values(), key=lambda m: m["AP"])
        save_metrics(best, out / "teacher_val.json")
    return results


def holdout_split(cfg: Config, train_set: CocoDetection) -> tuple[list[int], list[int]]:
    """``(training indices, held-out indices)``: the adaptive teacher weighting's held-out slice of the training set
    (``distill.teacher_weighting.holdout_images`` images drawn with ``train.seed``), which is not trained on."""
    num = cfg.distill.teacher_weighting.holdout_images
    if num >= len(train_set):
        raise ConfigError(
            f"recipe '{cfg.name}': distill.teacher_weighting.holdout_images={num} would hold out the whole training "
            f"set of {len(train_set)} images; hold out fewer."
        )
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    held = sorted(order[:num])
    kept = set(held)
    return [i for i in range(len(train_set)) if i not in kept], held


class BanditLog:
    """A trainer callback: appends each round of the adaptive teacher policy (held-out loss, reward of the round
    that ended, the arm drawn, its teachers, the probabilities) to ``<work_dir>/teacher_bandit.jsonl``."""

    def __init__(self, distiller: torch.nn.Module, out_file: Path) -> None:
        self.distiller, self.out_file = distiller, Path(out_file)

    def __call__(self, trainer, iteration: int, values) -> None:
        events, self.distiller.bandit_events[:] = list(self.distiller.bandit_events), []
        if not events:
            return
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_file, "a", encoding="utf-8") as f:
            for event in events:
                f.write(json.dumps({"iteration": iteration, **event}) + "\n")


def train_distill(
    cfg: Config,
    work_dir: Optional[str] = None,
    resume: Union[bool, str] = False,
    show_progress: bool = True,
    stop_after_epochs: Optional[int] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into ``cfg.student`` with the configured losses. Returns a summary with the
    teacher's and the student's AP, the wall time and the paths of ``student_best.pth`` / ``last.pth``.
    ``resume``/``overwrite``: what to do with a run already in the work dir (:func:`check_work_dir`)."""
    from detkd.distiller import build_distiller_from_cfg

    resume, overwrite = split_resume_mode(resume, overwrite)
    out, device, train_set, val_set = prepare_run(cfg, work_dir, show_progress, resume, overwrite)
    teacher_run = ensure_teacher(cfg, show_progress)
    seed_everything(cfg.train.seed)  # the student's initialisation must not depend on whether a teacher was trained
    with recipe_errors(cfg):
        distiller = build_distiller_from_cfg(cfg, train_set.num_classes, train_set.cat_id_to_label)
    if cfg.data.unlabeled is not None and distiller.pseudo_labeler is None:
        raise ConfigError(
            f"recipe '{cfg.name}' sets data.unlabeled but no pseudo_label head loss: unlabelled images can only "
            f"be learned from the teacher's pseudo labels; add {{type: pseudo_label}} under distill.head."
        )
    show = show_progress and is_main_process()
    teachers_metrics: dict[str, dict[str, Any]] = {}
    if is_main_process():
        teachers_metrics = check_teachers(cfg, distiller, val_set, device, show, out)
    first = distiller.slots[0].name
    teacher_metrics = teachers_metrics.get(first, next(iter(teachers_metrics.values()), {}))
    barrier()
    loader_set = train_set
    if distiller.teacher_policy is not None:  # adaptive weighting: a fixed held-out slice of the training set
        kept, held = holdout_split(cfg, train_set)
        holdout = collate_detection([train_set[i] for i in held])
        distiller.set_holdout(*holdout)
        loader_set = torch.utils.data.Subset(train_set, kept)
    if cfg.data.unlabeled is not None:
        loader = make_mixed_loader(cfg, train_set)
    else:
        loader = make_train_loader(
            loader_set, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed, collate_detection
        )
    callbacks = []
    if cfg.log.mask_images_every and is_main_process():
        from detkd.mask_panels import MaskImageCallback  # pure torch (no matplotlib)

        callbacks.append(MaskImageCallback.from_dataset(distiller, val_set, every=cfg.log.mask_images_every))
    if distiller.teacher_policy is not None and is_main_process():
        callbacks.append(BanditLog(distiller, out / "teacher_bandit.jsonl"))
    if distiller.scaler.names and is_main_process():
        from detkd.losses.scaling import AutoWeightReport

        callbacks.append(AutoWeightReport(distiller.scaler, out / "auto_weights.json", show=show))
    if is_main_process():
        from detkd.attention_check import AttentionCheckReport

        callbacks.append(AttentionCheckReport(distiller, out / "attention_check.json", show=show))
    trainer = Trainer(
        cfg,
        distiller,
        loader,
        device,
        out,
        evaluate_fn=make_evaluate_fn(cfg, distiller.student, val_set, device, out, show),
        export_fn=distiller.export_student,
        best_name="student_best.pth",
        iter_callbacks=callbacks,
        show_progress=show_progress,
    )
    init_ckpt = save_student_init(distiller.student, out) if cfg.report.baseline and not resume else None
    if resume:
        trainer.resume()
    start = time.time()
    state = trainer.fit(stop_after_epochs=stop_after_epochs)
    wall_time_s = time.time() - start
    best = next((r for r in state.history if r.get("epoch") == state.best_epoch), {})
    baseline = None
    if cfg.report.baseline and stop_after_epochs is None:
        baseline = train_baseline_student(cfg, out, init_ckpt or out / STUDENT_INIT, resume, show_progress)
    summary = {
        "teacher_train_s": teacher_run["wall_time_s"] if teacher_run else None,
        "student_metrics": {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("val/")},
        "teacher_ap": teacher_metrics.get("AP", float("nan")),
        "teacher_metrics": teacher_metrics,
        "teachers_metrics": teachers_metrics,
        "best_ap": state.best_ap,
        "best_epoch": state.best_epoch,
        "best_checkpoint": str(out / "student_best.pth"),
        "last_checkpoint": str(out / "last.pth"),
        "wall_time_s": wall_time_s,
        "iterations": state.iteration,
        "history": state.history,
        "distiller": distiller,
        "baseline": baseline,
    }
    if is_main_process():
        summary["cost"] = measure_run_costs(cfg, summary, val_set[0][0])
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The end of train_distill: the baseline student and the compression report
# ----------------------------------------------------------------------------------------------------------------

STUDENT_INIT = "student_init.pth"
LATENCY_THREADS = 1  # the final table's latency: one thread, so it does not depend on how busy the other core is


def save_student_init(student: torch.nn.Module, out: Path) -> Path:
    """The distilled student's initial weights, so that the baseline starts from exactly the same ones."""
    path = out / STUDENT_INIT
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu().clone() for k, v in unwrap(student).state_dict().items()}, path)
    barrier()
    return path


def baseline_config(cfg: Config, out: Path, init_ckpt: Path) -> Config:
    """The recipe of the baseline row: the student alone, from the distilled student's initial weights, on the same
    data, schedule and seed; no teacher, no distillation, no unlabelled images; trained into ``<out>/baseline``."""
    import dataclasses

    model = dataclasses.replace(cfg.student, checkpoint=str(init_ckpt))
    return dataclasses.replace(
        cfg,
        model=model,
        teacher=None,
        student=None,
        distill=None,
        data=dataclasses.replace(cfg.data, unlabeled=None),
        log=dataclasses.replace(cfg.log, mask_images_every=None),
        report=dataclasses.replace(cfg.report, baseline=False, mask_images=0),
        work_dir=str(out / "baseline"),
        name=f"{cfg.name}_baseline",
    )


def train_baseline_student(
    cfg: Config, out: Path, init_ckpt: Path, resume: bool, show_progress: bool
) -> dict[str, Any]:
    """Train the baseline student (:func:`baseline_config`); returns the :func:`train_detector` summary plus
    ``metrics`` (the val metrics of its best epoch, chosen as for the distilled student)."""
    if cfg.student.init != "scratch":
        raise ValueError(
            f"recipe '{cfg.name}': report.baseline trains the student from the distilled student's initial weights, "
            f"which needs student.init: scratch (got '{cfg.student.init}')."
        )
    if not Path(init_ckpt).is_file():
        raise FileNotFoundError(f"{init_ckpt} (the student's initial weights for the baseline run) does not exist.")
    if is_main_process() and show_progress:
        print("training the baseline student (same schedule, no distillation)")
    base = baseline_config(cfg, out, Path(init_ckpt))
    resume = resume and (out / "baseline" / "last.pth").is_file()
    summary = train_detector(base, work_dir=base.work_dir, resume=resume, show_progress=show_progress)
    best = next((r for r in summary["history"] if r.get("epoch") == summary["best_epoch"]), {})
    summary["metrics"] = {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("val/")}
    return summary


def measure_run_costs(cfg: Config, summary: dict[str, Any], image: torch.Tensor) -> list:
    """Cost rows (:class:`detkd.cost.ModelCost`) of the teacher, the baseline student (when trained) and the
    distilled student, with their val metrics; latency on ``image`` with :data:`LATENCY_THREADS` thread(s)."""
    from detkd.config import teacher_entries
    from detkd.cost import measure_cost

    distiller = summary["distiller"]
    named = bool(cfg.teachers)
    models = [
        ("teacher" if not named else f"teacher {name}", unwrap(slot.model), summary["teachers_metrics"].get(name, {}),
         t_cfg)
        for slot, (name, _, t_cfg, _) in zip(distiller.slots, teacher_entries(cfg))
    ]  # fmt: skip
    if summary.get("baseline") is not None:
        base = summary["baseline"]
        models.append(("student (baseline)", unwrap(base["model"]), base["metrics"], cfg.student))
    models.append(("student (distilled)", unwrap(distiller.student), summary["student_metrics"], cfg.student))
    rows = []
    for name, model, metrics, model_cfg in models:
        device = next(model.parameters()).device
        arch = f"{model_cfg.arch} {model_cfg.backbone} FPN{model_cfg.fpn_channels}"
        rows.append(measure_cost(name, model, image, metrics, runs=20, warmup=3, threads=LATENCY_THREADS, arch=arch))
        model.to(device)
    return rows


def format_final_table(summary: dict[str, Any]) -> str:
    """The table ``train_distill.py`` ends with: teacher, baseline student (``report.baseline``) and distilled
    student with AP, AP50, params, GFLOPs, latency and train time, then the headline ratios (:mod:`detkd.cost`)."""
    from detkd.cost import format_cost_table, headline

    rows = summary["cost"]
    times = {rows[0].name: summary.get("teacher_train_s"), "student (distilled)": summary["wall_time_s"]}
    if summary.get("baseline") is not None:
        times["student (baseline)"] = summary["baseline"]["wall_time_s"]
    wall = ["(given)" if times.get(r.name) is None else f"{times[r.name] / 60:.1f} min" for r in rows]
    lines = [format_cost_table(rows, extra=[("train time", wall), ("detector", [r.arch for r in rows])]), ""]
    teacher = rows[0]  # with several teachers, the headline compares with the first
    students = [r for r in rows if r.name.startswith("student")]
    for row in students[::-1]:  # the distilled student first
        lines.append(f"{row.name}: {headline(teacher, row)}")
    if len(students) == 2 and students[0].ap is not None and students[1].ap is not None:
        gain = 100 * (students[1].ap - students[0].ap)
        lines.append(f"distillation adds {gain:+.1f} AP over the baseline student at the same schedule")
    return "\n".join(lines)
