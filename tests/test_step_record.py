"""Record, then compute: one record per student pass, contexts per adapter, each model in its own normalisation,
the teacher run once and only for what the losses need."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkd.distiller import Distiller, LossSpec
from detkd.losses import HEAD_LOSSES, build_feature_loss
from detkd.models.build import build_detector
from detkd.models.taps import renormalize

NUM_CLASSES = 4


def detector(arch, fpn=16, backbone="resnet18", size=64, **kw):
    torch.manual_seed(0)
    return build_detector(arch, backbone, NUM_CLASSES, fpn_channels=fpn, min_size=size, max_size=size, **kw)


def batch(size=64):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=g), torch.rand(3, size, size, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [33.0, 20.0, 60.0, 44.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def pseudo(**kw):
    module = HEAD_LOSSES["pseudo_label"](**kw)
    module.set_category_map({1: 1, 2: 2, 3: 3})
    return module


def count_calls(module: nn.Module, counter: dict, name: str):
    return module.register_forward_hook(lambda m, a, o: counter.__setitem__(name, counter.get(name, 0) + 1))


def test_a_second_student_pass_does_not_overwrite_what_roi_kd_reads():
    """Pseudo labels in ``separate`` mode run the student twice; roi_kd must distil the proposals of the step's own
    (first) pass. Before the record redesign the second pass's proposals replaced them."""
    teacher = detector("faster_rcnn", fpn=32, score_thresh=0.0)
    student = detector("faster_rcnn", fpn=16)
    separate = pseudo(mode="separate", score_thr=0.0, max_dets=5)
    heads = [LossSpec("roi_kd", HEAD_LOSSES["roi_kd"](max_rois=None), 1.0), LossSpec("pseudo_label", separate, 0.5)]
    d = Distiller(teacher, student, (), heads, probe_size=64).train()
    student_calls, teacher_calls = [], []
    student.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: student_calls.append(a[1]))
    teacher.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: teacher_calls.append(a[1]))
    images, targets = batch()
    torch.manual_seed(5)
    losses = d(images, targets)
    assert "distill/pseudo_label/loss_classifier" in losses and "distill/roi_kd/cls" in losses
    assert len(student_calls) == 2  # the step's pass and the separate pseudo-label pass
    distilled = teacher_calls[-1]  # the teacher's ROI head ran on these proposals
    first, second = student_calls
    assert all(torch.equal(a, b) for a, b in zip(distilled, first))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(distilled, second))


def test_level_contexts_are_kept_per_adapter_and_share_the_box_masks():
    d = Distiller(detector("retinanet", fpn=32), detector("retinanet", fpn=16),
                  [LossSpec("mse", build_feature_loss("mse"), 1.0, "all")], probe_size=64).train()  # fmt: skip
    images, targets = batch()
    record, _ = d.record_step(images, targets)
    adapted = record.level_context("p3", d.adapter("p3"))
    other = nn.Conv2d(16, 32, kernel_size=1)
    again = record.level_context("p3", other)
    assert adapted is record.level_context("p3", d.adapter("p3"))  # cached per adapter
    assert again is not adapted and not torch.allclose(again.s_feat, adapted.s_feat)
    assert torch.allclose(again.s_feat, other(record.student.features["p3"]))
    assert again.box_masks()[0] is adapted.box_masks()[0]  # the boxes' masks are computed once per level
    plain = record.level_context("p3", None)
    assert plain.s_feat is record.student.features["p3"]


def test_each_model_sees_its_own_normalisation():
    """An SSDLite teacher (inputs in [-1, 1]) behind a RetinaNet student (ImageNet mean/std): the teacher's recorded
    features equal those of the teacher run alone on the same images."""
    teacher = detector("ssdlite", backbone="mobilenet_v3_small")
    student = detector("retinanet", fpn=16)
    d = Distiller(teacher, student, [LossSpec("pkd", build_feature_loss("pkd"), 1.0, "all")], probe_size=64).train()
    images, targets = batch()
    record, _ = d.record_step(images, targets)
    with torch.no_grad():
        own_canvas = teacher.transform(images)[0].tensors
        alone = teacher.backbone(own_canvas)
    assert not torch.allclose(record.image_list.tensors, own_canvas, atol=1e-3)  # the student's canvas differs
    shared = record.teacher.features
    assert list(shared) == ["p4", "p5", "p6", "p7", "p8", "p9"]
    for level, key in zip(shared, alone):
        assert torch.allclose(shared[level], alone[key], atol=1e-5), level


