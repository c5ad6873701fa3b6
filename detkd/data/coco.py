"""COCO-format detection dataset (pycocotools), mapped to detkd's conventions.

- Category ids (any, non-contiguous) map to contiguous labels ``1..K`` sorted by category id (0 is background, so
  detectors are built with ``num_classes = K + 1``); ``label_to_cat_id`` maps back for evaluation.
- Crowd boxes (``iscrowd``) are dropped from the training targets but stay in :attr:`CocoDetection.coco`, the
  ground truth that evaluation scores against.
- Boxes become ``xyxy`` pixels; degenerate ones (width or height < 1 px) and ones entirely outside their image
  (when the json gives its width and height) are dropped and counted in one warning line per annotation file.
- The whole annotation file is validated at load: an error is one paragraph (:class:`detkd.errors.DataError`, a
  ``ValueError``; a missing file is also a ``FileNotFoundError``) naming the json file and the offending annotation
  (or image, or category) id; a file without categories is an error. A missing or unreadable image is reported
  when it is read, naming the image file and the image id.
- Images are read with OpenCV as stored (EXIF orientation is not applied); grayscale, gray+alpha, BGR and BGRA
  files all come out RGB ``uint8``; 16-bit files are reduced to 8 bits.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from detkd.data.transforms import MIN_BOX_SIDE, DetectionTransform, clip_boxes_xyxy
from detkd.errors import DataError, DataNotFoundError

PathLike = Union[str, os.PathLike]
_REQUIRED_KEYS = ("images", "annotations", "categories")
_MAX_IDS_IN_WARNING = 10


def load_image_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as RGB ``uint8`` ``(H, W, 3)``.

    Grayscale becomes three equal channels, alpha is dropped (not composited), 16-bit values are divided by 257
    (``65535 -> 255``). Pixels are taken as stored: EXIF orientation is ignored.

    Args:
        path: Image file (any format OpenCV decodes).

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file cannot be read or decoded, or has an unsupported pixel type.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"image file '{path}' does not exist.")
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)  # imdecode(fromfile) also copes with non-ASCII paths
    except OSError as err:
        raise DataError(f"image file '{path}' could not be read: {err}.") from None
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if image is None:
        raise DataError(f"image file '{path}' could not be decoded: it is empty, corrupt or not an image.")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DataError(f"image file '{path}' has pixel type {image.dtype}; only 8- and 16-bit images are supported.")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise DataError(f"image file '{path}' has {channels} channels; expected 1 (gray), 2, 3 (BGR) or 4 (BGRA).")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(data: Any, ann_file: str) -> None:
    """Check that ``data`` (a loaded json) is a usable COCO detection file; raise one ValueError paragraph if not."""
    if not isinstance(data, dict):
        raise DataError(
            f"{ann_file} is not a COCO detection file: its top level is a {type(data).__name__}, expected an object "
            f"with the keys {', '.join(_REQUIRED_KEYS)}."
        )
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise DataError(
                f"{ann_file} is not a COCO detection file: the top-level key '{key}' is missing (a COCO detection "
                f"file has {', '.join(_REQUIRED_KEYS)}; present: {', '.join(map(str, data)) or 'none'})."
            )
        if not isinstance(data[key], list):
            raise DataError(f"{ann_file}: the top-level key '{key}' must be a list, got {type(data[key]).__name__}.")

    image_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        where = f"{ann_file}: image #{i} ({img.get('id', 'no id') if isinstance(img, dict) else img!r})"
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DataError(f"{where} needs an integer 'id'.")
        if img["id"] in image_ids:
            raise DataError(f"{ann_file}: image id {img['id']} appears more than once in 'images'.")
        image_ids.add(img["id"])
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(
                f"{ann_file}: image id {img['id']} needs a 'file_name' string, got {img.get('file_name')!r}."
            )
        for side in ("width", "height"):
            if side in img and not (_is_int(img[side]) and img[side] > 0):
                raise DataError(f"{ann_file}: image id {img['id']} has '{side}' {img[side]!r}; expected an int > 0.")

    if not data["categories"]:
        raise DataError(
            f"{ann_file}: 'categories' is empty; a detection file needs at least one category "
            f'({{"id": 1, "name": ...}}) for its annotations to refer to.'
        )
    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{ann_file}: category #{i} ({cat!r}) needs an integer 'id'.")
        if cat["id"] in cat_ids:
            raise DataError(f"{ann_file}: category id {cat['id']} appears more than once in 'categories'.")
        cat_ids.add(cat["id"])

    ann_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise DataError(
                f"{ann_file}: annotation #{i} ({ann!r}) needs an integer 'id' (pycocotools indexes annotations by id)."
            )
        ann_id = ann["id"]
        where = f"{ann_file}: annotation id {ann_id}"
        if ann_id in ann_ids:
            raise DataError(f"{where} appears more than once in 'annotations'; annotation ids must be unique.")
        ann_ids.add(ann_id)
        if ann.get("image_id") not in image_ids:
            raise DataError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'.")
        if ann.get("category_id") not in cat_ids:
            raise DataError(
                f"{where} (image_id {ann['image_id']}) has category_id {ann.get('category_id')!r}, which is not in "
                f"'categories' (ids: {', '.join(map(str, sorted(cat_ids)))})."
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DataError(
                f"{where} (image_id {ann['image_id']}) has a malformed 'bbox' {bbox!r}; expected "
                f"[x, y, width, height]: four finite numbers in pixels."
            )
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(
                f"{where} (image_id {ann['image_id']}) has a negative width or height in 'bbox' {bbox!r}; expected "
                f"[x, y, width, height] with width, height >= 0."
            )
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            raise DataError(f"{where} has 'iscrowd' {ann['iscrowd']!r}; expected 0 or 1.")


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on ``(seed, epoch, index)``."""
    entropy = [int(seed) % 2**64, int(epoch) % 2**64, int(index) % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class CocoDetection(Dataset):
    """A COCO-format detection dataset yielding ``(image, target)`` in the torchvision detection format.

    Args:
        ann_file: COCO detection json (``images``, ``annotations``, ``categories``).
        img_dir: Folder the images' ``file_name``s are relative to (they may contain sub-folders).
        transforms: Pipeline from :func:`detkd.data.transforms.build_transforms`; None keeps images as read.
        keep_empty: Keep images without (non-crowd, non-degenerate) boxes; else they leave :attr:`image_ids`.
        seed: Dataset seed; the augmentation of index ``i`` depends only on ``(seed, epoch, i)``.

    Attributes:
        coco: pycocotools ``COCO`` of the whole file, the evaluation ground truth (crowd boxes included; ``area``
            and ``iscrowd`` filled in as ``w * h`` and ``0`` where the file omits them, as COCOeval needs both).
        cat_ids: Category ids sorted; ``cat_ids[label - 1]`` is the category of ``label``.
        cat_id_to_label: Category id -> contiguous label ``1..K``.
        label_to_cat_id: Contiguous label -> category id.
        class_names: Category names, ``class_names[label - 1]``.
        num_classes: ``K + 1`` (background included), what torchvision detectors are built with.
        image_ids: Image ids served, in index order (sorted by id).
        num_degenerate: How many non-crowd boxes were dropped for a side < 1 px.
        num_outside: How many non-crowd boxes were dropped for lying entirely outside their image.

    Items (``__getitem__``):
        image: float32 ``(3, H, W)`` RGB in ``[0, 1]``, after the transforms.
        target: ``boxes`` float32 ``(K, 4)`` xyxy pixels of ``image``; ``labels`` int64 ``(K,)`` in ``1..K``;
            ``image_id`` int64 scalar; ``orig_size`` int64 ``(2,)`` = (h, w) of the file; ``size`` int64 ``(2,)`` =
            (h, w) of ``image``; ``scale_xy`` float32 ``(2,)`` = (sx, sy) with ``image_xy = file_xy * (sx, sy)``,
            present when the geometry is deterministic (no transforms, or resize/letterbox/photometric steps only)
            and absent for random geometry (flip, zoom, crop), where no such factors exist.

    Raises:
        FileNotFoundError: If ``ann_file`` does not exist.
        ValueError: If ``ann_file`` is not valid JSON, not a COCO detection file, holds a malformed entry, or no
            image is left to serve.
    """

    def __init__(
        self,
        ann_file: PathLike,
        img_dir: PathLike,
        transforms: Optional[DetectionTransform] = None,
        keep_empty: bool = True,
        seed: int = 0,
    ) -> None:
        self.ann_file = str(ann_file)
        self.img_dir = Path(img_dir)
        self.transforms = transforms
        self.keep_empty = keep_empty
        self.seed = int(seed)
        self.epoch = 0

        if not Path(ann_file).is_file():
            raise DataNotFoundError(f"annotation file '{ann_file}' does not exist.")
        try:
            with open(ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{ann_file} is not a valid JSON file: {err}.") from None
        _validate(data, self.ann_file)
        for ann in data["annotations"]:
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        self.coco = coco

        self.cat_ids: list[int] = sorted(coco.cats)
        self.cat_id_to_label: dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names: list[str] = [str(coco.cats[c].get("name", c)) for c in self.cat_ids]
        self.num_classes = len(self.cat_ids) + 1

        self._targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        degenerate: list[int] = []
        outside: list[int] = []
        image_ids = []
        for img_id in sorted(coco.imgs):
            boxes, labels = [], []
            img_w, img_h = coco.imgs[img_id].get("width"), coco.imgs[img_id].get("height")
            for ann in coco.imgToAnns.get(img_id, []):
                if ann["iscrowd"]:
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                if w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:
                    degenerate.append(ann["id"])
                    continue
                if img_w is not None and img_h is not None and (x >= img_w or y >= img_h or x + w <= 0 or y + h <= 0):
                    outside.append(ann["id"])
                    continue
                boxes.append((x, y, x + w, y + h))
                labels.append(self.cat_id_to_label[ann["category_id"]])
            self._targets[img_id] = (
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64).reshape(-1),
            )
            if boxes or keep_empty:
                image_ids.append(img_id)
        self.image_ids: list[int] = image_ids
        self.num_degenerate = len(degenerate)
        self.num_outside = len(outside)
        if degenerate or outside:
            dropped = degenerate + outside
            shown = ", ".join(map(str, dropped[:_MAX_IDS_IN_WARNING]))
            more = ", ..." if len(dropped) > _MAX_IDS_IN_WARNING else ""
            warnings.warn(
                f"{self.ann_file}: dropped {len(degenerate)} degenerate box(es) with width or height < "
                f"{MIN_BOX_SIDE:g} px and {len(outside)} box(es) entirely outside their image from the training "
                f"targets (annotation ids: {shown}{more}).",
                stacklevel=2,
            )
        if not self.image_ids:
            raise DataError(
                f"{self.ann_file}: no image to serve ({len(coco.imgs)} images in the file"
                + (", none with a usable box, and keep_empty=False)." if coco.imgs else ").")
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of ``epoch`` (call before each epoch; not seen by persistent DataLoader workers)."""
        self.epoch = int(epoch)

    def image_path(self, index: int) -> Path:
        """Path of the image file served at ``index``."""
        return self.img_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(image (3, H, W) float32 in [0, 1], target dict)`` of the image at ``index``; see the class docstring.

        Raises:
            FileNotFoundError: If the image file is missing (the message names the file and the image id).
            ValueError: If the image file cannot be decoded or its size disagrees with the json's width/height.
        """
        if index < 0:
            index += len(self)
        img_id = self.image_ids[index]
        info = self.coco.imgs[img_id]
        path = self.image_path(index)
        where = f"image id {img_id} of {self.ann_file}"
        try:
            image = load_image_rgb(path)
        except FileNotFoundError as err:
            raise DataNotFoundError(
                f"{err} It is {where} (file_name '{info['file_name']}' under '{self.img_dir}')."
            ) from None
        except ValueError as err:
            raise DataError(f"{err} It is {where}.") from None
        orig_h, orig_w = image.shape[:2]
        if ("height" in info and info["height"] != orig_h) or ("width" in info and info["width"] != orig_w):
            hint = (
                " (the file may carry an EXIF rotation)"
                if (info.get("height"), info.get("width")) == (orig_w, orig_h)
                else ""
            )
            raise DataError(
                f"image file '{path}' ({where}) is {orig_w}x{orig_h} (w x h) but the json says "
                f"{info.get('width')}x{info.get('height')}{hint}; its boxes would not fit the pixels."
            )
        boxes, labels = self._targets[img_id]
        scale: Optional[tuple[float, float]] = (1.0, 1.0)
        if self.transforms is None:
            boxes, labels = clip_boxes_xyxy(boxes, labels, (orig_h, orig_w))
        else:
            image, boxes, labels = self.transforms(image, boxes, labels, _sample_seed(self.seed, self.epoch, index))
            scale = self.transforms.scale_of((orig_h, orig_w)) if self.transforms.deterministic_geometry else None
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32).div_(255.0)
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1)),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor(tensor.shape[-2:], dtype=torch.int64),
        }
        if scale is not None:
            target["scale_xy"] = torch.tensor(scale, dtype=torch.float32)
        return tensor, target

    def __repr__(self) -> str:
        return (
            f"CocoDetection('{self.ann_file}', {len(self)} images, {self.num_classes - 1} classes, "
            f"transforms={self.transforms!r})"
        )


def collate_detection(
    batch: list[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep a detection batch as lists (images differ in size; torchvision detectors take lists).

    Args:
        batch: ``[(image (3, H_i, W_i), target), ...]``.

    Returns:
        ``(images, targets)``: a list of ``B`` image tensors and a list of ``B`` target dicts.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
