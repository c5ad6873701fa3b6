"""Mask pictures and training plots: the masks are the losses' own, the figures show distinct panels, the index
links every figure, the student is left untouched, the TensorBoard callback logs tiles, the log plot is drawn."""

from __future__ import annotations

import itertools
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, run_tool, tiny_model, tiny_recipe
from matplotlib.image import imread

from detkd.config import load_config
from detkd.data.build import build_dataset
from detkd.distiller import build_distiller_from_cfg
from detkd.losses import FEATURE_LOSSES, LevelContext, build_feature_loss
from detkd.losses import functional as KF
from detkd.mask_panels import MaskImageCallback, collect_masks, grid_shape, loss_weight_map
from detkd.vis import load_student_weights, metric_series, plot_level_figure, plot_logs, read_metrics, visualize_recipe

NUM_CLASSES = 9  # the synthetic set's 8 categories + background


@pytest.fixture(scope="module", autouse=True)
def no_onednn():
    """oneDNN compiles a kernel for every new conv shape (seconds each on a busy CPU); these tiny models run faster
    on the native kernels. Restored after this module."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture(scope="module")
def teacher_ckpt(untrained_teacher_ckpt) -> str:
    return untrained_teacher_ckpt


def recipe(tiny_data, tmp_path, teacher_ckpt, features=(), head=(), name="vis"):
    # score_thresh 0: the untrained teacher's detections (scores ~0.01) survive, so pseudo labels exist
    return load_config(
        tiny_recipe(
            tiny_data,
            tmp_path,
            name,
            teacher={**tiny_model(fpn_channels=32), "checkpoint": teacher_ckpt, "score_thresh": 0.0},
            student=tiny_model(fpn_channels=16),
            distill={"features": list(features), "head": list(head), "teacher_check": {"enabled": False}},
        )
    )


def distiller_and_batch(cfg, num_images=2):
    """The recipe's distiller and val images 1.. (image 0 of the tiny set has no box; 1 and 2 have 1 and 4)."""
    val = build_dataset(cfg.data, "val")
    torch.manual_seed(0)
    distiller = build_distiller_from_cfg(cfg, val.num_classes, val.cat_id_to_label)
    items = [val[i] for i in range(1, 1 + num_images)]
    return distiller, [img for img, _ in items], [t for _, t in items]


def assert_distinct_and_not_blank(panels: dict[str, np.ndarray]) -> None:
    for title, array in panels.items():
        assert np.isfinite(array).all() and array.std() > 0, f"panel '{title}' is blank"
    for (a, x), (b, y) in itertools.combinations(panels.items(), 2):
        assert not np.allclose(x, y), f"panels '{a}' and '{b}' show the same map"


def test_fgd_figures_show_distinct_panels_and_the_index_links_every_png(tiny_data, tmp_path, teacher_ckpt):
    cfg = recipe(tiny_data, tmp_path, teacher_ckpt, features=[{"type": "fgd", "levels": ["p3", "p4"]}])
    out = tmp_path / "masks"
    paths = visualize_recipe(cfg, num_images=2, out_dir=out)
    pngs, index = paths[:-1], paths[-1]
    assert sorted(p.name for p in pngs) == ["img000_p3.png", "img000_p4.png", "img001_p3.png", "img001_p4.png"]
    contents = [p.read_bytes() for p in pngs]
    assert all(c.startswith(b"\x89PNG") and len(c) > 10_000 for c in contents)
    assert len(set(contents)) == len(contents)  # four different figures
    assert imread(pngs[0]).std() > 0.05
    page = index.read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(p.name for p in pngs)
    assert page.index("image 0") < page.index("image 1")

    # the arrays drawn in one figure: every panel shows something, and no two panels show the same map
    distiller, images, targets = distiller_and_batch(cfg)
    snapshot = collect_masks(distiller, images, targets)
    assert list(snapshot.levels) == ["p3", "p4"]  # the distilled levels
    p3 = snapshot.levels["p3"]
    assert p3.difference_kind == "gid"  # both heads are dense: GID's selection from their logits
    panels = plot_level_figure(
        snapshot.images[1], snapshot.gt_boxes[1], None, p3, tmp_path / "one.png", index=1, caption="test"
    )
    assert "final per-pixel weight (fgd)" in panels and len(panels) == 6
    assert_distinct_and_not_blank(panels)


