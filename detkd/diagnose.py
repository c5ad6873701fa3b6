"""Why no gain? Read a distillation run's logs and say what went wrong, with one concrete suggestion per finding.

:func:`diagnose_run` reads ``RUN_DIR/metrics.jsonl`` (the train records' loss terms and the val records' AP), the
teacher's val metrics (``RUN_DIR/teacher_val.json``, written by ``train_distill``) and, when given or found in
``RUN_DIR/baseline``, a baseline run of the student alone. Per distillation loss (the terms ``distill/<loss>/...``
summed) it follows the ratio ``r = |loss| / task loss`` over training and reports:

* ``non-finite``: some logged value of the loss is NaN or infinite;
* ``collapsed``: its median ratio over the last quarter of training is below 1 % of the task loss — the term no
  longer teaches (typical of magnitude-based losses whose 1x1 adapters learn the teacher's feature scale);
* ``dominates``: its median ratio over the first quarter is above 100 — the student mostly imitates and hardly learns
  the task;

and, across the run, ``weak teacher`` (the teacher's val AP does not exceed the student's best), ``no gain``
(the student's best val AP is not above the baseline's), ``peaked attention`` (an FGD-style loss whose teacher
attention maps were nearly one-hot on the first step, from ``RUN_DIR/attention_check.json``; see
:mod:`detkd.attention_check`) and ``pseudo labels add nothing`` (``merge``-mode pseudo labels that added fewer than
:data:`PSEUDO_ADDED_MIN` boxes per labelled image, the last logged ``pseudo_label/added_per_image``: the targets are
the ground truth's). :func:`plot_ratios` draws the ratios over time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Optional, Union

from detkd.errors import DataError

__all__ = [
    "Finding",
    "diagnose_run",
    "format_findings",
    "loss_ratios",
    "plot_ratios",
    "COLLAPSE",
    "DOMINANCE",
    "PSEUDO_ADDED_MIN",
]

PathLike = Union[str, os.PathLike]
COLLAPSE = 0.01
"""A loss below this fraction of the task loss (median over the last quarter) has collapsed."""
DOMINANCE = 100.0
"""A loss above this multiple of the task loss (median over the first quarter) dominates."""
PSEUDO_ADDED_MIN = 0.1
"""Merge-mode pseudo labels adding fewer boxes than this per labelled image leave the targets the ground truth's."""


@dataclass(frozen=True)
class Finding:
    """One thing the diagnosis found: its ``kind``, what it is about, what was measured, and what to try."""

    kind: str
    subject: str
    message: str
    suggestion: str


def _read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir} holds no metrics.jsonl: is it the work dir of a train_distill.py run?")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not a JSON record ({err.msg}).") from None
    return records


def _best_ap(records: Sequence[dict[str, Any]]) -> Optional[float]:
    aps = [r["AP"] for r in records if r.get("type") == "val" and isinstance(r.get("AP"), (int, float))]
    return max(aps) if aps else None


