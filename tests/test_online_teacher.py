"""Teachers that learn: an online teacher trains on the ground truth (its own loss, its lr_mult, BatchNorm in train
mode, saved and resumed); distillation terms reach it only in deep mutual learning."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_recipe, two_image_batch

from detkd.config import config_from_dict, load_config
from detkd.distiller import Distiller, LossSpec, TeacherSpec
from detkd.engine.checkpoint import load_checkpoint
from detkd.engine.runner import train_distill
from detkd.engine.trainer import build_optimizer
from detkd.losses import HEAD_LOSSES, build_feature_loss
from detkd.models.build import build_detector

NUM_CLASSES = 4


def detector(arch: str, fpn: int, seed: int):
    torch.manual_seed(seed)
    return build_detector(arch, "resnet18", NUM_CLASSES, fpn_channels=fpn, min_size=64, max_size=64)


def make(mutual: bool) -> Distiller:
    """An online RetinaNet teacher (FPN 32) beside a frozen FCOS one; mse + cross_kd (the online teacher's head runs
    on the student's features) against the online one."""
    teachers = [
        TeacherSpec("online", detector("retinanet", 32, 0), mode="online", lr_mult=0.5),
        TeacherSpec("frozen", detector("fcos", 24, 1)),
    ]
    feats = [LossSpec("mse", build_feature_loss("mse"), 1.0, ("p3", "p4"))]
    heads = [LossSpec("cross_kd", HEAD_LOSSES["cross_kd"](), 1.0, teachers=("online",))]
    return Distiller(teachers, detector("retinanet", 16, 2), feats, heads, probe_size=64, mutual=mutual).train()


def _grads(model: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mutual", [False, True])
def test_distillation_reaches_the_online_teacher_only_in_mutual_learning(mutual):
    d = make(mutual)
    online = d.slots[0].model
    assert online.training and d.slots[1].model.training is False
    assert any(m.training for m in online.modules() if isinstance(m, torch.nn.BatchNorm2d))  # BN in train mode
    losses = d(*two_image_batch())
    assert {"teacher_task/online/classification", "teacher_task/online/bbox_regression"} <= set(losses)
    assert {"distill/mse/online/p3", "distill/mse/frozen/p3", "distill/cross_kd/online/cls"} <= set(losses)
    distill = sum(v for k, v in losses.items() if k.startswith("distill/"))
    distill.backward(retain_graph=True)
    assert _grads(d.student) > 0
    assert _grads(online) == 0.0  # the student's terms never reach the teacher (cross_kd: its head is fixed)
    reverse = {k for k in losses if k.startswith("mutual/")}
    assert reverse == ({"mutual/mse/online/p3", "mutual/mse/online/p4"} if mutual else set())
    if mutual:  # deep mutual learning: the reverse terms train the teacher's features, not the student
        d.zero_grad(set_to_none=True)
        sum(losses[k] for k in reverse).backward(retain_graph=True)
        assert _grads(online.backbone) > 0 and _grads(online.head) == 0.0
        assert _grads(d.student) == 0.0 and _grads(d.adapters) == 0.0
    assert all(p.grad is None for p in d.slots[1].model.parameters())  # the frozen one never
    for p in online.parameters():
        p.grad = None
    sum(v for k, v in losses.items() if k.startswith("teacher_task/")).backward()
    assert _grads(online.backbone) > 0 and _grads(online.head) > 0  # its own detection loss always trains it


def test_the_online_teacher_learns_and_the_frozen_one_does_not():
    d = make(mutual=False)
    split = {"ann_file": "x", "img_dir": "y"}
    cfg = config_from_dict({"data": {"train": split, "val": split}, "train": {"optimizer": {"lr": 0.01}}})
    optimizer = build_optimizer(cfg, d)
    groups = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    online, frozen = d.slots[0].model, d.slots[1].model
    assert {groups[id(p)] for p in online.parameters()} == {0.005}  # lr_mult 0.5
    assert {groups[id(p)] for p in d.student.parameters()} == {0.01} and optimizer.param_groups[0]["lr"] == 0.01
    assert not any(id(p) in groups for p in frozen.parameters())
    before = {s.name: {k: v.clone() for k, v in s.model.state_dict().items()} for s in d.slots}
    for _ in range(2):
        losses = d(*two_image_batch())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    w = "head.classification_head.cls_logits.weight"
    assert not torch.equal(online.state_dict()[w], before["online"][w])
    assert not torch.equal(online.state_dict()["backbone.body.bn1.running_mean"],
                           before["online"]["backbone.body.bn1.running_mean"])  # fmt: skip
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before["frozen"][k]), k
    state = d.trainable_state_dict()
    assert any(k.startswith("online_teachers.online.") for k in state)
    assert not any(k.startswith("online_teachers.frozen.") for k in state)


def _recipe(tiny_data, tmp_path, name, **distill):
    return tiny_recipe(
        tiny_data,
        tmp_path,
        name,
        teacher={**tiny_model(fpn_channels=32), "mode": "online", "lr_mult": 2.0},  # from scratch, no checkpoint
        student=tiny_model(fpn_channels=16),
        distill={"features": [{"type": "pkd"}], **distill},
        train={"epochs": 2, "device": "cpu", "log_interval": 1, "warmup_iters": 1},
        eval={"interval": 0, "max_images": 2},
    )


def test_an_online_teacher_is_saved_and_a_run_resumes_bit_exactly(tiny_data, tmp_path):
    full = load_config(_recipe(tiny_data, tmp_path, "online_full", mutual=True))
    cut = load_config(_recipe(tiny_data, tmp_path, "online_cut", mutual=True))
    summary = train_distill(full, show_progress=False)
    train_distill(cut, show_progress=False, stop_after_epochs=1)
    mid = load_checkpoint(tmp_path / "work_online_cut" / "last.pth")["model"]
    train_distill(cut, resume=True, show_progress=False)
    a = load_checkpoint(tmp_path / "work_online_full" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "work_online_cut" / "last.pth")["model"]
    keys = [k for k in a if k.startswith("online_teachers.teacher.")]
    assert keys and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    moved = [k for k in keys if a[k].is_floating_point() and not torch.equal(a[k], mid[k])]
    assert moved  # the teacher went on learning after the resume
    records = [json.loads(line) for line in (tmp_path / "work_online_full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    assert {"teacher_task/classification", "teacher_task/bbox_regression", "distill/pkd/p3"} <= set(train[-1])
    assert summary["teacher_metrics"] == {}  # a teacher from scratch has no sanity check
