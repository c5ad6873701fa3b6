"""Regenerate the README's results section from the files the benchmarks wrote (never typed by hand).

    python benchmarks/update_readme.py

Reads ``benchmarks/results/{accuracy,accuracy_quick,speed}.md`` and the current regime's teacher record
(``benchmarks/results/runs/<tag>_teacher.json``) and
rewrites the text between ``<!-- RESULTS:BEGIN -->`` and ``<!-- RESULTS:END -->`` in README.md. Hand-written notes
on the results live in ``benchmarks/results/notes.md`` and are included after the tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"


def _regime_tag() -> str:
    """The current regime's record prefix (``benchmarks/accuracy.py``'s ``TAG["full"]``, e.g. ``v3``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_accuracy_tag", REPO / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TAG["full"]


def _describe_model(recipe: str) -> str:
    """E.g. ``FCOS R18-FPN128``, from the recipe's ``model``."""
    sys.path.insert(0, str(REPO))
    from detkd.config import load_config

    m = load_config(REPO / "configs" / "bench" / recipe).model
    backbone = m.backbone.replace("resnet", "R").replace("mobilenet_v3_", "MobileNetV3-")
    return f"{m.arch.replace('retinanet', 'RetinaNet').replace('fcos', 'FCOS')} {backbone}-FPN{m.fpn_channels}"


def teacher_section() -> list[str]:
    tag = _regime_tag()
    path = RESULTS / "runs" / f"{tag}_teacher.json"
    if not path.is_file():
        steps = _teacher_steps()
        return [
            "### The benchmark teacher",
            "",
            f"The regime-{tag} teacher (`configs/bench/teacher.yaml`, {_describe_model('teacher.yaml')} from scratch, "
            f"{steps:,} steps) has not finished training yet: `python benchmarks/accuracy.py --jobs 2` trains it "
            "first (resumable).",
            "",
        ]
    t = json.loads(path.read_text())
    curve = ", ".join(f"{int(steps):,}: {100 * ap:.1f}" for steps, ap in t.get("curve", []))
    published = ""
    if t.get("published_as"):
        f32 = t.get("float32", {})
        published = (
            f" The students learn from the {t['published_as']} copy kept in the repository, `{t['checkpoint']}` "
            f"(sha256 `{t['sha256'][:12]}…`), which scores val AP {100 * t['AP']:.1f} and tuning-split AP "
            f"{100 * t['tune_AP']:.1f} (the float32 weights: {100 * f32.get('AP', float('nan')):.1f}), so every "
            "session and machine uses the same teacher."
        )
    return [
        "### The benchmark teacher",
        "",
        f"`python tools/train.py --cfg configs/bench/{t['recipe']}` ({_describe_model(t['recipe'])} from scratch, "
        f"{t['iterations']:,} steps of batch 8 at 128 px, the `bench` preset of the synthetic generator: objects from "
        f"16 px, half the default clutter) reached **val AP {100 * t['AP']:.1f}** (AP50 {100 * t['AP50']:.1f}, APs "
        f"{100 * t['APs']:.1f}, APm {100 * t['APm']:.1f}) after its last epoch, in {t['wall_s'] / 60:.0f} min of wall "
        f"time on a 2-core CPU machine ({t.get('machine', 'no GPU')}, {t.get('threads', 2)} threads). Val AP along "
        f"the way (steps: AP, the float32 weights): {curve}.{published} `python tools/eval.py --cfg "
        f"configs/bench/{t['recipe']} --ckpt {t['checkpoint']}` reproduces the AP from the saved weights.",
        "",
    ]


def _teacher_steps() -> int:
    """The benchmark teacher's schedule in steps (its recipe's epochs x 200 iterations of batch 8)."""
    sys.path.insert(0, str(REPO))
    from detkd.config import load_config

    return load_config(REPO / "configs" / "bench" / "teacher.yaml").train.epochs * 200


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
        f"are kept in `benchmarks/results/runs/{_regime_tag()}_*` and skipped). Pair: "
        f"{_describe_model('teacher.yaml')} teacher ({_teacher_steps():,} steps) -> "
        f"{_describe_model('student.yaml')} student (2,400 steps of batch 8, AdamW lr "
        "3e-3, from scratch) on 1,600 / 400 synthetic images at 128 px (`configs/bench/`). Gap closed = "
        "(AP_distilled - AP_baseline) / (AP_teacher - AP_baseline). `baseline_teacher_schedule` is the regime check "
        "(the student alone on the teacher's whole schedule), `baseline_same_wall_time_as_<best>` the baseline "
        "trained for as long (in time) as the best distilled run, `long_*` the long schedule (4 x the steps; gap and "
        "AP difference against `long_baseline`).",
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
    if (RESULTS / "v2" / "accuracy.md").is_file():
        lines += [
            "### Regime v2 (superseded; its findings above still hold as findings about that teacher)",
            "",
            "The v2 benchmark (FCOS R34-FPN128 teacher at val AP 76.2, 8,000 steps in bfloat16 autocast -> the same "
            "MobileNetV3-small-FPN32 student) is kept in `benchmarks/results/v2/` (its table `accuracy.md`, its "
            "cost table, `runs/v2_*`). It ended because its teacher could not follow the project across machines: "
            "its checkpoint lived outside git and was lost with a machine, and on an AVX2-only CPU bfloat16 is "
            "emulated (18.5 s a step), so it could neither be rebuilt bit for bit nor within the 60-minute budget. "
            "Regime v3 trains in float32 and keeps its teacher in the repository.",
            "",
        ]
    if (RESULTS / "v1" / "accuracy.md").is_file():
        lines += [
            "### The first regime (superseded)",
            "",
            "The first benchmark (RetinaNet R50-FPN256 teacher at AP 8.1 -> RetinaNet R18-FPN64 student) is kept in "
            "`benchmarks/results/v1/` (tables, notes, `runs/full_*`): its teacher was passed by the student given the "
            'same steps, so its "gap closed" measured extra steps rather than a stronger teacher (DESIGN.md, '
            '"Benchmark protocol").',
            "",
        ]
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
