"""How much each of several teachers teaches: ``distill.teacher_weighting.mode``.

Teacher ``k`` has a config weight ``c_k``. Every distillation term is computed against each teacher and multiplied by
that teacher's weight ``w_k``; the weights of a step sum to 1, so a recipe's loss weights mean the same with one
teacher or several.

* ``fixed``: ``w_k = c_k / sum_j c_j``.
* ``confidence``: per image ``i``, from each teacher's own detection loss ``L_ki`` on that image's targets (computed
  under ``no_grad`` from the teacher's recorded outputs): ``w_ki = softmax_k(-L_ki / temperature)``
  (:func:`confidence_weights`). A teacher that is wrong on an image (a high loss there) teaches less on it; the
  terms are then evaluated per image, ``term_k = (1 / N) sum_i w_ki * term_k(image i)``.
* ``adaptive``: the seeds' agent, a multi-armed bandit. Its arms are the non-empty subsets of the teachers
  (:func:`teacher_subsets`, ``2^K - 1`` arms); it plays EXP3 (Auer et al., SIAM J. Computing 2002). A round lasts
  ``interval`` steps: at its start the policy draws an arm from

      p_a = (1 - gamma) * exp(s_a) / sum_b exp(s_b) + gamma / A        (A arms, s = log-weights)

  and for the round the student follows that subset (``w_k = c_k / sum_{j in subset} c_j`` inside it, 0 outside).
  At the round's end the student's detection loss on a fixed held-out slice of the *training* set (never val) is
  measured again; the reward is its relative improvement ``r = (L_before - L_after) / L_before`` mapped to [0, 1] by
  ``x = clamp(0.5 + 0.5 * r / reward_scale, 0, 1)`` (:func:`improvement_reward`), and EXP3 updates the arm played:
  ``s_a <- s_a + gamma * x / (p_a * A)`` (:func:`exp3_update`). The draw of round ``t`` uses a generator seeded with
  ``(seed, t)`` (:func:`draw_arm`), so the policy's whole state is the few numbers in its buffers: they are saved with
  the distiller and a resumed run draws the same arms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "WEIGHTING_MODES",
    "TeacherWeighting",
    "normalized_weights",
    "confidence_weights",
    "teacher_subsets",
    "exp3_probabilities",
    "exp3_update",
    "improvement_reward",
    "draw_arm",
    "Exp3Policy",
]

WEIGHTING_MODES = ("fixed", "confidence", "adaptive")
MAX_ADAPTIVE_TEACHERS = 8  # 2^8 - 1 = 255 arms; beyond that the bandit cannot try each subset in a run


@dataclass(frozen=True)
class TeacherWeighting:
    """The weighting of several teachers (module docstring). ``temperature``: confidence softmax; ``interval``,
    ``gamma``, ``reward_scale``: the adaptive bandit (steps per round, exploration, the relative improvement that
    earns the full reward); ``seed``: its draws."""

    mode: str = "fixed"
    temperature: float = 1.0
    interval: int = 20
    gamma: float = 0.1
    reward_scale: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in WEIGHTING_MODES:
            raise ValueError(f"teacher weighting mode '{self.mode}' is unknown; valid: {', '.join(WEIGHTING_MODES)}")


def normalized_weights(weights: Sequence[float], follow: Optional[Sequence[bool]] = None) -> list[float]:
    """``c_k / sum_j c_j`` over the followed teachers (all by default); 0 for the others."""
    follow = [True] * len(weights) if follow is None else list(follow)
    total = sum(float(w) for w, f in zip(weights, follow) if f)
    if total <= 0:
        raise ValueError(f"the followed teachers' weights sum to {total}; at least one must be > 0 ({list(weights)})")
    return [float(w) / total if f else 0.0 for w, f in zip(weights, follow)]


def confidence_weights(losses: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax_k(-L_ik / temperature)``: (N images, K teachers) detection losses -> (N, K) weights, rows sum to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(-losses.detach().double() / temperature, dim=1).to(losses.dtype)


def teacher_subsets(num_teachers: int) -> list[tuple[int, ...]]:
    """The adaptive policy's arms: every non-empty subset of the teachers, arm ``a`` = the teachers in the bits of
    ``a + 1`` (two teachers: ``[(0,), (1,), (0, 1)]``)."""
    if not 1 <= num_teachers <= MAX_ADAPTIVE_TEACHERS:
        raise ValueError(f"the adaptive policy takes 1 to {MAX_ADAPTIVE_TEACHERS} teachers, got {num_teachers}")
    return [tuple(k for k in range(num_teachers) if (a >> k) & 1) for a in range(1, 2**num_teachers)]


def exp3_probabilities(log_weights: Tensor, gamma: float) -> Tensor:
    """``(1 - gamma) softmax(s) + gamma / A``."""
    a = log_weights.numel()
    return (1.0 - gamma) * torch.softmax(log_weights, dim=0) + gamma / a


def exp3_update(log_weights: Tensor, arm: int, reward: float, prob: float, gamma: float) -> Tensor:
    """EXP3's update of the arm played: ``s_arm += gamma * reward / (prob * A)`` (the importance-weighted reward
    ``reward / prob``); shifted so that the largest log-weight is 0 (the probabilities do not change)."""
    if not 0.0 <= reward <= 1.0:
        raise ValueError(f"EXP3 rewards lie in [0, 1], got {reward}")
    out = log_weights.clone()
    out[arm] += gamma * reward / (prob * log_weights.numel())
    return out - out.max()


def improvement_reward(before: float, after: float, reward_scale: float) -> float:
    """``clamp(0.5 + 0.5 * r / reward_scale, 0, 1)`` with ``r = (before - after) / before`` the relative improvement of
    the held-out loss (no change: 0.5; an improvement of ``reward_scale`` or more: 1)."""
    rel = (before - after) / max(abs(before), 1e-12)
    return min(1.0, max(0.0, 0.5 + 0.5 * rel / reward_scale))


def draw_arm(probs: Tensor, seed: int, round_index: int) -> int:
    """The arm of round ``round_index``: inverse-CDF sampling of ``probs`` with a uniform from a generator seeded by
    ``(seed, round_index)`` (no generator state to save)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(round_index))
    u = torch.rand((), generator=g, dtype=torch.float64)
    cdf = torch.cumsum(probs.detach().double().cpu(), dim=0)
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


