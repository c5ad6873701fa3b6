"""Regenerate the README's results section from the files the benchmarks wrote (never typed by hand).

    python benchmarks/update_readme.py

Reads ``benchmarks/results/{accuracy,accuracy_quick,speed}.md`` and ``benchmarks/results/runs/*teacher*.json`` and
rewrites the text between ``<!-- RESULTS:BEGIN -->`` and ``<!-- RESULTS:END -->`` in README.md. Hand-written notes
on the results live in ``benchmarks/results/notes.md`` and are included after the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"


def teacher_section() -> list[str]:
    path = RESULTS / "runs" / "full_teacher.json"
    if not path.is_file():
        return []
    t = json.loads(path.read_text())
    return [
        "### The teacher config on synthetic data",
        "",
        f"`python tools/train.py --cfg configs/bench/{t['recipe']}` (RetinaNet R50-FPN256 from scratch, "
        f"{t['iterations']} steps of batch 8 at 128 px, the benchmark's synthetic setting: objects from 16 px, half "
        f"the default clutter) reached **val AP {100 * t['AP']:.1f}** (AP50 {100 * t['AP50']:.1f}, APs "
        f"{100 * t['APs']:.1f}, APm {100 * t['APm']:.1f}; no val object is large) after its last epoch, in "
        f"{t['wall_s'] / 60:.0f} min of wall time on this 2-core CPU machine (no GPU, 2 threads). `python "
        f"tools/eval.py --cfg configs/bench/{t['recipe']} --ckpt work_dirs/bench/full_teacher/last_weights.pth` "
        "reproduces the AP from the saved weights.",
        "",
    ]


def section(title: str, name: str, intro: str) -> list[str]:
    path = RESULTS / f"{name}.md"
    if not path.is_file():
        return []
    return [f"### {title}", "", intro, "", path.read_text().strip(), ""]


def build() -> str:
    lines = teacher_section()
    lines += section(
        "Accuracy: how much of the teacher-student gap each method closes",
        "accuracy",
        "From `benchmarks/results/accuracy.json` (`python benchmarks/accuracy.py --jobs 2`; resumable: finished runs "
        "are kept in `benchmarks/results/runs/` and skipped). Pair: RetinaNet R50-FPN256 teacher (2,400 steps) -> "
        "RetinaNet R18-FPN64 student (600 steps of batch 8, AdamW, from scratch) on 1,600 / 400 synthetic images at "
        "128 px (`configs/bench/`). Gap closed = (AP_distilled - AP_baseline) / (AP_teacher - AP_baseline); the "
        "`hetero_*` rows use their own baseline or teacher, and `baseline_same_wall_time_as_<best>` is the baseline "
        "trained for as long (in time) as the best distilled run (see the notes below the tables).",
    )
    lines += section(
        "Accuracy, quick mode",
        "accuracy_quick",
        "From `benchmarks/results/accuracy_quick.json` (`python benchmarks/accuracy.py --quick --jobs 2`: its own "
        "600-step teacher and 200-step students, a smoke test of the protocol, not a ranking).",
    )
    lines += section(
        "Cost: time and memory per training step",
        "speed",
        "From `benchmarks/results/speed.json` (`python benchmarks/speed.py`). Pairs: `retinanet` = RetinaNet "
        "R50-FPN256 teacher -> R18-FPN64 student; `faster_rcnn` = Faster R-CNN R50-FPN256 -> R18-FPN64. (a) student "
        "training step, (b) what the teacher adds (backbone+FPN, its head or its detections when the method needs "
        "them), (c) the distillation step; targets: overhead <= 1.10 and masks+losses <= 5 % for feature methods.",
    )
    notes = RESULTS / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    if not lines:
        lines = ["No benchmark has been run yet: `python benchmarks/accuracy.py` and `python benchmarks/speed.py`."]
    return "\n".join(lines).strip()


def main() -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{build()}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
