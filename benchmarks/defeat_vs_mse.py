"""How DeFeat's decoupled weighting differs from plain MSE imitation on a data set, cell by cell.

DeFeat (``defeat``) normalises its foreground and background parts by their own cell counts; ``mse`` averages over
every cell. With ``f`` the share of a level's cells inside a GT box (over the whole batch), the per-element weights
of the two recipes' terms compare as::

    DeFeat / MSE on a foreground cell = w_defeat * fg_weight / (2 f) / w_mse
    DeFeat / MSE on a background cell = w_defeat * bg_weight / (2 (1 - f)) / w_mse

(``detkd.losses.functional.defeat_loss`` and ``feature_mse``; the factor ``C`` cancels). Ratios near 1 on both
kinds of cell mean the two recipes train the student with the same loss; this script measures ``f`` per level on the
recipe's train annotations (the boxes at the model's input size, stride ``2^k`` for level ``pk``) and prints both
ratios.

    python benchmarks/defeat_vs_mse.py [--defeat defeat] [--mse mse] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_common import REPO, recipe_path, shown  # noqa: E402


def weight_ratios(fg_fraction: float, w_defeat: float, fg_weight: float, bg_weight: float, w_mse: float) -> dict:
    """DeFeat's per-element weight over MSE's on foreground and on background cells (module docstring)."""
    f = min(max(fg_fraction, 1e-12), 1.0 - 1e-12)
    return {"fg": w_defeat * fg_weight / (2.0 * f) / w_mse, "bg": w_defeat * bg_weight / (2.0 * (1.0 - f)) / w_mse}


def fg_fractions(ann_file: Path, image_size: int, levels: list[str]) -> dict[str, float]:
    """Share of the cells of each level inside a GT box, over every image of ``ann_file`` (``box_masks``'s
    rasterisation, images resized to ``image_size``)."""
    import torch

    from detkd.masks import box_masks

    coco = json.loads(ann_file.read_text())
    by_image: dict[int, list[list[float]]] = defaultdict(list)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append([x, y, x + w, y + h])
    boxes = []
    for im in coco["images"]:
        scale = image_size / max(im["width"], im["height"])
        boxes.append(torch.tensor(by_image[im["id"]], dtype=torch.float32).reshape(-1, 4) * scale)
    out = {}
    for level in levels:
        side = max(1, image_size // 2 ** int(level.lstrip("p")))
        fg, _ = box_masks(boxes, (side, side), (image_size, image_size))
        out[level] = float((fg > 0).float().mean())
    return out


def loss_entry(recipe: Path, kind: str) -> dict[str, Any]:
    from detkd.config import load_config

    cfg = load_config(recipe)
    for entry in cfg.distill.features:
        if entry.type == kind:
            levels = list(entry.levels) if isinstance(entry.levels, tuple) else ["p3", "p4", "p5"]
            return {"type": entry.type, "weight": entry.weight, "levels": levels, **dict(entry.params)}
    raise SystemExit(f"{shown(recipe)}: no distill.features entry of type {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defeat", default="defeat", help="the DeFeat recipe (bench name or path)")
    parser.add_argument("--mse", default="mse", help="the MSE recipe (bench name or path)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    from detkd.config import load_config
    from detkd.data.build import ensure_data

    d_recipe, m_recipe = recipe_path(args.defeat), recipe_path(args.mse)
    d, m = loss_entry(d_recipe, "defeat"), loss_entry(m_recipe, "mse")
    cfg = load_config(d_recipe)
    ensure_data(cfg.data, show_progress=False)
    levels = d["levels"]
    fractions = fg_fractions(REPO / cfg.data.train.ann_file, int(cfg.student.min_size), levels)
    rows = []
    for level in levels:
        r = weight_ratios(fractions[level], d["weight"], d.get("fg_weight", 3.0), d.get("bg_weight", 12.0), m["weight"])
        rows.append({"level": level, "fg_fraction": fractions[level], "ratio_fg": r["fg"], "ratio_bg": r["bg"]})
        print(f"{level}: foreground {100 * fractions[level]:.1f} % of the cells; DeFeat / MSE weight per element: "
              f"foreground {r['fg']:.2f}, background {r['bg']:.2f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"defeat": shown(d_recipe), "mse": shown(m_recipe), "defeat_entry": d, "mse_entry": m, "levels": rows}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
