"""Accuracy benchmark: how much of the teacher-student gap does each detkd method close, on data anyone can make?

Protocol (see the README's "Benchmarks" section and DESIGN.md):

- data: the synthetic set of ``configs/bench/_base_/data.yaml`` (generated on first use, deterministic);
- teacher: ``configs/bench/teacher.yaml`` (RetinaNet R50-FPN256, a longer schedule), trained once and cached;
- student: ``configs/bench/student.yaml`` (RetinaNet R18-FPN64 from scratch), every method with the same schedule and
  the same initialisation (same seed -> same initial weights), several seeds;
- one heterogeneous pair: the RetinaNet teacher -> an FCOS R18 student (its gap is measured against the FCOS
  baseline ``hetero_baseline_fcos``);
- the baseline student is also trained for the same wall-clock time as the best distilled run (a distillation
  step costs more), so the table says whether distillation beats simply training the student longer;
- AP is the val AP after the **last** epoch (no checkpoint picking on the reported split).

Every finished run is stored in ``benchmarks/results/runs/<run>.json`` and skipped when the script runs again, so
the benchmark can be completed over several invocations. ``--quick`` trains its own short teacher and a few students
on a short schedule (under 15 minutes on a 2-core CPU). ``--jobs N`` runs N trainings at a time, each with
``cores / N`` threads (``OMP_NUM_THREADS``). Runs are scheduled seed by seed, so the first seeds of every method
finish before the extra seeds. A failed run is reported and the others go on.

    python benchmarks/accuracy.py --jobs 2            # full: results/accuracy.{json,md}
    python benchmarks/accuracy.py --quick --jobs 2    # results/accuracy_quick.{json,md}
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import platform
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
    ("cwd_logit_kd", "combo_cwd.yaml", 2, 0),  # the best feature + the best head method of the single runs
    ("hetero_baseline_fcos", "hetero_fcos_baseline.yaml", 2, 0),
    ("hetero_retinanet_to_fcos", "hetero_fcos.yaml", 2, 0),
    ("hetero_fcos_to_retinanet", "hetero_fcos_to_retinanet.yaml", 2, 0),
]
# runs measured against another baseline than "baseline", or distilled from another teacher than teacher.yaml
BASELINE_OF = {"hetero_retinanet_to_fcos": "hetero_baseline_fcos"}
TEACHER_OF = {"hetero_fcos_to_retinanet": ("teacher_fcos.yaml", "teacher_fcos")}  # run -> (recipe, tag suffix)
TOP_K = 3  # the top distilled methods (by mean AP after the first pass) are run with MAX_SEEDS seeds
MAX_SEEDS = 3
WALL_TIME_SEEDS = 2
QUICK_TEACHER_OPTS = ["train.epochs=3"]  # 600 teacher steps
QUICK_STUDENT_OPTS = ["train.epochs=1"]  # 200 student steps
THREADS = {"per_run": None}  # set from --jobs in main()


def run_tool(script: str, recipe: Path, work_dir: Path, opts: list[str], log: Path) -> float:
    """Run a detkd tool in a fresh process (as a user would); returns its wall time. Output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if THREADS["per_run"]:
        env["OMP_NUM_THREADS"] = str(THREADS["per_run"])
    cmd = [sys.executable, str(REPO / "tools" / script), "--cfg", str(recipe), "--work-dir", str(work_dir),
           "--no-progress", "--opts", *opts]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {recipe.name} failed (exit {proc.returncode}); see {log}")
    return time.time() - start


