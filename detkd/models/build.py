"""Torchvision detectors from explicit arguments: a registry of architectures and backbones, and their builders.

Every detector is a plain torchvision model (``RetinaNet``, ``FCOS``, ``FasterRCNN``, ``SSD``) assembled from
torchvision's public classes, so a trained state_dict loads back without detkd. The conventions:

* Labels are contiguous ``1..K`` with ``0`` = background, and ``num_classes`` passed here is ``K + 1`` (the
  torchvision convention; RetinaNet/FCOS then carry one never-positive class 0).
* Feature pyramids: RetinaNet and FCOS use P3-P7 (strides 8..128: C3-C5 through an FPN, P6/P7 from P5 with
  ``LastLevelP6P7``), Faster R-CNN uses P2-P5 plus the max-pooled P6 ("pool", strides 4..64). MobileNetV3 backbones
  feed the same FPN from the *last* block of each stride (torchvision's own MobileNet FPN takes the *first* block
  of a stage, which gives two stride-32 levels); SSDLite keeps torchvision's SSDLite feature extractor (strides
  16..512).
* ``norm="bn"`` builds trainable ``BatchNorm2d`` (training from scratch); ``norm="frozen_bn"`` builds
  ``FrozenBatchNorm2d`` in the backbone (fine-tuning a pretrained backbone). No layer is frozen otherwise: every
  parameter is trainable.

Anchor sizes (``anchor_sizes``): one base size in pixels per pyramid level, fine to coarse. torchvision's defaults
are tuned for ~800 px COCO images (RetinaNet 32..512 = 4 x stride on P3-P7; Faster R-CNN 32..512 = 8 x stride on
P2-P6). detkd trains at ~128 px with objects from 8 to 64 px, where those anchors would put a 32 px anchor on the
finest RetinaNet level and leave most levels without a matching object. The default rule here is
**base = 2 x stride** (RetinaNet/FCOS P3..P7: 16, 32, 64, 128, 256; Faster R-CNN P2..P6: 8, 16, 32, 64, 128), so the
stride-8 level carries 16-25 px anchors and 8-64 px objects spread over the three finest levels. Per architecture:

* RetinaNet: three octave scales ``base * 2**(i/3)`` (truncated to int, as torchvision does) times the aspect ratios
  (0.5, 1, 2) -> 9 anchors per location. ``anchor_sizes=[32, 64, 128, 256, 512]`` reproduces torchvision.
* Faster R-CNN: one size ``base`` times the ratios (0.5, 1, 2) -> 3 RPN anchors per location.
  ``[32, 64, 128, 256, 512]`` reproduces torchvision. Proposal counts at test time follow torchvision's low
  resolution (320 px) recipe: 150 pre-/post-NMS proposals per level/image, RPN score threshold 0.05.
* FCOS: torchvision's FCOS "anchor" is a point with a size ``a`` that sets the level's regression range
  ``(4a, 8a)`` (on the largest of the distances l, t, r, b) and the centre-sampling radius
  ``center_sampling_radius * a``. Here ``a = base / 4`` (so with the default rule level l regresses distances in
  ``(2 * stride, 4 * stride)``: P3 < 32 px, P4 32-64 px, P5 64-128 px, ...), and ``center_sampling_radius =
  1.5 * stride / a`` on P3, which keeps the paper's radius of 1.5 strides in pixels (3.0 with the default rule).
  ``[32, 64, 128, 256, 512]`` reproduces torchvision (a = stride, radius 1.5).
* SSDLite: six sizes, one per level (strides 16..512), converted to fractions of the (square) input
  ``base / min_size`` for torchvision's ``DefaultBoxGenerator`` (its last, extra scale is 1.0). SSD boxes are
  image-relative, so the default is the SSD linear rule with ``min_ratio=0.1, max_ratio=0.95`` (12.8..121.6 px at
  128 px; torchvision's SSDLite320 uses 0.2..0.95 at 320 px, whose smallest box, 64 px, would miss small objects).

Pretrained weights (``weights``/``weights_backbone``) are torchvision enum names such as
``"ResNet50_Weights.IMAGENET1K_V1"``; they are fetched with ``torch.hub.load_state_dict_from_url``, which reads the
torch hub cache first, so a file copied into the cache works offline. ``checkpoint`` is a local file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum, get_weight
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet, SSDLiteHead
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from detkd.engine.checkpoint import load_detector_weights, load_state_dict_checked
from detkd.models.families import FAMILIES, DetectorFamily, family_of, get_family, list_families, register_family
from detkd.models.image_losses import fcos_image_losses, retinanet_image_losses, two_stage_image_losses
from detkd.models.spec import DetectorSpec, to_spec

StateDict = Mapping[str, torch.Tensor]

NORMS = ("bn", "frozen_bn")

DENSE_STRIDES = (8, 16, 32, 64, 128)  # RetinaNet / FCOS: P3-P7
RCNN_STRIDES = (4, 8, 16, 32, 64)  # Faster R-CNN: P2-P5 + pool
SSD_STRIDES = (16, 32, 64, 128, 256, 512)  # SSDLite: C4 expansion, C5, four extra blocks
ASPECT_RATIOS = (0.5, 1.0, 2.0)


# ----------------------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneInfo:
    """A registered classification backbone.

    Attributes:
        family: ``"resnet"`` or ``"mobilenet_v3"``.
        builder: torchvision's model function, called as ``builder(weights=None, norm_layer=...)``.
        weights_enum: torchvision's weights enum of that model (valid ``weights_backbone`` values).
    """

    family: str
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum]


BACKBONES: dict[str, BackboneInfo] = {
    "resnet18": BackboneInfo("resnet", torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
    "resnet34": BackboneInfo("resnet", torchvision.models.resnet34, torchvision.models.ResNet34_Weights),
    "resnet50": BackboneInfo("resnet", torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": BackboneInfo("resnet", torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
    "mobilenet_v3_large": BackboneInfo(
        "mobilenet_v3", torchvision.models.mobilenet_v3_large, torchvision.models.MobileNet_V3_Large_Weights
    ),
    "mobilenet_v3_small": BackboneInfo(
        "mobilenet_v3", torchvision.models.mobilenet_v3_small, torchvision.models.MobileNet_V3_Small_Weights
    ),
}


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(BACKBONES)


def _backbone_info(name: str) -> BackboneInfo:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; valid: {', '.join(list_backbones())}")
    return BACKBONES[name]


def _norm_layer(norm: str, family: str) -> Callable[..., nn.Module]:
    """The backbone normalisation layer; MobileNetV3 keeps torchvision's eps/momentum so pretrained weights fit."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}'; valid: {', '.join(NORMS)}")
    if family == "mobilenet_v3":
        if norm == "bn":
            return partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        return partial(FrozenBatchNorm2d, eps=0.001)
    return nn.BatchNorm2d if norm == "bn" else FrozenBatchNorm2d


