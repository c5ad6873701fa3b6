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
        model = cfg.student or cfg.model
        assert (model.arch, model.backbone, model.fpn_channels) == ("fcos", "mobilenet_v3_small", 32)


def _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap: float, tune_gap_ap: float = None):
    """A protocol run with fake trainings; the gap run scores ``gap_ap`` on val and ``tune_gap_ap`` (default: the
    same) on the tuning split, the teacher 0.5 on both."""
    calls = []
    ap = {"baseline": 0.10, "pkd": 0.20, "logit_kd": 0.25, "fgd_logit_kd": 0.30, "fgd": 0.15, "cwd": 0.22}

    def fake_run_student(name, recipe, seed, teacher_ckpt, opts, tag):
        calls.append((name, seed, tuple(opts)))
        time_s = 100.0 if name.startswith("baseline") else 150.0
        value = gap_ap if name == accuracy.GAP_RUN else ap.get(name.removeprefix("long_"), 0.12)
        record = {"run": name, "seed": seed, "recipe": recipe, "work_dir": f"work_dirs/{name}",
                  "AP": value + 0.01 * seed, "AP50": 0.3, "APs": 0.05, "step_s": 0.5,
                  "train_time_s": time_s, "iterations": 600, "iters_per_epoch": 200, "wall_s": time_s}  # fmt: skip
        accuracy._write_json(accuracy.record_path(tag, name, seed), record)
        return record

    def fake_ensure_teacher(recipe, tag, opts):
        return {"AP": 0.5, "checkpoint": f"{tag}.pth", "wall_s": 1.0, "recipe": recipe, "iterations": 3200,
                "curve": [[2800, 0.495], [3200, 0.5]]}  # fmt: skip

    def fake_tune_ap(record, record_file, recipe, checkpoint, model="model"):
        if record.get("run") == accuracy.GAP_RUN:
            record["tune_AP"] = gap_ap if tune_gap_ap is None else tune_gap_ap
        else:  # the teacher 0.5; a student run scores its val AP
            record["tune_AP"] = record["AP"] if "seed" in record else 0.5
        return record["tune_AP"]

    monkeypatch.setattr(accuracy, "run_student", fake_run_student)
    monkeypatch.setattr(accuracy, "ensure_teacher", fake_ensure_teacher)
    monkeypatch.setattr(accuracy, "tune_ap", fake_tune_ap)
    monkeypatch.setattr(accuracy, "final_student_weights", lambda record: tmp_path / "weights.pth")
    monkeypatch.setattr(accuracy, "DERIVED_DIR", tmp_path / "derived")
    monkeypatch.setattr(accuracy, "is_distill_recipe", lambda path: path.name != "student.yaml")
    monkeypatch.setattr(accuracy, "uses_trained_teacher", lambda path: path.name != "ema.yaml")
    monkeypatch.setattr(accuracy, "ensure_loss_scales", lambda ckpt: None)
    monkeypatch.setattr(accuracy, "measure_cost", lambda *a: None)
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["accuracy.py"])
    accuracy.main()
    return calls


