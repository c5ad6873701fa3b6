"""Feature losses without learnable parts: plain MSE, FGFI, DeFeat, GID, PKD, CWD.

Every module: ``forward(s_feat, t_feat, ctx) -> scalar`` with ``s_feat`` the adapted student feature and ``t_feat``
the teacher feature, both (N, C, H, W), and ``ctx`` the level's :class:`~detkd.losses.context.LevelContext` (masks
are taken from it, so losses sharing a mask compute it once per step). The loss weight lives in the config.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from detkd.losses import functional as KF
from detkd.losses.base import FeatureLoss
from detkd.losses.context import LevelContext

__all__ = ["MSEFeatureLoss", "FGFILoss", "DeFeatLoss", "GIDFeatureLoss", "PKDLoss", "CWDLoss"]


class MSEFeatureLoss(FeatureLoss):
    """Whole-map feature imitation: ``mean_{n,c,h,w} (s - t)^2`` (FitNets-style hint, Romero et al., ICLR 2015).

    Normalised by the number of elements ``N * C * H * W`` (``F.mse_loss``), so its scale does not depend on the
    batch size, the width or the level's resolution. No hyper-parameters.
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: Optional[LevelContext] = None) -> Tensor:
        return KF.feature_mse(s_feat, t_feat)

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """``W = 1 / (N C H W)`` (uniform), ``e = sum_c (s - t)^2``."""
        return _uniform(ctx, 1.0)


class FGFILoss(FeatureLoss):
    """FGFI fine-grained feature imitation (Wang et al., CVPR 2019, "Distilling Object Detectors with Fine-grained
    Feature Imitation").

    ``loss = sum_{n,c,h,w} I (s - t)^2 / (2 N_p)`` with ``I`` the imitation mask of
    :func:`detkd.masks.fgfi_mask` (``N_p = sum I``, locations). The mask uses ``ctx.anchors``; an anchor-free
    detector gets RetinaNet-style pseudo-anchors (9 per cell, sizes ``4 * stride * 2^(k/3)``, ratios 0.5/1/2,
    centred on the cell) so it never fails. The maximum IoU per box is taken over this level only (the paper uses
    all levels; see ``fgfi_mask(max_iou=...)``). The paper's imitation weight ``lambda = 0.01`` is the config weight.

    Args:
        psi: Relative IoU threshold (paper: 0.5).
    """

    def __init__(self, psi: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < psi < 1.0:
            raise ValueError(f"psi must be in (0, 1), got {psi}")
        self.psi = psi

    needs = frozenset({"anchors"})

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: LevelContext) -> Tensor:
        return KF.fgfi_loss(s_feat, t_feat, ctx.fgfi(self.psi))

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """``W = I / max(2 sum I, 1)`` with ``I = ctx.fgfi(psi)``, ``e = sum_c (s - t)^2``."""
        mask = ctx.fgfi(self.psi)
        return mask / (2.0 * mask.sum()).clamp(min=1.0)


class DeFeatLoss(FeatureLoss):
    """DeFeat decoupled foreground/background imitation (Guo et al., CVPR 2021, "Distilling Object Detectors via
    Decoupled Features").

    ``loss = fg_weight * sum(M d) / (2 C N_fg) + bg_weight * sum((1 - M) d) / (2 C N_bg)``, ``d = (s - t)^2``,
    ``M`` the binary GT-box mask (``fg > 0`` of :func:`detkd.masks.box_masks`); each part is normalised by its own
    number of elements, as in the authors' code (see :func:`detkd.losses.functional.defeat_loss`).

    Args:
        fg_weight: Foreground weight (authors' Faster R-CNN FPN config: 3).
        bg_weight: Background weight (same config: 12; DeFeat's point is that it exceeds the foreground's).
    """

    def __init__(self, fg_weight: float = 3.0, bg_weight: float = 12.0) -> None:
        super().__init__()
        self.fg_weight = fg_weight
        self.bg_weight = bg_weight

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: LevelContext) -> Tensor:
        fg, _ = ctx.box_masks()
        return KF.defeat_loss(s_feat, t_feat, fg, self.fg_weight, self.bg_weight)

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """``W = fg_weight * M / max(2 C N_fg, 1) + bg_weight * (1 - M) / max(2 C N_bg, 1)`` with ``M = 1[fg > 0]``,
        ``N_fg = sum M``, ``N_bg = sum (1 - M)``; ``e = sum_c (s - t)^2``."""
        t = ctx.t_feat.detach()
        c = t.shape[1]
        fg, _ = ctx.box_masks()
        m = (fg > 0).to(t.dtype)
        fg_part = self.fg_weight * m / (2.0 * c * m.sum()).clamp(min=1.0)
        return fg_part + self.bg_weight * (1.0 - m) / (2.0 * c * (1.0 - m).sum()).clamp(min=1.0)