def build_classifier_backbone(
    name: str, norm: str = "bn", state_dict: Optional[StateDict] = None, **kwargs: Any
) -> nn.Module:
    """The torchvision classification model behind a backbone name (classifier head included).

    Args:
        name: a key of :data:`BACKBONES`.
        norm: ``"bn"`` or ``"frozen_bn"``.
        state_dict: optional ImageNet weights of that model (loaded strictly).
        **kwargs: passed to the torchvision model function (e.g. ``reduced_tail`` for MobileNetV3).

    Returns:
        The ``ResNet`` / ``MobileNetV3`` module.
    """
    info = _backbone_info(name)
    model = info.builder(weights=None, norm_layer=_norm_layer(norm, info.family), **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def _mobilenet_block_strides(features: nn.Sequential) -> list[int]:
    """Output stride of each block of ``MobileNetV3.features`` (block 0 has stride 2; ``_is_cn`` blocks halve)."""
    strides, stride = [], 1
    for i, block in enumerate(features):
        if i == 0 or getattr(block, "_is_cn", False):
            stride *= 2
        strides.append(stride)
    return strides


def build_fpn_backbone(
    name: str,
    strides: Sequence[int],
    fpn_channels: int,
    extra_blocks: ExtraFPNBlock,
    norm: str = "bn",
    state_dict: Optional[StateDict] = None,
) -> BackboneWithFPN:
    """A backbone + FPN that returns the backbone levels at ``strides`` and the extra levels of ``extra_blocks``.

    ResNet: ``layer{i}`` has stride ``2**(i + 1)``. MobileNetV3: the last block of ``features`` at each stride, so
    every level is the deepest feature of its resolution.

    Args:
        name: a key of :data:`BACKBONES`.
        strides: strides of the backbone levels fed to the FPN, e.g. ``(8, 16, 32)``; each in 4..32.
        fpn_channels: FPN output channels (the same on every level).
        extra_blocks: ``LastLevelP6P7`` or ``LastLevelMaxPool``.
        norm: ``"bn"`` or ``"frozen_bn"`` (backbone only; the FPN has no normalisation, as in torchvision).
        state_dict: optional ImageNet weights of the classification model.

    Returns:
        ``BackboneWithFPN`` whose forward maps ``(N, 3, H, W)`` to an ordered dict of ``(N, fpn_channels, h, w)``.
    """
    info = _backbone_info(name)
    model = build_classifier_backbone(name, norm, state_dict)
    if info.family == "resnet":
        expansion = type(model.layer1[0]).expansion
        stages = {4: 1, 8: 2, 16: 3, 32: 4}
        body: nn.Module = model
        return_layers = {f"layer{stages[s]}": str(i) for i, s in enumerate(strides)}
        in_channels = [64 * 2 ** (stages[s] - 1) * expansion for s in strides]
    else:
        body = model.features
        block_strides = _mobilenet_block_strides(body)
        last = {s: max(i for i, bs in enumerate(block_strides) if bs == s) for s in set(block_strides)}
        return_layers = {str(last[s]): str(i) for i, s in enumerate(strides)}
        in_channels = [body[last[s]].out_channels for s in strides]
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra_blocks)


