"""The deterministic synthetic COCO-format generator: determinism, COCO validity, content and caching."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_tool
from pycocotools.coco import COCO

from detkd.data.synthetic import (
    CATEGORIES,
    STAMP_FILE,
    ensure_synthetic,
    generate_split,
    generate_synthetic_coco,
    render_sample,
    split_stats,
)


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load_coco(ann_file: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def test_same_arguments_give_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_synthetic_coco(tmp_path / "a", num_train=12, num_val=4, size=64, seed=5, show_progress=False)
    generate_synthetic_coco(tmp_path / "b", num_train=12, num_val=4, size=64, seed=5, show_progress=False)
    generate_synthetic_coco(tmp_path / "c", num_train=12, num_val=4, size=64, seed=6, show_progress=False)
    da, db, dc = (_digest(tmp_path / name) for name in "abc")
    assert len(da) == 12 + 4 + 3  # images, two jsons, the stamp
    assert da == db
    assert da["annotations/train.json"] != dc["annotations/train.json"]
    differing = [k for k in da if k.startswith("images/") and da[k] != dc[k]]
    assert len(differing) == 16  # every image changes with the seed
    # train and val are different streams: image 1 of each differs
    assert da["images/train/000001.png"] != da["images/val/000001.png"]
    assert a["train"] == {
        "ann_file": str(tmp_path / "a/annotations/train.json"),
        "img_dir": str(tmp_path / "a/images/train"),
    }


def test_image_depends_only_on_its_index_and_png_is_rgb(tmp_path: Path) -> None:
    short = generate_split(tmp_path / "short", "train", 3, 64, seed=2, show_progress=False)
    long = generate_split(tmp_path / "long", "train", 8, 64, seed=2, show_progress=False)
    for i in range(1, 4):
        name = f"images/train/{i:06d}.png"
        assert (tmp_path / "short" / name).read_bytes() == (tmp_path / "long" / name).read_bytes()
    assert json.loads(Path(short).read_text())["annotations"] == [
        a for a in json.loads(Path(long).read_text())["annotations"] if a["image_id"] <= 3
    ]
    stored = cv2.cvtColor(cv2.imread(str(tmp_path / "long/images/train/000006.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(stored, render_sample(2, "train", 5, 64).image)


def test_json_is_valid_coco_with_boxes_inside_the_image(tmp_path: Path) -> None:
    size = 64
    ann_file = generate_split(tmp_path, "val", 40, size, seed=0, show_progress=False)
    coco = _load_coco(ann_file)
    assert len(coco.getCatIds()) >= 6
    assert coco.getCatIds() == list(range(1, len(CATEGORIES) + 1))
    assert sorted(coco.getImgIds()) == list(range(1, 41))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) > 40
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    for a in anns:
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
        assert w >= 1 and h >= 1
        assert 0 < a["area"] <= w * h
        assert a["iscrowd"] == 0
        assert a["category_id"] in coco.cats
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img["width"], img["height"]) == (size, size)
        assert (tmp_path / "images/val" / img["file_name"]).is_file()
    # about 5 % of the images have no object; with this seed 40 images contain some
    empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
    assert len(empty) >= 1
    assert split_stats(ann_file) == {"images": 40, "annotations": len(anns), "empty_images": len(empty)}
    # several categories occur, each with visible pixels
    assert len({a["category_id"] for a in anns}) >= 6


def test_object_sizes_span_small_to_half_the_image() -> None:
    size = 128
    sides = np.concatenate([render_sample(0, "train", i, size).boxes_xywh[:, 2:].max(axis=1) for i in range(50)])
    assert sides.min() < 16
    assert sides.max() > size / 3
    assert sides.max() <= size / 2 + 2  # the circumscribed diameter is at most half the side (+ anti-aliasing)


def test_boxes_are_tight_boxes_of_the_visible_masks_and_objects_are_drawn() -> None:
    size, checked, truncated = 96, 0, 0
    for index in range(30):
        s = render_sample(1, "train", index, size)
        n = len(s.category_ids)
        assert s.visible_masks.shape == (n, size, size)
        if n:
            assert s.visible_masks.sum(axis=0).max() == 1  # an occluded pixel belongs to the top object only
        for k in range(n):
            ys, xs = np.nonzero(s.visible_masks[k])
            expected = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            np.testing.assert_array_equal(s.boxes_xywh[k], expected)
            assert s.areas[k] == len(xs)
            # the object is really drawn: nearly every visible pixel differs from the background
            changed = np.any(s.image[s.visible_masks[k]] != s.background[s.visible_masks[k]], axis=1)
            assert changed.mean() > 0.95
            checked += 1
            truncated += int(xs.min() == 0 or ys.min() == 0 or xs.max() == size - 1 or ys.max() == size - 1)
        # outside the objects (plus a 2 px anti-aliasing fringe) the image is exactly the background
        union = s.visible_masks.any(axis=0).astype(np.uint8)
        fringe = cv2.dilate(union, np.ones((5, 5), np.uint8)).astype(bool)
        np.testing.assert_array_equal(s.image[~fringe], s.background[~fringe])
    assert checked > 50
    assert truncated >= 3  # objects cut by the border occur


def test_ensure_synthetic_skips_when_stamp_matches_and_regenerates_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    paths = ensure_synthetic(out, 6, 3, size=48, seed=0, show_progress=False)
    files = [Path(paths["train"]["ann_file"]), Path(paths["val"]["ann_file"]), out / STAMP_FILE]
    files.append(Path(paths["train"]["img_dir"]) / "000006.png")
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    assert json.loads((out / STAMP_FILE).read_text())["num_train"] == 6

    assert ensure_synthetic(out, 6, 3, size=48, seed=0, show_progress=False) == paths
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes

    ensure_synthetic(out, 4, 3, size=48, seed=0, show_progress=False)  # other arguments: regenerated
    assert split_stats(paths["train"]["ann_file"])["images"] == 4
    assert not (Path(paths["train"]["img_dir"]) / "000006.png").exists()  # stale images removed
    assert json.loads((out / STAMP_FILE).read_text())["num_train"] == 4

    (out / STAMP_FILE).unlink()  # as after an interrupted generation
    before = os.stat(paths["val"]["ann_file"]).st_mtime_ns
    os.utime(paths["val"]["ann_file"], ns=(before - 10**9, before - 10**9))
    ensure_synthetic(out, 4, 3, size=48, seed=0, show_progress=False)
    assert os.stat(paths["val"]["ann_file"]).st_mtime_ns > before - 10**9
    assert (out / STAMP_FILE).is_file()


def test_too_small_images_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size must be >= 16"):
        generate_synthetic_coco(tmp_path, 2, 2, size=8, show_progress=False)


def test_make_synthetic_tool(tmp_path: Path) -> None:
    proc = run_tool(
        "make_synthetic.py",
        "--out",
        str(tmp_path),
        "--num-train",
        "5",
        "--num-val",
        "2",
        "--size",
        "32",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 5 images" in proc.stdout and "val: 2 images" in proc.stdout
    assert split_stats(tmp_path / "annotations/train.json")["images"] == 5
    assert len(list((tmp_path / "images/val").glob("*.png"))) == 2


def test_min_object_size_raises_the_smallest_objects() -> None:
    def sides(**knobs) -> np.ndarray:
        samples = [render_sample(0, "train", i, 128, **knobs) for i in range(60)]
        return np.concatenate([s.boxes_xywh[:, 2:].max(axis=1) for s in samples])

    default, larger = sides(), sides(min_object_size=32)
    # visible boxes can be smaller than the object (occlusion, border), so compare the distributions
    assert np.percentile(default, 10) < 14
    assert np.percentile(larger, 10) >= 20
    assert np.median(larger) > np.median(default) + 8
    assert larger.max() <= 128 / 2 + 2  # the upper end (half the image side) is unchanged


def test_clutter_scales_the_background_lines_and_blobs() -> None:
    def roughness(clutter: float) -> float:  # mean |Laplacian| of the backgrounds: lines and arcs are sharp edges
        backs = [render_sample(4, "train", i, 96, clutter=clutter).background for i in range(30)]
        return float(np.mean([np.abs(cv2.Laplacian(b.astype(np.float32), cv2.CV_32F)).mean() for b in backs]))

    none, half, full = roughness(0.0), roughness(0.5), roughness(1.0)
    assert none < half < full
    # the default knobs draw exactly what the generator drew before the knobs existed
    np.testing.assert_array_equal(
        render_sample(4, "train", 3, 96, clutter=1.0, min_object_size=8).image, render_sample(4, "train", 3, 96).image
    )


def test_knobs_are_recorded_and_a_changed_knob_regenerates(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    ensure_synthetic(out, 3, 2, size=48, seed=0, show_progress=False)
    assert "clutter" not in json.loads((out / STAMP_FILE).read_text())  # default knobs keep older stamps valid
    paths = ensure_synthetic(out, 3, 2, size=48, seed=0, show_progress=False, min_object_size=12, clutter=0.5)
    stamp = json.loads((out / STAMP_FILE).read_text())
    assert stamp["min_object_size"] == 12 and stamp["clutter"] == 0.5
    info = json.loads(Path(paths["val"]["ann_file"]).read_text())["info"]
    assert info["min_object_size"] == 12 and info["clutter"] == 0.5
    with pytest.raises(ValueError, match="clutter must be >= 0"):
        render_sample(0, "train", 0, 48, clutter=-1)
    with pytest.raises(ValueError, match="min_object_size must be >= 2"):
        render_sample(0, "train", 0, 48, min_object_size=1)


def test_recipe_knobs_reach_the_generator(tmp_path: Path) -> None:
    from detkd.config import load_config
    from detkd.data.build import ensure_data

    recipe = tmp_path / "r.yaml"
    out = tmp_path / "data"
    recipe.write_text(
        "model: {arch: retinanet, backbone: resnet18}\n"
        f"data: {{synthetic: {{out: {out}, num_train: 2, num_val: 1, size: 32, min_object_size: 10, clutter: 0}},\n"
        f"       train: {{ann_file: {out}/annotations/train.json, img_dir: {out}/images/train}},\n"
        f"       val: {{ann_file: {out}/annotations/val.json, img_dir: {out}/images/val}}}}\n"
    )
    ensure_data(load_config(recipe).data, show_progress=False)
    stamp = json.loads((out / STAMP_FILE).read_text())
    assert stamp["min_object_size"] == 10.0 and stamp["clutter"] == 0.0


def test_presets_name_knob_settings_and_the_tool_applies_them(tmp_path: Path) -> None:
    from detkd.data.synthetic import PRESETS, preset_knobs

    assert preset_knobs("default") == {"min_object_size": 8.0, "clutter": 1.0}
    assert preset_knobs("bench") == {"min_object_size": 16.0, "clutter": 0.5}
    knobs = preset_knobs("quickstart")
    knobs["clutter"] = 99.0  # a copy: the registry is not changed
    assert PRESETS["quickstart"]["clutter"] != 99.0
    with pytest.raises(ValueError, match="valid: bench, default, quickstart"):
        preset_knobs("easy")
    # the tool: a preset sets both knobs, an explicit knob overrides it; the stamp records the knobs used
    args = ["--num-train", "2", "--num-val", "1", "--size", "32", "--no-progress"]
    proc = run_tool("make_synthetic.py", "--out", str(tmp_path / "a"), "--preset", "bench", *args)
    assert proc.returncode == 0, proc.stderr
    stamp = json.loads((tmp_path / "a" / STAMP_FILE).read_text())
    assert stamp["min_object_size"] == 16.0 and stamp["clutter"] == 0.5
    proc = run_tool("make_synthetic.py", "--out", str(tmp_path / "b"), "--preset", "bench", "--clutter", "0", *args)
    stamp = json.loads((tmp_path / "b" / STAMP_FILE).read_text())
    assert stamp["min_object_size"] == 16.0 and stamp["clutter"] == 0.0
    # the same preset gives the same bytes as the knobs given by hand
    render_a = render_sample(0, "val", 0, 32, **preset_knobs("bench")).image
    np.testing.assert_array_equal(render_a, render_sample(0, "val", 0, 32, min_object_size=16, clutter=0.5).image)


def test_a_val_set_made_with_other_image_settings_is_flagged(tmp_path, caplog):
    """A stale tuning split (other size / object sizes than the train set) is named in a warning, with the knobs."""
    from detkd.config import config_from_dict
    from detkd.data.build import ensure_data, synthetic_mismatch

    a = ensure_synthetic(tmp_path / "a", 2, 2, size=64, seed=0, show_progress=False, min_object_size=16)
    same = ensure_synthetic(tmp_path / "same", 2, 2, size=64, seed=1, show_progress=False, min_object_size=16)
    other = ensure_synthetic(tmp_path / "other", 2, 2, size=96, seed=1, show_progress=False, min_object_size=16)

    def cfg(val):
        return config_from_dict({"data": {"train": a["train"], "val": val["val"]}})

    assert synthetic_mismatch(cfg(same).data) is None  # another seed of the same settings: a proper tuning split
    message = synthetic_mismatch(cfg(other).data)
    assert str(tmp_path / "other" / "images" / "val") in message and "size 64 vs 96" in message
    assert "min_object_size" not in message  # only the settings that differ
    with caplog.at_level("WARNING", logger="detkd"):
        ensure_data(cfg(other).data, show_progress=False)
    assert "another distribution" in caplog.text
