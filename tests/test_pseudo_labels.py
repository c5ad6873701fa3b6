"""Tests of detkd.pseudo_labels on a hand-made teacher output.

Teacher detections (torchvision eval format), with the facts each test relies on:

    idx  box                score  label
    0    [0, 0, 10, 10]     0.9    1
    1    [1, 0, 11, 10]     0.8    1   IoU with 0 = 90 / 110 = 0.818, same class  -> removed by NMS(0.5)
    2    [1, 0, 11, 10]     0.7    2   same overlap with 0 but another class      -> survives NMS
    3    [50, 50, 60, 60]   0.4    1   below the global 0.5
    4    [20, 20, 30, 30]   0.6    3
    5    [70, 70, 80, 80]   0.5    2   exactly at the threshold (kept: score >= thr)
"""

from __future__ import annotations

import pytest
import torch

from detkd.pseudo_labels import PSEUDO_LABEL_MODES, filter_detections, make_pseudo_targets, merge_with_gt

BOXES = [[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60], [20, 20, 30, 30], [70, 70, 80, 80]]
SCORES = [0.9, 0.8, 0.7, 0.4, 0.6, 0.5]
LABELS = [1, 1, 2, 1, 3, 2]


def _teacher(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    boxes = torch.tensor(BOXES, dtype=torch.float32, requires_grad=requires_grad)
    scores = torch.tensor(SCORES, requires_grad=requires_grad)
    return {"boxes": boxes * 1.0, "scores": scores * 1.0, "labels": torch.tensor(LABELS)}


def _kept(result: dict[str, torch.Tensor]) -> list[float]:
    return [round(v, 4) for v in result["scores"].tolist()]


def test_score_threshold_without_nms():
    (out,) = filter_detections([_teacher()], score_thr=0.5, nms_iou=None)
    assert _kept(out) == [0.9, 0.8, 0.7, 0.6, 0.5]  # idx 3 (0.4) dropped, 0.5 kept (inclusive), sorted
    assert out["labels"].tolist() == [1, 1, 2, 3, 2]
    assert torch.equal(out["boxes"][1], torch.tensor([1.0, 0, 11, 10]))


def test_per_class_threshold_overrides_global():
    """Class 3 needs 0.65 (drops idx 4 at 0.6); class 1 only 0.3 (keeps idx 3 at 0.4)."""
    (out,) = filter_detections([_teacher()], score_thr=0.5, class_score_thr={3: 0.65, 1: 0.3}, nms_iou=None)
    assert _kept(out) == [0.9, 0.8, 0.7, 0.5, 0.4]
    assert out["labels"].tolist() == [1, 1, 2, 2, 1]
    # a class id above every detected label is fine
    (out,) = filter_detections([_teacher()], score_thr=0.5, class_score_thr={9: 0.99}, nms_iou=None)
    assert _kept(out) == [0.9, 0.8, 0.7, 0.6, 0.5]


def test_classwise_nms():
    """idx 1 (same class as 0, IoU 0.818) is suppressed; idx 2 (other class, same overlap) is kept."""
    (out,) = filter_detections([_teacher()], score_thr=0.5, nms_iou=0.5)
    assert _kept(out) == [0.9, 0.7, 0.6, 0.5]
    assert out["labels"].tolist() == [1, 2, 3, 2]
    # a looser NMS (IoU 0.9 > 0.818) suppresses nothing
    (loose,) = filter_detections([_teacher()], score_thr=0.5, nms_iou=0.9)
    assert _kept(loose) == [0.9, 0.8, 0.7, 0.6, 0.5]


def test_max_dets_keeps_top_scores():
    (out,) = filter_detections([_teacher()], score_thr=0.0, nms_iou=0.5, max_dets=2)
    assert _kept(out) == [0.9, 0.7]
    (none,) = filter_detections([_teacher()], max_dets=0)
    assert none["boxes"].shape == (0, 4)


def test_filter_empty_detections_and_batch():
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    outs = filter_detections([empty, _teacher()], class_score_thr={1: 0.3})
    assert outs[0]["boxes"].shape == (0, 4) and outs[0]["labels"].shape == (0,) and outs[0]["scores"].shape == (0,)
    assert outs[0]["labels"].dtype == torch.int64
    assert _kept(outs[1]) == [0.9, 0.7, 0.6, 0.5, 0.4]  # idx 3 passes class 1's 0.3 and overlaps nothing


def test_filter_is_detached():
    (out,) = filter_detections([_teacher(requires_grad=True)])
    assert not out["boxes"].requires_grad and not out["scores"].requires_grad


def test_filter_missing_key():
    with pytest.raises(KeyError, match="scores"):
        filter_detections([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])


# ------------------------------------------------------------------------------------------------------- merge_with_gt
def _gt() -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
        "labels": torch.tensor([4]),
        "image_id": torch.tensor(7),
        "area": torch.tensor([100.0]),
        "iscrowd": torch.tensor([0]),
    }


