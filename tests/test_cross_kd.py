"""CrossKD: the functional against by-hand numbers, and the loss through a real step (gradients, zero-box image)."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.distiller import Distiller, LossSpec
from detkd.losses import HEAD_LOSSES
from detkd.losses.functional import cross_kd_loss, quality_focal_kd_loss
from detkd.models.build import build_detector


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _kl_bin(a: float, b: float) -> float:
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def test_cross_kd_loss_matches_a_hand_computation():
    x_cls = torch.tensor([[0.0, 1.0], [2.0, -1.0]], requires_grad=True)
    t_cls = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])
    x_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]], requires_grad=True)
    t_boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [1.0, 1.0, 5.0, 5.0]])
    confident = torch.tensor([True, False])
    x_ctr, t_ctr = torch.tensor([0.5, 3.0], requires_grad=True), torch.tensor([0.0, 1.0])
    out = cross_kd_loss(x_cls, t_cls, x_boxes, t_boxes, confident, temperature=2.0, cross_ctr=x_ctr, t_ctr=t_ctr)
    xs, ts = [[0.0, 1.0], [2.0, -1.0]], [[1.0, 0.0], [-1.0, 0.5]]
    cls = sum(4 * sum(_kl_bin(_sig(t / 2), _sig(x / 2)) for x, t in zip(xr, tr)) for xr, tr in zip(xs, ts)) / 2
    assert out["cls"].item() == pytest.approx(cls, rel=1e-5)
    # box 0: IoU 100 / 200, enclosing box = union -> GIoU 0.5, loss 0.5; box 1 is not confident
    assert out["box"].item() == pytest.approx(0.5, rel=1e-5)
    q = _sig(0.0)
    bce = -(q * math.log(_sig(0.5)) + (1 - q) * math.log(1 - _sig(0.5)))
    assert out["ctrness"].item() == pytest.approx(bce, rel=1e-5)
    sum(out.values()).backward()
    assert x_boxes.grad[1].abs().sum() == 0 and x_boxes.grad[0].abs().sum() > 0

    none = cross_kd_loss(x_cls, t_cls, x_boxes, t_boxes, torch.tensor([False, False]))
    assert none["box"].item() == 0.0 and none["box"].requires_grad and "ctrness" not in none


def test_quality_focal_kd_matches_a_hand_computation():
    s, t = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, -1.0]])
    expected = 0.0
    for x, y in ((0.0, 1.0), (2.0, -1.0)):
        q = _sig(y)
        bce = -(q * math.log(_sig(x)) + (1 - q) * math.log(1 - _sig(x)))
        expected += bce * abs(_sig(x) - q) ** 2
    assert quality_focal_kd_loss(s, t, beta=2.0).item() == pytest.approx(expected, rel=1e-5)
    assert quality_focal_kd_loss(s[:0], t[:0]).item() == 0.0


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_cross_kd_trains_the_student_and_adapters_never_the_teacher(arch):
    torch.manual_seed(0)
    teacher = build_detector(arch, "resnet18", 4, fpn_channels=32, min_size=64, max_size=64)
    student = build_detector(arch, "resnet18", 4, fpn_channels=16, min_size=64, max_size=64)
    loss = HEAD_LOSSES["cross_kd"](conf_thr=0.0)  # a random teacher is never confident: every box is distilled
    d = Distiller(teacher, student, (), [LossSpec("cross_kd", loss, 1.0)], probe_size=64).train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # zero-box image
    ]
    losses = d(images, targets)
    terms = {k: v for k, v in losses.items() if k.startswith("distill/cross_kd/")}
    expected = {"cls", "box"} | ({"ctrness"} if arch == "fcos" else set())
    assert {k.rsplit("/", 1)[1] for k in terms} == expected
    assert all(torch.isfinite(v) for v in terms.values()) and terms["distill/cross_kd/box"] > 0
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert d.cross_adapters["p3"].weight.grad.abs().sum() > 0  # 16 -> 32 channels
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.head.parameters())  # GT only trains it


def test_cross_kd_rejects_pairs_whose_heads_do_not_line_up():
    torch.manual_seed(0)
    teacher = build_detector("fcos", "resnet18", 4, fpn_channels=32, min_size=64, max_size=64)
    student = build_detector("retinanet", "resnet18", 4, fpn_channels=16, min_size=64, max_size=64)
    with pytest.raises(ValueError, match=r"cross_kd .* fcos teacher with a retinanet student"):
        Distiller(teacher, student, (), [LossSpec("cross_kd", HEAD_LOSSES["cross_kd"](), 1.0)], probe_size=64)