def test_pseudo_labels_and_gid_difference(tiny_data, tmp_path, teacher_ckpt):
    head = [{"type": "pseudo_label", "score_thr": 0.0, "max_dets": 3, "merge_iou": 0.99}]
    cfg = recipe(tiny_data, tmp_path, teacher_ckpt, features=[{"type": "gid", "levels": ["p3"]}], head=head)
    distiller, images, targets = distiller_and_batch(cfg)
    snapshot = collect_masks(distiller, images, targets)
    p3 = snapshot.levels["p3"]
    assert snapshot.pseudo_boxes is not None and all(len(b) == 3 for b in snapshot.pseudo_boxes)
    for gt, pseudo, used in zip(snapshot.gt_boxes, snapshot.pseudo_boxes, snapshot.mask_boxes):
        assert len(gt) > 0 and len(used) == len(gt) + len(pseudo)  # merged: the box masks use the pseudo labels
        assert torch.allclose(used[: len(gt)], gt)  # canvas = input pixels here (64 px images, 64 px detectors)
    # the gid weight is the difference mask the panel shows, normalised: the loss and the picture agree
    assert p3.difference_kind == "gid"
    assert torch.allclose(p3.weights["gid"], p3.difference / p3.difference.sum())
    panels = plot_level_figure(
        snapshot.images[0], snapshot.gt_boxes[0], snapshot.pseudo_boxes[0], p3, tmp_path / "pl.png"
    )
    assert_distinct_and_not_blank(panels)
    paths = visualize_recipe(cfg, num_images=1, out_dir=tmp_path / "pl")
    assert [p.name for p in paths] == ["img000_p3.png", "index.html"]


def test_head_only_recipe_shows_every_shared_level_without_loss_panels(tiny_data, tmp_path, teacher_ckpt):
    cfg = recipe(tiny_data, tmp_path, teacher_ckpt, head=[{"type": "logit_kd"}])
    distiller, images, targets = distiller_and_batch(cfg)
    snapshot = collect_masks(distiller, images, targets)
    assert list(snapshot.levels) == ["p3", "p4", "p5", "p6", "p7"]
    p3 = snapshot.levels["p3"]
    assert not p3.distilled and p3.weights == {}
    assert p3.t_channel.shape == (2, 32) and p3.s_channel.shape == (2, 16)  # no adapter: each its own width
    panels = plot_level_figure(snapshot.images[1], snapshot.gt_boxes[1], None, p3, tmp_path / "h.png", index=1)
    assert len(panels) == 5 and (tmp_path / "h.png").stat().st_size > 10_000


def test_every_feature_loss_gets_a_weight_panel(tiny_data, tmp_path, teacher_ckpt):
    features = [{"type": name, "levels": ["p3"]} for name in sorted(FEATURE_LOSSES)]
    cfg = recipe(tiny_data, tmp_path, teacher_ckpt, features=features)
    distiller, images, targets = distiller_and_batch(cfg)
    p3 = collect_masks(distiller, images, targets).levels["p3"]
    # relation compares distances between instances: it weighs no location, so it draws no weight panel
    assert list(p3.weights) == [n for n in sorted(FEATURE_LOSSES) if n != "relation"]
    for name, weight in p3.weights.items():
        assert weight.shape == (2, 8, 8) and torch.isfinite(weight).all() and (weight >= 0).all(), name
        assert weight.sum() > 0, name


def test_collect_masks_leaves_the_distiller_untouched(tiny_data, tmp_path, teacher_ckpt):
    cfg = recipe(tiny_data, tmp_path, teacher_ckpt, features=[{"type": "fgd"}])
    distiller, images, targets = distiller_and_batch(cfg)
    distiller.eval()
    before = {k: v.clone() for k, v in distiller.state_dict().items()}
    rng = torch.get_rng_state()
    collect_masks(distiller, images, targets)
    assert not distiller.training and not distiller.student.training
    after = distiller.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    # ... while a plain train-mode forward does move the student's BatchNorm statistics (the test can fail)
    distiller.train()
    with torch.no_grad():
        distiller(images, targets)
    key = "student.backbone.body.bn1.running_mean"
    assert not torch.equal(before[key], distiller.state_dict()[key])


