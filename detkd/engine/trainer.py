"""One training loop for ``train.py`` (a detector) and ``train_distill.py`` (the Distiller).

The trainer trains any module whose ``forward(images, targets)`` returns a dict of named scalar losses; it sums
them in exactly one place (:func:`sum_losses`) and logs each. The module may define ``trainable_state_dict()`` /
``load_trainable_state_dict()`` to control what a checkpoint holds (the Distiller keeps the teacher out).

Shape of a run (read top to bottom, like torchvision's ``references/detection``):
``fit`` -> for each epoch: ``train_one_epoch`` -> evaluate every ``eval.interval`` epochs -> checkpoint.

Under ``torchrun`` the module is wrapped in ``DistributedDataParallel``; only its registered parameters and buffers
take part (the Distiller holds its frozen teacher outside them, so no teacher buffer is broadcast), and
``find_unused_parameters`` is off unless the recipe sets ``train.find_unused_parameters``. The loss terms of a step
are stacked into one tensor, averaged over the processes, and read to the host once (:func:`reduce_loss_terms`):
that one read serves the non-finite check, the progress bar, the log and the epoch means (kept per term name: the
set of terms may change within an epoch, e.g. when a KD schedule's ``stop_at`` switches distillation off).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from detkd.config import Config, config_to_dict, dump_config
from detkd.engine.checkpoint import (
    load_checkpoint,
    load_state_dict_checked,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from detkd.errors import CheckpointMismatchError, DataError, NonFiniteLossError, RunError

LOGGER = logging.getLogger("detkd")


# ----------------------------------------------------------------------------------------------------------------
# Environment: device, seeds, processes
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available (the local rank's GPU under torchrun), else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; returns ``(rank, world_size)``."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the step
# ----------------------------------------------------------------------------------------------------------------


def sum_losses(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one place where named losses become the scalar that is back-propagated."""
    return sum(losses.values())


def reduce_loss_terms(losses: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """The terms of ``losses`` and their sum ``loss``, detached and stacked into one float64 vector (in the order
    of ``losses``, the sum last), averaged over the processes when distributed. No host sync."""
    terms = torch.stack([v.detach().to(torch.float64) for v in (*losses.values(), loss)])
    if dist.is_initialized():
        dist.all_reduce(terms)
        terms /= dist.get_world_size()
    return terms


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86: AVX-512 BF16 or AMX). On an x86 CPU without either,
    oneDNN emulates it: the benchmark teacher's bfloat16 step took 18.5 s against 1.07 s in float32 (AMD EPYC with
    AVX2 only, 2 threads, 2026-12-03). Other architectures are not probed (True: the config decides)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if callable(probe)]
    return not probes or any(probe() for probe in probes)  # a torch without the probes: trust the config


def autocast_dtype_for(amp: bool, device: torch.device) -> Optional[torch.dtype]:
    """The mixed-precision type of ``train.amp``: float16 with a gradient scaler on CUDA (torchvision's references),
    bfloat16 on the CPU, where autocast supports only it and no scaler is needed (bfloat16 keeps float32's exponent
    range). On a CPU with AVX-512 BF16 the quickstart teacher's step takes 0.44-0.52 s instead of 0.75-0.89 s (one
    thread, 2026-12-02). On a CPU without native bfloat16 (:func:`cpu_has_native_bfloat16`) emulation makes it many
    times slower than float32, so the run trains in float32 and says so."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if not cpu_has_native_bfloat16():
        LOGGER.warning(
            "train.amp is on, but this CPU (%s) has no native bfloat16 (AVX-512 BF16 or AMX), where bfloat16 "
            "autocast is emulated and about 17x slower than float32: training in float32 instead. Results differ "
            "slightly from a bfloat16 run of the same recipe; set train.amp=false to silence this.",
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    return torch.bfloat16


def check_finite(losses: dict[str, Any], step: int) -> None:
    """Stop the run on a NaN/inf loss, printing every term so the culprit is visible.

    Args:
        losses: ``{name: value}``, values as floats (already on the host) or scalar tensors.
        step: the iteration, for the message.

    Raises:
        NonFiniteLossError: a term is NaN or infinite (a ``FloatingPointError``; one paragraph from the tools).
    """
    values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
    if all(math.isfinite(v) for v in values.values()):
        return
    terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    raise NonFiniteLossError(
        f"non-finite loss at iteration {step}: {terms}. Lower train.optimizer.lr, set train.grad_clip, or lower "
        f"the weight of the term that diverged."
    )


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over the parameters that require grad (never a frozen teacher); no weight decay on norms
    and biases, as in torchvision's detection references. A module with ``lr_mult(name) -> float`` (the Distiller:
    an online teacher's ``teacher.lr_mult``) gets extra groups at that multiple of the learning rate, after the two
    groups at 1 (so ``param_groups[0]`` stays the student's, whose rate is logged)."""
    mult_of = getattr(unwrap(model), "lr_mult", None)
    by_mult: dict[float, tuple[list, list]] = {1.0: ([], [])}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        decay, no_decay = by_mult.setdefault(float(mult_of(name)) if mult_of else 1.0, ([], []))
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = cfg.train.optimizer
    groups = []
    for mult, (decay, no_decay) in by_mult.items():
        extra = {} if mult == 1.0 else {"lr": opt.lr * mult}
        groups += [{"params": decay, "weight_decay": opt.weight_decay, **extra},
                   {"params": no_decay, "weight_decay": 0.0, **extra}]  # fmt: skip
    # the fused kernels update every parameter in one pass: on the CPU, AdamW's step of the quickstart teacher (23 M
    # parameters) takes 22 ms fused against 80 ms per-tensor, 9 % of the step (one thread, /tmp profile, 2026-12-02)
    fused = can_fuse([p for group in groups for p in group["params"]])
    if opt.type == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, fused=fused)


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused optimizer kernels apply: floating-point parameters, all on one CPU or CUDA device."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(torch.is_floating_point(p) for p in params)
    )


