"""Bad input through the tools, as a user would give it: one paragraph naming the problem, a non-zero exit, no
traceback (unless DETKD_DEBUG=1); runs are never silently wrong, work dirs never overwritten unasked."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
import yaml
from conftest import run_tool as _run_tool
from conftest import tiny_model, tiny_recipe

from detkd.cli import run_main
from detkd.config import describe_ranges, load_config
from detkd.engine.checkpoint import load_checkpoint
from detkd.errors import ConfigError, DetkdError

SHORT = {"epochs": 1, "max_iters": 2, "device": "cpu", "log_interval": 1, "warmup_iters": 1}


def run_tool(script: str, *args: str, env: dict | None = None):
    if env is None:
        return _run_tool(script, *args)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run_tool(script, *args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def one_paragraph(proc, code: int) -> str:
    """The tool failed with exit ``code`` and printed one paragraph (its last stderr line), no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture()
def train_recipe(tiny_data, tmp_path):
    return tiny_recipe(tiny_data, tmp_path, "run", model=tiny_model(), train=SHORT, eval={"max_images": 4})


# ----------------------------------------------------------------------------------------------------------------
# 1, 2: config errors inside optional sections; numeric ranges
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts,expected",
    [
        # the README's example: an unknown loss parameter deep inside the optional 'distill' section
        (["distill={features: [{type: fgd, alpah: 1.0}]}"],
         "key 'distill.features.0.alpah': unknown key; accepted keys: alpha, beta"),
        (["train.epochs=0"], "key 'train.epochs': must be >= 1, got 0."),
    ],
)  # fmt: skip
def test_config_errors_name_the_key_through_the_cli(train_recipe, opts, expected):
    proc = run_tool("train.py", "--cfg", str(train_recipe), "--no-progress", "--opts", *opts)
    line = one_paragraph(proc, 2)
    assert line.startswith(f"config error: {train_recipe}") or line.startswith("config error: --opts")
    assert expected in line


@pytest.mark.parametrize(
    "key,value,accepted",
    [
        ("train.max_iters", 0, ">= 1"),
        ("train.grad_clip", -1.0, "> 0"),
        ("train.optimizer.lr", -0.01, "> 0"),
        ("model.fpn_channels", 0, ">= 1"),
        ("data.synthetic", "{num_train: -5}", ">= 1"),
        ("data.unlabeled", "{img_dir: x, ratio: 0}", "> 0"),
        ("train.optimizer.betas", "[0.9, 1.5]", "in [0, 1)"),
        ("data.transforms.train", "[{type: hflip, p: 2.0}]", "p must be in [0, 1]"),
        ("model", "{arch: retinanet, backbone: resnet18, fpn_chanels: 16}", "unknown key; accepted keys under 'model'"),
        ("distill", "{features: [{type: mse, weight: -1.0}]}", "must be >= 0, got -1.0."),
    ],
)
def test_numeric_ranges_are_checked_at_load(train_recipe, key, value, accepted):
    with pytest.raises(ConfigError) as err:
        load_config(train_recipe, [f"{key}={value}"])
    message = str(err.value)
    assert accepted in message
    assert f"key '{key}" in message  # the dotted key (or an item below it)


def test_every_range_is_documented_in_the_readme():
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    for key, accepted in describe_ranges():
        assert f"| `{key}` | {accepted} |" in readme, key


# ----------------------------------------------------------------------------------------------------------------
# 3: one checkpoint loader, four messages
# ----------------------------------------------------------------------------------------------------------------


class Trusted:  # a class a weights_only load refuses
    pass


def write_bad_checkpoints(folder) -> dict:
    good = {"model": {"w": torch.ones(64)}}
    torch.save(good, folder / "good.pth")
    data = (folder / "good.pth").read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2]}
    for name, content in files.items():
        (folder / f"{name}.pth").write_bytes(content)
    torch.save([1, 2, 3], folder / "list.pth")
    torch.save({"model": Trusted()}, folder / "unsafe.pth")
    return {name: folder / f"{name}.pth" for name in ("empty", "truncated", "list", "unsafe")}


