"""roi_kd's ROI budget (issue 16): does distilling only ``max_rois`` of the student's sampled ROIs change accuracy?

``roi_kd`` runs the teacher's box head on the ROIs the student samples (512 per image); ``max_rois`` keeps at most
that many per image, foreground first (``detkd.losses.head.ROI_KD_MAX_ROIS``, 128, is the default). This study
measures the accuracy side of that choice on a Faster R-CNN pair small enough for this CPU:

- data: the quickstart-style synthetic set pinned in ``configs/bench/roi_budget/_base_/data.yaml`` (800 train / 200
  val at 128 px, the quickstart preset's knobs at that size: objects from 32 px, a quarter of the default clutter;
  generated on first use in ``data/roi_budget``, deterministic);
- teacher: ``configs/bench/roi_budget/teacher.yaml``, Faster R-CNN R34-FPN64 from scratch, 800 steps, a learning curve
  every 200; trained once and cached (``<--teacher-dir>/roi_budget_teacher``), scored on val and the tuning split;
- student: Faster R-CNN R18-FPN32 from scratch, 400 steps, the same initialisation for every row (same seed);
- rows: the baseline (no distillation) and ``roi_kd`` with ``max_rois`` null (every sampled ROI), 128 and 32, the
  same loss otherwise, :data:`SEEDS` seeds each;
- every run's final weights are scored on the **tuning split** (``configs/bench/roi_budget/_base_/tune.yaml``,
  generator seed 1) and the **choice** is made there, by a rule fixed before any run (:func:`choose_budget`: the
  smallest budget whose mean tuning-split AP is not below the all-ROIs row's by more than the spread); the val AP
  after the last epoch is what the report shows;
- timing: not measured here (two runs share the cores); ``benchmarks/speed.py`` has the variants ``roi_kd_all``,
  ``roi_kd_256``, ``roi_kd`` (128), ``roi_kd_64`` and ``roi_kd_32`` for the step cost of each budget, and the report
  quotes them when their results are in ``benchmarks/results/``.

Every finished run is stored in ``benchmarks/results/runs/roi_budget_<run>_s<seed>.json`` and skipped when the
script runs again (an interrupted training resumes from its ``last.pth``). ``--jobs N`` runs N trainings at a time,
each with ``cores / N`` threads; the teacher trains alone first. Writes ``benchmarks/results/roi_kd_budget.{json,md}``.

    python benchmarks/roi_kd_budget.py --jobs 2          # the study (resumable)
    python benchmarks/roi_kd_budget.py --jobs 2 --teacher-dir checkpoints/bench --runs-dir checkpoints/bench_runs
    python benchmarks/roi_kd_budget.py --plan --jobs 2   # what is left, and how long it should take
    python benchmarks/roi_kd_budget.py --report-only     # tabulate the stored runs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as protocol  # noqa: E402  (the accuracy benchmark's helpers: run_tool, final_metrics, aggregate ...)

REPO = protocol.REPO
RESULTS = REPO / "benchmarks" / "results"
STUDY = "roi_budget"  # configs/bench/roi_budget/, runs/roi_budget_*.json, work_dirs/bench/roi_budget_*
TEACHER_RECIPE = f"{STUDY}/teacher.yaml"  # relative to configs/bench, as accuracy.py's recipes
TUNE_CFG = protocol.BENCH_CFG / STUDY / "_base_" / "tune.yaml"
# (run name, recipe relative to configs/bench); the roi_kd rows differ only in max_rois (BUDGETS)
RUNS: list[tuple[str, str]] = [
    ("baseline", f"{STUDY}/student.yaml"),
    ("roi_kd_all", f"{STUDY}/roi_kd_all.yaml"),
    ("roi_kd_128", f"{STUDY}/roi_kd_128.yaml"),
    ("roi_kd_32", f"{STUDY}/roi_kd_32.yaml"),
]
BUDGETS: dict[str, Optional[int]] = {"roi_kd_all": None, "roi_kd_128": 128, "roi_kd_32": 32}  # run -> max_rois
REFERENCE = "roi_kd_all"  # the budget rows are judged against distilling every sampled ROI
SEEDS = 2
ITERS_PER_EPOCH = 100  # 800 training images, batch 8
# seconds per step, one thread, two runs side by side, until stored runs give measured ones (estimates scaled from
# benchmarks/results/speed.md's Faster R-CNN R50-FPN256 -> R18-FPN64 pair at 2 threads: student step 1.28 s, roi_kd on
# every ROI 2.41 s; this pair is smaller); "teacher": the teacher training alone with every core
DEFAULT_STEP_S = {"teacher": 1.4, "baseline": 1.2, "roi_kd_all": 1.9, "roi_kd_128": 1.5, "roi_kd_32": 1.4}
# benchmarks/speed.py's Faster R-CNN variants for each budget of this study (the timing side of the choice)
SPEED_METHODS = {"roi_kd_all": "roi_kd_all", "roi_kd_128": "roi_kd", "roi_kd_32": "roi_kd_32"}
SPEED_COMMAND = (
    "python benchmarks/speed.py --pairs faster_rcnn --methods roi_kd_all roi_kd_256 roi_kd roi_kd_64 roi_kd_32 "
    "--out benchmarks/results/speed_roi_budget"
)
# under benchmarks/results/: written by SPEED_COMMAND, or by a full `python benchmarks/speed.py` (which has every
# budget variant); a file without the roi_kd_all row predates max_rois (its roi_kd row distilled every ROI) and is
# no budget comparison
SPEED_FILES = ("speed_roi_budget.json", "speed.json")


def record_path(name: str, seed: int) -> Path:
    return RESULTS / "runs" / f"{STUDY}_{name}_s{seed}.json"


def teacher_record_path() -> Path:
    return RESULTS / "runs" / f"{STUDY}_teacher.json"


def ensure_teacher() -> dict[str, Any]:
    """Train (once, alone with every core) and cache the study's teacher; returns its record."""
    return protocol.ensure_teacher(TEACHER_RECIPE, f"{STUDY}_teacher", [])


