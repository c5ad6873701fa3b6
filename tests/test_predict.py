"""tools/predict.py: pictures and predictions.json from a checkpoint or an exported file, and its bad-input errors.

The tiny synthetic set is copied with its category ids remapped to 11, 21, ..., 81, so the tests see that the
original ids (not detkd's contiguous labels) reach predictions.json.
"""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from conftest import run_tool, tiny_model, tiny_recipe

from detkd.config import load_config
from detkd.data.coco import CocoDetection, collate_detection, load_image_rgb
from detkd.deploy import (
    BOX_TOL_PX,
    SCORE_TOL,
    DeployError,
    Detections,
    EagerBackend,
    compare_image,
    deploy_commands,
    expand_inputs,
    export_detector,
    load_detector,
    read_categories,
)
from detkd.deploy.draw import draw_detections
from detkd.deploy.inputs import to_tensor
from detkd.deploy.predict import output_names, prepare_out_dir
from detkd.models.build import build_detector_from_cfg

SCORE_THR = 0.06


def _remap_ids(src: str, dst, factor: int = 10) -> None:
    data = json.loads(open(src).read())
    for cat in data["categories"]:
        cat["id"] = cat["id"] * factor + 1
    for ann in data["annotations"]:
        ann["category_id"] = ann["category_id"] * factor + 1
    dst.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory) -> dict:
    """An FCOS trained 3 steps on the remapped set, its checkpoint, an ONNX export and an input folder.

    FCOS, because its scores spread after a few steps (RetinaNet's stay at the 0.01 prior); the detection cap is
    raised above FCOS's 688 candidates at 64 px, so no detection is cut at the cap by a float-rounding tie.
    """
    tmp = tmp_path_factory.mktemp("predict")
    data = {}
    for split in ("train", "val"):
        _remap_ids(tiny_data[split]["ann_file"], tmp / f"{split}.json")
        data[split] = {"ann_file": str(tmp / f"{split}.json"), "img_dir": tiny_data[split]["img_dir"]}
    recipe = tiny_recipe(
        data, tmp, name="predict", model={**tiny_model("fcos"), "score_thresh": 0.05, "detections_per_img": 1000}
    )
    cfg = load_config(str(recipe))
    train = CocoDetection(data["train"]["ann_file"], data["train"]["img_dir"])
    torch.manual_seed(0)
    model = build_detector_from_cfg(cfg.model, train.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        images, targets = collate_detection([train[(4 * step + k) % len(train)] for k in range(4)])
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp / "student_best.pth"
    torch.save({"model": model.state_dict()}, ckpt)

    folder = tmp / "images"
    folder.mkdir()
    val = CocoDetection(data["val"]["ann_file"], data["val"]["img_dir"])
    for i in range(3):
        shutil.copy(val.image_path(i), folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image, ignored")

    loaded = load_detector(cfg, ckpt)
    onnx_path = export_detector(loaded, "onnx", tmp / "student.onnx", to_tensor(load_image_rgb(folder / "img0.png")))
    return {"recipe": recipe, "cfg": cfg, "ckpt": ckpt, "folder": folder, "onnx": onnx_path, "loaded": loaded}


def _predict(setup, out, *extra):
    return run_tool(
        "predict.py", "--cfg", str(setup["recipe"]), "--ckpt", str(setup["ckpt"]), str(setup["folder"]),
        "--out", str(out), "--score-thr", str(SCORE_THR), "--no-progress", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def eager_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred_eager") / "out"
    return _predict(setup, out), out


def test_predict_folder_with_a_corrupt_file(setup, eager_run):
    proc, out = eager_run
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr and "warning" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img0.jpg", "img1.jpg", "img2.jpg", "predictions.json"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == sorted(str(setup["folder"] / f"img{i}.png") for i in range(3))
    boxes = sum(len(v) for v in predictions.values())
    assert f"3 images (1 unreadable, skipped), {boxes} boxes with score >= 0.06" in proc.stdout
    assert boxes >= 5

    # the json holds the model's own detections: xywh of its xyxy boxes, original category ids, names
    cats = read_categories(setup["cfg"].data.train.ann_file)
    backend = EagerBackend(setup["loaded"].model)
    for i in range(3):
        path = setup["folder"] / f"img{i}.png"
        dets = backend(to_tensor(load_image_rgb(path))).above(SCORE_THR)
        written = predictions[str(path)]
        assert len(written) == len(dets)
        for entry, box, score, label in zip(written, dets.boxes, dets.scores, dets.labels):
            x0, y0, x1, y1 = box.tolist()
            assert entry["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.006)
            assert entry["score"] == pytest.approx(float(score), abs=1e-6)
            assert entry["category_id"] == int(label) and entry["category_id"] in {11, 21, 31, 41, 51, 61, 71, 81}
            assert entry["category_name"] == cats.names[cats.ids.index(entry["category_id"])]
    # a drawn picture is the input enlarged for legibility (64 px -> 384 px)
    import cv2

    assert cv2.imread(str(out / "img0.jpg")).shape == (384, 384, 3)


def _as_detections(entries: list) -> Detections:
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in entries)], np.float32)
    scores = np.array([e["score"] for e in entries], np.float32)
    return Detections(boxes.reshape(-1, 4), scores, np.array([e["category_id"] for e in entries], np.int64))


def test_predict_with_onnx_gives_the_same_predictions(setup, eager_run, tmp_path):
    _, eager_out = eager_run
    proc = run_tool(
        "predict.py", "--cfg", str(setup["recipe"]), str(setup["folder"]), "--out", str(tmp_path / "onnx"),
        "--score-thr", str(SCORE_THR), "--onnx", str(setup["onnx"]), "--threads", "1", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr and "ONNX Runtime, 1 thread(s)" in proc.stdout
    eager = json.loads((eager_out / "predictions.json").read_text())
    onnx = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert sorted(eager) == sorted(onnx)
    assert sum(len(v) for v in onnx.values()) >= 5
    for key in eager:  # the export tool's tolerance (boxes rounded to 0.01 px in the json: one more rounding step)
        p = compare_image(_as_detections(eager[key]), _as_detections(onnx[key]), SCORE_THR, None, BOX_TOL_PX + 0.01)
        assert p.matched == len(eager[key]) == len(onnx[key]) and p.unmatched == p.boundary == p.label_diffs == 0
        assert p.max_box_diff <= BOX_TOL_PX + 0.01 and p.max_score_diff <= SCORE_TOL


def test_predict_mismatched_checkpoint(setup, tmp_path):
    """A RetinaNet checkpoint for the FCOS recipe: the file and the first mismatching tensor are named."""
    cfg = setup["cfg"]
    retinanet = build_detector_from_cfg(load_config(str(setup["recipe"]), ["model.arch=retinanet"]).model, 9)
    bad = tmp_path / "retinanet.pth"
    torch.save(retinanet.state_dict(), bad)
    proc = run_tool("predict.py", "--cfg", str(setup["recipe"]), "--ckpt", str(bad), str(setup["folder"]),
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "head." in proc.stderr and "fcos" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert cfg.model.arch == "fcos"


def test_predict_no_matching_images(setup, tmp_path):
    missing = [str(tmp_path / "nothing_here"), str(tmp_path / "*.jpg")]
    proc = run_tool("predict.py", "--cfg", str(setup["recipe"]), "--ckpt", str(setup["ckpt"]), *missing,
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2
    assert "no image matches the inputs" in proc.stderr and "nothing_here" in proc.stderr and "*.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_out_dir_rules(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DeployError, match="is a file"):
        prepare_out_dir(a_file, ["a.jpg"], overwrite=False)
    out = tmp_path / "out"
    prepare_out_dir(out, ["a.jpg"], overwrite=False)
    (out / "a.jpg").write_bytes(b"")
    with pytest.raises(DeployError, match=r"already holds 1 of the files.*--overwrite"):
        prepare_out_dir(out, ["a.jpg", "b.jpg"], overwrite=False)
    assert prepare_out_dir(out, ["a.jpg"], overwrite=True) == out
    assert output_names([tmp_path / "x" / "a.png", tmp_path / "y" / "a.jpg", tmp_path / "b.bmp"]) == [
        "a.jpg",
        "a-2.jpg",
        "b.jpg",
    ]


def test_expand_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.png", "a.JPG", "c.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    odd = tmp_path / "frame.raw"
    odd.write_bytes(b"")
    paths, unmatched = expand_inputs(
        [str(tmp_path / "d"), str(tmp_path / "d" / "*.png"), str(odd), str(tmp_path / "missing.png")]
    )
    assert [p.name for p in paths] == ["a.JPG", "b.png", "frame.raw"]  # folder by suffix, no duplicates
    assert unmatched == [str(tmp_path / "missing.png")]


def test_draw_detections_marks_the_box():
    image = np.zeros((64, 32, 3), np.uint8)
    cats = read_categories_stub()
    dets = Detections(np.array([[4, 10, 20, 40]], np.float32), np.array([0.9], np.float32), np.array([21]))
    drawn = draw_detections(image, dets, cats)
    scale = 12  # ceil(384 / 32)
    assert drawn.shape == (64 * scale, 32 * scale, 3)
    # the right edge of the box carries the colour of category 21 (second palette colour, BGR), the inside not
    column = drawn[25 * scale : 35 * scale, 20 * scale]
    assert (np.abs(column.astype(int) - [14, 127, 255]).max(axis=1) < 40).mean() > 0.9
    assert drawn[30 * scale, 12 * scale].max() == 0


def read_categories_stub():
    from detkd.deploy.categories import Categories

    return Categories(ids=(11, 21), names=("disc", "ring"), source="stub")


def test_deploy_commands(setup, tmp_path):
    predict, export = deploy_commands(setup["recipe"], setup["ckpt"], tmp_path)
    p = shlex.split(predict)
    assert p[:2] == ["python", "tools/predict.py"]
    assert p[p.index("--cfg") + 1] == str(setup["recipe"]) and p[p.index("--ckpt") + 1] == str(setup["ckpt"])
    assert setup["cfg"].data.val.img_dir in p and p[p.index("--out") + 1] == str(tmp_path / "predict")
    e = shlex.split(export)
    assert e[:2] == ["python", "tools/export.py"] and e[e.index("--format") + 1] == "onnx"
    assert e[e.index("--out") + 1] == str(tmp_path / "student_best.onnx")
