"""The pure helpers of the benchmark scripts (the scripts themselves are run by hand; see benchmarks/)."""

import hashlib
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


def test_set_weight_leaves_the_fg_and_bg_weights_of_defeat_alone(loss_scales, tmp_path):
    # the bug this pins: the first "weight: " in the entry was fg_weight's, so --write set DeFeat's foreground weight
    # to the scale (1e-3) and left its outer weight as it was
    recipe = tmp_path / "defeat.yaml"
    recipe.write_text(
        "distill: {features: [{type: defeat, fg_weight: 3.0, bg_weight: 12.0, levels: [p3], weight: 3.0e-4}]}\n"
    )
    assert loss_scales.set_weight(recipe, "defeat", 2e-3)
    entry = yaml.safe_load(recipe.read_text())["distill"]["features"][0]
    assert entry == {"type": "defeat", "fg_weight": 3.0, "bg_weight": 12.0, "levels": ["p3"], "weight": 2e-3}
    auto = tmp_path / "defeat_auto.yaml"
    auto.write_text("distill: {features: [{type: defeat, fg_weight: 3.0, bg_weight: 12.0, weight: auto}]}\n")
    assert not loss_scales.set_weight(auto, "defeat", 2e-3)  # a self-calibrating recipe keeps weight: auto
    kept = tmp_path / "fgd_flat_attention.yaml"
    entry = "{type: fgd, temperature: 50.0, weight: 5.0e-3}"
    kept.write_text(f"{loss_scales.KEEP_MARK}\ndistill: {{features: [{entry}]}}\n")
    assert not loss_scales.set_weight(kept, "fgd", 1e-4) and "weight: 5.0e-3" in kept.read_text()
    assert yaml.safe_load(auto.read_text())["distill"]["features"][0]["fg_weight"] == 3.0


