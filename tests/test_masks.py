"""Masks against values worked out by hand (geometry, attention, FGFI, difference masks)."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.masks import (
    box_masks,
    channel_attention,
    difference_mask,
    feature_difference_mask,
    fgfi_mask,
    grid_anchors,
    retinanet_anchor_sizes,
    spatial_attention,
)


def _expected(h: int, w: int, cells: dict[tuple[int, int], float]) -> torch.Tensor:
    out = torch.zeros(h, w)
    for (i, j), v in cells.items():
        out[i, j] = v
    return out


def _rect(rows: range, cols: range, value: float) -> dict[tuple[int, int], float]:
    return {(i, j): value for i in rows for j in cols}


# --------------------------------------------------------------------------------------------------------------
# box_masks: 4x4 map on a 32x32 canvas -> stride 8 on both axes unless stated otherwise
# --------------------------------------------------------------------------------------------------------------


def test_box_exactly_on_cells():
    # x 8..24 -> cols floor(1)=1 .. ceil(3)-1=2; y 8..16 -> rows 1 .. ceil(2)-1=1: 2 cells, 1/2 each.
    fg, bg = box_masks([torch.tensor([[8.0, 8.0, 24.0, 16.0]])], (4, 4), (32, 32))
    assert torch.allclose(fg[0], _expected(4, 4, {(1, 1): 0.5, (1, 2): 0.5}))
    # 14 background cells, 1/14 each.
    expected_bg = torch.full((4, 4), 1 / 14)
    expected_bg[1, 1] = expected_bg[1, 2] = 0.0
    assert torch.allclose(bg[0], expected_bg)


def test_fractional_box_uses_floor_and_ceil():
    # x 3..17.5 -> floor(0.375)=0 .. ceil(2.1875)-1=2; y 5..9 -> floor(0.625)=0 .. ceil(1.125)-1=1: 3x2 = 6 cells.
    fg, _ = box_masks([torch.tensor([[3.0, 5.0, 17.5, 9.0]])], (4, 4), (32, 32))
    assert torch.allclose(fg[0], _expected(4, 4, _rect(range(0, 2), range(0, 3), 1 / 6)))


def test_degenerate_box_covers_one_cell():
    # x1 = x2 = 8: floor(1)=1, ceil(1)-1=0 -> at least one cell: col 1; same for y.
    fg, _ = box_masks([torch.tensor([[8.0, 8.0, 8.0, 8.0]])], (4, 4), (32, 32))
    assert torch.allclose(fg[0], _expected(4, 4, {(1, 1): 1.0}))


def test_box_on_border_and_box_beyond_are_clipped():
    # on the border: x 24..32 -> col 3 .. ceil(4)-1=3; y 0..8 -> row 0: one cell.
    # beyond: x 20..50 -> floor(2.5)=2 .. ceil(6.25)-1=6 clipped to 3; y 20..40 -> 2 .. ceil(5)-1=4 clipped to 3.
    boxes = [torch.tensor([[24.0, 0.0, 32.0, 8.0]]), torch.tensor([[20.0, 20.0, 50.0, 40.0]])]
    fg, _ = box_masks(boxes, (4, 4), (32, 32))
    assert torch.allclose(fg[0], _expected(4, 4, {(0, 3): 1.0}))
    assert torch.allclose(fg[1], _expected(4, 4, _rect(range(2, 4), range(2, 4), 0.25)))


def test_overlapping_boxes_take_the_max_of_inverse_areas():
    # A: 0..16 x 0..16 -> 2x2 = 4 cells (1/4). B: x 8..32 -> cols 1..3, y 8..16 -> row 1: 3 cells (1/3).
    fg, bg = box_masks([torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 16.0]])], (4, 4), (32, 32))
    cells = {(0, 0): 0.25, (0, 1): 0.25, (1, 0): 0.25, (1, 1): 1 / 3, (1, 2): 1 / 3, (1, 3): 1 / 3}
    assert torch.allclose(fg[0], _expected(4, 4, cells))
    assert torch.allclose(bg[0].sum(), torch.tensor(1.0))  # 10 background cells of 1/10
    assert torch.allclose(bg[0][bg[0] > 0], torch.full((10,), 0.1))


def test_padded_canvas_uses_a_stride_per_axis():
    # canvas 40 x 30 on a 5 x 4 map: s_y = 8, s_x = 7.5. x 7.5..22.6 -> cols 1 .. ceil(3.013)-1 = 3 (with a single
    # stride of 8 it would be ceil(2.825)-1 = 2); y 8..24 -> rows 1..2: 3 x 2 = 6 cells.
    fg, _ = box_masks([torch.tensor([[7.5, 8.0, 22.6, 24.0]])], (5, 4), (40, 30))
    assert torch.allclose(fg[0], _expected(5, 4, _rect(range(1, 3), range(1, 4), 1 / 6)))


def test_image_without_boxes_gives_zero_fg_and_uniform_bg():
    fg, bg = box_masks([torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)], (4, 4), (32, 32))
    assert torch.equal(fg[1], torch.zeros(4, 4))
    assert torch.allclose(bg[1], torch.full((4, 4), 1 / 16))
    fg, bg = box_masks([torch.zeros(0, 4)], (4, 4), (32, 32))  # a batch with no box at all
    assert torch.equal(fg, torch.zeros(1, 4, 4)) and torch.allclose(bg, torch.full((1, 4, 4), 1 / 16))


def test_all_foreground_image_has_zero_background_and_no_nan():
    fg, bg = box_masks([torch.tensor([[0.0, 0.0, 32.0, 32.0]])], (4, 4), (32, 32))
    assert torch.allclose(fg, torch.full((1, 4, 4), 1 / 16))
    assert torch.equal(bg, torch.zeros(1, 4, 4))


def test_box_masks_batched_equals_per_image():
    g = torch.Generator().manual_seed(0)
    boxes = []
    for k in (3, 0, 5):
        xy = torch.rand(k, 2, generator=g) * 50
        boxes.append(torch.cat([xy, xy + torch.rand(k, 2, generator=g) * 30 + 1], dim=1))
    fg, bg = box_masks(boxes, (7, 9), (56, 70))
    for n, b in enumerate(boxes):
        fg_n, bg_n = box_masks([b], (7, 9), (56, 70))
        assert torch.equal(fg[n], fg_n[0]) and torch.equal(bg[n], bg_n[0])


# --------------------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------------------

# (N=1, C=2, H=2, W=2): channel 0 = [[1, -2], [0, 3]], channel 1 = [[1, 0], [-2, 1]]
FEAT = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[1.0, 0.0], [-2.0, 1.0]]]])


def test_spatial_attention_by_hand():
    # mean_c |F| = [[1, 1], [1, 2]]; / T=0.5 -> [[2, 2], [2, 4]]; H*W * softmax.
    z = 3 * math.exp(2) + math.exp(4)
    expected = torch.tensor([[[4 * math.exp(2) / z, 4 * math.exp(2) / z], [4 * math.exp(2) / z, 4 * math.exp(4) / z]]])
    got = spatial_attention(FEAT, 0.5)
    assert torch.allclose(got, expected)
    assert torch.allclose(got.sum(), torch.tensor(4.0))


def test_channel_attention_by_hand():
    # mean_hw |F| = [1.5, 1.0]; / T=0.5 -> [3, 2]; C * softmax.
    z = math.exp(3) + math.exp(2)
    expected = torch.tensor([[2 * math.exp(3) / z, 2 * math.exp(2) / z]])
    got = channel_attention(FEAT, 0.5)
    assert torch.allclose(got, expected)
    assert torch.allclose(got.sum(), torch.tensor(2.0))


def test_attention_sums_on_random_features():
    x = torch.randn(3, 5, 4, 6)
    assert torch.allclose(spatial_attention(x, 0.7).sum(dim=(1, 2)), torch.full((3,), 24.0))
    assert torch.allclose(channel_attention(x, 0.7).sum(dim=1), torch.full((3,), 5.0))


# --------------------------------------------------------------------------------------------------------------
# anchors and FGFI
# --------------------------------------------------------------------------------------------------------------


def test_grid_anchors_by_hand():
    a = grid_anchors((2, 2), (16, 16), sizes=(8.0,), aspect_ratios=(1.0, 4.0))
    assert a.shape == (2, 2, 2, 4)
    assert torch.allclose(a[0, 0, 0], torch.tensor([0.0, 0.0, 8.0, 8.0]))  # centre (4, 4), 8 x 8
    assert torch.allclose(a[1, 1, 0], torch.tensor([8.0, 8.0, 16.0, 16.0]))  # centre (12, 12)
    assert torch.allclose(a[0, 1, 1], torch.tensor([10.0, -4.0, 14.0, 12.0]))  # ratio 4: h = 16, w = 4
    assert retinanet_anchor_sizes(8) == pytest.approx((32.0, 32.0 * 2 ** (1 / 3), 32.0 * 2 ** (2 / 3)))


# 2 x 2 map, one anchor per cell: IoU with the GT [0, 0, 10, 10] is 1, 1/3, 1/3, 0
# ([5, 0, 15, 10]: intersection 50, union 150).
ANCHORS = torch.tensor(
    [[[[0.0, 0.0, 10.0, 10.0]], [[5.0, 0.0, 15.0, 10.0]]], [[[0.0, 5.0, 10.0, 15.0]], [[20.0, 20.0, 30.0, 30.0]]]]
)
GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def test_fgfi_one_box_by_hand():
    # psi 0.5: threshold 0.5 * 1 -> only the perfect anchor; psi 0.3: 1/3 > 0.3 -> three cells.
    assert torch.equal(fgfi_mask(ANCHORS, [GT], psi=0.5), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    assert torch.equal(fgfi_mask(ANCHORS, [GT], psi=0.3), torch.tensor([[[1.0, 1.0], [1.0, 0.0]]]))


def test_fgfi_max_iou_over_all_levels_and_empty_image():
    # with an all-level max IoU of 0.6 given, the threshold is 0.5 * 0.6 = 0.3 -> three cells.
    mask = fgfi_mask(ANCHORS, [GT, torch.zeros(0, 4)], psi=0.5, max_iou=[torch.tensor([0.6]), torch.zeros(0)])
    assert torch.equal(mask, torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]))


def test_fgfi_union_over_boxes_and_any_over_anchors():
    # second anchor per cell: only (1, 1) has one matching the second GT box exactly.
    second = torch.zeros(2, 2, 1, 4)
    second[..., :] = torch.tensor([100.0, 100.0, 101.0, 101.0])
    second[1, 1, 0] = torch.tensor([40.0, 40.0, 50.0, 50.0])
    anchors = torch.cat([ANCHORS, second], dim=2)  # (2, 2, 2, 4)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
    assert torch.equal(fgfi_mask(anchors, [gt], psi=0.5), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))


def test_fgfi_batched_equals_per_image():
    anchors = grid_anchors((6, 6), (48, 48), retinanet_anchor_sizes(8))
    boxes = [torch.tensor([[3.0, 4.0, 30.0, 25.0], [20.0, 20.0, 46.0, 40.0]]), torch.zeros(0, 4), GT * 2]
    batched = fgfi_mask(anchors, boxes)
    for n, b in enumerate(boxes):
        assert torch.equal(batched[n], fgfi_mask(anchors, [b])[0])


# --------------------------------------------------------------------------------------------------------------
# difference masks (GID)
# --------------------------------------------------------------------------------------------------------------


def _logits(n: int = 2, ak: int = 3, hw: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.zeros(n, ak, hw, hw)
    return t, t.clone()


def test_identical_logits_give_an_empty_mask():
    t = torch.randn(2, 6, 8, 8)
    assert torch.equal(difference_mask(t, t.clone(), (64, 64)), torch.zeros(2, 8, 8))


def test_single_disagreement_peaks_there():
    t, s = _logits()
    s[0, 1, 3, 4] = 5.0
    mask = difference_mask(t, s, (64, 64))  # window 5 cells around (3, 4): rows 1..5, cols 2..6, 1/25 each
    assert torch.allclose(mask[0], _expected(8, 8, _rect(range(1, 6), range(2, 7), 1 / 25)))
    assert torch.equal(mask[1], torch.zeros(8, 8))
    assert mask[0, 3, 4] == mask.max()


def test_disagreement_at_the_corner_is_clipped():
    t, s = _logits(n=1)
    s[0, 0, 0, 0] = 5.0  # window x -16..24 -> cols 0..2 after clipping; same rows: 9 cells
    assert torch.allclose(difference_mask(t, s, (64, 64))[0], _expected(8, 8, _rect(range(3), range(3), 1 / 9)))


def test_nms_suppresses_neighbours_and_keeps_distant_regions():
    t, s = _logits(n=1)
    s[0, 0, 3, 4] = 5.0
    s[0, 0, 3, 5] = 3.0  # window shifted by one cell: IoU 20/30 > 0.3 -> suppressed
    s[0, 2, 3, 0] = 2.0  # x -16..24 vs 16..56: IoU 320/2880 < 0.3 -> kept (clipped: rows 1..5, cols 0..2)
    mask = difference_mask(t, s, (64, 64))[0]
    cells = _rect(range(1, 6), range(2, 7), 1 / 25)
    cells.update(_rect(range(1, 6), range(0, 3), 1 / 15))  # col 2 overlaps: max(1/25, 1/15)
    assert torch.allclose(mask, _expected(8, 8, cells))
    only_best = difference_mask(t, s, (64, 64), top_k=1)[0]
    assert torch.allclose(only_best, _expected(8, 8, _rect(range(1, 6), range(2, 7), 1 / 25)))


def test_difference_mask_uses_the_best_anchor_as_box():
    # A = 2 anchors, K = 1 class: channel 1 (anchor 1) disagrees at (3, 4); its box [20, 12, 52, 44]
    # covers cols 2..6 and rows 1..5 on a stride-8 map (25 cells).
    anchors = grid_anchors((8, 8), (64, 64), sizes=(16.0, 32.0), aspect_ratios=(1.0,))
    t, s = _logits(n=1, ak=2)
    s[0, 1, 3, 4] = 4.0
    mask = difference_mask(t, s, (64, 64), anchors=anchors)[0]
    assert torch.allclose(anchors[3, 4, 1], torch.tensor([20.0, 12.0, 52.0, 44.0]))
    assert torch.allclose(mask, _expected(8, 8, _rect(range(1, 6), range(2, 7), 1 / 25)))


def test_difference_mask_is_detached_and_batched_equals_per_image():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 6, 10, 12, generator=g).requires_grad_()
    s = torch.randn(3, 6, 10, 12, generator=g).requires_grad_()
    mask = difference_mask(t, s, (80, 96), top_k=4)
    assert not mask.requires_grad
    for n in range(3):
        assert torch.equal(mask[n], difference_mask(t[n : n + 1], s[n : n + 1], (80, 96), top_k=4)[0])
    assert torch.allclose(mask.sum(dim=(1, 2)), torch.full((3,), 4.0), atol=1.5)  # ~1 per region (overlaps: max)


def test_difference_mask_rejects_mismatched_heads():
    with pytest.raises(ValueError, match="same shape"):
        difference_mask(torch.zeros(1, 9, 4, 4), torch.zeros(1, 3, 4, 4), (32, 32))


def test_feature_difference_mask_by_hand():
    t = torch.zeros(1, 1, 2, 2)
    s = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]]]], requires_grad=True)  # d = [[0, 1], [4, 0]]
    half = torch.tensor([[[0.0, 0.5], [0.5, 0.0]]])
    assert torch.equal(feature_difference_mask(t, s, top_k_ratio=0.5), half)  # top 2 of 4
    assert torch.equal(feature_difference_mask(t, s, top_k_ratio=1.0), half)  # d = 0 is never selected
    assert torch.equal(feature_difference_mask(t, s, top_k_ratio=0.25), torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]))
    assert not feature_difference_mask(t, s).requires_grad
    assert torch.equal(feature_difference_mask(t, t.clone()), torch.zeros(1, 2, 2))
