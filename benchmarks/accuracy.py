"""Accuracy benchmark: how much of the teacher-student gap does each detkd method close, on data anyone can make?

Protocol (regime v3; see the README's "Results" section and DESIGN.md "Benchmark protocol"):

- data: the synthetic set of ``configs/bench/_base_/data.yaml`` (preset ``bench``: objects from 16 px, clutter 0.5;
  generated on first use, deterministic);
- teacher: ``configs/bench/teacher.yaml`` (FCOS R18-FPN128 from scratch in float32, 5,600 steps, a learning curve
  every 400 steps), trained once in ``--teacher-dir`` (default ``work_dirs/bench``) and kept in the repository as
  float16 weights (``benchmarks/teachers/v3_teacher.pth``, scored again on val and on the tuning split): every
  later session, on any machine, teaches with the same weights, since nothing outside git outlives a session and
  training reproduces bit for bit only on the same CPU kind; then the weights of the
  magnitude-dependent losses are measured for it (``benchmarks/loss_scales.py --write``, a rule on a training
  batch, never on val);
- **the regime check first**: the baseline student trained for the teacher's whole schedule must stay
  ``MIN_GAP`` (10 AP) below the teacher (a capacity gap), and the teacher's last two evaluations must be within
  1 AP (converged); the run stops there when the check fails (``--force`` goes on);
- student: FCOS MobileNetV3-small-FPN32 from scratch, every method with the same schedule (2,400 steps) and the same
  initialisation (same seed -> same initial weights), 2 seeds, then a third seed for the baseline and the top 3;
- every run's final weights are also scored on the **tuning split** (``configs/bench/_base_/tune.yaml``): the regime
  check, the ranking (third seeds, long schedule) and the **derived rows** (the best feature recipe + ``cross_kd``,
  + ``relation``; the best recipe + the KD schedule; recipes written to ``configs/bench/derived/``) are decided on
  it, never on the reported val split;
- **equal wall time**: the baseline trained for as long as the best distilled run (a distillation step costs more);
- **long schedule**: the student schedule x 4 for the baseline and the 2 best recipes (2 seeds each);
- cost: params, GFLOPs and CPU latency of teacher and student (``tools/compare.py``, with the best run's student);
- AP is the val AP after the **last** epoch (no checkpoint picking on the reported split).

Issue 15's rows (several teachers, teachers that learn):

- a **second benchmark teacher** of another family, ``configs/bench/teacher_retinanet.yaml`` (RetinaNet
  R18-FPN128, the same data and schedule as the FCOS teacher), trained once and kept like it
  (``benchmarks/teachers/v3_teacher_retina.pth``) and evaluated on val and on the tuning split; it is trained after the
  regime check and after every row that does not need it, right before the rows that do;
- **two teachers** (``two_teachers_{fixed,confidence,adaptive}``: FCOS + RetinaNet under ``teachers:``) against each
  teacher alone with the same loss (``fcos_pkd``, ``retina_pkd``): PKD on every level, scale-free, fixed before any
  run. The single-teacher rows also use a one-entry ``teachers:`` list, because detkd builds the teachers of a
  ``teachers:`` list under their own seeds: the five rows start from the same student weights (``pkd``, with the
  ``teacher:`` shorthand, does not: its student is built after the teacher);
- **online** (``online_pkd``: the teacher architecture trained from scratch with the student; ``mutual_pkd``: the
  same with deep mutual learning) against the frozen teacher with the same loss (``pkd``);
- **born-again** (``born_again``): a student of the teacher's own architecture (FCOS R18-FPN128) distilled from the
  frozen teacher over the teacher's whole schedule (5,600 steps), compared with the teacher's AP (target: the
  student passes its teacher); it is not ranked with the bench students (another student);
- ``ema`` (self-distillation), ``relation`` and ``best_feature_relation`` are rows of the main protocol.

Every frozen teacher of a recipe gets the checkpoint of the cached benchmark teacher of its architecture through
``--opts`` (``teacher.checkpoint=...``, or ``teachers.<i>.checkpoint=...`` for each entry of a list).

Every finished run is stored in ``benchmarks/results/runs/<tag>_<run>_s<seed>.json`` and skipped when the script runs
again, so the benchmark can be completed over several invocations (and the results of an interrupted invocation are
kept). A record carries a digest of its resolved recipe: when the recipe changes, the record is set aside in
``runs/superseded/`` (kept, never deleted) and the run trains again. Each run is scored on the tuning split as soon
as it ends; ``--runs-dir`` keeps the students' work dirs where they outlive a session, so a run cut off resumes.
``--plan`` prints the planned runs and the estimated elapsed time without training. ``--quick`` trains its
own short teacher and a few students on a short schedule. ``--jobs N`` runs N trainings at a time, each with
``cores / N`` threads (``OMP_NUM_THREADS``). A failed run is reported and the others go on.

    python benchmarks/accuracy.py --jobs 2            # full: results/accuracy.{json,md}
    python benchmarks/accuracy.py --jobs 2 --teacher-dir checkpoints/bench   # keep the cached teachers elsewhere
    python benchmarks/accuracy.py --jobs 2 --teacher-dir checkpoints/bench --runs-dir checkpoints/bench_runs
    python benchmarks/accuracy.py --plan --jobs 2     # what is left, and how long it should take
    python benchmarks/accuracy.py --report-only       # tabulate the stored runs (a partial table while it runs)
    python benchmarks/accuracy.py --quick --jobs 2    # results/accuracy_quick.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH_CFG = REPO / "configs" / "bench"
RESULTS = REPO / "benchmarks" / "results"

# (run name, recipe, seeds in full mode, seeds in quick mode or 0 to skip); in full mode the TOP_K best distilled
# runs then get a third seed
RUNS: list[tuple[str, str, int, int]] = [
    ("baseline", "student.yaml", 3, 1),
    ("mse", "mse.yaml", 2, 0),
    ("fgfi", "fgfi.yaml", 2, 0),
    ("defeat", "defeat.yaml", 2, 0),
    ("gid", "gid.yaml", 2, 0),
    ("attention", "attention.yaml", 2, 0),
    ("fgd", "fgd.yaml", 2, 0),
    ("pkd", "pkd.yaml", 2, 1),
    ("cwd", "cwd.yaml", 2, 1),
    ("pseudo_label", "pseudo_label.yaml", 2, 0),
    ("logit_kd", "logit_kd.yaml", 2, 1),
    ("fgd_logit_kd", "combo.yaml", 2, 0),  # a combination fixed before any run
    ("cwd_logit_kd", "combo_cwd.yaml", 2, 0),  # the best feature + the best head method of the first regime
    # the fixes of two rows that lost, each chosen on the tuning split (benchmarks/results/probes/)
    ("fgd_flat_attention", "fgd_flat_attention.yaml", 2, 0),  # FGD at T 50: its maps are one-hot at 0.5 here
    ("pkd_p3p5", "pkd_p3p5.yaml", 2, 0),  # PKD without the 2 x 2 / 1 x 1 levels
    ("cross_kd", "cross_kd.yaml", 2, 0),  # issue 16
    ("mse_auto", "mse_auto.yaml", 2, 0),  # weight: auto against mse's one-batch rule
    ("fgd_auto", "fgd_auto.yaml", 2, 0),
    ("defeat_auto", "defeat_auto.yaml", 2, 0),
    ("relation", "relation.yaml", 2, 0),  # issue 15
    ("ema", "ema.yaml", 2, 0),  # self-distillation, no trained teacher
    # issue 15: several teachers, each teacher alone with the same loss (PKD, fixed before any run)
    ("fcos_pkd", "fcos_pkd.yaml", 2, 0),
    ("retina_pkd", "retina_pkd.yaml", 2, 0),
    ("two_teachers_fixed", "two_teachers_fixed.yaml", 2, 0),
    ("two_teachers_confidence", "two_teachers_confidence.yaml", 2, 0),
    ("two_teachers_adaptive", "two_teachers_adaptive.yaml", 2, 0),
    # teachers that learn: against pkd (the frozen teacher, same loss, same student initialisation)
    ("online_pkd", "online_pkd.yaml", 2, 0),
    ("mutual_pkd", "mutual_pkd.yaml", 2, 0),
    ("born_again", "born_again.yaml", 2, 0),  # FCOS R18-FPN128 student, the teacher's schedule: against the teacher
]
FEATURE_RUNS = (
    "mse",
    "fgfi",
    "defeat",
    "gid",
    "attention",
    "fgd",
    "pkd",
    "cwd",
    "fgd_flat_attention",
    "pkd_p3p5",
    "mse_auto",
    "fgd_auto",
    "defeat_auto",
)
# Rows built on the best feature / best overall recipe of the first pass, ranked on the TUNING split (never val):
# (run name, what is added, seeds). Their recipes are written to configs/bench/derived/ when the choice is made.
DERIVED: list[tuple[str, str, int]] = [
    ("best_feature_cross_kd", "cross_kd", 2),
    ("best_feature_relation", "relation", 2),
    ("best_kd_schedule", "schedule", 2),
]
KD_SCHEDULE = {"warmup_iters": 50, "decay": "cosine", "final_ratio": 0.1}  # fixed before any run (RTMDet/YOLOv6 style)
DERIVED_DIR = BENCH_CFG / "derived"
TAG = {"full": "v3", "quick": "v3quick"}  # earlier regimes' records: v2_* (FCOS R34 bf16 teacher), full_*/quick_* (v1)
TEACHER_RECIPE = "teacher.yaml"
# The cached benchmark teachers: id -> recipe. Each is trained once into <--teacher-dir>/<tag>_<id>/ (record
# results/runs/<tag>_<id>.json; an id must not contain "_s", or the glob of the run records would match it); a
# recipe's frozen teacher gets the checkpoint of the one of its architecture.
TEACHERS: dict[str, str] = {"teacher": TEACHER_RECIPE, "teacher_retina": "teacher_retinanet.yaml"}
# Rows the protocol does not rank with the bench students (another student architecture); each is compared with a
# teacher instead: run name -> benchmark teacher id
AGAINST_TEACHER = {"born_again": "teacher"}
# The rows of issue 15's comparisons in the report (issue15_comparisons): the ensembles, each teacher alone, online
TWO_TEACHER_RUNS = ("two_teachers_fixed", "two_teachers_confidence", "two_teachers_adaptive")
SINGLE_TEACHER_RUNS = ("fcos_pkd", "retina_pkd")
ONLINE_RUNS = {"online_pkd": "pkd", "mutual_pkd": "pkd"}  # -> the frozen-teacher row with the same loss
TOP_K = 3  # the top distilled methods (by mean AP after the first pass) are run with MAX_SEEDS seeds
MAX_SEEDS = 3
WALL_TIME_SEEDS = 2
LONG_FACTOR = 4  # the long schedule: the student schedule x 4
LONG_TOP = 2  # ... for the baseline and this many best recipes
LONG_SEEDS = 2
TUNE_CFG = BENCH_CFG / "_base_" / "tune.yaml"  # the tuning split: the regime is judged on it, never on val
GAP_RUN = "baseline_teacher_schedule"  # the regime check: the baseline student on the teacher's whole schedule
GAP_SEEDS = 2
MIN_GAP = 0.10  # the teacher must stay this far (AP) above GAP_RUN
CONVERGED_AP = 0.01  # the teacher's last two evaluations within this much AP
# seconds per step (batch 8, one thread, two runs side by side) until stored runs give measured ones; "teacher": a
# benchmark teacher training alone; the issue-15 kinds are estimates from the measured ones (a second teacher
# forward ~0.55 s, a teacher training step at one thread ~1.4 s), replaced by the runs' own times as they finish
DEFAULT_STEP_S = {"student": 0.35, "distill": 0.9, "teacher": 0.8, "two_teachers": 1.5, "online": 1.8,
                  "born_again": 2.0}  # fmt: skip
# the cost class of a run for the time estimate (default: "distill"; baselines: "student"; long_<name>: <name>'s)
RUN_KIND = {"two_teachers_fixed": "two_teachers", "two_teachers_confidence": "two_teachers",
            "two_teachers_adaptive": "two_teachers", "online_pkd": "online", "mutual_pkd": "online",
            "born_again": "born_again"}  # fmt: skip
ITERS_PER_EPOCH = 200  # 1,600 training images, batch 8
QUICK_TEACHER_OPTS = ["train.epochs=3", "eval.interval=1"]  # 600 teacher steps
QUICK_STUDENT_OPTS = ["train.epochs=1"]  # 200 student steps
THREADS = {"per_run": None}  # set from --jobs in main()
# Where the cached benchmark teachers are trained and kept (set from --teacher-dir in main()); the students' work
# dirs stay in work_dirs/bench.
TEACHER_DIR = {"root": REPO / "work_dirs" / "bench"}
# Where the students' runs are trained (set from --runs-dir): a run cut off at a session's end resumes from there.
RUNS_DIR = {"root": REPO / "work_dirs" / "bench"}


def student_threads(jobs: int, threads: Optional[int] = None) -> Optional[int]:
    """Threads per student run: ``threads`` if given, else the cores shared by ``jobs`` runs; None (torch's default,
    every core) for one job without ``threads``."""
    if threads:
        return max(1, threads)
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def run_tool(
    script: str, recipe: Path, work_dir: Path, opts: list[str], log: Path, extra: Optional[list[str]] = None
) -> float:
    """Run a detkd tool in a fresh process (as a user would); returns its wall time. Output goes to ``log``. A run
    interrupted earlier (its ``last.pth`` exists) is resumed, not restarted (resume reproduces the uninterrupted
    run)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if THREADS["per_run"]:
        env["OMP_NUM_THREADS"] = str(THREADS["per_run"])
    if extra is None:
        extra = ["--resume"] if (work_dir / "last.pth").is_file() else []
    cmd = [sys.executable, str(REPO / "tools" / script), "--cfg", str(recipe), "--work-dir", str(work_dir),
           "--no-progress", *extra, "--opts", *opts]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {recipe.name} failed (exit {proc.returncode}); see {log}")
    return time.time() - start