def test_protocol_order_regime_check_seeds_top_methods_wall_time_and_long_schedule(accuracy, tmp_path, monkeypatch):
    calls = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.30)
    # 1. the regime check: the baseline on the teacher's whole schedule (16 epochs), 2 seeds
    assert [c[:2] for c in calls[:2]] == [(accuracy.GAP_RUN, 0), (accuracy.GAP_RUN, 1)]
    assert "train.epochs=16" in calls[0][2]
    # 2. equal steps, seed by seed
    first = calls[2 : 2 + 2 * len(accuracy.RUNS)]
    assert [seed for _, seed, _ in first] == [0] * len(accuracy.RUNS) + [1] * len(accuracy.RUNS)
    third = {name for name, seed, _ in calls if seed == 2}
    assert third == {"baseline", "fgd_logit_kd", "logit_kd", "cwd"}  # the baseline and the top 3
    # 2b. the derived rows, built on the best feature recipe / the best recipe on the tuning split, 2 seeds each
    derived = [c[:2] for c in calls if c[0].startswith("best_")]
    assert sorted(derived) == sorted((n, s) for n, _, _ in accuracy.DERIVED for s in range(2))
    cross = yaml.safe_load((tmp_path / "derived" / "best_feature_cross_kd.yaml").read_text())
    assert [f["type"] for f in cross["distill"]["features"]] == ["cwd"]  # cwd is the best feature run (0.22)
    assert [h["type"] for h in cross["distill"]["head"]] == ["cross_kd"]
    sched = yaml.safe_load((tmp_path / "derived" / "best_kd_schedule.yaml").read_text())
    assert sched["distill"]["schedule"] == accuracy.KD_SCHEDULE  # on fgd + logit_kd, the best run
    assert [f["type"] for f in sched["distill"]["features"]] == ["fgd"]
    assert [h["type"] for h in sched["distill"]["head"]] == ["logit_kd"]
    # 3. equal wall time: the best run's time (150 s vs 100 s per run -> 1.5 x the 600 steps)
    wall = [c for c in calls if c[0].startswith("baseline_same_wall_time")]
    assert [c[0] for c in wall] == ["baseline_same_wall_time_as_fgd_logit_kd"] * 2
    assert "train.max_iters=900" in wall[0][2]
    # 4. long schedule (x 4 = 12 epochs): the baseline and the 2 best, 2 seeds each
    long = [c for c in calls if c[0].startswith("long_")]
    assert sorted({c[0] for c in long}) == ["long_baseline", "long_fgd_logit_kd", "long_logit_kd"]
    assert len(long) == 6 and all("train.epochs=12" in c[2] for c in long)
    results = json.loads((tmp_path / "accuracy.json").read_text())
    assert results["regime"]["valid"] and results["regime"]["gap"] == pytest.approx(0.5 - 0.305)
    runs = results["runs"]
    assert runs["fgd_logit_kd"]["gap_closed"] == pytest.approx((0.31 - 0.11) / (0.5 - 0.11))  # means over 3 seeds
    assert runs["long_logit_kd"]["delta_AP"] == pytest.approx(0.255 - 0.105)  # against the long baseline
    assert "delta_AP" not in runs["long_baseline"]
    md = (tmp_path / "accuracy.md").read_text()
    assert "valid" in md and "2,800: 49.5, 3,200: 50.0" in md and "converged (last two within 1 AP): True" in md
    # a second invocation trains nothing: every run is stored
    calls2 = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.30)
    assert calls2 == []


def test_an_invalid_regime_stops_after_the_check(accuracy, tmp_path, monkeypatch):
    calls = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.45)  # only 5 AP below the teacher
    assert {c[0] for c in calls} == {accuracy.GAP_RUN}
    results = json.loads((tmp_path / "accuracy.json").read_text())
    assert not results["regime"]["valid"] and "NOT VALID" in (tmp_path / "accuracy.md").read_text()


def test_the_regime_is_judged_on_the_tuning_split(accuracy, tmp_path, monkeypatch):
    # valid on val (20 AP gap) but only 5 AP on the tuning split: the decision follows the tuning split
    calls = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.30, tune_gap_ap=0.45)
    assert {c[0] for c in calls} == {accuracy.GAP_RUN}
    regime = json.loads((tmp_path / "accuracy.json").read_text())["regime"]
    assert regime["valid"] and not regime["tune"]["valid"]
    assert regime["tune"]["gap"] == pytest.approx(0.05) and regime["tune"]["split"] == "tune"
    assert "tuning split" in (tmp_path / "accuracy.md").read_text()


def test_tune_regime_check_reads_the_stored_tuning_ap(accuracy):
    teacher = {"AP": 0.5, "tune_AP": 0.48, "curve": [[2800, 0.495], [3200, 0.5]]}
    gap = [{"seed": 0, "AP": 0.3, "tune_AP": 0.30}, {"seed": 1, "AP": 0.3, "tune_AP": 0.34}]
    check = accuracy.regime_check(teacher, gap, "tune", "tune_AP")
    assert check["gap"] == pytest.approx(0.48 - 0.32) and check["valid"]
    assert "gap" not in accuracy.regime_check(teacher, [{"seed": 0, "AP": 0.3}], "tune", "tune_AP")  # not yet scored


def test_elapsed_estimate_and_convergence(accuracy):
    plan = [(600, False), (600, True), (2400, True)]
    # (600 * 0.5 + 60) + (600 * 1.0 + 60) + (2400 * 1.0 + 60) seconds, two at a time
    hours = accuracy.estimate_elapsed_h(plan, {"student": 0.5, "distill": 1.0}, jobs=2)
    assert hours == pytest.approx((360 + 660 + 2460) / 2 / 3600)
    assert accuracy.converged([[2800, 0.452], [3200, 0.460]]) is True
    assert accuracy.converged([[2800, 0.43], [3200, 0.46]]) is False
    assert accuracy.converged([[3200, 0.46]]) is None
