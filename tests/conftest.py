"""Shared fixtures: a tiny synthetic COCO set and tiny recipes, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# one thread per test process: tests often run beside a benchmark or a second pytest, and oversubscribed
# OpenMP pools slow everything down many times over
torch.set_num_threads(1)
# oneDNN (mkldnn) pays seconds of set-up for every new convolution shape; tests build many tiny models of many
# shapes and run them for a step or two, where the plain CPU kernels are far faster overall
torch.backends.mkldnn.enabled = False


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """24 train and 8 val synthetic images of 64 px (deterministic)."""
    from detkd.data.synthetic import generate_synthetic_coco

    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_coco(str(out), num_train=24, num_val=8, size=64, seed=3, show_progress=False)


@pytest.fixture(scope="session")
def untrained_teacher_ckpt(tmp_path_factory) -> str:
    """An untrained tiny RetinaNet teacher (ResNet-18, FPN 32, 64 px) for the tiny set's 8 classes, as a checkpoint."""
    from detkd.models.build import build_detector

    torch.manual_seed(0)
    model = build_detector("retinanet", "resnet18", 9, fpn_channels=32, min_size=64, max_size=64)
    path = tmp_path_factory.mktemp("untrained_teacher") / "teacher.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def tiny_model(arch: str = "retinanet", backbone: str = "resnet18", fpn_channels: int = 16) -> dict:
    return {"arch": arch, "backbone": backbone, "fpn_channels": fpn_channels, "min_size": 64, "max_size": 64}


def two_image_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two 64 px noise images (one 48 px tall, so padding is exercised) with three hand-made GT boxes."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [33.0, 20.0, 60.0, 44.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def tiny_recipe(tiny_data: dict, tmp_path: Path, name: str = "tiny", **sections) -> Path:
    """Write a complete tiny recipe (batch 4, 64 px, 2 epochs, eval every epoch) with ``sections`` merged in."""
    recipe = {
        "data": {
            "train": tiny_data["train"],
            "val": tiny_data["val"],
            "batch_size": 4,
            "num_workers": 0,
            "transforms": {"train": [{"type": "hflip", "p": 0.5}], "val": []},
        },
        "train": {
            "epochs": 2,
            "optimizer": {"type": "sgd", "lr": 0.01},
            "warmup_iters": 2,
            "device": "cpu",
            "log_interval": 1,
            "grad_clip": 10.0,
        },
        "eval": {"interval": 1},
        "log": {"tensorboard": False},
        "work_dir": str(tmp_path / f"work_{name}"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_tool(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` in a fresh interpreter, as a user would; fail with its output if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return proc
