"""Tests for detkd.engine.evaluator against a hand-made COCO ground truth.

Ground truth (non-contiguous category ids 3, 7, 12 -> labels 1, 2, 3), COCO area ranges: small < 32^2 = 1024,
medium < 96^2 = 9216, large above:

- image 1: circle 120x120 (large), square 20x20 (small)
- image 2: square 50x40 (medium), triangle 60x50 (medium), a crowd circle 100x50
- image 3: no annotations
- image 4: triangle 25x30 (small), circle 70x60 (medium)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from types import SimpleNamespace

import pytest
import torch
from pycocotools.coco import COCO
from torch import nn

from detkd.engine.evaluator import (
    SUMMARY_KEYS,
    coco_evaluate,
    detections_to_coco_results,
    evaluate,
    format_metrics_table,
    save_metrics,
)

CATEGORIES = [
    {"id": 3, "name": "circle"},
    {"id": 7, "name": "square"},
    {"id": 12, "name": "triangle"},
]
LABEL_TO_CAT_ID = {1: 3, 2: 7, 3: 12}
CLASS_NAMES = ["circle", "square", "triangle"]
# (image_id, category_id, [x, y, w, h], iscrowd)
GT_BOXES = [
    (1, 3, [10.0, 10.0, 120.0, 120.0], 0),
    (1, 7, [150.0, 150.0, 20.0, 20.0], 0),
    (2, 7, [20.0, 30.0, 50.0, 40.0], 0),
    (2, 12, [100.0, 100.0, 60.0, 50.0], 0),
    (2, 3, [0.0, 150.0, 100.0, 50.0], 1),
    (4, 12, [5.0, 5.0, 25.0, 30.0], 0),
    (4, 3, [80.0, 60.0, 70.0, 60.0], 0),
]
IMAGE_IDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory: pytest.TempPathFactory) -> COCO:
    gt = {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in IMAGE_IDS],
        "categories": CATEGORIES,
        "annotations": [
            {"id": n + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}
            for n, (img, cat, box, crowd) in enumerate(GT_BOXES)
        ],
    }
    path = tmp_path_factory.mktemp("gt") / "gt.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def perfect_results(image_ids=None) -> list[dict]:
    """The non-crowd ground truth as score-1 detections."""
    return [
        {"image_id": img, "category_id": cat, "bbox": list(box), "score": 1.0}
        for img, cat, box, crowd in GT_BOXES
        if not crowd and (image_ids is None or img in image_ids)
    ]


def shifted(results: list[dict], dx: float) -> list[dict]:
    return [{**r, "bbox": [r["bbox"][0] + dx, *r["bbox"][1:]]} for r in results]


# ----------------------------------------------------------------------------------------------- coco_evaluate


def test_perfect_results_give_ap_one(coco_gt):
    m = coco_evaluate(coco_gt, perfect_results(), class_names=CLASS_NAMES, cat_ids=[3, 7, 12])
    for key in SUMMARY_KEYS:
        assert isinstance(m[key], float)
        assert m[key] == pytest.approx(1.0), key
    assert m["per_class_AP"] == pytest.approx({"circle": 1.0, "square": 1.0, "triangle": 1.0})


def test_default_class_names_come_from_ground_truth(coco_gt):
    m = coco_evaluate(coco_gt, perfect_results())
    assert list(m["per_class_AP"]) == ["circle", "square", "triangle"]


def test_results_are_not_modified(coco_gt):
    results = perfect_results()
    before = json.dumps(results)
    coco_evaluate(coco_gt, results)
    assert json.dumps(results) == before  # loadRes adds area/id/segmentation to the dicts it gets


def test_detection_on_crowd_box_is_ignored(coco_gt):
    crowd = {"image_id": 2, "category_id": 3, "bbox": [0.0, 150.0, 100.0, 50.0], "score": 1.0}
    m = coco_evaluate(coco_gt, [*perfect_results(), crowd])
    assert m["AP"] == pytest.approx(1.0)


def test_small_shift_lowers_ap_but_not_ap50(coco_gt):
    # a 2 px shift: IoU of the 20x20 small box = 18*20 / (800 - 360) = 0.818 -> misses the IoU >= 0.85 thresholds
    m = coco_evaluate(coco_gt, shifted(perfect_results(), 2.0))
    assert m["AP"] < 1.0 - 1e-3
    assert m["AP50"] == pytest.approx(1.0)
    assert m["APs"] < m["APl"]  # the same shift hurts small boxes most
    assert m["APl"] == pytest.approx(1.0)  # 120x120 box: IoU = 118/122 = 0.967, above every threshold


def test_large_shift_lowers_ap50(coco_gt):
    # 30 px on the 20..70 px wide boxes: IoU < 0.5 for all but the large circle (90/150 = 0.6)
    m = coco_evaluate(coco_gt, shifted(perfect_results(), 30.0))
    assert m["AP50"] < 1.0 - 1e-3
    assert m["APl"] > m["APs"]


def test_wrong_category_lowers_ap(coco_gt):
    results = perfect_results()
    results[1]["category_id"] = 12  # the small square of image 1 labelled triangle
    m = coco_evaluate(coco_gt, results, class_names=CLASS_NAMES, cat_ids=[3, 7, 12])
    assert m["AP"] < 1.0 - 1e-3
    assert m["AP50"] < 1.0 - 1e-3
    assert m["per_class_AP"]["circle"] == pytest.approx(1.0)
    assert m["per_class_AP"]["square"] < 1.0 - 1e-3  # one of two squares missed
    assert m["per_class_AP"]["triangle"] < 1.0 - 1e-3  # a score-1 false positive


def test_per_class_ap_is_mean_over_iou_thresholds(coco_gt):
    # only the square of image 2 shifted by 10 px (and scored 0.5): IoU = 40*40 / (4000 - 1600) = 2/3 -> a hit at
    # IoU .50, .55, .60, .65
    results = perfect_results()
    results[2].update(bbox=[30.0, 30.0, 50.0, 40.0], score=0.5)
    m = coco_evaluate(coco_gt, results, class_names=CLASS_NAMES, cat_ids=[3, 7, 12])
    # square: at 4 of 10 IoU thresholds both squares found (AP 1); at the other 6 the score-1 square is found and
    # the 0.5 one is a false positive: precision 1 up to recall 0.5 -> 51 of 101 recall points -> AP 51/101
    expected = (4 * 1.0 + 6 * 51 / 101) / 10
    assert m["per_class_AP"]["square"] == pytest.approx(expected)
    assert m["per_class_AP"]["circle"] == pytest.approx(1.0)


def test_empty_results_give_zero(coco_gt):
    m = coco_evaluate(coco_gt, [], class_names=CLASS_NAMES, cat_ids=[3, 7, 12])
    for key in SUMMARY_KEYS:
        assert m[key] == 0.0, key
    assert m["per_class_AP"] == {"circle": 0.0, "square": 0.0, "triangle": 0.0}


def test_image_ids_restriction(coco_gt):
    results = perfect_results(image_ids={1, 3})
    assert coco_evaluate(coco_gt, results)["AP"] < 1.0 - 1e-3  # images 2 and 4 missed
    m = coco_evaluate(coco_gt, results, image_ids=[1, 3], class_names=CLASS_NAMES, cat_ids=[3, 7, 12])
    assert m["AP"] == pytest.approx(1.0)
    assert m["AP50"] == pytest.approx(1.0)
    # images 1 and 3 hold no medium box and no triangle: undefined -> -1 (documented convention)
    assert m["APm"] == -1.0
    assert m["per_class_AP"]["triangle"] == -1.0
    assert m["per_class_AP"]["circle"] == pytest.approx(1.0)


def test_results_outside_image_ids_are_ignored(coco_gt):
    results = perfect_results(image_ids={4}) + shifted(perfect_results(image_ids={1}), 50.0)
    assert coco_evaluate(coco_gt, results, image_ids=[4])["AP"] == pytest.approx(1.0)


def test_unknown_image_ids_raise(coco_gt):
    with pytest.raises(ValueError, match="99"):
        coco_evaluate(coco_gt, perfect_results(), image_ids=[1, 99])
    with pytest.raises(ValueError, match="99"):
        coco_evaluate(coco_gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}])


# -------------------------------------------------------------------------------- detections_to_coco_results


def test_detections_to_coco_results_maps_labels_and_scale():
    detections = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 3.0, 3.0]]),
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    targets = [
        {"image_id": torch.tensor(42), "scale_xy": torch.tensor([0.5, 2.0])},
        {"image_id": torch.tensor(43), "scale_xy": torch.tensor([1.0, 1.0])},
    ]
    results = detections_to_coco_results(detections, targets, LABEL_TO_CAT_ID)
    # (10, 20, 50, 80) / (0.5, 2, 0.5, 2) = (20, 10, 100, 40) -> xywh (20, 10, 80, 30)
    # (0, 0, 3, 3) / (0.5, 2, 0.5, 2) = (0, 0, 6, 1.5) -> xywh (0, 0, 6, 1.5)
    assert results == [
        {"image_id": 42, "category_id": 3, "bbox": [20.0, 10.0, 80.0, 30.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 12, "bbox": [0.0, 0.0, 6.0, 1.5], "score": pytest.approx(0.25)},
    ]
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in results)
    json.dumps(results)  # plain python types only


def test_detections_to_coco_results_rejects_unknown_label():
    det = [{"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "scores": torch.tensor([1.0]), "labels": torch.tensor([99])}]
    with pytest.raises(ValueError, match="label 99"):
        detections_to_coco_results(det, [{"image_id": 1, "scale_xy": torch.tensor([1.0, 1.0])}], LABEL_TO_CAT_ID)


# ------------------------------------------------------------------------------------------------- evaluate

# per image: (sx, sy) of the fake transform
SCALES = {1: (0.5, 0.5), 2: (1.5, 0.75), 3: (1.0, 1.0), 4: (0.32, 0.4)}


class GroundTruthDetector(nn.Module):
    """A fake detector: reads the image id from the pixels and returns its ground truth in transformed pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.eval_calls = 0
        cat_to_label = {c: lab for lab, c in LABEL_TO_CAT_ID.items()}
        self.lookup: dict[int, dict[str, torch.Tensor]] = {}
        for image_id, (sx, sy) in SCALES.items():
            rows = [(box, cat) for img, cat, box, crowd in GT_BOXES if img == image_id and not crowd]
            xyxy = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _ in rows]).reshape(-1, 4)
            self.lookup[image_id] = {
                "boxes": xyxy * torch.tensor([sx, sy, sx, sy]),
                "scores": torch.ones(len(rows)),
                "labels": torch.tensor([cat_to_label[c] for _, c in rows], dtype=torch.int64),
            }

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert not self.training, "evaluate must run the detector in eval mode"
        self.eval_calls += 1
        return [{k: v.clone() for k, v in self.lookup[int(img[0, 0, 0].item())].items()} for img in images]


