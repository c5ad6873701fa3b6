"""The deterministic synthetic COCO-format detection set: the embedded default of detkd.

Eight shape categories on textured, cluttered backgrounds. The categories come in four pairs that share outline
and colour family and differ only in a fine detail (a disc and a ring, a square and a square with an inner cross,
a triangle and a triangle with a centre dot, a hexagon and a six-pointed star with shallow notches), and the
colour families overlap across pairs, so colour alone never decides the class: a detector has to resolve shape
and detail, which small objects make hard. That keeps a large teacher measurably ahead of a small student and
keeps both well below AP 1.0.

Per image: a smooth two-colour field with colour blotches and fine texture, translucent elongated blobs, lines
and arcs (clutter), then 0..6 objects (about 5 % of the images have none). An object's size (the diameter of
its circumscribed circle) is log-uniform between ~8 px and half the image side; it has a random rotation, a
mild aspect jitter, a jittered colour with a shading gradient and a little noise. Objects are drawn in order,
so later ones occlude earlier ones, and they may be cut by the image border. Before anything is drawn, each
object's visible mask is computed from the drawing order and the border; objects less than
``MIN_VISIBLE_FRACTION`` visible, or whose visible box is narrower than ``MIN_VISIBLE_SIDE`` px, are removed
from the image (not drawn), so every drawn object is annotated and every annotation is clearly visible.

Annotations: ``bbox`` is the tight ``xywh`` box of the object's *visible* pixels (after occlusion and border
truncation), in whole pixels stored as floats; ``area`` is the visible pixel count (not the box area);
``iscrowd`` is 0; there is no ``segmentation``. Images are ``images/<split>/000001.png`` (RGB content, written by
``cv2.imwrite``), annotations ``annotations/<split>.json``.

Determinism: image ``i`` of a split is drawn from its own ``numpy.random.Generator`` seeded with
``SeedSequence([seed, crc32(split), i])``, so splits are disjoint streams, an image does not depend on any
other, and the same arguments give byte-identical json and PNG files (on the same numpy/OpenCV build).
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import cv2
import numpy as np
from tqdm import tqdm

from detkd.files import atomic_write

__all__ = [
    "CATEGORIES",
    "GENERATOR_VERSION",
    "SyntheticSample",
    "render_sample",
    "generate_split",
    "generate_synthetic_coco",
    "ensure_synthetic",
    "split_stats",
    "PRESETS",
    "preset_knobs",
]

GENERATOR_VERSION = 1
"""Bumped whenever the drawing changes, so ``ensure_synthetic`` regenerates stale sets."""

STAMP_FILE = "generator.json"
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_SIDE = 2
MAX_OBJECTS = 6
EMPTY_PROBABILITY = 0.05
MIN_IMAGE_SIZE = 16
DEFAULT_MIN_OBJECT_SIZE = 8.0
DEFAULT_CLUTTER = 1.0

PRESETS: dict[str, dict[str, float]] = {
    # the embedded default (make_synthetic.py with no knobs): objects from 8 px, full clutter; hard for a CPU
    # teacher trained from scratch (benchmarks/results/notes.md)
    "default": {"min_object_size": DEFAULT_MIN_OBJECT_SIZE, "clutter": DEFAULT_CLUTTER},
    # the accuracy benchmark's setting (configs/bench/_base_/data.yaml)
    "bench": {"min_object_size": 16.0, "clutter": 0.5},
    # the quickstart's setting (configs/_base_/quickstart_data.yaml, 96 px images): objects from a quarter of the
    # image side, little clutter, so a teacher trained for a few CPU minutes is already good
    "quickstart": {"min_object_size": 24.0, "clutter": 0.25},
}
"""Named settings of the difficulty knobs (``min_object_size``, ``clutter``); README "Quickstart" and "Results"
give the teacher AP each one yields."""

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "disc", "supercategory": "round"},
    {"id": 2, "name": "ring", "supercategory": "round"},
    {"id": 3, "name": "square", "supercategory": "box"},
    {"id": 4, "name": "crossed_square", "supercategory": "box"},
    {"id": 5, "name": "triangle", "supercategory": "triangle"},
    {"id": 6, "name": "dotted_triangle", "supercategory": "triangle"},
    {"id": 7, "name": "hexagon", "supercategory": "polygon"},
    {"id": 8, "name": "star", "supercategory": "polygon"},
]

# Hue centres (degrees) of the colour families; each category draws from two families shared with another pair,
# and with probability _ANY_HUE from the whole circle.
_HUES = {"red": 2.0, "yellow": 50.0, "green": 125.0, "blue": 215.0, "purple": 285.0}
_CATEGORY_FAMILIES = {
    1: ("red", "blue"),
    2: ("red", "blue"),
    3: ("blue", "green"),
    4: ("blue", "green"),
    5: ("green", "yellow"),
    6: ("green", "yellow"),
    7: ("yellow", "purple"),
    8: ("yellow", "purple"),
}
_HUE_JITTER = 18.0
_ANY_HUE = 0.2
_SHIFT = 4  # cv2 sub-pixel bits: coordinates are passed as round(x * 16)
_SCALE = float(1 << _SHIFT)


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image with its annotations (``N`` objects, image side ``S``).

    Attributes:
        image: ``(S, S, 3)`` uint8 RGB image.
        background: ``(S, S, 3)`` uint8 RGB background (clutter included) before the objects were drawn; equal to
            ``image`` wherever no object was drawn (a debug aid for tests).
        boxes_xywh: ``(N, 4)`` float64 tight boxes of the visible masks, ``x, y, w, h`` in pixels.
        category_ids: ``(N,)`` int64 ids from ``CATEGORIES``, in drawing order.
        areas: ``(N,)`` int64 visible pixel counts.
        visible_masks: ``(N, S, S)`` bool visible pixels of each object (after occlusion and border truncation).
    """

    image: np.ndarray
    background: np.ndarray
    boxes_xywh: np.ndarray
    category_ids: np.ndarray
    areas: np.ndarray
    visible_masks: np.ndarray