def test_gap_closed_and_spread(accuracy):
    records = [{"seed": s, "AP": ap, "AP50": 0.5, "APs": 0.1, "train_time_s": 60.0} for s, ap in ((0, 0.2), (1, 0.3))]
    out = accuracy.aggregate(records, teacher_ap=0.45, baseline_ap=0.2)
    assert out["AP"] == pytest.approx(0.25)
    assert out["AP_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample standard deviation
    assert out["gap_closed"] == pytest.approx(0.05 / 0.25)
    assert out["delta_AP"] == pytest.approx(0.05)
    assert "gap_closed" not in accuracy.aggregate(records, teacher_ap=0.1, baseline_ap=0.2)  # no gap: no ratio


def test_every_benchmark_recipe_loads(accuracy):
    for name, recipe, _, _ in accuracy.RUNS:
        cfg = load_config(BENCH.parent / "configs" / "bench" / recipe)
        assert cfg.data.synthetic.min_object_size == 16
        model = cfg.student or cfg.model
        if name in accuracy.AGAINST_TEACHER:  # born-again: the teacher's own architecture and schedule
            teacher = load_config(BENCH.parent / "configs" / "bench" / accuracy.TEACHER_RECIPE)
            assert cfg.train == teacher.train and cfg.train.epochs == 28
            assert (model.arch, model.backbone, model.fpn_channels) == ("fcos", "resnet18", 128)
            continue
        assert cfg.train.epochs == 12
        assert (model.arch, model.backbone, model.fpn_channels) == ("fcos", "mobilenet_v3_small", 32)


def test_the_second_teacher_is_another_family_with_the_first_ones_data_and_schedule(accuracy):
    cfgs = {tid: load_config(BENCH.parent / "configs" / "bench" / r) for tid, r in accuracy.TEACHERS.items()}
    first, second = cfgs["teacher"], cfgs["teacher_retina"]
    assert (second.model.arch, second.model.backbone, second.model.fpn_channels) == ("retinanet", "resnet18", 128)
    assert first.model.arch == "fcos" and second.data == first.data and second.train == first.train
    assert second.eval == first.eval


def test_issue15_rows_share_one_loss_and_the_student_initialisation(accuracy):
    """The two-teacher rows and each teacher alone: PKD with the same parameters, and all under ``teachers:`` (the
    teachers are then built under their own seeds: the same student initial weights); online rows use pkd's loss."""
    from detkd.config import teacher_entries

    def load(name):
        return load_config(accuracy.recipe_path(accuracy.recipe_of(name)))

    rows = [*accuracy.SINGLE_TEACHER_RUNS, *accuracy.TWO_TEACHER_RUNS]
    losses = {n: load(n).distill.features for n in rows}
    assert len({str(v) for v in losses.values()}) == 1 and losses["fcos_pkd"][0].type == "pkd"
    assert all(load(n).teacher is None and load(n).teachers for n in rows)
    modes = [load(n).distill.teacher_weighting.mode for n in accuracy.TWO_TEACHER_RUNS]
    assert modes == ["fixed", "confidence", "adaptive"]
    for n in accuracy.TWO_TEACHER_RUNS:
        assert [t.arch for t in load(n).teachers] == ["fcos", "retinanet"]
    for online, ref in accuracy.ONLINE_RUNS.items():
        cfg, frozen = load(online), load(ref)
        [(_, _, teacher, _)] = teacher_entries(cfg)
        assert teacher.mode == "online" and teacher.checkpoint is None
        spec = (teacher.arch, teacher.backbone, teacher.fpn_channels)
        assert spec == (frozen.teacher.arch, frozen.teacher.backbone, frozen.teacher.fpn_channels)
        assert cfg.distill.features == frozen.distill.features and cfg.train == frozen.train
    assert load("mutual_pkd").distill.mutual and not load("online_pkd").distill.mutual


def test_every_frozen_teacher_gets_the_cached_teacher_of_its_architecture(accuracy):
    ckpts = {"teacher": "t_fcos.pth", "teacher_retina": "t_retina.pth"}

    def opts(name):
        return accuracy.training_command(accuracy.recipe_of(name), 1, ckpts, ["train.epochs=1"])

    assert opts("baseline") == ("train.py", ["train.seed=1", "eval.interval=0", "train.epochs=1"])
    assert opts("pkd")[1][-1] == "teacher.checkpoint=t_fcos.pth"
    assert opts("born_again")[1][-1] == "teacher.checkpoint=t_fcos.pth"
    assert opts("retina_pkd")[1][-1] == "teachers.0.checkpoint=t_retina.pth"
    two = opts("two_teachers_confidence")
    assert two[0] == "train_distill.py"
    assert two[1][-2:] == ["teachers.0.checkpoint=t_fcos.pth", "teachers.1.checkpoint=t_retina.pth"]
    for name in ("ema", "online_pkd", "mutual_pkd"):  # no trained teacher
        assert not any("checkpoint" in o for o in opts(name)[1])
    cfg = load_config(accuracy.recipe_path("two_teachers_fixed.yaml"), two[1])  # the --opts address list entries
    assert [t.checkpoint for t in cfg.teachers] == ["t_fcos.pth", "t_retina.pth"] and cfg.train.seed == 1
    with pytest.raises(RuntimeError, match="teacher_retina"):  # a teacher not trained yet: the run fails, named
        accuracy.training_command("retina_pkd.yaml", 0, {"teacher": "t_fcos.pth"}, [])


# fake val APs (seed s adds 0.01 s): the top 3 are fgd_logit_kd, logit_kd, cwd; born_again, far above them, is
# not ranked (another student); the ensemble rows beat (fixed, confidence) or trail (adaptive) the FCOS teacher alone
FAKE_AP = {"baseline": 0.10, "pkd": 0.20, "logit_kd": 0.25, "fgd_logit_kd": 0.30, "fgd": 0.15, "cwd": 0.22,
           "fcos_pkd": 0.18, "retina_pkd": 0.16, "two_teachers_fixed": 0.19, "two_teachers_confidence": 0.21,
           "two_teachers_adaptive": 0.17, "online_pkd": 0.14, "mutual_pkd": 0.16, "born_again": 0.55}  # fmt: skip
FAKE_TEACHER_AP = {"teacher": 0.5, "teacher_retina": 0.4}


class Calls(list):
    """The student runs ``(name, seed, opts)`` in order; ``events``: the teachers' trainings ``("teacher", tag)``
    and the runs ``(name, seed)`` in order; ``commands``: each run's recipe, tool and full ``--opts``."""

    def __init__(self):
        super().__init__()
        self.events, self.commands = [], {}


def _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap: float, tune_gap_ap: float = None, argv=()):
    """A protocol run with fake trainings; the gap run scores ``gap_ap`` on val and ``tune_gap_ap`` (default: the
    same) on the tuning split, the teachers :data:`FAKE_TEACHER_AP` on both. Returns :class:`Calls`; the commands
    are :func:`training_command`'s, so they hold the teachers' checkpoints each run gets."""
    calls = Calls()

    def fake_run_student(name, recipe, seed, checkpoints, opts, tag):
        calls.append((name, seed, tuple(opts)))
        calls.events.append((name, seed))
        calls.commands[(name, seed)] = (recipe, *accuracy.training_command(recipe, seed, checkpoints, opts))
        time_s = 100.0 if name.startswith("baseline") else 150.0
        value = gap_ap if name == accuracy.GAP_RUN else FAKE_AP.get(name.removeprefix("long_"), 0.12)
        record = {"run": name, "seed": seed, "recipe": recipe, "work_dir": f"work_dirs/{name}",
                  "AP": value + 0.01 * seed, "AP50": 0.3, "APs": 0.05, "step_s": 0.5,
                  "train_time_s": time_s, "iterations": 600, "iters_per_epoch": 200, "wall_s": time_s}  # fmt: skip
        accuracy._write_json(accuracy.record_path(tag, name, seed), record)
        return record

    def fake_ensure_teacher(recipe, tag, opts, publish=True):
        calls.events.append(("teacher", tag))
        tid = next(t for t, r in accuracy.TEACHERS.items() if r == recipe)
        record = {"run": tag, "AP": FAKE_TEACHER_AP[tid], "checkpoint": f"{tag}.pth", "wall_s": 1.0,
                  "recipe": recipe, "iterations": 3200, "curve": [[2800, 0.495], [3200, 0.5]]}  # fmt: skip
        accuracy._write_json(accuracy.RESULTS / "runs" / f"{tag}.json", record)
        return record

    def fake_tune_ap(record, record_file, recipe, checkpoint, model="model"):
        if record.get("run") == accuracy.GAP_RUN:
            record["tune_AP"] = gap_ap if tune_gap_ap is None else tune_gap_ap
        else:  # a teacher or a student run scores its val AP
            record["tune_AP"] = record["AP"]
        return record["tune_AP"]

    monkeypatch.setattr(accuracy, "run_student", fake_run_student)
    monkeypatch.setattr(accuracy, "ensure_teacher", fake_ensure_teacher)
    monkeypatch.setattr(accuracy, "tune_ap", fake_tune_ap)
    monkeypatch.setattr(accuracy, "final_student_weights", lambda record: tmp_path / "weights.pth")
    monkeypatch.setattr(accuracy, "DERIVED_DIR", tmp_path / "derived")
    monkeypatch.setattr(accuracy, "ensure_loss_scales", lambda ckpt: None)
    monkeypatch.setattr(accuracy, "measure_cost", lambda *a: None)
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["accuracy.py", *argv])
    accuracy.main()
    return calls


def test_protocol_order_regime_check_seeds_top_methods_wall_time_and_long_schedule(accuracy, tmp_path, monkeypatch):
    calls = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.30)
    # 1. the regime check: the baseline on the teacher's whole schedule (28 epochs), 2 seeds
    assert [c[:2] for c in calls[:2]] == [(accuracy.GAP_RUN, 0), (accuracy.GAP_RUN, 1)]
    assert "train.epochs=28" in calls[0][2]
    # 2. equal steps, seed by seed: the rows that need only the FCOS teacher (or none; the baseline's third seed
    # too), then, once the RetinaNet teacher is trained, the rows that need it
    n_retina = len(["retina_pkd", *accuracy.TWO_TEACHER_RUNS])
    n_ready = len(accuracy.RUNS) - n_retina
    first = calls[2 : 2 + 2 * len(accuracy.RUNS) + 1]
    assert [seed for _, seed, _ in first] == [0] * n_ready + [1] * n_ready + [2] + [0] * n_retina + [1] * n_retina
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
    # 4. long schedule (x 4 = 48 epochs): the baseline and the 2 best, 2 seeds each
    long = [c for c in calls if c[0].startswith("long_")]
    assert sorted({c[0] for c in long}) == ["long_baseline", "long_fgd_logit_kd", "long_logit_kd"]
    assert len(long) == 6 and all("train.epochs=48" in c[2] for c in long)
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


