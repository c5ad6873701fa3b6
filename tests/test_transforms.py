"""Box-safe albumentations pipelines: geometry by hand, determinism, visibility filtering, registry errors."""

from __future__ import annotations

import pickle
import typing

import numpy as np
import pytest

from detkd.data.transforms import (
    PAD_FILL,
    TRANSFORMS,
    build_transforms,
    list_transforms,
    scale_of,
)

H, W = 48, 80


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# boxes touching every border, the whole image, a 1 px box in the corner, one inside
BORDER_BOXES = np.array(
    [[0, 0, 10, 10], [70, 38, 80, 48], [0, 0, 80, 48], [30, 0, 50, 48], [79, 47, 80, 48], [20, 15, 45, 30]],
    dtype=np.float32,
)
BORDER_LABELS = np.arange(1, len(BORDER_BOXES) + 1, dtype=np.int64)

PIPELINES = {
    "resize": [("resize", {"height": 40, "width": 56})],
    "letterbox": [("letterbox", {"size": 64})],
    "hflip": [("hflip", {"p": 0.5})],
    "scale_jitter": [("scale_jitter", {"scale_min": 0.5, "scale_max": 1.8})],
    "color_jitter": [("color_jitter", {})],
    "bbox_safe_crop": [("bbox_safe_crop", {"height": 40, "width": 40})],
    "train": [
        ("scale_jitter", {}),
        ("hflip", {}),
        ("color_jitter", {}),
        ("bbox_safe_crop", {"height": 60, "width": 60, "p": 0.5}),
        ("letterbox", {"size": 64}),
    ],
}


def test_registry_lists_every_step_with_simple_annotated_parameters():
    assert list_transforms() == sorted(TRANSFORMS)
    assert {"resize", "letterbox", "hflip", "scale_jitter", "color_jitter"} <= set(TRANSFORMS)
    for name, builder in TRANSFORMS.items():
        hints = typing.get_type_hints(builder)
        for param in typing.get_type_hints(builder).keys() - {"return"}:
            assert hints[param] in (int, float, bool, str), f"{name}.{param} has annotation {hints[param]}"
    assert set(PIPELINES) - {"train"} == set(TRANSFORMS)  # every registered step is exercised below


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_boxes_always_end_inside_the_image(pipeline):
    transform = build_transforms(PIPELINES[pipeline], min_visibility=0.3, seed=1)
    image = _image()
    survivors = 0
    for sample_seed in range(60):
        out_image, boxes, labels = transform(image, BORDER_BOXES, BORDER_LABELS, sample_seed)
        oh, ow = out_image.shape[:2]
        assert out_image.dtype == np.uint8 and out_image.shape[2] == 3
        assert boxes.dtype == np.float32 and labels.dtype == np.int64 and len(boxes) == len(labels)
        assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= ow) and np.all(boxes[:, [1, 3]] <= oh)
        assert np.all(boxes[:, 2] - boxes[:, 0] >= 1) and np.all(boxes[:, 3] - boxes[:, 1] >= 1)
        # survivors keep their labels, in input order
        assert np.all(np.diff(labels) > 0) and set(labels.tolist()) <= set(BORDER_LABELS.tolist())
        survivors += len(labels)
    assert survivors > 60  # the whole-image box alone survives most samples


@pytest.mark.parametrize("pipeline", ["resize", "letterbox", "hflip", "color_jitter", "bbox_safe_crop"])
def test_steps_that_cannot_cut_boxes_keep_all_of_them(pipeline):
    transform = build_transforms(PIPELINES[pipeline], seed=0)
    boxes = BORDER_BOXES[:4]  # all at least 10 px: no step shrinks them below 1 px
    for sample_seed in range(20):
        _, _, labels = transform(_image(), boxes, BORDER_LABELS[:4], sample_seed)
        assert labels.tolist() == [1, 2, 3, 4]


