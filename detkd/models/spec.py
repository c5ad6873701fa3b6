"""The one parameter specification of a detector (torch-free, so the config can import it cheaply).

:class:`DetectorSpec` is what ``build_detector`` accepts, what every family's builder receives, and what the recipe's
``model`` / ``teacher`` / ``student`` sections are (``detkd.config.ModelCfg`` extends it with recipe-only fields).
A new detector option is added here, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

__all__ = ["DetectorSpec", "spec_fields", "to_spec"]


@dataclass(frozen=True)
class DetectorSpec:
    """A torchvision detector by name and options.

    Attributes:
        arch: a registered family (``fcos``, ``faster_rcnn``, ``retinanet``, ``ssdlite``; see
            ``detkd.models.families``).
        backbone: ``resnet18/34/50/101`` or ``mobilenet_v3_large/small`` (ssdlite: MobileNetV3 only).
        fpn_channels: FPN width (ignored by ssdlite).
        min_size: torchvision transform ``min_size`` (ssdlite: the fixed square input side).
        max_size: torchvision transform ``max_size``.
        weights: torchvision detector weights, e.g. ``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"``; they must match
            the built layout (arch, backbone, ``fpn_channels=256``, 9/1/3 anchors per location); class-dependent
            predictor layers whose shape differs are skipped with a warning.
        weights_backbone: torchvision ImageNet weights of the backbone, e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``;
            ignored (with a warning) when ``weights`` is given.
        checkpoint: path of a detector state_dict / detkd checkpoint, loaded last and strictly.
        score_thresh: post-processing score threshold.
        nms_thresh: post-processing NMS IoU threshold.
        detections_per_img: detections kept per image.
        anchor_sizes: base anchor size in pixels per level, fine to coarse; default ``2 * stride``
            (see ``detkd.models.build``).
        norm: ``"bn"`` (trainable BatchNorm) or ``"frozen_bn"`` (``FrozenBatchNorm2d`` in the backbone).
    """

    arch: str
    backbone: str
    fpn_channels: int = 256
    min_size: int = 128
    max_size: int = 128
    weights: Optional[str] = None
    weights_backbone: Optional[str] = None
    checkpoint: Optional[str] = None
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    anchor_sizes: Optional[tuple[int, ...]] = None
    norm: Literal["bn", "frozen_bn"] = "bn"


def spec_fields() -> tuple[str, ...]:
    """The names of :class:`DetectorSpec`'s fields, in order."""
    return tuple(f.name for f in dataclasses.fields(DetectorSpec))


def to_spec(cfg: Any) -> DetectorSpec:
    """The :class:`DetectorSpec` part of a config section (a ``ModelCfg`` subclass, a spec, or a mapping).

    Recipe-only fields of the subclasses (``init``, ``train_if_missing`` ...) are not detector options and are left
    out; a mapping or another dataclass must hold only spec fields.

    Raises:
        ValueError: a mapping with keys that are not detector options (the message lists the accepted ones).
    """
    if isinstance(cfg, DetectorSpec):
        values = {name: getattr(cfg, name) for name in spec_fields()}
    elif isinstance(cfg, Mapping) or dataclasses.is_dataclass(cfg):
        cfg = dict(cfg) if isinstance(cfg, Mapping) else {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        unknown = sorted(set(cfg) - set(spec_fields()))
        if unknown:
            raise ValueError(f"unknown detector option(s) {unknown}; accepted: {', '.join(spec_fields())}")
        values = dict(cfg)
    else:
        raise TypeError(f"expected a DetectorSpec or a mapping, got {type(cfg).__name__}")
    if values.get("anchor_sizes") is not None:
        values["anchor_sizes"] = tuple(values["anchor_sizes"])
    return DetectorSpec(**values)
