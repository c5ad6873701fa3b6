"""A 2-process gloo train_distill run: the frozen teacher stays out of DistributedDataParallel, the loss terms that
are logged are the mean over the processes, and the run finishes."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model, tiny_recipe

NUM_CLASSES = 9


def _worker(rank: int, world: int, init_file: str, recipe: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    import detkd.engine.trainer as trainer_mod
    from detkd.config import load_config
    from detkd.engine.runner import train_distill

    wrapped, reduced = [], []
    ddp_class = torch.nn.parallel.DistributedDataParallel

    class RecordingDDP(ddp_class):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            wrapped.append((self, kwargs))

    def recording_reduce(losses, loss):
        local = torch.stack([v.detach().to(torch.float64) for v in (*losses.values(), loss)])
        out = reduce_loss_terms(losses, loss)
        reduced.append({"names": [*losses, "loss"], "local": local.tolist(), "mean": out.tolist()})
        return out

    reduce_loss_terms = trainer_mod.reduce_loss_terms
    trainer_mod.nn.parallel.DistributedDataParallel = RecordingDDP
    trainer_mod.reduce_loss_terms = recording_reduce
    try:
        summary = train_distill(load_config(recipe), show_progress=False)
    finally:
        trainer_mod.nn.parallel.DistributedDataParallel = ddp_class
        trainer_mod.reduce_loss_terms = reduce_loss_terms
    ((ddp, kwargs),) = wrapped
    teacher = summary["distiller"].teacher
    inside = {id(p) for p in ddp.module.parameters()} | {id(b) for b in ddp.module.buffers()}
    report = {
        "teacher_params_in_ddp": sum(id(p) in inside for p in teacher.parameters()),
        "teacher_buffers_in_ddp": sum(id(b) in inside for b in teacher.buffers()),
        "teacher_params": sum(1 for _ in teacher.parameters()),
        "student_params_in_ddp": sum(id(p) in inside for p in summary["distiller"].student.parameters()),
        "find_unused_parameters": kwargs.get("find_unused_parameters"),
        "iterations": summary["iterations"],
        "reduced": reduced,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_two_process_distillation_keeps_the_teacher_out_of_ddp(tiny_data, tmp_path):
    from detkd.models.build import build_detector

    torch.manual_seed(0)
    teacher = build_detector("retinanet", "resnet18", NUM_CLASSES, fpn_channels=32, min_size=64, max_size=64)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    recipe = tiny_recipe(
        tiny_data, tmp_path, "ddp_distill",
        teacher={**tiny_model(fpn_channels=32), "checkpoint": str(tmp_path / "teacher.pth")},
        student=tiny_model(fpn_channels=16),
        distill={"features": [{"type": "fgd"}], "teacher_check": {"enabled": False}},
        train={"epochs": 1, "max_iters": 2, "device": "cpu", "log_interval": 1, "warmup_iters": 1},
        eval={"interval": 0, "max_images": 2},
    )  # fmt: skip
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(recipe), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["teacher_params"] > 0
        assert report["teacher_params_in_ddp"] == 0 and report["teacher_buffers_in_ddp"] == 0
        assert report["student_params_in_ddp"] > 0
        assert report["find_unused_parameters"] is False
        assert report["iterations"] == 2
    # every step's logged terms are the mean of the two processes' own terms, identical on both ranks
    steps0, steps1 = reports[0]["reduced"], reports[1]["reduced"]
    assert len(steps0) == len(steps1) == 2
    for a, b in zip(steps0, steps1):
        assert a["names"] == b["names"] and "distill/fgd/p3" in a["names"]
        assert a["local"] != b["local"]  # the two processes saw different images
        for x, y, m0, m1 in zip(a["local"], b["local"], a["mean"], b["mean"]):
            assert abs((x + y) / 2 - m0) < 1e-9 and m0 == m1
    logged = [json.loads(line) for line in (tmp_path / "work_ddp_distill" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["type"] == "train"]
    assert [r["iter"] for r in train] == [1, 2]
    for record, step in zip(train, steps0):
        assert record["loss"] == step["mean"][-1]
