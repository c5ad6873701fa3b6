"""What the probe scripts of ``benchmarks/`` share: a bench recipe by name, the Distiller it builds against a teacher
checkpoint, and their command line (recipes, ``--teacher``, ``--batches``, ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCH_CFG = REPO / "configs" / "bench"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def recipe_path(name: str) -> Path:
    """A bench recipe's name (``fgd``) or a path to any recipe (``configs/x.yaml``)."""
    return Path(name) if name.endswith(".yaml") else BENCH_CFG / f"{name}.yaml"


def shown(recipe: Path) -> str:
    """The recipe's path as the reports show it: relative to the repository when inside it."""
    return str(recipe.relative_to(REPO)) if recipe.is_relative_to(REPO) else str(recipe)


def build_probe(recipe: Path, teacher_ckpt: str, opts: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """``(cfg, train dataset, distiller)`` of a recipe (with the ``--opts``-style overrides ``opts``, e.g. a probe's
    ``distill.features.0.temperature=50``) against the teacher checkpoint, with seed 0 (the data made on first use),
    as a training run of that seed starts."""
    from detkd.config import load_config
    from detkd.data.build import build_dataset, ensure_data
    from detkd.distiller import build_distiller_from_cfg
    from detkd.engine.trainer import seed_everything

    cfg = load_config(recipe, [*opts, f"teacher.checkpoint={teacher_ckpt}", "train.seed=0"])
    ensure_data(cfg.data, show_progress=False)
    train_set = build_dataset(cfg.data, "train", seed=0)
    seed_everything(0)
    distiller = build_distiller_from_cfg(cfg, train_set.num_classes, train_set.cat_id_to_label)
    return cfg, train_set, distiller


def batches_of(dataset: Any, batch_size: int, count: int):
    """The first ``count`` batches of ``dataset`` in the order of a training run's first epoch (seed 0)."""
    from detkd.data.coco import collate_detection
    from detkd.engine.trainer import make_train_loader

    loader = make_train_loader(dataset, batch_size, 0, 0, collate_detection)
    loader.sampler.set_epoch(0)
    for k, batch in enumerate(loader):
        if k == count:
            break
        yield batch


def probe_main(
    doc: str,
    measure: Callable[[Path, str, int], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    default_batches: int,
    what: str,
) -> None:
    """The command line of a probe: ``RECIPES... --teacher T [--batches N] [--json FILE]``; ``measure(recipe,
    teacher, batches)`` per recipe, ``report`` prints its result, ``--json`` keeps them all."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help=f"bench recipe names ({what} ...) or recipe paths")
    parser.add_argument("--teacher", required=True, help="the teacher checkpoint")
    parser.add_argument("--batches", type=int, default=default_batches)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    out = []
    for name in args.recipes:
        result = measure(recipe_path(name), args.teacher, args.batches)
        out.append(result)
        report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