def test_renormalize_keeps_the_padding_at_zero():
    canvas = torch.zeros(1, 3, 2, 3)
    canvas[0, :, 0, :2] = 1.0  # a 1x2 image in a 2x3 canvas
    out = renormalize(canvas, [(1, 2)], ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), ((0.0, 0.0, 0.0), (1.0, 1.0, 0.5)))
    # inside: x * 0.25 + 0.5 = 0.75, then (0.75 - 0) / std_d
    assert torch.allclose(out[0, 0, 0, :2], torch.tensor([0.75, 0.75]))
    assert torch.allclose(out[0, 2, 0, :2], torch.tensor([1.5, 1.5]))
    assert out[0, :, 1].abs().sum() == 0 and out[0, :, 0, 2].abs().sum() == 0  # padding stays 0
    same = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert renormalize(canvas, [(1, 2)], same, same) is canvas


@pytest.mark.parametrize(
    "features,head,backbone_calls,head_calls",
    [
        (("pkd",), (), 1, 0),  # features only: no teacher head
        ((), (("logit_kd", {}),), 1, 1),  # logits: the head once
        (("gid",), (), 1, 1),  # the difference mask compares both heads' logits
        (("pkd",), (("pseudo_label", {"score_thr": 0.0, "max_dets": 5}),), 1, 1),  # detections' pass reused
    ],
)
def test_the_teacher_runs_once_per_step_and_only_what_is_needed(features, head, backbone_calls, head_calls):
    teacher, student = detector("retinanet", fpn=32, score_thresh=0.0), detector("retinanet", fpn=16)
    feats = [LossSpec(n, build_feature_loss(n), 1.0, "all") for n in features]
    heads = [LossSpec(n, pseudo(**kw) if n == "pseudo_label" else HEAD_LOSSES[n](**kw), 1.0) for n, kw in head]
    d = Distiller(teacher, student, feats, heads, probe_size=64).train()
    calls: dict = {}
    count_calls(teacher.backbone, calls, "backbone")
    count_calls(teacher.head, calls, "head")
    images, targets = batch()
    losses = d(images, targets)
    assert calls.get("backbone", 0) == backbone_calls and calls.get("head", 0) == head_calls
    assert any(k.startswith("distill/") for k in losses)


def test_the_teacher_is_outside_the_module_tree():
    d = Distiller(detector("retinanet", fpn=32), detector("retinanet", fpn=16),
                  [LossSpec("fgd", build_feature_loss("fgd"), 1.0, "all")], probe_size=64)  # fmt: skip
    teacher_params = {id(p) for p in d.teacher.parameters()}
    assert teacher_params and not teacher_params & {id(p) for p in d.parameters()}
    assert not any(k.startswith("teacher.") for k in d.state_dict())
    assert "teacher" not in dict(d.named_children())
    d.to(torch.float64)  # .to() still moves the teacher
    assert next(d.teacher.parameters()).dtype == torch.float64
    d.train()
    assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())


def test_select_rois_keeps_the_foreground_first_within_the_budget():
    from detkd.models.taps import select_rois

    labels = [torch.tensor([0, 3, 0, 0, 1, -1, 2]), torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64)]
    keep = select_rois(labels, 4)
    assert keep[0].tolist() == [1, 4, 6, 0]  # the three foreground proposals, then the first background one
    assert keep[1].tolist() == [0, 1] and keep[2].numel() == 0


def test_roi_kd_distils_at_most_max_rois_per_image_foreground_first():
    teacher, student = detector("faster_rcnn", fpn=32), detector("faster_rcnn", fpn=16)
    d = Distiller(teacher, student, (), [LossSpec("roi_kd", HEAD_LOSSES["roi_kd"](max_rois=16), 1.0)],
                  probe_size=64).train()  # fmt: skip
    seen = []
    teacher.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: seen.append([len(p) for p in a[1]]))
    images, targets = batch()
    torch.manual_seed(3)
    record, _ = d.record_step(images, targets)
    assert seen[-1] == [16, 16]  # of the student's sampled proposals
    sampled = [len(p) for p in record.student.proposals]
    assert min(sampled) > 16
    labels = record.roi_labels()
    kept = labels[record.student.roi_keep_flat()]
    n_fg = [int((lab > 0).sum()) for lab in labels.split(sampled)]
    for i, fg in enumerate(n_fg):
        assert int((kept[16 * i : 16 * (i + 1)] > 0).sum()) == min(fg, 16)  # every foreground ROI first
    losses = d.compute_losses(record)
    assert torch.isfinite(losses["distill/roi_kd/cls"]) and losses["distill/roi_kd/box"] >= 0
