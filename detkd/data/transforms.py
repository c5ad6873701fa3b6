"""Box-safe albumentations pipelines built from the recipe (``data.transforms``).

A recipe lists steps by name, e.g. ``[{type: letterbox, size: 128}, {type: hflip, p: 0.5}]``. ``TRANSFORMS`` maps
each name to a builder whose annotated keyword arguments are the step's parameters: the config validates recipes
against these signatures with ``inspect.signature``, so a builder's signature is the only schema of its step.

:func:`build_transforms` wraps the steps in one ``A.Compose`` with
``BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=..., clip=True)``. Guarantees of the
resulting :class:`DetectionTransform`:

- Boxes are ``xyxy`` pixels in, ``xyxy`` pixels of the transformed image out, always inside the image; a box that
  ends narrower or lower than ``MIN_BOX_SIDE`` (1 px), or keeps less than ``min_visibility`` of its area after a
  geometric step pushes it out of frame, is dropped together with its label.
- Determinism: the pipeline is reseeded on every call from ``(seed, sample_seed)``, so a sample's augmentation
  depends on its sample seed only, never on call order or DataLoader worker. Each step gets its *own* seed
  (albumentations' ``Compose.set_random_seed`` hands all steps the same one, which would make e.g. ``hflip`` and
  ``color_jitter`` with equal ``p`` fire together).

:func:`scale_of` gives the per-axis factors of a pipeline whose geometry is deterministic (resize, letterbox and
photometric steps); evaluation uses them to map predictions back to the pixels of the original image.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Mapping, Sequence, Union

import albumentations as A
import cv2
import numpy as np

MIN_BOX_SIDE = 1.0  # px; a box narrower or lower than this after the transforms is dropped
PAD_FILL = 114  # grey, the usual value for letterbox padding and for the canvas uncovered by a zoom-out

Transform = Union[A.BasicTransform, A.BaseCompose]


def _check(ok: bool, step: str, message: str) -> None:
    if not ok:
        raise ValueError(f"transform '{step}': {message}")


def _check_p(step: str, p: float) -> None:
    _check(0.0 <= p <= 1.0, step, f"p must be in [0, 1], got {p}.")


# ----------------------------------------------------------------------------------------------------------------
# Step builders (the registry's values). Their keyword arguments are the recipe keys of the step.
# ----------------------------------------------------------------------------------------------------------------


def resize(height: int, width: int) -> Transform:
    """Resize to ``height x width`` pixels, each axis scaled on its own (the aspect ratio may change).

    Boxes scale by ``(width / W, height / H)`` for an input of ``H x W``.
    """
    _check(height >= 1 and width >= 1, "resize", f"height and width must be >= 1, got {height} x {width}.")
    return A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0)


def letterbox(size: int, fill: int = PAD_FILL) -> Transform:
    """Scale the longest side to ``size`` keeping the aspect ratio, then pad bottom/right to ``size x size``.

    For an input of ``H x W`` with ``r = size / max(H, W)`` the image becomes ``round(H r) x round(W r)`` placed at
    the top-left corner, so boxes scale by ``(round(W r) / W, round(H r) / H)`` and are never shifted.

    Args:
        size: Side of the square output, in pixels.
        fill: Grey value of the padding (0..255).
    """
    _check(size >= 1, "letterbox", f"size must be >= 1, got {size}.")
    _check(0 <= fill <= 255, "letterbox", f"fill must be in 0..255, got {fill}.")
    return A.Sequential(
        [
            A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0),
            A.PadIfNeeded(
                min_height=size,
                min_width=size,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=fill,
                p=1.0,
            ),
        ],
        p=1.0,
    )


def hflip(p: float = 0.5) -> Transform:
    """Mirror left-right with probability ``p``: a box ``(x1, y1, x2, y2)`` becomes ``(W - x2, y1, W - x1, y2)``.

    (Exact up to float32 rounding: albumentations works on float32 coordinates normalised by the image size.)
    """
    _check_p("hflip", p)
    return A.HorizontalFlip(p=p)


def scale_jitter(scale_min: float = 0.75, scale_max: float = 1.25, p: float = 1.0, fill: int = PAD_FILL) -> Transform:
    """Random zoom about the image centre by a factor drawn from ``[scale_min, scale_max]``, canvas size kept.

    A zoom-in pushes boxes partly out of frame: they are clipped to the image, and dropped when less than
    ``min_visibility`` of their area stays visible. A zoom-out fills the uncovered canvas with ``fill``.

    Args:
        scale_min: Smallest zoom factor (> 0; < 1 zooms out).
        scale_max: Largest zoom factor (>= scale_min).
        p: Probability of applying the zoom.
        fill: Grey value of the canvas uncovered by a zoom-out (0..255).
    """
    _check(
        0.0 < scale_min <= scale_max, "scale_jitter", f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}."
    )
    _check_p("scale_jitter", p)
    _check(0 <= fill <= 255, "scale_jitter", f"fill must be in 0..255, got {fill}.")
    return A.Affine(
        scale=(scale_min, scale_max),
        keep_ratio=True,
        interpolation=cv2.INTER_LINEAR,
        border_mode=cv2.BORDER_CONSTANT,
        fill=fill,
        p=p,
    )


def color_jitter(
    brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.02, p: float = 0.8
) -> Transform:
    """Random brightness, contrast and saturation factors in ``[1 - v, 1 + v]`` and a hue shift in ``[-hue, hue]``
    (fraction of the hue circle), applied with probability ``p``. Photometric: boxes are unchanged."""
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        _check(value >= 0.0, "color_jitter", f"{name} must be >= 0, got {value}.")
    _check(0.0 <= hue <= 0.5, "color_jitter", f"hue must be in [0, 0.5], got {hue}.")
    _check_p("color_jitter", p)
    return A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p)


def bbox_safe_crop(height: int, width: int, erosion_rate: float = 0.0, p: float = 1.0) -> Transform:
    """Random crop that contains every box, resized to ``height x width`` (applied with probability ``p``).

    No box is ever cut (unless ``erosion_rate > 0``, which lets the crop eat up to that fraction of the box
    union); an image without boxes gets a plain random crop. With ``p < 1`` the unchanged images keep their size.

    Args:
        height: Output height in pixels.
        width: Output width in pixels.
        erosion_rate: Fraction of the box union the crop may cut away (0 keeps all boxes whole).
        p: Probability of cropping.
    """
    _check(height >= 1 and width >= 1, "bbox_safe_crop", f"height and width must be >= 1, got {height} x {width}.")
    _check(0.0 <= erosion_rate < 1.0, "bbox_safe_crop", f"erosion_rate must be in [0, 1), got {erosion_rate}.")
    _check_p("bbox_safe_crop", p)
    return A.RandomSizedBBoxSafeCrop(
        height=height, width=width, erosion_rate=erosion_rate, interpolation=cv2.INTER_LINEAR, p=p
    )


TRANSFORMS: dict[str, Callable[..., Transform]] = {
    "resize": resize,
    "letterbox": letterbox,
    "hflip": hflip,
    "scale_jitter": scale_jitter,
    "color_jitter": color_jitter,
    "bbox_safe_crop": bbox_safe_crop,
}

#: Steps whose geometry is a fixed function of the input size (``scale_of`` can describe them).
DETERMINISTIC_GEOMETRY = frozenset({"resize", "letterbox"})
#: Steps that change pixel values only.
PHOTOMETRIC = frozenset({"color_jitter"})


def list_transforms() -> list[str]:
    """Names of the registered steps, sorted."""
    return sorted(TRANSFORMS)


def _bind(name: str, params: Mapping[str, object]) -> dict[str, object]:
    """The full keyword arguments (defaults filled in) of step ``name``; errors name the step and valid keys."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform '{name}'; valid: {', '.join(list_transforms())}.")
    sig = inspect.signature(TRANSFORMS[name])
    try:
        bound = sig.bind(**dict(params))
    except TypeError as err:
        raise ValueError(
            f"transform '{name}': bad parameters {dict(params)!r} ({err}); accepted keys: {', '.join(sig.parameters)}."
        ) from None
    bound.apply_defaults()
    return dict(bound.arguments)