# ----------------------------------------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------------------------------------


def _base_sizes(anchor_sizes: Optional[Sequence[float]], strides: Sequence[int], arch: str) -> list[float]:
    if anchor_sizes is None:
        return [2.0 * s for s in strides]
    sizes = [float(s) for s in anchor_sizes]
    if len(sizes) != len(strides) or min(sizes) <= 0:
        raise ValueError(
            f"anchor_sizes for {arch} must be {len(strides)} positive sizes in pixels, one per level (strides "
            f"{', '.join(map(str, strides))}); got {list(anchor_sizes)}"
        )
    return sizes


def build_retinanet(spec: DetectorSpec, num_classes: int, backbone_state_dict: Optional[StateDict] = None) -> RetinaNet:
    """RetinaNet on P3-P7 with 9 anchors per location (sizes: see the module docstring).

    Every builder takes the same arguments: the :class:`~detkd.models.spec.DetectorSpec` (``backbone``,
    ``fpn_channels``, ``min_size``/``max_size``, ``norm``, ``anchor_sizes``, the post-processing ``score_thresh``,
    ``nms_thresh``, ``detections_per_img``), ``num_classes = K + 1`` (class 0 is background and never positive) and
    the optional ImageNet weights of the backbone.

    Returns:
        ``torchvision.models.detection.RetinaNet``.
    """
    bases = _base_sizes(spec.anchor_sizes, DENSE_STRIDES, "retinanet")
    sizes = tuple(tuple(int(b * 2 ** (i / 3)) for i in range(3)) for b in bases)
    anchor_gen = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))
    return RetinaNet(
        _dense_fpn(spec, backbone_state_dict),
        num_classes,
        min_size=spec.min_size,
        max_size=spec.max_size,
        anchor_generator=anchor_gen,
        score_thresh=spec.score_thresh,
        nms_thresh=spec.nms_thresh,
        detections_per_img=spec.detections_per_img,
    )


def _dense_fpn(spec: DetectorSpec, backbone_state_dict: Optional[StateDict]) -> BackboneWithFPN:
    """P3-P5 from the backbone + P6/P7 from P5 (RetinaNet and FCOS)."""
    extra = LastLevelP6P7(spec.fpn_channels, spec.fpn_channels)
    return build_fpn_backbone(
        spec.backbone, DENSE_STRIDES[:3], spec.fpn_channels, extra, spec.norm, backbone_state_dict
    )