class Exp3Policy(nn.Module):
    """The ``adaptive`` bandit (module docstring). Its state lives in buffers, so it is part of the distiller's
    ``state_dict`` (checkpoint key prefix ``teacher_policy.``) and a resumed run continues bit-exactly.

    Buffers: ``log_weights`` (A,), ``arm`` (the arm of the current round, -1 before the first), ``prob`` (its
    probability when drawn), ``steps`` (training steps seen), ``round`` (rounds started), ``last_loss`` (the held-out
    loss at the round's start), ``last_reward``.
    """

    def __init__(self, num_teachers: int, interval: int = 20, gamma: float = 0.1, reward_scale: float = 0.05,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.arms = teacher_subsets(num_teachers)
        self.num_teachers = num_teachers
        self.interval, self.gamma, self.reward_scale, self.seed = interval, gamma, reward_scale, seed
        self.register_buffer("log_weights", torch.zeros(len(self.arms), dtype=torch.float64))
        self.register_buffer("arm", torch.full((), -1, dtype=torch.long))
        self.register_buffer("prob", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("round", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_loss", torch.full((), math.nan, dtype=torch.float64))
        self.register_buffer("last_reward", torch.full((), math.nan, dtype=torch.float64))

    def probabilities(self) -> Tensor:
        return exp3_probabilities(self.log_weights, self.gamma)

    def followed(self) -> list[bool]:
        """Per teacher: does the student follow it this round (all before the first round)?"""
        arm = int(self.arm)
        chosen = self.arms[arm] if arm >= 0 else tuple(range(self.num_teachers))
        return [k in chosen for k in range(self.num_teachers)]

    @torch.no_grad()
    def begin_step(self, holdout_loss: Callable[[], float]) -> Optional[dict]:
        """Call before every training step. At a round boundary (every ``interval`` steps) it measures the held-out
        loss, rewards the arm of the round that ended, draws the next arm, and returns what happened (for the log);
        otherwise returns None."""
        event = None
        if int(self.steps) % self.interval == 0:
            loss = float(holdout_loss())
            event = {"step": int(self.steps), "round": int(self.round), "holdout_loss": loss}
            arm, before = int(self.arm), float(self.last_loss)
            if arm >= 0 and math.isfinite(before) and math.isfinite(loss):
                reward = improvement_reward(before, loss, self.reward_scale)
                self.log_weights.copy_(exp3_update(self.log_weights, arm, reward, float(self.prob), self.gamma))
                self.last_reward.fill_(reward)
                event.update({"rewarded_arm": arm, "rewarded_teachers": list(self.arms[arm]), "reward": reward})
            self.last_loss.fill_(loss)
            probs = self.probabilities()
            arm = draw_arm(probs, self.seed, int(self.round))
            self.arm.fill_(arm)
            self.prob.fill_(float(probs[arm]))
            self.round += 1
            event.update({"arm": arm, "teachers": list(self.arms[arm]), "probabilities": probs.tolist()})
        self.steps += 1
        return event

    def extra_repr(self) -> str:
        return f"arms={self.arms}, interval={self.interval}, gamma={self.gamma}, reward_scale={self.reward_scale}"
