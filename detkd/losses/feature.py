"""The feature-loss registry: config names -> :class:`~detkd.losses.base.FeatureLoss` classes.

Each registered class follows the protocol of :mod:`detkd.losses.base` (``forward(s_feat, t_feat, ctx) -> scalar``
on one level, ``needs``, ``weight_map``) and has a constructor of explicit, annotated keyword arguments with
defaults; the config system validates a recipe's parameters against that signature. Losses defined elsewhere join
through :func:`detkd.losses.register_feature_loss`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from detkd.losses.feature_learned import AttentionGuidedLoss, FGDLoss
from detkd.losses.feature_masked import CWDLoss, DeFeatLoss, FGFILoss, GIDFeatureLoss, MSEFeatureLoss, PKDLoss
from detkd.losses.relation import RelationLoss

__all__ = [
    "FEATURE_LOSSES",
    "list_feature_losses",
    "build_feature_loss",
    "MSEFeatureLoss",
    "FGFILoss",
    "DeFeatLoss",
    "GIDFeatureLoss",
    "AttentionGuidedLoss",
    "FGDLoss",
    "PKDLoss",
    "CWDLoss",
]

FEATURE_LOSSES: dict[str, type[nn.Module]] = {
    "mse": MSEFeatureLoss,
    "fgfi": FGFILoss,
    "defeat": DeFeatLoss,
    "gid": GIDFeatureLoss,
    "attention": AttentionGuidedLoss,
    "fgd": FGDLoss,
    "pkd": PKDLoss,
    "cwd": CWDLoss,
    "relation": RelationLoss,
}


def list_feature_losses() -> list[str]:
    """The registered feature-loss names, sorted."""
    return sorted(FEATURE_LOSSES)


def build_feature_loss(type: str, **params: Any) -> nn.Module:
    """Instantiate the feature loss registered as ``type`` with keyword ``params``.

    Raises:
        ValueError: unknown ``type`` (the message lists the valid names) or a parameter the loss does not accept
            (the message lists the accepted ones).
    """
    if type not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss '{type}'; valid: {', '.join(list_feature_losses())}")
    cls = FEATURE_LOSSES[type]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind in kinds]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"feature loss '{type}' got unknown parameter(s) {unknown}; accepted: {', '.join(accepted) or '(none)'}"
        )
    return cls(**params)
