"""The Distiller: frozen teacher, one padded batch for both, stride-matched levels, adapters, export, ROI alignment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkd.config import config_from_dict
from detkd.distiller import (
    Distiller,
    LevelMismatchError,
    LossSpec,
    build_distiller_from_cfg,
    inherit_neck_and_head,
    match_levels,
    resolve_levels,
)
from detkd.engine.trainer import build_optimizer
from detkd.losses import HEAD_LOSSES, build_feature_loss
from detkd.models.build import build_detector

NUM_CLASSES = 4


def detector(arch: str, fpn: int, backbone: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    return build_detector(arch, backbone, NUM_CLASSES, fpn_channels=fpn, min_size=64, max_size=64)


def batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [33.0, 20.0, 60.0, 44.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # an image without boxes
    ]
    return images, targets


def make(t_arch="retinanet", s_arch="retinanet", t_fpn=32, s_fpn=16, losses=("fgd",), head=()):
    feats = [LossSpec(name, build_feature_loss(name), 1.0, "all") for name in losses]
    heads = [LossSpec(name, HEAD_LOSSES[name](**kw), 1.0) for name, kw in head]
    return Distiller(detector(t_arch, t_fpn), detector(s_arch, s_fpn), feats, heads, probe_size=64)


def test_frozen_teacher_contract():
    d = make(losses=("fgd", "mse"))
    d.train()
    assert not d.teacher.training and d.student.training
    assert all(not p.requires_grad for p in d.teacher.parameters())
    images, targets = batch()
    losses = d(images, targets)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.backbone.parameters())
    assert all(p.grad is not None for p in d.adapters.parameters())  # 16 -> 32 channels: 1x1 convs, trained
    fgd_blocks = list(d.feature_loss_modules[0].parameters())
    assert fgd_blocks and all(p.grad is not None for p in fgd_blocks)  # FGD's GcBlocks train with the student
    optimizer = build_optimizer(config_from_dict(_cfg_dict()), d)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in d.teacher.parameters()}
    assert {id(p) for p in d.adapters.parameters()} <= in_optimizer
    d.train()  # re-asserted on every train() call
    assert not d.teacher.training


def test_teacher_sees_the_students_padded_batch():
    d = make()
    seen = {}
    d.teacher.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("t", args[0].clone()))
    d.student.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("s", args[0].clone()))
    d.train()
    d(*batch())
    assert torch.equal(seen["t"], seen["s"])
    assert seen["s"].shape == (2, 3, 64, 64)  # 64x64 and 48x64 images padded to one canvas


def test_loss_names_levels_and_adapters():
    d = make(losses=("pkd", "cwd"), t_fpn=16, s_fpn=16)
    assert d.levels == ["p3", "p4", "p5", "p6", "p7"]
    assert all(isinstance(a, nn.Identity) for a in d.adapters.values())  # equal widths: no adapter
    d.train()
    losses = d(*batch())
    expected = {f"distill/{m}/p{i}" for m in ("pkd", "cwd") for i in range(3, 8)}
    assert expected <= set(losses) and {"task/classification", "task/bbox_regression"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_heterogeneous_pair_matches_levels_by_stride():
    d = make("faster_rcnn", "retinanet", losses=("fgd",))
    assert d.t_strides["p2"] == 4 and "p2" not in d.s_strides
    assert d.levels == ["p3", "p4", "p5", "p6"]  # Faster R-CNN P2-P6 and RetinaNet P3-P7 share strides 8..64
    d.train()
    losses = d(*batch())
    assert {f"distill/fgd/p{i}" for i in range(3, 7)} == {k for k in losses if k.startswith("distill/")}


def test_unmatched_levels_fail_naming_both_lists():
    with pytest.raises(LevelMismatchError, match=r"teacher levels \[p2 \(stride 4\)\].*student levels \[p3"):
        match_levels({"p2": 4}, {"p3": 8, "p4": 16})
    with pytest.raises(LevelMismatchError, match=r"asks for levels \['p2'\].*shared levels: \['p3', 'p4'\]"):
        resolve_levels(["p2"], ["p3", "p4"], "fgd")
    assert resolve_levels("all", ["p3", "p4"], "fgd") == ("p3", "p4")
    assert resolve_levels(["p4"], ["p3", "p4"], "fgd") == ("p4",)


def test_checkpoint_holds_student_and_adapters_and_export_is_plain_torchvision():
    d = make(losses=("fgd",))
    state = d.trainable_state_dict()
    assert not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("adapters.") for k in state) and any(k.startswith("student.") for k in state)
    plain = d.export_student()
    fresh = detector("retinanet", 16)
    fresh.load_state_dict(plain)  # strict: no detkd module in the exported student
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, d.student.state_dict()[k])
    other = make(losses=("fgd",))
    other.load_trainable_state_dict(state)
    assert torch.equal(other.adapters["p3"].weight, d.adapters["p3"].weight)


def test_inherit_teacher_copies_neck_and_head_where_shapes_match():
    teacher, student = detector("retinanet", 16, "resnet50"), detector("retinanet", 16)
    copied = inherit_neck_and_head(student, teacher)
    assert any(k.startswith("head.") for k in copied)
    assert not any(k.startswith("backbone.body.") for k in copied)
    # the FPN's inner (lateral) convs see different backbone widths (R50: 512.. vs R18: 128..): not copied
    assert "backbone.fpn.inner_blocks.0.0.weight" not in copied
    assert "backbone.fpn.layer_blocks.0.0.weight" in copied
    for k in copied:
        assert torch.equal(student.state_dict()[k], teacher.state_dict()[k])


def test_logit_kd_on_unmatched_heads_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fcos teacher with a retinanet student.*pseudo_label"):
        make("fcos", "retinanet", losses=(), head=(("logit_kd", {}),))
    with pytest.raises(ValueError, match=r"roi_kd needs a Faster R-CNN \(two-stage\) teacher and student"):
        make("retinanet", "retinanet", losses=(), head=(("roi_kd", {}),))


def test_roi_kd_teacher_scores_exactly_the_students_proposals():
    d = make("faster_rcnn", "faster_rcnn", losses=(), head=(("roi_kd", {"loss": "dkd", "max_rois": None}),))
    student_props, teacher_props = [], []
    d.student.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: student_props.append(a[1]))
    d.teacher.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: teacher_props.append(a[1]))
    d.train()
    losses = d(*batch())
    assert len(student_props) == len(teacher_props) == 1
    for s, t in zip(student_props[0], teacher_props[0]):
        assert torch.equal(s, t)
    assert student_props[0][0].shape[0] == 512  # torchvision samples 512 ROIs per image in training
    assert {"distill/roi_kd/cls", "distill/roi_kd/box"} <= set(losses)
    assert torch.isfinite(losses["distill/roi_kd/cls"]) and losses["distill/roi_kd/cls"] > 0


def test_dense_logit_kd_is_zero_when_student_equals_teacher():
    # frozen BatchNorm: train and eval mode compute the same function, so the student is an exact copy
    t = build_detector(
        "retinanet", "resnet18", NUM_CLASSES, fpn_channels=16, min_size=64, max_size=64, norm="frozen_bn"
    )
    s = build_detector(
        "retinanet", "resnet18", NUM_CLASSES, fpn_channels=16, min_size=64, max_size=64, norm="frozen_bn"
    )
    s.load_state_dict(t.state_dict())
    d = Distiller(t, s, [], [LossSpec("logit_kd", HEAD_LOSSES["logit_kd"](conf_thr=0.0), 1.0)], probe_size=64)
    d.train()
    images, targets = batch()
    losses = d(images, targets)
    assert float(losses["distill/logit_kd/cls"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["distill/logit_kd/box"].detach()) == pytest.approx(0.0, abs=1e-5)


def test_logit_kd_cls_weight_scales_the_cls_term_and_zero_drops_it():
    def losses_with(**kw):
        d = make("fcos", "fcos", losses=(), head=(("logit_kd", {"conf_thr": 0.0, **kw}),))
        d.train()
        torch.manual_seed(3)
        return d(*batch())

    base, half, none = losses_with(), losses_with(cls_weight=0.5), losses_with(cls_weight=0.0)
    cls = float(base["distill/logit_kd/cls"].detach())
    assert cls > 0
    assert float(half["distill/logit_kd/cls"].detach()) == pytest.approx(0.5 * cls, rel=1e-5)
    assert "distill/logit_kd/cls" not in none
    assert float(none["distill/logit_kd/box"].detach()) == pytest.approx(float(base["distill/logit_kd/box"].detach()))
    with pytest.raises(ValueError, match="not all 0"):
        HEAD_LOSSES["logit_kd"](cls_weight=0.0, box_weight=0.0, ctrness_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        HEAD_LOSSES["logit_kd"](cls_weight=-1.0)


def test_the_distiller_logs_what_merged_pseudo_labels_add():
    d = make(losses=(), head=(("pseudo_label", {"score_thr": 0.0}),))
    d.train()
    d(*batch())
    rate = d.log_scalars["pseudo_label/added_per_image"]
    assert rate == d.pseudo_labeler.added_per_image and rate >= 0
    assert d.pseudo_labeler.labelled_images == 2


def _cfg_dict(**extra) -> dict:
    return {
        "data": {"train": {"ann_file": "x", "img_dir": "y"}, "val": {"ann_file": "x", "img_dir": "y"}},
        **extra,
    }


def test_build_from_cfg_student_init_policies(tmp_path):
    teacher = detector("retinanet", 16)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, ckpt)
    model = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64}
    distill = {"features": [{"type": "mse"}]}
    cfg = config_from_dict(_cfg_dict(teacher={**model, "checkpoint": str(ckpt)}, student={**model}, distill=distill))
    d = build_distiller_from_cfg(cfg, NUM_CLASSES)
    assert torch.equal(d.teacher.state_dict()["head.classification_head.cls_logits.weight"],
                       teacher.state_dict()["head.classification_head.cls_logits.weight"])  # fmt: skip
    inherit = config_from_dict(
        _cfg_dict(teacher={**model, "checkpoint": str(ckpt)}, student={**model, "init": "inherit_teacher"})
    )
    d2 = build_distiller_from_cfg(inherit, NUM_CLASSES)
    key = "head.classification_head.conv.0.0.weight"
    assert torch.equal(d2.student.state_dict()[key], teacher.state_dict()[key])
    no_teacher = config_from_dict(_cfg_dict(teacher={**model}, student={**model}))
    with pytest.raises(ValueError, match="teacher.checkpoint is not set"):
        build_distiller_from_cfg(no_teacher, NUM_CLASSES)
    bad_init = config_from_dict(
        _cfg_dict(teacher={**model, "checkpoint": str(ckpt)}, student={**model, "init": "checkpoint"})
    )
    with pytest.raises(ValueError, match="student.checkpoint is not set"):
        build_distiller_from_cfg(bad_init, NUM_CLASSES)