def fake_loader(batch_size: int = 2) -> list[tuple[list[torch.Tensor], list[dict]]]:
    samples = []
    for image_id in IMAGE_IDS:
        sx, sy = SCALES[image_id]
        image = torch.full((3, round(200 * sy), round(200 * sx)), float(image_id))
        target = {"image_id": torch.tensor(image_id), "scale_xy": torch.tensor([sx, sy], dtype=torch.float32)}
        samples.append((image, target))
    return [
        ([s[0] for s in samples[i : i + batch_size]], [s[1] for s in samples[i : i + batch_size]])
        for i in range(0, len(samples), batch_size)
    ]


def fake_dataset(coco_gt: COCO) -> SimpleNamespace:
    return SimpleNamespace(coco=coco_gt, label_to_cat_id=LABEL_TO_CAT_ID, class_names=CLASS_NAMES, cat_ids=[3, 7, 12])


def test_evaluate_perfect_detector_and_restores_training_flag(coco_gt, tmp_path):
    model = GroundTruthDetector()
    model.train()
    results_file = tmp_path / "out" / "results.json"
    m = evaluate(model, fake_loader(), fake_dataset(coco_gt), "cpu", results_file=str(results_file), progress=False)
    assert model.training  # restored
    assert model.eval_calls == 2
    assert m["AP"] == pytest.approx(1.0)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["per_class_AP"] == pytest.approx({"circle": 1.0, "square": 1.0, "triangle": 1.0})
    written = json.loads(results_file.read_text())
    assert len(written) == 6  # the non-crowd ground truth boxes
    # float32 scale round trip: original pixels come back to within the 2-decimal rounding
    got = sorted((r["image_id"], r["category_id"], *r["bbox"]) for r in written)
    want = sorted((r["image_id"], r["category_id"], *r["bbox"]) for r in perfect_results())
    assert got == [pytest.approx(w, abs=0.011) for w in want]

    model.eval()
    evaluate(model, fake_loader(), fake_dataset(coco_gt), "cpu", progress=False)
    assert not model.training  # an eval-mode model stays in eval mode


