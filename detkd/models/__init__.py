"""torchvision detectors built by name (``build``) and reached through forward hooks (``taps``)."""

from detkd.models.build import (
    BACKBONES,
    DETECTORS,
    build_detector,
    build_detector_from_cfg,
    detector_family,
    list_backbones,
    list_detectors,
    load_detector_weights,
)
from detkd.models.taps import FeatureTap, feature_channels, feature_strides, merge_levels, split_per_level

__all__ = [
    "BACKBONES",
    "DETECTORS",
    "FeatureTap",
    "build_detector",
    "build_detector_from_cfg",
    "detector_family",
    "feature_channels",
    "feature_strides",
    "list_backbones",
    "list_detectors",
    "load_detector_weights",
    "merge_levels",
    "split_per_level",
]
