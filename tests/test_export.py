"""Export to ONNX and TorchScript: parity with PyTorch on real detections, the file contracts, the CLI.

Students are trained for a few steps on the tiny synthetic set (64 px) with a low score threshold, so every parity
check below compares at least 5 detections per image (asserted): an empty output cannot pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_tool, tiny_model, tiny_recipe

from detkd.config import load_config
from detkd.data.coco import CocoDetection, collate_detection
from detkd.deploy import (
    BOX_TOL_PX,
    SCORE_TOL,
    DeployError,
    Detections,
    EagerBackend,
    OnnxBackend,
    TorchScriptBackend,
    compare_image,
    compare_runs,
    export_and_verify,
    load_detector,
)
from detkd.deploy.verify import read_val_images
from detkd.models.build import build_detector_from_cfg

FAMILIES = ("retinanet", "fcos", "faster_rcnn", "ssdlite")  # every registered family
TRAIN_STEPS = 3
MIN_DETECTIONS = 5


def train_tiny_student(tiny_data: dict, tmp_path, arch: str, steps: int = TRAIN_STEPS):
    """A recipe with one tiny detector (low score threshold) and its checkpoint after ``steps`` AdamW steps."""
    # Faster R-CNN's RPN objectness swings below its 0.05 proposal threshold early at lr 1e-3 (no detection at all):
    # a gentler lr keeps it above, and a lower score bar keeps >= 5 detections of its softmax head
    thr, lr = (0.001, 1e-4) if arch == "faster_rcnn" else (0.01, 1e-3)
    backbone = "mobilenet_v3_small" if arch == "ssdlite" else "resnet18"
    model = {**tiny_model(arch, backbone), "score_thresh": thr}
    recipe = tiny_recipe(tiny_data, tmp_path, name=arch, model=model)
    cfg = load_config(str(recipe))
    data = CocoDetection(tiny_data["train"]["ann_file"], tiny_data["train"]["img_dir"])
    torch.manual_seed(0)
    model = build_detector_from_cfg(cfg.model, data.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        images, targets = collate_detection([data[(4 * step + k) % len(data)] for k in range(4)])
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp_path / f"{arch}.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    return recipe, ckpt


@pytest.fixture(scope="module")
def students(tiny_data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("export_students")
    return {arch: train_tiny_student(tiny_data, tmp, arch) for arch in FAMILIES}


@pytest.fixture(scope="module")
def exports(students, tmp_path_factory) -> dict:
    """Every family exported to both formats (parity on 2 val images, no latency)."""
    tmp = tmp_path_factory.mktemp("exports")
    results = {}
    for arch, (recipe, ckpt) in students.items():
        cfg = load_config(str(recipe))
        for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
            results[arch, fmt] = export_and_verify(
                cfg, ckpt, fmt, tmp / f"{arch}.{suffix}", num_images=2, latency_runs=None
            )
    return results


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_export_passes_parity_on_real_detections(exports, arch, fmt):
    result = exports[arch, fmt]
    report = result.parity
    assert result.path.is_file()
    assert len(report.images) == 2
    assert min(im.reference for im in report.images) >= MIN_DETECTIONS
    for im in report.images:  # every detection paired, except a few swapped at the 100-detection cap
        assert im.matched >= MIN_DETECTIONS and im.unmatched == 0
        assert im.reference - im.matched <= im.boundary <= 0.1 * im.reference
    assert report.max_box_diff <= BOX_TOL_PX
    assert report.max_score_diff <= SCORE_TOL
    assert report.label_diffs == 0 and report.unmatched == 0
    assert report.passed
    assert "parity: PASSED" in report.format()


def test_onnx_file_contract(exports, students, tiny_data):
    """uint8 (1, 3, H, W) with dynamic H, W; boxes in the input image's pixels; categories in the metadata."""
    import onnx

    path = exports["retinanet", "onnx"].path
    proto = onnx.load(str(path))
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, "height", "width"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "image_index"]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["detkd"])
    assert [c["id"] for c in meta["categories"]] == list(range(1, 9))

    # an image of another size than the traced one (64 x 64): a 48 x 96 crop, boxes must fit inside it
    recipe, ckpt = students["retinanet"]
    cfg = load_config(str(recipe))
    image = read_val_images(cfg, 1)[0][0]
    crop = torch.cat([image, image], dim=2)[:, 8:56, :].contiguous()  # (3, 48, 128)
    eager = EagerBackend(load_detector(cfg, ckpt).model)(crop)
    onnx_dets = OnnxBackend(path, threads=1)(crop)
    assert len(eager) >= MIN_DETECTIONS
    parity = compare_image(eager, onnx_dets, 0.01, 100)
    assert parity.unmatched == 0 and parity.matched >= len(eager) - parity.boundary >= MIN_DETECTIONS
    assert parity.max_box_diff <= BOX_TOL_PX
    assert onnx_dets.boxes[:, [0, 2]].max() <= 128 + 1e-3 and onnx_dets.boxes[:, [1, 3]].max() <= 48 + 1e-3