def training_command(recipe: str, seed: int, teacher_ckpt: str) -> tuple[str, list[str]]:
    """The tool and ``--opts`` of one run: its seed, no evaluation before the end, and (a distillation run) the
    cached teacher's checkpoint."""
    opts = [f"train.seed={seed}", "eval.interval=0"]
    if not protocol.is_distill_recipe(protocol.recipe_path(recipe)):
        return "train.py", opts
    return "train_distill.py", [*opts, f"teacher.checkpoint={teacher_ckpt}"]


def run_student(name: str, recipe: str, seed: int, teacher_ckpt: str) -> dict[str, Any]:
    """Train one run unless it is stored; returns its record (val metrics after the last epoch, time per step)."""
    out = record_path(name, seed)
    if out.is_file():
        return json.loads(out.read_text())
    work = protocol.RUNS_DIR["root"] / f"{STUDY}_{name}_s{seed}"
    script, opts = training_command(recipe, seed, teacher_ckpt)
    print(f"[roi_budget] {name} seed {seed}", flush=True)
    wall = protocol.run_tool(script, protocol.recipe_path(recipe), work, opts, work / "stdout.log")
    record = {"run": name, "seed": seed, "recipe": recipe, "wall_s": wall, "threads": protocol.THREADS["per_run"],
              "machine": protocol._machine(), "work_dir": protocol._repo_relative(work),
              **protocol.final_metrics(work)}  # fmt: skip
    protocol._write_json(out, record)
    # scored at once, so a session cut off before the end of the study keeps what the choice needs
    distilled = protocol.is_distill_recipe(protocol.recipe_path(recipe))
    tune_ap(record, out, recipe, protocol.final_student_weights(record), "student" if distilled else "model")
    return record


def tune_ap(record: dict[str, Any], record_file: Path, recipe: str, checkpoint: Path, model: str = "model") -> float:
    """The AP of a run's final weights on the study's tuning split (once; kept in its record)."""
    return protocol.tune_ap(record, record_file, recipe, checkpoint, model, tune_cfg=TUNE_CFG)


def score_on_tune(records: dict[str, list[dict[str, Any]]]) -> None:
    """Score every stored run's final weights on the tuning split, once each."""
    for name, rs in records.items():
        for r in rs:
            if "tune_AP" not in r and "work_dir" in r:
                distilled = protocol.is_distill_recipe(protocol.recipe_path(r["recipe"]))
                weights = protocol.final_student_weights(r)
                tune_ap(r, record_path(name, r["seed"]), r["recipe"], weights, "student" if distilled else "model")


