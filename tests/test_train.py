"""The training loop: schedule, exact resume, non-finite stop, the train/eval tools and a 2-process DDP run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_tool, tiny_model, tiny_recipe

from detkd.config import config_from_dict, load_config
from detkd.engine.checkpoint import load_checkpoint, save_checkpoint
from detkd.engine.runner import train_detector
from detkd.engine.trainer import (
    RunState,
    autocast_dtype_for,
    build_optimizer,
    can_fuse,
    check_finite,
    lr_factor,
    train_one_epoch,
)


def test_lr_schedule_warmup_step_and_cosine(tmp_path, tiny_data):
    cfg = load_config(
        tiny_recipe(tiny_data, tmp_path),
        ["train.warmup_iters=10", "train.warmup_factor=0.1", "train.schedule.type=step"]
        + ["train.schedule.milestones=[2]"],
    )
    assert lr_factor(cfg, 0, 5, 20) == pytest.approx(0.1)
    assert lr_factor(cfg, 5, 5, 20) == pytest.approx(0.1 * 0.5 + 0.5)  # halfway through the linear warm-up
    assert lr_factor(cfg, 10, 5, 20) == pytest.approx(0.1)  # milestone epoch 2 = iteration 10 -> gamma
    assert lr_factor(cfg, 9, 5, 20) == pytest.approx((0.1 * 0.1 + 0.9) * 1.0)
    cos = load_config(
        tiny_recipe(tiny_data, tmp_path),
        ["train.warmup_iters=0", "train.schedule.type=cosine", "train.schedule.min_lr_ratio=0.1"],
    )
    assert lr_factor(cos, 0, 5, 20) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 5, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 20, 5, 20) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_fused_optimizer_takes_the_textbook_step(kind):
    """build_optimizer uses torch's fused kernels on the CPU; one step must equal the update written out by hand
    (AdamW: decoupled decay, bias-corrected moments; SGD: momentum buffer = grad on the first step)."""
    lr, wd, betas, eps = 0.1, 0.05, (0.9, 0.999), 1e-8
    net = torch.nn.Linear(3, 2)
    data = {"train": {"ann_file": "x", "img_dir": "y"}, "val": {"ann_file": "x", "img_dir": "y"}}
    optim = {"type": kind, "lr": lr, "weight_decay": wd, "betas": list(betas), "momentum": 0.9}
    cfg = config_from_dict({"data": data, "train": {"optimizer": optim}})
    optimizer = build_optimizer(cfg, net)
    assert all(group["fused"] for group in optimizer.param_groups)
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    net(torch.arange(6.0).reshape(2, 3)).square().sum().backward()
    gw, gb = net.weight.grad.clone(), net.bias.grad.clone()
    optimizer.step()
    if kind == "adamw":  # first step: m_hat = g, v_hat = g^2, so the update is g / (|g| + eps)
        want_w = w0 * (1 - lr * wd) - lr * gw / (gw.abs() + eps)
        want_b = b0 - lr * gb / (gb.abs() + eps)  # biases: no weight decay
    else:  # weight decay is added to the gradient; biases have none
        want_w, want_b = w0 - lr * (gw + wd * w0), b0 - lr * gb
    torch.testing.assert_close(net.weight.detach(), want_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.bias.detach(), want_b, rtol=1e-6, atol=1e-6)


def test_fusing_needs_one_cpu_or_cuda_device_and_float_parameters():
    assert can_fuse([torch.zeros(2), torch.zeros(3)])
    assert not can_fuse([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not can_fuse([torch.zeros(2, dtype=torch.int64)])


def test_amp_on_the_cpu_is_bfloat16_autocast_without_a_scaler(monkeypatch):
    import detkd.engine.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: True)
    assert autocast_dtype_for(False, torch.device("cpu")) is None
    assert autocast_dtype_for(True, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype_for(True, torch.device("cuda")) == torch.float16

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)
            self.dtypes = []

        def forward(self, images, targets):
            out = self.linear(torch.stack(images).flatten(1)[:, :2])
            self.dtypes.append(out.dtype)
            return {"loss_a": out.float().square().mean()}

    def one_epoch(dtype):
        model = Probe()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batches = [([torch.ones(1, 1, 2)], [{}])] * 2
        means = train_one_epoch(model, optimizer, batches, torch.device("cpu"), 0, scheduler=scheduler,
                                state=RunState(), total_iters=2, log_interval=1, autocast_dtype=dtype)  # fmt: skip
        return model, means

    model, means = one_epoch(torch.bfloat16)
    assert model.dtypes == [torch.bfloat16, torch.bfloat16]
    assert model.linear.weight.dtype == torch.float32  # the weights (and the optimizer's update) stay float32
    assert math.isfinite(means["loss"])
    assert one_epoch(None)[0].dtypes == [torch.float32, torch.float32]


def test_amp_on_a_cpu_without_native_bfloat16_trains_in_float32_and_says_why(monkeypatch, caplog):
    import detkd.engine.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_has_native_bfloat16", lambda: False)
    with caplog.at_level("WARNING", logger="detkd"):
        assert autocast_dtype_for(True, torch.device("cpu")) is None
    assert "no native bfloat16" in caplog.text and "training in float32" in caplog.text
    assert autocast_dtype_for(True, torch.device("cuda")) == torch.float16  # CUDA is not affected


def test_the_bfloat16_probe_reads_the_cpu_flags_on_x86_only(monkeypatch):
    import platform

    import detkd.engine.trainer as trainer

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert trainer.cpu_has_native_bfloat16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert trainer.cpu_has_native_bfloat16() is True
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # not probed: the config decides
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert trainer.cpu_has_native_bfloat16() is True


def test_non_finite_loss_names_every_term():
    losses = {"classification": torch.tensor(1.5), "bbox_regression": torch.tensor(math.nan)}
    with pytest.raises(FloatingPointError, match=r"iteration 7: classification=1\.5, bbox_regression=nan"):
        check_finite(losses, 7)
    check_finite({"a": torch.tensor(0.0)}, 0)  # finite: no error


def test_atomic_save_keeps_last_good_checkpoint_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"w": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_data):
    """Stop after epoch 1, resume from last.pth, and end with exactly the weights of an uninterrupted run."""
    model = tiny_model("faster_rcnn")  # its RPN/ROI samplers draw from the torch RNG: the RNG state must resume too
    full = load_config(tiny_recipe(tiny_data, tmp_path, "full", model=model), ["eval.interval=0"])
    cut = load_config(tiny_recipe(tiny_data, tmp_path, "cut", model=model), ["eval.interval=0"])
    train_detector(full, show_progress=False)
    train_detector(cut, show_progress=False, stop_after_epochs=1)
    assert load_checkpoint(f"{cut.work_dir}/last.pth")["run"]["epoch"] == 1
    summary = train_detector(cut, resume=True, show_progress=False)
    assert summary["iterations"] == 2 * 6  # 24 images / batch 4 = 6 iterations per epoch
    a, b = _weights(f"{full.work_dir}/last.pth"), _weights(f"{cut.work_dir}/last.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_tool_logs_checkpoints_and_eval_tool_reproduces_ap(tmp_path, tiny_data):
    recipe = tiny_recipe(tiny_data, tmp_path, "cli", model=tiny_model(), log={"tensorboard": True})
    work = tmp_path / "work_cli"
    proc = run_tool("train.py", "--cfg", str(recipe), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best val AP" in proc.stdout
    for name in ("last.pth", "best.pth", "config.yaml", "metrics.jsonl", "train.log", "val_epoch2.json"):
        assert (work / name).is_file(), name
    assert any((work / "tensorboard").iterdir())
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert {"loss", "lr", "classification", "bbox_regression"} <= set(train_records[0])
    assert [r["iter"] for r in train_records][:3] == [1, 2, 3]
    best = load_checkpoint(work / "best.pth")
    assert "config" in best and best["config"]["model"]["arch"] == "retinanet"
    assert load_checkpoint(work / "last.pth")["config"]["train"]["epochs"] == 2

    out = tmp_path / "eval_out"
    args = ["--cfg", str(recipe), "--ckpt", str(work / "best.pth"), "--out", str(out), "--no-progress"]
    proc = run_tool("eval.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(best["metrics"]["AP"], abs=1e-9)
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "per_class_AP"}
    assert (out / "results.json").is_file()


def test_train_tool_config_error_is_one_paragraph(tmp_path, tiny_data):
    recipe = tiny_recipe(tiny_data, tmp_path, "bad", model=tiny_model())
    proc = run_tool("train.py", "--cfg", str(recipe), "--opts", "train.epohcs=3")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "config error: --opts: key 'train.epohcs': unknown key; accepted keys under 'train': epochs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ddp_two_cpu_processes(tmp_path, tiny_data):
    """torchrun with 2 gloo processes: each takes half of every epoch; rank 0 writes the checkpoint."""
    recipe = tiny_recipe(tiny_data, tmp_path, "ddp", model=tiny_model())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "tools" / "train.py"), "--cfg", str(recipe), "--no-progress", "--opts", "eval.interval=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "work_ddp" / "last.pth")
    # 24 images over 2 processes with batch 4 each -> 3 iterations per epoch, 2 epochs
    assert ckpt["run"]["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
