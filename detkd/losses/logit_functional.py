"""Functional logit-distillation losses: KD, sigmoid KD, DKD and AlphaNet's adaptive alpha-divergence.

Pure functions on logits; the ``nn.Module`` wrappers live in ``detkd.losses``. Conventions shared by every function:

* ``s_logits`` are the student's raw logits, ``t_logits`` the teacher's, same shape. ``t_logits`` is **detached
  inside each function**, so gradients only ever reach the student even if the caller forgot ``torch.no_grad()``.
* All probabilities are handled in log space (``log_softmax`` / ``logsigmoid``), so logits of magnitude 50 and
  more give finite losses and gradients.
* An empty input (zero rows, e.g. an image without ROIs) gives an exact zero that is still connected to the
  student's graph, never NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kd_loss",
    "sigmoid_kd_loss",
    "tckd_nckd",
    "dkd_loss",
    "alpha_divergence_loss",
    "quality_focal_kd_loss",
    "cross_kd_loss",
]

# mdistiller masks the target logit (already divided by T) by subtracting this constant before the NCKD softmax.
_DKD_MASK_MAGNITUDE = 1000.0
# AlphaNet switches to the KL limit when alpha is within this distance of 0 or 1 (same tolerance as their code).
_ALPHA_LIMIT_TOL = 1e-3


def _check_pair(s_logits: Tensor, t_logits: Tensor) -> None:
    if s_logits.dim() != 2 or s_logits.shape != t_logits.shape:
        raise ValueError(
            f"expected student and teacher logits of the same shape (N, C), got {tuple(s_logits.shape)} "
            f"and {tuple(t_logits.shape)}"
        )


def _empty_zero(s_logits: Tensor) -> Tensor:
    """A zero scalar attached to the student's graph (for inputs with no rows)."""
    return s_logits.sum() * 0.0


