"""Detector registry/builders (detkd.models.build) and feature/head taps (detkd.models.taps).

Tiny detectors only: ResNet18 / MobileNetV3-Small, ``fpn_channels=32``, 64 px inputs, CPU, no network.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.error
from typing import Optional

import pytest
import torch
from torch import nn

from detkd.models.build import (
    BACKBONES,
    build_detector,
    build_detector_from_cfg,
    detector_family,
    list_backbones,
    list_detectors,
    load_detector_weights,
)
from detkd.models.taps import (
    FeatureTap,
    feature_channels,
    feature_strides,
    infer_strides,
    merge_levels,
    split_per_level,
)

SMALL = {"fpn_channels": 32, "min_size": 64, "max_size": 64}
ARCHS = [
    ("retinanet", "resnet18"),
    ("fcos", "resnet18"),
    ("faster_rcnn", "resnet18"),
    ("ssdlite", "mobilenet_v3_small"),
]
NUM_CLASSES = 4  # labels 1..3 + background


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two fixed 64x64 images with three boxes (8 to 34 px), labels in 1..3."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[5.0, 6.0, 30.0, 40.0], [34.0, 30.0, 60.0, 52.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 26.0, 28.0]]), "labels": torch.tensor([3])},
    ]
    return images, targets


def _small(arch: str, backbone: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_detector(arch, backbone, NUM_CLASSES, **{**SMALL, **kwargs})


# ----------------------------------------------------------------------------------------------------------------
# Building and training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,backbone", ARCHS)
def test_train_forward_gives_finite_losses_and_eval_gives_boxes_inside_image(arch: str, backbone: str) -> None:
    model = _small(arch, backbone, score_thresh=0.0)
    images, targets = _batch()
    losses = model(images, targets)
    assert len(losses) >= 2
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert sum(v.item() for v in losses.values()) > 0
    assert all(p.requires_grad for p in model.parameters())  # from scratch: nothing frozen

    model.eval()
    with torch.no_grad():
        # original sizes differ from the 64 px network input: boxes must come back in original pixels
        dets = model([torch.rand(3, 60, 80), torch.rand(3, 50, 40)])
    for det, (h, w) in zip(dets, [(60, 80), (50, 40)]):
        boxes = det["boxes"]
        assert boxes.shape[0] > 0 and boxes.shape[1] == 4
        assert det["scores"].shape == det["labels"].shape == (boxes.shape[0],)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w + 1e-4).all() and (boxes[:, 3] <= h + 1e-4).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert int(det["labels"].max()) < NUM_CLASSES


@pytest.mark.parametrize("arch,backbone", ARCHS)
def test_overfits_one_batch(arch: str, backbone: str) -> None:
    """15 AdamW steps on one fixed batch: the summed loss drops to under 75 % of its start."""
    model = _small(arch, backbone)
    images, targets = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    history = []
    for _ in range(15):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert min(history[-2:]) < 0.75 * history[0], history


@pytest.mark.parametrize("backbone", list_backbones())
def test_every_backbone_feeds_faster_rcnn_levels_p2_to_p6(backbone: str) -> None:
    """Stage channels/indices of every backbone are right (a wrong in_channels list would fail the forward)."""
    model = _small("faster_rcnn", backbone, fpn_channels=16)
    assert feature_strides(model, 64) == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert feature_channels(model, 64) == dict.fromkeys(["p2", "p3", "p4", "p5", "p6"], 16)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_mobilenet_fpn_has_sensible_strides(arch: str) -> None:
    model = _small(arch, "mobilenet_v3_large")
    assert feature_strides(model, 128) == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


def test_ssdlite_levels_and_channels() -> None:
    model = _small("ssdlite", "mobilenet_v3_small")
    assert feature_strides(model, 64) == {"p4": 16, "p5": 32, "p6": 64, "p7": 128, "p8": 256, "p9": 512}
    # C4 expansion (288) and C5 (576) of MobileNetV3-Small, then torchvision's SSDLite extra blocks
    assert list(feature_channels(model, 64).values()) == [288, 576, 512, 256, 256, 128]
    assert model.transform.fixed_size == (64, 64)


def test_default_anchor_sizes_follow_two_times_stride() -> None:
    retina = _small("retinanet", "resnet18")
    assert retina.anchor_generator.sizes[0] == (16, 20, 25)  # 16 * 2**(0, 1/3, 2/3), truncated like torchvision
    assert [s[0] for s in retina.anchor_generator.sizes] == [16, 32, 64, 128, 256]
    assert retina.anchor_generator.num_anchors_per_location() == [9] * 5
    rcnn = _small("faster_rcnn", "resnet18")
    assert rcnn.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    fcos = _small("fcos", "resnet18")
    assert fcos.anchor_generator.sizes == ((4.0,), (8.0,), (16.0,), (32.0,), (64.0,))  # base / 4
    assert fcos.center_sampling_radius == pytest.approx(3.0)  # 1.5 strides in pixels: 3.0 * 4 px = 1.5 * 8 px
    ssd = _small("ssdlite", "mobilenet_v3_small")
    assert ssd.anchor_generator.scales[0] == pytest.approx(0.1) and ssd.anchor_generator.scales[5] == pytest.approx(
        0.95
    )


def test_torchvision_anchor_sizes_are_reproducible() -> None:
    retina = _small("retinanet", "resnet18", anchor_sizes=[32, 64, 128, 256, 512])
    assert retina.anchor_generator.sizes[0] == (32, 40, 50)
    fcos = _small("fcos", "resnet18", anchor_sizes=[32, 64, 128, 256, 512])
    assert fcos.anchor_generator.sizes == ((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))
    assert fcos.center_sampling_radius == pytest.approx(1.5)
    ssd = _small("ssdlite", "mobilenet_v3_small", anchor_sizes=[8, 16, 24, 32, 48, 64])
    assert ssd.anchor_generator.scales == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"anchor_sizes for retinanet must be 5 positive sizes"):
        _small("retinanet", "resnet18", anchor_sizes=[16, 32])


@pytest.mark.parametrize("channels,groups", [(32, 16), (48, 24), (64, 32)])
def test_fcos_group_norm_keeps_two_channels_per_group(channels: int, groups: int) -> None:
    """GroupNorm(32, 32) would normalise single values on 1x1 levels (and fail for a batch of one)."""
    model = _small("fcos", "resnet18", fpn_channels=channels)
    norms = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8 and all(m.num_groups == groups and m.num_channels == channels for m in norms)
    images, targets = _batch()
    assert all(torch.isfinite(v) for v in model(images[:1], targets[:1]).values())  # P6/P7 are 1x1 here
    model.eval()
    with torch.no_grad():
        p7 = model.head.classification_head.conv(torch.randn(1, channels, 1, 1))
    assert p7.std() > 0  # not collapsed to a constant


def test_frozen_bn_norm() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _small("retinanet", "resnet18", norm="frozen_bn")
    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 20  # ResNet18: 1 stem + 16 + 3 downsample
    with pytest.raises(ValueError, match=r"unknown norm 'gn'; valid: bn, frozen_bn"):
        _small("retinanet", "resnet18", norm="gn")


@pytest.mark.parametrize(
    "arch,family",
    [("retinanet", "retinanet"), ("fcos", "fcos"), ("faster_rcnn", "faster_rcnn"), ("ssdlite", "ssdlite")],
)
def test_detector_family(arch: str, family: str) -> None:
    backbone = "mobilenet_v3_small"
    assert detector_family(_small(arch, backbone)) == family
    with pytest.raises(TypeError, match="not a RetinaNet"):
        detector_family(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------------
# Registry and weight errors
# ----------------------------------------------------------------------------------------------------------------


def test_registries_list_and_errors_name_valid_choices() -> None:
    assert list_detectors() == ["faster_rcnn", "fcos", "retinanet", "ssdlite"]
    assert (
        list_backbones()
        == sorted(BACKBONES)
        == [
            "mobilenet_v3_large",
            "mobilenet_v3_small",
            "resnet101",
            "resnet18",
            "resnet34",
            "resnet50",
        ]
    )
    with pytest.raises(ValueError) as err:
        build_detector("retinet", "resnet18", NUM_CLASSES)
    assert str(err.value) == "unknown detector 'retinet'; valid: faster_rcnn, fcos, retinanet, ssdlite"
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet19'; valid: mobilenet_v3_large, .*resnet50"):
        build_detector("retinanet", "resnet19", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"valid backbones for ssdlite: mobilenet_v3_large, mobilenet_v3_small$"):
        build_detector("ssdlite", "resnet18", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"num_classes must be K \+ 1"):
        build_detector("retinanet", "resnet18", 1)


def test_unknown_or_foreign_weights_names_error() -> None:
    with pytest.raises(ValueError, match=r"unknown torchvision weights 'ResNet18_Weights.NOPE'"):
        build_detector("retinanet", "resnet18", NUM_CLASSES, weights_backbone="ResNet18_Weights.NOPE")
    with pytest.raises(ValueError, match=r"unknown torchvision weights 'NoSuch_Weights.X'"):
        build_detector("retinanet", "resnet18", NUM_CLASSES, weights="NoSuch_Weights.X")
    with pytest.raises(ValueError, match=r"another model; valid for this backbone: ResNet18_Weights.IMAGENET1K_V1"):
        build_detector("retinanet", "resnet18", NUM_CLASSES, weights_backbone="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match=r"not detector weights"):
        build_detector("retinanet", "resnet18", NUM_CLASSES, weights="ResNet18_Weights.IMAGENET1K_V1")


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"weights_backbone": "ResNet18_Weights.IMAGENET1K_V1"}, "ResNet18_Weights.IMAGENET1K_V1"),
        ({"weights": "RetinaNet_ResNet50_FPN_Weights.COCO_V1"}, "RetinaNet_ResNet50_FPN_Weights.COCO_V1"),
    ],
)
def test_failed_download_is_one_clear_runtime_error(monkeypatch, kwargs: dict, name: str) -> None:
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    with pytest.raises(RuntimeError) as err:
        build_detector("retinanet", "resnet18", NUM_CLASSES, **SMALL, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'{name}'" in msg and "https://download.pytorch.org/models/" in msg and "URLError" in msg
    assert "no network access" in msg and "checkpoint: <path>" in msg
    assert isinstance(err.value.__cause__, urllib.error.URLError)


def test_backbone_weights_are_loaded_from_the_fetched_state_dict(monkeypatch) -> None:
    import torchvision

    torch.manual_seed(123)
    imagenet = torchvision.models.resnet18().state_dict()
    calls = []

    def fake_fetch(url, **kwargs):
        calls.append(url)
        return imagenet

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_fetch)
    model = _small("retinanet", "resnet18", weights_backbone="ResNet18_Weights.IMAGENET1K_V1", norm="frozen_bn")
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    body = model.backbone.body.state_dict()
    assert torch.equal(body["conv1.weight"], imagenet["conv1.weight"])
    assert torch.equal(body["layer4.1.bn2.running_var"], imagenet["layer4.1.bn2.running_var"])  # frozen BN buffers


def test_detector_weights_skip_only_class_dependent_layers(monkeypatch) -> None:
    source = _small("retinanet", "resnet18", seed=5)
    source.head.classification_head.cls_logits = nn.Conv2d(32, 9 * 91, 3, padding=1)  # a "COCO" 91-class predictor
    coco_like = source.state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: coco_like)
    with pytest.warns(UserWarning, match=r"class-dependent layers not loaded: head.classification_head.cls_logits"):
        model = _small("retinanet", "resnet18", seed=6, weights="RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    own = model.state_dict()
    assert torch.equal(own["backbone.fpn.layer_blocks.0.0.weight"], coco_like["backbone.fpn.layer_blocks.0.0.weight"])
    assert torch.equal(own["head.regression_head.bbox_reg.weight"], coco_like["head.regression_head.bbox_reg.weight"])
    assert own["head.classification_head.cls_logits.weight"].shape[0] == 9 * NUM_CLASSES


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and config
# ----------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_plain_and_detkd_style(tmp_path) -> None:
    source = _small("retinanet", "resnet18", seed=0)
    source.train()
    images, targets = _batch()
    source(images, targets)  # moves BN running stats away from their defaults
    state = source.state_dict()
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "detkd.pth"
    torch.save(state, plain)
    torch.save({"model": state, "epoch": 3, "cfg": {"name": "x"}}, wrapped)
    for path in (plain, wrapped):
        other = _small("retinanet", "resnet18", seed=1)
        assert not torch.equal(other.head.regression_head.bbox_reg.weight, source.head.regression_head.bbox_reg.weight)
        loaded = _small("retinanet", "resnet18", seed=1, checkpoint=str(path))
        loaded_state = loaded.state_dict()
        assert loaded_state.keys() == state.keys()
        assert all(torch.equal(loaded_state[k], v) for k, v in state.items())

    into = _small("retinanet", "resnet18", seed=2)
    load_detector_weights(into, plain)  # the public function does the same
    assert torch.equal(into.backbone.body.conv1.weight, source.backbone.body.conv1.weight)


def test_checkpoint_errors_name_the_file_and_keys(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        _small("retinanet", "resnet18", checkpoint=str(missing))

    fcos_file = tmp_path / "fcos.pth"
    torch.save(_small("fcos", "resnet18").state_dict(), fcos_file)
    with pytest.raises(RuntimeError, match=r"fcos.pth.*does not fit this RetinaNet.*head\.") as err:
        _small("retinanet", "resnet18", checkpoint=str(fcos_file))
    msg = str(err.value)
    assert "head.classification_head.cls_logits.weight: file (4, 32, 3, 3) vs model (36, 32, 3, 3)" in msg
    assert "16 model keys are missing from it (head.classification_head.conv.0.0.weight" in msg
    assert "of its keys are not in the model (head.classification_head.conv.0.weight" in msg  # FCOS layout

    six_classes = tmp_path / "six.pth"
    torch.manual_seed(0)
    torch.save(build_detector("retinanet", "resnet18", 6, **SMALL).state_dict(), six_classes)
    with pytest.raises(RuntimeError, match=r"head.classification_head.cls_logits.weight: file \(54, 32, 3, 3\) vs "
                                           r"model \(36, 32, 3, 3\)"):  # fmt: skip
        _small("retinanet", "resnet18", checkpoint=str(six_classes))

    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 1}, junk)
    with pytest.raises(ValueError, match=r"junk.pth' holds neither a state_dict"):
        _small("retinanet", "resnet18", checkpoint=str(junk))


def test_build_detector_from_cfg_uses_the_config_dataclasses(tmp_path) -> None:
    from detkd.config import ModelCfg, StudentCfg, TeacherCfg

    for cls in (ModelCfg, TeacherCfg, StudentCfg):
        cfg = cls(arch="fcos", backbone="resnet18", fpn_channels=32, min_size=64, max_size=64, anchor_sizes=(8, 16, 32,
                  64, 128))  # fmt: skip
        model = build_detector_from_cfg(cfg, NUM_CLASSES)
        assert detector_family(model) == "fcos"
        assert model.anchor_generator.sizes[0] == (2.0,)
        assert model.head.classification_head.num_classes == NUM_CLASSES

    @dataclasses.dataclass(frozen=True)
    class WithExtra:
        arch: str = "retinanet"
        backbone: str = "resnet18"
        learning_rate: Optional[float] = None

    expected = r"unknown detector option\(s\) \['learning_rate'\]; accepted: arch, backbone, fpn_channels"
    with pytest.raises(ValueError, match=expected):
        build_detector_from_cfg(WithExtra(), NUM_CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# Taps
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,levels",
    [
        ("retinanet", {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}),
        ("faster_rcnn", {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}),
    ],
)
def test_feature_tap_names_strides_shapes_and_values(arch: str, levels: dict[str, int]) -> None:
    model = _small(arch, "resnet18", max_size=96).eval()
    images = [torch.rand(3, 64, 96), torch.rand(3, 48, 72)]  # both scale to 64 x 96; the batch is 64 x 96
    with torch.no_grad(), FeatureTap(model) as tap:
        model(images)
        assert tap.strides == levels
        assert list(tap.features) == list(levels)
        assert tap.input_hw == (64, 96)
        for name, stride in levels.items():
            assert tuple(tap.features[name].shape) == (2, 32, math.ceil(64 / stride), math.ceil(96 / stride)), name
        recorded = {k: v.clone() for k, v in tap.features.items()}
        keys = dict(tap.level_keys)
    with torch.no_grad():
        batch, _ = model.transform(images)
        direct = model.backbone(batch.tensors)
    assert list(keys.values()) == list(direct)
    for name, key in keys.items():
        assert torch.equal(recorded[name], direct[key]), name


def test_feature_tap_keeps_graph_clears_and_removes() -> None:
    model = _small("retinanet", "resnet18")
    images, targets = _batch()
    tap = FeatureTap(model)
    model(images, targets)
    assert tap.features["p3"].requires_grad and tap.features["p3"].grad_fn is not None  # not detached
    assert set(tap.head_outputs) == {"cls_logits", "bbox_regression"}
    tap.features["p4"].pow(2).mean().backward()
    assert model.backbone.fpn.layer_blocks[1][0].weight.grad is not None
    tap.clear()
    assert tap.features == {} and tap.head_outputs == {} and tap.input_hw is None
    assert tap.strides["p7"] == 128  # measured once, kept
    tap.remove()
    model(images, targets)
    assert tap.features == {}
    assert not model.backbone._forward_hooks and not model.head._forward_hooks


def test_split_per_level_round_trip_and_correspondence_retinanet() -> None:
    model = _small("retinanet", "resnet18", max_size=96).eval()
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 96)]
    with torch.no_grad(), FeatureTap(model) as tap:
        model(images)
        feats, head = dict(tap.features), dict(tap.head_outputs)
    flat = head["cls_logits"]
    a, k = 9, NUM_CLASSES
    locations = sum(f.shape[-2] * f.shape[-1] for f in feats.values())
    assert tuple(flat.shape) == (2, locations * a, k)

    maps = split_per_level(flat, feats)
    assert list(maps) == list(feats)
    assert torch.equal(merge_levels(maps, k), flat)  # exact round trip
    # the per-level map is exactly the classification conv output, computed independently
    cls_head = model.head.classification_head
    with torch.no_grad():
        for name, feat in feats.items():
            expected = cls_head.cls_logits(cls_head.conv(feat))
            assert torch.allclose(maps[name], expected, atol=1e-5), name
    # index arithmetic: level p4, anchor a, class c at (y, x) sits at offset(p4) + (y * W + x) * A + a, column c
    h3, w3 = feats["p3"].shape[-2:]
    h4, w4 = feats["p4"].shape[-2:]
    n, anchor, c, y, x = 1, 7, 2, 2, 5
    flat_row = h3 * w3 * a + (y * w4 + x) * a + anchor
    assert flat[n, flat_row, c] == maps["p4"][n, anchor * k + c, y, x]
    regression = split_per_level(head["bbox_regression"], {name: tuple(f.shape[-2:]) for name, f in feats.items()})
    assert regression["p5"].shape == (2, a * 4, 2, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        split_per_level(flat[:, 1:], feats)


def test_split_per_level_fcos_centerness_and_ssd_anchors() -> None:
    fcos = _small("fcos", "resnet18").eval()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad(), FeatureTap(fcos) as tap:
        fcos(images)
        ctr = split_per_level(tap.head_outputs["bbox_ctrness"], tap.features)
        reg_head = fcos.head.regression_head
        for name, feat in tap.features.items():
            assert torch.allclose(ctr[name], reg_head.bbox_ctrness(reg_head.conv(feat)), atol=1e-5)

    ssd = _small("ssdlite", "mobilenet_v3_small").eval()
    with torch.no_grad(), FeatureTap(ssd) as tap:
        ssd(images)
        maps = split_per_level(tap.head_outputs["cls_logits"], tap.features)
        assert maps["p4"].shape == (1, 6 * NUM_CLASSES, 4, 4)  # 6 default boxes per location
        first = ssd.head.classification_head.module_list[0]
        assert torch.allclose(maps["p4"], first(tap.features["p4"]), atol=1e-5)
        assert torch.equal(merge_levels(maps, NUM_CLASSES), tap.head_outputs["cls_logits"])


def test_infer_strides_handles_collapsed_and_rounded_levels() -> None:
    assert infer_strides((64, 64), [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]) == [8, 16, 32, 64, 128]
    # SSDLite at 320 px: 20, 10, 5, 3, 2, 1 (ceil of 320 / stride)
    ssd = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert infer_strides((320, 320), ssd) == [16, 32, 64, 128, 256, 512]
    with pytest.raises(ValueError, match="strictly increasing"):
        infer_strides((128, 128), [(4, 4), (4, 4)])  # two stride-32 levels cannot both be named p5