def test_loss_weight_map_fgd_on_a_hand_made_box():
    """FGD's focal term is ``alpha/N sum fg A_s A_c (t-s)^2 + beta/N sum bg A_s A_c (t-s)^2``, so its per-location
    weight is ``(alpha fg + beta bg) A_s / N``. Box [0, 0, 16, 16] on a 32 px canvas, 4x4 map (stride 8): fg = 1/4
    on the top-left 2x2 cells, bg = 1/12 on the 12 others; the second image has no box: fg = 0, bg = 1/16."""
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)]
    ctx = LevelContext(name="p3", stride=8, image_hw=(32, 32), boxes=boxes, s_feat=s, t_feat=t)
    fgd = build_feature_loss("fgd", temperature=0.5, alpha=2e-3, beta=7e-4)
    fg = torch.zeros(2, 4, 4)
    fg[0, :2, :2] = 0.25
    bg = torch.where(fg > 0, 0.0, 1.0 / 12)
    bg[1] = 1.0 / 16
    a_t = 16 * torch.softmax(t.abs().mean(dim=1).reshape(2, 16) / 0.5, dim=1).reshape(2, 4, 4)
    expected = (2e-3 * fg + 7e-4 * bg) * a_t / 2
    weight = loss_weight_map("fgd", fgd, ctx)
    assert torch.allclose(weight, expected, rtol=1e-5, atol=0)
    # and the map reproduces the loss: sum W * sum_c A_c (s - t)^2 is FGD's focal term
    a_c = 3 * torch.softmax(t.abs().mean(dim=(2, 3)) / 0.5, dim=1)
    e = (a_c[:, :, None, None] * (s - t) ** 2).sum(dim=1)
    focal = KF.fgd_focal_loss(s, t, fg, bg, 0.5, 2e-3, 7e-4)
    assert torch.allclose((weight * e).sum(), focal, rtol=1e-5)