def interval_step_time(trains: list[dict[str, Any]], key: str = "time") -> Optional[float]:
    """Seconds per training step: the median over consecutive train records of ``d key / d iter``.

    The median leaves out the intervals that hold an evaluation and the one across a resume (a run cut off at
    the end of one session and resumed in the next would otherwise count the hours in between), and needs no
    record of either. ``key`` is ``time`` (wall clock) or ``cpu_time`` (the process's CPU seconds, which other
    jobs sharing the cores barely change). None when fewer than two records carry ``key``."""
    rates = [(b[key] - a[key]) / (b["iter"] - a["iter"]) for a, b in zip(trains, trains[1:])
             if key in a and key in b and b["iter"] > a["iter"] and b[key] >= a[key]]  # fmt: skip
    return statistics.median(rates) if rates else None


def final_metrics(work_dir: Path) -> dict[str, Any]:
    """The val metrics after the last epoch (from the run's metrics.jsonl), the learning curve and the time:
    ``step_s`` / ``train_time_s`` from the wall clock, ``cpu_step_s`` / ``cpu_train_time_s`` from the process's CPU
    time where the trainer logged it (:func:`interval_step_time`)."""
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["type"] == "val"]
    trains = [r for r in records if r["type"] == "train"]
    if not vals:
        raise RuntimeError(f"{work_dir}: no val record in metrics.jsonl")
    iters = trains[-1]["iter"] if trains else 0
    epochs = max(r["epoch"] for r in trains) + 1 if trains else 1
    per_step = interval_step_time(trains) or 0.0
    ipe = iters // epochs
    curve = [[(r["epoch"] + 1) * ipe, r["AP"]] for r in vals]  # (steps, AP) of every evaluation
    out = {**vals[-1], "iterations": iters, "iters_per_epoch": ipe, "train_time_s": per_step * iters, "curve": curve,
           "step_s": per_step}  # fmt: skip
    out.pop("cpu_time", None)
    cpu = interval_step_time(trains, "cpu_time")
    if cpu is not None:
        out.update(cpu_step_s=cpu, cpu_train_time_s=cpu * iters)
    return out


def record_step_s(record: dict[str, Any]) -> Optional[float]:
    """A stored run's seconds per step for the time estimate: its CPU seconds per step over its threads where the
    trainer logged CPU time (what the step costs with its cores to itself: other jobs sharing the cores barely
    change CPU time, while they stretch the wall clock), else its wall-clock ``step_s``; None if it has neither."""
    if record.get("cpu_step_s"):
        return record["cpu_step_s"] / (record.get("threads") or os.cpu_count() or 1)
    return record.get("step_s")


def refresh_timing(record: dict[str, Any]) -> bool:
    """Re-derive a stored record's times from its work dir's metrics.jsonl when that is still there (records
    written before :func:`interval_step_time` counted evaluations and resume gaps). True if anything changed."""
    work = REPO / record.get("work_dir", "")
    if "work_dir" not in record or not (work / "metrics.jsonl").is_file():
        return False
    try:
        fresh = final_metrics(work)
    except (RuntimeError, ValueError, KeyError):
        return False
    keys = ("train_time_s", "step_s", "cpu_step_s", "cpu_train_time_s")
    changed = {k: fresh[k] for k in keys if k in fresh and record.get(k) != fresh[k]}
    record.update(changed)
    return bool(changed)


def converged(curve: list[list[float]]) -> Optional[bool]:
    """Whether the last two evaluations of a learning curve are within :data:`CONVERGED_AP` (None: < 2 points)."""
    if len(curve) < 2:
        return None
    return abs(curve[-1][1] - curve[-2][1]) <= CONVERGED_AP


