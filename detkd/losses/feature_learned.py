"""Feature losses with learnable parts: FGD (GcBlocks) and attention-guided + non-local distillation.

The learnable blocks are per FPN level and sized by the teacher's channels: call ``loss.setup_levels({level:
channels})`` before building the optimizer (they are otherwise built, with a warning, on first use). The teacher
feature is detached before its block; the teacher-side block itself is trained, as in both papers' code.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from detkd.losses import functional as KF
from detkd.losses.base import FeatureLoss
from detkd.losses.context import LevelContext
from detkd.losses.feature_blocks import GcBlock, LevelModules, NonLocalBlock

__all__ = ["FGDLoss", "AttentionGuidedLoss", "GcPair", "NonLocalPair"]


class GcPair(nn.Module):
    """FGD's two GcBlocks of one level: one for the student feature, one for the teacher feature."""

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        self.student = GcBlock(channels, ratio)
        self.teacher = GcBlock(channels, ratio)


class NonLocalPair(nn.Module):
    """Zhang & Ma's non-local blocks of one level: student block + 1x1 adaptation, teacher block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.student = NonLocalBlock(channels)
        self.adapt = nn.Conv2d(channels, channels, kernel_size=1)
        self.teacher = NonLocalBlock(channels)


class FGDLoss(FeatureLoss):
    """Focal and Global Distillation (Yang et al., CVPR 2022, "Focal and Global Knowledge Distillation for
    Detectors")::

        loss = alpha / N * sum fg A_s A_c (t - s)^2 + beta / N * sum bg A_s A_c (t - s)^2      (focal, Eq. 5)
             + gamma / N * (sum |A_c(s) - A_c(t)| + sum |A_s(s) - A_s(t)|)                    (attention, Eq. 6)
             + lambda / N * sum (GC_t(t) - GC_s(s))^2                                          (global, Eq. 8)

    ``fg``/``bg`` are the box masks of :func:`detkd.masks.box_masks` (exact geometry), ``A_s``/``A_c`` the teacher's
    spatial/channel attention at temperature ``T`` in the focal term. ``GC_s``, ``GC_t`` are separate learnable
    :class:`~detkd.losses.feature_blocks.GcBlock`\\ s per level, trained with the student.

    Defaults are FGD's RetinaNet config (``fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py``): ``T=0.5,
    alpha=1e-3, beta=5e-4, gamma=5e-4, lambda=5e-6``. Their Faster R-CNN config: ``alpha=5e-5, beta=2.5e-5,
    gamma=5e-5, lambda=5e-7``; FCOS: ``T=0.8, alpha=1.6e-3, beta=8e-4, gamma=8e-4, lambda=8e-6``.

    Args:
        temperature: Attention temperature ``T``.
        alpha: Foreground focal weight.
        beta: Background focal weight.
        gamma: Attention-loss weight.
        lambda_: Global-loss weight.
        gc_ratio: Bottleneck ratio of the GcBlocks (FGD: 2).
    """

    uses_attention_maps = True

    def __init__(
        self,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lambda_: float = 5e-6,
        gc_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.temperature, self.alpha, self.beta, self.gamma, self.lambda_ = temperature, alpha, beta, gamma, lambda_
        self.blocks = LevelModules(GcPair, "FGDLoss", ratio=gc_ratio)

    def setup_levels(self, channels: Mapping[str, int]) -> None:
        """Build the GcBlocks of each level (``{level name: teacher channels}``); call before the optimizer."""
        self.blocks.setup_levels(channels)

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: LevelContext) -> Tensor:
        temp = self.temperature
        fg, bg = ctx.box_masks()
        t_sp, t_ch = ctx.spatial_attention("t", temp), ctx.channel_attention("t", temp)
        s_sp, s_ch = ctx.spatial_attention("s", temp), ctx.channel_attention("s", temp)
        focal = KF.fgd_focal_loss(s_feat, t_feat, fg, bg, temp, self.alpha, self.beta, t_spatial=t_sp, t_channel=t_ch)
        attention = KF.fgd_attention_loss(s_feat, t_feat, temp, self.gamma, maps=(s_sp, s_ch, t_sp, t_ch))
        pair = self.blocks.get(ctx.name, t_feat)
        global_ = KF.fgd_global_loss(pair.student(s_feat), pair.teacher(t_feat.detach()), self.lambda_)
        return focal + attention + global_

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """The focal term's (Eq. 5) ``W = (alpha * fg + beta * bg) * A_s^t / N`` with the teacher's spatial attention
        ``A_s^t``; ``e = sum_c A_c^t (s - t)^2`` (teacher channel attention). The attention and global terms weigh
        no location."""
        fg, bg = ctx.box_masks()
        a_s = ctx.spatial_attention("t", self.temperature).detach()
        return (self.alpha * fg + self.beta * bg) * a_s / ctx.t_feat.shape[0]


class AttentionGuidedLoss(FeatureLoss):
    """Attention-guided (+ optional non-local) distillation (Zhang & Ma, ICLR 2021, "Improve Object Detection with
    Feature-based Knowledge Distillation: Towards Accurate and Efficient Detectors")::

        M_s = (A_s(t) + A_s(s)) / 2,  M_c = (A_c(t) + A_c(s)) / 2       (detached masks)
        loss = feat_weight * sqrt(sum (t - s)^2 M_s M_c)
             + at_weight * (||A_s(t) - A_s(s)||_2 + ||A_c(t) - A_c(s)||_2)     (at_norm="l2"; "l1": FGD's form)
             [+ non_local_weight * ||adapt(NL_s(s)) - NL_t(t)||_2]              (non_local=True)

    Defaults follow the authors' released one-stage (RetinaNet) code: masked-feature weight ``7e-5 * 6 = 4.2e-4``,
    attention-transfer weight ``4e-3 * 6 = 2.4e-2``, non-local weight ``7e-5 * 6 = 4.2e-4``, Euclidean distances.
    Differences from that code (see :func:`detkd.losses.functional.attention_guided_loss`): the attention-transfer
    term compares the attention maps themselves (the paper's formulation) rather than adapter-projected pooled
    features, and ``T = 0.5`` (MMRazor's port, FGD) instead of the code's 0.1, which makes FPN maps extremely peaked.

    Args:
        temperature: Attention temperature ``T``.
        feat_weight: Weight of the attention-masked feature term.
        at_weight: Weight of the attention-transfer term.
        at_norm: ``"l2"`` (Euclidean norms, default) or ``"l1"`` (sum of absolute differences / N).
        non_local: Add the non-local relation term (learnable non-local blocks per level).
        non_local_weight: Weight of the non-local term.
    """

    uses_attention_maps = True

    def __init__(
        self,
        temperature: float = 0.5,
        feat_weight: float = 4.2e-4,
        at_weight: float = 2.4e-2,
        at_norm: str = "l2",
        non_local: bool = False,
        non_local_weight: float = 4.2e-4,
    ) -> None:
        super().__init__()
        if at_norm not in ("l1", "l2"):
            raise ValueError(f"at_norm must be 'l1' or 'l2', got {at_norm!r}")
        self.temperature, self.feat_weight, self.at_weight, self.at_norm = temperature, feat_weight, at_weight, at_norm
        self.non_local, self.non_local_weight = non_local, non_local_weight
        self.blocks = LevelModules(NonLocalPair, "AttentionGuidedLoss") if non_local else None

    def setup_levels(self, channels: Mapping[str, int]) -> None:
        """Build the non-local blocks of each level (no-op without ``non_local``); call before the optimizer."""
        if self.blocks is not None:
            self.blocks.setup_levels(channels)

    def forward(self, s_feat: Tensor, t_feat: Tensor, ctx: LevelContext) -> Tensor:
        temp = self.temperature
        maps = (
            ctx.spatial_attention("s", temp),
            ctx.channel_attention("s", temp),
            ctx.spatial_attention("t", temp),
            ctx.channel_attention("t", temp),
        )
        loss = KF.attention_guided_loss(s_feat, t_feat, temp, self.feat_weight, self.at_weight, self.at_norm, maps=maps)
        if self.blocks is not None:
            pair = self.blocks.get(ctx.name, t_feat)
            s_rel = pair.adapt(pair.student(s_feat))
            loss = loss + self.non_local_weight * KF.nonlocal_relation_loss(s_rel, pair.teacher(t_feat.detach()))
        return loss

    def weight_map(self, ctx: LevelContext) -> Tensor:
        """``W = M_s = (A_s^t + A_s^s) / 2``; the term is ``feat_weight * sqrt(sum W e)`` with
        ``e = sum_c M_c (s - t)^2`` (the weight under the square root). The transfer term weighs no location."""
        temp = self.temperature
        return ((ctx.spatial_attention("t", temp) + ctx.spatial_attention("s", temp)) / 2).detach()