def test_checkpoint_loader_messages(tmp_path):
    paths = write_bad_checkpoints(tmp_path)
    expected = {
        "empty": "is empty (0 bytes)",
        "truncated": "is truncated or corrupted",
        "list": "holds a list, not a detkd or torchvision checkpoint",
        "unsafe": "was refused for safety: it holds an object of class",
    }
    for name, path in paths.items():
        with pytest.raises(DetkdError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and expected[name] in str(err.value), name
        assert "weights_only" not in str(err.value)  # not torch's hint to load unsafely


@pytest.mark.parametrize("kind", ["unsafe", "mismatch"])  # the other causes: test_checkpoint_loader_messages
def test_eval_tool_checkpoint_errors(tiny_data, tmp_path, train_recipe, kind):
    paths = write_bad_checkpoints(tmp_path)
    if kind == "mismatch":  # another width: the first tensors that differ, with both shapes
        from detkd.models.build import build_detector

        other = build_detector("retinanet", "resnet18", 9, fpn_channels=8, min_size=64, max_size=64)
        torch.save({"model": other.state_dict()}, tmp_path / "mismatch.pth")
        paths["mismatch"] = tmp_path / "mismatch.pth"
    proc = run_tool("eval.py", "--cfg", str(train_recipe), "--ckpt", str(paths[kind]), "--no-progress")
    line = one_paragraph(proc, 2)
    assert line.startswith(f"checkpoint error: checkpoint {paths[kind]}") or f"'{paths[kind]}'" in line
    assert "weights_only" not in proc.stderr
    if kind == "mismatch":
        assert "does not fit this RetinaNet" in line
        shapes = r"tensors differ in shape \(backbone\.fpn\.\S+: file \(8, \d+, 1, 1\) vs model \(16, \d+, 1, 1\)"
        assert re.search(shapes, line), line


def test_bad_teacher_checkpoint_is_one_paragraph(tiny_data, tmp_path):
    (tmp_path / "teacher.pth").write_bytes(b"")
    recipe = tiny_recipe(
        tiny_data, tmp_path, "bad_teacher",
        teacher={**tiny_model(fpn_channels=32), "checkpoint": str(tmp_path / "teacher.pth")},
        student=tiny_model(), distill={"features": [{"type": "mse"}]}, train=SHORT,
    )  # fmt: skip
    line = one_paragraph(run_tool("train_distill.py", "--cfg", str(recipe), "--no-progress"), 2)
    assert f"checkpoint error: checkpoint {tmp_path / 'teacher.pth'} is empty (0 bytes)" in line


# ----------------------------------------------------------------------------------------------------------------
# 4: resume and work dirs; 5: known runtime conditions
# ----------------------------------------------------------------------------------------------------------------


def records(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_work_dir_is_never_overwritten_unasked_and_resume_checks_the_recipe(tmp_path, train_recipe):
    work = tmp_path / "work_run"
    cfg = ["--cfg", str(train_recipe), "--no-progress"]
    assert run_tool("train.py", *cfg).returncode == 0
    last = (work / "last.pth").read_bytes()

    # a new run into a finished one: refused, naming --resume and --overwrite
    line = one_paragraph(run_tool("train.py", *cfg), 1)
    assert f"run error: the work dir {work} already holds a finished run (epoch 1/1, iteration 2)" in line
    assert "--resume" in line and "--overwrite" in line
    assert (work / "last.pth").read_bytes() == last

    # --resume with another model shape: refused before anything is written, the changed keys listed
    config_yaml = (work / "config.yaml").read_text()
    (work / ".last.pth.tmp.999999999").write_bytes(b"x" * 1000)  # left by a writer killed mid-checkpoint
    proc = run_tool("train.py", *cfg, "--resume", "--opts", "model.fpn_channels=32", "train.optimizer.lr=0.02")
    line = one_paragraph(proc, 1)
    assert "--resume: the recipe differs from the run in" in line
    assert "model.fpn_channels: 16 -> 32" in line and "train.optimizer.lr: 0.01 -> 0.02" in line
    assert (work / "config.yaml").read_text() == config_yaml and (work / "last.pth").read_bytes() == last
    assert not (work / ".last.pth.tmp.999999999").exists()  # stale temporaries are cleaned on start/resume
    assert "removed 1 leftover temporary file(s)" in proc.stdout

    # --resume extending the run (train.epochs) is allowed: the diff is printed and recorded
    proc = run_tool("train.py", *cfg, "--resume", "--opts", "train.epochs=2", "train.max_iters=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume: recipe changes against" in proc.stdout and "train.epochs: 1 -> 2" in proc.stdout
    resume = [r for r in records(work) if r["type"] == "resume"]
    assert resume[-1]["changed"]["train.epochs"] == [1, 2]
    assert load_checkpoint(work / "last.pth")["run"]["iteration"] == 4

    # --overwrite starts over: one run in metrics.jsonl
    proc = run_tool("train.py", *cfg, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["iter"] for r in records(work) if r["type"] == "train"] == [1, 2]


def test_runtime_conditions_are_one_paragraph_with_traceback_behind_debug(tmp_path, train_recipe):
    cfg = ["--cfg", str(train_recipe), "--no-progress"]
    line = one_paragraph(run_tool("train.py", *cfg, "--opts", "train.device=cuda"), 1)
    assert line == "run error: train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'."
    proc = run_tool("train.py", *cfg, "--opts", "train.device=cuda", env={"DETKD_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RunError" in proc.stderr

    (tmp_path / "a_file").write_text("x")
    line = one_paragraph(run_tool("train.py", *cfg, "--work-dir", str(tmp_path / "a_file")), 1)
    assert f"the work dir {tmp_path / 'a_file'} is an existing file" in line
    (tmp_path / "weights.pth").write_bytes(b"")
    proc = run_tool("eval.py", *cfg, "--ckpt", str(tmp_path / "weights.pth"), "--out", str(tmp_path / "a_file"))
    assert (
        one_paragraph(proc, 1)
        == f"run error: --out {tmp_path / 'a_file'} is an existing file, not a folder; pass another --out."
    )


def test_dead_teacher_stops_the_run_in_one_paragraph(tiny_data, tmp_path):
    from detkd.models.build import build_detector

    torch.manual_seed(0)
    teacher = build_detector("retinanet", "resnet18", 9, fpn_channels=32, min_size=64, max_size=64)  # untrained
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    recipe = tiny_recipe(
        tiny_data, tmp_path, "dead",
        teacher={**tiny_model(fpn_channels=32), "checkpoint": str(tmp_path / "teacher.pth")},
        student=tiny_model(), distill={"features": [{"type": "mse"}], "teacher_check": {"num_images": 2}},
        train=SHORT,
    )  # fmt: skip
    line = one_paragraph(run_tool("train_distill.py", "--cfg", str(recipe), "--no-progress"), 1)
    assert line.startswith("run error: the teacher scores AP 0.0000 on 2 val images, below distill.teacher_check")
    assert "distill.teacher_check.enabled=false" in line


def test_non_finite_loss_stops_with_every_term(tmp_path, train_recipe):
    proc = run_tool("train.py", "--cfg", str(train_recipe), "--no-progress", "--opts", "train.optimizer.lr=1.0e+30")
    line = one_paragraph(proc, 1)
    assert line.startswith("run error: non-finite loss at iteration")
    assert "classification=" in line and "bbox_regression=" in line


def test_a_failed_run_closes_its_log_handlers(train_recipe):
    import logging

    from detkd.engine.runner import train_detector
    from detkd.errors import NonFiniteLossError

    before = list(logging.getLogger("detkd").handlers)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration"):
        train_detector(load_config(train_recipe, ["train.optimizer.lr=1.0e+30"]), show_progress=False)
    assert logging.getLogger("detkd").handlers == before


def test_internal_errors_keep_their_traceback():
    def bug():
        raise ValueError("an internal bug, not a user error")

    with pytest.raises(ValueError, match="internal bug"):
        run_main(bug)

    def user_error():
        raise ConfigError("a recipe problem")

    with pytest.raises(SystemExit) as code:
        run_main(user_error)
    assert code.value.code == 2


# ----------------------------------------------------------------------------------------------------------------
# 6: data
# ----------------------------------------------------------------------------------------------------------------


def test_boxes_outside_the_image_are_counted_with_degenerate_ones(tiny_data, tmp_path):
    from detkd.data.coco import CocoDetection

    data = json.loads(open(tiny_data["train"]["ann_file"]).read())
    image = data["images"][0]
    ann = {"image_id": image["id"], "category_id": data["categories"][0]["id"], "iscrowd": 0, "area": 25}
    data["annotations"] += [
        {**ann, "id": 900001, "bbox": [image["width"] + 5, 2, 5, 5]},  # right of the image
        {**ann, "id": 900002, "bbox": [-20, -20, 10, 10]},  # above-left
        {**ann, "id": 900003, "bbox": [3, 3, 0.2, 5]},  # degenerate
    ]
    ann_file = tmp_path / "outside.json"
    ann_file.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(ann_file, tiny_data["train"]["img_dir"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{ann_file}: dropped 1 degenerate box(es)")
    assert "and 2 box(es) entirely outside" in message
    assert "900001" in message and ds.num_outside == 2


def test_empty_category_list_is_a_data_error(tiny_data, tmp_path, train_recipe):
    data = json.loads(open(tiny_data["train"]["ann_file"]).read())
    data.update(categories=[], annotations=[])
    ann_file = tmp_path / "nocats.json"
    ann_file.write_text(json.dumps(data))
    recipe = yaml.safe_load(train_recipe.read_text())
    recipe["data"]["train"]["ann_file"] = str(ann_file)
    train_recipe.write_text(yaml.safe_dump(recipe))
    line = one_paragraph(run_tool("train.py", "--cfg", str(train_recipe), "--no-progress"), 2)
    assert line == f"data error: {ann_file}: 'categories' is empty; " + line.split("is empty; ", 1)[1]


# ----------------------------------------------------------------------------------------------------------------
# Fault tolerance: kill -9 in the middle of a run, then --resume: bit-identical to an uninterrupted run
# ----------------------------------------------------------------------------------------------------------------


def test_kill_9_then_resume_ends_bit_identical(tmp_path, tiny_data):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    train = {**SHORT, "epochs": 3, "max_iters": None}
    recipe = tiny_recipe(tiny_data, tmp_path, "killed", model=tiny_model(), train=train, eval={"interval": 0})
    full = tiny_recipe(tiny_data, tmp_path, "full", model=tiny_model(), train=train, eval={"interval": 0})
    work = tmp_path / "work_killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), "--cfg", str(recipe), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (work / "last.pth").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # after the first checkpoint, somewhere in epoch 2
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (work / f".last.pth.tmp.{proc.pid}").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves it
    assert load_checkpoint(work / "last.pth")["run"]["epoch"] < 3
    resumed = run_tool("train.py", "--cfg", str(recipe), "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (work / f".last.pth.tmp.{proc.pid}").exists()
    uninterrupted = run_tool("train.py", "--cfg", str(full), "--no-progress")  # same process setup as the others
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    a = load_checkpoint(tmp_path / "work_full" / "last.pth")
    b = load_checkpoint(work / "last.pth")
    assert a["run"]["iteration"] == b["run"]["iteration"] == 18
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
