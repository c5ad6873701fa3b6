"""How hard each loss pulls on the student: the gradient norm of the task loss and of every distillation term.

A distillation term can be the size of the detection loss and still swamp it: what the optimizer sees is the
gradient, and the recipes clip the *total* gradient norm (``train.grad_clip``, 10 in the benchmark), so a term
whose gradient is far larger than the task's also shrinks the task's step. For each recipe this script takes the
first ``--batches`` training batches (train split, seed 0; never val) and reports, per term group:

- the loss value and ``||d term / d student||`` over the student's own parameters (backbone, FPN, head; not the
  adapters or learnable loss parts), summed over the term's levels;
- the ratio of each distillation group's gradient norm to the task's, the cosine between the two gradients (mean
  over the batches; near 0: the term pulls in a direction the task does not care about), and the factor by which
  ``grad_clip`` scales the whole step (``min(1, clip / ||total gradient||)``, the total over every trainable
  parameter as in the trainer), i.e. how much of the task's own step survives.

The student is the fresh one of the recipe (seed 0) or, with ``--ckpt``, a trained run's (``last.pth`` of
``train_distill.py``: student, adapters and loss parts), so a term can be inspected where training left it.

    python benchmarks/grad_scales.py --teacher checkpoints/bench/v2_teacher/last_weights.pth fgd attention gid
    python benchmarks/grad_scales.py --teacher T fgd --ckpt checkpoints/bench_runs/v2_fgd_s0/last.pth
    python benchmarks/grad_scales.py --teacher T fgd --parts          # FGD's focal fg/bg, attention, global terms
    python benchmarks/grad_scales.py --teacher T fgd --opts distill.features.0.temperature=50   # a variant
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_common import batches_of, build_probe, recipe_path, shown  # noqa: E402


def term_group(name: str) -> str:
    """``task`` for the detection loss, else the loss name without the level (``distill/fgd/p3`` -> ``fgd``; with
    several teachers ``distill/pkd/fcos/p4`` -> ``pkd/fcos``; the head terms of one loss stay apart:
    ``distill/logit_kd/box`` -> ``logit_kd/box``)."""
    parts = name.split("/")
    if parts[0] == "task":
        return "task"
    is_level = parts[-1].startswith("p") and parts[-1][1:].isdigit()
    return "/".join(parts[1:-1] if is_level else parts[1:])


def flat_grad(loss, params):
    """``d loss / d params`` as one float64 vector (zeros where a parameter gets no gradient)."""
    import torch

    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten() for g, p in zip(grads, params)])


def grad_norm(loss, params) -> float:
    return float(flat_grad(loss, params).norm())


def fgd_parts(m, s, t, ctx) -> dict[str, Any]:
    """FGD's four terms (:class:`detkd.losses.FGDLoss`): focal foreground / background, attention, global."""
    import detkd.losses.functional as KF

    temp = m.temperature
    fg, bg = ctx.box_masks()
    t_sp, t_ch = ctx.spatial_attention("t", temp), ctx.channel_attention("t", temp)
    maps = (ctx.spatial_attention("s", temp), ctx.channel_attention("s", temp), t_sp, t_ch)
    pair = m.blocks.get(ctx.name, t)
    return {
        "focal_fg": KF.fgd_focal_loss(s, t, fg, bg, temp, m.alpha, 0.0, t_spatial=t_sp, t_channel=t_ch),
        "focal_bg": KF.fgd_focal_loss(s, t, fg, bg, temp, 0.0, m.beta, t_spatial=t_sp, t_channel=t_ch),
        "attention": KF.fgd_attention_loss(s, t, temp, m.gamma, maps=maps),
        "global": KF.fgd_global_loss(pair.student(s), pair.teacher(t.detach()), m.lambda_),
    }


def attention_parts(m, s, t, ctx) -> dict[str, Any]:
    """The attention-guided loss's two terms (:class:`detkd.losses.AttentionGuidedLoss`, without non-local)."""
    import detkd.losses.functional as KF

    temp = m.temperature
    maps = tuple(getattr(ctx, f"{kind}_attention")(who, temp) for who in "st" for kind in ("spatial", "channel"))
    return {
        "masked_feature": KF.attention_guided_loss(s, t, temp, m.feat_weight, 0.0, m.at_norm, maps=maps),
        "attention_transfer": KF.attention_guided_loss(s, t, temp, 0.0, m.at_weight, m.at_norm, maps=maps),
    }


# Losses whose terms --parts reports one by one.
PARTS = {"fgd": fgd_parts, "attention": attention_parts}