class GIDFeatureLoss(FeatureLoss):
    """GID feature distillation on general instances (Dai et al., CVPR 2021, "General Instance Distillation for
    Object Detection").

    Regions where teacher and student disagree most (:func:`detkd.masks.difference_mask`: score
    ``max |sigmoid(t) - sigmoid(s)|`` per location, NMS at ``nms_iou``, ``top_k`` per image), then
    ``loss = sum m (s - t)^2 / sum m`` (:func:`detkd.losses.functional.gid_feature_loss`). Without classification
    logits on the level (e.g. a Faster R-CNN pair) it falls back to :func:`detkd.masks.feature_difference_mask`
    (the ``top_k_ratio`` locations with the largest feature distance). ``top_k = 10`` and ``nms_iou = 0.3`` follow
    GID (there per image over all levels; here per level).

    Args:
        top_k: Regions per image and level.
        nms_iou: NMS IoU threshold.
        window: Side, in cells, of the square candidate box when the level has no anchors.
        score_thr: Minimum disagreement score of a candidate.
        top_k_ratio: Fraction of locations of the feature-distance fallback.
    """

    needs = frozenset({"anchors", "cls_logits"})

    def __init__(
        self, top_k: int = 10, nms_iou: float = 0.3, window: int = 5, score_thr: float = 0.0, top_k_ratio: float = 0.1
    ) -> None:
        super().__init__()
        self.top_k, self.nms_iou, self.window, self.score_thr = top_k, nms_iou, window, score_thr
        self.top_k_ratio = top_k_ratio

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: LevelContext) -> Tensor:
        return KF.gid_feature_loss(s_feat, t_feat, self.difference_map(ctx))

    def difference_map(self, ctx: LevelContext) -> Tensor:
        """The GID mask from the logits (``ctx.difference``) or, without logits, ``ctx.feature_difference``."""
        if ctx.has_cls_logits:
            return ctx.difference(self.top_k, self.nms_iou, self.window, self.score_thr)
        return ctx.feature_difference(self.top_k_ratio)

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """``W = m / sum m`` (0 when ``m = 0``) with ``m`` the difference mask; ``e = sum_c (s - t)^2``."""
        mask = self.difference_map(ctx).detach()
        total = mask.sum()
        return mask / total if total > 0 else torch.zeros_like(mask)


class PKDLoss(FeatureLoss):
    """PKD (Cao et al., NeurIPS 2022): MSE between per-channel standardised features,
    ``0.5 * mean (s_hat - t_hat)^2`` (see :func:`detkd.losses.functional.pkd_loss`). No hyper-parameters; the paper's
    loss weight (6 for RetinaNet/Faster R-CNN in MMRazor's configs) is the config weight.
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: Optional[LevelContext] = None) -> Tensor:
        return KF.pkd_loss(s_feat, t_feat)

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """``W = 0.5 / (N C H W)`` (uniform), ``e = sum_c (s_hat - t_hat)^2`` of the channel-standardised features."""
        return _uniform(ctx, 0.5)


class CWDLoss(FeatureLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021): ``tau^2 / (N C) * sum_{n,c} KL(p^t_nc || p^s_nc)`` over
    per-channel spatial softmaxes (see :func:`detkd.losses.functional.cwd_loss`).

    Args:
        tau: Temperature (paper, detection: 1.0).
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = tau

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: Optional[LevelContext] = None) -> Tensor:
        return KF.cwd_loss(s_feat, t_feat, self.tau)

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """``W = tau^2 / (N C) * sum_c p^t_c`` with ``p^t_c = softmax_HW(t_c / tau)``: the KL of channel ``c`` weighs
        the log-ratio ``log p^t_c - log p^s_c`` at each location by ``p^t_c`` (CWD distils where the teacher's
        channels put their mass)."""
        t = ctx.t_feat.detach()
        n, c, h, w = t.shape
        p_t = torch.softmax(t.reshape(n, c, h * w) / self.tau, dim=2)
        return (self.tau**2 / (n * c) * p_t.sum(dim=1)).reshape(n, h, w)


def _uniform(ctx: LevelContext, scale: float) -> Tensor:
    n, c, h, w = ctx.t_feat.shape
    return ctx.t_feat.new_full((n, h, w), scale / (n * c * h * w))
