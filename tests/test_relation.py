"""GID's relation term: the pinned one-image formula by hand, the batch rule, and the loss through a recipe."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.losses import FEATURE_LOSSES, LevelContext, build_feature_loss
from detkd.losses.functional import batch_relation_loss, relation_loss


def _smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _normalised(points):
    n = len(points)
    dist = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
    mean = sum(dist[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return [[d / mean for d in row] for row in dist]


def test_relation_loss_matches_a_hand_computation():
    s_pts, t_pts = [(0.0, 0.0), (3.0, 0.0), (0.0, 4.0)], [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    d_s, d_t = _normalised(s_pts), _normalised(t_pts)
    assert d_s[0][1] == pytest.approx(0.75) and d_s[1][2] == pytest.approx(1.25)  # mean off-diagonal distance 4
    expected = sum(_smooth_l1(d_s[i][j] - d_t[i][j]) for i in range(3) for j in range(3)) / 9
    s = torch.tensor(s_pts, requires_grad=True)
    loss = relation_loss(s, torch.tensor(t_pts))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    scaled = relation_loss(10 * torch.tensor(s_pts), torch.tensor(t_pts))  # scale-free: distances are normalised
    assert scaled.item() == pytest.approx(expected, rel=1e-5)


def test_images_with_fewer_than_two_instances_contribute_zero():
    one = torch.ones(1, 4, requires_grad=True)
    assert relation_loss(one, torch.zeros(1, 4)).item() == 0.0
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    both = batch_relation_loss([a, torch.zeros(0, 4), one], [b, torch.zeros(0, 4), torch.ones(1, 4)])
    assert both.item() == pytest.approx(relation_loss(a, b).item())  # averaged over the one image with >= 2
    none = batch_relation_loss([one, torch.zeros(0, 4)], [torch.ones(1, 4), torch.zeros(0, 4)])
    assert none.item() == 0.0 and none.requires_grad
    same = relation_loss(torch.ones(3, 2), torch.ones(3, 2))  # coinciding instances: zero matrices, not NaN
    assert same.item() == 0.0
    two = relation_loss(torch.randn(2, 4), torch.randn(2, 4))  # two instances: both matrices are [[0, 1], [1, 0]]
    assert two.item() == pytest.approx(0.0, abs=1e-7)


def test_relation_loss_on_a_level_pools_the_gt_boxes():
    assert "relation" in FEATURE_LOSSES
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 8, 8, requires_grad=True), torch.randn(2, 8, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 64.0, 64.0], [8.0, 40.0, 40.0, 64.0]]),
             torch.zeros((0, 4))]  # fmt: skip
    ctx = LevelContext("p3", 8, (64, 64), boxes, s, t)
    loss = build_feature_loss("relation", output_size=2)(s, t, ctx)
    from torchvision.ops import roi_align

    s_i = roi_align(s, [boxes[0]], (2, 2), 1 / 8, 2, True).flatten(1)
    t_i = roi_align(t, [boxes[0]], (2, 2), 1 / 8, 2, True).flatten(1)
    assert loss.item() == pytest.approx(relation_loss(s_i, t_i).item(), rel=1e-6)
    loss.backward()
    assert s.grad[0].abs().sum() > 0 and s.grad[1].abs().sum() == 0  # the empty image has no instance
