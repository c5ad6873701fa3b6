"""The deployable detector: a torchvision detector with its pre- and post-processing, images in, boxes out.

:class:`DeployableDetector` is what both exporters see and what the parity check runs in eager PyTorch:

* **in**: ``images`` ``(N, 3, H, W)``, ``uint8`` in ``0..255`` or floating point in ``0..1`` (RGB). The detector's
  own transform (``GeneralizedRCNNTransform``) normalises and resizes them, so callers pass decoded images as they
  are.
* **out**: a tuple ``(boxes, scores, labels, image_index)`` over all ``M`` detections of the batch: ``boxes``
  ``(M, 4)`` float32 ``xyxy`` in the pixels of the input image (the transform maps them back), ``scores`` ``(M,)``
  float32, ``labels`` ``(M,)`` int64 holding the **original category ids** of the recipe's annotation file, and
  ``image_index`` ``(M,)`` int64, the image of the batch each detection belongs to. Detections of an image are in
  the detector's order (descending score). Detections of label 0 (the never-positive background column of the
  sigmoid heads of RetinaNet and FCOS) are dropped, as the evaluator drops them.

The recipe's ``score_thresh``, ``nms_thresh`` and ``detections_per_img`` are part of the model and so of the
exported file; a higher threshold can be applied to its output afterwards (``tools/predict.py --score-thr``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from detkd.deploy.categories import Categories, read_categories
from detkd.deploy.errors import DeployError

MODEL_KEYS = ("model", "student", "teacher")


class DeployableDetector(nn.Module):
    """A torchvision detector with uint8/float input and flat, category-id output (module docstring).

    Args:
        detector: a torchvision ``RetinaNet``, ``FCOS``, ``FasterRCNN`` or ``SSD`` (put in eval mode here).
        category_ids: the original category id of each contiguous label ``1..K`` (``category_ids[k - 1]``).
    """

    def __init__(self, detector: nn.Module, category_ids: list[int]) -> None:
        super().__init__()
        self.detector = detector.eval()
        # label -> category id; label 0 (background) maps to 0 but is filtered out before the lookup
        self.register_buffer("label_to_category", torch.tensor([0] + [int(c) for c in category_ids]), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detect objects in a batch of equally sized images.

        Args:
            images: ``(N, 3, H, W)`` uint8 (0..255) or float (0..1) RGB.

        Returns:
            ``boxes (M, 4)``, ``scores (M,)``, ``labels (M,)`` (category ids), ``image_index (M,)``.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("images must be an (N, 3, H, W) tensor of RGB images")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        else:
            x = images.float()
        batch = [img for img in x.unbind(0)]
        if torch.jit.is_scripting():
            detections = self.detector(batch)[1]  # scripted torchvision detectors return (losses, detections)
        else:
            detections = self.detector(batch)
        boxes, scores, labels, index = [], [], [], []
        for i, det in enumerate(detections):
            keep = det["labels"] > 0
            kept = det["labels"][keep]
            boxes.append(det["boxes"][keep])
            scores.append(det["scores"][keep])
            labels.append(self.label_to_category[kept])
            index.append(torch.full_like(kept, i))
        return torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(index)


@dataclass
class LoadedDetector:
    """A detector of a recipe with its checkpoint loaded, ready to deploy.

    Attributes:
        model: the :class:`DeployableDetector` (eval mode, CPU).
        categories: the recipe's categories.
        model_key: ``model``, ``student`` or ``teacher``: which detector of the recipe.
        arch: the registered architecture name (``retinanet``, ``fcos``, ``faster_rcnn``, ``ssdlite``).
        description: e.g. ``"retinanet resnet18 FPN32, 8 classes"``.
        model_cfg: the recipe's section of that detector.
        checkpoint: the checkpoint file loaded.
    """

    model: DeployableDetector
    categories: Categories
    model_key: str
    arch: str
    description: str
    model_cfg: Any
    checkpoint: str


def default_model_key(cfg: Any) -> str:
    """``model`` for a one-detector recipe, else ``student`` (what ``tools/eval.py`` does)."""
    return "model" if getattr(cfg, "model", None) is not None else "student"


def model_section(cfg: Any, model_key: Optional[str]) -> tuple[str, Any]:
    """``(key, section)`` of the detector ``model_key`` of a recipe (default: :func:`default_model_key`).

    Raises:
        DeployError: an unknown key, or a recipe without that section.
    """
    key = model_key or default_model_key(cfg)
    if key not in MODEL_KEYS:
        raise DeployError(f"--model must be one of {', '.join(MODEL_KEYS)}; got '{key}'.")
    section = getattr(cfg, key, None)
    if section is None:
        present = [k for k in MODEL_KEYS if getattr(cfg, k, None) is not None]
        raise DeployError(
            f"recipe '{cfg.name}' has no '{key}' section; it describes {', '.join(present) or 'no detector'} "
            f"(choose one with --model)."
        )
    return key, section


def describe(section: Any, categories: Categories) -> str:
    """``"retinanet resnet18 FPN32, 8 classes"``."""
    fpn = "" if section.arch == "ssdlite" else f" FPN{section.fpn_channels}"
    return f"{section.arch} {section.backbone}{fpn}, {len(categories.ids)} classes"


def load_detector(cfg: Any, checkpoint: Union[str, os.PathLike], model_key: Optional[str] = None) -> LoadedDetector:
    """Build a recipe's detector, load a checkpoint into it strictly and wrap it for deployment.

    The recipe's own ``checkpoint`` / ``weights`` / ``weights_backbone`` of that section are not loaded (the given
    checkpoint replaces them, and no download is attempted). Category names come from ``data.train.ann_file``.

    Args:
        cfg: a :class:`detkd.config.Config`.
        checkpoint: ``student_best.pth``, ``best.pth`` or a plain state_dict of that detector.
        model_key: ``model``, ``student`` or ``teacher`` (default: :func:`default_model_key`).

    Raises:
        DeployError: no such section, missing annotation file, or a checkpoint that is missing or does not fit (the
            message names the file and the first mismatching tensors).
    """
    from detkd.models.build import build_detector_from_cfg, load_detector_weights

    key, section = model_section(cfg, model_key)
    categories = read_categories(cfg.data.train.ann_file)
    build_cfg = dataclasses.replace(section, checkpoint=None, weights=None, weights_backbone=None)
    detector = build_detector_from_cfg(build_cfg, categories.num_classes)
    what = describe(section, categories)
    try:
        load_detector_weights(detector, checkpoint)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise DeployError(f"--ckpt does not fit the recipe's {key} ({what}, recipe '{cfg.name}'): {err}") from None
    wrapped = DeployableDetector(detector, list(categories.ids)).eval()
    return LoadedDetector(wrapped, categories, key, section.arch, what, section, str(checkpoint))