def _fcos_groups(channels: int) -> int:
    """GroupNorm groups of the FCOS head: the most groups (at most torchvision's 32) leaving >= 2 channels each.

    With one channel per group (``GroupNorm(32, 32)``) a 1x1 level (P7 at 128 px) would normalise a single value:
    constant output in eval mode and an error for a batch of one.
    """
    valid = [g for g in range(1, 33) if channels % g == 0 and channels // g >= 2]
    if not valid:
        raise ValueError(f"fpn_channels must be at least 2 for fcos; got {channels}")
    return max(valid)


def build_fcos(spec: DetectorSpec, num_classes: int, backbone_state_dict: Optional[StateDict] = None) -> FCOS:
    """FCOS on P3-P7 (one point per location; regression ranges and sampling radius: see the module docstring).

    The FCOS head normalises with torchvision's ``GroupNorm(32)`` when every group keeps at least 2 channels
    (``fpn_channels`` a multiple of 64); otherwise with the most groups that do (e.g. 16 for 32 channels, 24 for 48).
    Arguments as :func:`build_retinanet`.

    Returns:
        ``torchvision.models.detection.FCOS``.
    """
    bases = _base_sizes(spec.anchor_sizes, DENSE_STRIDES, "fcos")
    points = [b / 4.0 for b in bases]
    anchor_gen = AnchorGenerator(tuple((p,) for p in points), ((1.0,),) * len(points))
    body = _dense_fpn(spec, backbone_state_dict)
    fpn_channels = spec.fpn_channels
    groups = _fcos_groups(fpn_channels)
    if groups == 32:
        head = FCOSHead(fpn_channels, 1, num_classes)
    else:  # FCOSHead hard-codes GroupNorm(32): build it narrow, then give it sub-heads of the right width
        head = FCOSHead(64, 1, num_classes)
        group_norm = partial(nn.GroupNorm, groups)
        head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, norm_layer=group_norm)
        head.regression_head = FCOSRegressionHead(fpn_channels, 1, norm_layer=group_norm)
    return FCOS(
        body,
        num_classes,
        min_size=spec.min_size,
        max_size=spec.max_size,
        anchor_generator=anchor_gen,
        head=head,
        center_sampling_radius=1.5 * DENSE_STRIDES[0] / points[0],
        score_thresh=spec.score_thresh,
        nms_thresh=spec.nms_thresh,
        detections_per_img=spec.detections_per_img,
    )


def build_faster_rcnn(
    spec: DetectorSpec, num_classes: int, backbone_state_dict: Optional[StateDict] = None
) -> FasterRCNN:
    """Faster R-CNN on P2-P5 + pool with 3 RPN anchors per location and torchvision's two-layer MLP box head.

    Arguments as :func:`build_retinanet` (``score_thresh``/``nms_thresh``/``detections_per_img`` are the box
    head's). ROIs are pooled by torchvision's ``MultiScaleRoIAlign`` rule (canonical 224 px on P4), which at 128 px
    pools every box under 112 px from P2, the finest level.

    Returns:
        ``torchvision.models.detection.FasterRCNN``.
    """
    bases = _base_sizes(spec.anchor_sizes, RCNN_STRIDES, "faster_rcnn")
    anchor_gen = AnchorGenerator(tuple((int(b),) for b in bases), (ASPECT_RATIOS,) * len(bases))
    body = build_fpn_backbone(
        spec.backbone, RCNN_STRIDES[:4], spec.fpn_channels, LastLevelMaxPool(), spec.norm, backbone_state_dict
    )
    return FasterRCNN(
        body,
        num_classes,
        min_size=spec.min_size,
        max_size=spec.max_size,
        rpn_anchor_generator=anchor_gen,
        rpn_pre_nms_top_n_test=150,
        rpn_post_nms_top_n_test=150,
        rpn_score_thresh=0.05,
        box_score_thresh=spec.score_thresh,
        box_nms_thresh=spec.nms_thresh,
        box_detections_per_img=spec.detections_per_img,
    )


