"""Which images to run on: command-line inputs (files, folders, globs) and the recipe's val images."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch

from detkd.deploy.errors import DeployError

IMAGE_SUFFIXES = (
    ".bmp", ".dib", ".jpg", ".jpeg", ".jpe", ".jp2", ".png", ".webp", ".avif", ".pbm", ".pgm", ".ppm", ".pxm",
    ".pnm", ".pfm", ".sr", ".ras", ".tif", ".tiff", ".exr", ".hdr", ".pic",
)  # fmt: skip
"""Suffixes (any case) taken from a folder: the formats OpenCV's ``imread`` documents."""
_GLOB_CHARS = set("*?[")


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Expand image files, folders and glob patterns, in the order given, without duplicates.

    A file named directly is taken whatever its suffix (OpenCV decides whether it can read it); a folder gives its
    image files (by suffix, :data:`IMAGE_SUFFIXES`, not recursive); a glob (``*``, ``?``, ``[``; ``**`` recurses)
    gives the files and folders it matches.

    Returns:
        ``(paths, unmatched)``: the image paths, and the inputs that matched no image.

    Raises:
        DeployError: no input matches any image (the message names every pattern).
    """
    paths: list[Path] = []
    seen: set[Path] = set()
    unmatched: list[str] = []
    for raw in inputs:
        if _GLOB_CHARS & set(raw):
            matches = [Path(p) for p in sorted(glob.glob(raw, recursive=True))]
        else:
            matches = [Path(raw)] if os.path.exists(raw) else []
        found: list[Path] = []
        for match in matches:
            if match.is_dir():
                found.extend(_folder_images(match))
            elif match.is_file() and (match.suffix.lower() in IMAGE_SUFFIXES or not (_GLOB_CHARS & set(raw))):
                found.append(match)
        if not found:
            unmatched.append(raw)
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    if not paths:
        shown = ", ".join(f"'{p}'" for p in inputs) or "(none given)"
        raise DeployError(
            f"no image matches the inputs {shown}: give image files, folders holding images "
            f"({', '.join(IMAGE_SUFFIXES[:8])}, ...) or glob patterns such as 'photos/*.jpg'."
        )
    return paths, unmatched


def to_tensor(image_rgb: Any) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB array -> ``(3, H, W)`` uint8 tensor (contiguous)."""
    return torch.from_numpy(image_rgb).permute(2, 0, 1).contiguous()


def val_image_paths(ann_file: Union[str, os.PathLike], img_dir: Union[str, os.PathLike], num: int) -> list[Path]:
    """The first ``num`` images of a COCO annotation file (in file order), as paths under ``img_dir``.

    Raises:
        DeployError: the annotation file is missing or unreadable, or lists no image.
    """
    path = Path(ann_file)
    try:
        images = json.loads(path.read_text(encoding="utf-8")).get("images", [])
    except (OSError, ValueError, AttributeError) as err:
        raise DeployError(f"val annotation file '{path}' (data.val.ann_file) could not be read: {err}.") from None
    if not images:
        raise DeployError(f"val annotation file '{path}' (data.val.ann_file) lists no image to check parity on.")
    return [Path(img_dir) / str(im["file_name"]) for im in images[: max(1, num)]]
