"""Distillation weights that schedule and calibrate themselves.

* :func:`kd_schedule_scale`: the RTMDet / YOLOv6 habit of ramping distillation in and out. The scale multiplies every
  distillation term: a linear warm-up from 0 over ``warmup_iters``, then a decay from 1 to ``final_ratio`` over the
  whole run (``linear`` or ``cosine``; ``none`` keeps 1), and 0 from ``stop_at`` (a fraction of training) on::

      s(i) = min(1, i / warmup_iters) * d(i / total),   s(i) = 0 for i / total >= stop_at
      d(p) = 1 - (1 - r) p   (linear)   |   r + (1 - r) (1 + cos(pi p)) / 2   (cosine)   |   1   (none)

* :class:`LossScaler`: the schedule plus ``weight: auto``. For a loss whose weight is ``auto``, the first
  ``calibration_iters`` iterations accumulate its unweighted value ``u`` and the task loss ``L`` (both detached); the
  weight is ``w = target_ratio * sum L / sum u`` (the running estimate while calibrating, fixed after), so the
  weighted term equals ``target_ratio`` x the task loss on average over the calibration window. This replaces the
  manual rule of ``benchmarks/loss_scales.py`` (a weight measured on one training batch before training).

The scaler's state (iteration, run length, the auto weights and their sums) lives in buffers, so it is saved with
the distiller in every checkpoint and a resumed run continues with the same scale and the same calibrated weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["kd_schedule_scale", "LossScaler", "AutoWeightReport"]


def kd_schedule_scale(
    iteration: int,
    total_iters: int,
    warmup_iters: int = 0,
    decay: str = "none",
    final_ratio: float = 0.0,
    stop_at: float = 1.0,
) -> float:
    """The distillation scale at ``iteration`` (0-based) of a run of ``total_iters`` (formula: module docstring)."""
    if decay not in ("none", "linear", "cosine"):
        raise ValueError(f"decay must be none, linear or cosine, got {decay!r}")
    progress = iteration / max(total_iters, 1)
    if progress >= stop_at:
        return 0.0
    warm = min(1.0, iteration / warmup_iters) if warmup_iters > 0 else 1.0
    p = min(progress, 1.0)
    if decay == "linear":
        level = 1.0 - (1.0 - final_ratio) * p
    elif decay == "cosine":
        level = final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        level = 1.0
    return warm * level


class LossScaler(nn.Module):
    """The schedule's scale and the ``weight: auto`` calibration of the Distiller's losses (state in buffers).

    Args:
        auto: ``{loss name: target_ratio}`` of the losses whose weight is ``auto``.
        calibration_iters: iterations over which the auto weights are measured.
        schedule: ``(warmup_iters, decay, final_ratio, stop_at)`` or None (scale 1 throughout).
    """

    def __init__(
        self,
        auto: Mapping[str, float] = (),
        calibration_iters: int = 50,
        schedule: Optional[tuple[int, str, float, float]] = None,
    ) -> None:
        super().__init__()
        self.names: list[str] = list(dict(auto))
        self.target_ratio = [float(dict(auto)[n]) for n in self.names]
        self.calibration_iters = calibration_iters
        self.schedule = schedule
        k = len(self.names)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_iters", torch.zeros((), dtype=torch.long))
        self.register_buffer("auto_weight", torch.ones(k, dtype=torch.float64))
        self.register_buffer("sum_term", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("sum_task", torch.zeros((), dtype=torch.float64))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.long))  # iterations measured so far

    def set_total_iters(self, total_iters: int) -> None:
        """The run's length (the schedule's ``total``); called by the runner before training."""
        self.total_iters.fill_(int(total_iters))

    def scale(self) -> float:
        """The schedule's scale for the current iteration (1 without a schedule)."""
        if self.schedule is None:
            return 1.0
        warmup, decay, final_ratio, stop_at = self.schedule
        return kd_schedule_scale(int(self.iteration), int(self.total_iters), warmup, decay, final_ratio, stop_at)

    @property
    def calibrating(self) -> bool:
        return bool(self.names) and int(self.calibrated) < self.calibration_iters

    def weights(self) -> dict[str, float]:
        """The current auto weights, ``{loss name: weight}``."""
        return dict(zip(self.names, self.auto_weight.tolist()))

    @torch.no_grad()
    def observe(self, task_loss: Tensor, unweighted: Mapping[str, Tensor]) -> None:
        """Add one calibration iteration: the task loss and each auto loss's unweighted value (both detached)."""
        if not self.calibrating:
            return
        values = torch.stack([unweighted[n].detach().to(torch.float64).reshape(()) for n in self.names])
        self.sum_term += values.abs()
        self.sum_task += task_loss.detach().to(torch.float64).abs()
        ratio = torch.where(self.sum_term > 0, self.sum_task / self.sum_term.clamp(min=1e-30), torch.ones_like(values))
        self.auto_weight.copy_(torch.tensor(self.target_ratio, dtype=torch.float64, device=ratio.device) * ratio)
        self.calibrated += 1

    def step(self) -> None:
        """Advance the iteration counter (once per training forward)."""
        self.iteration += 1

    def extra_repr(self) -> str:
        return f"auto={self.names}, calibration_iters={self.calibration_iters}, schedule={self.schedule}"

    @staticmethod
    def auto_names(specs: Sequence) -> dict[str, float]:
        """``{name: target_ratio}`` of the loss specs whose weight is ``"auto"``."""
        return {s.name: s.target_ratio for s in specs if s.weight == "auto"}


class AutoWeightReport:
    """A trainer callback: when the ``weight: auto`` calibration ends, print the chosen weights and write them to
    ``<work_dir>/auto_weights.json`` (``{loss: weight}``, with the target ratios and the iterations measured).

    Args:
        scaler: the Distiller's :class:`LossScaler`.
        out_file: where the weights go.
        show: print them.
    """

    def __init__(self, scaler: LossScaler, out_file, show: bool = True) -> None:
        self.scaler, self.out_file, self.show = scaler, out_file, show
        self.done = not scaler.calibrating  # a resumed run that had finished calibrating wrote the file already

    def __call__(self, trainer, iteration: int, values) -> None:
        if self.done or self.scaler.calibrating:
            return
        from detkd.engine.evaluator import save_metrics

        weights = self.scaler.weights()
        record = {"weights": weights, "target_ratio": dict(zip(self.scaler.names, self.scaler.target_ratio)),
                  "calibration_iters": self.scaler.calibration_iters, "iteration": iteration}  # fmt: skip
        save_metrics(record, self.out_file)  # atomic JSON
        if self.show:
            shown = ", ".join(f"{k} = {v:.4g}" for k, v in weights.items())
            print(f"weight: auto calibrated over {self.scaler.calibration_iters} iterations: {shown} ({self.out_file})")
        self.done = True