def _rowwise_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_j p_j (log p_j - log q_j)`` per row; ``p_j = 0`` contributes 0. (N, C), (N, C) -> (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def kd_loss(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """Softmax knowledge distillation (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").

    ``loss = T^2 / R * sum_r KL(softmax(t_r / T) || softmax(s_r / T))``. The ``T^2`` factor keeps the gradient
    magnitude independent of the temperature (Hinton et al., Sec. 2).

    Args:
        s_logits: Student logits, shape (R, C).
        t_logits: Teacher logits, shape (R, C); detached inside.
        temperature: Softmax temperature ``T > 0``.

    Returns:
        Scalar loss (0 when ``R == 0``).
    """
    _check_pair(s_logits, t_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if s_logits.shape[0] == 0:
        return _empty_zero(s_logits)
    log_p_t = F.log_softmax(t_logits.detach() / temperature, dim=1)
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    return _rowwise_kl(log_p_t, log_p_s).mean() * temperature**2


def sigmoid_kd_loss(s_logits: Tensor, t_logits: Tensor, temperature: float, weight: Optional[Tensor] = None) -> Tensor:
    """Knowledge distillation for per-class sigmoid heads (RetinaNet/FCOS classification branches).

    Each class is an independent Bernoulli, so the per-position loss is the sum of binary KLs::

        KL_p = T^2 * sum_c [ a log(a / b) + (1 - a) log((1 - a) / (1 - b)) ],
        a = sigmoid(t_pc / T),  b = sigmoid(s_pc / T),

    computed with ``logsigmoid`` (``log(1 - sigmoid(x)) = logsigmoid(-x)``), so it stays finite for logits
    like +-50. Reduction over positions: ``mean_p KL_p`` without ``weight``; with a per-position weight
    (e.g. a foreground mask) ``sum_p w_p KL_p / sum_p w_p``, which equals the plain mean for ``w = 1`` and is 0
    when all weights are 0.

    Args:
        s_logits: Student logits, shape (P, C) (positions x classes).
        t_logits: Teacher logits, shape (P, C); detached inside.
        temperature: Temperature ``T > 0`` applied to both logits.
        weight: Optional non-negative per-position weight, shape (P,); detached inside.

    Returns:
        Scalar loss (0 when ``P == 0``).
    """
    _check_pair(s_logits, t_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight is not None and weight.shape != s_logits.shape[:1]:
        raise ValueError(f"weight must have shape ({s_logits.shape[0]},), got {tuple(weight.shape)}")
    if s_logits.shape[0] == 0:
        return _empty_zero(s_logits)
    t = t_logits.detach() / temperature
    s = s_logits / temperature
    log_a, log_1ma = F.logsigmoid(t), F.logsigmoid(-t)
    log_b, log_1mb = F.logsigmoid(s), F.logsigmoid(-s)
    per_pos = (log_a.exp() * (log_a - log_b) + log_1ma.exp() * (log_1ma - log_1mb)).sum(dim=1) * temperature**2
    if weight is None:
        return per_pos.mean()
    w = weight.detach().to(per_pos.dtype)
    total = w.sum()
    return (w * per_pos).sum() / torch.where(total > 0, total, torch.ones_like(total))


def tckd_nckd(s_logits: Tensor, t_logits: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Unreduced pieces of decoupled KD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation").

    With ``p = softmax(t / T)``, ``q = softmax(s / T)`` and ``g`` the target class of a row:

    * ``TCKD = KL([p_g, 1 - p_g] || [q_g, 1 - q_g])`` (binary KL of the target-vs-rest split);
    * ``NCKD = KL(p_hat || q_hat)`` with ``p_hat``, ``q_hat`` the softmaxes over the non-target classes. As in
      mdistiller, the target class is removed by subtracting 1000 from its (temperature-scaled) logit before
      the softmax, which is exact in float32 unless the target logit exceeds the others by ~900 * T.

    Neither piece carries the ``T^2`` factor, so per row ``KL(p || q) = TCKD + (1 - p_g) * NCKD``
    (Zhao et al., Eq. 1). ``1 - q_g`` is computed as ``exp(logsumexp(non-target) - logsumexp(all))``, never as a
    difference or a sum of probabilities, so the log of it is finite for large logits.

    Args:
        s_logits: Student logits, shape (R, C), ``C >= 2``.
        t_logits: Teacher logits, shape (R, C); detached inside.
        target: Target class index per row, shape (R,), int64 (for a softmax ROI head, background is a class).
        temperature: Temperature ``T > 0``.

    Returns:
        ``(tckd, nckd, p_t)``, each of shape (R,): the per-row TCKD and NCKD (no ``T^2``) and the teacher's
        target-class probability ``p_g`` at temperature ``T`` (detached).
    """
    _check_pair(s_logits, t_logits)
    if s_logits.shape[1] < 2:
        raise ValueError(f"DKD needs at least 2 classes, got {s_logits.shape[1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if target.shape != s_logits.shape[:1]:
        raise ValueError(f"target must have shape ({s_logits.shape[0]},), got {tuple(target.shape)}")
    t = t_logits.detach() / temperature
    s = s_logits / temperature
    gt_mask = F.one_hot(target.long(), num_classes=s.shape[1]).to(torch.bool)

    def binary_log_probs(z: Tensor) -> Tensor:
        log_all = torch.logsumexp(z, dim=1)
        log_target = z.gather(1, target.long().view(-1, 1)).squeeze(1) - log_all
        log_rest = torch.logsumexp(z.masked_fill(gt_mask, float("-inf")), dim=1) - log_all
        return torch.stack([log_target, log_rest], dim=1)  # (R, 2): log [p_g, 1 - p_g]

    log_bt = binary_log_probs(t)
    tckd = _rowwise_kl(log_bt, binary_log_probs(s))
    shift = _DKD_MASK_MAGNITUDE * gt_mask.to(s.dtype)
    nckd = _rowwise_kl(F.log_softmax(t - shift, dim=1), F.log_softmax(s - shift, dim=1))
    return tckd, nckd, log_bt[:, 0].exp()


def dkd_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), normalised as the authors' code (mdistiller).

    ``loss = alpha * TCKD + beta * NCKD`` with both terms summed over rows, multiplied by ``T^2`` and divided by
    the number of rows ``R`` (mdistiller: ``F.kl_div(..., reduction="sum") * T**2 / batch``)::

        loss = T^2 / R * sum_r (alpha * tckd_r + beta * nckd_r)

    where ``tckd_r``, ``nckd_r`` are the unreduced pieces of :func:`tckd_nckd`. Note the paper's Eq. 1 weights NCKD
    by ``(1 - p_g)`` inside classical KD; DKD replaces that weight by the constant ``beta``. mdistiller takes
    ``log`` of the summed 2-class student probabilities; here the same quantities are computed in log space,
    which agrees with mdistiller to float precision while no probability underflows, and stays finite where
    mdistiller's ``log`` of an underflowed (denormal or zero) probability loses precision or gives inf/NaN.
    Defaults ``alpha=1, beta=8, T=4`` are mdistiller's defaults (its CIFAR-100 setting; the paper tunes ``beta``
    per teacher, and mdistiller's ImageNet ResNet34->18 config uses ``beta=0.5, T=1``); mdistiller's linear
    warm-up of the DKD weight is left to the caller.

    Args:
        s_logits: Student logits, shape (R, C), ``C >= 2``.
        t_logits: Teacher logits, shape (R, C); detached inside.
        target: Target class index per row, shape (R,), int64.
        alpha: TCKD weight.
        beta: NCKD weight.
        temperature: Temperature ``T > 0``.

    Returns:
        Scalar loss (0 when ``R == 0``).
    """
    tckd, nckd, _ = tckd_nckd(s_logits, t_logits, target, temperature)
    if s_logits.shape[0] == 0:
        return _empty_zero(s_logits)
    return (alpha * tckd + beta * nckd).sum() * temperature**2 / s_logits.shape[0]


def _alpha_divergence_rows(log_q: Tensor, log_p: Tensor, alpha: float, iw_clip: float) -> tuple[Tensor, Tensor]:
    """Per-row ``D_alpha(p || q)`` and AlphaNet's surrogate whose gradient is their estimator.

    Args:
        log_q: Student log-probabilities (with grad), shape (R, C).
        log_p: Teacher log-probabilities (detached), shape (R, C).
        alpha: Divergence order.
        iw_clip: Upper clip of the importance weight (``w = p / q`` for alpha ~ 0, ``w^alpha`` otherwise).

    Returns:
        ``(value, surrogate)``, each (R,). ``value`` carries no gradient; ``surrogate = -sum_i g_i log q_i`` with
        a detached weight ``g`` whose gradient equals AlphaNet's.
    """
    q = log_q.detach().exp()
    log_w = log_p - log_q.detach()  # log importance ratio log(p / q), finite in log space
    if abs(alpha - 1.0) < _ALPHA_LIMIT_TOL:  # limit alpha -> 1: KL(p || q), no clipping (as in AlphaNet)
        value = _rowwise_kl(log_p, log_q.detach())
        g = log_p.exp()  # q * w = p
    elif abs(alpha) < _ALPHA_LIMIT_TOL:  # limit alpha -> 0: KL(q || p), with w clipped to <= iw_clip
        log_w = log_w.clamp(max=math.log(iw_clip))
        value = -(q * log_w).sum(dim=1)
        g = q * (log_w - 1.0)
    else:
        c = 1.0 / (alpha * (alpha - 1.0))
        iw = (alpha * log_w).clamp(max=math.log(iw_clip)).exp()  # w^alpha clipped to <= iw_clip
        value = c * (q * (iw - 1.0)).sum(dim=1)
        g = q * (iw / alpha + c)
    return value, -(g * log_q).sum(dim=1)


def alpha_divergence_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    alpha_minus: float = -1.0,
    alpha_plus: float = 1.0,
    *,
    iw_clip: float = 5.0,
) -> Tensor:
    """AlphaNet's adaptive alpha-divergence (Wang et al., ICML 2021, "AlphaNet: Improved Training of Supernets
    with Alpha-Divergence"), from teacher ``p = softmax(t)`` to student ``q = softmax(s)``.

    Per row, with the paper's definition (Eq. 2) and the adaptive max (Eq. 4)::

        D_alpha(p || q) = 1 / (alpha (alpha - 1)) * sum_i q_i [ (p_i / q_i)^alpha - 1 ]
        loss_r = max( D_{alpha_minus}(p || q), D_{alpha_plus}(p || q) )
        loss = mean_r loss_r

    ``alpha_minus < 0`` penalises a student that over-estimates the teacher's uncertainty, ``alpha_plus > 0`` one
    that under-estimates it. The limits are handled explicitly (as in AlphaNet, when ``|alpha| < 1e-3`` or
    ``|alpha - 1| < 1e-3``): ``alpha -> 1`` gives ``KL(p || q)`` (teacher-to-student, ordinary KD) and
    ``alpha -> 0`` gives ``KL(q || p)``. No temperature (AlphaNet has none).

    Clipping and gradient (follows the official ``loss_ops.py``): the importance weight ``(p_i / q_i)^alpha`` is
    clipped to at most ``iw_clip`` (for ``alpha ~ 0`` the ratio ``p_i / q_i`` itself; none for ``alpha ~ 1``). The
    returned value is the clipped divergence; its gradient w.r.t. ``s`` is AlphaNet's estimator
    ``-sum_i q_i (w_i^alpha / alpha + 1 / (alpha (alpha - 1))) grad log q_i`` with the clipped weight held constant
    (``-sum_i q_i (log w_i - 1) grad log q_i`` for ``alpha ~ 0``, ``-sum_i p_i grad log q_i`` for ``alpha ~ 1``),
    applied to the branch with the larger value (ties go to ``alpha_plus``). Where nothing is clipped this is
    exactly the gradient of the divergence; on clipped entries autograd through the clamp would differ from
    AlphaNet's estimator, so the estimator is injected explicitly (``value + surrogate - surrogate.detach()``).
    AlphaNet itself returns only the surrogate (whose value is not the divergence); here the value is the
    divergence, so it can be logged.
    ``iw_clip=5`` is the released AlphaNet training config (their ``AdaptiveLossSoft`` default is 1e3). The value
    is >= 0 for the default alphas; clipping can push it below zero for ``alpha > 1`` or ``alpha < 1 - iw_clip``.

    Args:
        s_logits: Student logits, shape (R, C).
        t_logits: Teacher logits, shape (R, C); detached inside.
        alpha_minus: The negative order (AlphaNet: -1).
        alpha_plus: The positive order (AlphaNet: 1).
        iw_clip: Upper clip of the importance weight, keyword-only.

    Returns:
        Scalar loss (0 when ``R == 0``).
    """
    _check_pair(s_logits, t_logits)
    if iw_clip <= 0:
        raise ValueError(f"iw_clip must be > 0, got {iw_clip}")
    if s_logits.shape[0] == 0:
        return _empty_zero(s_logits)
    log_q = F.log_softmax(s_logits, dim=1)
    log_p = F.log_softmax(t_logits.detach(), dim=1)
    v_minus, sur_minus = _alpha_divergence_rows(log_q, log_p, float(alpha_minus), iw_clip)
    v_plus, sur_plus = _alpha_divergence_rows(log_q, log_p, float(alpha_plus), iw_clip)
    pick_minus = v_minus > v_plus
    value = torch.where(pick_minus, v_minus, v_plus)
    surrogate = torch.where(pick_minus, sur_minus, sur_plus)
    return (value + surrogate - surrogate.detach()).mean()


def quality_focal_kd_loss(s_logits: Tensor, t_logits: Tensor, beta: float = 1.0) -> Tensor:
    """Quality-focal KD for sigmoid heads (the ``KDQualityFocalLoss`` of CrossKD's released code, after GFL's QFL).

    ``loss_p = sum_c BCE(s_pc, q_pc) * |sigmoid(s_pc) - q_pc|^beta`` with the soft target ``q = sigmoid(t)``,
    averaged over positions ``p``. The modulating factor down-weights positions the student already matches.

    Args:
        s_logits: Student (or cross-head) logits, (P, C).
        t_logits: Teacher logits, (P, C); detached inside.
        beta: Focusing exponent (CrossKD's RetinaNet config: 1).

    Returns:
        Scalar loss (0 when ``P == 0``).
    """
    _check_pair(s_logits, t_logits)
    if s_logits.shape[0] == 0:
        return _empty_zero(s_logits)
    q = t_logits.detach().sigmoid()
    bce = F.binary_cross_entropy_with_logits(s_logits, q, reduction="none")
    return (bce * (s_logits.sigmoid() - q).abs().pow(beta)).sum(dim=1).mean()


def cross_kd_loss(
    cross_cls: Tensor,
    t_cls: Tensor,
    cross_boxes: Tensor,
    t_boxes: Tensor,
    confident: Tensor,
    temperature: float = 1.0,
    cls_loss: str = "kd",
    beta: float = 1.0,
    cross_ctr: Optional[Tensor] = None,
    t_ctr: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """CrossKD's prediction mimicking (Wang et al., CVPR 2024, "CrossKD: Cross-Head Knowledge Distillation for
    Object Detection"): the *cross-head* predictions (student features through the teacher's head) imitate the
    teacher's own predictions, so the student's head never receives targets that contradict the ground truth.

    Terms, over the ``P`` positions (all anchors / points of all levels)::

        cls     = sigmoid_kd_loss(cross_cls, t_cls, T)              (cls_loss="kd": mean_p T^2 sum_c KL_bin)
                | quality_focal_kd_loss(cross_cls, t_cls, beta)     (cls_loss="qfl": the authors' code)
        box     = mean_{p: confident} GIoU_loss(cross_box_p, t_box_p)   (decoded xyxy boxes)
        ctrness = mean_{p: confident} BCE(cross_ctr_p, sigmoid(t_ctr_p))  (FCOS; only when both are given)

    A term with no confident position is an exact zero connected to the graph.

    Args:
        cross_cls: Cross-head class logits, (P, K).
        t_cls: Teacher class logits, (P, K); detached inside.
        cross_boxes: Cross-head boxes decoded at the positions' anchors, (P, 4) xyxy.
        t_boxes: Teacher boxes, (P, 4) xyxy; detached inside.
        confident: Where the teacher is confident (e.g. ``max_c sigmoid(t) >= 0.5``), (P,) bool.
        temperature: ``T`` of the ``kd`` class term.
        cls_loss: ``"kd"`` or ``"qfl"``.
        beta: Focusing exponent of ``qfl``.
        cross_ctr: Cross-head centerness logits, (P,) (FCOS), or None.
        t_ctr: Teacher centerness logits, (P,); detached inside.

    Returns:
        ``{"cls", "box"[, "ctrness"]}`` scalars.
    """
    from torchvision.ops import generalized_box_iou_loss

    if cls_loss == "kd":
        cls = sigmoid_kd_loss(cross_cls, t_cls, temperature)
    elif cls_loss == "qfl":
        cls = quality_focal_kd_loss(cross_cls, t_cls, beta)
    else:
        raise ValueError(f"cls_loss must be 'kd' or 'qfl', got {cls_loss!r}")
    out = {"cls": cls}
    if confident.any():
        out["box"] = generalized_box_iou_loss(cross_boxes[confident], t_boxes[confident].detach(), reduction="mean")
    else:
        out["box"] = cross_boxes.sum() * 0.0
    if cross_ctr is not None and t_ctr is not None:
        if confident.any():
            target = t_ctr.detach()[confident].sigmoid()
            out["ctrness"] = F.binary_cross_entropy_with_logits(cross_ctr[confident], target)
        else:
            out["ctrness"] = cross_ctr.sum() * 0.0
    return out
