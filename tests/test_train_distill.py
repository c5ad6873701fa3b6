"""train_distill end to end: every method with RetinaNet, FCOS and Faster R-CNN students, head losses, unlabelled
images, a heterogeneous pair, the teacher sanity check, teacher bootstrapping and resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_tool, tiny_model, tiny_recipe

from detkd.config import load_config
from detkd.engine.checkpoint import load_checkpoint
from detkd.engine.runner import train_distill
from detkd.models.build import build_detector

FEATURE_METHODS = ["mse", "fgfi", "defeat", "gid", "attention", "fgd", "pkd", "cwd"]
NUM_CLASSES = 9  # the synthetic set's 8 categories + background


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Untrained tiny teachers saved as checkpoints (the sanity check is disabled where they are used)."""
    out = tmp_path_factory.mktemp("teachers")
    paths = {}
    for arch in ("retinanet", "fcos", "faster_rcnn"):
        torch.manual_seed(0)
        model = build_detector(arch, "resnet18", NUM_CLASSES, fpn_channels=32, min_size=64, max_size=64)
        paths[arch] = str(out / f"{arch}.pth")
        torch.save({"model": model.state_dict()}, paths[arch])
    return paths


def distill_recipe(tiny_data, tmp_path, teachers, t_arch, s_arch, features=(), head=(), name="d", **extra):
    return tiny_recipe(
        tiny_data,
        tmp_path,
        name,
        teacher={**tiny_model(t_arch, fpn_channels=32), "checkpoint": teachers[t_arch]},
        student=tiny_model(s_arch, fpn_channels=16),
        distill={"features": list(features), "head": list(head), "teacher_check": {"enabled": False}},
        train={"epochs": 1, "max_iters": 2, "device": "cpu", "log_interval": 1, "warmup_iters": 1},
        eval={"interval": 1, "max_images": 4},
        **extra,
    )


def run(recipe, *opts):
    summary = train_distill(load_config(recipe, list(opts)), show_progress=False)
    assert summary["iterations"] == 2
    return summary


def logged_terms(work_dir) -> set[str]:
    records = [json.loads(line) for line in open(f"{work_dir}/metrics.jsonl")]
    terms = set()
    for r in records:
        if r["type"] == "train":
            assert all(v == v and abs(v) != float("inf") for v in r.values() if isinstance(v, float)), r
            terms |= set(r)
    return terms


@pytest.mark.parametrize("student", ["retinanet", "fcos", "faster_rcnn"])
@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_feature_method_trains_two_steps(tiny_data, tmp_path, teachers, student, method):
    recipe = distill_recipe(tiny_data, tmp_path, teachers, student, student, features=[{"type": method}])
    summary = run(recipe)
    terms = logged_terms(tmp_path / "work_d")
    level = "p2" if student == "faster_rcnn" else "p3"
    assert f"distill/{method}/{level}" in terms
    assert summary["best_epoch"] == 1 and 0.0 <= summary["best_ap"] <= 1.0  # evaluated once (-1: never evaluated)
    assert (tmp_path / "work_d" / "student_best.pth").is_file()
    ckpt = load_checkpoint(tmp_path / "work_d" / "last.pth")
    assert not any(k.startswith("teacher.") for k in ckpt["model"])


HEAD_CASES = [
    ("retinanet", {"type": "pseudo_label", "score_thr": 0.0, "mode": "merge"}, "task/classification"),
    ("fcos", {"type": "pseudo_label", "score_thr": 0.0, "mode": "separate", "weight": 0.5},
     "distill/pseudo_label/classification"),
    ("faster_rcnn", {"type": "pseudo_label", "score_thr": 0.0, "mode": "replace"}, "task/loss_classifier"),
    ("retinanet", {"type": "logit_kd", "conf_thr": 0.0, "mask": "fg"}, "distill/logit_kd/box"),
    ("fcos", {"type": "logit_kd", "conf_thr": 0.0, "mask": "difference"}, "distill/logit_kd/ctrness"),
    ("faster_rcnn", {"type": "roi_kd", "loss": "kd", "rpn_weight": 1.0}, "distill/roi_kd/rpn"),
    ("faster_rcnn", {"type": "roi_kd", "loss": "dkd"}, "distill/roi_kd/cls"),
    ("faster_rcnn", {"type": "roi_kd", "loss": "alpha"}, "distill/roi_kd/cls"),
]  # fmt: skip


@pytest.mark.parametrize("student,head,term", HEAD_CASES)
def test_head_loss_trains_two_steps(tiny_data, tmp_path, teachers, student, head, term):
    recipe = distill_recipe(tiny_data, tmp_path, teachers, student, student, head=[head])
    run(recipe)
    assert term in logged_terms(tmp_path / "work_d")