def scale_of(steps: Sequence[tuple[str, Mapping[str, object]]], orig_hw: tuple[int, int]) -> tuple[float, float]:
    """Per-axis factors of a pipeline with deterministic geometry: ``transformed_xy = orig_xy * (sx, sy)``.

    Args:
        steps: ``[(name, params), ...]`` as given to :func:`build_transforms`.
        orig_hw: ``(H, W)`` of the input image in pixels.

    Returns:
        ``(sx, sy)``; ``(1.0, 1.0)`` for a pipeline without geometric steps.

    Raises:
        ValueError: If a step is unknown or has random geometry (flip, zoom, crop): then no fixed factors exist.
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    sx = sy = 1.0
    for name, params in steps:
        args = _bind(name, params)
        if name in PHOTOMETRIC:
            continue
        if name == "resize":
            new_h, new_w = int(args["height"]), int(args["width"])
            sx, sy = sx * new_w / w, sy * new_h / h
            h, w = new_h, new_w
        elif name == "letterbox":
            size = int(args["size"])
            r = size / max(h, w)
            new_h, new_w = max(1, round(h * r)), max(1, round(w * r))  # the rounding of A.LongestMaxSize
            sx, sy = sx * new_w / w, sy * new_h / h
            h = w = size
        else:
            fixed = ", ".join(sorted(DETERMINISTIC_GEOMETRY | PHOTOMETRIC))
            raise ValueError(
                f"transform '{name}' has random geometry, so no fixed scale maps its output back to the original "
                f"image; a pipeline used for evaluation may only contain: {fixed}."
            )
    return sx, sy


class DetectionTransform:
    """An albumentations pipeline on ``(image, boxes_xyxy, labels)`` that keeps boxes valid and is reseeded per call.

    Args:
        steps: ``[(name, params), ...]``, names from :data:`TRANSFORMS`, applied in order.
        min_visibility: A box keeping less than this fraction of its area after a geometric step is dropped.
        seed: Pipeline seed, mixed with every call's ``sample_seed``.

    Raises:
        ValueError: On an unknown step name (the message lists the valid ones) or bad step parameters.
    """

    def __init__(
        self, steps: Sequence[tuple[str, Mapping[str, object]]], min_visibility: float = 0.3, seed: int = 0
    ) -> None:
        if not 0.0 <= min_visibility <= 1.0:
            raise ValueError(f"min_visibility must be in [0, 1], got {min_visibility}.")
        self.steps = [(str(name), dict(params)) for name, params in steps]
        self.min_visibility = float(min_visibility)
        self.seed = int(seed)
        built = []
        for name, params in self.steps:
            args = _bind(name, params)
            built.append(TRANSFORMS[name](**args))
        with warnings.catch_warnings():  # a photometric-only pipeline is fine: boxes simply pass through
            warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform to process it")
            self.compose = A.Compose(
                built,
                bbox_params=A.BboxParams(
                    format="pascal_voc",
                    label_fields=["labels"],
                    min_visibility=self.min_visibility,
                    clip=True,
                    filter_invalid_bboxes=True,
                ),
                seed=self.seed,
            )

    @property
    def deterministic_geometry(self) -> bool:
        """True when the geometry is a fixed function of the input size, i.e. :meth:`scale_of` is defined."""
        return all(name in DETERMINISTIC_GEOMETRY or name in PHOTOMETRIC for name, _ in self.steps)

    def scale_of(self, orig_hw: tuple[int, int]) -> tuple[float, float]:
        """``(sx, sy)`` of this pipeline for an input of ``orig_hw``; see :func:`scale_of`."""
        return scale_of(self.steps, orig_hw)

    def _reseed(self, sample_seed: int) -> None:
        seeds = np.random.SeedSequence([self.seed % 2**64, int(sample_seed) % 2**64]).generate_state(
            len(self.compose.transforms) + 1
        )
        self.compose.set_random_seed(int(seeds[0]))  # also seeds every step with seeds[0] ...
        for step, step_seed in zip(self.compose.transforms, seeds[1:]):
            step.set_random_seed(int(step_seed))  # ... so give each step its own stream

    def __call__(
        self, image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray, sample_seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Transform one sample.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            boxes_xyxy: ``(K, 4)`` float boxes in pixels of ``image``; parts outside the image are clipped first.
            labels: ``(K,)`` int labels, one per box.
            sample_seed: Seed of this sample (any int); equal seeds give equal outputs.

        Returns:
            ``image (H', W', 3) uint8 RGB``, ``boxes (K', 4) float32 xyxy`` inside ``[0, W'] x [0, H']`` with sides
            ``>= MIN_BOX_SIDE``, and ``labels (K',) int64`` of the surviving boxes, in their input order.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}.")
        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels.")
        boxes, labels = clip_boxes_xyxy(boxes, labels, image.shape[:2])
        if self.steps:
            self._reseed(sample_seed)
            out = self.compose(image=np.ascontiguousarray(image), bboxes=boxes, labels=labels)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            boxes, labels = clip_boxes_xyxy(boxes, labels, image.shape[:2])
        return np.ascontiguousarray(image), boxes, labels

    def __repr__(self) -> str:
        steps = ", ".join(f"{name}({', '.join(f'{k}={v!r}' for k, v in p.items())})" for name, p in self.steps)
        return f"DetectionTransform([{steps}], min_visibility={self.min_visibility}, seed={self.seed})"


def clip_boxes_xyxy(boxes: np.ndarray, labels: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image and drop those with a side below ``MIN_BOX_SIDE`` (NaN boxes are dropped too).

    Args:
        boxes: ``(K, 4)`` float xyxy boxes in pixels.
        labels: ``(K,)`` labels, filtered alongside.
        hw: ``(H, W)`` of the image in pixels.

    Returns:
        ``boxes (K', 4) float32`` inside ``[0, W] x [0, H]`` and their ``labels (K',)``, in input order.
    """
    h, w = hw
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], dtype=np.float32))
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
    return boxes[keep].astype(np.float32), labels[keep]


def build_transforms(
    steps: Sequence[tuple[str, Mapping[str, object]]], min_visibility: float = 0.3, seed: int = 0
) -> DetectionTransform:
    """Build the pipeline of ``steps`` (``[(name, params), ...]``); see :class:`DetectionTransform`."""
    return DetectionTransform(steps, min_visibility=min_visibility, seed=seed)
