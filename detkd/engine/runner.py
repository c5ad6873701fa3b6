"""The runs behind ``tools/train.py`` and ``tools/eval.py``: config in, trained/evaluated detector out."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from detkd.config import Config
from detkd.data.build import build_dataset, build_eval_loader, ensure_data
from detkd.data.coco import CocoDetection, collate_detection
from detkd.engine.checkpoint import load_checkpoint, unwrap
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


def prepare_run(cfg: Config, work_dir: Optional[str], show_progress: bool):
    """What every run starts with: work dir, device/process group/seeds, the data (generated if the recipe names a
    synthetic set that is absent) and the train/val datasets. Returns ``(work_dir, device, train_set, val_set)``."""
    out = resolve_work_dir(cfg, work_dir)
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
    resume: bool = False,
    show_progress: bool = True,
    stop_after_epochs: Optional[int] = None,
) -> dict[str, Any]:
    """Train the single detector of ``cfg.model`` (a teacher or a baseline student). Returns a summary dict with
    ``best_ap``, ``best_checkpoint``, ``wall_time_s`` and the run ``history``."""
    if cfg.model is None:
        raise ValueError(
            f"recipe '{cfg.name}' has no 'model' section; tools/train.py trains one detector described under "
            f"'model:' (distillation recipes with teacher/student go to tools/train_distill.py)."
        )
    out, device, train_set, val_set = prepare_run(cfg, work_dir, show_progress)
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
        raise ValueError(f"recipe '{cfg.name}' has no '{model_key}' section to evaluate.")
    device = resolve_device(cfg.train.device)
    ensure_data(cfg.data, show_progress)
    val_set = build_dataset(cfg.data, "val", seed=cfg.train.seed)
    model = build_detector_from_cfg(model_cfg, val_set.num_classes)
    state = load_checkpoint(ckpt)
    model.load_state_dict(state["model"] if "model" in state else state)
    model.to(device)
    out = Path(out_dir) if out_dir else Path(ckpt).parent / f"eval_{Path(ckpt).stem}"
    out.mkdir(parents=True, exist_ok=True)
    loader = build_eval_loader(val_set, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.num_workers)
    metrics = evaluate(model, loader, val_set, device, results_file=str(out / "results.json"), progress=show_progress)
    save_metrics(metrics, out / "metrics.json")
    return metrics


def ensure_teacher(cfg: Config, show_progress: bool = True) -> Optional[dict[str, Any]]:
    """Train the teacher with ``teacher.train_if_missing`` when ``teacher.checkpoint`` does not exist yet."""
    from detkd.config import load_config

    teacher = cfg.teacher
    if teacher is None or teacher.checkpoint is None or Path(teacher.checkpoint).is_file():
        return None
    if teacher.train_if_missing is None:
        raise FileNotFoundError(
            f"teacher checkpoint {teacher.checkpoint} does not exist; train it with tools/train.py, or set "
            f"teacher.train_if_missing to the recipe that trains it."
        )
    ckpt = Path(teacher.checkpoint)
    if ckpt.name != "best.pth":
        raise ValueError(
            f"teacher.train_if_missing trains into the folder of teacher.checkpoint and writes best.pth there; "
            f"name the checkpoint <folder>/best.pth (got {ckpt})."
        )
    teacher_cfg = load_config(teacher.train_if_missing, list(teacher.train_opts))
    model = teacher_cfg.model
    if model is None or (model.arch, model.backbone, model.fpn_channels) != (
        teacher.arch,
        teacher.backbone,
        teacher.fpn_channels,
    ):
        raise ValueError(
            f"teacher.train_if_missing={teacher.train_if_missing} trains "
            f"{None if model is None else (model.arch, model.backbone, model.fpn_channels)}, but the recipe's "
            f"teacher is {(teacher.arch, teacher.backbone, teacher.fpn_channels)}; they must describe one detector."
        )
    if is_main_process():
        print(f"teacher checkpoint {ckpt} is missing: training it with {teacher.train_if_missing} first")
    summary = train_detector(teacher_cfg, work_dir=str(ckpt.parent), show_progress=show_progress)
    if not ckpt.is_file():
        raise RuntimeError(f"training the teacher with {teacher.train_if_missing} did not produce {ckpt}.")
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
    cfg: Config, teacher: torch.nn.Module, val_set: CocoDetection, device: torch.device, show: bool
) -> dict[str, Any]:
    """Evaluate the teacher before distilling; stop when its AP is near zero (a teacher that failed to load)."""
    check = cfg.distill.teacher_check if cfg.distill is not None else None
    num = (check.num_images if check is not None else None) or cfg.eval.max_images
    loader = build_eval_loader(val_set, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.num_workers, num)
    teacher.to(device)
    metrics = evaluate(teacher, loader, val_set, device, progress=show)
    if show:
        print(format_metrics_table(metrics, title=f"teacher ({cfg.teacher.arch}-{cfg.teacher.backbone}) on val"))
    if check is not None and check.enabled and metrics["AP"] < check.min_ap:
        raise RuntimeError(
            f"the teacher scores AP {metrics['AP']:.4f} on {len(loader.dataset)} val images, below "
            f"distill.teacher_check.min_ap={check.min_ap}: it probably did not load (teacher.checkpoint="
            f"{cfg.teacher.checkpoint}) or was trained on other classes. Fix the teacher, or set "
            f"distill.teacher_check.enabled=false to distil anyway."
        )
    return metrics


def train_distill(
    cfg: Config,
    work_dir: Optional[str] = None,
    resume: bool = False,
    show_progress: bool = True,
    stop_after_epochs: Optional[int] = None,
) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into ``cfg.student`` with the configured losses. Returns a summary with the
    teacher's and the student's AP, the wall time and the paths of ``student_best.pth`` / ``last.pth``."""
    from detkd.distiller import build_distiller_from_cfg

    out, device, train_set, val_set = prepare_run(cfg, work_dir, show_progress)
    teacher_run = ensure_teacher(cfg, show_progress)
    seed_everything(cfg.train.seed)  # the student's initialisation must not depend on whether a teacher was trained
    distiller = build_distiller_from_cfg(cfg, train_set.num_classes, train_set.cat_id_to_label)
    if cfg.data.unlabeled is not None and distiller.pseudo_labeler is None:
        raise ValueError(
            f"recipe '{cfg.name}' sets data.unlabeled but no pseudo_label head loss: unlabelled images can only "
            f"be learned from the teacher's pseudo labels; add {{type: pseudo_label}} under distill.head."
        )
    show = show_progress and is_main_process()
    teacher_metrics = {}
    if is_main_process():
        teacher_metrics = check_teacher(cfg, distiller.teacher, val_set, device, show)
    barrier()
    if cfg.data.unlabeled is not None:
        loader = make_mixed_loader(cfg, train_set)
    else:
        loader = make_train_loader(
            train_set, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed, collate_detection
        )
    callbacks = []
    if cfg.log.mask_images_every and is_main_process():
        from detkd.mask_panels import MaskImageCallback  # pure torch (no matplotlib)

        callbacks.append(MaskImageCallback.from_dataset(distiller, val_set, every=cfg.log.mask_images_every))
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
    from detkd.cost import measure_cost

    distiller = summary["distiller"]
    models = [("teacher", unwrap(distiller.teacher), summary["teacher_metrics"], cfg.teacher)]
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
    times = {"teacher": summary.get("teacher_train_s"), "student (distilled)": summary["wall_time_s"]}
    if summary.get("baseline") is not None:
        times["student (baseline)"] = summary["baseline"]["wall_time_s"]
    wall = ["(given)" if times.get(r.name) is None else f"{times[r.name] / 60:.1f} min" for r in rows]
    lines = [format_cost_table(rows, extra=[("train time", wall), ("detector", [r.arch for r in rows])]), ""]
    teacher, students = rows[0], rows[1:]
    for row in students[::-1]:  # the distilled student first
        lines.append(f"{row.name}: {headline(teacher, row)}")
    if len(students) == 2 and students[0].ap is not None and students[1].ap is not None:
        gain = 100 * (students[1].ap - students[0].ap)
        lines.append(f"distillation adds {gain:+.1f} AP over the baseline student at the same schedule")
    return "\n".join(lines)
