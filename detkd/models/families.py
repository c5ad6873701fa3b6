"""One place per detector family: how detkd builds it and what distillation needs to know about it.

A :class:`DetectorFamily` names everything family-specific that the rest of detkd asks about: the torchvision class,
the builder, the FPN strides, where the anchors (or points) come from, how box codes decode, the input
normalisation, whether its dense-head logits can be distilled position by position, and which state-dict prefixes
depend on the number of classes. Nothing outside this module and the builders spells a family name.

Adding a family: write its builder (``builder(spec, num_classes, backbone_state_dict) -> nn.Module``, see
:mod:`detkd.models.build`) and call :func:`register_family` with a :class:`DetectorFamily` — both can live in one
new file imported by the recipe's code or by ``detkd/models/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from torch import Tensor, nn

from detkd.models.spec import DetectorSpec

__all__ = ["DetectorFamily", "FAMILIES", "register_family", "get_family", "family_of", "list_families"]

Builder = Callable[[DetectorSpec, int, Optional[dict]], nn.Module]


@dataclass(frozen=True)
class DetectorFamily:
    """What detkd knows about one detector family.

    Attributes:
        name: the recipe's ``arch`` value.
        model_class: the torchvision class its builder returns (``family_of`` matches on it).
        builder: ``builder(spec, num_classes, backbone_state_dict) -> model``.
        strides: output strides of its feature levels, fine to coarse.
        head: ``"dense"`` (one-stage head on every FPN location: ``model.head``), ``"two_stage"`` (RPN + ROI
            heads) or ``"ssd"`` (SSD head on the extractor's maps).
        logit_kd: its dense-head logits line up position by position with another detector of the same family
            (same anchors per location and levels), so response KD can compare them.
        class_dependent_prefixes: state-dict prefixes whose shapes depend on ``num_classes``.
        anchor_attr: dotted attribute path of the anchor generator (``"anchor_generator"``,
            ``"rpn.anchor_generator"``).
        decode: ``decode(model, rel_codes (P, 4), anchors (P, 4)) -> boxes (P, 4)`` xyxy, or None when the family
            has no per-anchor box codes that detkd distils.
        image_losses: ``image_losses(model, image_list, backbone_out, head_outputs, targets) -> (N,)``, the model's
            own detection loss on each image from outputs it already computed (:mod:`detkd.models.image_losses`;
            the ``confidence`` weighting of several teachers), or None when the family has none.
        image_losses_need_head: ``image_losses`` reads the dense-head outputs (the teacher must compute them).
    """

    name: str
    model_class: type
    builder: Builder
    strides: tuple[int, ...]
    head: Literal["dense", "two_stage", "ssd"]
    logit_kd: bool = False
    class_dependent_prefixes: tuple[str, ...] = ()
    anchor_attr: str = "anchor_generator"
    decode: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    image_losses: Optional[Callable[..., Tensor]] = None
    image_losses_need_head: bool = False

    def anchor_generator(self, model: nn.Module) -> Optional[nn.Module]:
        """The module that makes the model's anchors / points / default boxes (None if it has none)."""
        obj = model
        for part in self.anchor_attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def anchors_per_location(self, model: nn.Module) -> list[int]:
        """Anchors (or points) per feature location, per level."""
        generator = self.anchor_generator(model)
        if generator is None or not hasattr(generator, "num_anchors_per_location"):
            return []
        return [int(a) for a in generator.num_anchors_per_location()]

    @staticmethod
    def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per RGB channel that the model's transform applies to ``[0, 1]`` images."""
        transform = model.transform
        return tuple(float(v) for v in transform.image_mean), tuple(float(v) for v in transform.image_std)


FAMILIES: dict[str, DetectorFamily] = {}


def register_family(family: DetectorFamily) -> DetectorFamily:
    """Add a family to the registry (its ``name`` becomes a valid ``arch``); returns it."""
    if family.name in FAMILIES:
        raise ValueError(f"detector family '{family.name}' is already registered")
    FAMILIES[family.name] = family
    return family


def list_families() -> list[str]:
    """The registered family names (valid ``arch`` values), sorted."""
    return sorted(FAMILIES)


def get_family(name: str) -> DetectorFamily:
    """The family registered as ``name``; the error lists the valid names."""
    if name not in FAMILIES:
        raise ValueError(f"unknown detector '{name}'; valid: {', '.join(list_families())}")
    return FAMILIES[name]


def family_of(model: nn.Module) -> DetectorFamily:
    """The family of a built detector (a DDP wrapper is unwrapped)."""
    model = getattr(model, "module", model)
    for family in FAMILIES.values():
        if type(model) is family.model_class:
            return family
    for family in FAMILIES.values():  # subclasses of a registered class
        if isinstance(model, family.model_class):
            return family
    names: Sequence[str] = [f.model_class.__name__ for f in FAMILIES.values()]
    raise TypeError(f"{type(model).__name__} is not a {', '.join(names)} detector")