def test_letterbox_scales_a_known_box_exactly_and_scale_of_matches():
    # 80 x 48 -> longest side 64: r = 0.8, height round(38.4) = 38, so sy = 38 / 48 (not 0.8), padded to 64 x 64
    transform = build_transforms([("letterbox", {"size": 64})])
    image = _image()
    out, boxes, labels = transform(image, np.array([[10, 12, 50, 36]], np.float32), np.array([5]), 0)
    sx, sy = scale_of([("letterbox", {"size": 64})], (H, W))
    assert (sx, sy) == (0.8, 38 / 48) == transform.scale_of((H, W))
    np.testing.assert_allclose(boxes, [[8.0, 12 * 38 / 48, 40.0, 36 * 38 / 48]], rtol=0, atol=1e-4)
    assert labels.tolist() == [5]
    assert out.shape == (64, 64, 3)
    assert np.all(out[38:] == PAD_FILL) and not np.all(out[:38] == PAD_FILL)  # bottom padding only
    assert transform.deterministic_geometry


def test_scale_of_chains_resize_and_letterbox_and_ignores_photometric_steps():
    steps = [("resize", {"height": 30, "width": 100}), ("color_jitter", {"p": 1.0}), ("letterbox", {"size": 50})]
    sx, sy = scale_of(steps, (H, W))
    # resize: (100/80, 30/48); letterbox of 100 x 30 to 50: r = 0.5 -> 50 x 15 exactly
    assert sx == pytest.approx(100 / 80 * 0.5) and sy == pytest.approx(30 / 48 * 0.5)
    transform = build_transforms(steps)
    box = np.array([[8, 16, 40, 32]], np.float32)
    out, boxes, _ = transform(_image(), box, np.array([1]), 3)
    assert out.shape == (50, 50, 3)
    np.testing.assert_allclose(boxes, box * np.array([sx, sy, sx, sy], np.float32), atol=1e-4)
    assert scale_of([], (H, W)) == (1.0, 1.0)


@pytest.mark.parametrize("step", ["hflip", "scale_jitter", "bbox_safe_crop"])
def test_scale_of_refuses_random_geometry_naming_the_step(step):
    steps = [("resize", {"height": 32, "width": 32}), PIPELINES[step][0]]
    with pytest.raises(ValueError, match=f"'{step}' has random geometry"):
        scale_of(steps, (H, W))
    assert not build_transforms(steps).deterministic_geometry


def test_hflip_maps_x1_to_width_minus_x2_exactly():
    transform = build_transforms([("hflip", {"p": 1.0})])
    image = _image()
    boxes = np.array([[10, 5, 30, 20], [0, 0, 80, 48], [60.5, 1.25, 79, 2.5]], np.float32)
    out, flipped, labels = transform(image, boxes, np.array([1, 2, 3]), 7)
    expected = np.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], axis=1)
    # exact where x / W is a dyadic fraction; otherwise up to albumentations' float32 normalised coordinates
    np.testing.assert_array_equal(flipped[:2], expected[:2])
    np.testing.assert_allclose(flipped[2], expected[2], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out, image[:, ::-1])
    assert labels.tolist() == [1, 2, 3]


def _run(transform, sample_seed: int):
    return transform(_image(), BORDER_BOXES, BORDER_LABELS, sample_seed)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_same_sample_seed_same_output_regardless_of_call_order_or_copy():
    steps = PIPELINES["train"]
    first = build_transforms(steps, seed=5)
    reference = {s: _run(first, s) for s in (3, 11, 12)}
    other = build_transforms(steps, seed=5)  # another worker
    for s in (12, 3, 3, 11):  # another order, repeats
        assert _same(_run(other, s), reference[s])
    copy = pickle.loads(pickle.dumps(first))  # what a spawned DataLoader worker receives
    assert _same(_run(copy, 11), reference[11])
    # different sample seeds, or a different pipeline seed, give different augmentations
    assert not any(_same(_run(first, s), reference[3]) for s in range(20, 30))
    assert not _same(_run(build_transforms(steps, seed=6), 3), reference[3])