def build_ssdlite(spec: DetectorSpec, num_classes: int, backbone_state_dict: Optional[StateDict] = None) -> SSD:
    """SSDLite (torchvision's SSDLite320 layout) on a MobileNetV3 backbone, at a fixed square input of ``min_size``.

    The input is resized to ``(min_size, min_size)`` (SSD uses a fixed size; ``max_size`` and ``fpn_channels`` are
    ignored). ``norm`` applies to the MobileNetV3 body; the extra blocks and the head keep torchvision's trainable
    ``BatchNorm2d(eps=0.001, momentum=0.03)``. Inputs are scaled to [-1, 1] as in torchvision's SSDLite. At 128 px the
    three coarsest levels are 1x1, so training needs at least 2 images per batch (BatchNorm statistics).
    torchvision's COCO SSDLite weights use MobileNetV3's reduced tail and do not fit this layout.

    Returns:
        ``torchvision.models.detection.SSD`` with an ``SSDLiteHead``.
    """
    info = _backbone_info(spec.backbone)
    if info.family != "mobilenet_v3":
        valid = ", ".join(n for n in list_backbones() if BACKBONES[n].family == "mobilenet_v3")
        raise ValueError(
            f"detector 'ssdlite' does not support backbone '{spec.backbone}'; valid backbones for ssdlite: {valid}"
        )
    min_size = spec.min_size
    features = build_classifier_backbone(spec.backbone, spec.norm, backbone_state_dict).features
    c5_pos = max(i for i, b in enumerate(features) if getattr(b, "_is_cn", False))
    head_norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    extractor = SSDLiteFeatureExtractorMobileNet(features, c5_pos, head_norm)
    out_channels = [m[-1].out_channels for m in extractor.features] + [m[-1].out_channels for m in extractor.extra]
    if spec.anchor_sizes is None:
        anchor_gen = DefaultBoxGenerator([[2, 3] for _ in SSD_STRIDES], min_ratio=0.1, max_ratio=0.95)
    else:
        scales = [b / min_size for b in _base_sizes(spec.anchor_sizes, SSD_STRIDES, "ssdlite")] + [1.0]
        anchor_gen = DefaultBoxGenerator([[2, 3] for _ in SSD_STRIDES], scales=scales)
    head = SSDLiteHead(out_channels, anchor_gen.num_anchors_per_location(), num_classes, head_norm)
    return SSD(
        extractor,
        anchor_gen,
        (min_size, min_size),
        num_classes,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        head=head,
        score_thresh=spec.score_thresh,
        nms_thresh=spec.nms_thresh,
        detections_per_img=spec.detections_per_img,
        topk_candidates=300,
    )