def test_issue15_rows_in_the_protocol(accuracy, tmp_path, monkeypatch):
    calls = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.30)
    ev = calls.events
    # the FCOS teacher first; the RetinaNet teacher once every row that needs only the FCOS teacher (or none) has
    # run, right before the rows that need it
    assert ev[0] == ("teacher", "v3_teacher") and ev.count(("teacher", "v3_teacher_retina")) == 1
    retina = ev.index(("teacher", "v3_teacher_retina"))
    assert ev[1:3] == [(accuracy.GAP_RUN, 0), (accuracy.GAP_RUN, 1)] and ev[3] == ("baseline", 0)
    needs_retina = ["retina_pkd", *accuracy.TWO_TEACHER_RUNS]
    ready = [(n, s) for s in range(3) for n, _, seeds, _ in accuracy.RUNS if n not in needs_retina and s < seeds]
    assert ev[3:retina] == ready  # the baseline's third seed included
    assert ev[retina + 1 : retina + 1 + 2 * len(needs_retina)] == [(n, s) for s in range(2) for n in needs_retina]
    # the new rows run in the first pass, 2 seeds each
    new = ["fcos_pkd", *accuracy.ONLINE_RUNS, "born_again", *needs_retina]
    assert [c[:2] for c in calls if c[0] in new] == [(n, s) for s in range(2) for n in new[:4]] + [
        (n, s) for s in range(2) for n in needs_retina
    ]
    # which teacher checkpoints each run gets
    ckpt = {n: [o for o in calls.commands[(n, 0)][2] if "checkpoint=" in o] for n in [*new, "pkd", "ema", "baseline"]}
    assert ckpt["fcos_pkd"] == ["teachers.0.checkpoint=v3_teacher.pth"]
    assert ckpt["retina_pkd"] == ["teachers.0.checkpoint=v3_teacher_retina.pth"]
    for n in accuracy.TWO_TEACHER_RUNS:
        assert ckpt[n] == ["teachers.0.checkpoint=v3_teacher.pth", "teachers.1.checkpoint=v3_teacher_retina.pth"]
    assert ckpt["pkd"] == ckpt["born_again"] == ["teacher.checkpoint=v3_teacher.pth"]
    assert ckpt["online_pkd"] == ckpt["mutual_pkd"] == ckpt["ema"] == ckpt["baseline"] == []
    # every run's recipe loads with the --opts it was given (derived rows: the recipes written to DERIVED_DIR)
    for recipe, tool, opts in {(r, t, tuple(o)) for r, t, o in calls.commands.values()}:
        cfg = load_config(accuracy.recipe_path(recipe), list(opts))
        assert (tool == "train_distill.py") == bool(cfg.teacher or cfg.teachers)
        for o in opts:
            if "checkpoint=" in o:
                key, path = o.split("=")
                index = key.split(".")[1] if key.startswith("teachers.") else None
                teacher = cfg.teachers[int(index)] if index is not None else cfg.teacher
                assert teacher.checkpoint == path and teacher.mode == "frozen"
    # born_again (AP 55 > every bench student) is ranked with none of them: no third seed, no long run, no derived row
    assert not any(c[0] == "born_again" and c[1] == 2 for c in calls) and ("long_born_again", 0) not in ev
    results = json.loads((tmp_path / "accuracy.json").read_text())
    assert results["teachers"]["teacher_retina"]["tune_AP"] == pytest.approx(0.4)
    assert "delta_AP" not in results["runs"]["born_again"]  # compared with its teacher, not the bench baseline
    comp = results["issue15"]
    two = comp["two_teachers"]
    assert two["best_single"] == "fcos_pkd"  # 18.5 vs 16.5 on the tuning split
    assert two["rows"]["two_teachers_confidence"]["delta_AP"] == pytest.approx(0.215 - 0.185)
    assert two["rows"]["two_teachers_confidence"]["beyond_spread"]
    assert two["rows"]["two_teachers_adaptive"]["delta_AP"] == pytest.approx(0.175 - 0.185)
    assert comp["online"]["online_pkd"]["ref"] == "pkd"
    assert comp["online"]["online_pkd"]["delta_AP"] == pytest.approx(0.145 - 0.205)
    born = comp["against_teacher"]["born_again"]
    assert born["delta_AP"] == pytest.approx(0.555 - 0.5) and born["ref_AP"] == 0.5 and born["beyond_spread"]
    assert comp["ema"]["delta_AP"] == pytest.approx(0.125 - 0.11)  # the baseline has 3 seeds
    assert comp["relation"]["best_feature_relation"]["ref"] == "cwd"  # the derived row's base, the best feature
    md = (tmp_path / "accuracy.md").read_text()
    assert "- Second teacher teacher_retinanet.yaml (`teacher_retina`): AP 40.0 (tuning split 40.0)" in md
    assert "  - `two_teachers_confidence`: 21.5 ± 0.7, +3.0 AP (beyond the spread" in md
    assert "Born-again `born_again`" in md and "against its teacher's 50.0 (one run)" in md
    assert "the student **passes its teacher**" in md
    assert "Online `online_pkd`" in md and "against the frozen teacher `pkd`: -6.0 AP" in md
    # rerun: nothing trains, not even the second teacher
    calls2 = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.30)
    assert calls2 == [] and ("teacher", "v3_teacher_retina") not in calls2.events


def test_the_plan_counts_the_new_rows_and_the_second_teacher(accuracy, tmp_path, monkeypatch, capsys):
    plan = accuracy.protocol_plan(2400, 5600)
    assert plan.count((5600, "born_again")) == 2  # born-again trains for the teacher's schedule
    assert plan.count((2400, "two_teachers")) == 6 and plan.count((2400, "online")) == 4
    assert plan.count((5600, "student")) == accuracy.GAP_SEEDS
    calls = _fake_bench(accuracy, tmp_path, monkeypatch, gap_ap=0.30, argv=["--plan", "--jobs", "2"])
    assert calls == [] and calls.events == []  # --plan trains nothing
    out = capsys.readouterr().out
    assert "teacher teacher (teacher.yaml" in out and "teacher teacher_retina (teacher_retinanet.yaml" in out
    assert "steps  born_again seed 1" in out and "steps  two_teachers_adaptive seed 0" in out
    teachers_h = 2 * 28 * 200 * accuracy.DEFAULT_STEP_S["teacher"] / 3600  # two teachers of 28 epochs, neither trained
    hours = accuracy.estimate_elapsed_h(plan, accuracy.DEFAULT_STEP_S, 2) + teachers_h
    assert f"--jobs 2: {hours:.1f} h (+ teachers {teachers_h:.1f} h)" in out