def test_evaluate_unwraps_module_wrapper(coco_gt):
    model = GroundTruthDetector().train()
    wrapped = nn.DataParallel(model)  # no GPU: exposes .module like DistributedDataParallel
    m = evaluate(wrapped, fake_loader(), fake_dataset(coco_gt), torch.device("cpu"), progress=False)
    assert m["AP"] == pytest.approx(1.0)
    assert model.training


def test_evaluate_max_images_scores_only_images_seen(coco_gt, tmp_path):
    model = GroundTruthDetector()
    results_file = tmp_path / "results.json"
    # batches (1, 2), (3, 4): max 3 images -> images 1, 2, 3; image 4 (not seen) is not counted as missed
    m = evaluate(
        model, fake_loader(), fake_dataset(coco_gt), "cpu", max_images=3, results_file=str(results_file), progress=False
    )
    assert m["AP"] == pytest.approx(1.0)
    assert {r["image_id"] for r in json.loads(results_file.read_text())} == {1, 2}


def test_evaluate_without_detections_gives_zero(coco_gt):
    class Blind(nn.Module):
        def forward(self, images):
            empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
            return [dict(empty) for _ in images]

    m = evaluate(Blind(), fake_loader(), fake_dataset(coco_gt), "cpu", progress=False)
    assert m["AP"] == 0.0 and m["AR100"] == 0.0


