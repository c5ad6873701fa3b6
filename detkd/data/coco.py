"""COCO-format detection dataset (pycocotools), mapped to detkd's conventions.

- Category ids (any, non-contiguous) map to contiguous labels ``1..K`` sorted by id (0 is background); back with
  ``label_to_cat_id``.
- Crowd boxes are dropped from training targets but stay in ``coco`` (the ground truth for evaluation).
- Boxes become ``xyxy``; degenerate ones (width or height < 1 px) are dropped, reported in one warning per file.
- Images are read with OpenCV; grayscale and RGBA become RGB. Errors name the file and the image/annotation id.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

MIN_BOX_SIDE = 1.0


def load_image_rgb(path: str) -> np.ndarray:
    """Read an image file as ``uint8`` RGB ``(H, W, 3)``; grayscale and RGBA are converted."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file {path} does not exist.")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"image file {path} could not be decoded (corrupt or not an image).")
    if image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _validate(data: dict, ann_file: str) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{ann_file} is not a COCO detection file: the top-level key '{key}' is missing.")
    image_ids = {img.get("id") for img in data["images"]}
    cat_ids = {c.get("id") for c in data["categories"]}
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise ValueError(f"{ann_file}: image entry {img!r} needs 'id' and 'file_name'.")
    for ann in data["annotations"]:
        ann_id = ann.get("id", "<no id>")
        bbox = ann.get("bbox")
        ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        if not ok:
            raise ValueError(f"{ann_file}: annotation {ann_id} has a malformed bbox {bbox!r}; expected [x, y, w, h].")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{ann_file}: annotation {ann_id} has a negative width or height in bbox {bbox}.")
        if ann.get("category_id") not in cat_ids:
            raise ValueError(
                f"{ann_file}: annotation {ann_id} has category_id {ann.get('category_id')!r}, which is not in "
                f"'categories' (ids {sorted(cat_ids)})."
            )
        if ann.get("image_id") not in image_ids:
            raise ValueError(
                f"{ann_file}: annotation {ann_id} refers to image_id {ann.get('image_id')!r}, not in 'images'."
            )


class CocoDetection(Dataset):
    """A COCO-format detection dataset yielding ``(image (3,H,W) float in [0,1], target dict)``."""

    def __init__(self, ann_file: str, img_dir: str, transforms=None, keep_empty: bool = True, seed: int = 0) -> None:
        from pycocotools.coco import COCO

        self.ann_file, self.img_dir = str(ann_file), Path(img_dir)
        if not Path(ann_file).is_file():
            raise FileNotFoundError(f"annotation file {ann_file} does not exist.")
        try:
            data = json.loads(Path(ann_file).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{ann_file} is not valid JSON: {err}") from err
        _validate(data, self.ann_file)
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        self.coco = coco
        self.cat_ids = sorted(coco.cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {v: k for k, v in self.cat_id_to_label.items()}
        self.class_names = [coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids) + 1
        self.transforms = transforms
        self.seed, self.epoch = seed, 0
        self._targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        degenerate = 0
        ids = []
        for img_id in sorted(coco.imgs):
            boxes, labels = [], []
            for ann in coco.imgToAnns.get(img_id, []):
                if ann.get("iscrowd", 0):
                    continue
                x, y, w, h = ann["bbox"]
                if w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:
                    degenerate += 1
                    continue
                boxes.append([x, y, x + w, y + h])
                labels.append(self.cat_id_to_label[ann["category_id"]])
            if boxes or keep_empty:
                ids.append(img_id)
            self._targets[img_id] = (
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
            )
        if degenerate:
            warnings.warn(f"{ann_file}: dropped {degenerate} degenerate boxes (width or height < 1 px).", stacklevel=2)
        self.image_ids = ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img_id = self.image_ids[index]
        info = self.coco.imgs[img_id]
        path = self.img_dir / info["file_name"]
        try:
            image = load_image_rgb(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{err} (image id {img_id} of {self.ann_file})") from None
        orig_h, orig_w = image.shape[:2]
        boxes, labels = self._targets[img_id]
        boxes = np.clip(boxes, 0, [orig_w, orig_h, orig_w, orig_h])
        scale = (1.0, 1.0)
        if self.transforms is not None:
            sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            image, boxes, labels = self.transforms(image, boxes, labels, sample_seed)
            if self.transforms.is_deterministic:
                from detkd.data.transforms import scale_of

                scale = scale_of(self.transforms.steps, (orig_h, orig_w))
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor(list(tensor.shape[-2:]), dtype=torch.int64),
            "scale_xy": torch.tensor(scale, dtype=torch.float32),
        }
        return tensor, target


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)
