"""A loss defined outside detkd, registered through the public API, works from a recipe end to end: config
validation, ``train_distill``, the TensorBoard mask images and ``visualize_masks`` — with no edit to detkd's files.

The losses and the detector family are defined here and registered by the ``registered`` fixture (and removed after
this module, so the registries other test modules list stay detkd's own); the CLI test writes a three-line plugin
that imports them from this file and registers them, as a user's ``--plugin my_losses.py`` would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_recipe
from torch import Tensor
from torchvision.models.detection import RetinaNet

from detkd.config import ConfigError, load_config
from detkd.losses import FEATURE_LOSSES, HEAD_LOSSES, FeatureLoss, HeadLoss, register_feature_loss, register_head_loss
from detkd.models.build import DENSE_STRIDES, build_detector, build_retinanet
from detkd.models.families import FAMILIES, DetectorFamily, register_family

NUM_CLASSES = 9  # the tiny synthetic set's 8 categories + background


class CentreWeightedMSE(FeatureLoss):
    """Test loss: ``sum_{n,h,w} W (s - t)^2_c-summed`` with ``W[n,h,w] = g(h, w) / (N sum g)``, a Gaussian ``g`` of
    width ``sigma`` (in units of the map side) centred on the map."""

    def __init__(self, sigma: float = 0.25) -> None:
        super().__init__()
        self.sigma = sigma

    def weight_map(self, ctx) -> Tensor:
        n, _, h, w = ctx.t_feat.shape
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
        g = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * self.sigma**2))
        return (g / (n * g.sum())).expand(n, h, w).to(ctx.t_feat.device)

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx) -> Tensor:
        return (self.weight_map(ctx) * (s_feat - t_feat).pow(2).sum(dim=1)).sum()


class ScoreMSE(HeadLoss):
    """Test loss: mean squared difference of the sigmoid class scores of the two dense heads."""

    needs = frozenset({"teacher_head"})

    def forward(self, record) -> Tensor:
        s, t = record.student.head["cls_logits"], record.teacher.head["cls_logits"]
        return (s.sigmoid() - t.sigmoid()).pow(2).mean()


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register this file's losses and family for the module's tests; remove them afterwards."""
    register_feature_loss("centre_mse", CentreWeightedMSE)
    register_head_loss("score_mse", ScoreMSE)
    register_family(THREE_ANCHOR_FAMILY)
    yield
    FEATURE_LOSSES.pop("centre_mse")
    HEAD_LOSSES.pop("score_mse")
    FAMILIES.pop("retinanet3")


@pytest.fixture(scope="module")
def teacher_ckpt(untrained_teacher_ckpt) -> str:
    return untrained_teacher_ckpt


def plugin_recipe(tiny_data, tmp_path, teacher_ckpt, **extra) -> Path:
    return tiny_recipe(
        tiny_data,
        tmp_path,
        "plugin",
        teacher={**tiny_model(fpn_channels=32), "checkpoint": teacher_ckpt},
        student=tiny_model(fpn_channels=16),
        distill={
            "features": [{"type": "centre_mse", "sigma": 0.3, "levels": ["p3", "p4"]}],
            "head": [{"type": "score_mse", "weight": 2.0}],
            "teacher_check": {"enabled": False},
        },
        train={
            "epochs": 1,
            "max_iters": 2,
            "optimizer": {"type": "sgd", "lr": 0.01},
            "device": "cpu",
            "log_interval": 1,
        },  # fmt: skip
        eval={"interval": 1, "max_images": 2},
        **extra,
    )


def test_registration_rejects_what_would_fail_later():
    assert FEATURE_LOSSES["centre_mse"] is CentreWeightedMSE and HEAD_LOSSES["score_mse"] is ScoreMSE
    with pytest.raises(TypeError, match="subclass of detkd.losses.FeatureLoss"):
        register_feature_loss("not_a_loss", torch.nn.MSELoss)
    with pytest.raises(ValueError, match="already registered"):
        register_feature_loss("fgd", CentreWeightedMSE)

    class Greedy(HeadLoss):
        needs = frozenset({"teacher_gradients"})

    with pytest.raises(ValueError, match=r"needs \['teacher_gradients'\].*valid: anchors, cls_logits"):
        register_head_loss("greedy", Greedy)


