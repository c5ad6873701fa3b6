"""Distillation losses: feature losses (masks below them, the Distiller above) and their registries.

``FEATURE_LOSSES`` maps config names to loss classes; ``build_feature_loss(type, **params)`` instantiates one and
names the valid choices on error. ``HEAD_LOSSES`` (head losses) is re-exported from ``detkd.losses.head``.
"""

from detkd.losses.context import LevelContext
from detkd.losses.feature import (
    FEATURE_LOSSES,
    AttentionGuidedLoss,
    CWDLoss,
    DeFeatLoss,
    FGDLoss,
    FGFILoss,
    GIDFeatureLoss,
    MSEFeatureLoss,
    PKDLoss,
    build_feature_loss,
    list_feature_losses,
)
from detkd.losses.head import HEAD_LOSSES

__all__ = [
    "FEATURE_LOSSES",
    "HEAD_LOSSES",
    "LevelContext",
    "build_feature_loss",
    "list_feature_losses",
    "MSEFeatureLoss",
    "FGFILoss",
    "DeFeatLoss",
    "GIDFeatureLoss",
    "AttentionGuidedLoss",
    "FGDLoss",
    "PKDLoss",
    "CWDLoss",
]
