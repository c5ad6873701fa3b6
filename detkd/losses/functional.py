"""Functional feature-distillation losses (the ``nn.Module`` wrappers live in ``detkd.losses.feature``).

Conventions: ``s`` is the student feature (after its adapter), ``t`` the teacher feature, both (N, C, H, W). ``t`` is
detached inside every function, so gradients only reach the student. Masks are (N, H, W) and detached. Where a
normaliser can be zero (no foreground, nothing selected) the result is an exact zero still attached to the student's
graph, never NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.masks import channel_attention, spatial_attention

__all__ = [
    "feature_mse",
    "masked_sum_sq",
    "masked_mse",
    "fgfi_loss",
    "defeat_loss",
    "gid_feature_loss",
    "fgd_focal_loss",
    "fgd_attention_loss",
    "fgd_global_loss",
    "attention_guided_loss",
    "nonlocal_relation_loss",
    "pkd_loss",
    "cwd_loss",
]


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else ``num * 0`` (``num`` is 0 there: nothing was selected)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num * 0.0)


def feature_mse(s: Tensor, t: Tensor) -> Tensor:
    """Whole-map imitation ``mean_{n,c,h,w} (s - t)^2`` (a plain hint loss; FitNets, Romero et al., ICLR 2015)."""
    return (s - t.detach()).pow(2).mean()


def masked_sum_sq(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """``sum_{n,c,h,w} mask[n,h,w] * (s - t)^2``; ``mask`` (N, H, W) is broadcast over channels. Scalar."""
    return (mask.detach()[:, None] * (s - t.detach()).pow(2)).sum()


def masked_mse(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """Mask-weighted mean squared error ``sum(mask * (s - t)^2) / (C * sum(mask))`` (0 for an all-zero mask)."""
    return _safe_div(masked_sum_sq(s, t, mask), s.shape[1] * mask.detach().sum())


def fgfi_loss(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """FGFI imitation loss (Wang et al., CVPR 2019, Eq. 3): ``sum_{n,c,h,w} I (s - t)^2 / (2 N_p)``.

    ``N_p = sum I`` counts the imitation *locations* (not times C), as in the paper and the authors' code, which
    also clamps the normaliser to at least 1: ``max(2 N_p, 1)``.

    Args:
        s: Student feature (N, C, H, W). t: Teacher feature (N, C, H, W).
        mask: FGFI imitation mask ``I`` (N, H, W) in {0, 1}.
    """
    return masked_sum_sq(s, t, mask) / (2.0 * mask.detach().sum()).clamp(min=1.0)


def defeat_loss(s: Tensor, t: Tensor, fg_mask: Tensor, fg_weight: float = 3.0, bg_weight: float = 12.0) -> Tensor:
    """DeFeat decoupled feature loss (Guo et al., CVPR 2021, "Distilling Object Detectors via Decoupled Features").

    With ``M = 1[fg_mask > 0]`` (binary GT-box mask) and ``d = (s - t)^2``::

        loss = fg_weight * sum(M d) / max(2 C N_fg, 1) + bg_weight * sum((1 - M) d) / max(2 C N_bg, 1)

    ``N_fg = sum M``, ``N_bg = sum (1 - M)`` over (N, H, W); the authors' code repeats the mask over channels before
    counting, hence the factor ``C``. Defaults ``3`` / ``12`` are the authors' released Faster R-CNN FPN config
    (``hint_neck_w=3``, ``hint_neck_back_w=12``): the background weight is larger than the foreground's.
    """
    m = (fg_mask.detach() > 0).to(s.dtype)
    c = s.shape[1]
    fg = masked_sum_sq(s, t, m) / (2.0 * c * m.sum()).clamp(min=1.0)
    bg = masked_sum_sq(s, t, 1.0 - m) / (2.0 * c * (1.0 - m).sum()).clamp(min=1.0)
    return fg_weight * fg + bg_weight * bg


def gid_feature_loss(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """Feature loss on GID's selected regions: ``sum_{n,c,h,w} m (s - t)^2 / sum_{n,h,w} m`` (0 if ``m = 0``).

    With the region masks of :func:`detkd.masks.difference_mask` (each region sums to 1) this is the mean over
    regions of the region-averaged, channel-summed squared error. GID (Dai et al., CVPR 2021, Eq. 4) ROI-aligns
    each instance to a fixed grid and sums over it; the region average here is scale-free instead.
    """
    return _safe_div(masked_sum_sq(s, t, mask), mask.detach().sum())


def fgd_focal_loss(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    temperature: float = 0.5,
    alpha: float = 1e-3,
    beta: float = 5e-4,
    *,
    t_spatial: Optional[Tensor] = None,
    t_channel: Optional[Tensor] = None,
) -> Tensor:
    """FGD focal (feature) loss (Yang et al., CVPR 2022, "Focal and Global Knowledge Distillation for Detectors",
    Eq. 5)::

        loss = alpha / N * sum_{n,c,h,w} fg A_s A_c (t - s)^2 + beta / N * sum_{n,c,h,w} bg A_s A_c (t - s)^2

    with the *teacher's* spatial ``A_s`` (N, H, W) and channel ``A_c`` (N, C) attention at ``temperature``.

    Args:
        s, t: Student / teacher features (N, C, H, W).
        fg, bg: Box masks of :func:`detkd.masks.box_masks`, (N, H, W).
        temperature, alpha, beta: FGD's ``T``, ``alpha``, ``beta`` (defaults: FGD's RetinaNet config).
        t_spatial, t_channel: Optional precomputed teacher attention (e.g. cached in a LevelContext).
    """
    t = t.detach()
    a_s = spatial_attention(t, temperature) if t_spatial is None else t_spatial.detach()
    a_c = channel_attention(t, temperature) if t_channel is None else t_channel.detach()
    weighted = (s - t).pow(2) * a_s[:, None] * a_c[:, :, None, None]
    n = s.shape[0]
    return alpha * (weighted * fg.detach()[:, None]).sum() / n + beta * (weighted * bg.detach()[:, None]).sum() / n


def fgd_attention_loss(
    s: Tensor,
    t: Tensor,
    temperature: float = 0.5,
    gamma: float = 1e-3,
    *,
    maps: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """FGD attention loss (Eq. 6): ``gamma / N * (sum |A_c(s) - A_c(t)| + sum |A_s(s) - A_s(t)|)``.

    ``gamma = 1e-3`` is the default of FGD's ``FeatureLoss`` class; its RetinaNet config uses ``5e-4``.

    Args:
        s, t: Student / teacher features (N, C, H, W).
        temperature: Attention temperature ``T``.
        gamma: Loss weight.
        maps: Optional precomputed ``(s_spatial, s_channel, t_spatial, t_channel)``.
    """
    if maps is None:
        t = t.detach()
        maps = (
            spatial_attention(s, temperature),
            channel_attention(s, temperature),
            spatial_attention(t, temperature),
            channel_attention(t, temperature),
        )
    s_sp, s_ch, t_sp, t_ch = maps
    n = s.shape[0]
    return gamma * ((s_ch - t_ch.detach()).abs().sum() + (s_sp - t_sp.detach()).abs().sum()) / n


def fgd_global_loss(s_gc: Tensor, t_gc: Tensor, lambda_: float = 5e-6) -> Tensor:
    """FGD global (relation) loss (Eq. 8): ``lambda / N * sum (GC_t(t) - GC_s(s))^2``.

    Takes the features *after* their GcBlocks (see :class:`detkd.losses.feature_blocks.GcBlock`). ``t_gc`` is
    **not** detached: the teacher-side GcBlock is a learnable part of the loss, trained with the student (the teacher
    feature itself should be detached before its block). ``lambda = 5e-6``: FGD's RetinaNet config.

    Args:
        s_gc: ``GC_s(s)``, (N, C, H, W). t_gc: ``GC_t(t)``, (N, C, H, W).
        lambda_: Loss weight.
    """
    return lambda_ * (t_gc - s_gc).pow(2).sum() / s_gc.shape[0]


def attention_guided_loss(
    s: Tensor,
    t: Tensor,
    temperature: float = 0.5,
    feat_weight: float = 4.2e-4,
    at_weight: float = 2.4e-2,
    at_norm: str = "l2",
    *,
    maps: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """Attention-guided distillation (Zhang & Ma, ICLR 2021, "Improve Object Detection with Feature-based Knowledge
    Distillation: Towards Accurate and Efficient Detectors", Sec. 3.1)::

        M_s = (A_s(t) + A_s(s)) / 2,  M_c = (A_c(t) + A_c(s)) / 2          (detached)
        L_AM = sqrt(sum_{n,c,h,w} (t - s)^2 M_s M_c)
        L_AT = ||A_s(t) - A_s(s)||_2 + ||A_c(t) - A_c(s)||_2               (at_norm="l2", norms over the batch)
            or (sum |A_s(t) - A_s(s)| + sum |A_c(t) - A_c(s)|) / N          (at_norm="l1", FGD's form)
        loss = feat_weight * L_AM + at_weight * L_AT

    Defaults: the authors' released one-stage code weights the masked feature term by ``7e-5 * 6 = 4.2e-4`` and the
    attention-transfer term by ``4e-3 * 6 = 2.4e-2`` with Euclidean distances (``torch.dist``). Their code compares
    mean-pooled features passed through learned adapters (a Linear for channels, a 3x3 conv for space) instead of
    the attention maps, and uses ``T = 0.1``; ``T = 0.5`` follows MMRazor's port and FGD, which reuses these maps.
    For ``at_norm="l1"``, FGD's ``gamma = 5e-4`` is the calibrated weight, not ``2.4e-2``.
    """
    if at_norm not in ("l1", "l2"):
        raise ValueError(f"at_norm must be 'l1' or 'l2', got {at_norm!r}")
    t = t.detach()
    if maps is None:
        maps = (
            spatial_attention(s, temperature),
            channel_attention(s, temperature),
            spatial_attention(t, temperature),
            channel_attention(t, temperature),
        )
    s_sp, s_ch, t_sp, t_ch = maps
    t_sp, t_ch = t_sp.detach(), t_ch.detach()
    m_sp, m_ch = ((t_sp + s_sp) / 2).detach(), ((t_ch + s_ch) / 2).detach()
    # sqrt(sum d^2 M) as a vector norm: same value, and a zero (not NaN) gradient when s == t.
    feat = torch.linalg.vector_norm((t - s) * (m_sp[:, None] * m_ch[:, :, None, None]).sqrt())
    if at_norm == "l2":
        at = torch.linalg.vector_norm(t_sp - s_sp) + torch.linalg.vector_norm(t_ch - s_ch)
    else:
        at = ((t_sp - s_sp).abs().sum() + (t_ch - s_ch).abs().sum()) / s.shape[0]
    return feat_weight * feat + at_weight * at


def nonlocal_relation_loss(s_rel: Tensor, t_rel: Tensor) -> Tensor:
    """Non-local distillation (Zhang & Ma, ICLR 2021, Sec. 3.2): ``||r_s - r_t||_2`` over the whole batch.

    ``r_s``, ``r_t`` are the outputs of the student's (adapted) and the teacher's non-local blocks; ``t_rel`` is not
    detached because the teacher-side block is trained with the loss (as in the authors' code).
    """
    return torch.linalg.vector_norm(s_rel - t_rel)


def _standardise_channels(x: Tensor) -> Tensor:
    """Per channel over (N, H, W): ``(x - mean) / (std + 1e-6)`` with the unbiased std (0 for a single value)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True) if flat.shape[1] > 1 else torch.zeros_like(mean)
    return ((flat - mean) / (std + 1e-6)).reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


def pkd_loss(s: Tensor, t: Tensor) -> Tensor:
    """PKD (Cao et al., NeurIPS 2022, "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient"): each channel standardised over (N, H, W) (unbiased std, ``+ 1e-6``), then
    ``0.5 * mean_{n,c,h,w} (s_hat - t_hat)^2``, which equals ``1 - Pearson(s, t)`` per channel up to the
    ``(M - 1) / M`` factor of the unbiased std. Matches MMRazor's ``PKDLoss`` (``F.mse_loss(...) / 2``).
    """
    return 0.5 * F.mse_loss(_standardise_channels(s), _standardise_channels(t.detach()))


def cwd_loss(s: Tensor, t: Tensor, tau: float = 1.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021, "Channel-wise Knowledge Distillation for Dense
    Prediction")::

        p^t_{nc} = softmax_{HW}(t_{nc} / tau),  p^s_{nc} = softmax_{HW}(s_{nc} / tau)
        loss = tau^2 / (N C) * sum_{n,c} KL(p^t_{nc} || p^s_{nc})

    ``tau = 1`` is the value the authors use for detection.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    n, c = s.shape[:2]
    log_p_t = F.log_softmax(t.detach().reshape(n * c, -1) / tau, dim=1)
    log_p_s = F.log_softmax(s.reshape(n * c, -1) / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * tau**2 / (n * c)


from detkd.losses.logit_functional import (  # noqa: E402,F401
    alpha_divergence_loss,
    cross_kd_loss,
    dkd_loss,
    kd_loss,
    quality_focal_kd_loss,
    sigmoid_kd_loss,
)
from detkd.losses.relation import batch_relation_loss, pairwise_distance_matrix, relation_loss  # noqa: E402,F401
