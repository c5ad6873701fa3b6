"""KD weight schedule and `weight: auto` calibration: formulas by hand, the Distiller's use of them, resume state."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.distiller import Distiller, LossSpec
from detkd.losses import build_feature_loss
from detkd.losses.scaling import LossScaler, kd_schedule_scale
from detkd.models.build import build_detector


def test_kd_schedule_scale_by_hand():
    # warm-up over 10 of 100 iterations, cosine to 0.2, off from 80 %
    args = dict(total_iters=100, warmup_iters=10, decay="cosine", final_ratio=0.2, stop_at=0.8)
    assert kd_schedule_scale(0, **args) == 0.0
    assert kd_schedule_scale(5, **args) == pytest.approx(0.5 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.05))))
    assert kd_schedule_scale(50, **args) == pytest.approx(0.2 + 0.8 * 0.5)  # cos(pi/2) = 0
    assert kd_schedule_scale(79, **args) > 0 and kd_schedule_scale(80, **args) == 0.0
    assert kd_schedule_scale(30, 100, decay="linear", final_ratio=0.5) == pytest.approx(1 - 0.5 * 0.3)
    assert kd_schedule_scale(99, 100) == 1.0  # no schedule: 1 throughout
    with pytest.raises(ValueError, match="decay must be"):
        kd_schedule_scale(1, 10, decay="exp")


def test_loss_scaler_calibrates_to_the_target_ratio_and_then_freezes():
    scaler = LossScaler({"a": 1.0, "b": 0.5}, calibration_iters=2)
    scaler.observe(torch.tensor(2.0), {"a": torch.tensor(4.0), "b": torch.tensor(0.1)})
    assert scaler.weights() == pytest.approx({"a": 0.5, "b": 0.5 * 2.0 / 0.1})
    scaler.observe(torch.tensor(4.0), {"a": torch.tensor(2.0), "b": torch.tensor(0.2)})
    expected = {"a": 6.0 / 6.0, "b": 0.5 * 6.0 / 0.3}
    assert scaler.weights() == pytest.approx(expected) and not scaler.calibrating
    scaler.observe(torch.tensor(100.0), {"a": torch.tensor(1.0), "b": torch.tensor(1.0)})  # after the window
    assert scaler.weights() == pytest.approx(expected)
    restored = LossScaler({"a": 1.0, "b": 0.5}, calibration_iters=2)
    restored.load_state_dict(scaler.state_dict())  # the resume state keeps the calibrated weights
    assert restored.weights() == pytest.approx(expected) and not restored.calibrating


def _distiller(weight, schedule=None, calibration_iters=3):
    torch.manual_seed(0)
    t = build_detector("retinanet", "resnet18", 4, fpn_channels=32, min_size=64, max_size=64)
    s = build_detector("retinanet", "resnet18", 4, fpn_channels=16, min_size=64, max_size=64)
    spec = LossSpec("mse", build_feature_loss("mse"), weight, ("p3", "p4"), target_ratio=0.5)
    d = Distiller(t, s, [spec], probe_size=64, schedule=schedule, calibration_iters=calibration_iters).train()
    d.scaler.set_total_iters(10)
    return d


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])}] * 2
    return images, targets


def test_weight_auto_makes_the_term_target_ratio_times_the_task_loss():
    d = _distiller("auto")
    images, targets = _batch()
    sums = {"task": 0.0, "raw": 0.0}
    for _ in range(3):
        weight = d.scaler.weights()["mse"]  # the weight this forward applies (the estimate so far; 1 at first)
        with torch.no_grad():
            losses = d(images, targets)
        distill = losses["distill/mse/p3"] + losses["distill/mse/p4"]
        sums["task"] += float(sum(v for k, v in losses.items() if k.startswith("task/")))
        sums["raw"] += float(distill) / weight
    assert d.scaler.weights()["mse"] == pytest.approx(0.5 * sums["task"] / sums["raw"], rel=1e-5)
    assert d.log_scalars["distill/weight/mse"] == pytest.approx(d.scaler.weights()["mse"])
    frozen = d.scaler.weights()["mse"]
    with torch.no_grad():
        d(images, targets)
    assert d.scaler.weights()["mse"] == frozen  # fixed after calibration_iters
    assert "scaler.auto_weight" in d.trainable_state_dict()  # saved in checkpoints: kept on resume


def test_the_schedule_scales_every_term_and_stops_distillation():
    plain, scheduled = _distiller(1.0), _distiller(1.0, schedule=(2, "none", 0.0, 0.5))
    images, targets = _batch()
    calls = {"n": 0}
    scheduled.teacher.backbone.register_forward_hook(lambda m, a, o: calls.__setitem__("n", calls["n"] + 1))
    for it in range(6):
        with torch.no_grad():
            a, b = plain(images, targets), scheduled(images, targets)
        expected = kd_schedule_scale(it, 10, 2, "none", 0.0, 0.5)
        assert scheduled.log_scalars["distill/scale"] == pytest.approx(expected)
        if expected == 0.0:  # iteration 0 (warm-up from 0) and from stop_at on: nothing is computed
            assert not any(k.startswith("distill/") for k in b)
        else:
            assert b["distill/mse/p3"].item() == pytest.approx(expected * a["distill/mse/p3"].item(), rel=1e-5)
        assert b["task/classification"].item() == pytest.approx(a["task/classification"].item(), rel=1e-5)
    assert calls["n"] == 4  # iterations 1..4 ran the teacher; at 0 the scale is 0, from 50 % of 10 on it is off


def test_train_distill_logs_the_scale_and_knows_the_run_length(tiny_data, tmp_path):
    import json
    from pathlib import Path

    from conftest import tiny_model, tiny_recipe

    from detkd.config import load_config
    from detkd.engine.runner import train_distill

    torch.manual_seed(0)
    teacher = build_detector("retinanet", "resnet18", 9, fpn_channels=32, min_size=64, max_size=64)
    torch.save(teacher.state_dict(), tmp_path / "t.pth")
    path = tiny_recipe(
        tiny_data,
        tmp_path,
        "sched",
        teacher={**tiny_model(fpn_channels=32), "checkpoint": str(tmp_path / "t.pth")},
        student=tiny_model(fpn_channels=16),
        distill={"features": [{"type": "pkd", "weight": "auto", "target_ratio": 0.5}],
                 "schedule": {"warmup_iters": 2, "decay": "linear", "final_ratio": 0.0},
                 "calibration_iters": 2, "teacher_check": {"enabled": False}},
        train={"epochs": 1, "max_iters": 4, "optimizer": {"type": "sgd", "lr": 0.01}, "device": "cpu",
               "log_interval": 1},
        eval={"interval": 1, "max_images": 2},
    )  # fmt: skip
    summary = train_distill(load_config(path), show_progress=False)
    assert int(summary["distiller"].scaler.total_iters) == 4
    rows = [json.loads(x) for x in (Path(tmp_path) / "work_sched" / "metrics.jsonl").read_text().splitlines()]
    scales = [r["distill/scale"] for r in rows if r["type"] == "train"]
    assert scales == pytest.approx([kd_schedule_scale(i, 4, 2, "linear", 0.0) for i in range(4)])
    assert all("distill/weight/pkd" in r for r in rows if r["type"] == "train")
    chosen = json.loads((Path(tmp_path) / "work_sched" / "auto_weights.json").read_text())
    assert chosen["weights"]["pkd"] == pytest.approx(summary["distiller"].scaler.weights()["pkd"])
    assert chosen["target_ratio"] == {"pkd": 0.5} and chosen["calibration_iters"] == 2
    teacher = json.loads((Path(tmp_path) / "work_sched" / "teacher_val.json").read_text())
    assert teacher["AP"] == pytest.approx(summary["teacher_ap"])  # for tools/diagnose.py


def test_epoch_means_are_kept_per_term_when_distillation_stops_mid_epoch():
    """A KD schedule's stop_at (or a warm-up from 0) removes the distill/* terms from some steps of an epoch; the
    epoch mean of each term is over the steps that had it, and the other terms are unaffected."""
    from detkd.engine.trainer import RunState, train_one_epoch

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))
            self.calls = 0

        def forward(self, images, targets):
            self.calls += 1
            losses = {"task/cls": self.w * 0 + float(self.calls)}
            if self.calls <= 2:  # distillation on for the first two steps only
                losses["distill/mse/p3"] = self.w * 0 + 10.0 * self.calls
            return losses

    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    loader = [([torch.zeros(3, 8, 8)], [{}])] * 4
    means = train_one_epoch(model, opt, loader, torch.device("cpu"), 0, scheduler=sched, state=RunState(),
                            total_iters=4, log_interval=10)  # fmt: skip
    assert means["task/cls"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert means["distill/mse/p3"] == pytest.approx((10 + 20) / 2)
    assert means["loss"] == pytest.approx((11 + 22 + 3 + 4) / 4)