def _stats(records: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in records]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def choose_budget(records: dict[str, list[dict[str, Any]]], seeds: int = SEEDS, key: str = "tune_AP") -> dict:
    """The rule, fixed before any run: among the budgets whose ``seeds`` runs are all scored on the tuning split,
    the smallest whose mean AP is not below :data:`REFERENCE`'s (every sampled ROI) by more than the spread (the
    larger of the two rows' seed standard deviations). ``chosen`` is None (with a ``reason``) until every budget
    row is complete; ``max_rois`` is the chosen budget (None: every ROI)."""
    complete = {n: rs for n, rs in records.items() if n in BUDGETS and len(rs) >= seeds and all(key in r for r in rs)}
    if set(complete) != set(BUDGETS):
        missing = sorted(set(BUDGETS) - set(complete))
        return {"chosen": None, "reason": f"pending: {', '.join(missing)} not yet finished and scored ({key})"}
    ref_mean, ref_std = _stats(complete[REFERENCE], key)
    rows = {}
    for name in BUDGETS:
        mean, std = _stats(complete[name], key)
        spread = max(std, ref_std)
        rows[name] = {"mean": mean, "std": std, "delta": mean - ref_mean, "spread": spread,
                      "within": mean >= ref_mean - spread}  # fmt: skip
    ok = [n for n in BUDGETS if rows[n]["within"]]  # the reference itself always is
    chosen = min(ok, key=lambda n: math.inf if BUDGETS[n] is None else BUDGETS[n])
    return {"chosen": chosen, "max_rois": BUDGETS[chosen], "split": key, "rows": rows}