def loss_ratios(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{loss: [(iteration, |loss| / task loss), ...]}`` over the train records (NaN where the loss is not finite)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("type") != "train":
            continue
        task = sum(v for k, v in r.items() if k.startswith("task/") and isinstance(v, (int, float)))
        per_loss: dict[str, float] = {}
        for key, value in r.items():
            if key.startswith("distill/") and isinstance(value, (int, float)):
                parts = key.split("/")
                if parts[1] in ("scale", "weight"):  # logged scalars, not loss terms
                    continue
                per_loss[parts[1]] = per_loss.get(parts[1], 0.0) + value
        for name, value in per_loss.items():
            if not math.isfinite(value):
                ratio = math.nan
            else:
                ratio = abs(value) / task if task > 0 else math.inf
            out.setdefault(name, []).append((int(r.get("iter", 0)), ratio))
    return out


def _is_feature_loss(records: Sequence[dict[str, Any]], name: str) -> bool:
    """A feature loss logs one term per level (``distill/<loss>/p3`` ...)."""
    keys = {k for r in records if r.get("type") == "train" for k in r if k.startswith(f"distill/{name}/")}
    return bool(keys) and all(k.rsplit("/", 1)[1][:1] == "p" and k.rsplit("/", 1)[1][1:].isdigit() for k in keys)


_NON_FINITE = (
    "lower its weight or the learning rate, set train.grad_clip, and check that the teacher loads (tools/eval.py on "
    "its checkpoint)"
)
_COLLAPSED_FEATURE = (
    "raise its weight or use `weight: auto` (target_ratio 1); if it collapsed early, its 1x1 adapters likely learned "
    "the teacher's feature scale: try a scale-free loss (pkd, cwd) or cross_kd"
)
_COLLAPSED_HEAD = (
    "raise its weight or use `weight: auto` (target_ratio 1); a head term that fades late may only mean the student "
    "matches the teacher's outputs, so compare the AP with the baseline before changing it"
)
_DOMINATES = "lower its weight (or use `weight: auto`), or warm it up with distill.schedule.warmup_iters"
_WEAK_TEACHER = (
    "a teacher no better than the student has little to teach: train it to convergence (its learning curve flat at "
    "the end) or use a larger one"
)
_PSEUDO_ADD_NOTHING = (
    "pseudo labels pay where the ground truth misses objects: add unlabelled images (data.unlabeled), or lower "
    "score_thr only if the labels are known to be incomplete; with complete labels use a feature loss instead"
)
_NO_GAIN = (
    "look at the findings above first; then try cross_kd or a feature loss on the finest levels only, and compare "
    "at equal wall time, not only equal steps"
)


def diagnose_run(run_dir: PathLike, baseline_dir: Optional[PathLike] = None) -> list[Finding]:
    """The findings of one run (see the module docstring); an empty list when nothing looks wrong."""
    run = Path(run_dir)
    records = _read_records(run)
    findings: list[Finding] = []
    for name, series in loss_ratios(records).items():
        values = [v for _, v in series]
        subject = f"distill/{name}"
        if any(not math.isfinite(v) for v in values):
            first = next(i for i, v in series if not math.isfinite(v))
            findings.append(Finding("non-finite", subject, f"non-finite from iteration {first} on", _NON_FINITE))
            continue
        quarter = max(1, len(values) // 4)
        start, end = median(values[:quarter]), median(values[-quarter:])
        if end < COLLAPSE:
            message = f"{100 * end:.2g} % of the task loss over the last quarter (it started at {100 * start:.3g} %)"
            advice = _COLLAPSED_FEATURE if _is_feature_loss(records, name) else _COLLAPSED_HEAD
            findings.append(Finding("collapsed", subject, message, advice))
        elif start > DOMINANCE:
            message = f"{start:.3g} x the task loss over the first quarter of training"
            findings.append(Finding("dominates", subject, message, _DOMINATES))
    from detkd.attention_check import by_loss, describe, is_peaked, read_entries

    for name, group in by_loss(read_entries(run)).items():
        if any(is_peaked(e) for e in group):
            message, suggestion = describe(group)
            findings.append(Finding("peaked attention", f"distill/{name}", message, suggestion))
    added = [r["pseudo_label/added_per_image"] for r in records if "pseudo_label/added_per_image" in r]
    if added and added[-1] < PSEUDO_ADDED_MIN:
        message = (
            f"the merge added {added[-1]:.2g} teacher boxes per labelled image to the ground truth: its confident "
            f"detections are already labelled, so the student trained on (almost) the GT alone"
        )
        findings.append(Finding("pseudo labels add nothing", "distill/pseudo_label", message, _PSEUDO_ADD_NOTHING))
    student_ap = _best_ap(records)
    teacher_file = run / "teacher_val.json"
    if teacher_file.is_file() and student_ap is not None:
        teacher_ap = json.loads(teacher_file.read_text(encoding="utf-8")).get("AP")
        if isinstance(teacher_ap, (int, float)) and teacher_ap <= student_ap:
            message = f"teacher AP {100 * teacher_ap:.1f} <= the student's best {100 * student_ap:.1f}"
            findings.append(Finding("weak teacher", "teacher", message, _WEAK_TEACHER))
    baseline = Path(baseline_dir) if baseline_dir is not None else (run / "baseline")
    if baseline_dir is not None and not (baseline / "metrics.jsonl").is_file():
        raise DataError(f"baseline run {baseline} holds no metrics.jsonl.")
    if (baseline / "metrics.jsonl").is_file() and student_ap is not None:
        base_ap = _best_ap(_read_records(baseline))
        if base_ap is not None and student_ap <= base_ap:
            gain = 100 * (student_ap - base_ap)
            message = f"best AP {100 * student_ap:.1f} vs the baseline's {100 * base_ap:.1f} ({gain:+.1f})"
            findings.append(Finding("no gain", "student", message, _NO_GAIN))
    return findings


def format_findings(findings: Sequence[Finding]) -> str:
    """One paragraph per finding, or a line saying nothing was found."""
    if not findings:
        return (
            "diagnosis: no collapsed, dominating or non-finite term, no weaker teacher, no loss against the baseline."
        )
    lines = ["diagnosis:"]
    for f in findings:
        lines.append(f"- [{f.kind}] {f.subject}: {f.message}. Suggestion: {f.suggestion}.")
    return "\n".join(lines)


def plot_ratios(run_dir: PathLike, out_file: PathLike) -> Path:
    """Draw every loss's ratio to the task loss over training (log scale, the 1 % and 100 x lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_ratios(_read_records(Path(run_dir)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        xs = [i for i, v in points if math.isfinite(v) and v > 0]
        ys = [v for _, v in points if math.isfinite(v) and v > 0]
        ax.plot(xs, ys, label=name)
    ax.axhline(COLLAPSE, color="grey", ls="--", lw=1)
    ax.axhline(DOMINANCE, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("|distillation loss| / task loss")
    ax.set_title(f"{Path(run_dir).name}: collapsed below the dashed line, dominating above the dotted one")
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