def standardised(x: torch.Tensor) -> torch.Tensor:
    """Each channel over (N, H, W): (x - mean) / (unbiased std + 1e-6), as PKD."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (x.std(dim=(0, 2, 3), keepdim=True) + 1e-6)


def channel_attention(x: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    return x.shape[1] * torch.softmax(x.abs().mean(dim=(2, 3)) / temperature, dim=1)


@pytest.mark.parametrize("name", ["mse", "fgfi", "defeat", "gid", "pkd", "attention"])
def test_loss_weight_map_reproduces_each_linear_loss(name):
    """``sum W * e`` is the loss (``feat_weight * sqrt(sum W e)`` for attention with its transfer term off)."""
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 2.0, 60.0, 20.0]]), torch.zeros(0, 4)]
    ctx = LevelContext(name="p3", stride=8, image_hw=(64, 64), boxes=boxes, s_feat=s, t_feat=t)
    module = build_feature_loss(name, **({"at_weight": 0.0} if name == "attention" else {}))
    weight = loss_weight_map(name, module, ctx)
    if name == "pkd":
        e = ((standardised(s) - standardised(t)) ** 2).sum(dim=1)
    elif name == "attention":
        m_c = (channel_attention(t) + channel_attention(s)) / 2
        e = (m_c[:, :, None, None] * (s - t) ** 2).sum(dim=1)
    else:
        e = ((s - t) ** 2).sum(dim=1)
    total = (weight * e).sum()
    if name == "attention":
        total = module.feat_weight * total.sqrt()
    assert torch.allclose(total, module(s, t, ctx), rtol=1e-4)


def test_mask_image_callback_logs_a_tile_per_level_every_n_iterations(tiny_data, tmp_path, teacher_ckpt):
    cfg = recipe(tiny_data, tmp_path, teacher_ckpt, features=[{"type": "fgd", "levels": ["p3", "p4"]}])
    distiller, images, targets = distiller_and_batch(cfg)
    logged = []
    logger = SimpleNamespace(image=lambda tag, img, step: logged.append((tag, img, step)))
    trainer = SimpleNamespace(logger=logger, is_main=True)
    callback = MaskImageCallback(distiller, images, targets, every=3)
    for iteration in range(1, 8):
        callback(trainer, iteration, {"loss": 1.0})
    assert [(tag, step) for tag, _, step in logged] == [
        ("masks/p3", 3),
        ("masks/p4", 3),
        ("masks/p3", 6),
        ("masks/p4", 6),
    ]
    # 2 images x (image + fg, bg, teacher A_s, student A_s, difference, fgd weight) on 64 px canvases
    for _, image, _ in logged:
        assert image.shape == grid_shape(2, 6, (64, 64)) == (3, 2 * 64 + 3 * 2, 7 * 64 + 8 * 2)
        assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.05
    assert not torch.equal(logged[0][1], logged[1][1])  # p3 and p4 tiles differ
    callback(SimpleNamespace(logger=logger, is_main=False), 9, {})
    assert len(logged) == 4  # only the main process logs


def test_student_checkpoints_of_every_kind_load(tiny_data, tmp_path, teacher_ckpt):
    cfg = recipe(tiny_data, tmp_path, teacher_ckpt, features=[{"type": "mse"}])
    distiller, _, _ = distiller_and_batch(cfg, 1)
    key = "head.classification_head.cls_logits.bias"
    sd = distiller.export_student()
    sd[key] = torch.full_like(sd[key], 3.0)
    torch.save({"model": sd, "epoch": 1}, tmp_path / "student_best.pth")
    assert load_student_weights(distiller, tmp_path / "student_best.pth") == "student"
    assert torch.equal(distiller.student.state_dict()[key], sd[key])
    trainable = distiller.trainable_state_dict()
    trainable[f"student.{key}"] = torch.full_like(sd[key], -1.0)
    torch.save({"model": trainable, "optimizer": {}}, tmp_path / "last.pth")
    assert load_student_weights(distiller, tmp_path / "last.pth") == "distiller"
    assert float(distiller.student.state_dict()[key][0]) == -1.0
    torch.save({"model": {"nonsense": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit the recipe's student"):
        load_student_weights(distiller, tmp_path / "bad.pth")


def run_tool_here(script: str, *args: str, capsys) -> tuple[int, str, str]:
    """Run ``tools/<script>`` as ``__main__`` in this process (a fresh interpreter would pay torch's warm-up again)."""
    argv = sys.argv
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(str(REPO / "tools" / script), run_name="__main__")
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def test_visualize_masks_tool(tiny_data, tmp_path, teacher_ckpt, capsys):
    cfg_path = tiny_recipe(
        tiny_data,
        tmp_path,
        "tool",
        teacher={**tiny_model(fpn_channels=32), "checkpoint": teacher_ckpt},
        student=tiny_model(fpn_channels=16),
        distill={"features": [{"type": "defeat"}], "teacher_check": {"enabled": False}},
    )
    out = tmp_path / "tool_out"
    args = ("--cfg", str(cfg_path), "--num-images", "1", "--levels", "p4", "--out", str(out))
    code, stdout, stderr = run_tool_here("visualize_masks.py", *args, capsys=capsys)
    assert code == 0, stderr
    assert str(out / "img000_p4.png") in stdout and (out / "index.html").is_file()
    args = ("--cfg", str(cfg_path), "--opts", "teacher.checkpoint=/nope/best.pth")
    code, _, stderr = run_tool_here("visualize_masks.py", *args, capsys=capsys)
    assert code == 2 and "teacher checkpoint /nope/best.pth does not exist" in stderr


def write_run(folder: Path, distilled: bool, resumed: bool = False) -> None:
    folder.mkdir(parents=True)
    lines = []
    for it in range(1, 41):
        rec = {"type": "train", "iter": it, "epoch": it // 20, "time": 1000.0 + it, "lr": 0.01,
               "loss": 3.0 / it, "task/classification": 2.0 / it, "task/bbox_regression": 1.0 / it}  # fmt: skip
        if distilled:
            rec["distill/fgd/p3"] = 0.5 / it**0.5
        lines.append(json.dumps(rec))
        if it % 20 == 0:
            lines.append(json.dumps({"type": "val", "iter": it, "epoch": it // 20, "time": 0.0, "AP": it / 100,
                                     "AP50": it / 60}))  # fmt: skip
    if resumed:  # a resumed run logs iterations 21.. again; the last record of an iteration wins
        lines += [
            json.dumps({"type": "train", "iter": it, "epoch": 1, "time": 0.0, "loss": 0.1}) for it in range(21, 41)
        ]
    lines.append('{"type": "train", "iter": 41, "lo')  # a run killed mid-write
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_logs_draws_every_term_for_both_runs(tmp_path):
    write_run(tmp_path / "baseline", distilled=False, resumed=True)
    write_run(tmp_path / "distill_fgd", distilled=True)
    out = tmp_path / "plots" / "curves.png"
    proc = run_tool("plot_logs.py", str(tmp_path / "baseline"), str(tmp_path / "distill_fgd"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    picture = imread(out)
    assert picture.shape[0] > 400 and picture.shape[1] > 1000 and picture.std() > 0.05
    loss = metric_series(read_metrics(tmp_path / "baseline"), "train")["loss"]
    assert list(loss[0]) == list(range(1, 41)) and np.allclose(loss[1][20:], 0.1)  # resumed: last record wins
    # the function: one subplot per term (loss, 2 task, 1 distill, lr) + val AP
    path = plot_logs([tmp_path / "baseline", tmp_path / "distill_fgd" / "metrics.jsonl"], tmp_path / "again.png")
    assert path.stat().st_size > 20_000
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_logs([tmp_path / "nothing"], tmp_path / "x.png")


def test_training_side_never_imports_matplotlib():
    code = (
        "import sys, detkd.mask_panels, detkd.distiller, detkd.engine.runner, detkd.engine.trainer; "
        "assert 'matplotlib' not in sys.modules and 'detkd.vis' not in sys.modules, 'matplotlib imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
