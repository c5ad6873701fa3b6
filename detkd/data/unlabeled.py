"""Unlabelled images for pseudo-label distillation, and a sampler that mixes them with labelled batches.

With ``data.unlabeled`` in a recipe, the student also trains on images that have no annotations: the teacher's
filtered detections are their only targets. Batches are never mixed within themselves: a batch is either
labelled or unlabelled, and ``ratio`` unlabelled batches are interleaved per labelled batch.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from detkd.data.coco import load_image_rgb
from detkd.errors import DataError, DataNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class UnlabeledImages(Dataset):
    """Images from a folder (searched recursively) or from the ``images`` of a COCO json (annotations ignored).

    Items look like :class:`detkd.data.coco.CocoDetection` items with no boxes and ``target["unlabeled"] = True``.
    """

    def __init__(self, img_dir: str, ann_file: Optional[str] = None, transforms=None, seed: int = 0) -> None:
        self.img_dir = Path(img_dir)
        if ann_file is not None:
            from pycocotools.coco import COCO

            if not Path(ann_file).is_file():
                raise DataNotFoundError(f"data.unlabeled.ann_file {ann_file} does not exist.")
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(ann_file)
            self.files = [self.img_dir / coco.imgs[i]["file_name"] for i in sorted(coco.imgs)]
        else:
            if not self.img_dir.is_dir():
                raise DataNotFoundError(f"data.unlabeled.img_dir {self.img_dir} is not a folder.")
            self.files = sorted(p for p in self.img_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"data.unlabeled: no images ({', '.join(IMAGE_SUFFIXES)}) under {self.img_dir}.")
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = load_image_rgb(str(self.files[index]))
        orig_h, orig_w = image.shape[:2]
        boxes = np.zeros((0, 4), dtype=np.float32)
        labels = np.zeros((0,), dtype=np.int64)
        if self.transforms is not None:
            sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index, 1]).generate_state(1)[0])
            image, boxes, labels = self.transforms(image, boxes, labels, sample_seed)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": torch.tensor(-(index + 1), dtype=torch.int64),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor(list(tensor.shape[-2:]), dtype=torch.int64),
            "unlabeled": True,
        }
        return tensor, target


class MixedBatchSampler(Sampler[list[int]]):
    """Batches over ``ConcatDataset([labelled, unlabelled])``: every epoch, the labelled batches in a shuffled
    order with ``round(ratio * labelled batches)`` unlabelled batches spread evenly among them.

    The order depends only on (seed, epoch), so a resumed run sees the same batches; under DDP each process takes
    its own shard of both sets.
    """

    def __init__(
        self,
        num_labeled: int,
        num_unlabeled: int,
        batch_size: int,
        ratio: float,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_labeled, self.num_unlabeled = num_labeled, num_unlabeled
        self.batch_size, self.ratio, self.seed = batch_size, ratio, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.labeled_batches = (num_labeled // world_size) // batch_size
        available = (num_unlabeled // world_size) // batch_size
        self.unlabeled_batches = min(int(round(ratio * self.labeled_batches)), available)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.labeled_batches + self.unlabeled_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        labeled = torch.randperm(self.num_labeled, generator=g)[self.rank :: self.world_size].tolist()
        unlabeled = torch.randperm(self.num_unlabeled, generator=g)[self.rank :: self.world_size] + self.num_labeled
        unlabeled = unlabeled.tolist()
        bs = self.batch_size
        lab = [labeled[i * bs : (i + 1) * bs] for i in range(self.labeled_batches)]
        unl = [unlabeled[i * bs : (i + 1) * bs] for i in range(self.unlabeled_batches)]
        # place unlabelled batch j after labelled batch floor((j + 1) * L / (U + 1)): evenly spread, deterministic
        slots: dict[int, list[list[int]]] = {}
        for j, batch in enumerate(unl):
            slots.setdefault(math.floor((j + 1) * len(lab) / (len(unl) + 1)), []).append(batch)
        for i, batch in enumerate(lab):
            yield from slots.get(i, [])
            yield batch
        yield from slots.get(len(lab), [])


class EpochConcatDataset(torch.utils.data.ConcatDataset):
    """ConcatDataset that forwards ``set_epoch`` to its parts (their per-sample augmentation seeds use it)."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