def test_torchscript_takes_float_images_and_batches(exports, students):
    """Float input in 0..1 gives the uint8 result; a batch of 2 gives each image's own detections, indexed."""
    recipe, _ = students["fcos"]
    images = read_val_images(load_config(str(recipe)), 2)[0]
    module = TorchScriptBackend(exports["fcos", "torchscript"].path).module
    with torch.inference_mode():
        single = [module(im[None]) for im in images]
        as_float = module(images[0][None].float() / 255.0)
        boxes, scores, labels, index = module(torch.stack(images))
    assert torch.allclose(as_float[0], single[0][0], atol=1e-4) and torch.allclose(as_float[1], single[0][1])
    for i, (b, s, lab, _) in enumerate(single):
        mine = index == i
        assert int(mine.sum()) == len(s) >= MIN_DETECTIONS
        assert torch.allclose(boxes[mine], b, atol=1e-4) and torch.equal(labels[mine], lab)


def _dets(boxes, scores, labels) -> Detections:
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32), np.asarray(labels, np.int64)
    )


def test_compare_image_by_hand():
    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 8, 8]], [0.9, 0.8, 0.05], [1, 2, 3])
    # same detections in another order, boxes off by 0.002 px, one score off by 5e-5; the 0.05 one (at the
    # threshold) is missing
    cand = _dets([[20, 20, 30.002, 30], [0, 0, 10, 10]], [0.8, 0.90005], [2, 1])
    p = compare_image(ref, cand, score_thresh=0.05)
    assert (p.matched, p.unmatched, p.boundary, p.label_diffs) == (2, 0, 1, 0)
    assert p.max_box_diff == pytest.approx(0.002, abs=1e-5) and p.max_score_diff == pytest.approx(5e-5, abs=1e-6)

    # a swapped label on the same box, and a detection away from any boundary missing: both fail
    swapped = _dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 5])
    p = compare_image(ref, swapped, score_thresh=0.05)
    assert (p.label_diffs, p.unmatched, p.boundary) == (1, 0, 1)
    missing = _dets([[0, 0, 10, 10]], [0.9], [1])
    assert compare_image(ref, missing, score_thresh=0.05).unmatched == 1


def test_parity_fails_for_a_different_model():
    """A 0.5 px shift of every box is reported as such and fails the check."""
    ref = _dets([[1, 1, 9, 9], [20, 20, 40, 40]], [0.9, 0.7], [1, 1])
    shifted = _dets([[1.5, 1, 9.5, 9], [20.5, 20, 40.5, 40]], [0.9, 0.7], [1, 1])
    bad = compare_runs("x.onnx", [ref], [shifted])
    assert not bad.passed and bad.max_box_diff == pytest.approx(0.5)
    assert "parity: FAILED" in bad.format()


def test_unknown_format_and_bad_opset_are_one_clear_error(students):
    recipe, ckpt = students["retinanet"]
    cfg = load_config(str(recipe))
    with pytest.raises(DeployError, match=r"cannot export the retinanet detector to 'tflite'.*onnx and torchscript"):
        export_and_verify(cfg, ckpt, "tflite", "x.tflite", latency_runs=None)
    with pytest.raises(DeployError, match=r"retinanet detector to onnx with --opset 9.*11 to 20"):
        export_and_verify(cfg, ckpt, "onnx", "x.onnx", opset=9, latency_runs=None)


@pytest.fixture(scope="module")
def export_cli(students, tmp_path_factory):
    recipe, ckpt = students["retinanet"]
    out = tmp_path_factory.mktemp("export_cli") / "student.onnx"
    proc = run_tool(
        "export.py", "--cfg", str(recipe), "--ckpt", str(ckpt), "--format", "onnx", "--out", str(out),
        "--num-images", "2", "--threads", "1", "--runs", "20",
    )  # fmt: skip
    return proc, out


def test_export_cli_prints_parity_and_latency(export_cli):
    proc, out = export_cli
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    text = proc.stdout
    assert "parity: PASSED" in text and "tolerance 0.01 px" in text
    assert "batch 1, 1 thread(s), median of 20 timed runs" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["PyTorch eager", "TorchScript", "ONNX Runtime"]
    medians = [float(r.split("|")[2]) for r in rows]
    assert all(m > 0 for m in medians)


def test_export_cli_unsupported_format_exits_nonzero(students, tmp_path):
    recipe, ckpt = students["retinanet"]
    proc = run_tool("export.py", "--cfg", str(recipe), "--ckpt", str(ckpt), "--format", "tflite",
                    "--out", str(tmp_path / "m.tflite"))  # fmt: skip
    assert proc.returncode == 2
    assert "cannot export the retinanet detector to 'tflite'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.tflite").exists()
