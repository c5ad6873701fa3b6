"""How much a dense-head teacher's classification outputs say beyond the hard labels, on the images the student trains
on and on images the teacher never saw.

Logit KD (``logit_kd``) and the soft targets of ``cross_kd`` carry "dark knowledge" only where the teacher is
unsure: where its class probabilities are near 0 or 1 everywhere, the targets are the hard labels the student's
focal loss already has. A teacher trained on the same images as the student is surer on them than on new images.
For a recipe with a dense-head teacher, this script takes ``--batches`` batches of the train split (the recipe's
augmentation, seed 0) and of the val split, runs the teacher as a distillation step does (on the student's padded
batch), and reports per split, over every head position:

- ``uncertain``: the share of positions whose top class probability ``max_c sigmoid(t)`` lies in (0.1, 0.9);
- ``entropy``: the mean per-position sum of the binary entropies of the class probabilities (nats);
- ``confident``: the share of positions with ``max_c sigmoid(t) >= 0.5`` (logit_kd's box term acts there).

    python benchmarks/teacher_targets.py --teacher checkpoints/bench/v2_teacher/last_weights.pth logit_kd
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_common import batches_of, build_probe, probe_main, shown  # noqa: E402

UNSURE = (0.1, 0.9)


def softness(cls_logits) -> dict[str, float]:
    """The three statistics of one batch's teacher logits ``(N, P, K)`` (see the module docstring), as sums over
    positions (``positions`` is the count) so batches add up."""
    import torch.nn.functional as F

    logits = cls_logits.detach().reshape(-1, cls_logits.shape[-1]).double()
    prob = logits.sigmoid()
    top = prob.amax(dim=1)
    # binary entropy with logsigmoid: -(p log p + (1 - p) log(1 - p)), finite for any logit
    entropy = -(prob * F.logsigmoid(logits) + (1 - prob) * F.logsigmoid(-logits)).sum(dim=1)
    return {
        "positions": float(logits.shape[0]),
        "uncertain": float(((top > UNSURE[0]) & (top < UNSURE[1])).sum()),
        "entropy": float(entropy.sum()),
        "confident": float((top >= 0.5).sum()),
    }


def summarize(parts: list[dict[str, float]]) -> dict[str, float]:
    """Means over every position of the batches."""
    total = {k: sum(p[k] for p in parts) for k in ("positions", "uncertain", "entropy", "confident")}
    n = max(total["positions"], 1.0)
    return {"positions": int(total["positions"]), "uncertain": total["uncertain"] / n,
            "entropy": total["entropy"] / n, "confident": total["confident"] / n}  # fmt: skip


def measure(recipe: Path, teacher_ckpt: str, batches: int) -> dict[str, Any]:
    import torch

    from detkd.data.build import build_dataset

    cfg, train_set, distiller = build_probe(recipe, teacher_ckpt)
    distiller.train()
    out: dict[str, Any] = {"recipe": shown(recipe), "batches": batches, "unsure_range": list(UNSURE)}
    for split, dataset in (("train", train_set), ("val", build_dataset(cfg.data, "val", seed=0))):
        parts = []
        with torch.no_grad():
            for images, targets in batches_of(dataset, cfg.data.batch_size, batches):
                records, _ = distiller.record_teachers(images, targets, extra_needs=frozenset({"teacher_head"}))
                head = next(iter(records.values())).teacher.head
                if "cls_logits" not in head:
                    raise SystemExit(f"{recipe}: the teacher has no dense classification head")
                parts.append(softness(head["cls_logits"]))
        out[split] = summarize(parts)
    return out


def report(r: dict[str, Any]) -> None:
    for split in ("train", "val"):
        s = r[split]
        print(
            f"{r['recipe']}  {split:5s} [{s['positions']} positions]  top class prob in {UNSURE}: "
            f"{s['uncertain']:.2%}; mean entropy {s['entropy']:.4f} nats/position; confident (>= 0.5): "
            f"{s['confident']:.2%}"
        )


if __name__ == "__main__":
    probe_main(__doc__, measure, report, default_batches=10, what="logit_kd")