def part_terms(distiller, images, targets) -> dict[str, Any]:
    """``{loss/part: value}`` (summed over levels, times the loss weight) for the losses of :data:`PARTS`."""
    records, _ = distiller.record_teachers(images, targets)
    out: dict[str, Any] = {}
    for slot in distiller.slots:
        for spec in slot.feature_specs:
            if spec.name not in PARTS:
                continue
            for lvl in spec.levels:
                ctx = records[slot.name].level_context(lvl, slot.adapter(lvl))
                for part, value in PARTS[spec.name](spec.module, ctx.s_feat, ctx.t_feat, ctx).items():
                    key = f"{spec.name}/{part}"
                    out[key] = out.get(key, 0.0) + distiller._weight(spec) * value  # a number, or the auto weight
    return out


def measure(
    recipe: Path,
    teacher_ckpt: str,
    batches: int,
    ckpt: Optional[str] = None,
    parts: bool = False,
    opts: Sequence[str] = (),
) -> dict[str, Any]:
    """Per term group: mean loss and mean student-gradient norm over ``batches`` training batches, the ratio to the
    task's, and the mean clip factor of the whole step."""
    from detkd.engine.checkpoint import load_checkpoint

    cfg, train_set, distiller = build_probe(recipe, teacher_ckpt, opts)
    if ckpt:
        distiller.load_trainable_state_dict(load_checkpoint(ckpt)["model"])
    distiller.train()
    student_params = [p for p in distiller.student.parameters() if p.requires_grad]
    all_params = [p for p in distiller.parameters() if p.requires_grad]
    sums: dict[str, dict[str, float]] = {}
    clip_factors, total_norms = [], []
    clip = cfg.train.grad_clip
    for images, targets in batches_of(train_set, cfg.data.batch_size, batches):
        losses = distiller(images, targets)
        groups: dict[str, Any] = {}
        for name, value in losses.items():
            groups[term_group(name)] = groups.get(term_group(name), 0.0) + value
        task_grad = flat_grad(groups["task"], student_params)
        for group, value in groups.items():
            entry = sums.setdefault(group, {"loss": 0.0, "grad_norm": 0.0, "cos_with_task": 0.0})
            grad = flat_grad(value, student_params)
            entry["loss"] += float(value.detach()) / batches
            entry["grad_norm"] += float(grad.norm()) / batches
            cos = grad @ task_grad / (grad.norm() * task_grad.norm()).clamp_min(1e-30)
            entry["cos_with_task"] += float(cos) / batches
        total = grad_norm(sum(groups.values()), all_params)
        total_norms.append(total)
        clip_factors.append(min(1.0, clip / total) if clip else 1.0)
        if parts:  # the same batch again, term by term (the student's proposal/sample draws do not enter these)
            for group, value in part_terms(distiller, images, targets).items():
                entry = sums.setdefault(group, {"loss": 0.0, "grad_norm": 0.0})
                entry["loss"] += float(value.detach()) / batches
                entry["grad_norm"] += grad_norm(value, student_params) / batches
    task = sums["task"]["grad_norm"]
    for entry in sums.values():
        entry["grad_ratio_to_task"] = entry["grad_norm"] / task if task > 0 else float("nan")
    return {
        "recipe": shown(recipe),
        "ckpt": ckpt,
        "opts": list(opts),
        "batches": batches,
        "grad_clip": clip,
        "total_grad_norm": sum(total_norms) / len(total_norms),
        "clip_factor": sum(clip_factors) / len(clip_factors),
        "groups": sums,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="bench recipe names (fgd, attention ...) or recipe paths")
    parser.add_argument("--teacher", required=True, help="the teacher checkpoint")
    parser.add_argument("--ckpt", help="a trained distillation run's last.pth (one recipe)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--parts", action="store_true", help=f"also each term of {', '.join(PARTS)}")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--opts", nargs="*", default=[], help="recipe overrides, as train_distill.py's --opts")
    args = parser.parse_args()
    if args.ckpt and len(args.recipes) != 1:
        parser.error("--ckpt goes with exactly one recipe")
    out = []
    for name in args.recipes:
        r = measure(recipe_path(name), args.teacher, args.batches, args.ckpt, args.parts, args.opts)
        out.append(r)
        where = f"trained ({args.ckpt})" if args.ckpt else "fresh student"
        print(f"{r['recipe']}  [{where}, {r['batches']} batches]  total grad norm {r['total_grad_norm']:.3g}, "
              f"clip {r['grad_clip']} -> step scaled by {r['clip_factor']:.3g}")  # fmt: skip
        for group, e in sorted(r["groups"].items(), key=lambda kv: (kv[0] != "task", kv[0])):
            cos = f"   cos with task {e['cos_with_task']:6.3f}" if "cos_with_task" in e else ""
            print(f"  {group:16s} loss {e['loss']:9.4g}   grad norm {e['grad_norm']:9.4g}   "
                  f"x task {e['grad_ratio_to_task']:8.3g}{cos}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