def test_a_registered_loss_validates_trains_and_draws(tiny_data, tmp_path, teacher_ckpt):
    from detkd.engine.runner import train_distill
    from detkd.vis import visualize_recipe

    with pytest.raises(ConfigError, match=r"sigmaa.*accepted keys: levels, sigma"):
        load_config(plugin_recipe(tiny_data, tmp_path, teacher_ckpt), ["distill.features.0.sigmaa=1.0"])
    cfg = load_config(plugin_recipe(tiny_data, tmp_path, teacher_ckpt, log={"tensorboard": True,
                                                                             "mask_images_every": 1}))  # fmt: skip
    summary = train_distill(cfg, show_progress=False)
    records = [json.loads(line) for line in (Path(cfg.work_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train and {"distill/centre_mse/p3", "distill/centre_mse/p4", "distill/score_mse"} <= set(train[0])
    assert train[0]["distill/score_mse"] > 0
    events = list((Path(cfg.work_dir) / "tensorboard").glob("events.*"))
    assert events and max(e.stat().st_size for e in events) > 2000  # scalars and the mask images

    # the mask pictures draw the loss's own weight map
    distiller = summary["distiller"]
    from detkd.data.build import build_dataset
    from detkd.mask_panels import collect_masks

    val = build_dataset(cfg.data, "val")
    items = [val[i] for i in (1, 2)]
    snap = collect_masks(distiller, [i for i, _ in items], [t for _, t in items])
    weight = snap.levels["p3"].weights["centre_mse"]
    h, w = snap.levels["p3"].feat_hw
    assert weight.shape == (2, h, w) and torch.isclose(weight.sum(), torch.tensor(1.0), atol=1e-5)
    assert weight[0, h // 2, w // 2] > weight[0, 0, 0]  # centre-weighted
    paths = visualize_recipe(cfg, summary["best_checkpoint"], 1, "val", str(tmp_path / "vis"))
    assert any(str(p).endswith(".png") for p in paths)
    html = (tmp_path / "vis" / "index.html").read_text()
    assert "centre_mse" in html


# ----------------------------------------------------------------------------------------------------------------
# A detector family from outside detkd
# ----------------------------------------------------------------------------------------------------------------


class ThreeAnchorRetinaNet(RetinaNet):
    """Test family: RetinaNet with one anchor size per level (3 aspect ratios) instead of 3 x 3."""


def build_three_anchor_retinanet(spec, num_classes, backbone_state_dict=None):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead

    model = build_retinanet(spec, num_classes, backbone_state_dict)
    model.anchor_generator = AnchorGenerator(tuple((2 * s,) for s in DENSE_STRIDES), ((0.5, 1.0, 2.0),) * 5)
    model.head = RetinaNetHead(spec.fpn_channels, 3, num_classes)
    model.__class__ = ThreeAnchorRetinaNet
    return model


THREE_ANCHOR_FAMILY = DetectorFamily(
    "retinanet3", ThreeAnchorRetinaNet, build_three_anchor_retinanet, DENSE_STRIDES, "dense", logit_kd=True,
    class_dependent_prefixes=("head.classification_head.",),
    decode=lambda model, codes, anchors: model.box_coder.decode_single(codes, anchors),
)  # fmt: skip


def test_a_registered_family_builds_from_a_recipe_and_distils(tiny_data, tmp_path):
    from detkd.distiller import build_distiller_from_cfg
    from detkd.models.build import detector_family

    torch.manual_seed(0)
    teacher = build_detector("retinanet3", "resnet18", NUM_CLASSES, fpn_channels=32, min_size=64, max_size=64)
    assert detector_family(teacher) == "retinanet3"
    assert list(teacher.anchor_generator.num_anchors_per_location()) == [3] * 5
    ckpt = tmp_path / "t3.pth"
    torch.save(teacher.state_dict(), ckpt)
    path = tiny_recipe(
        tiny_data,
        tmp_path,
        "family",
        teacher={**tiny_model("retinanet3", fpn_channels=32), "checkpoint": str(ckpt)},
        student=tiny_model("retinanet3", fpn_channels=16),
        distill={"features": [{"type": "fgfi"}], "head": [{"type": "logit_kd", "conf_thr": 0.0}]},
    )
    cfg = load_config(path)
    distiller = build_distiller_from_cfg(cfg, NUM_CLASSES).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    losses = distiller(images, targets)
    assert losses["distill/logit_kd/box"] > 0 and losses["distill/fgfi/p3"] > 0  # anchors from the family
    with pytest.raises(ValueError, match=r"retinanet3 teacher with a retinanet student"):
        cfg2 = load_config(path, ["student.arch=retinanet"])
        build_distiller_from_cfg(cfg2, NUM_CLASSES)
    with pytest.raises(ConfigError, match=r"unknown detector 'retinanet4'; valid: .*retinanet3"):
        load_config(path, ["student.arch=retinanet4"])


def test_the_cli_tools_load_a_plugin_that_registers_a_loss(tiny_data, tmp_path, teacher_ckpt):
    """tools/train_distill.py and tools/visualize_masks.py with ``--plugin my_losses.py``, a file that registers this
    module's ``centre_mse`` and ``score_mse``; nothing in detkd names them."""
    from conftest import REPO, run_tool

    plugin = tmp_path / "my_losses.py"  # what a user writes: import the classes, register them
    plugin.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_extending import CentreWeightedMSE, ScoreMSE\n"
        "from detkd.losses import register_feature_loss, register_head_loss\n"
        "register_feature_loss('centre_mse', CentreWeightedMSE)\nregister_head_loss('score_mse', ScoreMSE)\n"
    )
    plugin = str(plugin)
    recipe = plugin_recipe(tiny_data, tmp_path, teacher_ckpt)
    proc = run_tool("train_distill.py", "--plugin", plugin, "--cfg", str(recipe), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    work = Path(load_config(recipe).work_dir)
    first = json.loads((work / "metrics.jsonl").read_text().splitlines()[0])
    assert "distill/centre_mse/p3" in first and "distill/score_mse" in first
    vis = run_tool("visualize_masks.py", "--plugin", plugin, "--cfg", str(recipe), "--ckpt",
                   str(work / "student_best.pth"), "--num-images", "1", "--out", str(tmp_path / "vis"))  # fmt: skip
    assert vis.returncode == 0, vis.stderr[-2000:]
    assert "centre_mse" in (tmp_path / "vis" / "index.html").read_text()
    from detkd.plugins import load_plugins

    with pytest.raises(ConfigError, match=r"--plugin .*nope\.py: no such file"):
        load_plugins([str(tmp_path / "nope.py")])
    with pytest.raises(ConfigError, match=r"--plugin no_such_module: module not found"):
        load_plugins(["no_such_module"])