def test_the_tuning_split_is_made_from_a_data_synthetic_only_file(accuracy, tmp_path):
    """tune.yaml holds only ``data.synthetic`` (not a loadable recipe): the split is generated from its knobs."""
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(f"data:\n  synthetic: {{out: {tmp_path / 'split'}, num_train: 1, num_val: 2, size: 32, seed: 1, "
                   "min_object_size: 8, clutter: 0.5}\n")  # fmt: skip
    opts = accuracy.tune_split_opts(cfg)
    assert opts == [f"data.val.ann_file={tmp_path / 'split/annotations/val.json'}",
                    f"data.val.img_dir={tmp_path / 'split/images/val'}"]  # fmt: skip
    assert len(json.loads((tmp_path / "split/annotations/val.json").read_text())["images"]) == 2
    assert json.loads((tmp_path / "split/generator.json").read_text())["seed"] == 1
    knobs = yaml.safe_load(accuracy.TUNE_CFG.read_text())["data"]["synthetic"]  # the benchmark's own: seed 1
    assert (
        knobs["seed"]
        != yaml.safe_load((accuracy.BENCH_CFG / "_base_/data.yaml").read_text())["data"]["synthetic"]["seed"]
    )


def test_the_comparisons_start_from_the_same_student_weights(accuracy, tmp_path):
    """Each teacher alone and the two-teacher rows start from the baseline's weights (one-entry ``teachers:``
    lists); online_pkd from those of pkd, its frozen counterpart (both build the same teacher before the student)."""
    import torch

    from detkd.distiller import build_distiller_from_cfg
    from detkd.engine.checkpoint import save_checkpoint
    from detkd.engine.trainer import seed_everything
    from detkd.models.build import build_detector_from_cfg

    ckpts = {}
    for tid, recipe in accuracy.TEACHERS.items():  # untrained teachers of the two architectures
        ckpts[tid] = str(tmp_path / f"{tid}.pth")
        model = build_detector_from_cfg(load_config(accuracy.recipe_path(recipe)).model, 9)
        save_checkpoint({"model": model.state_dict()}, ckpts[tid])

    def student(name):
        path = accuracy.recipe_path(accuracy.recipe_of(name))
        seed_everything(0)
        return build_distiller_from_cfg(load_config(path, accuracy.checkpoint_opts(path, ckpts)), 9).student

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    seed_everything(0)
    baseline = build_detector_from_cfg(load_config(accuracy.recipe_path("student.yaml")).model, 9)
    assert all(same(student(n), baseline) for n in ["pkd", "fcos_pkd", "retina_pkd", "two_teachers_confidence"])
    assert same(student("online_pkd"), student("pkd"))


def test_a_cached_teacher_whose_checkpoint_is_gone_stops_with_a_clear_message(accuracy, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    (tmp_path / "runs").mkdir()
    record = {"run": "v2_teacher", "checkpoint": str(tmp_path / "gone" / "last_weights.pth"), "AP": 0.6}
    (tmp_path / "runs" / "v2_teacher.json").write_text(json.dumps(record))
    monkeypatch.setattr(accuracy, "run_tool", lambda *a, **k: pytest.fail("the teacher must not be retrained"))
    with pytest.raises(RuntimeError, match=r"v2_teacher\.json: the cached teacher's checkpoint .*gone.* is missing"):
        accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v2_teacher", [], publish=False)
    # with the checkpoint back, the record is used as it is
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "last_weights.pth").write_bytes(b"weights")
    assert accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v2_teacher", [], publish=False)["AP"] == 0.6
    # a record that names the checkpoint's hash refuses another file in its place
    record["sha256"] = hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "runs" / "v2_teacher.json").write_text(json.dumps(record))
    assert accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v2_teacher", [], publish=False)["AP"] == 0.6
    (tmp_path / "gone" / "last_weights.pth").write_bytes(b"other weights")
    with pytest.raises(RuntimeError, match=r"is not the one this record measured \(sha256 differs\)"):
        accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v2_teacher", [], publish=False)


def test_a_lost_teacher_with_a_hash_is_rebuilt_and_kept_only_if_bit_identical(accuracy, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    (tmp_path / "runs").mkdir()
    ckpt = tmp_path / "bench" / "v2_teacher" / "last_weights.pth"
    record = {"run": "v2_teacher", "checkpoint": str(ckpt), "AP": 0.6, "threads": 2,
              "sha256": hashlib.sha256(b"weights").hexdigest()}  # fmt: skip
    (tmp_path / "runs" / "v2_teacher.json").write_text(json.dumps(record))
    trained = {}

    def fake_run_tool(script, recipe, work_dir, opts, log, extra=None):
        trained.update(script=script, recipe=recipe.name, work_dir=work_dir, threads=accuracy.THREADS["per_run"])
        return 1.0

    weights = {"bytes": b"weights"}

    def fake_export(work):
        work.mkdir(parents=True, exist_ok=True)
        (work / "last_weights.pth").write_bytes(weights["bytes"])

    import detkd.engine.trainer as trainer

    monkeypatch.setattr(accuracy, "run_tool", fake_run_tool)
    monkeypatch.setattr(accuracy, "_export_last_weights", fake_export)
    monkeypatch.setitem(accuracy.THREADS, "per_run", 1)
    # the benchmark teacher trains in bfloat16: a CPU without it cannot reproduce it, and says so before training
    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: False)
    with pytest.raises(RuntimeError, match=r"cannot be rebuilt bit-identically here: .* bfloat16 autocast"):
        accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v2_teacher", ["train.amp=true"], publish=False)
    assert not trained
    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: True)
    assert (
        accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v2_teacher", ["train.amp=true"], publish=False)["AP"] == 0.6
    )
    # trained with the record's recipe and thread count, into the record's checkpoint dir; --jobs' threads restored
    assert trained == {"script": "train.py", "recipe": accuracy.TEACHER_RECIPE, "work_dir": ckpt.parent, "threads": 2}
    assert accuracy.THREADS["per_run"] == 1 and ckpt.read_bytes() == b"weights"
    # a rebuild that is not bit-identical is kept aside, never used
    ckpt.unlink()
    weights["bytes"] = b"other weights"
    with pytest.raises(
        RuntimeError, match=r"v2_teacher: the retrained teacher .*last_weights\.rebuilt\.pth has sha256"
    ):
        accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v2_teacher", [], publish=False)
    assert not ckpt.exists() and (ckpt.parent / "last_weights.rebuilt.pth").read_bytes() == b"other weights"