# ----------------------------------------------------------------------------------- formatting and saving


def test_format_metrics_table():
    metrics = {key: 0.5 for key in SUMMARY_KEYS}
    metrics.update(AP=0.638, APs=-1.0, per_class_AP={"circle": 0.7012, "triangle": -1.0})
    table = format_metrics_table(metrics, title="val after epoch 3")
    lines = table.splitlines()
    assert lines[0] == "val after epoch 3"
    header, values = lines[1].split(), lines[2].split()
    assert header == list(SUMMARY_KEYS)
    assert values == ["63.8", "50.0", "50.0", "-", "50.0", "50.0", "50.0", "50.0", "50.0"]
    assert len(lines[1]) == len(lines[2])  # fixed width: columns line up
    assert lines[4].split() == ["circle", "70.1"]
    assert lines[5].split() == ["triangle", "-"]


def test_save_metrics_is_atomic_json(tmp_path):
    metrics = {"AP": 0.5, "AP50": 0.75, "per_class_AP": {"circle": 0.25}}
    path = tmp_path / "sub" / "metrics.json"
    save_metrics(metrics, path)
    save_metrics({**metrics, "AP": 0.6}, str(path))  # overwrite in place
    assert json.loads(path.read_text()) == {**metrics, "AP": 0.6}
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left behind


def test_background_label_detections_are_not_results():
    det = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]]),
            "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}]  # fmt: skip
    target = [{"image_id": torch.tensor(3), "scale_xy": torch.tensor([1.0, 1.0])}]
    results = detections_to_coco_results(det, target, {1: 7})
    assert [(r["category_id"], r["score"]) for r in results] == [(7, pytest.approx(0.8))]