def speed_rows(results_dir: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """The step cost of each budget from ``benchmarks/speed.py``'s results (the first of :data:`SPEED_FILES` with
    any of its Faster R-CNN roi_kd variants): ``{"file", "meta", "rows": {run: {"method", "overhead", ...}}}``, or
    None."""
    for file in SPEED_FILES:
        path = (results_dir or RESULTS) / file
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        by_method = {r["method"]: r for r in data.get("rows", []) if r.get("pair") == "faster_rcnn"}
        if "roi_kd_all" not in by_method:
            continue
        rows = {}
        for run, method in SPEED_METHODS.items():
            if method in by_method:
                r = by_method[method]
                rows[run] = {"method": method, "overhead": r["overhead"], "distill_s": r["distill"]["median_s"],
                             "loss_share": r.get("loss_share")}  # fmt: skip
        if rows:
            return {"file": file, "meta": data.get("meta", {}), "rows": rows}
    return None


def estimate_elapsed_h(todo: list[tuple[str, int]], step_s: dict[str, float], jobs: int) -> float:
    """Elapsed hours of the runs still to do (``(run name, steps)``), ``jobs`` at a time, plus a minute each."""
    total = sum(steps * step_s[name] + 60.0 for name, steps in todo)
    return total / max(jobs, 1) / 3600


def to_markdown(results: dict[str, Any]) -> str:
    meta, t, runs, choice = results["meta"], results["teacher"], results["runs"], results["choice"]
    curve = ", ".join(f"{int(s):,}: {100 * ap:.1f}" for s, ap in t.get("curve", []))
    tune = f", tuning split {100 * t['tune_AP']:.1f}" if "tune_AP" in t else ""
    lines = [
        *([f"**{meta['note']}**", ""] if meta.get("note") else []),
        f"Command: `{meta['command']}` on {meta['machine']}; {meta['total_wall_h']:.2f} h of runs so far. "
        f"roi_kd's `max_rois` on a Faster R-CNN pair (issue 16): AP after the last epoch, mean ± std over seeds; "
        f"the choice is made on the tuning split (generator seed 1), the val split is reported.",
        "",
        f"Teacher {t['recipe']} (Faster R-CNN R34-FPN64 from scratch): val AP {100 * t['AP']:.1f}{tune} after "
        f"{t['iterations']:,} steps ({t['wall_s'] / 60:.0f} min); val AP along the way (steps: AP) {curve}; "
        f"converged (last two within 1 AP): {protocol.converged(t.get('curve', []))}. Student: Faster R-CNN "
        f"R18-FPN32 from scratch, the same initial weights in every row of a seed.",
    ]
    base = runs.get("baseline")
    if base is not None and t["AP"] <= base["AP"]:
        lines.append(
            f"**The teacher (AP {100 * t['AP']:.1f}) is not above the baseline student ({100 * base['AP']:.1f}): "
            "there is little to distil, and the budget rows cannot show an effect. Train the teacher longer.**"
        )
    lines += [
        "",
        "| run | max_rois | seeds | steps | AP | AP50 | AP - baseline | AP on the tuning split | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        budget = "—" if name not in BUDGETS else ("all" if BUDGETS[name] is None else str(BUDGETS[name]))
        delta = f"{100 * r['delta_AP']:+.1f}" if "delta_AP" in r else "—"
        tune_ap_ = f"{100 * r['tune_AP']:.1f}" if "tune_AP" in r else "—"
        lines.append(
            f"| {name} | {budget} | {len(r['seeds'])} | {r.get('iterations') or 0:,} | {100 * r['AP']:.1f} ± "
            f"{100 * r['AP_std']:.1f} | {100 * r['AP50']:.1f} ± {100 * r['AP50_std']:.1f} | {delta} | {tune_ap_} | "
            f"{r['step_s']:.2f} |"
        )
    lines.append("")
    default = results["default_max_rois"]
    if choice["chosen"] is None:
        lines.append(f"Choice: {choice['reason']}.")
    else:
        parts = []
        for n, c in choice["rows"].items():
            if n != REFERENCE:
                where = "within" if c["within"] else "beyond"
                parts.append(f"`{n}` {100 * c['delta']:+.1f} AP (spread {100 * c['spread']:.1f}: {where})")
        picked = "all" if choice["max_rois"] is None else choice["max_rois"]
        if choice["max_rois"] == default:
            verdict = "confirms the default"
        elif choice["max_rois"] is None:
            verdict = f"argues against any budget: the default {default} loses AP beyond the spread"
        elif choice["max_rois"] < default:
            verdict = f"is smaller than the default ({default}): it loses no AP beyond the spread"
        else:
            verdict = f"is larger than the default ({default}), which loses AP beyond the spread"
        lines.append(
            f"Choice on the tuning split (rule fixed before any run: the smallest budget whose mean AP is not below "
            f"`{REFERENCE}`'s by more than the spread, the larger seed std of the two rows): against `{REFERENCE}`, "
            f"{'; '.join(parts)}. Chosen: **max_rois {picked}**, which {verdict} "
            f"(`ROI_KD_MAX_ROIS = {default}` in detkd/losses/head.py)."
        )
    lines += [
        "",
        "Timing (the other half of the choice): `benchmarks/speed.py` measures the step cost of each budget with its "
        "`roi_kd_all`, `roi_kd_256`, `roi_kd` (128), `roi_kd_64` and `roi_kd_32` variants (Faster R-CNN R50-FPN256 -> "
        f"R18-FPN64, the speed benchmark's pair): `{SPEED_COMMAND}`.",
    ]
    speed = results.get("speed")
    if speed:
        cost = ", ".join(f"`{n}` ({s['method']}) {s['overhead']:.2f} x" for n, s in speed["rows"].items())
        lines.append(
            f"From `benchmarks/results/{speed['file']}` ({speed['meta'].get('threads', '?')} threads, batch "
            f"{speed['meta'].get('batch', '?')}): step cost c / (a + b) {cost}."
        )
    else:
        lines.append("No speed results with these variants are stored yet.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (each gets cores / jobs threads)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these run names")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tabulate the stored runs")
    parser.add_argument("--plan", action="store_true", help="print the runs still to do and the estimated time")
    parser.add_argument("--teacher-dir", type=Path, default=protocol.TEACHER_DIR["root"],
                        help="where the study's teacher is trained and kept (as accuracy.py's)")  # fmt: skip
    parser.add_argument("--runs-dir", type=Path, default=protocol.RUNS_DIR["root"],
                        help="where the students' work dirs live (keep them past the session)")  # fmt: skip
    args = parser.parse_args()
    jobs = max(1, args.jobs)
    protocol.TEACHER_DIR["root"] = args.teacher_dir if args.teacher_dir.is_absolute() else REPO / args.teacher_dir
    protocol.RUNS_DIR["root"] = args.runs_dir if args.runs_dir.is_absolute() else REPO / args.runs_dir
    start = time.time()
    sys.path.insert(0, str(REPO))
    from detkd.config import load_config
    from detkd.losses.head import ROI_KD_MAX_ROIS

    planned = [(n, r, s) for s in range(SEEDS) for n, r in RUNS if args.only is None or n in args.only]
    records: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((RESULTS / "runs").glob(f"{STUDY}_*_s*.json")):
        record = json.loads(path.read_text())
        records.setdefault(record["run"], []).append(record)
    teacher = json.loads(teacher_record_path().read_text()) if teacher_record_path().is_file() else None
    todo = [p for p in planned if not record_path(p[0], p[2]).is_file()]

    if args.plan:
        step_s = dict(DEFAULT_STEP_S)
        for name, rs in records.items():
            measured = [r["step_s"] for r in rs if r.get("step_s")]
            if measured:
                step_s[name] = statistics.median(measured)
        steps = {n: load_config(protocol.recipe_path(r)).train.epochs * ITERS_PER_EPOCH for n, r in RUNS}
        teacher_h = 0.0
        if teacher is None:
            teacher_h = load_config(protocol.recipe_path(TEACHER_RECIPE)).train.epochs * ITERS_PER_EPOCH
            teacher_h *= step_s["teacher"] / 3600
        print(f"{len(todo)} of {len(planned)} runs to do:")
        if teacher is None:
            print(f"  teacher {TEACHER_RECIPE} (about {teacher_h:.1f} h alone)")
        for name, _, seed in todo:
            print(f"  {name} seed {seed}")
        students_h = estimate_elapsed_h([(n, steps[n]) for n, _, _ in todo], step_s, jobs)
        per_step = ", ".join(f"{k} {v:.2f}" for k, v in step_s.items())
        print(f"estimated elapsed with --jobs {jobs}: {students_h + teacher_h:.1f} h (teacher {teacher_h:.1f} h, "
              f"then the students {jobs} at a time); s/step {per_step}")  # fmt: skip
        return

    failures: list[str] = []
    if not args.report_only:
        teacher = ensure_teacher()
        tune_ap(teacher, teacher_record_path(), TEACHER_RECIPE, Path(teacher["checkpoint"]))
    if teacher is None:
        sys.exit(f"no teacher yet ({teacher_record_path()}): run without --report-only first")
    if not args.report_only:
        protocol.THREADS["per_run"] = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        for _, recipe, _ in todo:  # config loading and imports in this thread, before the workers
            protocol.is_distill_recipe(protocol.recipe_path(recipe))
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_student, n, r, s, teacher["checkpoint"]) for n, r, s in todo]
            for (name, _, seed), future in zip(todo, futures):
                try:
                    records.setdefault(name, []).append(future.result())
                except RuntimeError as err:  # one failed run must not throw away the others
                    failures.append(f"{name} seed {seed}: {err}")
                    print(f"[roi_budget] FAILED {name} seed {seed}: {err}", flush=True)
        try:
            score_on_tune(records)
        except subprocess.CalledProcessError as err:
            failures.append(f"scoring on the tuning split: {err}")

    order = [n for n, _ in RUNS]
    records = {n: sorted(records[n], key=lambda r: r["seed"]) for n in order if records.get(n)}
    base_ap = protocol.aggregate(records["baseline"], 0.0, None)["AP"] if "baseline" in records else None
    runs = {}
    for name, rs in records.items():
        runs[name] = protocol.aggregate(rs, teacher["AP"], None if name == "baseline" else base_ap)
        runs[name]["step_s"] = statistics.mean(r.get("step_s", 0.0) for r in rs)
    everything = [(n, s) for s in range(SEEDS) for n, _ in RUNS]  # --only runs part of it
    done = sum(1 for n, s in everything if record_path(n, s).is_file())
    results = {
        "meta": {
            "command": f"python benchmarks/roi_kd_budget.py --jobs {jobs}",
            "machine": protocol._machine() + ", no GPU (this report)",
            "run_machines": protocol.machines_of([r for rs in records.values() for r in rs] + [teacher]),
            "total_wall_h": (sum(r["wall_s"] for rs in records.values() for r in rs) + teacher["wall_s"]) / 3600,
            "jobs": jobs,
            "this_invocation_s": time.time() - start,
            "date": time.strftime("%Y-%m-%d"),
        },
        "default_max_rois": ROI_KD_MAX_ROIS,
        "teacher": teacher,
        "runs": runs,
        "choice": choose_budget(records),
        "speed": speed_rows(),
    }
    if done < len(everything):
        results["meta"]["note"] = (
            f"PARTIAL: {done} of the {len(everything)} runs are finished; the rest run with the same command "
            "(finished runs are skipped)."
        )
    protocol._write_json(RESULTS / "roi_kd_budget.json", results)
    (RESULTS / "roi_kd_budget.md").write_text(to_markdown(results))
    print(to_markdown(results))
    if failures:
        sys.exit("failed (rerun the same command to retry):\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