def ensure_teacher(recipe: str, tag: str, opts: list[str], publish: bool = True) -> dict[str, Any]:
    """Train (once) and cache a teacher; returns its record (AP, curve, wall time, checkpoint path). With
    ``publish`` (the full protocol's teachers) the trained weights are kept in the repository
    (:func:`publish_teacher`) and the record points at them."""
    record_path = RESULTS / "runs" / f"{tag}.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        ckpt = REPO / record["checkpoint"]
        if publish and "published_as" not in record and ckpt.is_file() and _sha256(ckpt) == record.get("sha256"):
            record = publish_teacher(record, record_path, recipe)  # trained before teachers were published
            ckpt = REPO / record["checkpoint"]
        if not ckpt.is_file() and record.get("sha256"):  # e.g. a new machine: the record says what to rebuild
            rebuild_teacher(record, recipe, opts)
        problem = ("is missing" if not ckpt.is_file() else
                   "is not the one this record measured (sha256 differs)"
                   if record.get("sha256") and _sha256(ckpt) != record["sha256"] else None)  # fmt: skip
        if problem:  # retraining silently would leave the finished student rows taught by another teacher
            raise RuntimeError(
                f"{record_path}: the cached teacher's checkpoint {record['checkpoint']} {problem}. Restore it, or "
                f"move this record and the student records trained against it aside to train the teacher again "
                f"(--teacher-dir sets where teachers are kept)."
            )
        return record
    work = TEACHER_DIR["root"] / tag
    print(f"[bench] training teacher {recipe} -> {work}", flush=True)
    resume = (work / "last.pth").is_file()  # an interrupted teacher goes on (run_tool resumes it)
    wall = run_tool("train.py", BENCH_CFG / recipe, work, opts, work / "stdout.log")
    metrics = final_metrics(work)
    record = {"run": tag, "recipe": recipe, "wall_s": wall, "checkpoint": _repo_relative(work / "last_weights.pth"),
              **metrics,
              "threads": THREADS["per_run"] or os.cpu_count(), "resumed": resume,
              "machine": _machine()}  # fmt: skip
    _export_last_weights(work)
    record["sha256"] = _sha256(work / "last_weights.pth")
    _write_json(record_path, record)
    return publish_teacher(record, record_path, recipe) if publish else record


PUBLISHED_DIR = REPO / "benchmarks" / "teachers"  # the cached teachers kept in the repository (float16 weights)
FLOAT16_MAX = 65504.0


def float16_state(state: dict[str, Any], source: str) -> dict[str, Any]:
    """``state`` with every floating tensor rounded to float16 (half the bytes; integer buffers such as
    ``num_batches_tracked`` are kept). Raises ValueError naming the first tensor that float16 cannot hold."""
    import torch

    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            if not torch.isfinite(value).all() or value.abs().max().item() > FLOAT16_MAX:
                raise ValueError(f"{source}: {key} holds values float16 cannot represent (|x| > {FLOAT16_MAX:g})")
            value = value.to(torch.float16)
        out[key] = value
    return out


def publish_teacher(record: dict[str, Any], record_file: Path, recipe: str) -> dict[str, Any]:
    """Keep a cached teacher in the repository, so that every later session, on any machine, teaches with the
    same weights: nothing outside git survives a session here, and training is bit-identical only on the same CPU
    kind (vector ISA, thread count).

    The teacher's last weights are rounded to float16 (``benchmarks/teachers/<run>.pth``, half the size; a
    detector loads them into its float32 parameters) and the *published* weights are what the record then
    describes: they are scored again on val and on the tuning split, and the float32 original's numbers are kept
    under ``float32``. The students learn from the published file."""
    from detkd.engine.checkpoint import load_checkpoint, save_checkpoint

    src = REPO / record["checkpoint"]
    dst = PUBLISHED_DIR / f"{record['run']}.pth"
    state = load_checkpoint(src)["model"]
    save_checkpoint({"model": float16_state(state, str(src))}, dst)
    out = src.parent / "published_eval"
    metrics = {}
    for split, split_opts in (("val", []), ("tune", tune_split_opts())):
        cmd = [sys.executable, str(REPO / "tools" / "eval.py"), "--cfg", str(recipe_path(recipe)), "--ckpt",
               str(dst), "--out", str(out / split), "--no-progress", "--opts", *split_opts]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        metrics[split] = json.loads((out / split / "metrics.json").read_text())
    float32 = {k: record[k] for k in ("checkpoint", "sha256", "tune_AP", *metrics["val"]) if k in record}
    record.update(metrics["val"])
    record.update(float32=float32, checkpoint=_repo_relative(dst), sha256=_sha256(dst), tune_AP=metrics["tune"]["AP"],
                  published_as="float16")  # fmt: skip
    _write_json(record_file, record)
    print(
        f"[bench] {record['run']}: published as {record['checkpoint']} (float16): val AP {record['AP']:.4f} "
        f"(float32 {float32.get('AP', float('nan')):.4f}), tune AP {record['tune_AP']:.4f}",
        flush=True,
    )
    return record


def rebuild_teacher(record: dict[str, Any], recipe: str, opts: list[str]) -> None:
    """Train a cached teacher whose checkpoint is gone again, with its record's recipe and thread count, into the
    record's checkpoint path, and keep it only if it is bit-identical to the one the record measured (its sha256).

    Training from scratch on the CPU is deterministic for a fixed thread count, so the students' rows stay valid.
    A rebuild that differs is kept beside the path (``last_weights.rebuilt.pth``) and stops the protocol: its
    students would have learnt from another teacher."""
    from detkd.config import load_config
    from detkd.engine.trainer import cpu_has_native_bfloat16

    ckpt = REPO / record["checkpoint"]
    work = ckpt.parent
    if load_config(BENCH_CFG / recipe, opts).train.amp and not cpu_has_native_bfloat16():
        raise RuntimeError(  # the rebuild would train in float32 (hours) and could only come out different
            f"{record['run']}: the cached checkpoint {record['checkpoint']} is missing, and it cannot be rebuilt "
            f"bit-identically here: {recipe} trains in bfloat16 autocast, which this CPU "
            f"({_machine()}) lacks (train.amp falls back to float32). Restore the checkpoint, run on a CPU with "
            f"AVX-512 BF16 or AMX, or set the record and its students aside to train another teacher."
        )
    print(f"[bench] {record['run']}: the cached checkpoint {record['checkpoint']} is missing; training it again "
          f"({recipe}, {record.get('threads')} threads) and checking its sha256", flush=True)  # fmt: skip
    per_run, THREADS["per_run"] = THREADS["per_run"], record.get("threads") or None
    try:
        run_tool("train.py", BENCH_CFG / recipe, work, opts, work / "stdout.log")
    finally:
        THREADS["per_run"] = per_run
    _export_last_weights(work)
    digest = _sha256(ckpt)
    if digest != record["sha256"]:
        ckpt.replace(rebuilt := ckpt.with_name("last_weights.rebuilt.pth"))
        raise RuntimeError(
            f"{record['run']}: the retrained teacher {_repo_relative(rebuilt)} has sha256 {digest[:16]}, not the "
            f"record's {record['sha256'][:16]}: training did not reproduce it here (another thread count, torch "
            f"version or machine). Restore the original checkpoint, or set the record and its students aside."
        )
    print(f"[bench] {record['run']}: rebuilt bit-identically (sha256 {digest[:16]})", flush=True)


def _sha256(path: Path) -> str:
    """The checkpoint's identity, so that the students' rows are known to come from the teacher the record scored."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _machine() -> str:
    """This machine, as records name it (:func:`detkd.cost.machine_description`)."""
    from detkd.cost import machine_description

    return machine_description()


def machines_of(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many of ``records`` were trained on each machine (older records, which did not say: "not recorded").
    Times are comparable only within one machine: a float32 step took 2.5 x as long on an AVX2-only CPU."""
    return dict(collections.Counter(record.get("machine", "not recorded") for record in records))


def _repo_relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (records stay valid in another clone), else absolute."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _export_last_weights(work: Path) -> None:
    """The teacher the students learn from is the model after the last epoch (not picked on val)."""
    from detkd.engine.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint({"model": load_checkpoint(work / "last.pth")["model"]}, work / "last_weights.pth")


def ensure_loss_scales(teacher_ckpt: str) -> None:
    """Measure the magnitude-dependent losses' weights for this teacher once (``loss_scales.py --write``)."""
    path = RESULTS / "loss_scales.json"
    if path.is_file() and json.loads(path.read_text()).get("teacher") == teacher_ckpt:
        return
    print(f"[bench] measuring the loss scales for {teacher_ckpt}", flush=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "loss_scales.py"), "--write", "--teacher", teacher_ckpt]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL)


def recipe_path(recipe: str) -> Path:
    """A run's recipe file; ``recipe`` is relative to configs/bench (``derived/<name>.yaml``: in
    :data:`DERIVED_DIR`)."""
    if recipe.startswith("derived/"):
        return DERIVED_DIR / recipe.removeprefix("derived/")
    return BENCH_CFG / recipe


def _load_config(path: Path, opts: Optional[list[str]] = None):
    sys.path.insert(0, str(REPO))
    from detkd.config import load_config

    return load_config(path, opts)


@functools.cache
def is_distill_recipe(path: Path) -> bool:
    """Whether a recipe has a teacher (``teacher:`` or ``teachers:``). Answered once per recipe, from the main thread
    (see ``run_all``): the worker threads must not import detkd/torchvision for the first time concurrently, or one
    of them sees a partially initialised module; they only read the cached answer."""
    cfg = _load_config(path)
    from detkd.config import teacher_entries

    return bool(teacher_entries(cfg))


@functools.cache
def _teacher_model(teacher_id: str) -> tuple[str, str, int]:
    model = _load_config(BENCH_CFG / TEACHERS[teacher_id]).model
    return (model.arch, model.backbone, model.fpn_channels)