def test_float16_state_rounds_floating_tensors_keeps_integer_buffers_and_refuses_overflow(accuracy):
    import torch

    state = {"w": torch.tensor([1.0, 1.0 + 2**-12, -3.14159]), "bn.num_batches_tracked": torch.tensor(7)}
    half = accuracy.float16_state(state, "t.pth")
    assert half["w"].dtype == torch.float16 and half["bn.num_batches_tracked"].dtype == torch.int64
    # 1 + 2^-12 is below float16's resolution at 1 (2^-10): it rounds to 1; pi to the nearest float16, 3.140625
    assert half["w"].tolist() == [1.0, 1.0, -3.140625] and half["bn.num_batches_tracked"].item() == 7
    with pytest.raises(ValueError, match=r"t\.pth: bn\.running_var holds values float16 cannot represent"):
        accuracy.float16_state({"bn.running_var": torch.tensor([70000.0])}, "t.pth")


def test_a_detector_loads_float16_weights_into_its_float32_parameters():
    import torch

    from detkd.engine.checkpoint import load_detector_weights, save_checkpoint
    from detkd.models.build import build_detector

    torch.manual_seed(0)
    opts = {"fpn_channels": 32, "min_size": 64, "max_size": 64}
    source = build_detector("fcos", "mobilenet_v3_small", 3, **opts)
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    target = build_detector("fcos", "mobilenet_v3_small", 3, **opts)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint({"model": half}, Path(tmp) / "t.pth")
        load_detector_weights(target, Path(tmp) / "t.pth")
    loaded = target.state_dict()
    assert all(loaded[k].dtype == torch.float32 for k, v in half.items() if v.is_floating_point())
    assert all(torch.equal(loaded[k], v.float()) for k, v in half.items() if v.is_floating_point())


def test_publishing_a_teacher_keeps_float16_weights_in_the_repo_and_rescores_them(accuracy, tmp_path, monkeypatch):
    import torch

    from detkd.engine.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.setattr(accuracy, "PUBLISHED_DIR", tmp_path / "teachers")
    monkeypatch.setattr(accuracy, "tune_split_opts", lambda: ["data.val.ann_file=tune.json"])
    work = tmp_path / "work"
    save_checkpoint({"model": {"w": torch.tensor([0.1, 2.0]), "n": torch.tensor(3)}}, work / "last_weights.pth")
    record = {"run": "v9_teacher", "checkpoint": str(work / "last_weights.pth"), "AP": 0.61, "AP50": 0.8,
              "sha256": accuracy._sha256(work / "last_weights.pth"), "curve": [[200, 0.61]]}  # fmt: skip
    evaluated = []

    def fake_eval(cmd, **kwargs):  # tools/eval.py: the published file, scored on val, then on the tuning split
        out = Path(cmd[cmd.index("--out") + 1])
        evaluated.append((Path(cmd[cmd.index("--ckpt") + 1]), cmd[cmd.index("--opts") + 1 :]))
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"AP": 0.6 if not evaluated[-1][1] else 0.55, "AP50": 0.79}))

    monkeypatch.setattr(accuracy.subprocess, "run", fake_eval)
    record_file = tmp_path / "runs" / "v9_teacher.json"
    original = dict(record)
    out = accuracy.publish_teacher(record, record_file, accuracy.TEACHER_RECIPE)
    dst = tmp_path / "teachers" / "v9_teacher.pth"
    weights = load_checkpoint(dst)["model"]
    assert weights["w"].dtype == torch.float16 and weights["n"].item() == 3
    assert evaluated == [(dst, []), (dst, ["data.val.ann_file=tune.json"])]
    # the record now describes the published weights; the float32 original's numbers are kept beside them
    assert out["checkpoint"] == str(dst) and out["sha256"] == accuracy._sha256(dst) and out["published_as"] == "float16"
    assert (out["AP"], out["AP50"], out["tune_AP"]) == (0.6, 0.79, 0.55)
    assert out["float32"]["AP"] == 0.61 and out["float32"]["checkpoint"] == str(work / "last_weights.pth")
    assert out["curve"] == [[200, 0.61]] and json.loads(record_file.read_text()) == out
    # a stored record of an unpublished teacher is published when the protocol next runs
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    record_file.write_text(json.dumps(original))
    calls = []
    monkeypatch.setattr(accuracy, "publish_teacher", lambda r, p, recipe: calls.append(p) or {**r, "published_as": 1})
    assert accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v9_teacher", [])["published_as"] == 1
    assert calls == [record_file]


def test_a_new_teacher_trains_in_the_teacher_dir_and_its_record_names_a_repo_relative_checkpoint(
    accuracy, tmp_path, monkeypatch
):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    teacher_dir = accuracy.REPO / "work_dirs" / "test_teacher_dir"
    monkeypatch.setitem(accuracy.TEACHER_DIR, "root", teacher_dir)
    seen = {}

    def fake_run_tool(script, recipe, work_dir, opts, log, extra=None):
        seen["work_dir"] = work_dir
        return 12.0

    monkeypatch.setattr(accuracy, "run_tool", fake_run_tool)
    monkeypatch.setattr(accuracy, "final_metrics", lambda work: {"AP": 0.5, "curve": [[200, 0.5]]})
    monkeypatch.setattr(accuracy, "_export_last_weights", lambda work: None)
    monkeypatch.setattr(accuracy, "_sha256", lambda path: "abc")
    published = []
    monkeypatch.setattr(accuracy, "publish_teacher", lambda record, path, recipe: published.append(recipe) or record)
    record = accuracy.ensure_teacher(accuracy.TEACHER_RECIPE, "v9_teacher", [])
    assert published == [accuracy.TEACHER_RECIPE]  # the full protocol's teachers are kept in the repository
    assert seen["work_dir"] == teacher_dir / "v9_teacher"
    assert record["checkpoint"] == "work_dirs/test_teacher_dir/v9_teacher/last_weights.pth"
    assert record["wall_s"] == 12.0 and record["sha256"] == "abc"
    assert json.loads((tmp_path / "runs" / "v9_teacher.json").read_text()) == record