def test_merge_iou_rule():
    """Against GT [0, 0, 10, 10] (area 100): [0, 0, 10, 6] has IoU 0.6 -> dropped; [0, 0, 10, 3] IoU 0.3 -> kept;
    [0, 0, 10, 5] IoU exactly 0.5 -> dropped (>= thr); a far box is kept. Class does not matter."""
    pseudo = {
        "boxes": torch.tensor([[0.0, 0, 10, 6], [0, 0, 10, 3], [0, 0, 10, 5], [40, 40, 50, 60]]),
        "labels": torch.tensor([4, 1, 2, 3]),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
    }
    out = merge_with_gt(_gt(), pseudo, iou_thr=0.5)
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 3], [40, 40, 50, 60]]
    assert out["labels"].tolist() == [4, 1, 3]
    assert out["image_id"].item() == 7
    assert out["area"].tolist() == [100.0, 30.0, 200.0]  # GT area kept, box area for the pseudo boxes
    assert out["iscrowd"].tolist() == [0, 0, 0]
    assert "scores" not in out
    # a lower threshold also drops the IoU-0.3 box
    assert merge_with_gt(_gt(), pseudo, iou_thr=0.25)["labels"].tolist() == [4, 3]


def test_merge_empty_gt_and_empty_pseudo():
    empty_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    pseudo = {"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([2])}
    out = merge_with_gt(empty_gt, pseudo)
    assert out["boxes"].tolist() == [[1, 1, 5, 5]] and out["labels"].tolist() == [2]
    empty_pseudo = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = merge_with_gt(_gt(), empty_pseudo)
    assert out["boxes"].tolist() == [[0, 0, 10, 10]] and out["labels"].tolist() == [4]
    out = merge_with_gt(empty_gt, empty_pseudo)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


# ------------------------------------------------------------------------------------------------ make_pseudo_targets
def test_modes():
    """Teacher after filtering (thr 0.5, NMS 0.5): idx 0, 2, 4, 5. GT [0, 0, 10, 10] overlaps idx 0 (IoU 1) and
    idx 2 (IoU 90 / 110), so merge adds only idx 4 and 5."""
    gt = [_gt()]
    merged = make_pseudo_targets(gt, [_teacher()], "merge")[0]
    assert merged["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30], [70, 70, 80, 80]]
    assert merged["labels"].tolist() == [4, 3, 2]
    for mode in ("replace", "separate"):
        out = make_pseudo_targets(gt, [_teacher()], mode)[0]
        assert out["boxes"].tolist() == [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [70, 70, 80, 80]]
        assert out["labels"].tolist() == [1, 2, 3, 2]
        assert out["image_id"].item() == 7
        assert out["area"].tolist() == [100.0, 100.0, 100.0, 100.0]
        assert out["iscrowd"].tolist() == [0, 0, 0, 0]
    # the filtering arguments are forwarded
    out = make_pseudo_targets(gt, [_teacher()], "replace", score_thr=0.65, nms_iou=None, max_dets=2)[0]
    assert out["labels"].tolist() == [1, 1]


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="merge, replace, separate"):
        make_pseudo_targets([_gt()], [_teacher()], "mix")
    assert PSEUDO_LABEL_MODES == ("merge", "replace", "separate")
    with pytest.raises(ValueError, match="1 GT targets but 2"):
        make_pseudo_targets([_gt()], [_teacher(), _teacher()], "merge")


@pytest.mark.parametrize("mode", PSEUDO_LABEL_MODES)
def test_dtypes_device_and_no_grad(mode):
    """Teacher in float64 / int32 with grad; GT float32 / int64 -> targets float32 / int64 on the GT device."""
    det = _teacher(requires_grad=True)
    det = {"boxes": det["boxes"].double(), "scores": det["scores"].double(), "labels": det["labels"].int()}
    out = make_pseudo_targets([_gt()], [det], mode)[0]
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    assert out["boxes"].device == _gt()["boxes"].device
    assert not out["boxes"].requires_grad
    assert out["boxes"].shape[1] == 4 and out["boxes"].shape[0] == out["labels"].shape[0] == out["area"].shape[0]


@pytest.mark.parametrize("mode", PSEUDO_LABEL_MODES)
def test_empty_detections_and_empty_gt(mode):
    empty_det = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    empty_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = make_pseudo_targets([_gt(), empty_gt, empty_gt], [empty_det, empty_det, _teacher()], mode)
    expect_first = [4] if mode == "merge" else []
    assert out[0]["labels"].tolist() == expect_first and out[0]["boxes"].shape == (len(expect_first), 4)
    assert out[1]["boxes"].shape == (0, 4) and out[1]["labels"].dtype == torch.int64
    assert out[2]["labels"].tolist() == [1, 2, 3, 2]  # empty GT: every filtered pseudo box in every mode


def test_degenerate_teacher_boxes_are_never_targets():
    from detkd.pseudo_labels import filter_detections

    det = {
        "boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0], [5.0, 5.0, 5.5, 30.0], [0.0, 0.0, 4.0, 4.0]]),
        "scores": torch.tensor([0.9, 0.9, 0.9]),
        "labels": torch.tensor([1, 2, 3]),
    }
    out = filter_detections([det], score_thr=0.5)[0]
    assert out["labels"].tolist() == [3]  # zero-width and 0.5 px-wide boxes dropped


def test_the_merge_counts_the_boxes_it_adds_to_labelled_images():
    from detkd.losses.head import PseudoLabelDistill

    pl = PseudoLabelDistill(mode="merge", score_thr=0.5, nms_iou=0.5)
    assert pl.added_per_image is None
    gt = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    unlabeled = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64), "unlabeled": True}
    # kept: idx 0, 2, 4, 5; 0 and 2 overlap the GT box (IoU 1 and 0.818 >= 0.5), 4 and 5 are added
    merged, separate = pl.make_targets([_teacher(), _teacher()], [gt, unlabeled])
    assert separate is None and merged[0]["boxes"].shape[0] == 3 and merged[1]["boxes"].shape[0] == 4
    assert pl.added_per_image == pytest.approx(2.0)  # the unlabelled image does not count: its targets are all pseudo
    covered = {"boxes": torch.tensor(BOXES, dtype=torch.float32), "labels": torch.tensor(LABELS)}
    pl.make_targets([_teacher()], [covered])  # every teacher box already labelled: nothing added
    assert pl.added_per_image == pytest.approx(1.0)  # (2 + 0) boxes over 2 labelled images
    replace = PseudoLabelDistill(mode="replace")
    replace.make_targets([_teacher()], [gt])
    assert replace.added_per_image is None  # only the merge adds to a ground truth
