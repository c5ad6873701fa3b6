"""The compression report: parameter and FLOP counts checked against hand computations, latency timing, the ratios
and headline from given numbers, and tools/compare.py end to end with and without checkpoints."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import run_tool, tiny_model, tiny_recipe
from torch import nn

from detkd.cost import ModelCost, cost_ratios, count_flops, count_params, format_cost_table, headline, measure_latency
from detkd.models.build import build_detector

NUM_CLASSES = 9


def test_params_of_a_small_model_counted_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    # conv 3*4*3*3 weights + 4 biases; BN 4 weights + 4 biases (running stats are buffers); linear 144*5 + 5
    assert count_params(model) == (108 + 4) + (4 + 4) + (720 + 5) == 845


def test_flops_of_one_conv_computed_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # every one of the 8 * 16 * 16 outputs is a dot product of 3 * 3 * 3 = 27 multiply-adds = 2 FLOPs each
    assert count_flops(conv, (16, 16)) == 2 * 8 * 16 * 16 * 27 == 110592
    assert count_flops(conv, torch.zeros(3, 16, 32)) == 2 * 110592  # twice the pixels, twice the FLOPs
    assert conv.training  # the train flag is restored


def test_detector_flops_are_at_its_own_input_size():
    torch.manual_seed(0)
    det = build_detector("fcos", "resnet18", NUM_CLASSES, fpn_channels=16, min_size=64, max_size=64)
    flops = count_flops(det, 64)
    # the detector's transform resizes any square image to 64 px, so the count does not depend on the input side
    assert flops == count_flops(det, 128) > 0
    det128 = build_detector("fcos", "resnet18", NUM_CLASSES, fpn_channels=16, min_size=128, max_size=128)
    # convolutions dominate: 4x the pixels is close to 4x the FLOPs
    assert count_flops(det128, 128) / flops == pytest.approx(4.0, rel=0.05)


class Sleeper(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_latency_is_the_median_of_timed_runs_after_warmup():
    threads = torch.get_num_threads()
    model = Sleeper(0.004)
    result = measure_latency(model, 8, runs=20, warmup=3, threads=1)
    assert model.calls == 23
    assert result["runs"] == 20 and result["threads"] == 1
    assert 4.0 <= result["median_ms"] < 15.0
    assert result["q1_ms"] <= result["median_ms"] <= result["q3_ms"]
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="at least 20"):
        measure_latency(model, 8, runs=10)


def rows():
    teacher = ModelCost("teacher", 20_000_000, 4_000_000_000, 50.0, metrics={"AP": 0.40, "AP50": 0.60})
    student = ModelCost("student (distilled)", 2_000_000, 500_000_000, 10.0, metrics={"AP": 0.30, "AP50": 0.51})
    return teacher, student


def test_ratios_and_headline_from_given_numbers():
    teacher, student = rows()
    r = cost_ratios(teacher, student)
    assert r["ap_kept"] == pytest.approx(0.75)
    assert r["latency_x"] == pytest.approx(5.0)
    assert r["flops_x"] == pytest.approx(8.0)
    assert r["params_x"] == pytest.approx(10.0)
    assert headline(teacher, student) == (
        "the student keeps 75 % of the teacher's AP at 5.0 x lower latency and 8.0 x fewer FLOPs"
    )
    no_ap = ModelCost("student", 2_000_000, 500_000_000, 10.0)
    assert cost_ratios(teacher, no_ap)["ap_kept"] is None
    assert headline(teacher, no_ap).startswith("the student runs at 5.0 x lower latency and 8.0 x fewer FLOPs")


def test_table_shows_every_number():
    teacher, student = rows()
    table = format_cost_table([teacher, student], extra=[("train time", ["3.0 min", "1.5 min"])])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["model", "AP"]
    assert lines[2].split() == ["teacher", "40.0", "60.0", "20.00", "4.000", "50.0", "3.0", "min"]
    assert lines[3].split() == ["student", "(distilled)", "30.0", "51.0", "2.00", "0.500", "10.0", "1.5", "min"]
    assert "1 thread(s)" in lines[-1] and "median of 20 runs" in lines[-1]
    no_ap = format_cost_table([ModelCost("teacher", 1, 1, 1.0)])
    assert no_ap.splitlines()[2].split()[1:3] == ["-", "-"]


def compare_recipe_file(tiny_data, tmp_path, teacher_ckpt=None):
    return tiny_recipe(
        tiny_data,
        tmp_path,
        "pair",
        teacher={**tiny_model("fcos", fpn_channels=32), **({"checkpoint": teacher_ckpt} if teacher_ckpt else {})},
        student=tiny_model("fcos", backbone="mobilenet_v3_small", fpn_channels=16),
        distill={"features": [{"type": "pkd"}]},
    )


def test_compare_cli_without_checkpoints(tiny_data, tmp_path):
    recipe = compare_recipe_file(tiny_data, tmp_path)
    out = tmp_path / "report.json"
    proc = run_tool("compare.py", "--cfg", str(recipe), "--runs", "20", "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "teacher: no checkpoint" in proc.stdout and "student: no checkpoint" in proc.stdout
    assert "the student runs at" in proc.stdout
    report = json.loads(out.read_text())
    teacher = build_detector("fcos", "resnet18", NUM_CLASSES, fpn_channels=32, min_size=64, max_size=64)
    student = build_detector("fcos", "mobilenet_v3_small", NUM_CLASSES, fpn_channels=16, min_size=64, max_size=64)
    assert report["rows"][0]["params"] == count_params(teacher)
    assert report["rows"][1]["params"] == count_params(student)
    assert report["rows"][0]["flops"] == count_flops(teacher, 64)
    assert report["rows"][1]["flops"] == count_flops(student, 64)
    assert report["ratios"]["flops_x"] == pytest.approx(count_flops(teacher, 64) / count_flops(student, 64))
    assert report["ratios"]["ap_kept"] is None and report["rows"][0]["metrics"] == {}
    assert report["rows"][0]["threads"] == 1 and report["rows"][0]["latency_runs"] == 20


def test_compare_cli_with_checkpoints_evaluates_both(tiny_data, tmp_path):
    torch.manual_seed(0)
    teacher = build_detector("fcos", "resnet18", NUM_CLASSES, fpn_channels=32, min_size=64, max_size=64)
    student = build_detector("fcos", "mobilenet_v3_small", NUM_CLASSES, fpn_channels=16, min_size=64, max_size=64)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    torch.save(student.state_dict(), tmp_path / "student.pth")  # the exported plain state_dict
    # the teacher checkpoint comes from the recipe; the student's from --ckpt
    recipe = compare_recipe_file(tiny_data, tmp_path, teacher_ckpt=str(tmp_path / "teacher.pth"))
    out = tmp_path / "report.json"
    args = ["--cfg", str(recipe), "--ckpt", str(tmp_path / "student.pth"), "--runs", "20", "--json", str(out)]
    proc = run_tool("compare.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert f"teacher: {tmp_path / 'teacher.pth'}" in proc.stdout
    report = json.loads(out.read_text())
    for row in report["rows"]:
        assert 0.0 <= row["metrics"]["AP"] <= 1.0 and 0.0 <= row["metrics"]["AP50"] <= 1.0
    # untrained detectors: AP is ~0, so the headline either gives the kept share or says there is no teacher AP
    assert "lower latency" in report["headline"]
    bad = run_tool("compare.py", "--cfg", str(recipe), "--ckpt", str(tmp_path / "missing.pth"), "--runs", "20")
    assert bad.returncode == 2 and "missing.pth" in bad.stderr
