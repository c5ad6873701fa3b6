"""Per-level context handed to every feature loss: geometry, GT boxes, features, head logits and cached masks.

The Distiller builds one :class:`LevelContext` per FPN level and step and passes it to every feature loss on that
level, so losses sharing a mask (e.g. ``fgd`` and ``defeat`` both use the box masks) compute it once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from torch import Tensor

from detkd import masks

__all__ = ["LevelContext"]


@dataclass(eq=False)
class LevelContext:
    """Everything a feature loss may need on one FPN level during one step.

    Attributes:
        name: Level name, e.g. ``"p3"``.
        stride: Nominal stride of the level in pixels (``2 ** level``).
        image_hw: Padded canvas ``(H_img, W_img)`` shared by teacher and student.
        boxes: GT boxes per image, each ``(K_i, 4)`` ``xyxy`` pixels on the canvas.
        s_feat: Student feature after its adapter, (N, C, H, W) (requires grad).
        t_feat: Teacher feature, (N, C, H, W) (no grad).
        anchors: Optional (H, W, A, 4) ``xyxy`` anchors of this level (anchor-based detectors).
        t_cls_logits: Optional teacher classification logits of this level, (N, A*K, H, W).
        s_cls_logits: Optional student classification logits of this level, (N, A*K, H, W).
        logits_per_anchor: False when teacher and student have different anchors per location and the logits were
            reduced to (N, K, H, W) by a max over anchors (the difference mask then uses window candidates).
    """

    name: str
    stride: int
    image_hw: tuple[int, int]
    boxes: list[Tensor]
    s_feat: Tensor
    t_feat: Tensor
    anchors: Optional[Tensor] = None
    t_cls_logits: Optional[Tensor] = None
    s_cls_logits: Optional[Tensor] = None
    logits_per_anchor: bool = True  # False when the logits were reduced over anchors (teacher/student A differ)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def feat_hw(self) -> tuple[int, int]:
        """Spatial size ``(H, W)`` of the (teacher) feature map."""
        return int(self.t_feat.shape[-2]), int(self.t_feat.shape[-1])

    def _cached(self, key: Any, compute: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _feat(self, which: Literal["t", "s"]) -> Tensor:
        if which == "t":
            return self.t_feat.detach()
        if which == "s":
            return self.s_feat
        raise ValueError(f"which must be 't' or 's', got {which!r}")

    def _boxes(self) -> list[Tensor]:
        return [b.to(self.t_feat.device) for b in self.boxes]

    def box_masks(self) -> tuple[Tensor, Tensor]:
        """``(fg, bg)`` of :func:`detkd.masks.box_masks`, each (N, H, W)."""
        return self._cached("box_masks", lambda: masks.box_masks(self._boxes(), self.feat_hw, self.image_hw))

    def spatial_attention(self, which: Literal["t", "s"], temperature: float) -> Tensor:
        """Spatial attention (N, H, W) of the teacher (detached) or the student (with grad)."""
        key = ("spatial", which, float(temperature))
        return self._cached(key, lambda: masks.spatial_attention(self._feat(which), temperature))

    def channel_attention(self, which: Literal["t", "s"], temperature: float) -> Tensor:
        """Channel attention (N, C) of the teacher (detached) or the student (with grad)."""
        key = ("channel", which, float(temperature))
        return self._cached(key, lambda: masks.channel_attention(self._feat(which), temperature))

    def level_anchors(self) -> Tensor:
        """``self.anchors`` or, for anchor-free detectors, RetinaNet-style pseudo-anchors (H, W, 9, 4).

        The pseudo-anchors are centred on every cell with sizes ``4 * stride * 2^(k/3)`` and aspect ratios
        0.5, 1, 2 (see :func:`detkd.masks.grid_anchors`).
        """
        if self.anchors is not None:
            return self.anchors
        return self._cached(
            "pseudo_anchors",
            lambda: masks.grid_anchors(
                self.feat_hw, self.image_hw, masks.retinanet_anchor_sizes(self.stride), device=self.t_feat.device
            ),
        )

    def fgfi(self, psi: float = 0.5) -> Tensor:
        """FGFI imitation mask (N, H, W) in {0, 1} from :meth:`level_anchors` (per-level max IoU)."""
        return self._cached(("fgfi", float(psi)), lambda: masks.fgfi_mask(self.level_anchors(), self._boxes(), psi))

    @property
    def has_cls_logits(self) -> bool:
        """Whether both teacher and student classification logits are available on this level."""
        return self.t_cls_logits is not None and self.s_cls_logits is not None

    def difference(self, top_k: int = 10, nms_iou: float = 0.3, window: int = 5, score_thr: float = 0.0) -> Tensor:
        """GID difference mask (N, H, W) of :func:`detkd.masks.difference_mask` from the cls logits.

        Uses ``self.anchors`` as candidate boxes when present, else square windows. Raises ``ValueError`` when the
        logits are missing (check :attr:`has_cls_logits`, or use :meth:`feature_difference`).
        """
        if not self.has_cls_logits:
            raise ValueError(f"level {self.name}: no teacher/student classification logits for the difference mask")
        key = ("difference", top_k, float(nms_iou), window, float(score_thr))
        return self._cached(
            key,
            lambda: masks.difference_mask(
                self.t_cls_logits,
                self.s_cls_logits,
                self.image_hw,
                anchors=self.anchors if self.logits_per_anchor else None,
                top_k=top_k,
                nms_iou=nms_iou,
                window=window,
                score_thr=score_thr,
            ),
        )

    def feature_difference(self, top_k_ratio: float = 0.1) -> Tensor:
        """Feature-distance difference mask (N, H, W) of :func:`detkd.masks.feature_difference_mask`."""
        return self._cached(
            ("feature_difference", float(top_k_ratio)),
            lambda: masks.feature_difference_mask(self.t_feat, self.s_feat, top_k_ratio),
        )

    def clear(self) -> None:
        """Drop every cached mask (e.g. if the features were replaced)."""
        self._cache.clear()