def test_head_and_feature_losses_combine(tiny_data, tmp_path, teachers):
    recipe = distill_recipe(
        tiny_data, tmp_path, teachers, "retinanet", "retinanet",
        features=[{"type": "fgd", "weight": 2.0, "levels": ["p3", "p4"]}],
        head=[{"type": "logit_kd"}, {"type": "pseudo_label", "score_thr": 0.0}],
    )  # fmt: skip
    run(recipe)
    terms = logged_terms(tmp_path / "work_d")
    assert {"distill/fgd/p3", "distill/fgd/p4", "distill/logit_kd/cls"} <= terms
    assert "distill/fgd/p5" not in terms


def test_heterogeneous_pair_faster_rcnn_teacher_to_retinanet_student(tiny_data, tmp_path, teachers):
    recipe = distill_recipe(
        tiny_data, tmp_path, teachers, "faster_rcnn", "retinanet",
        features=[{"type": "fgd"}, {"type": "gid"}], head=[{"type": "pseudo_label", "score_thr": 0.0}],
    )  # fmt: skip
    run(recipe)
    terms = logged_terms(tmp_path / "work_d")
    assert {f"distill/fgd/p{i}" for i in (3, 4, 5, 6)} <= terms and "distill/fgd/p7" not in terms


def test_logit_kd_on_heterogeneous_pair_fails_at_start(tiny_data, tmp_path, teachers):
    recipe = distill_recipe(tiny_data, tmp_path, teachers, "fcos", "retinanet", head=[{"type": "logit_kd"}])
    proc = run_tool("train_distill.py", "--cfg", str(recipe), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fcos teacher with a retinanet student" in proc.stderr and "pseudo_label" in proc.stderr


def test_unlabeled_image_folder(tiny_data, tmp_path, teachers):
    folder = tiny_data["val"]["img_dir"]  # any images without labels
    recipe = distill_recipe(
        tiny_data, tmp_path, teachers, "retinanet", "retinanet",
        head=[{"type": "pseudo_label", "score_thr": 0.0}],
    )  # fmt: skip
    cfg = load_config(recipe, [f"data.unlabeled={{img_dir: {folder}, ratio: 1.0}}", "train.max_iters=null"])
    summary = train_distill(cfg, show_progress=False)
    assert summary["iterations"] == 6 + 2  # 6 labelled batches of 4 + round(1.0 * 6) capped at 8 // 4 = 2
    no_pseudo = distill_recipe(
        tiny_data, tmp_path, teachers, "retinanet", "retinanet", features=[{"type": "mse"}], name="no_pseudo"
    )
    with pytest.raises(ValueError, match="data.unlabeled but no pseudo_label"):
        train_distill(load_config(no_pseudo, [f"data.unlabeled={{img_dir: {folder}}}"]), show_progress=False)


def test_teacher_sanity_check_stops_an_untrained_teacher(tiny_data, tmp_path, teachers):
    recipe = distill_recipe(tiny_data, tmp_path, teachers, "retinanet", "retinanet", features=[{"type": "mse"}])
    with pytest.raises(RuntimeError, match=r"the teacher scores AP 0\.0000 .* probably did not load"):
        train_distill(load_config(recipe, ["distill.teacher_check.enabled=true"]), show_progress=False)


def test_cli_reports_teacher_and_student_ap_and_exports_plain_student(tiny_data, tmp_path, teachers):
    recipe = distill_recipe(tiny_data, tmp_path, teachers, "retinanet", "retinanet", features=[{"type": "pkd"}])
    proc = run_tool("train_distill.py", "--cfg", str(recipe), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("model"))
    assert table[header].split()[:3] == ["model", "AP", "AP50"]
    assert table[header + 2].startswith("teacher ") and table[header + 3].startswith("student (distilled)")
    assert "exported student:" in proc.stdout
    assert "diagnosis:" in proc.stdout  # the findings of tools/diagnose.py, printed at the end of the run
    deploy = proc.stdout.split("deploy the student:", 1)[1].splitlines()[1:3]
    assert "tools/predict.py" in deploy[0] and "student_best.pth" in deploy[0] and "tools/export.py" in deploy[1]
    exported = load_checkpoint(tmp_path / "work_d" / "student_best.pth")
    plain = build_detector("retinanet", "resnet18", NUM_CLASSES, fpn_channels=16, min_size=64, max_size=64)
    plain.load_state_dict(exported["model"])  # strict: a plain torchvision RetinaNet, no detkd modules
    proc = run_tool("eval.py", "--cfg", str(recipe), "--ckpt", str(tmp_path / "work_d" / "student_best.pth"),
                    "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_distill_resume_reproduces_uninterrupted_run(tiny_data, tmp_path, teachers):
    def recipe(name):
        return distill_recipe(
            tiny_data, tmp_path, teachers, "retinanet", "retinanet", features=[{"type": "fgd"}], name=name
        )

    opts = ["train.epochs=2", "train.max_iters=null", "eval.interval=0"]
    full, cut = load_config(recipe("full"), opts), load_config(recipe("cut"), opts)
    train_distill(full, show_progress=False)
    train_distill(cut, show_progress=False, stop_after_epochs=1)
    train_distill(cut, resume=True, show_progress=False)
    a = load_checkpoint(tmp_path / "work_full" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "work_cut" / "last.pth")["model"]
    assert a.keys() == b.keys() and any(k.startswith("feature_loss_modules.0.") for k in a)  # FGD GcBlocks saved
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_teacher_is_trained_when_missing(tiny_data, tmp_path):
    teacher_recipe = tiny_recipe(tiny_data, tmp_path, "teacher", model=tiny_model("retinanet", fpn_channels=32))
    ckpt = tmp_path / "teacher_run" / "best.pth"
    recipe = tiny_recipe(
        tiny_data, tmp_path, "boot",
        teacher={**tiny_model("retinanet", fpn_channels=32), "checkpoint": str(ckpt),
                 "train_if_missing": str(teacher_recipe), "train_opts": ["train.max_iters=2", "train.epochs=1"]},
        student=tiny_model("retinanet", fpn_channels=16),
        distill={"features": [{"type": "mse"}], "teacher_check": {"enabled": False}},
        train={"epochs": 1, "max_iters": 2, "device": "cpu"},
    )  # fmt: skip
    summary = train_distill(load_config(recipe), show_progress=False)
    assert ckpt.is_file() and summary["iterations"] == 2
    mtime = ckpt.stat().st_mtime
    train_distill(load_config(recipe), show_progress=False, overwrite=True)  # present now: not trained again
    assert ckpt.stat().st_mtime == mtime


def test_mask_images_reach_tensorboard(tiny_data, tmp_path, teachers):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = distill_recipe(tiny_data, tmp_path, teachers, "retinanet", "retinanet", features=[{"type": "fgd"}])
    run(recipe, "log.tensorboard=true", "log.mask_images_every=1")
    events = EventAccumulator(str(tmp_path / "work_d" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert any(tag.startswith("masks/") for tag in tags), tags
    assert len(events.Images(tags[0])) == 2  # one picture per iteration, every=1, two iterations
    assert "train/distill/fgd/p3" in events.Tags()["scalars"]


def test_quickstart_recipe_bootstraps_data_and_teacher(tmp_path):
    """configs/quickstart.yaml shrunk to seconds with --opts: generates the data, trains the teacher, distils."""
    from conftest import REPO

    data = tmp_path / "qs_data"
    data_opts = [
        f"data.synthetic={{out: {data}, num_train: 8, num_val: 4, size: 64, seed: 0}}",
        f"data.train={{ann_file: {data}/annotations/train.json, img_dir: {data}/images/train}}",
        f"data.val={{ann_file: {data}/annotations/val.json, img_dir: {data}/images/val}}",
        "data.batch_size=4",
        "data.num_workers=0",
        "log.tensorboard=false",
        "train.epochs=1",
        "train.max_iters=2",
        "train.device=cpu",
    ]
    teacher_opts = [*data_opts, "model.min_size=64", "model.max_size=64"]
    ckpt = tmp_path / "qs_teacher" / "best.pth"
    opts = [
        *data_opts,
        f"teacher.checkpoint={ckpt}",
        "teacher.train_opts=[" + ", ".join(json.dumps(o) for o in teacher_opts) + "]",
        "teacher.min_size=64",
        "teacher.max_size=64",
        "student.min_size=64",
        "student.max_size=64",
        "distill.teacher_check.enabled=false",  # a 2-step teacher scores AP 0
        f"work_dir={tmp_path / 'qs_run'}",
    ]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", opts)
    assert cfg.teacher.train_if_missing == "configs/quickstart_teacher.yaml"
    summary = train_distill(cfg, show_progress=False)
    assert (data / "annotations" / "train.json").is_file()  # the synthetic set was generated
    assert ckpt.is_file() and summary["teacher_train_s"] is not None  # and the teacher trained first
    assert summary["iterations"] == 2 and (tmp_path / "qs_run" / "student_best.pth").is_file()