@functools.cache
def teacher_slots(path: Path) -> tuple[tuple[str, str], ...]:
    """``(dotted key, benchmark teacher id)`` of every frozen teacher of a recipe (``teacher``, or ``teachers.<i>``
    for each entry of a list): the cached benchmark teacher (:data:`TEACHERS`) of the same arch, backbone and FPN
    width. ``ema`` and ``online`` teachers have none (an EMA teacher is built from the student, an online one here
    trains from scratch). A frozen teacher that no benchmark teacher matches is an error naming its key."""
    cfg = _load_config(path)
    from detkd.config import teacher_entries

    slots = []
    for _, key, t_cfg, _ in teacher_entries(cfg):
        if t_cfg.mode != "frozen":
            continue
        model = (t_cfg.arch, t_cfg.backbone, t_cfg.fpn_channels)
        match = [tid for tid in TEACHERS if _teacher_model(tid) == model]
        if not match:
            raise ValueError(f"{path}: {key} ({'-'.join(map(str, model))}) is no benchmark teacher ({TEACHERS})")
        slots.append((key, match[0]))
    return tuple(slots)


def teachers_needed(recipes) -> set[str]:
    """The benchmark teachers (ids) that the runs of these recipes (relative to configs/bench) learn from."""
    return {tid for recipe in recipes for _, tid in teacher_slots(recipe_path(recipe))}


@functools.cache
def uses_bench_pair(path: Path) -> bool:
    """Whether a recipe distils the benchmark pair of ``_base_/pair.yaml`` as it is (the frozen FCOS teacher under
    ``teacher:``, the bench student): only such a recipe's losses can be carried into a derived row."""
    cfg, pair = _load_config(path), _load_config(BENCH_CFG / "_base_" / "pair.yaml")
    return not cfg.teachers and cfg.teacher == pair.teacher and cfg.student == pair.student


def checkpoint_opts(path: Path, checkpoints: dict[str, str]) -> list[str]:
    """``--opts`` that point every frozen teacher of a recipe at its cached benchmark teacher's checkpoint
    (``checkpoints``: benchmark teacher id -> path)."""
    out = []
    for key, tid in teacher_slots(path):
        if tid not in checkpoints:
            raise RuntimeError(f"{path.name}: {key} needs the benchmark teacher '{tid}' ({TEACHERS[tid]}), not trained")
        out.append(f"{key}.checkpoint={checkpoints[tid]}")
    return out


def training_command(recipe: str, seed: int, checkpoints: dict[str, str], opts: list[str]) -> tuple[str, list[str]]:
    """The tool (``train.py`` or ``train_distill.py``) and the ``--opts`` of one benchmark run: its seed, no
    evaluation before the end, the run's own overrides, and its teachers' checkpoints (:func:`checkpoint_opts`)."""
    path = recipe_path(recipe)
    run_opts = [f"train.seed={seed}", "eval.interval=0", *opts]
    if not is_distill_recipe(path):
        return "train.py", run_opts
    return "train_distill.py", run_opts + checkpoint_opts(path, checkpoints)


def record_path(tag: str, name: str, seed: int) -> Path:
    return RESULTS / "runs" / f"{tag}_{name}_s{seed}.json"


@functools.cache
def recipe_digest(recipe: str, opts: tuple[str, ...] = ()) -> str:
    """A run's identity: the sha256 (16 hex digits) of its resolved config (recipe, ``_base_`` files and ``opts``)
    without what depends on the machine (checkpoint paths, work dir). A stored record whose digest differs from its
    recipe's was trained on another recipe, so it no longer counts (:func:`stale_records`). Computed from the main
    thread, like :func:`is_distill_recipe`."""
    cfg = dataclasses.asdict(_load_config(recipe_path(recipe), list(opts)))

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "work_dir" and not (k == "checkpoint" and
                                                                                 isinstance(v, str))}  # fmt: skip
        if isinstance(node, (list, tuple)):
            return [strip(v) for v in node]
        return node

    text = json.dumps(strip(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stale_records(paths: list[Path]) -> list[tuple[Path, str]]:
    """The stored runs whose recipe changed since they ran (with the reason); records without a digest (older than
    the digest) are kept, and so are the runs of recipes that no longer exist."""
    out = []
    for path in paths:
        record = json.loads(path.read_text())
        if "recipe_digest" not in record or not recipe_path(record["recipe"]).is_file():
            continue
        now = recipe_digest(record["recipe"], tuple(record.get("opts", [])))
        if now != record["recipe_digest"]:
            out.append((path, f"recipe {record['recipe']} changed since the run ({record['recipe_digest']} -> {now})"))
    return out


def set_aside(path: Path, reason: str) -> Path:
    """Move a stored record to ``runs/superseded/`` (kept, never deleted), with the reason in it."""
    record = json.loads(path.read_text())
    record["superseded"] = reason
    out = path.parent / "superseded" / path.name
    _write_json(out, record)
    path.unlink()
    return out


def run_student(
    name: str, recipe: str, seed: int, checkpoints: dict[str, str], opts: list[str], tag: str
) -> dict[str, Any]:
    """Train one run (``checkpoints``: benchmark teacher id -> checkpoint) unless it is stored; returns its record."""
    path_out = record_path(tag, name, seed)
    if path_out.is_file():
        return json.loads(path_out.read_text())
    work = RUNS_DIR["root"] / f"{tag}_{name}_s{seed}"
    script, run_opts = training_command(recipe, seed, checkpoints, opts)
    print(f"[bench] {name} seed {seed}", flush=True)
    resumed = (work / "last.pth").is_file()  # a run cut off in an earlier session goes on from its last epoch
    wall = run_tool(script, recipe_path(recipe), work, run_opts, work / "stdout.log")
    record = {"run": name, "seed": seed, "recipe": recipe, "recipe_digest": recipe_digest(recipe, tuple(opts)),
              "wall_s": wall, "threads": THREADS["per_run"], "machine": _machine(), "opts": opts,
              "work_dir": _repo_relative(work), **final_metrics(work)}  # fmt: skip
    # the caller scores the run on the tuning split and writes this record again: it must get the resumed form
    record = resumed_wall_time(record) if resumed else record
    _write_json(path_out, record)
    return record


def resumed_wall_time(record: dict[str, Any]) -> dict[str, Any]:
    """A resumed run's record: this invocation's wall clock covers only the steps left (seconds, when the run had
    already ended and was only scored), so ``wall_s`` becomes the whole run's time from its step rate, and the
    record says so."""
    return {**record, "resumed": True, "wall_s": max(record["wall_s"], record.get("train_time_s", 0.0)),
            "wall_s_note": f"resumed; this invocation took {record['wall_s']:.0f} s, wall_s is the run's median "
                           "step time x its steps (train_time_s)"}  # fmt: skip


def _mean_time(records: list[dict[str, Any]], key: str = "train_time_s") -> float:
    """The mean ``key`` over the records that have it."""
    return statistics.mean(r[key] for r in records if key in r)


def run_cost_s(records: list[dict[str, Any]], key: str) -> float:
    """What one run of these records costs: the mean CPU time over the records that have it, or, in wall-clock
    time, the fastest record's (wall time only grows with the other jobs sharing the cores, so the least disturbed
    run is the closest to the cost on an idle machine)."""
    if key == "cpu_train_time_s":
        return _mean_time(records, key)
    return min(r[key] for r in records)


def cost_time_key(*groups: list[dict[str, Any]]) -> str:
    """``cpu_train_time_s`` when some record of every group has it (CPU time: what a run costs, whatever else
    shared the cores while it trained; records older than the trainer's ``cpu_time`` lack it), else the wall-clock
    ``train_time_s``."""
    every = all(any("cpu_train_time_s" in r for r in g) for g in groups)
    return "cpu_train_time_s" if every else "train_time_s"


def _is_method(name: str) -> bool:
    """A distilled run of the equal-steps comparison (not a baseline, not a long-schedule run)."""
    return name in {n for n, *_ in RUNS} | {n for n, *_ in DERIVED} and not name.startswith("baseline")


def ranked_methods(records: dict[str, list[dict[str, Any]]], key: str = "tune_AP", among=None) -> list[str]:
    """The distilled runs of the equal-steps comparison (or those named in ``among``), best mean ``key`` first:
    by default their AP on the tuning split, so that every choice the protocol makes (which runs get a third seed,
    the long schedule, the derived rows) is taken without looking at the reported val split. Runs not yet scored
    on the tuning split are left out, and so are the rows of another student (:data:`AGAINST_TEACHER`)."""
    means = {
        n: statistics.mean(r[key] for r in rs)
        for n, rs in records.items()
        if _is_method(n)
        and n not in AGAINST_TEACHER
        and rs
        and (among is None or n in among)
        and all(key in r for r in rs)
    }
    return sorted(means, key=means.get, reverse=True)


def recipe_of(name: str) -> str:
    """A run's recipe, relative to configs/bench (derived rows: their written recipe)."""
    return next((r for n, r, *_ in RUNS if n == name), f"derived/{name}.yaml")


def final_student_weights(record: dict[str, Any]) -> Path:
    """The student's weights after the last epoch of a stored run (``last.pth`` of train.py; for a distillation run
    its ``student.*`` entries, written once to ``student_last.pth``)."""
    work = REPO / record["work_dir"]
    if not is_distill_recipe(recipe_path(record["recipe"])):
        if not (work / "last.pth").is_file():
            raise FileNotFoundError(f"{work / 'last.pth'} does not exist")
        return work / "last.pth"
    out = work / "student_last.pth"
    if not out.is_file():
        from detkd.engine.checkpoint import load_checkpoint, save_checkpoint

        state = load_checkpoint(work / "last.pth")["model"]
        save_checkpoint({"model": {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}}, out)
    return out


def score_on_tune(records: dict[str, list[dict[str, Any]]], tag: str) -> None:
    """Score every stored equal-steps run (baseline and methods) on the tuning split, once each."""
    for name, rs in records.items():
        if name != "baseline" and not _is_method(name):
            continue
        for r in list(rs):
            if "tune_AP" not in r and "work_dir" in r:
                if not score_run_on_tune(r, tag):  # its weights are gone: it runs again next time
                    rs.remove(r)


def score_run_on_tune(record: dict[str, Any], tag: str) -> bool:
    """Score one finished run's final weights on the tuning split (kept in its record). A run whose work dir was
    lost before it was scored cannot take part in the choices made on the tuning split: its record is set aside
    (runs/superseded/) so that it is trained again; returns False then."""
    path = record_path(tag, record["run"], record["seed"])
    try:
        weights = final_student_weights(record)
    except FileNotFoundError:
        reason = f"its weights ({record['work_dir']}) were lost before it was scored on the tuning split"
        print(f"[bench] {path.name}: {reason}; set aside in {set_aside(path, reason).parent.name}/", flush=True)
        return False
    model = "student" if is_distill_recipe(recipe_path(record["recipe"])) else "model"
    tune_ap(record, path, record["recipe"], weights, model)
    return True


def write_derived_recipe(name: str, addition: str, base: str) -> str:
    """Write ``configs/bench/derived/<name>.yaml``: recipe ``base`` plus ``addition`` (a head or feature loss, or the
    KD schedule); returns its path relative to configs/bench."""
    sys.path.insert(0, str(REPO))
    import yaml

    from detkd.config import load_config

    cfg = load_config(BENCH_CFG / base)
    features = [{"type": f.type, "weight": f.weight, "levels": list(f.levels) if f.levels != "all" else "all",
                 **({"target_ratio": f.target_ratio} if f.weight == "auto" else {}), **f.params}
                for f in cfg.distill.features]  # fmt: skip
    head = [{"type": h.type, "weight": h.weight, **h.params} for h in cfg.distill.head]
    distill: dict[str, Any] = {}
    if addition == "cross_kd":
        head.append({"type": "cross_kd", "temperature": 1.0, "cls_loss": "kd", "conf_thr": 0.5, "box_weight": 1.0})
    elif addition == "relation":
        features.append({"type": "relation", "weight": 1.0, "levels": ["p3", "p4", "p5"], "output_size": 7})
    elif addition == "schedule":
        distill["schedule"] = dict(KD_SCHEDULE)
    distill.update(features=features, head=head)
    text = (f"# Written by benchmarks/accuracy.py: {base} (the best {'feature ' if addition != 'schedule' else ''}"
            f"recipe of the first pass, ranked on the tuning split) + {addition}.\n")  # fmt: skip
    pair = os.path.relpath(BENCH_CFG / "_base_" / "pair.yaml", DERIVED_DIR)  # ../_base_/pair.yaml
    text += yaml.safe_dump({"_base_": [pair], "distill": distill}, sort_keys=False)
    DERIVED_DIR.mkdir(parents=True, exist_ok=True)
    (DERIVED_DIR / f"{name}.yaml").write_text(text)
    return f"derived/{name}.yaml"


def _write_json(path: Path, data: Any) -> None:
    from detkd.files import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1)), binary=False)


