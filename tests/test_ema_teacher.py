"""Self-distillation with an EMA teacher: the formula after 3 steps, the config errors, a bit-exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_recipe

from detkd.config import ConfigError, load_config
from detkd.distiller import Distiller, LossSpec
from detkd.engine.checkpoint import load_checkpoint
from detkd.engine.runner import train_distill
from detkd.losses import build_feature_loss
from detkd.models.build import build_detector


def test_the_ema_teacher_follows_the_formula_for_three_steps():
    torch.manual_seed(0)
    student = build_detector("retinanet", "resnet18", 4, fpn_channels=16, min_size=64, max_size=64)
    teacher = build_detector("retinanet", "resnet18", 4, fpn_channels=16, min_size=64, max_size=64)
    teacher.load_state_dict(student.state_dict())
    m = 0.9
    d = Distiller(teacher, student, [LossSpec("pkd", build_feature_loss("pkd"), 1.0, "all")], probe_size=64,
                  ema_momentum=m).train()  # fmt: skip
    optimizer = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])}] * 2
    key = "head.classification_head.cls_logits.weight"
    bn = "backbone.body.bn1.running_mean"
    expected = {k: teacher.state_dict()[k].clone() for k in (key, bn)}
    for _ in range(3):
        before = {k: student.state_dict()[k].clone() for k in (key, bn)}  # what the next forward averages in
        losses = d(images, targets)
        for k in expected:
            expected[k] = m * expected[k] + (1 - m) * before[k]
            assert torch.allclose(teacher.state_dict()[k], expected[k], atol=1e-6), k
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert not torch.equal(teacher.state_dict()[key], student.state_dict()[key])
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert any(k.startswith("ema_teacher.") for k in d.trainable_state_dict())


def _recipe(tiny_data, tmp_path, name="ema", **teacher):
    return tiny_recipe(
        tiny_data,
        tmp_path,
        name,
        teacher={**tiny_model(fpn_channels=16), "mode": "ema", "momentum": 0.9, **teacher},
        student=tiny_model(fpn_channels=16),
        distill={"features": [{"type": "pkd"}]},
        train={"epochs": 2, "device": "cpu", "log_interval": 1, "warmup_iters": 1},
        eval={"interval": 0, "max_images": 2},
    )


def test_ema_recipes_that_cannot_work_are_config_errors(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.fpn_channels.*is 32 but the student's is 16.*mode 'ema'"):
        load_config(_recipe(tiny_data, tmp_path, fpn_channels=32))
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint.*starts as a copy of the student"):
        load_config(_recipe(tiny_data, tmp_path, checkpoint="t.pth"))
    with pytest.raises(ConfigError, match=r"teacher\.momentum.*must be in \[0, 1\), got 1\.0"):
        load_config(_recipe(tiny_data, tmp_path), ["teacher.momentum=1.0"])
    with pytest.raises(ConfigError, match=r"teacher\.mode.*'frozen', 'ema', 'online'"):
        load_config(_recipe(tiny_data, tmp_path), ["teacher.mode=mutual"])


def test_an_ema_run_resumes_bit_exactly(tiny_data, tmp_path):
    full = load_config(_recipe(tiny_data, tmp_path, "ema_full"))
    cut = load_config(_recipe(tiny_data, tmp_path, "ema_cut"))
    train_distill(full, show_progress=False)
    train_distill(cut, show_progress=False, stop_after_epochs=1)
    train_distill(cut, resume=True, show_progress=False)
    a = load_checkpoint(tmp_path / "work_ema_full" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "work_ema_cut" / "last.pth")["model"]
    assert a.keys() == b.keys() and any(k.startswith("ema_teacher.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
