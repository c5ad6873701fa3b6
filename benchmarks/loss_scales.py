"""Measure the benchmark's loss scales and set the weights of the magnitude-dependent feature losses.

The rule (configs/bench/_base_/SCALING.md): a feature loss whose value depends on the features' magnitude (mse,
fgfi, defeat, gid, fgd, attention) gets the weight

    weight = detection loss / (the loss at weight 1, summed over its levels)

measured on the first training batch (train split, seed 0) with the cached benchmark teacher and a fresh student
(seed 0), rounded to one significant digit. It is a scale match, measured on training data, never tuned on val.
Scale-free losses (pkd, cwd, logit_kd, pseudo_label) keep the papers' weights.

    python benchmarks/loss_scales.py            # print and write benchmarks/results/loss_scales.json
    python benchmarks/loss_scales.py --write    # also set the weights in configs/bench/*.yaml
    python benchmarks/loss_scales.py --only defeat --write   # one loss; the others' entries are kept
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_CFG = REPO / "configs" / "bench"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

SCALED_LOSSES = ("mse", "fgfi", "defeat", "gid", "fgd", "attention")


def round_sig(x: float) -> float:
    """``x`` rounded to one significant digit (2.3e-5 -> 2e-5)."""
    exponent = math.floor(math.log10(abs(x)))
    return round(x / 10**exponent) * 10**exponent


def measure(loss_type: str, teacher_ckpt: str) -> dict[str, float]:
    """The detection loss and the ``loss_type`` term at weight 1 on the first training batch."""
    import torch

    from detkd.config import load_config
    from detkd.data.build import build_dataset, ensure_data
    from detkd.data.coco import collate_detection
    from detkd.distiller import build_distiller_from_cfg
    from detkd.engine.trainer import make_train_loader, seed_everything

    recipe = BENCH_CFG / f"{loss_type}.yaml"
    cfg = load_config(recipe, [f"teacher.checkpoint={teacher_ckpt}", "train.seed=0", "distill.features.0.weight=1.0"])
    ensure_data(cfg.data, show_progress=False)
    train_set = build_dataset(cfg.data, "train", seed=0)
    seed_everything(0)
    distiller = build_distiller_from_cfg(cfg, train_set.num_classes, train_set.cat_id_to_label)
    loader = make_train_loader(train_set, cfg.data.batch_size, 0, 0, collate_detection)
    loader.sampler.set_epoch(0)
    images, targets = next(iter(loader))
    distiller.train()
    with torch.no_grad():
        losses = distiller(images, targets)
    task = sum(float(v) for k, v in losses.items() if k.startswith("task/"))
    term = sum(float(v) for k, v in losses.items() if k.startswith("distill/"))
    levels = sorted(k.split("/")[-1] for k in losses if k.startswith("distill/"))
    return {"task_loss": task, "term_at_weight_1": term, "levels": levels, "weight": round_sig(task / term)}


def yaml_float(x: float) -> str:
    """``x`` as a YAML 1.1 float (PyYAML reads ``2e-5`` as a string, ``2.0e-5`` as a float)."""
    exponent = math.floor(math.log10(abs(x)))
    return f"{x / 10**exponent:.1f}e{exponent:+d}"


KEEP_MARK = "# loss_scales: keep"
"""A recipe holding this line keeps its weights (its loss is measured with other parameters than the rule's recipe,
e.g. fgd_flat_attention.yaml's temperature)."""


def set_weight(path: Path, loss_type: str, weight: float) -> bool:
    """Set ``weight`` of the ``{type: loss_type, ...}`` feature entry in a one-line flow-style recipe (not in a
    recipe marked :data:`KEEP_MARK`)."""
    text = path.read_text()
    if KEEP_MARK in text:
        return False
    # the key must be ``weight`` itself: ``\b`` keeps ``fg_weight``/``bg_weight``/``box_weight`` (which come earlier
    # in an entry such as defeat's) from being taken for it
    pattern = re.compile(r"(\{type: " + re.escape(loss_type) + r"\b[^{}]*?(?<![\w])weight: )([-+0-9.eE]+)")
    new, count = pattern.subn(lambda m: m.group(1) + yaml_float(weight), text)
    if count and new != text:
        path.write_text(new)
    return count > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(REPO / "work_dirs" / "bench" / "full_teacher" / "last_weights.pth"))
    parser.add_argument("--write", action="store_true", help="set the measured weights in configs/bench/*.yaml")
    parser.add_argument("--only", nargs="+", choices=SCALED_LOSSES, help="measure these losses only (the others keep "
                        "their entries in loss_scales.json when it was measured for the same teacher)")  # fmt: skip
    args = parser.parse_args()
    if not Path(args.teacher).is_file():
        sys.exit(f"teacher checkpoint {args.teacher} not found: run `python benchmarks/accuracy.py` first")
    results, out = {}, RESULTS / "loss_scales.json"
    if args.only and out.is_file() and json.loads(out.read_text()).get("teacher") == args.teacher:
        results = json.loads(out.read_text())["losses"]
    for loss_type in args.only or SCALED_LOSSES:
        results[loss_type] = measure(loss_type, args.teacher)
        r = results[loss_type]
        print(
            f"{loss_type:10s} task {r['task_loss']:.3f}  term(w=1) {r['term_at_weight_1']:.4g} "
            f"on {','.join(r['levels'])}  -> weight {r['weight']:.0e}",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"teacher": args.teacher, "losses": results}, indent=1))
    if args.write:
        for loss_type in args.only or SCALED_LOSSES:
            r = results[loss_type]
            changed = [p.name for p in sorted(BENCH_CFG.glob("*.yaml")) if set_weight(p, loss_type, r["weight"])]
            print(f"{loss_type}: weight {r['weight']:.0e} in {', '.join(changed)}")


if __name__ == "__main__":
    main()
