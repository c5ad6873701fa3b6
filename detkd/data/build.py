"""Config -> datasets and loaders (the only place the data config is interpreted)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from detkd.config import DataCfg, SplitCfg
from detkd.data.coco import CocoDetection, collate_detection
from detkd.data.transforms import build_transforms

LOGGER = logging.getLogger("detkd")
# the generator settings that change what an image looks like (not how many there are, nor the seed)
DISTRIBUTION_KNOBS = ("generator_version", "size", "min_object_size", "clutter")


def _generator_stamp(img_dir: str) -> Optional[dict]:
    """The ``generator.json`` of the synthetic set an image folder (``<set>/images/<split>``) belongs to, if any."""
    path = Path(img_dir).parent.parent / "generator.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def synthetic_mismatch(data_cfg: DataCfg) -> Optional[str]:
    """A warning when train and val come from two synthetic sets made with different image settings (e.g. a stale
    tuning split left from an older recipe: 128 px images scored by a model trained at 96 px), else None."""
    train, val = _generator_stamp(data_cfg.train.img_dir), _generator_stamp(data_cfg.val.img_dir)
    if train is None or val is None:
        return None
    differ = [k for k in DISTRIBUTION_KNOBS if train.get(k) != val.get(k)]
    if not differ:
        return None
    both = ", ".join(f"{k} {train.get(k)} vs {val.get(k)}" for k in differ)
    return (
        f"data.val.img_dir {data_cfg.val.img_dir} was generated with other settings than data.train.img_dir "
        f"{data_cfg.train.img_dir} ({both}; train vs val): the val images come from another distribution. If that "
        "is not intended, regenerate the val set with tools/make_synthetic.py and the train set's settings."
    )


def ensure_data(data_cfg: DataCfg, show_progress: bool = True) -> None:
    """Generate the synthetic set when the recipe names one (``data.synthetic``) and it is absent; warn when the
    val split is a synthetic set made with other image settings than the train split (:func:`synthetic_mismatch`)."""
    if data_cfg.synthetic is None:
        _warn_mismatch(data_cfg)
        return
    from detkd.data.synthetic import ensure_synthetic

    s = data_cfg.synthetic
    ensure_synthetic(
        s.out,
        s.num_train,
        s.num_val,
        s.size,
        s.seed,
        show_progress=show_progress,
        min_object_size=s.min_object_size,
        clutter=s.clutter,
    )
    _warn_mismatch(data_cfg)


def _warn_mismatch(data_cfg: DataCfg) -> None:
    message = synthetic_mismatch(data_cfg)
    if message:
        LOGGER.warning(message)


def build_dataset(data_cfg: DataCfg, split: str, seed: int = 0) -> CocoDetection:
    """The COCO-format dataset of ``split`` ("train" or "val") with the recipe's transforms."""
    split_cfg: SplitCfg = getattr(data_cfg, split)
    steps = [(step.type, dict(step.params)) for step in getattr(data_cfg.transforms, split)]
    transforms = build_transforms(steps, min_visibility=data_cfg.transforms.min_visibility, seed=seed)
    keep_empty = data_cfg.keep_empty if split == "train" else True  # evaluation always sees every image
    return CocoDetection(split_cfg.ann_file, split_cfg.img_dir, transforms=transforms, keep_empty=keep_empty, seed=seed)


def build_eval_loader(
    dataset: CocoDetection, batch_size: int, num_workers: int, max_images: Optional[int] = None
) -> DataLoader:
    """A deterministic loader over the first ``max_images`` images (all when None)."""
    subset = dataset
    if max_images is not None and max_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(max_images))
    return DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_detection
    )