def _decode_anchor_deltas(model: nn.Module, rel_codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    return model.box_coder.decode_single(rel_codes, anchors)  # RetinaNet's BoxCoder (dx, dy, dw, dh)


def _decode_point_distances(model: nn.Module, rel_codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    return model.box_coder.decode(rel_codes, anchors)  # FCOS's BoxLinearCoder (l, t, r, b)


register_family(
    DetectorFamily(
        "retinanet", RetinaNet, build_retinanet, DENSE_STRIDES, "dense", logit_kd=True,
        class_dependent_prefixes=("head.classification_head.",), decode=_decode_anchor_deltas,
        image_losses=retinanet_image_losses, image_losses_need_head=True,
    )
)  # fmt: skip
register_family(
    DetectorFamily(
        "fcos", FCOS, build_fcos, DENSE_STRIDES, "dense", logit_kd=True,
        class_dependent_prefixes=("head.classification_head.",), decode=_decode_point_distances,
        image_losses=fcos_image_losses, image_losses_need_head=True,
    )
)  # fmt: skip
register_family(
    DetectorFamily(
        "faster_rcnn", FasterRCNN, build_faster_rcnn, RCNN_STRIDES, "two_stage",
        class_dependent_prefixes=("roi_heads.box_predictor.",), anchor_attr="rpn.anchor_generator",
        image_losses=two_stage_image_losses,
    )
)  # fmt: skip
register_family(DetectorFamily("ssdlite", SSD, build_ssdlite, SSD_STRIDES, "ssd"))

DETECTORS: Mapping[str, DetectorFamily] = FAMILIES
"""The registered detector families by ``arch`` name (an alias of :data:`detkd.models.families.FAMILIES`)."""


def list_detectors() -> list[str]:
    """Names of the registered detector architectures, sorted."""
    return list_families()


def detector_family(model: nn.Module) -> str:
    """The registered family name (``"retinanet"``, ``"fcos"``, ``"faster_rcnn"``, ``"ssdlite"`` ...) of a detector."""
    return family_of(model).name


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def resolve_weights(name: str, expected: Optional[type[WeightsEnum]] = None) -> WeightsEnum:
    """A torchvision weights enum from its full name, e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``.

    Args:
        name: ``"<EnumClass>.<MEMBER>"``.
        expected: if given, the enum class the weights must belong to (the error then lists its members).

    Raises:
        ValueError: unknown name, or weights of another model.
    """
    hint = ""
    if expected is not None:
        hint = f"; valid for this backbone: {', '.join(f'{expected.__name__}.{m.name}' for m in expected)}"
    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"unknown torchvision weights '{name}' (expected '<Enum>.<MEMBER>'{hint})") from err
    if expected is not None and not isinstance(weights, expected):
        raise ValueError(f"weights '{name}' belong to another model{hint}")
    return weights


def fetch_weights(weights: WeightsEnum, name: str) -> dict[str, torch.Tensor]:
    """Download (or read from the torch hub cache) the state_dict of torchvision ``weights``.

    Raises:
        RuntimeError: the download failed; the message says how to provide the file offline.
    """
    url = weights.url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    except Exception as err:  # noqa: BLE001 - every failure becomes one actionable message, the cause chained
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        raise RuntimeError(
            f"could not fetch torchvision weights '{name}' from {url} ({type(err).__name__}: {err}). This machine "
            f"may have no network access. Download the file on a machine that has (e.g. `wget {url}`), copy it here "
            f"and either place it at {cache} (torchvision then finds it in its cache without network) or load it "
            f"yourself: a detector state_dict of this exact architecture can be passed as `checkpoint: <path>`."
        ) from err


def _load_checked(model: nn.Module, state: StateDict, source: str, skip_prefixes: Sequence[str] = ()) -> list[str]:
    """:func:`detkd.engine.checkpoint.load_state_dict_checked` (the one checked loader); returns the keys skipped."""
    return load_state_dict_checked(model, state, source, skip_prefixes=skip_prefixes)


# ----------------------------------------------------------------------------------------------------------------
# The one entry point
# ----------------------------------------------------------------------------------------------------------------


def build_detector(arch: str, backbone: str, num_classes: int, **options: Any) -> nn.Module:
    """Build a torchvision detector by name and optionally load weights.

    Args:
        arch: a registered family (see :func:`list_detectors`).
        backbone: ``resnet18/34/50/101`` or ``mobilenet_v3_large/small`` (ssdlite: MobileNetV3 only).
        num_classes: ``K + 1`` for labels ``1..K`` (0 = background).
        **options: the other fields of :class:`~detkd.models.spec.DetectorSpec` (``fpn_channels``, ``min_size``,
            ``max_size``, ``weights``, ``weights_backbone``, ``checkpoint``, ``score_thresh``, ``nms_thresh``,
            ``detections_per_img``, ``anchor_sizes``, ``norm``), documented there.

    Returns:
        The detector, in train mode, all parameters trainable.

    Raises:
        ValueError: unknown arch/backbone/norm/weights name or option, or an unsupported combination.
        RuntimeError: pretrained weights could not be downloaded, or a checkpoint does not fit.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    return build_detector_from_spec(to_spec({"arch": arch, "backbone": backbone, **options}), num_classes)


def build_detector_from_spec(spec: DetectorSpec, num_classes: int) -> nn.Module:
    """:func:`build_detector` from a :class:`~detkd.models.spec.DetectorSpec`."""
    family = get_family(spec.arch)
    info = _backbone_info(spec.backbone)
    if spec.norm not in NORMS:
        raise ValueError(f"unknown norm '{spec.norm}'; valid: {', '.join(NORMS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be K + 1 >= 2 (labels 1..K, 0 = background); got {num_classes}")

    weights, weights_backbone = spec.weights, spec.weights_backbone
    det_weights = resolve_weights(weights) if weights is not None else None
    if det_weights is not None and "detection" not in type(det_weights).__module__:
        raise ValueError(f"weights '{weights}' are not detector weights; use weights_backbone for a classifier")
    backbone_state = None
    if weights_backbone is not None:
        bb_weights = resolve_weights(weights_backbone, info.weights_enum)
        if det_weights is not None:
            warnings.warn(f"weights '{weights}' given: weights_backbone '{weights_backbone}' is ignored", stacklevel=2)
        else:
            backbone_state = fetch_weights(bb_weights, weights_backbone)

    model = family.builder(spec, num_classes, backbone_state)
    if det_weights is not None:
        state = fetch_weights(det_weights, weights)
        skipped = _load_checked(model, state, f"weights '{weights}'", skip_prefixes=family.class_dependent_prefixes)
        if skipped:
            warnings.warn(f"weights '{weights}': class-dependent layers not loaded: {', '.join(skipped)}", stacklevel=2)
    if spec.checkpoint is not None:
        load_detector_weights(model, spec.checkpoint)
    return model


def build_detector_from_cfg(cfg: Any, num_classes: int) -> nn.Module:
    """:func:`build_detector` from a config section (``detkd.config.ModelCfg`` and its subclasses, which extend
    :class:`~detkd.models.spec.DetectorSpec` with recipe-only fields) or a mapping of spec fields.

    Args:
        cfg: the section.
        num_classes: ``K + 1``.
    """
    return build_detector_from_spec(to_spec(cfg), num_classes)