def test_a_record_of_a_changed_recipe_is_set_aside_and_kept(accuracy, tmp_path, monkeypatch):
    import shutil

    bench = tmp_path / "bench"
    shutil.copytree(BENCH.parent / "configs" / "bench", bench)
    monkeypatch.setattr(accuracy, "BENCH_CFG", bench)
    accuracy.recipe_digest.cache_clear()
    try:
        runs = tmp_path / "runs"
        for name in ("defeat", "mse"):
            digest = accuracy.recipe_digest(f"{name}.yaml")
            accuracy._write_json(runs / f"v2_{name}_s0.json", {"run": name, "seed": 0, "recipe": f"{name}.yaml",
                                 "opts": [], "recipe_digest": digest, "AP": 0.3})  # fmt: skip
        accuracy._write_json(runs / "v2_gid_s0.json", {"run": "gid", "seed": 0, "recipe": "gid.yaml", "AP": 0.4})
        paths = sorted(runs.glob("*.json"))
        assert accuracy.stale_records(paths) == []
        # the machine-dependent keys are not part of a run's identity; its losses and schedule are
        defeat = accuracy.recipe_digest("defeat.yaml")
        assert accuracy.recipe_digest("defeat.yaml", ("teacher.checkpoint=/elsewhere/t.pth",)) == defeat
        assert accuracy.recipe_digest("defeat.yaml", ("train.epochs=20",)) != defeat
        recipe = bench / "defeat.yaml"
        recipe.write_text(recipe.read_text().replace("fg_weight: 3.0", "fg_weight: 1.0e-3"))
        accuracy.recipe_digest.cache_clear()
        stale = accuracy.stale_records(paths)
        assert [(p.name, "defeat.yaml changed" in why) for p, why in stale] == [("v2_defeat_s0.json", True)]
        out = accuracy.set_aside(*stale[0])
        assert out == runs / "superseded" / "v2_defeat_s0.json" and not (runs / "v2_defeat_s0.json").exists()
        kept = json.loads(out.read_text())
        assert kept["AP"] == 0.3 and "changed" in kept["superseded"]
    finally:
        accuracy.recipe_digest.cache_clear()  # the digests of the copied recipes must not outlive the test


def test_a_run_whose_weights_were_lost_before_scoring_is_set_aside_to_run_again(accuracy, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(accuracy, "REPO", tmp_path)
    scored = []
    monkeypatch.setattr(accuracy, "tune_ap", lambda record, path, recipe, weights, model: scored.append(weights))
    lost = {"run": "baseline", "seed": 0, "recipe": "student.yaml", "work_dir": "gone", "AP": 0.3}
    kept = {"run": "baseline", "seed": 1, "recipe": "student.yaml", "work_dir": "here", "AP": 0.31}
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "last.pth").write_bytes(b"weights")
    for r in (lost, kept):
        accuracy._write_json(accuracy.record_path("v2", "baseline", r["seed"]), r)
    assert accuracy.score_run_on_tune(kept, "v2") and scored == [tmp_path / "here" / "last.pth"]
    assert not accuracy.score_run_on_tune(lost, "v2")
    assert not accuracy.record_path("v2", "baseline", 0).exists()
    assert "lost" in json.loads((tmp_path / "runs" / "superseded" / "v2_baseline_s0.json").read_text())["superseded"]
    lost_too = {**lost, "seed": 2}
    accuracy._write_json(accuracy.record_path("v2", "baseline", 2), lost_too)
    records = {"baseline": [lost_too, kept]}
    accuracy.score_on_tune(records, "v2")  # the lost run leaves the records, so that the plan trains it again
    assert records == {"baseline": [kept]} and not accuracy.record_path("v2", "baseline", 2).exists()


def test_grad_scales_groups_terms_by_loss_and_measures_the_gradient_norm():
    grad_scales = _load("grad_scales")
    assert grad_scales.term_group("task/classification") == "task"
    assert grad_scales.term_group("distill/fgd/p3") == grad_scales.term_group("distill/fgd/p5") == "fgd"
    assert grad_scales.term_group("distill/logit_kd/box") == "logit_kd/box"
    assert grad_scales.term_group("distill/pkd/fcos/p4") == "pkd/fcos"
    import torch

    w = torch.tensor([3.0, -4.0], requires_grad=True)
    v = torch.tensor([1.0], requires_grad=True)
    # d/dw sum(w^2) = 2w -> norm 10; v gets no gradient and is left out
    assert grad_scales.grad_norm((w**2).sum(), [w, v]) == pytest.approx(10.0)


def test_pseudo_label_quality_counts_the_added_boxes_by_their_overlap_with_the_ground_truth():
    import torch

    quality = _load("pseudo_label_quality")
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([1, 2])}
    kept = {  # sorted by decreasing score, as filter_detections returns them
        "boxes": torch.tensor(
            [
                [0.0, 0.0, 10.0, 10.0],  # the first GT box, its class: a true positive, not added
                [20.0, 20.0, 30.0, 30.0],  # the second GT box, wrong class: no TP, IoU 1 -> not added
                [0.0, 0.0, 10.0, 25.0],  # IoU 100/250 = 0.4 with the first box, class 1: added, [0.3, merge)
                [8.0, 8.0, 18.0, 18.0],  # IoU 4/196 with the first box, class 3: added, (0, 0.3)
                [50.0, 50.0, 60.0, 60.0],  # on no GT box: added, IoU 0
            ]
        ),
        "labels": torch.tensor([1, 3, 1, 3, 1]),
    }
    s = quality.image_stats(gt, kept, merge_iou=0.5)
    assert (s["gt"], s["kept"], s["tp"], s["added"]) == (2, 5, 1, 3)
    assert (s["added_iou_0"], s["added_iou_(0,0.3)"], s["added_iou_[0.3,merge)"]) == (1, 1, 1)
    assert s["added_same_class"] == 1  # only the misplaced class-1 box agrees with the GT box it overlaps
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    assert quality.image_stats(empty, kept, 0.5)["added_iou_0"] == 5  # no GT: every box is added, on no object
    assert quality.image_stats(gt, empty, 0.5)["added"] == 0
    summary = quality.summarize([s, quality.image_stats(gt, empty, 0.5)])
    assert summary["images"] == 2 and summary["added_per_image"] == pytest.approx(1.5)
    assert summary["teacher_recall"] == pytest.approx(1 / 4) and summary["teacher_precision"] == pytest.approx(1 / 5)
    assert summary["images_with_added"] == pytest.approx(0.5)
    assert summary["added_share_by_best_iou"] == pytest.approx({"0": 1 / 3, "(0,0.3)": 1 / 3, "[0.3,merge)": 1 / 3})


