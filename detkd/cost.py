"""What a student saves: parameters, FLOPs and CPU latency of detectors, and the compression report.

Three measurements, each of one detector in eval mode on one image of the recipe's input size:

- **parameters**: every element of ``model.parameters()`` (buffers such as BatchNorm statistics are not counted);
- **FLOPs**: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass (``torch.no_grad``). It
  counts a multiply-add as 2 FLOPs and covers matrix products and convolutions (the bulk of a detector); the
  element-wise work of activations, normalisation and post-processing (score threshold, top-k, NMS) is not counted;
- **latency**: wall time of the full forward pass (transform, backbone, FPN, head and post-processing, i.e. what a
  user of the plain torchvision model waits for), batch 1, under ``torch.inference_mode``, with a fixed
  ``torch.set_num_threads``: ``warmup`` untimed runs, then the median over ``runs`` timed runs (at least 20).
  Post-processing depends on how many boxes pass the score threshold, so latency is best measured with trained
  weights on a real image (what :func:`compare_recipe` does).

The report (:func:`format_cost_table`, :func:`headline`) puts teacher and students side by side and states the two
ratios users distil for: "the student keeps X % of the teacher's AP at Y x lower latency and Z x fewer FLOPs".
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "MIN_TIMED_RUNS",
    "machine_description",
    "ModelCost",
    "count_params",
    "count_flops",
    "measure_latency",
    "measure_cost",
    "format_cost_table",
    "headline",
    "cost_ratios",
    "compare_recipe",
]

MIN_TIMED_RUNS = 20


@dataclass(frozen=True)
class ModelCost:
    """One row of the compression report.

    Attributes:
        name: row label, e.g. ``"teacher"`` or ``"student (distilled)"``.
        params: number of parameters.
        flops: FLOPs of one forward pass on one image (multiply-add = 2).
        latency_ms: median CPU latency in ms (batch 1).
        threads: ``torch.get_num_threads()`` during the latency runs.
        latency_runs: number of timed runs behind the median.
        metrics: COCO metrics as fractions (``AP``, ``AP50`` ...); empty when no checkpoint was evaluated.
        arch: short description of the detector, e.g. ``"fcos resnet34 FPN128"``.
    """

    name: str
    params: int
    flops: int
    latency_ms: float
    threads: int = 1
    latency_runs: int = MIN_TIMED_RUNS
    metrics: dict[str, float] = field(default_factory=dict)
    arch: str = ""

    @property
    def ap(self) -> Optional[float]:
        value = self.metrics.get("AP")
        return None if value is None or value < 0 else float(value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "params": self.params,
            "params_m": self.params / 1e6,
            "flops": self.flops,
            "gflops": self.flops / 1e9,
            "latency_ms": self.latency_ms,
            "threads": self.threads,
            "latency_runs": self.latency_runs,
            "metrics": dict(self.metrics),
        }


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name`` on Linux, else :func:`platform.processor`)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def machine_description() -> str:
    """What a time was measured on, for benchmark records: architecture, CPU model, core count and the vector
    instruction set torch dispatches to (e.g. ``x86_64, AMD EPYC, 2 CPU cores, AVX2``). Times move with it: a float32
    step on an AVX2-only EPYC took 2.5 x as long as on the AVX-512 machine of earlier records, and bfloat16 was
    emulated there (see :func:`detkd.engine.trainer.cpu_has_native_bfloat16`)."""
    return (f"{platform.machine()}, {cpu_model_name()}, {os.cpu_count()} CPU cores, "
            f"{torch.backends.cpu.get_cpu_capability()}")  # fmt: skip


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _as_image(image_or_size: Union[torch.Tensor, int, Sequence[int]]) -> torch.Tensor:
    """A ``(3, H, W)`` image: the given tensor, or a fixed pseudo-random one of side ``size`` / ``(H, W)``."""
    if isinstance(image_or_size, torch.Tensor):
        if image_or_size.dim() != 3:
            raise ValueError(f"expected one (3, H, W) image, got shape {tuple(image_or_size.shape)}")
        return image_or_size
    h, w = (image_or_size, image_or_size) if isinstance(image_or_size, int) else tuple(image_or_size)
    return torch.rand(3, int(h), int(w), generator=torch.Generator().manual_seed(0))


def _forward(model: nn.Module, image: torch.Tensor) -> Any:
    """One forward pass of a detector (a list of images) or of a plain module (a batched tensor)."""
    try:
        from detkd.models.build import detector_family

        detector_family(model)
        is_detector = True
    except (ValueError, TypeError):
        is_detector = False
    return model([image]) if is_detector else model(image.unsqueeze(0))


def count_flops(model: nn.Module, image_or_size: Union[torch.Tensor, int, Sequence[int]]) -> int:
    """FLOPs of one eval-mode forward pass on one image, counted by ``FlopCounterMode`` (multiply-add = 2).

    Args:
        model: a torchvision detector (called as ``model([image])``) or any module taking a ``(1, 3, H, W)`` batch.
        image_or_size: a ``(3, H, W)`` image, or the side / ``(H, W)`` of a random one.

    Returns:
        The total FLOP count.
    """
    image = _as_image(image_or_size)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            _forward(model, image)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def measure_latency(
    model: nn.Module,
    image_or_size: Union[torch.Tensor, int, Sequence[int]],
    runs: int = 30,
    warmup: int = 5,
    threads: int = 1,
) -> dict[str, float]:
    """CPU latency of one eval-mode forward pass, batch 1, under ``torch.inference_mode``.

    Args:
        model: the detector (moved to the CPU for the measurement and left there).
        image_or_size: a ``(3, H, W)`` image, or the side / ``(H, W)`` of a random one.
        runs: timed runs (at least :data:`MIN_TIMED_RUNS`).
        warmup: untimed runs before them.
        threads: ``torch.set_num_threads`` during the measurement (restored afterwards).

    Returns:
        ``{"median_ms", "q1_ms", "q3_ms", "runs", "threads"}``.
    """
    if runs < MIN_TIMED_RUNS:
        raise ValueError(f"latency needs at least {MIN_TIMED_RUNS} timed runs, got runs={runs}")
    image = _as_image(image_or_size).cpu()
    model.cpu()
    was_training = model.training
    model.eval()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                start = time.perf_counter()
                _forward(model, image)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3, "runs": runs, "threads": threads}


def measure_cost(
    name: str,
    model: nn.Module,
    image_or_size: Union[torch.Tensor, int, Sequence[int]],
    metrics: Optional[dict[str, float]] = None,
    runs: int = 30,
    warmup: int = 5,
    threads: int = 1,
    arch: str = "",
) -> ModelCost:
    """Parameters, FLOPs and latency of ``model`` as one :class:`ModelCost` row (``metrics`` passed through)."""
    latency = measure_latency(model, image_or_size, runs=runs, warmup=warmup, threads=threads)
    return ModelCost(
        name=name,
        params=count_params(model),
        flops=count_flops(model, image_or_size),
        latency_ms=latency["median_ms"],
        threads=threads,
        latency_runs=runs,
        metrics=dict(metrics or {}),
        arch=arch,
    )


def cost_ratios(teacher: ModelCost, student: ModelCost) -> dict[str, Optional[float]]:
    """``ap_kept`` (student AP / teacher AP, None without both APs), ``latency_x`` and ``flops_x`` (teacher / student)
    and ``params_x``."""
    ap_kept = None
    if teacher.ap is not None and student.ap is not None and teacher.ap > 0:
        ap_kept = student.ap / teacher.ap
    return {
        "ap_kept": ap_kept,
        "latency_x": teacher.latency_ms / student.latency_ms,
        "flops_x": teacher.flops / student.flops,
        "params_x": teacher.params / student.params,
    }


def headline(teacher: ModelCost, student: ModelCost) -> str:
    """ "the student keeps X % of the teacher's AP at Y x lower latency and Z x fewer FLOPs" (AP part dropped when
    either AP is unknown)."""
    r = cost_ratios(teacher, student)
    cost = f"{r['latency_x']:.1f} x lower latency and {r['flops_x']:.1f} x fewer FLOPs"
    if r["ap_kept"] is None:
        return f"the student runs at {cost} than the teacher (AP kept: unknown, no checkpoint or a teacher AP of 0)"
    return f"the student keeps {100 * r['ap_kept']:.0f} % of the teacher's AP at {cost}"


def _metric(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None or value < 0 or math.isnan(value) else f"{100 * value:.1f}"


def format_cost_table(rows: Sequence[ModelCost], extra: Sequence[tuple[str, Sequence[str]]] = ()) -> str:
    """The compression report as a fixed-width text table: AP, AP50, params (M), GFLOPs, latency (ms).

    Args:
        rows: teacher first, then the students.
        extra: more columns as ``(header, one value per row)``, e.g. train time.
    """
    headers = ["model", "AP", "AP50", "params (M)", "GFLOPs", "latency (ms)", *(h for h, _ in extra)]
    body = []
    for i, row in enumerate(rows):
        body.append(
            [
                row.name,
                _metric(row.metrics, "AP"),
                _metric(row.metrics, "AP50"),
                f"{row.params / 1e6:.2f}",
                f"{row.flops / 1e9:.3f}",
                f"{row.latency_ms:.1f}",
                *(values[i] for _, values in extra),
            ]
        )
    widths = [max(len(r[c]) for r in [headers, *body]) for c in range(len(headers))]
    fmt = lambda r: "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(headers), "-" * len(fmt(headers)), *(fmt(r) for r in body)]
    threads = sorted({r.threads for r in rows})
    runs = sorted({r.latency_runs for r in rows})
    lines.append(
        f"latency: CPU, batch 1, median of {'/'.join(map(str, runs))} runs after warm-up, "
        f"{'/'.join(map(str, threads))} thread(s), torch.inference_mode; GFLOPs by FlopCounterMode (multiply-add = 2)"
    )
    return "\n".join(lines)


def _describe(model_cfg: Any) -> str:
    return f"{model_cfg.arch} {model_cfg.backbone} FPN{model_cfg.fpn_channels}"


def compare_recipe(
    cfg: Any,
    student_ckpt: Optional[str] = None,
    teacher_ckpt: Optional[str] = None,
    threads: int = 1,
    runs: int = 30,
    warmup: int = 5,
    show_progress: bool = False,
) -> dict[str, Any]:
    """The compression report of a recipe's teacher/student pair.

    The latency image is the first val image of the recipe's data (generated when it is a synthetic set that is
    absent), resized by each detector's own transform as in deployment. A model with a checkpoint is also
    COCO-evaluated on the val split; without one it has random weights and only its cost is reported.

    Args:
        cfg: a loaded distillation recipe (``detkd.config.Config`` with ``teacher`` and ``student``).
        student_ckpt: student weights (e.g. ``<work_dir>/student_best.pth``), or None.
        teacher_ckpt: teacher weights; None uses ``teacher.checkpoint`` of the recipe when that file exists.
        threads, runs, warmup: see :func:`measure_latency`.
        show_progress: progress bars during data generation and evaluation.

    Returns:
        ``{"rows": [teacher ModelCost, student ModelCost], "ratios": ..., "headline": str, "table": str,
        "checkpoints": {"teacher": path or None, "student": path or None}}``.
    """
    from detkd.config import teacher_entries
    from detkd.data.build import build_dataset, build_eval_loader, ensure_data
    from detkd.engine.evaluator import evaluate
    from detkd.models.build import build_detector_from_cfg, load_detector_weights

    if not teacher_entries(cfg) or cfg.student is None:
        raise ValueError(
            f"recipe '{cfg.name}' needs both a 'teacher' and a 'student' section for a comparison "
            f"(a tools/train.py recipe with one 'model' has nothing to compare against)."
        )
    teacher_cfg = teacher_entries(cfg)[0][2]  # several teachers: compared with the first
    if teacher_ckpt is None and teacher_cfg.checkpoint and Path(teacher_cfg.checkpoint).is_file():
        teacher_ckpt = teacher_cfg.checkpoint
    ensure_data(cfg.data, show_progress)
    val_set = build_dataset(cfg.data, "val", seed=cfg.train.seed)
    image = val_set[0][0]
    rows, used = [], {}
    for name, model_cfg, ckpt in (("teacher", teacher_cfg, teacher_ckpt), ("student", cfg.student, student_ckpt)):
        plain = replace(model_cfg, checkpoint=None, weights=None, weights_backbone=None)
        torch.manual_seed(0)
        model = build_detector_from_cfg(plain, val_set.num_classes)
        metrics: dict[str, float] = {}
        if ckpt is not None:
            load_detector_weights(model, ckpt)
            loader = build_eval_loader(val_set, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.num_workers)
            result = evaluate(model, loader, val_set, torch.device("cpu"), progress=show_progress)
            metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
        used[name] = ckpt
        rows.append(
            measure_cost(
                name, model, image, metrics, runs=runs, warmup=warmup, threads=threads, arch=_describe(model_cfg)
            )
        )
    return {
        "rows": rows,
        "ratios": cost_ratios(rows[0], rows[1]),
        "headline": headline(rows[0], rows[1]),
        "table": format_cost_table(rows, extra=[("detector", [r.arch for r in rows])]),
        "checkpoints": used,
    }