@dataclass
class _Shape:
    """An object rendered into its own patch whose top-left pixel is ``(x0, y0)`` in image coordinates."""

    cat_id: int
    x0: int
    y0: int
    body_alpha: np.ndarray  # (h, w) float32 in [0, 1], holes removed
    body_rgb: np.ndarray  # (h, w, 3) float32
    detail_alpha: Optional[np.ndarray]
    detail_rgb: Optional[np.ndarray]
    mask: np.ndarray  # (h, w) bool, the object's pixels (alpha >= 0.5)


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _split_code(split), int(index)]))


def _hsv_to_rgb(hue_deg: float, sat: float, val: float) -> np.ndarray:
    """HSV (hue in degrees, saturation and value in [0, 1]) -> RGB float in [0, 255]."""
    h = (hue_deg % 360.0) / 60.0
    c = val * sat
    x = c * (1.0 - abs(h % 2.0 - 1.0))
    rgb = [(c, x, 0.0), (x, c, 0.0), (0.0, c, x), (0.0, x, c), (x, 0.0, c), (c, 0.0, x)][int(h) % 6]
    return (np.asarray(rgb) + (val - c)) * 255.0


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _pts(xy: np.ndarray) -> np.ndarray:
    """Float pixel coordinates ``(K, 2)`` -> cv2 fixed-point int32 ``(K, 1, 2)`` for ``shift=_SHIFT``."""
    return np.round(np.asarray(xy, dtype=np.float64) * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _scaled_count(n: int, clutter: float) -> int:
    """``n`` clutter items scaled by ``clutter`` (1.0 keeps ``n``, so the default draws stay unchanged)."""
    return n if clutter == 1.0 else int(round(n * clutter))


def _background(rng: np.random.Generator, size: int, clutter: float = DEFAULT_CLUTTER) -> np.ndarray:
    """A smooth two-colour field + colour blotches + fine texture + translucent blobs, lines and arcs (RGB uint8).

    ``clutter`` scales the number of blobs, lines and arcs (0 gives none).
    """
    s = (size, size)
    grid = int(rng.integers(2, 6))
    field = cv2.resize(rng.random((grid, grid), dtype=np.float32), s, interpolation=cv2.INTER_CUBIC)
    c0, c1 = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    img = c0 + (c1 - c0) * np.clip(field, 0.0, 1.0)[..., None]
    blotch = int(rng.integers(3, 9))
    img += cv2.resize(rng.normal(0.0, 25.0, (blotch, blotch, 3)).astype(np.float32), s, interpolation=cv2.INTER_LINEAR)
    fine = max(2, size // int(rng.integers(1, 4)))
    sigma = rng.uniform(3.0, 12.0)
    img += cv2.resize(rng.normal(0.0, sigma, (fine, fine, 3)).astype(np.float32), s, interpolation=cv2.INTER_LINEAR)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)

    lo, hi = -0.2 * size, 1.2 * size
    overlay = img.copy()
    for _ in range(_scaled_count(int(rng.integers(0, 5)), clutter)):  # elongated translucent blobs
        centre = _pts(rng.uniform(lo, hi, 2)).reshape(2)
        major = rng.uniform(0.08, 0.5) * size
        axes = _pts([major, major * rng.uniform(0.1, 0.33)]).reshape(2)
        angle = float(rng.uniform(0.0, 180.0))
        cv2.ellipse(overlay, tuple(centre), tuple(axes), angle, 0.0, 360.0, _color(rng), -1, cv2.LINE_AA, _SHIFT)
    alpha = float(rng.uniform(0.35, 0.85))
    img = cv2.addWeighted(overlay, alpha, img, 1.0 - alpha, 0.0)
    for _ in range(_scaled_count(int(rng.integers(2, 9)), clutter)):  # lines
        p = _pts(rng.uniform(lo, hi, 4)).reshape(4)
        thickness = int(rng.integers(1, 3))
        cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), _color(rng), thickness, cv2.LINE_AA, _SHIFT)
    for _ in range(_scaled_count(int(rng.integers(0, 4)), clutter)):  # arcs
        centre = _pts(rng.uniform(0.0, size, 2)).reshape(2)
        axes = _pts(rng.uniform(0.05, 0.4, 2) * size).reshape(2)
        start = float(rng.uniform(0.0, 360.0))
        sweep = float(rng.uniform(40.0, 200.0))
        thickness = int(rng.integers(1, 3))
        angle = float(rng.uniform(0.0, 180.0))
        color = _color(rng)
        cv2.ellipse(img, tuple(centre), tuple(axes), angle, start, start + sweep, color, thickness, cv2.LINE_AA, _SHIFT)
    return img


