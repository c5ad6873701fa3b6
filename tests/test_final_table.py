"""The end of train_distill: the baseline student (report.baseline) from the distilled student's initial weights,
and the final table with cost columns and headline ratios."""

from __future__ import annotations

import torch
import yaml
from conftest import run_tool, tiny_model, tiny_recipe

from detkd.config import load_config
from detkd.cost import ModelCost
from detkd.engine.runner import format_final_table, train_distill
from detkd.models.build import build_detector

NUM_CLASSES = 9


def baseline_recipe(tiny_data, tmp_path, name, student_backbone="resnet18", feature="pkd"):
    """A tiny FCOS distillation recipe with report.baseline on (an untrained FCOS teacher saved in tmp_path)."""
    torch.manual_seed(0)
    teacher = build_detector("fcos", "resnet18", NUM_CLASSES, fpn_channels=32, min_size=64, max_size=64)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    return tiny_recipe(
        tiny_data,
        tmp_path,
        name,
        teacher={**tiny_model("fcos", fpn_channels=32), "checkpoint": str(tmp_path / "teacher.pth")},
        student=tiny_model("fcos", backbone=student_backbone, fpn_channels=16),
        distill={"features": [{"type": feature}], "teacher_check": {"enabled": False}},
        train={"epochs": 1, "max_iters": 2, "device": "cpu", "log_interval": 1, "warmup_iters": 1},
        eval={"interval": 1, "max_images": 4},
        report={"baseline": True},
    )


def test_final_table_numbers_from_given_rows():
    rows = [
        ModelCost("teacher", 20_000_000, 4_000_000_000, 50.0, metrics={"AP": 0.40, "AP50": 0.60}),
        ModelCost("student (baseline)", 2_000_000, 500_000_000, 10.0, metrics={"AP": 0.20, "AP50": 0.35}),
        ModelCost("student (distilled)", 2_000_000, 500_000_000, 10.0, metrics={"AP": 0.30, "AP50": 0.50}),
    ]
    summary = {"cost": rows, "teacher_train_s": 360.0, "wall_time_s": 120.0, "baseline": {"wall_time_s": 60.0}}
    lines = format_final_table(summary).splitlines()
    assert lines[2].split()[:7] == ["teacher", "40.0", "60.0", "20.00", "4.000", "50.0", "6.0"]
    assert lines[3].split()[:8] == ["student", "(baseline)", "20.0", "35.0", "2.00", "0.500", "10.0", "1.0"]
    assert lines[4].split()[:8] == ["student", "(distilled)", "30.0", "50.0", "2.00", "0.500", "10.0", "2.0"]
    text = "\n".join(lines)
    assert "student (distilled): the student keeps 75 % of the teacher's AP at 5.0 x lower latency" in text
    assert "student (baseline): the student keeps 50 % of the teacher's AP" in text
    assert "distillation adds +10.0 AP over the baseline student" in text


def test_baseline_student_starts_from_the_distilled_students_init(tiny_data, tmp_path):
    recipe = baseline_recipe(tiny_data, tmp_path, "qs")
    summary = train_distill(load_config(recipe), show_progress=False)
    work = tmp_path / "work_qs"
    init = torch.load(work / "student_init.pth", weights_only=True)
    base_cfg = yaml.safe_load((work / "baseline" / "config.yaml").read_text())
    assert base_cfg["model"]["checkpoint"] == str(work / "student_init.pth") and base_cfg["distill"] is None
    # the baseline trained 2 steps from exactly those weights
    assert summary["baseline"]["iterations"] == 2
    names = [r.name for r in summary["cost"]]
    assert names == ["teacher", "student (baseline)", "student (distilled)"]
    baseline, distilled = summary["cost"][1], summary["cost"][2]
    assert baseline.params == distilled.params and baseline.flops == distilled.flops
    assert summary["cost"][0].flops > distilled.flops
    fresh = build_detector("fcos", "resnet18", NUM_CLASSES, fpn_channels=16, min_size=64, max_size=64)
    assert set(init) == set(fresh.state_dict())
    trained = summary["baseline"]["model"].state_dict()
    key = next(k for k in init if k.endswith("weight") and init[k].dim() == 4)
    assert not torch.equal(init[key], trained[key])  # it did train
    assert (trained[key] - init[key]).abs().max() < 0.05  # two small AdamW/SGD steps away from the saved init


def test_cli_table_has_three_rows_and_headlines(tiny_data, tmp_path):
    recipe = baseline_recipe(tiny_data, tmp_path, "qs_cli", student_backbone="mobilenet_v3_small", feature="cwd")
    proc = run_tool("train_distill.py", "--cfg", str(recipe), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split()[:7] == ["model", "AP", "AP50", "params", "(M)", "GFLOPs", "latency"]
    assert [lines[header + k].split()[0] for k in (2, 3, 4)] == ["teacher", "student", "student"]
    assert "(baseline)" in lines[header + 3] and "(distilled)" in lines[header + 4]
    assert "lower latency" in proc.stdout and "thread(s)" in proc.stdout
