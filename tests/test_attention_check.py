"""The attention check: the spread of an attention map by hand, the peaked rule, the Distiller's first-step
measurement, the warning and the diagnosis finding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import two_image_batch

from detkd.attention_check import AttentionCheckReport, describe, is_peaked, suggested_temperature
from detkd.diagnose import diagnose_run
from detkd.distiller import Distiller, LossSpec
from detkd.losses import build_feature_loss
from detkd.masks import attention_spread, flat_attention_temperature
from detkd.models.build import build_detector


def test_attention_spread_by_hand():
    flat = torch.ones(2, 3, 4, 5)
    assert attention_spread(flat, 0.5) == pytest.approx((20.0, 3.0))  # a flat map spreads over every cell/channel
    # one image, one channel: two cells at |F| = 1 and two at 0, T = 0.5 -> softmax (e^2, e^2, 1, 1) / (2 e^2 + 2)
    feat = torch.tensor([[[[1.0, -1.0], [0.0, 0.0]]]])
    p = torch.tensor([math.e**2, math.e**2, 1.0, 1.0]) / (2 * math.e**2 + 2)
    cells, channels = attention_spread(feat, 0.5)
    assert cells == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert channels == pytest.approx(1.0)  # one channel
    # ten times larger features at the same T: nearly one-hot; at ten times the T, the same spread as before
    big = torch.zeros(1, 2, 4, 4)
    big[0, :, 1, 2] = 1.0
    big[0, :, 3, 0] = 0.5
    assert attention_spread(10 * big, 0.5)[0] < 1.01 < attention_spread(big, 0.5)[0]
    assert attention_spread(10 * big, 5.0)[0] == pytest.approx(attention_spread(big, 0.5)[0])


def test_the_flat_temperature_is_the_smallest_that_spreads_the_maps_over_90_percent():
    feat = torch.tensor([[[[1.0, 0.0]]]])  # one channel, two cells at |F| = 1 and 0
    t = flat_attention_temperature(feat, 0.5)
    assert attention_spread(feat, t)[0] >= 1.8 > attention_spread(feat, t / 1.02)[0]
    assert flat_attention_temperature(torch.ones(1, 3, 2, 2), 0.5) == 0.5  # flat already


def entry(level, cells, of_cells, channels, of_channels, mean_abs, flat_temperature=20.0) -> dict:
    return {"loss": "fgd", "teacher": None, "level": level, "temperature": 0.5, "cells": cells, "of_cells": of_cells,
            "channels": channels, "of_channels": of_channels, "mean_abs": mean_abs,
            "flat_temperature": flat_temperature}  # fmt: skip


def test_the_peaked_rule_and_the_suggested_temperature():
    assert is_peaked(entry("p3", 1.7, 256, 60.0, 128, 13.4))  # 1.7 < 5 % of 256 cells
    assert is_peaked(entry("p3", 200.0, 256, 1.1, 128, 13.4))  # the channel map alone
    assert not is_peaked(entry("p3", 20.0, 256, 60.0, 128, 1.0))  # 20 >= 12.8 cells
    assert not is_peaked(entry("p7", 1.0, 1, 2.0, 2, 1.0))  # a 1 x 1 map has one cell; 2 flat channels
    assert is_peaked(entry("p6", 1.9, 4, 2.0, 2, 1.0))  # under 2 cells: mostly one
    group = [
        entry("p3", 1.7, 256, 1.1, 128, 13.4, 17.3),
        entry("p4", 3.6, 64, 1.6, 128, 8.6, 9.0),
        entry("p5", 8.0, 16, 8.0, 128, 3.5, 4.0),
    ]
    assert suggested_temperature(group) == pytest.approx(17.0)  # the largest over the levels, 2 digits
    message, suggestion = describe(group)
    assert "p3: 1.7 of 256 cells, 1.1 of 128 channels" in message and "p5" not in message.split(")")[0]
    assert "temperature to about 17" in suggestion


def detector(arch: str, fpn: int, seed: int):
    torch.manual_seed(seed)
    return build_detector(arch, "resnet18", 4, fpn_channels=fpn, min_size=64, max_size=64)


def test_the_distiller_measures_the_teachers_maps_on_its_first_step_only():
    feats = [LossSpec("fgd", build_feature_loss("fgd"), 1.0, ("p3", "p4")),
             LossSpec("mse", build_feature_loss("mse"), 1.0, ("p3",))]  # fmt: skip
    d = Distiller(detector("retinanet", 32, 0), detector("retinanet", 16, 1), feats, probe_size=64).train()
    images, targets = two_image_batch()
    records, _ = d.record_teachers(images, targets)
    d.compute_losses(records)
    got = d.attention_spread
    assert [(e["loss"], e["level"]) for e in got] == [("fgd", "p3"), ("fgd", "p4")]  # mse weighs by no attention
    t3 = next(iter(records.values())).teacher.features["p3"]
    assert got[0]["of_cells"] == t3.shape[2] * t3.shape[3] and got[0]["of_channels"] == 32
    assert got[0]["mean_abs"] == pytest.approx(float(t3.abs().mean()))
    assert (got[0]["cells"], got[0]["channels"]) == pytest.approx(attention_spread(t3, 0.5))
    assert got[0]["flat_temperature"] == pytest.approx(flat_attention_temperature(t3, 0.5))
    d.compute_losses(records)
    assert len(d.attention_spread) == 2  # measured once


def test_a_peaked_map_is_reported_at_the_first_step_and_by_the_diagnosis(tmp_path, capsys):
    class FakeDistiller:
        attention_spread = [entry("p3", 1.7, 256, 1.1, 128, 13.4), entry("p4", 30.0, 64, 60.0, 128, 8.6)]

    report = AttentionCheckReport(FakeDistiller(), tmp_path / "attention_check.json")
    report(None, 1, {})
    report(None, 2, {})
    out = capsys.readouterr().out
    assert out.count("warning: distill/fgd:") == 1 and "temperature to about 20" in out
    assert json.loads((tmp_path / "attention_check.json").read_text()) == FakeDistiller.attention_spread
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"type": "train", "iter": 10, "task/classification": 1.0, "distill/fgd/p3": 1.0}) + "\n"
    )
    findings = diagnose_run(tmp_path)
    assert [(f.kind, f.subject) for f in findings] == [("peaked attention", "distill/fgd")]
    assert "about 20" in findings[0].suggestion