def _regular(k: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    """The ``k`` vertices ``(k, 2)`` of a regular polygon with circumradius ``radius`` centred at the origin."""
    t = phase + 2.0 * math.pi * np.arange(k) / k
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _outline(cat_id: int, rng: np.random.Generator, radius: float) -> tuple[np.ndarray, list, list]:
    """The shape of a category in unit coordinates (circumradius 1, centred at the origin).

    Returns:
        ``(body, holes, details)``: the body polygon ``(K, 2)``, polygons cut out of the body, and polygons drawn
        on top in the detail colour. ``radius`` (px) only keeps fine details at least about one pixel thick.
    """
    px = 1.0 / radius  # one pixel in unit coordinates
    circle_k = 48
    if cat_id in (1, 2):
        body = _regular(circle_k)
        holes = [_regular(circle_k, rng.uniform(0.45, 0.62))] if cat_id == 2 else []
        return body, holes, []
    if cat_id in (3, 4):
        h = 1.0 / math.sqrt(2.0)
        body = _rect(-h, -h, h, h)
        details = []
        if cat_id == 4:
            half_len, half_w = 0.72 * h, max(rng.uniform(0.1, 0.16) * h, 0.55 * px)
            details = [_rect(-half_len, -half_w, half_len, half_w), _rect(-half_w, -half_len, half_w, half_len)]
        return body, [], details
    if cat_id in (5, 6):
        body = _regular(3)
        details = [_regular(circle_k // 2, max(rng.uniform(0.18, 0.26), 0.7 * px))] if cat_id == 6 else []
        return body, [], details
    if cat_id == 7:
        return _regular(6), [], []
    if cat_id == 8:
        inner = rng.uniform(0.62, 0.74)
        t = -math.pi / 2 + math.pi * np.arange(12) / 6
        r = np.where(np.arange(12) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1), [], []
    raise ValueError(f"unknown category id {cat_id}; valid: {[c['id'] for c in CATEGORIES]}")


def _fill(shape_hw: tuple[int, int], polygons: list) -> np.ndarray:
    """Anti-aliased union of ``polygons`` (patch pixel coordinates) as float32 alpha ``(h, w)`` in [0, 1]."""
    canvas = np.zeros(shape_hw, dtype=np.uint8)
    for poly in polygons:  # one call each: a multi-contour fillPoly would cut overlaps out (even-odd)
        cv2.fillPoly(canvas, [_pts(poly)], 255, cv2.LINE_AA, _SHIFT)
    return canvas.astype(np.float32) / 255.0


def _make_shape(rng: np.random.Generator, size: int, min_object_size: float = DEFAULT_MIN_OBJECT_SIZE) -> _Shape:
    """Draw one object's category, geometry and colours and render it into its own patch."""
    cat_id = int(rng.integers(1, len(CATEGORIES) + 1))
    lo, hi = min(float(min_object_size), size / 4.0), size / 2.0
    radius = 0.5 * math.exp(rng.uniform(math.log(lo), math.log(hi)))
    cx, cy = rng.uniform(-0.1 * 2 * radius, size + 0.1 * 2 * radius, 2)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    body, holes, details = _outline(cat_id, rng, radius)

    cos, sin = math.cos(angle), math.sin(angle)
    transform = radius * np.array([[aspect * cos, -sin / aspect], [aspect * sin, cos / aspect]])
    centre = np.array([cx, cy])

    def place(poly: np.ndarray) -> np.ndarray:
        return poly @ transform.T + centre

    body_xy = place(body)
    x0, y0 = np.floor(body_xy.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(body_xy.max(axis=0)).astype(int) + 2
    origin = np.array([x0, y0], dtype=np.float64)
    hw = (int(y1 - y0), int(x1 - x0))

    body_alpha = _fill(hw, [body_xy - origin])
    if holes:
        body_alpha = np.clip(body_alpha - _fill(hw, [place(p) - origin for p in holes]), 0.0, 1.0)
    detail_alpha = _fill(hw, [place(p) - origin for p in details]) if details else None

    family = _CATEGORY_FAMILIES[cat_id][int(rng.integers(0, 2))]
    hue = rng.uniform(0.0, 360.0) if rng.random() < _ANY_HUE else _HUES[family] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)
    rgb = _hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)).astype(np.float32)
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    direction = rng.normal(size=2)
    direction /= max(float(np.linalg.norm(direction)), 1e-6)
    gradient = rng.uniform(0.0, 30.0) * ((xx - hw[1] / 2) * direction[0] + (yy - hw[0] / 2) * direction[1]) / radius
    noise_sigma = rng.uniform(1.0, 5.0)
    body_rgb = rgb + 0.5 * gradient[..., None] + rng.normal(0.0, noise_sigma, (*hw, 3)).astype(np.float32)

    detail_rgb = None
    if detail_alpha is not None:  # darker or lighter than the body
        target = 0.0 if rng.random() < 0.5 else 255.0
        mix = rng.uniform(0.55, 0.8)
        detail = (1.0 - mix) * rgb + mix * target
        detail_rgb = detail + rng.normal(0.0, noise_sigma, (*hw, 3)).astype(np.float32)

    coverage = body_alpha if detail_alpha is None else np.maximum(body_alpha, detail_alpha)
    return _Shape(cat_id, int(x0), int(y0), body_alpha, body_rgb, detail_alpha, detail_rgb, coverage >= 0.5)


def _clip(shape: _Shape, size: int) -> Optional[tuple[slice, slice, slice, slice]]:
    """(image rows, image cols, patch rows, patch cols) of the part of ``shape`` inside the image, or None."""
    h, w = shape.mask.shape
    ix0, iy0 = max(shape.x0, 0), max(shape.y0, 0)
    ix1, iy1 = min(shape.x0 + w, size), min(shape.y0 + h, size)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    return (
        slice(iy0, iy1),
        slice(ix0, ix1),
        slice(iy0 - shape.y0, iy1 - shape.y0),
        slice(ix0 - shape.x0, ix1 - shape.x0),
    )


def _owners(shapes: list[_Shape], size: int) -> np.ndarray:
    """``(S, S)`` int map of the index of the topmost shape at each pixel (-1: background)."""
    owner = np.full((size, size), -1, dtype=np.int32)
    for k, shape in enumerate(shapes):
        region = _clip(shape, size)
        if region is not None:
            rows, cols, prows, pcols = region
            owner[rows, cols][shape.mask[prows, pcols]] = k
    return owner


def _visible_ok(shapes: list[_Shape], owner: np.ndarray) -> list[bool]:
    counts = np.bincount(owner.ravel() + 1, minlength=len(shapes) + 1)[1:]
    keep = []
    for k, shape in enumerate(shapes):
        full = int(shape.mask.sum())
        ok = full > 0 and counts[k] >= MIN_VISIBLE_FRACTION * full
        if ok:
            ys, xs = np.nonzero(owner == k)
            ok = xs.max() - xs.min() + 1 >= MIN_VISIBLE_SIDE and ys.max() - ys.min() + 1 >= MIN_VISIBLE_SIDE
        keep.append(bool(ok))
    return keep


def render_sample(
    seed: int,
    split: str,
    index: int,
    size: int,
    *,
    min_object_size: float = DEFAULT_MIN_OBJECT_SIZE,
    clutter: float = DEFAULT_CLUTTER,
) -> SyntheticSample:
    """Render image ``index`` of ``split`` with its annotations, from its own random stream.

    Args:
        seed: Dataset seed.
        split: Split name (``"train"``, ``"val"``, ...); different names give disjoint streams.
        index: 0-based image index within the split.
        size: Image side in pixels (square images), at least 16.
        min_object_size: Smallest object diameter in px (capped at a quarter of ``size``); sizes are log-uniform
            from it to half the image side. Larger values make an easier set.
        clutter: Scale of the number of background blobs, lines and arcs (1.0 default, 0 none).

    Returns:
        The image, its background and per-object visible masks, boxes, category ids and areas.
    """
    _check_args(size, min_object_size, clutter)
    rng = _rng(seed, split, index)
    background = _background(rng, size, clutter)
    n_objects = 0 if rng.random() < EMPTY_PROBABILITY else int(rng.integers(1, MAX_OBJECTS + 1))
    shapes = [_make_shape(rng, size, min_object_size) for _ in range(n_objects)]

    # Removing a barely visible object only uncovers the objects below it, so one removal pass suffices.
    shapes = [s for s, ok in zip(shapes, _visible_ok(shapes, _owners(shapes, size))) if ok]
    owner = _owners(shapes, size)

    canvas = background.astype(np.float32)
    for shape in shapes:
        rows, cols, prows, pcols = _clip(shape, size)  # kept shapes are inside the image
        layers = [(shape.body_alpha, shape.body_rgb), (shape.detail_alpha, shape.detail_rgb)]
        for alpha, rgb in layers:
            if alpha is None:
                continue
            a = alpha[prows, pcols, None]
            canvas[rows, cols] = canvas[rows, cols] * (1.0 - a) + rgb[prows, pcols] * a
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

    visible = owner[None] == np.arange(len(shapes))[:, None, None]
    boxes = np.zeros((len(shapes), 4), dtype=np.float64)
    for k in range(len(shapes)):
        ys, xs = np.nonzero(visible[k])
        boxes[k] = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    return SyntheticSample(
        image=image,
        background=background,
        boxes_xywh=boxes,
        category_ids=np.array([s.cat_id for s in shapes], dtype=np.int64),
        areas=visible.sum(axis=(1, 2)).astype(np.int64),
        visible_masks=visible,
    )


def preset_knobs(name: str) -> dict[str, float]:
    """The knobs of the preset ``name`` (a copy), e.g. ``{"min_object_size": 16.0, "clutter": 0.5}``.

    Raises:
        ValueError: unknown preset (the message lists the valid names).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset '{name}'; valid: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def _check_args(size: int, min_object_size: float, clutter: float) -> None:
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"synthetic image size must be >= {MIN_IMAGE_SIZE} px, got {size}")
    if not min_object_size >= 2:
        raise ValueError(f"synthetic min_object_size must be >= 2 px, got {min_object_size}")
    if not clutter >= 0:
        raise ValueError(f"synthetic clutter must be >= 0, got {clutter}")


def _split_paths(out_dir: Union[str, os.PathLike], split: str) -> dict[str, str]:
    out = Path(out_dir)
    return {"ann_file": str(out / "annotations" / f"{split}.json"), "img_dir": str(out / "images" / split)}


def _write_json(path: Path, obj: Any) -> None:
    """Write compact, key-sorted json atomically (:func:`detkd.files.atomic_write`)."""

    def write(f) -> None:
        json.dump(obj, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")

    atomic_write(path, write, binary=False)


def generate_split(
    out_dir: Union[str, os.PathLike],
    split: str,
    num_images: int,
    size: int,
    seed: int,
    show_progress: bool = True,
    *,
    min_object_size: float = DEFAULT_MIN_OBJECT_SIZE,
    clutter: float = DEFAULT_CLUTTER,
) -> str:
    """Write ``num_images`` images to ``out_dir/images/<split>/`` and their COCO json to ``annotations/<split>.json``.

    Args:
        out_dir: Dataset root.
        split: Split name; it selects the random stream and the folder.
        num_images: Number of images (0 gives a valid json with no images).
        size: Image side in pixels (>= 16).
        seed: Dataset seed.
        show_progress: Show a tqdm progress bar.
        min_object_size: Smallest object diameter in px (see ``render_sample``).
        clutter: Scale of the background clutter (see ``render_sample``).

    Returns:
        The path of the annotation json.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    paths = _split_paths(out_dir, split)
    img_dir, ann_file = Path(paths["img_dir"]), Path(paths["ann_file"])
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in tqdm(range(num_images), desc=f"synthetic {split}", unit="img", disable=not show_progress):
        sample = render_sample(seed, split, index, size, min_object_size=min_object_size, clutter=clutter)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        if not cv2.imwrite(str(img_dir / file_name), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {img_dir / file_name}")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for box, cat_id, area in zip(sample.boxes_xywh, sample.category_ids, sample.areas):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cat_id),
                    "bbox": [float(v) for v in box],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    # Images of an earlier, larger generation in the same folder would otherwise linger.
    for stale in img_dir.glob("*.png"):
        if re.fullmatch(r"\d{6,}\.png", stale.name) and int(stale.stem) > num_images:
            stale.unlink()

    info = {
        "description": "detkd synthetic shapes (deterministic)",
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "seed": int(seed),
        "size": int(size),
        "num_images": int(num_images),
        "min_object_size": float(min_object_size),
        "clutter": float(clutter),
        "bbox": "tight xywh box of the visible pixels",
        "area": "visible pixel count",
    }
    dataset = {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}
    _write_json(ann_file, dataset)
    return str(ann_file)


def _stamp(num_train: int, num_val: int, size: int, seed: int, min_object_size: float, clutter: float) -> dict:
    stamp: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "size": int(size),
        "seed": int(seed),
    }
    # only non-default knobs are recorded, so sets made before the knobs existed stay valid
    if min_object_size != DEFAULT_MIN_OBJECT_SIZE:
        stamp["min_object_size"] = float(min_object_size)
    if clutter != DEFAULT_CLUTTER:
        stamp["clutter"] = float(clutter)
    return stamp


def generate_synthetic_coco(
    out_dir: Union[str, os.PathLike],
    num_train: int,
    num_val: int,
    size: int = 128,
    seed: int = 0,
    show_progress: bool = True,
    *,
    min_object_size: float = DEFAULT_MIN_OBJECT_SIZE,
    clutter: float = DEFAULT_CLUTTER,
) -> dict[str, dict[str, str]]:
    """(Re)generate both splits under ``out_dir`` and write the stamp file last.

    Args:
        out_dir: Dataset root; ``images/{train,val}/`` and ``annotations/{train,val}.json`` are written there.
        num_train: Number of training images.
        num_val: Number of validation images.
        size: Image side in pixels (>= 16).
        seed: Dataset seed.
        show_progress: Show tqdm progress bars.
        min_object_size: Smallest object diameter in px (see ``render_sample``).
        clutter: Scale of the background clutter (see ``render_sample``).

    Returns:
        ``{"train": {"ann_file": ..., "img_dir": ...}, "val": {...}}``.
    """
    _check_args(size, min_object_size, clutter)
    knobs = {"min_object_size": min_object_size, "clutter": clutter}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / STAMP_FILE
    if stamp.exists():  # an interrupted run must not leave a stamp that claims a complete set
        stamp.unlink()
    generate_split(out, "train", num_train, size, seed, show_progress=show_progress, **knobs)
    generate_split(out, "val", num_val, size, seed, show_progress=show_progress, **knobs)
    _write_json(stamp, _stamp(num_train, num_val, size, seed, **knobs))
    return {split: _split_paths(out, split) for split in ("train", "val")}


def ensure_synthetic(
    out_dir: Union[str, os.PathLike],
    num_train: int,
    num_val: int,
    size: int = 128,
    seed: int = 0,
    show_progress: bool = True,
    *,
    min_object_size: float = DEFAULT_MIN_OBJECT_SIZE,
    clutter: float = DEFAULT_CLUTTER,
) -> dict[str, dict[str, str]]:
    """Generate the set only when ``out_dir`` lacks it or holds one made with other arguments.

    The arguments (and ``GENERATOR_VERSION``) are kept in ``out_dir/generator.json``, written after everything
    else, so a set whose generation was interrupted is regenerated.

    Args:
        out_dir: Dataset root.
        num_train: Number of training images.
        num_val: Number of validation images.
        size: Image side in pixels (>= 16).
        seed: Dataset seed.
        show_progress: Show tqdm progress bars when generating.
        min_object_size: Smallest object diameter in px (see ``render_sample``).
        clutter: Scale of the background clutter (see ``render_sample``).

    Returns:
        The same dict as ``generate_synthetic_coco``.
    """
    paths = {split: _split_paths(out_dir, split) for split in ("train", "val")}
    try:
        with open(Path(out_dir) / STAMP_FILE, encoding="utf-8") as f:
            current = json.load(f)
    except (OSError, ValueError):
        current = None
    complete = all(Path(p["ann_file"]).is_file() and Path(p["img_dir"]).is_dir() for p in paths.values())
    knobs = {"min_object_size": min_object_size, "clutter": clutter}
    if complete and current == _stamp(num_train, num_val, size, seed, **knobs):
        return paths
    return generate_synthetic_coco(
        out_dir, num_train, num_val, size=size, seed=seed, show_progress=show_progress, **knobs
    )


def split_stats(ann_file: Union[str, os.PathLike]) -> dict[str, int]:
    """Counts of a COCO json: ``{"images": ..., "annotations": ..., "empty_images": ...}``."""
    with open(ann_file, encoding="utf-8") as f:
        data = json.load(f)
    used = {a["image_id"] for a in data["annotations"]}
    return {
        "images": len(data["images"]),
        "annotations": len(data["annotations"]),
        "empty_images": sum(1 for im in data["images"] if im["id"] not in used),
    }
