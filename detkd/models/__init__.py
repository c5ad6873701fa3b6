"""torchvision detectors: one parameter spec (``spec``), one entry per family (``families``), built by name
(``build``) and recorded through forward hooks (``taps``)."""

from detkd.models.build import (
    BACKBONES,
    DETECTORS,
    build_detector,
    build_detector_from_cfg,
    build_detector_from_spec,
    detector_family,
    list_backbones,
    list_detectors,
    load_detector_weights,
)
from detkd.models.families import FAMILIES, DetectorFamily, family_of, get_family, list_families, register_family
from detkd.models.spec import DetectorSpec
from detkd.models.taps import FeatureTap, feature_channels, feature_strides, merge_levels, split_per_level

__all__ = [
    "BACKBONES",
    "DETECTORS",
    "FAMILIES",
    "DetectorFamily",
    "DetectorSpec",
    "FeatureTap",
    "build_detector",
    "build_detector_from_cfg",
    "build_detector_from_spec",
    "detector_family",
    "family_of",
    "feature_channels",
    "feature_strides",
    "get_family",
    "list_backbones",
    "list_detectors",
    "list_families",
    "load_detector_weights",
    "merge_levels",
    "register_family",
    "split_per_level",
]
