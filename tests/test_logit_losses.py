"""Numeric tests of detkd.losses.logit_functional against hand computations.

Hand references use plain Python floats (math.exp / math.log) on tiny tensors written out here. Two convenient
2-class distributions recur: logits [ln 3, 0] -> [3/4, 1/4] and [0, 0] -> [1/2, 1/2].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkd.losses.logit_functional import alpha_divergence_loss, dkd_loss, kd_loss, sigmoid_kd_loss, tckd_nckd

LN3 = math.log(3.0)


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(x / temperature) for x in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _binary_kl(a: float, b: float) -> float:
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


S_2X3 = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
T_2X3 = [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]]


# ----------------------------------------------------------------------------------------------------------- kd_loss
def test_kd_closed_form_two_classes():
    """p_t = [3/4, 1/4], p_s = [1/2, 1/2], T = 1: KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812."""
    loss = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]]), 1.0)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert expected == pytest.approx(0.1308120, abs=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kd_by_hand_2x3_with_temperature():
    """T = 2: loss = T^2 * (KL(row0) + KL(row1)) / 2 with the softmaxes of logits / 2."""
    temperature = 2.0
    kls = [_kl(_softmax(t, temperature), _softmax(s, temperature)) for s, t in zip(S_2X3, T_2X3)]
    expected = temperature**2 * sum(kls) / 2
    loss = kd_loss(torch.tensor(S_2X3), torch.tensor(T_2X3), temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_t_squared_scaling():
    """softmax((T z) / T) = softmax(z), so kd(T s, T t, T) = T^2 * kd(s, t, 1)."""
    s, t = torch.tensor(S_2X3), torch.tensor(T_2X3)
    for temperature in (0.5, 2.0, 4.0):
        scaled = kd_loss(s * temperature, t * temperature, temperature)
        assert scaled.item() == pytest.approx(temperature**2 * kd_loss(s, t, 1.0).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------- sigmoid_kd_loss
def test_sigmoid_kd_by_hand():
    """loss = T^2 / P * sum_p sum_c BKL(sigmoid(t/T) || sigmoid(s/T)), P = 2 positions, C = 2 classes, T = 2."""
    s = [[1.0, -2.0], [0.0, 3.0]]
    t = [[2.0, -1.0], [-1.0, 1.0]]
    temperature = 2.0
    per_pos = [
        temperature**2
        * sum(_binary_kl(_sigmoid(tc / temperature), _sigmoid(sc / temperature)) for sc, tc in zip(sp, tp))
        for sp, tp in zip(s, t)
    ]
    st, tt = torch.tensor(s), torch.tensor(t)
    assert sigmoid_kd_loss(st, tt, temperature).item() == pytest.approx(sum(per_pos) / 2, rel=1e-5)
    # weight: sum_p w_p KL_p / sum_p w_p
    assert sigmoid_kd_loss(st, tt, temperature, weight=torch.ones(2)).item() == pytest.approx(
        sum(per_pos) / 2, rel=1e-5
    )
    assert sigmoid_kd_loss(st, tt, temperature, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(
        per_pos[0], rel=1e-5
    )
    weighted = sigmoid_kd_loss(st, tt, temperature, weight=torch.tensor([3.0, 1.0]))
    assert weighted.item() == pytest.approx((3 * per_pos[0] + per_pos[1]) / 4, rel=1e-5)
    assert sigmoid_kd_loss(st, tt, temperature, weight=torch.zeros(2)).item() == 0.0


def test_sigmoid_kd_large_logits_finite():
    """t = [50, -50], s = [-50, 50], T = 1: each class gives ~ln(1 / sigmoid(-50)) = 50, so the loss is ~100."""
    s = torch.tensor([[-50.0, 50.0]], requires_grad=True)
    t = torch.tensor([[50.0, -50.0]])
    loss = sigmoid_kd_loss(s, t, 1.0)
    assert loss.item() == pytest.approx(100.0, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # at T = 1 the gradient of the binary KL w.r.t. the student logit is b - a: here (0 - 1) and (1 - 0)
    assert torch.allclose(s.grad, torch.tensor([[-1.0, 1.0]]), atol=1e-6)


# -------------------------------------------------------------------------------------------------------------- DKD
def test_tckd_nckd_by_hand():
    """One row, 3 classes, target 0, T = 1: p = softmax([2, 0, 1]), q = softmax([1, 2, 0]).

    TCKD = p0 ln(p0 / q0) + (1 - p0) ln((1 - p0) / (1 - q0));
    NCKD = KL([p1, p2] / (1 - p0) || [q1, q2] / (1 - q0)).
    """
    p, q = _softmax([2.0, 0.0, 1.0]), _softmax([1.0, 2.0, 0.0])
    tckd_ref = _binary_kl(p[0], q[0])
    nckd_ref = _kl([p[1] / (1 - p[0]), p[2] / (1 - p[0])], [q[1] / (1 - q[0]), q[2] / (1 - q[0])])
    tckd, nckd, p_t = tckd_nckd(
        torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([0]), 1.0
    )
    assert tckd.shape == nckd.shape == p_t.shape == (1,)
    assert tckd.item() == pytest.approx(tckd_ref, rel=1e-5)
    assert nckd.item() == pytest.approx(nckd_ref, rel=1e-5)
    assert p_t.item() == pytest.approx(p[0], rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposition_per_sample(temperature):
    """Zhao et al., Eq. 1, per row: KL(p^T || q^T) = TCKD + (1 - p_t^T) * NCKD.

    KD here is the per-row KL(softmax(t / T) || softmax(s / T)) at temperature T, *without* the T^2 factor,
    and TCKD / NCKD are the unreduced pieces returned by tckd_nckd (also without T^2).
    """
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    target = torch.randint(0, 5, (8,), generator=g)
    tckd, nckd, p_t = tckd_nckd(s, t, target, temperature)
    kd_rows = F.softmax(t / temperature, 1) * (F.log_softmax(t / temperature, 1) - F.log_softmax(s / temperature, 1))
    assert torch.allclose(tckd + (1 - p_t) * nckd, kd_rows.sum(1), atol=1e-6)
    # and the reduced kd_loss is T^2 times the mean of those rows
    assert kd_loss(s, t, temperature).item() == pytest.approx(temperature**2 * kd_rows.sum(1).mean().item(), rel=1e-5)


def test_dkd_loss_normalisation():
    """mdistiller: (alpha * sum_r TCKD_r + beta * sum_r NCKD_r) * T^2 / R."""
    s, t, target = torch.tensor(S_2X3), torch.tensor(T_2X3), torch.tensor([0, 2])
    temperature = 2.0
    ref = []
    for sr, tr, g in zip(S_2X3, T_2X3, [0, 2]):
        p, q = _softmax(tr, temperature), _softmax(sr, temperature)
        rest = [i for i in range(3) if i != g]
        tckd = _binary_kl(p[g], q[g])
        nckd = _kl([p[i] / (1 - p[g]) for i in rest], [q[i] / (1 - q[g]) for i in rest])
        ref.append((tckd, nckd))
    for alpha, beta in [(1.0, 1.0), (1.0, 8.0), (0.5, 2.0)]:
        expected = (alpha * sum(r[0] for r in ref) + beta * sum(r[1] for r in ref)) * temperature**2 / 2
        got = dkd_loss(s, t, target, alpha=alpha, beta=beta, temperature=temperature)
        assert got.item() == pytest.approx(expected, rel=1e-5)
    # alpha = beta = 1 is the sum of the pieces
    tckd, nckd, _ = tckd_nckd(s, t, target, temperature)
    both = dkd_loss(s, t, target, alpha=1.0, beta=1.0, temperature=temperature)
    assert both.item() == pytest.approx(((tckd + nckd).sum() * temperature**2 / 2).item(), rel=1e-6)


def _mdistiller_path(s, t, target, alpha, beta, temperature):
    """The authors' code path written out: 2-class probabilities by masked sums, log of them, kl_div(sum)."""
    gt = F.one_hot(target, s.shape[1]).bool()
    ps, pt = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * temperature**2 / target.shape[0]
    shift = 1000.0 * gt.float()
    nckd = (
        F.kl_div(F.log_softmax(s / temperature - shift, 1), F.softmax(t / temperature - shift, 1), reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    return alpha * tckd + beta * nckd


def test_dkd_matches_mdistiller_code_path():
    """Golden comparison on seeded logits, with class 0 (background) among the targets."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 7, generator=g) * 2, torch.randn(16, 7, generator=g) * 2
    target = torch.randint(0, 7, (16,), generator=g)
    target[0] = 0
    for alpha, beta, temperature in [(1.0, 8.0, 4.0), (0.5, 0.5, 1.0)]:
        ref = _mdistiller_path(s, t, target, alpha, beta, temperature)
        assert dkd_loss(s, t, target, alpha, beta, temperature).item() == pytest.approx(ref.item(), rel=1e-5)


def test_dkd_large_logits_finite():
    """Confident student, T = 1, logits +-75: mdistiller's log of the summed rest probability 2 e^-150 underflows
    to log(0) = -inf; the log-space computation stays finite. Row 0: the teacher puts ~all mass on class 1, the
    student ~all on class 0, so TCKD ~ 1 * ln(1 / q_rest) = 150 - ln 2.
    """
    s = torch.tensor([[75.0, -75.0, -75.0], [-75.0, 75.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-75.0, 75.0, -75.0], [75.0, -75.0, 0.0]])
    target = torch.tensor([0, 1])
    assert not torch.isfinite(_mdistiller_path(s.detach(), t, target, 1.0, 8.0, 1.0))
    loss = dkd_loss(s, t, target, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    tckd, _, _ = tckd_nckd(s, t, target, 1.0)
    assert tckd[0].item() == pytest.approx(150.0 - math.log(2.0), rel=1e-5)


# ------------------------------------------------------------------------------------------------- alpha-divergence
def test_alpha_divergence_by_hand_max_of_two():
    """alpha- = -1, alpha+ = 1, with p = teacher, q = student:

    D_{-1}(p||q) = 1/2 (sum_i q_i^2 / p_i - 1),  D_1(p||q) = KL(p||q).
    Row 0: p = [3/4, 1/4], q = [1/2, 1/2]: D_{-1} = 1/2 (1/3 + 1 - 1) = 1/6, KL = 0.130812 -> max 1/6.
    Row 1: p = [1/2, 1/2], q = [3/4, 1/4]: D_{-1} = 1/2 (2 (9/16 + 1/16) - 1) = 1/8, KL = 0.143841 -> max KL.
    """
    s = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    t = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    kl1 = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)
    assert kl1 == pytest.approx(0.143841, abs=1e-6)
    assert alpha_divergence_loss(s, t).item() == pytest.approx((1 / 6 + kl1) / 2, rel=1e-5)
    # each order alone
    assert alpha_divergence_loss(s, t, -1.0, -1.0).item() == pytest.approx((1 / 6 + 1 / 8) / 2, rel=1e-5)
    kl0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert alpha_divergence_loss(s, t, 1.0, 1.0).item() == pytest.approx((kl0 + kl1) / 2, rel=1e-5)


def test_alpha_divergence_kl_limits():
    """alpha = 1 gives KL(p_t || p_s) (ordinary KD direction), alpha = 0 gives KL(p_s || p_t)."""
    s, t = torch.tensor(S_2X3), torch.tensor(T_2X3)
    kl_ts = sum(_kl(_softmax(tr), _softmax(sr)) for sr, tr in zip(S_2X3, T_2X3)) / 2
    kl_st = sum(_kl(_softmax(sr), _softmax(tr)) for sr, tr in zip(S_2X3, T_2X3)) / 2
    assert alpha_divergence_loss(s, t, 1.0, 1.0).item() == pytest.approx(kl_ts, rel=1e-5)
    assert alpha_divergence_loss(s, t, 0.0, 0.0, iw_clip=1e6).item() == pytest.approx(kl_st, rel=1e-5)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(kl_ts, rel=1e-5)
    # the general formula approaches the limits continuously (clipping disabled: p / q reaches ~20 here)
    assert alpha_divergence_loss(s, t, 0.99, 0.99, iw_clip=1e6).item() == pytest.approx(kl_ts, rel=2e-2)
    assert alpha_divergence_loss(s, t, 0.01, 0.01, iw_clip=1e6).item() == pytest.approx(kl_st, rel=2e-2)


def test_alpha_divergence_is_rowwise_max_and_nonnegative():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(10, 6, generator=g) * 2, torch.randn(10, 6, generator=g) * 2
    rows = []
    for r in range(10):
        lo = alpha_divergence_loss(s[r : r + 1], t[r : r + 1], -1.0, -1.0)
        hi = alpha_divergence_loss(s[r : r + 1], t[r : r + 1], 1.0, 1.0)
        assert lo.item() >= 0 and hi.item() >= 0
        rows.append(max(lo.item(), hi.item()))
    assert alpha_divergence_loss(s, t).item() == pytest.approx(sum(rows) / 10, rel=1e-5)


def test_alpha_divergence_clipping_value_and_alphanet_gradient():
    """p = [0.9, 0.1], q = [0.4, 0.6], alpha- = -1: w^-1 = q / p = [4/9, 6] is clipped to [4/9, 5].

    value = 1/2 (0.4 * 4/9 + 0.6 * 5 - 1) = 1.0888... (> KL(p||q) = 0.5507, so the alpha- branch is chosen).
    AlphaNet gradient: g_i = q_i (w_i^alpha / alpha + 1 / (alpha (alpha - 1))) = q_i (-iw_i + 1/2), and
    d/ds_j of -sum_i g_i log q_i is -(g_j - q_j sum_i g_i).
    """
    s = torch.tensor([[math.log(0.4), math.log(0.6)]], requires_grad=True)
    t = torch.tensor([[math.log(0.9), math.log(0.1)]])
    loss = alpha_divergence_loss(s, t, -1.0, 1.0, iw_clip=5.0)
    assert loss.item() == pytest.approx(0.5 * (0.4 * 4 / 9 + 0.6 * 5 - 1), rel=1e-5)
    loss.backward()
    g = [0.4 * (-4 / 9 + 0.5), 0.6 * (-5 + 0.5)]
    q = [0.4, 0.6]
    expected = [-(g[j] - q[j] * sum(g)) for j in range(2)]
    assert torch.allclose(s.grad, torch.tensor([expected]), atol=1e-5)
    # unclipped value would be 1/2 (0.4 * 4/9 + 0.6 * 6 - 1)
    unclipped = alpha_divergence_loss(s.detach(), t, -1.0, 1.0, iw_clip=100.0)
    assert unclipped.item() == pytest.approx(0.5 * (0.4 * 4 / 9 + 0.6 * 6 - 1), rel=1e-5)


def test_alpha_divergence_gradient_equals_autograd_when_unclipped():
    """Without active clipping the injected AlphaNet gradient is the exact gradient of the divergence."""
    g = torch.Generator().manual_seed(3)
    s0, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for alpha in (-1.0, 0.5, 2.0):
        s = s0.clone().requires_grad_(True)
        alpha_divergence_loss(s, t, alpha, alpha, iw_clip=1e8).backward()
        s_ref = s0.clone().requires_grad_(True)
        q, p = F.softmax(s_ref, 1), F.softmax(t, 1)
        ref = ((q * ((p / q) ** alpha - 1)).sum(1) / (alpha * (alpha - 1))).mean()
        ref.backward()
        assert torch.allclose(s.grad, s_ref.grad, atol=1e-5), alpha


# ------------------------------------------------------------------------------------------------ shared properties
LOSSES = {
    "kd": lambda s, t: kd_loss(s, t, 2.0),
    "sigmoid_kd": lambda s, t: sigmoid_kd_loss(s, t, 2.0),
    "dkd": lambda s, t: dkd_loss(s, t, torch.tensor([0, 2])),
    "alpha_div": lambda s, t: alpha_divergence_loss(s, t),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_zero_for_identical_logits(name):
    s = torch.tensor(S_2X3, requires_grad=True)
    loss = LOSSES[name](s, torch.tensor(S_2X3))
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert s.grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_reaches_student_only(name):
    """t_logits are detached inside every function: a teacher tensor with requires_grad gets no gradient."""
    s = torch.tensor(S_2X3, requires_grad=True)
    t = torch.tensor(T_2X3, requires_grad=True)
    LOSSES[name](s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum().item() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_large_logits_finite(name):
    s = torch.tensor([[50.0, -50.0, 0.0], [-50.0, 0.0, 50.0]], requires_grad=True)
    t = torch.tensor([[-50.0, 50.0, 0.0], [50.0, -50.0, 0.0]])
    loss = LOSSES[name](s, t)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1.0
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_rows_give_zero(name):
    s = torch.zeros(0, 3, requires_grad=True)
    fns = dict(LOSSES, dkd=lambda s, t: dkd_loss(s, t, torch.zeros(0, dtype=torch.long)))
    loss = fns[name](s, torch.zeros(0, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.shape == (0, 3)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="weight"):
        sigmoid_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, weight=torch.ones(3))
    with pytest.raises(ValueError, match="target"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
