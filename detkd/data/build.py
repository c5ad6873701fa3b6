"""Config -> datasets and loaders (the only place the data config is interpreted)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

from detkd.config import DataCfg, SplitCfg
from detkd.data.coco import CocoDetection, collate_detection
from detkd.data.transforms import build_transforms


def ensure_data(data_cfg: DataCfg, show_progress: bool = True) -> None:
    """Generate the synthetic set when the recipe names one (``data.synthetic``) and it is absent."""
    if data_cfg.synthetic is None:
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