def aggregate(records: list[dict[str, Any]], teacher_ap: float, baseline_ap: Optional[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
    for key in ("AP", "AP50", "APs"):
        values = [r[key] for r in records]
        out[key] = statistics.mean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    if all("tune_AP" in r for r in records):
        out["tune_AP"] = statistics.mean(r["tune_AP"] for r in records)
    out["train_time_s"] = statistics.mean(r["train_time_s"] for r in records)
    if any("cpu_train_time_s" in r for r in records):
        out["cpu_train_time_s"] = _mean_time(records, "cpu_train_time_s")
    out["iterations"] = records[0].get("iterations")
    if baseline_ap is not None:
        out["delta_AP"] = out["AP"] - baseline_ap
    if baseline_ap is not None and teacher_ap > baseline_ap:
        out["gap_closed"] = (out["AP"] - baseline_ap) / (teacher_ap - baseline_ap)
    return out


def long_name(name: str) -> str:
    return f"long_{name}"


def wall_time_name(best: str) -> str:
    return f"baseline_same_wall_time_as_{best}"


def reference_of(name: str) -> Optional[str]:
    """The baseline a run is compared with: ``long_baseline`` for long runs, ``baseline`` for the equal-steps
    runs, none for baselines themselves and for the rows of another student (compared with their teacher)."""
    if name in AGAINST_TEACHER:
        return None
    if name.startswith("long_"):
        return None if name == long_name("baseline") else long_name("baseline")
    if name.startswith("baseline"):
        return None
    return "baseline"


def wall_time_opts(records: dict[str, list[dict[str, Any]]], best: str, opts: list[str]) -> list[str]:
    """``--opts`` that give the baseline the (mean) train time of the best distilled run (CPU time when every record
    of both has it: :func:`cost_time_key`)."""
    key = cost_time_key(records[best], records["baseline"])
    ratio = run_cost_s(records[best], key) / run_cost_s(records["baseline"], key)
    steps = round(records["baseline"][0]["iterations"] * ratio)
    ipe = records["baseline"][0]["iters_per_epoch"]
    return [*opts, f"train.epochs={math.ceil(steps / ipe)}", f"train.max_iters={steps}"]


def long_opts(opts: list[str], student_epochs: int) -> list[str]:
    return [*opts, f"train.epochs={LONG_FACTOR * student_epochs}"]


def run_kind(name: str) -> str:
    """A run's cost class (a key of :data:`DEFAULT_STEP_S`): ``student`` for the baselines, :data:`RUN_KIND`'s
    entry or ``distill`` otherwise; a long-schedule run costs per step what its recipe's row does."""
    base = name.removeprefix("long_")
    return "student" if base.startswith("baseline") else RUN_KIND.get(base, "distill")


def recipe_steps(recipe: str, opts: tuple[str, ...] = ()) -> int:
    """The training steps of a recipe (relative to configs/bench) with ``opts``."""
    cfg = _load_config(recipe_path(recipe), list(opts))
    return cfg.train.max_iters or cfg.train.epochs * ITERS_PER_EPOCH


def protocol_plan(student_steps: int, gap_steps: int, opts=()) -> list[tuple[int, str]]:
    """``(steps, kind)`` of every student run of the whole protocol, finished or not, for the time estimate: the
    regime check, every row of :data:`RUNS` (its seeds in full mode, its recipe's steps: the born-again row trains
    for the teacher's schedule), the third seeds, the derived rows, the wall-time baseline and the long schedule
    (the distilled ones counted as ``distill`` steps)."""
    plan = [(gap_steps, "student")] * GAP_SEEDS
    for name, recipe, full_seeds, _ in RUNS:
        plan += [(recipe_steps(recipe, tuple(opts)), run_kind(name))] * full_seeds
    plan += [(student_steps, "distill")] * (TOP_K + sum(seeds for *_, seeds in DERIVED))
    plan += [(round(student_steps * 1.6), "student")] * WALL_TIME_SEEDS  # a distillation step: ~1.6 student steps
    plan += [(LONG_FACTOR * student_steps, "student")] * LONG_SEEDS
    plan += [(LONG_FACTOR * student_steps, "distill")] * LONG_SEEDS * LONG_TOP
    return plan


def estimate_elapsed_h(plan: list[tuple[int, Any]], step_s: dict[str, float], jobs: int) -> float:
    """Elapsed hours of ``plan`` (``(steps, kind)`` per run; ``kind`` a key of ``step_s``, or a bool: distilled or
    not) at ``step_s`` (seconds per step with ``cores / jobs`` threads each), ``jobs`` runs at a time, plus a minute
    per run for evaluation and start-up."""

    def per_step(kind: Any) -> float:
        return step_s[("distill" if kind else "student") if isinstance(kind, bool) else kind]

    total = sum(steps * per_step(kind) + 60.0 for steps, kind in plan)
    return total / max(jobs, 1) / 3600


def tune_split_opts(tune_cfg: Path = TUNE_CFG) -> list[str]:
    """``--opts`` that score a recipe on a tuning split (default ``configs/bench/_base_/tune.yaml``, a file with only
    ``data.synthetic``), made on first use (deterministic, like the benchmark data) under the repository."""
    sys.path.insert(0, str(REPO))
    import yaml

    from detkd.data.synthetic import ensure_synthetic

    knobs = dict(yaml.safe_load(Path(tune_cfg).read_text())["data"]["synthetic"])
    root = REPO / knobs.pop("out")
    ensure_synthetic(root, show_progress=False, **knobs)
    return [f"data.val.ann_file={root / 'annotations' / 'val.json'}", f"data.val.img_dir={root / 'images' / 'val'}"]


def tune_ap(
    record: dict[str, Any], record_file: Path, recipe: str, checkpoint: Path, model: str = "model", tune_cfg=TUNE_CFG
) -> float:
    """The AP of a stored run's final weights on the tuning split (``tune_cfg``: its ``data.synthetic``); evaluated
    once and kept in its record."""
    if "tune_AP" not in record:
        out = checkpoint.parent / "tune_eval"
        cmd = [sys.executable, str(REPO / "tools" / "eval.py"), "--cfg", str(recipe_path(recipe)), "--ckpt",
               str(checkpoint), "--out", str(out), "--model", model, "--no-progress"]  # fmt: skip
        cmd += ["--opts", *tune_split_opts(tune_cfg)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        record["tune_AP"] = json.loads((out / "metrics.json").read_text())["AP"]
        _write_json(record_file, record)
    return record["tune_AP"]


def regime_check(
    teacher: dict[str, Any], gap_records: list[dict[str, Any]], split: str = "val", key: str = "AP"
) -> dict[str, Any]:
    """The validity of the regime on one split (``key``: the records' AP on it): teacher converged (its val
    learning curve), and its AP at least MIN_GAP above the baseline student trained for the teacher's whole
    schedule."""
    out: dict[str, Any] = {"split": split, "teacher_AP": teacher.get(key)}
    out["teacher_converged"] = converged(teacher.get("curve", []))
    if gap_records and out["teacher_AP"] is not None and all(key in r for r in gap_records):
        base = statistics.mean(r[key] for r in gap_records)
        out.update(baseline_teacher_schedule_AP=base, gap=out["teacher_AP"] - base)
        out["gap_ok"] = out["gap"] >= MIN_GAP
    out["valid"] = bool(out.get("gap_ok")) and out["teacher_converged"] is not False
    return out


def tune_regime_check(teacher: dict[str, Any], teacher_tag: str, gap_records: list[dict[str, Any]], tag: str):
    """:func:`regime_check` on the tuning split: the decision to go on is taken on it, never on val."""
    tune_ap(teacher, RESULTS / "runs" / f"{teacher_tag}.json", TEACHER_RECIPE, Path(teacher["checkpoint"]))
    for r in gap_records:
        tune_ap(r, record_path(tag, GAP_RUN, r["seed"]), r["recipe"], REPO / r["work_dir"] / "last.pth")
    return regime_check(teacher, gap_records, "tune", "tune_AP")


def compare_rows(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """``row`` against ``ref`` (aggregated rows, or a teacher's record): the AP difference, the spread (the larger
    of the two seed standard deviations; a teacher is one run) and whether the difference is beyond it."""
    delta = row["AP"] - ref["AP"]
    spread = max(row.get("AP_std", 0.0), ref.get("AP_std", 0.0))
    out = {
        "AP": row["AP"],
        "ref_AP": ref["AP"],
        "delta_AP": delta,
        "spread": spread,
        "beyond_spread": abs(delta) > spread,
    }
    if "tune_AP" in row and "tune_AP" in ref:
        out["tune_delta_AP"] = row["tune_AP"] - ref["tune_AP"]
    return out


def derived_base(name: str) -> Optional[str]:
    """The run a derived row was built on (from the first line :func:`write_derived_recipe` wrote), or None."""
    path = DERIVED_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    first = path.read_text().splitlines()[0]
    recipe = first.split(": ", 1)[-1].split(" ", 1)[0]
    return next((n for n, r, *_ in RUNS if r == recipe), None)


def issue15_comparisons(runs: dict[str, dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 15's questions, from the aggregated rows (``runs``) and the benchmark teachers' records: the ensemble
    against the best single teacher (chosen on the tuning split when the rows are scored on it), online against
    frozen, EMA against the baseline, born-again against its teacher, relation alone and added to the best
    feature recipe. Only the rows present are compared."""
    out: dict[str, Any] = {}
    singles = [n for n in SINGLE_TEACHER_RUNS if n in runs]
    if singles:
        best = max(singles, key=lambda n: runs[n].get("tune_AP", runs[n]["AP"]))
        out["two_teachers"] = {"best_single": best, "rows": {n: compare_rows(runs[n], runs[best])
                                                               for n in TWO_TEACHER_RUNS if n in runs}}  # fmt: skip
    out["online"] = {n: {"ref": ref, **compare_rows(runs[n], runs[ref])}
                     for n, ref in ONLINE_RUNS.items() if n in runs and ref in runs}  # fmt: skip
    if "ema" in runs and "baseline" in runs:
        out["ema"] = compare_rows(runs["ema"], runs["baseline"])
    out["against_teacher"] = {n: {"teacher": tid, **compare_rows(runs[n], teachers[tid])}
                              for n, tid in AGAINST_TEACHER.items() if n in runs and tid in teachers}  # fmt: skip
    relation = {}
    if "relation" in runs and "baseline" in runs:
        relation["relation"] = {"ref": "baseline", **compare_rows(runs["relation"], runs["baseline"])}
    base = derived_base("best_feature_relation")
    if "best_feature_relation" in runs and base in runs:
        relation["best_feature_relation"] = {"ref": base, **compare_rows(runs["best_feature_relation"], runs[base])}
    out["relation"] = relation
    return out


def _delta_text(c: dict[str, Any]) -> str:
    beyond = "beyond" if c["beyond_spread"] else "within"
    tune = f"; tuning split {100 * c['tune_delta_AP']:+.1f}" if "tune_delta_AP" in c else ""
    return f"{100 * c['delta_AP']:+.1f} AP ({beyond} the spread, {100 * c['spread']:.1f}{tune})"


def issue15_markdown(results: dict[str, Any]) -> list[str]:
    """The report's lines on the second teacher and issue 15's comparisons (empty while none of their rows ran)."""
    comp, runs = results.get("issue15") or {}, results["runs"]
    lines = []
    for tid, t in (results.get("teachers") or {}).items():
        if tid == "teacher":
            continue
        curve = ", ".join(f"{int(s):,}: {100 * ap:.1f}" for s, ap in t.get("curve", []))
        tune = f" (tuning split {100 * t['tune_AP']:.1f})" if "tune_AP" in t else ""
        lines.append(
            f"- Second teacher {t['recipe']} (`{tid}`): AP {100 * t['AP']:.1f}{tune} after {t['iterations']:,} steps "
            f"({t['wall_s'] / 60:.0f} min); val AP along the way {curve}; converged: {converged(t.get('curve', []))}."
        )
    two = comp.get("two_teachers")
    if two:
        singles = ", ".join(f"`{n}` {100 * runs[n]['AP']:.1f} ± {100 * runs[n]['AP_std']:.1f}"
                            for n in SINGLE_TEACHER_RUNS if n in runs)  # fmt: skip
        lines.append(f"- Two teachers (FCOS + RetinaNet, PKD; each alone: {singles}; the best single teacher on the "
                     f"tuning split: `{two['best_single']}`):")  # fmt: skip
        for n, c in two["rows"].items():
            lines.append(f"  - `{n}`: {100 * c['AP']:.1f} ± {100 * runs[n]['AP_std']:.1f}, {_delta_text(c)} against "
                         f"`{two['best_single']}`")  # fmt: skip
    for n, c in comp.get("online", {}).items():
        how = "learning from each other, deep mutual learning" if n == "mutual_pkd" else "distillation one-way"
        lines.append(f"- Online `{n}` (the teacher trained from scratch with the student, {how}) against the frozen "
                     f"teacher `{c['ref']}`: {_delta_text(c)}.")  # fmt: skip
    if "ema" in comp:
        lines.append(f"- EMA self-distillation `ema` against the baseline at equal steps: {_delta_text(comp['ema'])}.")
    for n, c in comp.get("against_teacher", {}).items():
        verdict = "passes its teacher" if c["delta_AP"] > 0 else "does not pass its teacher"
        if c["delta_AP"] > 0 and not c["beyond_spread"]:
            verdict += " (within the spread)"
        lines.append(
            f"- Born-again `{n}` (a student of the teacher's architecture, {runs[n].get('iterations') or 0:,} steps, "
            f"{len(runs[n]['seeds'])} seeds): AP {100 * c['AP']:.1f} ± {100 * runs[n]['AP_std']:.1f} against its "
            f"teacher's {100 * c['ref_AP']:.1f} (one run): {_delta_text(c)}; the student **{verdict}**."
        )
    for n, c in comp.get("relation", {}).items():
        lines.append(f"- Relation `{n}` against `{c['ref']}`: {_delta_text(c)}.")
    head = "Issue 15 (several teachers, teachers that learn; the spread is the larger seed std of the two rows):"
    return ["", head, "", *lines] if lines else []


def to_markdown(results: dict[str, Any]) -> str:
    meta, t, check = results["meta"], results["teacher"], results["regime"]
    curve = ", ".join(f"{int(s):,}: {100 * ap:.1f}" for s, ap in t.get("curve", []))
    lines = [
        *([f"**{meta['note']}**", ""] if meta.get("note") else []),
        f"Command: `{meta['command']}` on {meta['machine']}; {meta['total_wall_h']:.2f} h of runs so far, about "
        f"{meta['elapsed_h_estimate']:.2f} h elapsed (the teacher alone, then the students {meta['jobs']} at a time); "
        f"the whole plan: about {meta['plan_elapsed_h']:.1f} h elapsed with --jobs {meta['jobs']}. "
        f"Student init: {meta['student_init']}. AP after the last epoch on the val split, mean ± std over seeds.",
        "",
        f"Teacher {t['recipe']}: AP {100 * t['AP']:.1f} after {t['iterations']:,} steps ({t['wall_s'] / 60:.0f} min, "
        f"{t.get('threads', '?')} threads); val AP along the way (steps: AP) {curve}; "
        f"converged (last two within {100 * CONVERGED_AP:.0f} AP): {check['teacher_converged']}.",
    ]
    if "gap" in check:
        lines.append(
            f"Regime check: the baseline student trained for the teacher's whole schedule (`{GAP_RUN}`) reaches AP "
            f"{100 * check['baseline_teacher_schedule_AP']:.1f}, {100 * check['gap']:.1f} AP below the teacher "
            f"(required: >= {100 * MIN_GAP:.0f}): {'valid' if check['gap_ok'] else 'NOT VALID'}."
        )
    tune = check.get("tune") or {}
    if "gap" in tune:
        lines.append(
            f"The same check on the tuning split (the one the decision is taken on): teacher AP "
            f"{100 * tune['teacher_AP']:.1f}, `{GAP_RUN}` {100 * tune['baseline_teacher_schedule_AP']:.1f}, gap "
            f"{100 * tune['gap']:.1f} AP: {'valid' if tune['valid'] else 'NOT VALID'}."
        )
    lines += [
        "",
        "Train time: wall clock per run, training steps only (evaluations and resume gaps left out); CPU: the "
        "process's CPU time, which other jobs sharing the cores barely change (runs from 2026-12-03 on; one thread "
        "per run, so on an otherwise idle machine the two agree).",
        "",
        "| run | seeds | steps | AP | AP50 | APs | AP - baseline | gap closed | train time / run | CPU / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        gap = f"{100 * r['gap_closed']:.0f} %" if "gap_closed" in r else "—"
        delta = f"{100 * r['delta_AP']:+.1f}" if "delta_AP" in r else "—"
        cpu = f"{r['cpu_train_time_s'] / 60:.1f} min" if "cpu_train_time_s" in r else "—"
        lines.append(
            f"| {name} | {len(r['seeds'])} | {r.get('iterations') or 0:,} | {100 * r['AP']:.1f} ± "
            f"{100 * r['AP_std']:.1f} | {100 * r['AP50']:.1f} ± {100 * r['AP50_std']:.1f} | {100 * r['APs']:.1f} ± "
            f"{100 * r['APs_std']:.1f} | {delta} | {gap} | {r['train_time_s'] / 60:.1f} min | {cpu} |"
        )
    lines += issue15_markdown(results)
    if results.get("cost"):
        lines += ["", "Cost (`tools/compare.py`, the best run's student):", "", "```", results["cost"]["table"],
                  results["cost"]["headline"], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def measure_cost(recipe: str, student_ckpt: Optional[str], teacher_ckpt: str, tag: str) -> Optional[dict[str, Any]]:
    """The compression report of the pair (``tools/compare.py``, one thread); None when it fails."""
    out = RESULTS / f"cost_{tag}.json"
    cmd = [sys.executable, str(REPO / "tools" / "compare.py"), "--cfg", str(recipe_path(recipe)), "--teacher-ckpt",
           teacher_ckpt, "--threads", "1", "--json", str(out)]  # fmt: skip
    if student_ckpt:
        cmd += ["--ckpt", student_ckpt]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        print(f"[bench] compare.py failed: {proc.stderr[-2000:]}", flush=True)
        return None
    lines = proc.stdout.strip().splitlines()
    table = "\n".join(line for line in lines if not line.startswith(("teacher:", "student:")))
    report = json.loads(out.read_text())
    return {"table": table.rsplit("\n", 1)[0], "headline": report["headline"], **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short schedule, fewer runs (teacher cached)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these run names")
    parser.add_argument("--seeds", type=int, default=None, help="at most this many seeds per run (a partial pass)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (each gets cores / jobs threads)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per student run instead of cores / jobs (e.g. --jobs 1 --threads 1 leaves a "
                             "core free for other work)")  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: tabulate the runs already stored in results/runs"
    )
    parser.add_argument("--plan", action="store_true", help="print the runs still to do and the estimated time")
    parser.add_argument("--force", action="store_true", help="go on even when the regime check fails")
    parser.add_argument(
        "--teacher-dir", type=Path, default=TEACHER_DIR["root"],
        help="where the cached teachers are trained and kept (default work_dirs/bench; a relative path is relative "
        "to the repository)",
    )  # fmt: skip
    parser.add_argument(
        "--runs-dir", type=Path, default=RUNS_DIR["root"],
        help="where the students' runs are trained (default work_dirs/bench); keep it where it outlives the session "
        "so that a run cut off is resumed, not restarted",
    )  # fmt: skip
    args = parser.parse_args()
    TEACHER_DIR["root"] = args.teacher_dir if args.teacher_dir.is_absolute() else REPO / args.teacher_dir
    RUNS_DIR["root"] = args.runs_dir if args.runs_dir.is_absolute() else REPO / args.runs_dir
    mode = "quick" if args.quick else "full"
    tag = TAG[mode]
    opts = QUICK_STUDENT_OPTS if args.quick else []
    jobs = max(1, args.jobs)
    start = time.time()
    sys.path.insert(0, str(REPO))
    from detkd.config import load_config

    student_epochs = load_config(BENCH_CFG / "student.yaml", opts).train.epochs
    teacher_opts = QUICK_TEACHER_OPTS if args.quick else []
    teacher_cfg = load_config(BENCH_CFG / TEACHER_RECIPE, teacher_opts)
    teacher_path = RESULTS / "runs" / f"{tag}_teacher.json"
    # the cached benchmark teachers trained so far (id -> record)
    teachers = {
        tid: json.loads(p.read_text()) for tid in TEACHERS if (p := RESULTS / "runs" / f"{tag}_{tid}.json").is_file()
    }
    teacher = teachers.get("teacher")

    # the plan, in order: (phase, name, recipe, seed, opts)
    planned: list[tuple[str, str, str, int, list[str]]] = []
    if not args.quick:
        gap_opts = [*opts, f"train.epochs={teacher_cfg.train.epochs}"]
        planned += [("check", GAP_RUN, "student.yaml", s, gap_opts) for s in range(GAP_SEEDS)]
    for seed in range(MAX_SEEDS):
        for name, recipe, full_seeds, quick_seeds in RUNS:
            seeds = quick_seeds if args.quick else full_seeds
            if args.seeds is not None:
                seeds = min(seeds, args.seeds)
            if seed < seeds:
                planned.append(("steps", name, recipe, seed, opts))
    if args.only:
        planned = [p for p in planned if p[1] in args.only]

    stored = sorted((RESULTS / "runs").glob(f"{tag}_*_s*.json"))
    for path, reason in stale_records(stored):  # a changed recipe runs again; the old record is kept aside
        print(f"[bench] {path.name}: {reason}; set aside in {set_aside(path, reason).parent.name}/", flush=True)
    records: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((RESULTS / "runs").glob(f"{tag}_*_s*.json")):  # every stored run of this regime
        record = json.loads(path.read_text())
        if refresh_timing(record):
            _write_json(path, record)
        records.setdefault(record["run"], []).append(record)

    def step_times() -> dict[str, float]:
        """Seconds per step of the stored runs, per kind (:func:`run_kind`; defaults: :data:`DEFAULT_STEP_S`)."""
        measured: dict[str, list[float]] = {}
        for n, rs in records.items():
            if n.startswith("baseline") or _is_method(n):
                measured.setdefault(run_kind(n), []).extend(s for r in rs if (s := record_step_s(r)) is not None)
        out = {**DEFAULT_STEP_S, **{kind: statistics.median(v) for kind, v in measured.items() if v}}
        if teacher and teacher.get("step_s"):  # a benchmark teacher training alone
            out["teacher"] = teacher["step_s"]
        return out

    def full_plan() -> list[tuple[int, Any]]:
        return protocol_plan(student_epochs * ITERS_PER_EPOCH, teacher_cfg.train.epochs * ITERS_PER_EPOCH, opts)

    def teacher_hours(tids) -> dict[str, float]:
        """Estimated hours of the benchmark teachers among ``tids`` not trained yet (each alone)."""
        st = step_times()
        out = {}
        for tid in [t for t in TEACHERS if t in tids]:
            if tid not in teachers:
                cfg = load_config(BENCH_CFG / TEACHERS[tid], teacher_opts)
                out[tid] = cfg.train.epochs * ITERS_PER_EPOCH * st["teacher"] / 3600
        return out

    todo = [p for p in planned if not record_path(tag, p[1], p[3]).is_file()]
    # the second teachers the runs still to do learn from (the FCOS teacher is always needed)
    needed = {"teacher"} | teachers_needed(p[2] for p in todo if p[0] == "steps")
    if args.plan:
        print(f"{len(todo)} of {len(planned)} first-pass runs to do (then top-{TOP_K} seeds, wall-time, long runs):")
        for tid, hours in teacher_hours(needed).items():
            print(f"  teacher {tid} ({TEACHERS[tid]}, about {hours:.1f} h alone)")
        for phase, name, _, seed, _ in todo:
            print(f"  {phase:6s} {name} seed {seed}")
        st = step_times()
        teacher_h = sum(teacher_hours(needed).values())
        students_h = estimate_elapsed_h(full_plan(), st, jobs)
        per_step = ", ".join(f"{k} {v:.2f}" for k, v in st.items())
        print(f"estimated elapsed for the whole protocol with --jobs {jobs}: {students_h + teacher_h:.1f} h "
              f"(+ teachers {teacher_h:.1f} h); s/step {per_step}")  # fmt: skip
        return

    failures: list[str] = []
    if not args.report_only:  # the teacher alone, with every core
        try:
            teacher = teachers["teacher"] = ensure_teacher(
                TEACHER_RECIPE, f"{tag}_teacher", teacher_opts, publish=not args.quick
            )
        except RuntimeError as err:
            sys.exit(str(err))
        if not args.quick:
            ensure_loss_scales(teacher["checkpoint"])
    if teacher is None:
        sys.exit(f"no teacher yet ({teacher_path}): run without --report-only first")

    def ensure_other_teachers() -> None:
        """Train (alone, every core) the other benchmark teachers the planned runs need, score them on the tuning
        split; a failed teacher is reported, and only the runs that need it fail."""
        for tid in sorted(needed - {"teacher"}):
            per_run, THREADS["per_run"] = THREADS["per_run"], None
            try:
                teachers[tid] = ensure_teacher(TEACHERS[tid], f"{tag}_{tid}", teacher_opts, publish=not args.quick)
                if not args.quick:
                    tune_ap(teachers[tid], RESULTS / "runs" / f"{tag}_{tid}.json", TEACHERS[tid],
                            Path(teachers[tid]["checkpoint"]))  # fmt: skip
            except (RuntimeError, subprocess.CalledProcessError) as err:
                failures.append(f"teacher {tid}: {err}")
                print(f"[bench] FAILED teacher {tid}: {err}", flush=True)
            finally:
                THREADS["per_run"] = per_run

    # the students share the cores
    THREADS["per_run"] = student_threads(jobs, args.threads)

    def run_all(batch: list[tuple[str, str, int, list[str]]]) -> None:
        """Run (name, recipe, seed, opts) jobs ``jobs`` at a time; a failed run is reported, the others go on."""
        batch = [b for b in batch if not any(r["seed"] == b[2] for r in records.get(b[0], []))]
        for recipe in {r for _, r, _, _ in batch}:  # imports and config checks in this thread, before the workers
            is_distill_recipe(recipe_path(recipe))
            teacher_slots(recipe_path(recipe))
        for _, recipe, _, run_opts in batch:
            recipe_digest(recipe, tuple(run_opts))
        checkpoints = {tid: t["checkpoint"] for tid, t in teachers.items()}
        import detkd.engine.checkpoint  # noqa: F401  (final_student_weights, in the workers)

        def run_and_score(name: str, recipe: str, seed: int, run_opts: list[str]) -> dict[str, Any]:
            """Train one run and score it on the tuning split at once: a session may end before the batch does,
            and the next one may not have the run's weights any more."""
            record = run_student(name, recipe, seed, checkpoints, run_opts, tag)
            if not args.quick and (name == "baseline" or _is_method(name)) and "tune_AP" not in record:
                score_run_on_tune(record, tag)
            return record

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_and_score, n, r, s, o) for n, r, s, o in batch]
            for (name, _, seed, _), future in zip(batch, futures):
                try:
                    records.setdefault(name, []).append(future.result())
                except (RuntimeError, subprocess.CalledProcessError) as err:  # one failed run: the others go on
                    failures.append(f"{name} seed {seed}: {err}")
                    print(f"[bench] FAILED {name} seed {seed}: {err}", flush=True)
        if not args.quick:  # every choice after this batch is taken on the tuning split
            score_on_tune(records, tag)

    check = regime_check(teacher, records.get(GAP_RUN, []))
    check["tune"] = regime_check(teacher, records.get(GAP_RUN, []), "tune", "tune_AP")  # from stored evaluations
    if not args.report_only:
        run_all([(n, r, s, o) for phase, n, r, s, o in planned if phase == "check"])
        check = regime_check(teacher, records.get(GAP_RUN, []))
        if not args.quick:
            check["tune"] = tune_regime_check(teacher, f"{tag}_teacher", records.get(GAP_RUN, []), tag)
            print(f"[bench] regime check: {check}", flush=True)
        if not args.quick and not check["tune"]["valid"] and not args.force:
            print("[bench] the regime check failed on the tuning split; fix the regime (or --force)", flush=True)
        else:
            # the rows that learn from the teachers trained so far go first: a second teacher costs an hour or more,
            # and a session that ends before it is trained still adds the other rows
            steps = [(n, r, s, o) for phase, n, r, s, o in planned if phase == "steps"]
            ready = [b for b in steps if teachers_needed([b[1]]) <= set(teachers)]
            run_all(ready)
            ensure_other_teachers()
            run_all([b for b in steps if b not in ready])
            if not args.only and not args.quick:
                recipes = {name: recipe for name, recipe, _, _ in RUNS}
                derived = []
                best_feature = next(iter(ranked_methods(records, among=FEATURE_RUNS)), None)
                # the schedule row carries a recipe's losses onto the benchmark pair: only recipes of that pair (not
                # EMA, online, other or several teachers)
                pair_runs = [n for n, r, *_ in RUNS if uses_bench_pair(recipe_path(r))]
                best_any = next(iter(ranked_methods(records, among=pair_runs)), None)
                for name, addition, seeds in DERIVED:
                    base = best_any if addition == "schedule" else best_feature
                    if base is not None:
                        recipe = write_derived_recipe(name, addition, recipes[base])
                        derived += [(name, recipe, s, opts) for s in range(seeds)]
                run_all(derived)
                recipes.update({n: r for n, r, _, _ in derived})
                top = ranked_methods(records)[:TOP_K]
                run_all([(n, recipes[n], s, opts) for n in top for s in range(MAX_SEEDS)])
                ranked = ranked_methods(records)
                if ranked and "baseline" in records:
                    best = ranked[0]
                    name = wall_time_name(best)
                    wall = wall_time_opts(records, best, opts)
                    run_all([(name, "student.yaml", s, wall) for s in range(WALL_TIME_SEEDS)])
                    long = long_opts(opts, student_epochs)
                    run_all([(long_name(n), recipes[n], s, long) for n in ["baseline", *ranked[:LONG_TOP]]
                             for s in range(LONG_SEEDS)])  # fmt: skip
    order = [GAP_RUN] + [name for name, *_ in RUNS] + [name for name, *_ in DERIVED]
    names = sorted(records, key=lambda n: order.index(n) if n in order else len(order) + n.startswith("long_"))
    records = {n: sorted(records[n], key=lambda r: r["seed"]) for n in names if records[n]}

    def ref_ap(name: str) -> Optional[float]:
        ref = reference_of(name)
        return aggregate(records[ref], 0.0, None)["AP"] if ref in records else None

    runs = {name: aggregate(rs, teacher["AP"], ref_ap(name)) for name, rs in records.items()}
    ranked = ranked_methods(records)
    cost = None
    if ranked and not args.quick:
        best_work = REPO / records[ranked[0]][0]["work_dir"] if "work_dir" in records[ranked[0]][0] else None
        ckpt = best_work / "student_best.pth" if best_work else None
        recipe = recipe_of(ranked[0])
        if not uses_bench_pair(recipe_path(recipe)):  # the cost is the pair's: its student against the FCOS teacher
            recipe = "pkd.yaml"
        cost = measure_cost(recipe, str(ckpt) if ckpt and ckpt.is_file() else None, teacher["checkpoint"], tag)
    student_s = sum(r["wall_s"] for rs in records.values() for r in rs)
    results = {
        "meta": {
            "command": "python benchmarks/accuracy.py" + (" --quick" if args.quick else "") + f" --jobs {jobs}",
            "machine": _machine() + ", no GPU (this report)",
            "run_machines": machines_of([r for rs in records.values() for r in rs] + [teacher]),
            "student_init": "scratch (same seed -> same initial weights for every method)",
            "total_wall_h": (student_s + teacher["wall_s"]) / 3600,
            # the teacher trains alone, the students ``jobs`` at a time: the elapsed time of one uninterrupted run
            "elapsed_h_estimate": (student_s / jobs + teacher["wall_s"]) / 3600,
            "plan_elapsed_h": estimate_elapsed_h(full_plan(), step_times(), jobs) + teacher["wall_s"] / 3600,
            "jobs": jobs,
            "this_invocation_s": time.time() - start,
            "date": time.strftime("%Y-%m-%d"),
            "tag": tag,
        },
        "teacher": teacher,
        "teachers": teachers,
        "regime": check,
        "runs": runs,
        "issue15": issue15_comparisons(runs, teachers),
        "cost": cost,
    }
    done_first = sum(1 for p in planned if record_path(tag, p[1], p[3]).is_file())
    if done_first < len(planned) or (not args.quick and not any(n.startswith("long_") for n in records)):
        results["meta"]["note"] = (
            f"PARTIAL: {done_first} of the {len(planned)} first-pass runs are finished (then the top-{TOP_K} seeds, "
            "the wall-time baseline and the long schedule); the rest run with the same command (finished runs are "
            "skipped)."
        )
    out_name = "accuracy_quick" if args.quick else "accuracy"
    _write_json(RESULTS / f"{out_name}.json", results)
    (RESULTS / f"{out_name}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    if failures:
        sys.exit("failed runs (rerun the same command to retry them):\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