def final_metrics(work_dir: Path) -> dict[str, Any]:
    """The val metrics after the last epoch (from the run's metrics.jsonl)."""
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["type"] == "val"]
    trains = [r for r in records if r["type"] == "train"]
    if not vals:
        raise RuntimeError(f"{work_dir}: no val record in metrics.jsonl")
    iters = trains[-1]["iter"] if trains else 0
    epochs = max(r["epoch"] for r in trains) + 1 if trains else 1
    per_step = (trains[-1]["time"] - trains[0]["time"]) / max(iters - trains[0]["iter"], 1) if trains else 0.0
    return {**vals[-1], "iterations": iters, "iters_per_epoch": iters // epochs, "train_time_s": per_step * iters}


def ensure_teacher(recipe: str, tag: str, opts: list[str]) -> dict[str, Any]:
    """Train (once) and cache a teacher; returns its record (AP, wall time, checkpoint path)."""
    record_path = RESULTS / "runs" / f"{tag}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    work = REPO / "work_dirs" / "bench" / tag
    print(f"[bench] training teacher {recipe} -> {work}", flush=True)
    wall = run_tool("train.py", BENCH_CFG / recipe, work, opts, work / "stdout.log")  # the recipe's eval interval
    metrics = final_metrics(work)
    record = {"run": tag, "recipe": recipe, "wall_s": wall, "checkpoint": str(work / "last_weights.pth"), **metrics}
    _export_last_weights(work)
    _write_json(record_path, record)
    return record


def _export_last_weights(work: Path) -> None:
    """The teacher the students learn from is the model after the last epoch (not picked on val)."""
    import torch

    ckpt = torch.load(work / "last.pth", map_location="cpu", weights_only=True)
    torch.save({"model": ckpt["model"]}, work / "last_weights.pth")


@functools.cache
def is_distill_recipe(path: Path) -> bool:
    """Whether a recipe has a teacher. Answered once per recipe, from the main thread (see ``run_all``): the worker
    threads must not import detkd/torchvision for the first time concurrently, or one of them sees a partially
    initialised module; they only read the cached answer."""
    sys.path.insert(0, str(REPO))
    from detkd.config import load_config

    return load_config(path).teacher is not None


def run_student(name: str, recipe: str, seed: int, teacher_ckpt: str, opts: list[str], tag: str) -> dict[str, Any]:
    record_path = RESULTS / "runs" / f"{tag}_{name}_s{seed}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    work = REPO / "work_dirs" / "bench" / f"{tag}_{name}_s{seed}"
    path = BENCH_CFG / recipe
    is_distill = is_distill_recipe(path)
    run_opts = [f"train.seed={seed}", "eval.interval=0", *opts]
    if is_distill:
        run_opts.append(f"teacher.checkpoint={teacher_ckpt}")
    print(f"[bench] {name} seed {seed}", flush=True)
    wall = run_tool("train_distill.py" if is_distill else "train.py", path, work, run_opts, work / "stdout.log")
    record = {"run": name, "seed": seed, "recipe": recipe, "wall_s": wall, "threads": THREADS["per_run"],
              **final_metrics(work)}  # fmt: skip
    _write_json(record_path, record)
    return record


def _mean_time(records: list[dict[str, Any]]) -> float:
    return statistics.mean(r["train_time_s"] for r in records)


def _best_distilled(records: dict[str, list[dict[str, Any]]]) -> Optional[str]:
    """The distilled run with the highest mean AP (hetero pairs and baselines excluded)."""
    candidates = {
        name: statistics.mean(r["AP"] for r in rs)
        for name, rs in records.items()
        if not name.startswith(("baseline", "hetero"))
    }
    return max(candidates, key=candidates.get) if candidates else None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def aggregate(records: list[dict[str, Any]], teacher_ap: float, baseline_ap: Optional[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
    for key in ("AP", "AP50", "APs"):
        values = [r[key] for r in records]
        out[key] = statistics.mean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["train_time_s"] = statistics.mean(r["train_time_s"] for r in records)
    if baseline_ap is not None:
        out["delta_AP"] = out["AP"] - baseline_ap
    if baseline_ap is not None and teacher_ap > baseline_ap:
        out["gap_closed"] = (out["AP"] - baseline_ap) / (teacher_ap - baseline_ap)
    return out


def to_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    t = results["teacher"]
    lines = [
        *([f"**{meta['note']}**", ""] if meta.get("note") else []),
        f"Command: `{meta['command']}` on {meta['machine']}; {meta['total_wall_h']:.2f} h of runs in total, "
        f"about {meta['elapsed_h_estimate']:.2f} h elapsed (teachers alone, then the students {meta['jobs']} at a "
        "time). "
        f"Student init: {meta['student_init']}. AP after the last epoch on the val split, mean ± std over seeds.",
        "",
        f"Teacher {t['recipe']}: AP {100 * t['AP']:.1f} (trained once, {t['wall_s'] / 60:.0f} min).",
        *[
            f"Teacher of {', '.join(n for n, (r, _) in TEACHER_OF.items() if r == o['recipe'])}: {o['recipe']}, "
            f"AP {100 * o['AP']:.1f} ({o['wall_s'] / 60:.0f} min)."
            for o in results.get("other_teachers", {}).values()
        ],
        "",
        "| run | seeds | AP | AP50 | APs | AP - baseline | gap closed | train time / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        gap = f"{100 * r['gap_closed']:.0f} %" if "gap_closed" in r else "—"
        delta = f"{100 * r['delta_AP']:+.1f}" if "delta_AP" in r else "—"
        lines.append(
            f"| {name} | {len(r['seeds'])} | {100 * r['AP']:.1f} ± {100 * r['AP_std']:.1f} | "
            f"{100 * r['AP50']:.1f} ± {100 * r['AP50_std']:.1f} | {100 * r['APs']:.1f} ± {100 * r['APs_std']:.1f} | "
            f"{delta} | {gap} | {r['train_time_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short schedule, fewer runs (< 15 min, teacher cached)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these run names")
    parser.add_argument("--seeds", type=int, default=None, help="at most this many seeds per run (a partial pass)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (each gets cores / jobs threads)")
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: tabulate the runs already stored in results/runs"
    )
    args = parser.parse_args()
    tag = "quick" if args.quick else "full"
    opts = QUICK_STUDENT_OPTS if args.quick else []
    jobs = max(1, args.jobs)
    start = time.time()
    if args.report_only:
        teacher = json.loads((RESULTS / "runs" / f"{tag}_teacher.json").read_text())
    else:  # the teacher alone, with every core
        teacher = ensure_teacher("teacher.yaml", f"{tag}_teacher", QUICK_TEACHER_OPTS if args.quick else [])
    teachers = {"teacher": teacher}  # key -> teacher record
    planned: list[tuple[str, str, int]] = []  # (name, recipe, seed), seed by seed
    for seed in range(MAX_SEEDS):
        for name, recipe, full_seeds, quick_seeds in RUNS:
            seeds = quick_seeds if args.quick else full_seeds
            if args.seeds is not None:
                seeds = min(seeds, args.seeds)
            if seed < seeds and not (args.only and name not in args.only):
                planned.append((name, recipe, seed))
    for recipe, suffix in {TEACHER_OF[n] for n, _, _ in planned if n in TEACHER_OF}:
        if args.report_only:
            path = RESULTS / "runs" / f"{tag}_{suffix}.json"
            if path.is_file():  # absent: its runs have not started either
                teachers[suffix] = json.loads(path.read_text())
        else:
            teachers[suffix] = ensure_teacher(recipe, f"{tag}_{suffix}", [])

    # teachers train alone with every core; the students share the cores
    THREADS["per_run"] = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def teacher_of(name: str) -> dict[str, Any]:
        return teachers[TEACHER_OF[name][1]] if name in TEACHER_OF else teacher

    records: dict[str, list[dict[str, Any]]] = {}
    failures: list[str] = []

    def run_all(batch: list[tuple[str, str, int, list[str]]]) -> None:
        """Run (name, recipe, seed, opts) jobs ``jobs`` at a time; a failed run is reported, the others go on."""
        for recipe in {r for _, r, _, _ in batch}:  # imports and config checks in this thread, before the workers
            is_distill_recipe(BENCH_CFG / recipe)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_student, n, r, s, teacher_of(n)["checkpoint"], o, tag) for n, r, s, o in batch]
            for (name, _, seed, _), future in zip(batch, futures):
                try:
                    records.setdefault(name, []).append(future.result())
                except RuntimeError as err:  # one failed run must not throw away the others' hours
                    failures.append(f"{name} seed {seed}: {err}")
                    print(f"[bench] FAILED {name} seed {seed}: {err}", flush=True)

    if args.report_only:  # every stored run of this mode, extra seeds and the wall-time baseline included
        wanted = {n for n, _, _ in planned}
        for path in sorted((RESULTS / "runs").glob(f"{tag}_*_s*.json")):
            record = json.loads(path.read_text())
            if not args.only or record["run"] in wanted:
                records.setdefault(record["run"], []).append(record)
    else:
        run_all([(name, recipe, seed, opts) for name, recipe, seed in planned])
        if not args.only and not args.quick:
            # the top methods get a third seed (the protocol: 3 seeds for the baseline and the top methods)
            recipes = {name: recipe for name, recipe, _, _ in RUNS}
            means = {n: statistics.mean(r["AP"] for r in rs) for n, rs in records.items() if n in recipes}
            top = sorted((n for n in means if not n.startswith(("baseline", "hetero"))), key=means.get)[-TOP_K:]
            run_all([(n, recipes[n], s, opts) for n in top for s in range(len(records[n]), MAX_SEEDS)])
    order = [name for name, *_ in RUNS]  # the table follows RUNS; extra runs (wall-time baseline) go last
    names = sorted(records, key=lambda n: order.index(n) if n in order else len(order))
    records = {n: sorted(records[n], key=lambda r: r["seed"]) for n in names if records[n]}
    best = _best_distilled(records)
    if best is not None and "baseline" in records and not (args.only or args.report_only or args.quick):
        # the baseline given the wall time of the best distilled run: a distillation step costs more, so the fair
        # question is whether distillation beats simply training the student longer
        ratio = _mean_time(records[best]) / _mean_time(records["baseline"])
        steps = round(records["baseline"][0]["iterations"] * ratio)
        wall_opts = [*opts, f"train.epochs={math.ceil(steps / records['baseline'][0]['iters_per_epoch'])}",
                     f"train.max_iters={steps}"]  # fmt: skip
        name = f"baseline_same_wall_time_as_{best}"
        run_all([(name, "student.yaml", s, wall_opts) for s in range(WALL_TIME_SEEDS)])

    def reference(name: str) -> Optional[float]:
        """The mean AP of the baseline a run is compared with (None for baselines)."""
        if name.startswith("baseline") or name in BASELINE_OF.values():
            return None
        base_name = BASELINE_OF.get(name, "baseline")
        return aggregate(records[base_name], 0.0, None)["AP"] if base_name in records else None

    runs = {name: aggregate(rs, teacher_of(name)["AP"], reference(name)) for name, rs in records.items()}
    student_s = sum(r["wall_s"] for rs in records.values() for r in rs)
    teacher_s = sum(t["wall_s"] for t in teachers.values())
    results = {
        "meta": {
            "command": "python benchmarks/accuracy.py" + (" --quick" if args.quick else "") + f" --jobs {jobs}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
            "student_init": "scratch (same seed -> same initial weights for every method)",
            "total_wall_h": (student_s + teacher_s) / 3600,
            # the teachers train alone, the students ``jobs`` at a time: the elapsed time of one uninterrupted run
            "elapsed_h_estimate": (student_s / jobs + teacher_s) / 3600,
            "jobs": jobs,
            "this_invocation_s": time.time() - start,
            "date": time.strftime("%Y-%m-%d"),
        },
        "teacher": teacher,
        "other_teachers": {k: v for k, v in teachers.items() if k != "teacher"},
        "runs": runs,
    }
    finished = sum(len(records.get(name, [])) for name in {n for n, _, _ in planned})
    if args.report_only and finished < len(planned):
        results["meta"]["note"] = (
            f"PARTIAL: {finished} of the {len(planned)} planned runs are finished; the rest run with the same "
            f"command (finished runs are skipped)."
        )
    name = "accuracy_quick" if args.quick else "accuracy"
    _write_json(RESULTS / f"{name}.json", results)
    (RESULTS / f"{name}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    if failures:
        sys.exit("failed runs (rerun the same command to retry them):\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
