"""Category ids and names of a recipe, read from its COCO annotation file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from detkd.deploy.errors import DeployError


@dataclass(frozen=True)
class Categories:
    """The categories of a COCO annotation file, in detkd's label order.

    ``CocoDetection`` maps category ids, sorted ascending, to the contiguous labels ``1..K``; ``ids[label - 1]`` and
    ``names[label - 1]`` undo that mapping here, so a detector trained by detkd reports the original ids.

    Attributes:
        ids: original category ids, sorted ascending (label ``k`` is ``ids[k - 1]``).
        names: category names aligned with ``ids``.
        source: the annotation file they were read from.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        """``K + 1``: what the detector is built with (label 0 is background)."""
        return len(self.ids) + 1

    def name_of(self, category_id: int) -> str:
        """The name of an original category id (``"id <n>"`` for an id not in the file)."""
        try:
            return self.names[self.ids.index(int(category_id))]
        except ValueError:
            return f"id {int(category_id)}"


def read_categories(ann_file: Union[str, os.PathLike]) -> Categories:
    """Read the ``categories`` of a COCO annotation file (ids sorted as ``CocoDetection`` sorts them).

    Raises:
        DeployError: the file is missing, is not JSON, or has no valid ``categories`` list.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise DeployError(
            f"annotation file '{path}' (data.train.ann_file of the recipe, where the category names come from) "
            f"does not exist; generate or copy the dataset, or point the recipe at it."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeployError(f"annotation file '{path}' could not be read as JSON: {err}.") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise DeployError(f"annotation file '{path}' has no 'categories' list; category names cannot be read.")
    by_id: dict[int, str] = {}
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise DeployError(f"annotation file '{path}': categories[{i}] has no integer 'id'.")
        by_id[cat["id"]] = str(cat.get("name", cat["id"]))
    ids = tuple(sorted(by_id))
    return Categories(ids=ids, names=tuple(by_id[i] for i in ids), source=str(path))