def test_step_time_leaves_out_evaluations_and_the_gap_across_a_resume(accuracy, tmp_path):
    # 0.5 s and 0.2 CPU s per step; an evaluation (+30 s) after iter 100, a resume after iter 150: the process's
    # clock restarts and a night passes
    rows = []
    for it, t, cpu in [(50, 100.0, 10.0), (100, 125.0, 20.0), (150, 180.0, 40.0), (200, 205.0, 50.0),
                       (250, 40205.0, 9.0), (300, 40230.0, 19.0), (350, 40255.0, 29.0)]:  # fmt: skip
        rows.append({"type": "train", "iter": it, "epoch": (it - 1) // 100, "time": t, "cpu_time": cpu, "loss": 1.0})
    rows.insert(3, {"type": "val", "iter": 150, "epoch": 1, "time": 170.0, "AP": 0.2})
    rows.append({"type": "val", "iter": 350, "epoch": 3, "time": 40300.0, "cpu_time": 49.0, "AP": 0.4})
    trains = [r for r in rows if r["type"] == "train"]
    assert accuracy.interval_step_time(trains) == pytest.approx(0.5)
    assert accuracy.interval_step_time(trains, "cpu_time") == pytest.approx(0.2)
    assert accuracy.interval_step_time([{"iter": 1, "time": 3.0}], "time") is None
    assert accuracy.interval_step_time(trains[:3], "missing") is None
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = accuracy.final_metrics(work)
    assert m["AP"] == 0.4 and "cpu_time" not in m
    assert m["step_s"] == pytest.approx(0.5) and m["train_time_s"] == pytest.approx(0.5 * 350)
    assert m["cpu_step_s"] == pytest.approx(0.2) and m["cpu_train_time_s"] == pytest.approx(0.2 * 350)
    # an old record (times over the whole log) is re-derived while its work dir is still there
    record = {"work_dir": str(work), "train_time_s": 999.0, "step_s": 2.85}
    assert accuracy.refresh_timing(record) and record["step_s"] == pytest.approx(0.5)
    assert not accuracy.refresh_timing(record)  # nothing left to change
    assert not accuracy.refresh_timing({"work_dir": str(tmp_path / "gone"), "step_s": 1.0})


def test_the_wall_time_baseline_gets_the_cpu_time_ratio_when_both_rows_have_it(accuracy):
    base = [
        {"iterations": 2400, "iters_per_epoch": 200, "train_time_s": 300.0, "cpu_train_time_s": 290.0},
        {"iterations": 2400, "iters_per_epoch": 200, "train_time_s": 310.0},
    ]  # an older record: no CPU time
    best = [{"train_time_s": 1800.0, "cpu_train_time_s": 725.0}]  # its wall time inflated by other jobs
    assert accuracy.cost_time_key(best, base) == "cpu_train_time_s"
    opts = accuracy.wall_time_opts({"baseline": base, "gid": best}, "gid", ["x=1"])
    assert opts == ["x=1", "train.epochs=30", "train.max_iters=6000"]  # 2400 * 725 / 290
    assert accuracy.cost_time_key(best, [base[1]]) == "train_time_s"
    # in wall time the least disturbed run counts: the baseline's 300 s, not the mean with a run timed under load
    baselines = [base[1], {**base[1], "train_time_s": 300.0}]
    wall = accuracy.wall_time_opts({"baseline": baselines, "gid": [{"train_time_s": 750.0}]}, "gid", [])
    assert wall == ["train.epochs=30", "train.max_iters=6000"]


def test_the_results_table_shows_cpu_time_where_the_runs_have_it(accuracy):
    results = json.loads((BENCH / "results" / "v2" / "accuracy.json").read_text())  # a stored report
    runs = {"baseline": {**results["runs"]["baseline"], "train_time_s": 600.0, "cpu_train_time_s": 300.0},
            "mse": {**results["runs"]["mse"], "train_time_s": 720.0}}  # fmt: skip
    runs["mse"].pop("cpu_train_time_s", None)
    md = accuracy.to_markdown({**results, "runs": runs})
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert rows["baseline"].endswith("| 10.0 min | 5.0 min |")
    assert rows["mse"].endswith("| 12.0 min | — |")


def test_roi_budget_reads_the_step_cost_only_from_a_speed_file_with_every_budget(tmp_path):
    budget = _load("roi_kd_budget")

    def row(method, overhead):
        return {"pair": "faster_rcnn", "method": method, "overhead": overhead, "distill": {"median_s": 1.0}}

    old = {"meta": {}, "rows": [row("roi_kd", 1.72)]}  # before max_rois: its roi_kd distilled every ROI
    (tmp_path / "speed.json").write_text(json.dumps(old))
    assert budget.speed_rows(tmp_path) is None
    new = {"meta": {"reps": 8}, "rows": [row("roi_kd_all", 1.7), row("roi_kd", 1.1), row("roi_kd_32", 1.02)]}
    (tmp_path / "speed.json").write_text(json.dumps(new))
    got = budget.speed_rows(tmp_path)
    assert got["file"] == "speed.json"
    assert {k: v["overhead"] for k, v in got["rows"].items()} == {
        "roi_kd_all": 1.7,
        "roi_kd_128": 1.1,
        "roi_kd_32": 1.02,
    }


def test_teacher_targets_measures_how_unsure_the_teacher_is():
    import math

    import torch

    targets = _load("teacher_targets")
    # three positions of two classes: top probabilities 0.5, sigmoid(10) ~ 1, sigmoid(-10) ~ 0
    logits = torch.tensor([[[0.0, -30.0], [10.0, -30.0], [-10.0, -30.0]]])
    s = targets.softness(logits)
    assert s["positions"] == 3 and s["uncertain"] == 1 and s["confident"] == 2
    tail = 2 * (11 * math.exp(-10))  # the two sure positions' entropies at |logit| 10: about (|x| + 1) e^-|x|
    assert s["entropy"] == pytest.approx(math.log(2) + tail, rel=1e-3)
    summary = targets.summarize([s, targets.softness(logits[:, :1])])
    assert summary["positions"] == 4 and summary["uncertain"] == pytest.approx(2 / 4)
    assert summary["confident"] == pytest.approx(3 / 4)


def test_the_time_estimate_prefers_cpu_seconds_per_thread_to_the_wall_clock(accuracy):
    # a 1-thread run slowed by a neighbour: 0.9 s wall per step, 0.5 CPU s per step -> 0.5
    assert accuracy.record_step_s({"step_s": 0.9, "cpu_step_s": 0.5, "threads": 1}) == 0.5
    # a 2-thread run: its CPU seconds are spread over two cores
    assert accuracy.record_step_s({"step_s": 0.6, "cpu_step_s": 1.0, "threads": 2}) == 0.5
    assert accuracy.record_step_s({"step_s": 0.7}) == 0.7  # older records: the wall clock
    assert accuracy.record_step_s({}) is None


def test_records_name_the_machine_and_reports_count_them(accuracy):
    import platform

    import torch

    from detkd.cost import machine_description

    described = machine_description()
    assert described.startswith(platform.machine() + ", ")
    assert described.endswith(f"CPU cores, {torch.backends.cpu.get_cpu_capability()}")
    rows = [{"machine": "A"}, {"machine": "A"}, {"machine": "B"}, {}]
    assert accuracy.machines_of(rows) == {"A": 2, "B": 1, "not recorded": 1}


def test_threads_per_student_run_default_to_cores_over_jobs_unless_given(accuracy, monkeypatch):
    monkeypatch.setattr(accuracy.os, "cpu_count", lambda: 8)
    assert accuracy.student_threads(1) is None  # one job: torch's default, every core
    assert accuracy.student_threads(2) == 4
    assert accuracy.student_threads(3) == 2
    assert accuracy.student_threads(16) == 1  # never below one
    assert accuracy.student_threads(1, threads=1) == 1  # one job on one core leaves the rest free
    assert accuracy.student_threads(2, threads=3) == 3


def test_a_resumed_run_keeps_the_whole_runs_time_not_the_last_invocations(accuracy):
    record = {"run": "gid", "wall_s": 33.0, "train_time_s": 951.0, "AP": 0.47}
    out = accuracy.resumed_wall_time(record)
    assert out["wall_s"] == 951.0 and out["resumed"] is True and "33 s" in out["wall_s_note"]
    assert out["AP"] == 0.47 and record["wall_s"] == 33.0  # the metrics stay, the input is not changed
    # a run resumed early in its schedule: this invocation's wall time is the larger, and is kept
    assert accuracy.resumed_wall_time({"wall_s": 1200.0, "train_time_s": 900.0})["wall_s"] == 1200.0


def test_defeat_vs_mse_fg_fraction_and_weight_ratios_on_a_hand_made_box(tmp_path):
    """One 128 px image, one box over its top-left quarter: a quarter of every level's cells are foreground; with
    w_defeat 1, fg 2, bg 6, w_mse 1 both kinds of cell weigh 4 x MSE's (2 / (2 * 0.25), 6 / (2 * 0.75))."""
    probe = _load("defeat_vs_mse")
    ann = {"images": [{"id": 1, "width": 128, "height": 128, "file_name": "a.png"}],
           "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 64, 64], "category_id": 1}]}  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ann))
    assert probe.fg_fractions(path, 128, ["p3", "p4", "p5"]) == {"p3": 0.25, "p4": 0.25, "p5": 0.25}
    # the image is resized to the model's input size: at 64 px the same box still covers a quarter
    assert probe.fg_fractions(path, 64, ["p3"]) == {"p3": 0.25}
    r = probe.weight_ratios(0.25, w_defeat=1.0, fg_weight=2.0, bg_weight=6.0, w_mse=1.0)
    assert r["fg"] == pytest.approx(4.0) and r["bg"] == pytest.approx(4.0)
    # the bench recipes' weights at a 23.4 % foreground share (P3 of the bench data): 0.96 / 1.18
    r = probe.weight_ratios(0.234, w_defeat=3e-3, fg_weight=3.0, bg_weight=12.0, w_mse=2e-2)
    assert r["fg"] == pytest.approx(0.0045 / 0.234 / 0.02) and r["bg"] == pytest.approx(0.018 / 0.766 / 0.02)


def test_run_student_returns_the_resumed_record_that_it_writes(accuracy, tmp_path, monkeypatch):
    """A run cut off earlier (its last.pth exists) is resumed; the record returned, which the caller scores on the
    tuning split and writes again, must be the resumed one (whole-run wall time), not this invocation's seconds."""
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path / "results")
    monkeypatch.setitem(accuracy.RUNS_DIR, "root", tmp_path / "runs")
    work = tmp_path / "runs" / "v9_mse_s1"
    work.mkdir(parents=True)
    (work / "last.pth").write_bytes(b"")
    monkeypatch.setattr(accuracy, "training_command", lambda *a: ("train_distill.py", []))
    monkeypatch.setattr(accuracy, "run_tool", lambda *a, **k: 40.0)
    monkeypatch.setattr(accuracy, "recipe_digest", lambda *a: "d")
    monkeypatch.setattr(accuracy, "final_metrics", lambda w: {"AP": 0.5, "train_time_s": 900.0})
    record = accuracy.run_student("mse", "mse.yaml", 1, {}, [], "v9")
    stored = json.loads((tmp_path / "results" / "runs" / "v9_mse_s1.json").read_text())
    assert record == stored
    assert record["resumed"] is True and record["wall_s"] == 900.0
    # a fresh run (no last.pth) keeps its own wall time and no resume note
    monkeypatch.setitem(accuracy.RUNS_DIR, "root", tmp_path / "fresh")
    fresh = accuracy.run_student("mse", "mse.yaml", 2, {}, [], "v9")
    assert fresh["wall_s"] == 40.0 and "resumed" not in fresh