def test_steps_draw_independent_random_numbers():
    """Two steps with the same ``p`` must not fire together every time (albumentations seeds them identically)."""
    transform = build_transforms([("hflip", {"p": 0.5}), ("color_jitter", {"p": 0.5, "brightness": 0.5})])
    image = _image()
    flips, jitters = [], []
    for s in range(100):
        out, box, _ = transform(image, np.array([[0, 0, 10, 10]], np.float32), np.array([1]), s)
        flipped = bool(box[0, 0] == W - 10)  # the flip is read from the box, the jitter from the pixels
        flips.append(flipped)
        jitters.append(not np.array_equal(out, image[:, ::-1] if flipped else image))
    flips, jitters = np.array(flips), np.array(jitters)
    assert 30 <= flips.sum() <= 70 and 30 <= jitters.sum() <= 70
    assert 0 < (flips & jitters).sum() < flips.sum()  # sometimes one fires without the other


def test_scale_jitter_drops_a_box_mostly_pushed_out_of_frame():
    # zoom x2 about the centre (32, 32) of a 64 x 64 image: x -> 2x - 32
    transform = build_transforms([("scale_jitter", {"scale_min": 2.0, "scale_max": 2.0})], min_visibility=0.3)
    boxes = np.array(
        [
            [0, 0, 20, 20],  # -> [-32, -32, 8, 8]: 8 x 8 of 40 x 40 visible (4 %): dropped
            [24, 24, 40, 40],  # -> [16, 16, 48, 48]: fully visible
            [0, 24, 24, 40],  # -> [-32, 16, 16, 48]: 1/3 visible: kept, clipped
        ],
        np.float32,
    )
    image = _image(64, 64)
    _, out, labels = transform(image, boxes, np.array([1, 2, 3]), 0)
    assert labels.tolist() == [2, 3]
    np.testing.assert_allclose(out, [[16, 16, 48, 48], [0, 16, 16, 48]], atol=1e-3)
    strict = build_transforms([("scale_jitter", {"scale_min": 2.0, "scale_max": 2.0})], min_visibility=0.5)
    assert strict(image, boxes, np.array([1, 2, 3]), 0)[2].tolist() == [2]
    # zoom out x0.5: the whole-image box shrinks to the centre, the uncovered canvas is grey
    zoom_out = build_transforms([("scale_jitter", {"scale_min": 0.5, "scale_max": 0.5})])
    out_image, out, _ = zoom_out(image, np.array([[0, 0, 64, 64]], np.float32), np.array([1]), 0)
    np.testing.assert_allclose(out, [[16, 16, 48, 48]], atol=1e-3)
    assert np.all(out_image[:15] == PAD_FILL) and np.all(out_image[:, 49:] == PAD_FILL)


def test_input_boxes_are_clipped_first_and_outside_boxes_dropped():
    transform = build_transforms([("color_jitter", {"p": 0.0})])
    boxes = np.array([[-5, -5, 10, 10], [90, 0, 100, 10], [10, 47.5, 20, 60]], np.float32)
    _, out, labels = transform(_image(), boxes, np.array([1, 2, 3]), 0)
    np.testing.assert_array_equal(out, [[0, 0, 10, 10]])  # box 2 is outside, box 3 keeps 0.5 px of height
    assert labels.tolist() == [1]
    _, out, labels = build_transforms([])(_image(), boxes, np.array([1, 2, 3]), 0)
    np.testing.assert_array_equal(out, [[0, 0, 10, 10]])


def test_empty_targets_pass_through():
    transform = build_transforms(PIPELINES["train"])
    out, boxes, labels = transform(_image(), np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), 4)
    assert out.shape == (64, 64, 3) and boxes.shape == (0, 4) and labels.shape == (0,)


def test_unknown_step_lists_valid_names_and_bad_parameters_name_the_step():
    with pytest.raises(ValueError, match=r"unknown transform 'flip'; valid: bbox_safe_crop, color_jitter, hflip"):
        build_transforms([("flip", {})])
    with pytest.raises(ValueError, match=r"transform 'letterbox'.*accepted keys: size, fill"):
        build_transforms([("letterbox", {"side": 64})])
    with pytest.raises(ValueError, match=r"transform 'hflip': p must be in \[0, 1\]"):
        build_transforms([("hflip", {"p": 1.5})])
    with pytest.raises(ValueError, match="scale_min <= scale_max"):
        build_transforms([("scale_jitter", {"scale_min": 1.5, "scale_max": 1.0})])
