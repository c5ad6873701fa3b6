"""diagnose: each finding from hand-made logs, the CLI, and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import run_tool

from detkd.diagnose import COLLAPSE, diagnose_run, format_findings, loss_ratios


def write_run(folder: Path, terms: dict[str, list[float]], task: list[float], val_ap=None, teacher_ap=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, t in enumerate(task):
        record = {"type": "train", "iter": 10 * (i + 1), "task/classification": t / 2, "task/bbox_regression": t / 2}
        record.update({k: v[i] for k, v in terms.items()})
        record["distill/scale"] = 1.0  # a logged scalar, not a loss term
        lines.append(json.dumps(record))
    if val_ap is not None:
        lines.append(json.dumps({"type": "val", "iter": 10 * len(task), "AP": val_ap}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if teacher_ap is not None:
        (folder / "teacher_val.json").write_text(json.dumps({"AP": teacher_ap}))
    return folder


def test_ratios_sum_a_loss_over_its_levels():
    assert loss_ratios([]) == {}
    records = [{"type": "train", "iter": 5, "task/a": 2.0, "distill/fgd/p3": 0.5, "distill/fgd/p4": -0.5,
                "distill/logit_kd/cls": 1.0, "distill/scale": 0.3}]  # fmt: skip
    assert loss_ratios(records) == {"fgd": [(5, 0.0)], "logit_kd": [(5, 0.5)]}


def test_each_finding_from_hand_made_logs(tmp_path):
    n = 8
    task = [2.0] * n
    terms = {
        "distill/fgd/p3": [0.5, 0.4, 0.2, 0.1, 0.01, 0.005, 0.002, 0.001],  # collapses below 1 % of the task loss
        "distill/mse/p3": [500.0] * n,  # 250 x the task loss
        "distill/logit_kd/cls": [0.3] * (n - 1) + [math.nan],  # non-finite at the end
        "distill/pkd/p3": [0.4] * n,  # healthy: 20 %
    }
    base = write_run(tmp_path / "base", {}, task, val_ap=0.30)
    run = write_run(tmp_path / "run", terms, task, val_ap=0.25, teacher_ap=0.20)
    found = {(f.kind, f.subject): f for f in diagnose_run(run, base)}
    assert set(found) == {
        ("collapsed", "distill/fgd"),
        ("dominates", "distill/mse"),
        ("non-finite", "distill/logit_kd"),
        ("weak teacher", "teacher"),
        ("no gain", "student"),
    }
    end = (0.002 + 0.001) / 2 / 2.0  # median of the last quarter over the task loss
    assert end < COLLAPSE and f"{100 * end:.2g} %" in found[("collapsed", "distill/fgd")].message
    assert "adapters" in found[("collapsed", "distill/fgd")].suggestion  # a feature loss: its per-level terms
    assert "250 x" in found[("dominates", "distill/mse")].message
    assert "iteration 80" in found[("non-finite", "distill/logit_kd")].message
    assert "AP 25.0 vs the baseline's 30.0 (-5.0)" in found[("no gain", "student")].message
    assert format_findings([]).startswith("diagnosis: no collapsed")


def test_a_healthy_run_has_no_findings_and_the_tool_writes_the_plot(tmp_path):
    run = write_run(tmp_path / "ok", {"distill/cwd/p3": [1.0, 0.8, 0.6, 0.5]}, [2.0] * 4, val_ap=0.4, teacher_ap=0.6)
    assert diagnose_run(run) == []
    proc = run_tool("diagnose.py", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "diagnosis: no collapsed" in proc.stdout
    png = run / "diagnose.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = run_tool("diagnose.py", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "holds no metrics.jsonl" in missing.stderr


def test_pseudo_labels_that_add_nothing_are_a_finding(tmp_path):
    from detkd.diagnose import PSEUDO_ADDED_MIN

    def run_with(rates, name):
        folder = write_run(tmp_path / name, {}, [2.0] * len(rates))
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for record, rate in zip(lines, rates):
            record["pseudo_label/added_per_image"] = rate  # a logged scalar, not a loss term
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
        return {(f.kind, f.subject): f for f in diagnose_run(folder)}

    found = run_with([0.5, 0.1, 0.04], "few")  # the last value (the mean over the run so far) counts
    finding = found[("pseudo labels add nothing", "distill/pseudo_label")]
    assert "0.04 teacher boxes per labelled image" in finding.message and "data.unlabeled" in finding.suggestion
    assert 0.04 < PSEUDO_ADDED_MIN
    assert run_with([0.01, 0.3], "enough") == {}  # healthy
