"""The pure helpers of the benchmark scripts (the scripts themselves are run by hand; see benchmarks/)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from detkd.config import load_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loss_scales():
    return _load("loss_scales")


@pytest.fixture(scope="module")
def accuracy():
    return _load("accuracy")


@pytest.mark.parametrize("x, expected", [(2.3e-5, 2e-5), (0.0096, 0.01), (7.7, 8.0), (350.0, 400.0), (1.0, 1.0)])
def test_weights_round_to_one_significant_digit_and_stay_yaml_floats(loss_scales, x, expected):
    assert loss_scales.round_sig(x) == pytest.approx(expected)
    assert yaml.safe_load(loss_scales.yaml_float(loss_scales.round_sig(x))) == pytest.approx(expected)


def test_set_weight_edits_only_the_named_loss(loss_scales, tmp_path):
    recipe = tmp_path / "combo.yaml"
    recipe.write_text(
        "# a comment: weight: 3\n"
        "distill:\n"
        "  features: [{type: fgd, levels: [p3, p4, p5], weight: 1.0e-5}, {type: mse, weight: 2.0e-3}]\n"
        "  head: [{type: logit_kd, temperature: 1.0, box_weight: 1.0}]\n"
    )
    assert loss_scales.set_weight(recipe, "fgd", 3e-6)
    assert not loss_scales.set_weight(recipe, "gid", 1.0)
    distill = yaml.safe_load(recipe.read_text())["distill"]
    assert distill["features"] == [
        {"type": "fgd", "levels": ["p3", "p4", "p5"], "weight": 3e-6},
        {"type": "mse", "weight": 2e-3},
    ]
    assert distill["head"][0]["box_weight"] == 1.0
    assert recipe.read_text().startswith("# a comment: weight: 3\n")


def test_gap_closed_and_spread(accuracy):
    records = [{"seed": s, "AP": ap, "AP50": 0.5, "APs": 0.1, "train_time_s": 60.0} for s, ap in ((0, 0.2), (1, 0.3))]
    out = accuracy.aggregate(records, teacher_ap=0.45, baseline_ap=0.2)
    assert out["AP"] == pytest.approx(0.25)
    assert out["AP_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample standard deviation
    assert out["gap_closed"] == pytest.approx(0.05 / 0.25)
    assert out["delta_AP"] == pytest.approx(0.05)
    assert "gap_closed" not in accuracy.aggregate(records, teacher_ap=0.1, baseline_ap=0.2)  # no gap: no ratio


def test_every_benchmark_recipe_loads(accuracy):
    for _, recipe, _, _ in accuracy.RUNS:
        cfg = load_config(BENCH.parent / "configs" / "bench" / recipe)
        assert cfg.data.synthetic.min_object_size == 16 and cfg.train.epochs == 3


def test_schedule_seed_by_seed_then_top_methods_then_wall_time_baseline(accuracy, tmp_path, monkeypatch):
    calls, teachers_seen = [], {}
    ap = {"baseline": 0.10, "pkd": 0.20, "logit_kd": 0.25, "fgd_logit_kd": 0.30, "fgd": 0.15}

    def fake_run_student(name, recipe, seed, teacher_ckpt, opts, tag):
        calls.append((name, seed, tuple(opts)))
        teachers_seen[name] = teacher_ckpt
        time_s = 100.0 if name == "baseline" else 150.0
        return {"run": name, "seed": seed, "AP": ap.get(name, 0.12), "AP50": 0.3, "APs": 0.05,
                "train_time_s": time_s, "iterations": 600, "iters_per_epoch": 200, "wall_s": time_s}  # fmt: skip

    monkeypatch.setattr(accuracy, "run_student", fake_run_student)

    def fake_ensure_teacher(recipe, tag, opts):
        ap = 0.5 if recipe == "teacher.yaml" else 0.6
        return {"AP": ap, "checkpoint": f"{tag}.pth", "wall_s": 1.0, "recipe": recipe}

    monkeypatch.setattr(accuracy, "ensure_teacher", fake_ensure_teacher)
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["accuracy.py"])
    accuracy.main()

    first_pass = [c for c in calls if c[0] in {n for n, *_ in accuracy.RUNS}][: 2 * len(accuracy.RUNS)]
    assert [seed for _, seed, _ in first_pass] == [0] * len(accuracy.RUNS) + [1] * len(accuracy.RUNS)
    third = {name for name, seed, _ in calls if seed == 2}
    assert third == {"baseline", "pkd", "logit_kd", "fgd_logit_kd"}  # the baseline and the top 3
    wall = [c for c in calls if c[0].startswith("baseline_same_wall_time")]
    assert [c[0] for c in wall] == ["baseline_same_wall_time_as_fgd_logit_kd"] * 2
    assert "train.max_iters=900" in wall[0][2]  # 600 steps x 150 s / 100 s
    results = json.loads((tmp_path / "accuracy.json").read_text())
    meta = results["meta"]
    student_s = sum(100.0 if c[0] == "baseline" else 150.0 for c in calls)  # as fake_run_student
    assert meta["total_wall_h"] == pytest.approx((student_s + 2.0) / 3600)  # two teachers of 1 s each
    assert meta["elapsed_h_estimate"] == pytest.approx(meta["total_wall_h"])  # --jobs 1: nothing runs side by side
    assert f"about {meta['elapsed_h_estimate']:.2f} h elapsed" in (tmp_path / "accuracy.md").read_text()
    assert results["runs"]["fgd_logit_kd"]["gap_closed"] == pytest.approx((0.30 - 0.10) / (0.5 - 0.10))
    # the FCOS -> RetinaNet pair learns from its own teacher and is measured against that teacher's AP
    assert teachers_seen["hetero_fcos_to_retinanet"] == "full_teacher_fcos.pth"
    assert teachers_seen["pkd"] == "full_teacher.pth"
    gap = results["runs"]["hetero_fcos_to_retinanet"]["gap_closed"]
    assert gap == pytest.approx((0.12 - 0.10) / (0.6 - 0.10))
