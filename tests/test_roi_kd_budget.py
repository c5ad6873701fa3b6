"""benchmarks/roi_kd_budget.py with fake trainings: recipes, order, checkpoints, storage, the tuning-split choice."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from detkd.config import load_config
from detkd.losses.head import ROI_KD_MAX_ROIS

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def roi():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_roi_kd_budget", BENCH / "roi_kd_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cfg(roi, recipe):
    return load_config(roi.protocol.recipe_path(recipe))


def test_recipes_a_small_faster_rcnn_pair_on_quickstart_style_data_rows_differ_only_in_max_rois(roi):
    teacher = _cfg(roi, roi.TEACHER_RECIPE)
    assert (teacher.model.arch, teacher.model.backbone, teacher.model.fpn_channels) == ("faster_rcnn", "resnet34", 64)
    assert teacher.train.epochs * roi.ITERS_PER_EPOCH == 800 and teacher.eval.interval == 2  # a learning curve
    quickstart = load_config(BENCH.parent / "configs" / "_base_" / "quickstart_data.yaml").data
    data = teacher.data
    # the quickstart preset's knobs at 128 px: objects from a quarter of the image side, a quarter of the clutter
    assert (data.synthetic.size, data.synthetic.min_object_size, data.synthetic.clutter) == (128, 32, 0.25)
    assert data.synthetic.num_train == roi.ITERS_PER_EPOCH * data.batch_size and data.synthetic.out == "data/roi_budget"
    assert data.transforms == quickstart.transforms and data.batch_size == quickstart.batch_size
    tune = data.synthetic  # the tuning split: the knobs of the reported data, another generator seed and folder
    knobs = yaml.safe_load(roi.TUNE_CFG.read_text())["data"]["synthetic"]
    assert knobs["seed"] != tune.seed and knobs["min_object_size"] == tune.min_object_size
    assert knobs["clutter"] == tune.clutter and knobs["size"] == tune.size and knobs["out"] != tune.out
    base = _cfg(roi, dict(roi.RUNS)["baseline"])
    assert (base.model.arch, base.model.backbone, base.model.fpn_channels) == ("faster_rcnn", "resnet18", 32)
    heads = {}
    for name, max_rois in roi.BUDGETS.items():
        cfg = _cfg(roi, dict(roi.RUNS)[name])
        assert (cfg.student.arch, cfg.student.backbone, cfg.student.fpn_channels) == ("faster_rcnn", "resnet18", 32)
        assert cfg.teacher.checkpoint == "work_dirs/bench/roi_budget_teacher/last_weights.pth"
        assert (cfg.teacher.arch, cfg.teacher.backbone, cfg.teacher.fpn_channels) == ("faster_rcnn", "resnet34", 64)
        assert cfg.train == base.train and cfg.data == base.data
        [head] = cfg.distill.head
        assert head.type == "roi_kd" and head.params["max_rois"] == max_rois
        heads[name] = {k: v for k, v in head.params.items() if k != "max_rois"}
    assert len({json.dumps(h, sort_keys=True) for h in heads.values()}) == 1  # the same loss otherwise
    assert roi.BUDGETS["roi_kd_128"] == ROI_KD_MAX_ROIS  # the current default is a row
    assert set(roi.SPEED_METHODS) == set(roi.BUDGETS)
    speed = (BENCH / "speed.py").read_text()
    assert all(f'"{m}"' in speed for m in ("roi_kd_all", "roi_kd_256", "roi_kd_64", "roi_kd_32"))


def test_choose_budget_the_smallest_within_the_spread_of_all_rois(roi):
    def runs(*aps):
        return [{"seed": s, "tune_AP": ap} for s, ap in enumerate(aps)]

    records = {"roi_kd_all": runs(0.30, 0.32), "roi_kd_128": runs(0.30, 0.31), "roi_kd_32": runs(0.28, 0.29)}
    choice = roi.choose_budget(records)
    # all: 0.31 ± 0.0141; 128: -0.005 (within); 32: -0.025 (beyond)
    assert choice["chosen"] == "roi_kd_128" and choice["max_rois"] == 128
    assert choice["rows"]["roi_kd_32"]["delta"] == pytest.approx(-0.025) and not choice["rows"]["roi_kd_32"]["within"]
    assert choice["rows"]["roi_kd_128"]["spread"] == pytest.approx(0.0141421, rel=1e-4)
    records["roi_kd_32"] = runs(0.30, 0.305)
    assert roi.choose_budget(records)["max_rois"] == 32  # the smallest that loses nothing beyond the spread
    records["roi_kd_32"] = records["roi_kd_128"] = runs(0.1, 0.1)
    assert roi.choose_budget(records)["max_rois"] is None  # both budgets lose: every ROI
    pending = roi.choose_budget({**records, "roi_kd_32": runs(0.3)})  # one seed of two
    assert pending["chosen"] is None and "roi_kd_32" in pending["reason"]
    unscored = {**records, "roi_kd_128": [{"seed": 0, "AP": 0.3}, {"seed": 1, "AP": 0.3}]}
    assert roi.choose_budget(unscored)["chosen"] is None  # decided on the tuning split only, never on val


# fake val APs (seed s adds 0.01 s); the tuning split: these + 0.02, except roi_kd_32, which loses on it only
FAKE_AP = {"baseline": 0.20, "roi_kd_all": 0.30, "roi_kd_128": 0.30, "roi_kd_32": 0.35}
FAKE_TUNE = {"baseline": 0.22, "roi_kd_all": 0.32, "roi_kd_128": 0.315, "roi_kd_32": 0.20}


def _fake_study(roi, tmp_path, monkeypatch, argv=("--jobs", "2"), speed=None):
    """The study with fake trainings. Returns the events in order: ``("teacher",)``, ``(run, seed, tool, opts)``."""
    events = []

    def fake_ensure_teacher():
        events.append(("teacher",))
        record = {"run": "roi_budget_teacher", "recipe": roi.TEACHER_RECIPE, "AP": 0.45, "wall_s": 60.0,
                  "checkpoint": "work_dirs/bench/roi_budget_teacher/last_weights.pth", "iterations": 800,
                  "curve": [[600, 0.445], [800, 0.45]]}  # fmt: skip
        if roi.teacher_record_path().is_file():
            return json.loads(roi.teacher_record_path().read_text())
        roi.protocol._write_json(roi.teacher_record_path(), record)
        return record

    def fake_run_student(name, recipe, seed, teacher_ckpt):
        tool, opts = roi.training_command(recipe, seed, teacher_ckpt)
        events.append((name, seed, tool, tuple(opts)))
        record = {"run": name, "seed": seed, "recipe": recipe, "work_dir": f"work_dirs/{name}", "wall_s": 100.0,
                  "AP": FAKE_AP[name] + 0.01 * seed, "AP50": 0.5, "APs": 0.1, "train_time_s": 90.0,
                  "iterations": 400, "iters_per_epoch": 100, "step_s": 1.5 if name != "baseline" else 1.0}  # fmt: skip
        roi.protocol._write_json(roi.record_path(name, seed), record)
        return record

    def fake_tune_ap(record, record_file, recipe, checkpoint, model="model"):
        if "tune_AP" not in record:
            events.append(("tune", record["run"], record.get("seed"), model))
            record["tune_AP"] = FAKE_TUNE[record["run"]] + 0.01 * record["seed"] if "seed" in record else 0.44
            roi.protocol._write_json(record_file, record)
        return record["tune_AP"]

    monkeypatch.setattr(roi, "ensure_teacher", fake_ensure_teacher)
    monkeypatch.setattr(roi, "run_student", fake_run_student)
    monkeypatch.setattr(roi, "tune_ap", fake_tune_ap)
    monkeypatch.setattr(roi.protocol, "final_student_weights", lambda record: tmp_path / "weights.pth")
    monkeypatch.setattr(roi, "RESULTS", tmp_path)
    if speed is not None:
        (tmp_path / "speed_roi_budget.json").write_text(json.dumps(speed))
    monkeypatch.setattr(sys, "argv", ["roi_kd_budget.py", *argv])
    roi.main()
    return events


def test_the_study_order_checkpoints_storage_choice_and_report(roi, tmp_path, monkeypatch):
    speed = {"meta": {"threads": 2, "batch": 8}, "rows": [
        {"pair": "faster_rcnn", "method": m, "overhead": o, "distill": {"median_s": o}, "loss_share": 0.1}
        for m, o in (("roi_kd_all", 1.72), ("roi_kd", 1.12), ("roi_kd_32", 1.04), ("roi_kd_64", 1.06))
    ] + [{"pair": "retinanet", "method": "roi_kd", "overhead": 9.0, "distill": {"median_s": 1.0}}]}  # fmt: skip
    events = _fake_study(roi, tmp_path, monkeypatch, speed=speed)
    # the teacher first (then scored on the tuning split), then the runs seed by seed, then every run scored
    assert events[0] == ("teacher",) and events[1] == ("tune", "roi_budget_teacher", None, "model")
    runs = [e for e in events if len(e) == 4 and e[0] != "tune"]
    assert [e[:2] for e in runs] == [(n, s) for s in range(roi.SEEDS) for n, _ in roi.RUNS]
    for name, seed, tool, opts in runs:
        assert opts[:2] == (f"train.seed={seed}", "eval.interval=0")
        if name == "baseline":
            assert tool == "train.py" and len(opts) == 2
        else:  # every roi_kd row learns from the cached teacher
            assert tool == "train_distill.py"
            assert opts[2] == "teacher.checkpoint=work_dirs/bench/roi_budget_teacher/last_weights.pth"
        cfg = load_config(roi.protocol.recipe_path(dict(roi.RUNS)[name]), list(opts))
        assert cfg.train.seed == seed
    scored = [e for e in events if e[0] == "tune" and e[2] is not None]
    assert sorted(e[1:3] for e in scored) == sorted((n, s) for n, _ in roi.RUNS for s in range(roi.SEEDS))
    assert {e[3] for e in scored if e[1] == "baseline"} == {"model"} and {e[3] for e in scored} == {"model", "student"}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        [f"roi_budget_{n}_s{s}.json" for n, _ in roi.RUNS for s in range(roi.SEEDS)] + ["roi_budget_teacher.json"]
    )
    results = json.loads((tmp_path / "roi_kd_budget.json").read_text())
    # on the tuning split 32 loses (0.205 vs 0.325) though it wins on val: the choice is 128, the default
    assert results["choice"]["chosen"] == "roi_kd_128" and results["choice"]["split"] == "tune_AP"
    assert results["runs"]["roi_kd_32"]["delta_AP"] == pytest.approx(0.15)  # val, against the baseline
    assert (
        results["runs"]["roi_kd_all"]["tune_AP"] == pytest.approx(0.325)
        and "delta_AP" not in results["runs"]["baseline"]
    )
    assert results["speed"]["rows"]["roi_kd_128"] == {"method": "roi_kd", "overhead": 1.12, "distill_s": 1.12,
                                                        "loss_share": 0.1}  # fmt: skip
    md = (tmp_path / "roi_kd_budget.md").read_text()
    assert "PARTIAL" not in md and "| roi_kd_all | all | 2 | 400 | 30.5 ± 0.7 |" in md
    assert "| roi_kd_32 | 32 | 2 | 400 | 35.5 ± 0.7 | 50.0 ± 0.0 | +15.0 | 20.5 |" in md
    assert "Chosen: **max_rois 128**, which confirms the default (`ROI_KD_MAX_ROIS = 128`" in md
    assert roi.SPEED_COMMAND in md and "`roi_kd_128` (roi_kd) 1.12 x" in md and "9.00" not in md
    assert "800: 45.0" in md and "tuning split 44.0" in md
    # a second invocation trains and scores nothing; --report-only neither
    assert _fake_study(roi, tmp_path, monkeypatch) == [("teacher",)]
    assert _fake_study(roi, tmp_path, monkeypatch, argv=["--report-only"]) == []


def test_a_partial_study_reports_what_is_pending_and_plan_estimates_the_rest(roi, tmp_path, monkeypatch, capsys):
    events = _fake_study(roi, tmp_path, monkeypatch, argv=["--only", "baseline", "roi_kd_all"])
    assert {e[0] for e in events if len(e) == 4 and e[0] != "tune"} == {"baseline", "roi_kd_all"}
    md = (tmp_path / "roi_kd_budget.md").read_text()
    assert "PARTIAL: 4 of the 8 runs are finished" in md and "Choice: pending: roi_kd_128, roi_kd_32" in md
    assert "No speed results with these variants are stored yet." in md
    capsys.readouterr()
    assert _fake_study(roi, tmp_path, monkeypatch, argv=["--plan", "--jobs", "2"]) == []
    out = capsys.readouterr().out
    assert "4 of 8 runs to do:" in out and "roi_kd_32 seed 1" in out and "teacher roi_budget" not in out
    # the 4 left: 400 steps each at the defaults (roi_kd_128 1.5, roi_kd_32 1.4 s/step) + a minute each, 2 at a time
    hours = 2 * (400 * 1.5 + 60 + 400 * 1.4 + 60) / 2 / 3600
    assert f"--jobs 2: {hours:.1f} h (teacher 0.0 h" in out
