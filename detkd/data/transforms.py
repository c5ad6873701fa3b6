"""Box-safe albumentations pipelines built from the recipe (``data.transforms``).

``TRANSFORMS`` maps a step name to a builder whose annotated keyword arguments are the step's parameters (the
config validates recipes against these signatures). ``build_transforms`` wraps the steps in ``A.Compose`` with
``BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=..., clip=True)`` and reseeds the
pipeline for every sample, so an image's augmentation depends only on its sample seed, never on call order or
DataLoader worker.
"""

from __future__ import annotations

from typing import Callable

import albumentations as A
import cv2
import numpy as np

MIN_BOX_SIDE = 1.0


def resize(height: int, width: int) -> A.BasicTransform:
    """Resize to ``height x width`` (per-axis scale)."""
    return A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR)


def letterbox(size: int, fill: int = 114) -> A.BasicTransform:
    """Longest side to ``size`` keeping the aspect ratio, then pad bottom/right to ``size x size``."""
    return A.Compose(
        [
            A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(size, size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=fill),
        ]
    )


def hflip(p: float = 0.5) -> A.BasicTransform:
    return A.HorizontalFlip(p=p)


def scale_jitter(scale_min: float = 0.75, scale_max: float = 1.25, p: float = 1.0) -> A.BasicTransform:
    """Random zoom about the image centre keeping the canvas size (boxes cut at the border are clipped)."""
    return A.Affine(scale=(scale_min, scale_max), keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=114, p=p)


def color_jitter(
    brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.02, p: float = 0.8
) -> A.BasicTransform:
    return A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p)


TRANSFORMS: dict[str, Callable[..., A.BasicTransform]] = {
    "resize": resize,
    "letterbox": letterbox,
    "hflip": hflip,
    "scale_jitter": scale_jitter,
    "color_jitter": color_jitter,
}
DETERMINISTIC_GEOMETRY = ("resize", "letterbox")
PHOTOMETRIC = ("color_jitter",)


def list_transforms() -> list[str]:
    return sorted(TRANSFORMS)


def _build_step(name: str, params: dict) -> A.BasicTransform:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform '{name}'; valid: {', '.join(list_transforms())}")
    return TRANSFORMS[name](**params)


class DetectionTransform:
    """``(image HWC uint8 RGB, boxes (K,4) xyxy, labels (K,), sample_seed) -> (image, boxes, labels)``."""

    def __init__(self, steps: list[tuple[str, dict]], min_visibility: float = 0.3, seed: int = 0) -> None:
        self.steps = [(name, dict(params)) for name, params in steps]
        self.seed = seed
        self.compose = A.Compose(
            [_build_step(name, params) for name, params in self.steps],
            bbox_params=A.BboxParams(
                format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, clip=True
            ),
            seed=seed,
        )

    @property
    def is_deterministic(self) -> bool:
        return all(name in DETERMINISTIC_GEOMETRY for name, _ in self.steps)

    def __call__(
        self, image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray, sample_seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.steps:
            return image, boxes_xyxy, labels
        self.compose.set_random_seed(int(sample_seed) % (2**32))
        h, w = image.shape[:2]
        boxes = np.clip(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4), 0, [w, h, w, h])
        out = self.compose(image=image, bboxes=boxes, labels=np.asarray(labels, dtype=np.int64))
        new_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        new_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        oh, ow = out["image"].shape[:2]
        new_boxes = np.clip(new_boxes, 0, [ow, oh, ow, oh])
        keep = ((new_boxes[:, 2] - new_boxes[:, 0]) >= MIN_BOX_SIDE) & (
            (new_boxes[:, 3] - new_boxes[:, 1]) >= MIN_BOX_SIDE
        )
        return out["image"], new_boxes[keep], new_labels[keep]


def build_transforms(steps: list[tuple[str, dict]], min_visibility: float = 0.3, seed: int = 0) -> DetectionTransform:
    return DetectionTransform(steps, min_visibility=min_visibility, seed=seed)


def scale_of(steps: list[tuple[str, dict]], orig_hw: tuple[int, int]) -> tuple[float, float]:
    """``(sx, sy)`` with ``transformed_xy = orig_xy * (sx, sy)`` for deterministic pipelines (val)."""
    h, w = orig_hw
    sx = sy = 1.0
    for name, params in steps:
        if name == "resize":
            sx, sy = sx * params["width"] / w, sy * params["height"] / h
            w, h = params["width"], params["height"]
        elif name == "letterbox":
            r = params["size"] / max(h, w)
            nh, nw = int(round(h * r)), int(round(w * r))
            sx, sy = sx * nw / w, sy * nh / h
            w, h = params["size"], params["size"]
        elif name in PHOTOMETRIC:
            continue
        else:
            raise ValueError(f"transform '{name}' is random geometry; the val pipeline may only use resize/letterbox")
    return sx, sy
