"""COCO-format dataset: id <-> label maps, crowd and degenerate boxes, image decoding, validation errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from detkd.data.coco import CocoDetection, collate_detection, load_image_rgb
from detkd.data.transforms import build_transforms

BGR_RED = (0, 0, 255)


def _color_image() -> np.ndarray:
    """40 x 30 BGR: grey background, a pure red block at rows 3..7, cols 2..11 (the box of annotation 1)."""
    image = np.full((30, 40, 3), 90, np.uint8)
    image[3:8, 2:12] = BGR_RED
    return image


def _gray_image() -> np.ndarray:
    return (np.arange(24 * 32, dtype=np.int64).reshape(24, 32) % 251).astype(np.uint8)


def _bgra_image() -> np.ndarray:
    """16 x 20 BGRA: B=10, G=20, R=30 everywhere, alpha varying (alpha must be dropped, not composited)."""
    image = np.zeros((16, 20, 4), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30
    image[..., 3] = np.arange(20, dtype=np.uint8) * 12
    return image


def _coco_dict() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "color.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/gray.png", "width": 32, "height": 24},
            {"id": 3, "file_name": "sub/rgba.png", "width": 20, "height": 16},
            {"id": 4, "file_name": "empty.png", "width": 16, "height": 16},
            {"id": 5, "file_name": "crowd_only.png", "width": 16, "height": 16},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 42, "bbox": [20.5, 10, 15, 12.25], "area": 183.75, "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
            {"id": 14, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0.5, 10], "area": 5, "iscrowd": 0},
            {"id": 21, "image_id": 2, "category_id": 7, "bbox": [1, 2, 8, 6]},  # no area / iscrowd: filled in
            {"id": 31, "image_id": 3, "category_id": 42, "bbox": [0, 0, 20, 16], "area": 320, "iscrowd": 0},
            {"id": 51, "image_id": 5, "category_id": 3, "bbox": [0, 0, 16, 16], "area": 256, "iscrowd": 1},
        ],
        # listed out of id order, ids not contiguous
        "categories": [{"id": 42, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "bird"}],
    }


def make_coco(tmp_path: Path, edit: Optional[Callable[[dict], None]] = None) -> tuple[str, str]:
    """Write the images and the annotation json (after ``edit``); return ``(ann_file, img_dir)``."""
    img_dir = tmp_path / "images"
    (img_dir / "sub").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(img_dir / "color.png"), _color_image())
    cv2.imwrite(str(img_dir / "sub" / "gray.png"), _gray_image())
    cv2.imwrite(str(img_dir / "sub" / "rgba.png"), _bgra_image())
    cv2.imwrite(str(img_dir / "empty.png"), np.zeros((16, 16, 3), np.uint8))
    cv2.imwrite(str(img_dir / "crowd_only.png"), np.zeros((16, 16, 3), np.uint8))
    data = _coco_dict()
    if edit is not None:
        edit(data)
    ann_file = tmp_path / "instances_toy.json"
    ann_file.write_text(json.dumps(data))
    return str(ann_file), str(img_dir)


def load(ann_file: str, img_dir: str, **kwargs) -> CocoDetection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDetection(ann_file, img_dir, **kwargs)


@pytest.fixture()
def coco_files(tmp_path) -> tuple[str, str]:
    return make_coco(tmp_path)


def test_category_ids_map_to_contiguous_labels_and_back(coco_files):
    ds = load(*coco_files)
    assert ds.cat_ids == [3, 7, 42]
    assert ds.cat_id_to_label == {3: 1, 7: 2, 42: 3}
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 42}
    assert ds.class_names == ["cat", "bird", "dog"]
    assert ds.num_classes == 4
    _, target = ds[0]
    assert [ds.label_to_cat_id[int(label)] for label in target["labels"]] == [3, 42]
    assert [ds.class_names[int(label) - 1] for label in target["labels"]] == ["cat", "dog"]


def test_targets_are_exact_xyxy_without_crowd_or_degenerate_boxes(coco_files):
    ds = load(*coco_files)
    assert ds.image_ids == [1, 2, 3, 4, 5]
    image, target = ds[0]
    # annotations 11 and 12 only: 13 is crowd, 14 is 0.5 px wide
    expected = torch.tensor([[2, 3, 12, 8], [20.5, 10, 35.5, 22.25]], dtype=torch.float32)
    assert torch.equal(target["boxes"], expected)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0 and int(target["image_id"]) == 1
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["scale_xy"].tolist() == [1.0, 1.0]
    # the crowd box stays in the ground truth used for evaluation
    assert ds.coco.anns[13]["iscrowd"] == 1 and 13 in ds.coco.getAnnIds(imgIds=[1])
    assert ds.coco.anns[21]["area"] == 48.0 and ds.coco.anns[21]["iscrowd"] == 0  # filled in for COCOeval
    # the pure red block is where the first box says
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    assert torch.all(image[0, y1:y2, x1:x2] == 1.0) and torch.all(image[1:, y1:y2, x1:x2] == 0.0)
    # empty images: no boxes, but well-typed
    for index in (3, 4):
        _, empty = ds[index]
        assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_degenerate_boxes_are_reported_in_one_warning_naming_file_and_count(tmp_path):
    def add_degenerate(data: dict) -> None:
        data["annotations"].append({"id": 15, "image_id": 2, "category_id": 3, "bbox": [3, 3, 6, 0.25]})

    ann_file, img_dir = make_coco(tmp_path, add_degenerate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(ann_file, img_dir)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "instances_toy.json" in message and "dropped 2 degenerate" in message and "14, 15" in message
    assert ds.num_degenerate == 2
    assert [len(ds[i][1]["boxes"]) for i in range(len(ds))] == [2, 1, 1, 0, 0]


def test_grayscale_and_rgba_in_a_subfolder_come_out_rgb_with_their_values(coco_files):
    ds = load(*coco_files)
    gray, _ = ds[1]
    expected = torch.from_numpy(_gray_image()).float() / 255.0
    assert gray.shape == (3, 24, 32) and gray.dtype == torch.float32
    for channel in range(3):
        assert torch.equal(gray[channel], expected)
    rgba, target = ds[2]
    assert rgba.shape == (3, 16, 20)
    assert torch.equal(rgba[:, 0, 0] * 255, torch.tensor([30.0, 20.0, 10.0]))  # R, G, B of the BGRA file
    assert torch.all(rgba == rgba[:, :1, :1])  # alpha (varying) is ignored
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 0.0, 20.0, 16.0]]))
    assert load_image_rgb(Path(coco_files[1]) / "sub" / "rgba.png").tolist()[5][5] == [30, 20, 10]


def test_sixteen_bit_images_are_reduced_to_eight_bits(tmp_path):
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), np.array([[0, 257 * 100, 65535]], np.uint16))
    image = load_image_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (1, 3, 3)
    assert image[0, :, 0].tolist() == [0, 100, 255]


def test_keep_empty_false_drops_images_without_usable_boxes(coco_files):
    ds = load(*coco_files, keep_empty=False)
    assert ds.image_ids == [1, 2, 3]  # 4 has no annotation, 5 only a crowd box
    assert len(ds) == 3 and len(ds.coco.imgs) == 5  # evaluation ground truth unchanged


def test_letterbox_scale_xy_maps_boxes_back_to_file_pixels(coco_files):
    plain = load(*coco_files)
    ds = load(*coco_files, transforms=build_transforms([("letterbox", {"size": 64})]))
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["size"].tolist() == [64, 64]
    assert target["orig_size"].tolist() == [30, 40]
    # 40 x 30 -> longest side 64: r = 1.6, exactly 64 x 48
    assert torch.equal(target["scale_xy"], torch.tensor([1.6, 1.6]))
    scale = target["scale_xy"].repeat(2)
    torch.testing.assert_close(target["boxes"] / scale, plain[0][1]["boxes"], rtol=0, atol=1e-4)


def test_random_pipeline_is_deterministic_per_seed_epoch_and_index(coco_files):
    steps = [("scale_jitter", {"scale_min": 0.6, "scale_max": 1.4}), ("hflip", {}), ("color_jitter", {})]

    def dataset(seed: int = 0) -> CocoDetection:
        return load(*coco_files, transforms=build_transforms(steps), seed=seed)

    def sample(ds: CocoDetection, index: int):
        image, target = ds[index]
        return image, target["boxes"]

    def same(a, b) -> bool:
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    ds = dataset()
    first = [sample(ds, i) for i in range(3)]
    assert "scale_xy" not in ds[0][1]  # random geometry: no fixed factors (documented)
    assert all(same(sample(ds, i), first[i]) for i in (2, 0, 1))  # another order
    assert all(same(sample(dataset(), i), first[i]) for i in range(3))  # another process / worker
    ds.set_epoch(1)
    assert not all(same(sample(ds, i), first[i]) for i in range(3))
    ds.set_epoch(0)
    assert same(sample(ds, 0), first[0])
    assert not all(same(sample(dataset(seed=1), i), first[i]) for i in range(3))
    # the same through DataLoader workers
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert all(torch.equal(images[i], first[i][0]) and torch.equal(targets[i]["boxes"], first[i][1]) for i in range(2))


def test_collate_keeps_lists_of_differently_sized_images(coco_files):
    ds = load(*coco_files)
    images, targets = collate_detection([ds[0], ds[1]])
    assert [tuple(im.shape) for im in images] == [(3, 30, 40), (3, 24, 32)]
    assert [int(t["image_id"]) for t in targets] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names the file and the id
# ---------------------------------------------------------------------------------------------------------------


def _set_ann(ann_id: int, **fields) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        for ann in data["annotations"]:
            if ann["id"] == ann_id:
                ann.update(fields)
                for key, value in fields.items():
                    if value is ...:
                        del ann[key]

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_set_ann(12, bbox=[1, 2, 3]), "malformed 'bbox'"),
        (_set_ann(12, bbox=...), "malformed 'bbox'"),
        (_set_ann(12, bbox=[1, 2, float("nan"), 4]), "malformed 'bbox'"),
        (_set_ann(12, bbox=[1, 2, "3", 4]), "malformed 'bbox'"),
        (_set_ann(12, bbox=[1, 2, -3, 4]), "negative width or height"),
        (_set_ann(12, category_id=99), "category_id 99, which is not in 'categories' (ids: 3, 7, 42)"),
        (_set_ann(12, image_id=77), "image_id 77, which is not in 'images'"),
        (_set_ann(12, id=11), "appears more than once"),
    ],
)
def test_malformed_annotation_names_the_file_and_the_annotation_id(tmp_path, edit, fragment):
    ann_file, img_dir = make_coco(tmp_path, edit)
    with pytest.raises(ValueError) as info:
        CocoDetection(ann_file, img_dir)
    message = str(info.value)
    assert "instances_toy.json" in message and fragment in message
    assert "annotation id 12" in message or "annotation id 11" in message


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_without_a_top_level_key_names_the_file_and_the_key(tmp_path, key):
    ann_file, img_dir = make_coco(tmp_path, lambda data: data.pop(key))
    with pytest.raises(ValueError, match=rf"instances_toy\.json is not a COCO detection file: .*'{key}' is missing"):
        CocoDetection(ann_file, img_dir)


def test_missing_unreadable_or_mismatched_image_names_the_path_and_the_image_id(tmp_path):
    ann_file, img_dir = make_coco(tmp_path)
    ds = load(ann_file, img_dir)
    (Path(img_dir) / "sub" / "gray.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"sub/gray\.png.*image id 2 of .*instances_toy\.json"):
        ds[1]
    (Path(img_dir) / "sub" / "rgba.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"sub/rgba\.png.*could not be decoded.*image id 3"):
        ds[2]
    cv2.imwrite(str(Path(img_dir) / "color.png"), np.zeros((40, 30, 3), np.uint8))  # transposed
    with pytest.raises(ValueError, match=r"color\.png.*image id 1.*30x40.*json says 40x30.*EXIF"):
        ds[0]


def test_missing_or_invalid_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        CocoDetection(str(tmp_path / "nowhere.json"), str(tmp_path))
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json is not a valid JSON file"):
        CocoDetection(str(bad), str(tmp_path))