def lr_factor(cfg: Config, iteration: int, iters_per_epoch: int, total_iters: int) -> float:
    """The multiplier of the base LR at ``iteration``: linear warm-up, then step or cosine decay."""
    train = cfg.train
    schedule = train.schedule
    if schedule.type == "step":
        passed = sum(iteration >= m * iters_per_epoch for m in schedule.milestones)
        factor = schedule.gamma**passed
    elif schedule.type == "cosine":
        progress = min(iteration / max(total_iters, 1), 1.0)
        factor = schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if iteration < train.warmup_iters:
        alpha = iteration / train.warmup_iters
        factor *= train.warmup_factor * (1 - alpha) + alpha
    return factor


@dataclass
class RunState:
    """What a checkpoint must restore for a resumed run to continue exactly where it stopped."""

    epoch: int = 0  # epochs completed
    iteration: int = 0  # iterations completed
    best_ap: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


class MetricsLogger:
    """Text log, JSONL metrics and TensorBoard scalars, written on rank 0 only."""

    def __init__(self, work_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(work_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        handler = logging.FileHandler(work_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._handler = handler
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(work_dir / "tensorboard"))

    def log(self, kind: str, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        # cpu_time: this process's CPU seconds, a cost measure that other jobs sharing the cores barely change
        record = {"type": kind, "iter": step, "epoch": epoch, "time": round(time.time(), 3),
                  "cpu_time": round(time.process_time(), 3), **values}  # fmt: skip
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image_chw, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        LOGGER.removeHandler(self._handler)
        self._handler.close()
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


IterCallback = Callable[["Trainer", int, dict[str, float]], None]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device,
    epoch: int,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: RunState,
    total_iters: int,
    log_interval: int,
    grad_clip: Optional[float] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    logger: Optional[MetricsLogger] = None,
    callbacks: Sequence[Callable[[int, dict[str, float]], None]] = (),
    desc: str = "",
    show_progress: bool = False,
) -> dict[str, float]:
    """One pass over ``data_loader``: forward -> named losses -> one backward -> step, until ``state.iteration``
    reaches ``total_iters``. Returns the mean of every loss term (and ``loss``) over the epoch's iterations, averaged
    over the processes. ``state.iteration`` counts the steps; ``callbacks`` get ``(iteration, loss values)``.
    ``autocast_dtype`` (see :func:`autocast_dtype_for`) runs the forward under ``torch.autocast``; a ``scaler`` goes
    with float16 only."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    bar = tqdm(data_loader, desc=desc, disable=not show_progress, dynamic_ncols=True, leave=False)
    for images, targets in bar:
        if state.iteration >= total_iters:
            break
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = model(images, targets)
        loss = sum_losses(losses)
        terms = reduce_loss_terms(losses, loss)
        values = dict(zip([*losses, "loss"], terms.tolist()))  # the one host sync of the step
        check_finite(values, state.iteration)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        state.iteration += 1

        for k, v in values.items():  # by name: a term may be absent from some steps (a KD schedule's off phase)
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
        if state.iteration % log_interval == 0 or state.iteration == 1:
            if logger is not None:
                # scalars the module reports beside its losses (e.g. the Distiller's distill/scale), never summed
                extra = dict(getattr(unwrap(model), "log_scalars", None) or {})
                logger.log("train", state.iteration, epoch, {**values, **extra, "lr": lr})
            LOGGER.info(
                "epoch %d iter %d lr %.3e %s",
                epoch + 1,
                state.iteration,
                lr,
                " ".join(f"{k}={v:.4f}" for k, v in values.items()),
            )
        for callback in callbacks:
            callback(state.iteration, values)
    return {k: v / counts[k] for k, v in sums.items()}


class Trainer:
    """Owns the model being trained, its optimizer/schedule, the loaders, logging and checkpoints.

    Args:
        cfg: the resolved config (stored in every checkpoint and written to ``work_dir/config.yaml``).
        model: any module whose ``forward(images, targets)`` returns a dict of named scalar losses in train mode.
        train_loader: yields ``(list[Tensor(3,H,W)], list[dict])``; its sampler must have ``set_epoch``.
        evaluate_fn: ``evaluate_fn(epoch) -> metrics dict with "AP"`` run on rank 0, or None for no evaluation.
        export_fn: ``export_fn() -> state_dict`` of the deployable detector, saved as ``best_name`` on a new best AP.
        work_dir: where checkpoints, logs and TensorBoard files go.
        best_name: file name of the best checkpoint (``best.pth``, or ``student_best.pth`` for distillation).
        iter_callbacks: called after every iteration as ``callback(trainer, iteration, loss_values)``.
        show_progress: tqdm bars (rank 0 only).

    The log files open, and ``work_dir/config.yaml`` is written, when :meth:`fit` starts; they are closed when it
    ends, also on failure.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_loader: DataLoader,
        device: torch.device,
        work_dir: Path,
        evaluate_fn: Optional[Callable[[int], dict[str, Any]]] = None,
        export_fn: Optional[Callable[[], dict[str, torch.Tensor]]] = None,
        best_name: str = "best.pth",
        iter_callbacks: Iterable[IterCallback] = (),
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.work_dir = Path(work_dir)
        self.train_loader = train_loader
        self.evaluate_fn = evaluate_fn
        self.export_fn = export_fn
        self.best_name = best_name
        self.iter_callbacks = list(iter_callbacks)
        self.is_main = is_main_process()
        self.show_progress = show_progress and self.is_main and sys.stderr is not None

        model.to(device)
        if dist.is_initialized():
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            model = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=cfg.train.find_unused_parameters, **ddp_kwargs
            )
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        self.iters_per_epoch = len(train_loader)
        if self.iters_per_epoch == 0:
            raise DataError(
                f"the training set has {len(train_loader.dataset)} images, fewer than one batch of "
                f"data.batch_size={cfg.data.batch_size} per process; lower data.batch_size."
            )
        self.total_iters = cfg.train.epochs * self.iters_per_epoch
        if cfg.train.max_iters is not None:
            self.total_iters = min(self.total_iters, cfg.train.max_iters)
        if hasattr(unwrap(model), "set_total_iters"):  # the run's length, for schedules inside the model
            unwrap(model).set_total_iters(self.total_iters)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(cfg, it, self.iters_per_epoch, self.total_iters)
        )
        self.autocast_dtype = autocast_dtype_for(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.state = RunState()
        self.logger: Optional[MetricsLogger] = None  # open while fit() runs

    # -- checkpoints ------------------------------------------------------------------------------------------

    @property
    def last_checkpoint(self) -> Path:
        return self.work_dir / "last.pth"

    def _module_state(self) -> dict[str, torch.Tensor]:
        module = unwrap(self.model)
        return module.trainable_state_dict() if hasattr(module, "trainable_state_dict") else module.state_dict()

    def save(self) -> None:
        if not self.is_main:
            return
        state = {
            "model": self._module_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "run": {
                "epoch": self.state.epoch,
                "iteration": self.state.iteration,
                "best_ap": self.state.best_ap,
                "best_epoch": self.state.best_epoch,
                "history": self.state.history,
            },
            "rng": rng_state(),
            "config": config_to_dict(self.cfg),
        }
        save_checkpoint(state, self.last_checkpoint)

    def resume(self, path: Optional[Path] = None) -> bool:
        """Restore model, optimizer, schedule, scaler, counters and RNG from ``path`` (default: ``last.pth``)."""
        path = Path(path) if path else self.last_checkpoint
        if not path.is_file():
            LOGGER.warning("--resume: no checkpoint at %s; starting from scratch.", path)
            return False
        ckpt = load_checkpoint(path, map_location=self.device)
        absent = [k for k in ("model", "optimizer", "scheduler", "run", "rng") if k not in ckpt]
        if absent:
            raise CheckpointMismatchError(
                f"checkpoint {path} is not a detkd training checkpoint (last.pth): it has no {', '.join(absent)}; "
                f"--resume continues a run from the last.pth that tools/train.py or train_distill.py wrote."
            )
        module = unwrap(self.model)
        if hasattr(module, "load_trainable_state_dict"):
            load_state_dict_checked(
                module, ckpt["model"], f"checkpoint {path}", expected=module.trainable_state_dict(),
                target="the recipe's model", load=module.load_trainable_state_dict, check_missing=False,
            )  # fmt: skip
        else:
            load_state_dict_checked(module, ckpt["model"], f"checkpoint {path}", target="the recipe's model")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        run = ckpt["run"]
        self.state = RunState(run["epoch"], run["iteration"], run["best_ap"], run["best_epoch"], list(run["history"]))
        set_rng_state(ckpt["rng"])
        if self.is_main:
            print(f"resumed from {path}: epoch {self.state.epoch}, iteration {self.state.iteration}")
        return True

    # -- the run ------------------------------------------------------------------------------------------------

    def fit(self, stop_after_epochs: Optional[int] = None) -> RunState:
        """Train to ``cfg.train.epochs`` (or ``max_iters``). ``stop_after_epochs`` ends early, as an interruption
        would (used to test that resuming reproduces an uninterrupted run)."""
        start = time.time()
        self.logger = MetricsLogger(self.work_dir, self.cfg.log.tensorboard, enabled=self.is_main)
        try:
            if self.is_main:
                dump_config(self.cfg, self.work_dir / "config.yaml")
            self._run_epochs(stop_after_epochs)
            if self.is_main:
                LOGGER.info("training finished in %.1f s", time.time() - start)
        finally:
            self.logger.close()
        return self.state

    def _run_epochs(self, stop_after_epochs: Optional[int]) -> None:
        cfg = self.cfg
        callbacks = [functools.partial(callback, self) for callback in self.iter_callbacks]
        while self.state.epoch < cfg.train.epochs and self.state.iteration < self.total_iters:
            epoch = self.state.epoch
            for sampler in (self.train_loader.sampler, self.train_loader.batch_sampler):
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
            if hasattr(self.train_loader.dataset, "set_epoch"):
                self.train_loader.dataset.set_epoch(epoch)
            means = train_one_epoch(
                self.model,
                self.optimizer,
                self.train_loader,
                self.device,
                epoch,
                scheduler=self.scheduler,
                state=self.state,
                total_iters=self.total_iters,
                log_interval=cfg.train.log_interval,
                grad_clip=cfg.train.grad_clip,
                scaler=self.scaler,
                autocast_dtype=self.autocast_dtype,
                logger=self.logger,
                callbacks=callbacks,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                show_progress=self.show_progress,
            )
            self.state.epoch += 1
            record = {"epoch": self.state.epoch, "iteration": self.state.iteration, **means}
            last = self.state.epoch >= cfg.train.epochs or self.state.iteration >= self.total_iters
            due = bool(cfg.eval.interval) and self.state.epoch % cfg.eval.interval == 0
            if self.evaluate_fn is not None and (last or due):
                record.update(self._evaluate(epoch))
            self.state.history.append(record)
            if last or self.state.epoch % max(cfg.checkpoint.interval, 1) == 0:
                self.save()
            barrier()
            if stop_after_epochs is not None and self.state.epoch >= stop_after_epochs:
                break

    def _evaluate(self, epoch: int) -> dict[str, float]:
        if not self.is_main:
            return {}
        metrics = self.evaluate_fn(epoch)
        summary = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.logger.log("val", self.state.iteration, epoch, {k.split("/", 1)[1]: v for k, v in summary.items()})
        ap = float(metrics.get("AP", -1.0))
        LOGGER.info("epoch %d val AP %.4f", epoch + 1, ap)
        if ap > self.state.best_ap:
            self.state.best_ap, self.state.best_epoch = ap, epoch + 1
            if self.export_fn is not None:
                best = {
                    "model": self.export_fn(),
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                    "epoch": epoch + 1,
                    "config": config_to_dict(self.cfg),
                }
                save_checkpoint(best, self.work_dir / self.best_name)
        return summary


def make_train_loader(
    dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, seed: int, collate_fn: Callable
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): a DistributedSampler (one replica when not under
    torchrun), so an interrupted and resumed run sees the same batches as an uninterrupted one."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=True,
        persistent_workers=False,
    )
