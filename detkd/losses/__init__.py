"""Distillation losses: feature losses (masks below them, the Distiller above), head losses, and their registries.

The protocol every loss follows (what it declares it needs from the step's record, the per-location weight it shows
in the mask pictures) is in :mod:`detkd.losses.base`. ``FEATURE_LOSSES`` / ``HEAD_LOSSES`` map config names to
classes; :func:`register_feature_loss` / :func:`register_head_loss` add a loss defined outside detkd, after which a
recipe's ``distill.features`` / ``distill.head`` may name it (config validation, ``train_distill.py``,
``visualize_masks.py`` and the TensorBoard mask images all read these registries).
"""

from detkd.losses.base import NEEDS, FeatureLoss, HeadLoss, PairInfo
from detkd.losses.context import LevelContext, StepRecord
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
    "NEEDS",
    "FeatureLoss",
    "HeadLoss",
    "PairInfo",
    "LevelContext",
    "StepRecord",
    "build_feature_loss",
    "list_feature_losses",
    "list_head_losses",
    "register_feature_loss",
    "register_head_loss",
    "MSEFeatureLoss",
    "FGFILoss",
    "DeFeatLoss",
    "GIDFeatureLoss",
    "AttentionGuidedLoss",
    "FGDLoss",
    "PKDLoss",
    "CWDLoss",
]


def _register(registry: dict, kind: str, base: type, name: str, cls: type) -> type:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a {kind} loss name must be an identifier (it appears in recipes and log keys), got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{kind} loss '{name}' must be a subclass of detkd.losses.{base.__name__}, got {cls!r}")
    if name in registry and registry[name] is not cls:
        raise ValueError(f"{kind} loss '{name}' is already registered (by {registry[name].__qualname__})")
    unknown = set(getattr(cls, "needs", frozenset())) - NEEDS
    if unknown:
        valid = ", ".join(sorted(NEEDS))
        raise ValueError(f"{kind} loss '{name}' needs {sorted(unknown)}, which no record provides; valid: {valid}")
    registry[name] = cls
    return cls


def register_feature_loss(name: str, cls: type) -> type:
    """Make ``cls`` (a :class:`FeatureLoss` subclass) available to recipes as ``distill.features: [{type: name}]``.

    Its constructor's annotated keyword arguments are the recipe parameters (validated when a recipe loads).
    Returns ``cls``, so it also works as ``register_feature_loss("mine", MyLoss)`` after the class.

    Raises:
        TypeError: ``cls`` is not a FeatureLoss subclass.
        ValueError: the name is taken by another class, or ``cls.needs`` names something no record provides.
    """
    return _register(FEATURE_LOSSES, "feature", FeatureLoss, name, cls)


def register_head_loss(name: str, cls: type) -> type:
    """Make ``cls`` (a :class:`HeadLoss` subclass) available to recipes as ``distill.head: [{type: name}]``.

    Raises:
        TypeError: ``cls`` is not a HeadLoss subclass.
        ValueError: the name is taken by another class, or ``cls.needs`` names something no record provides.
    """
    return _register(HEAD_LOSSES, "head", HeadLoss, name, cls)


def list_head_losses() -> list[str]:
    """The registered head-loss names, sorted."""
    return sorted(HEAD_LOSSES)
