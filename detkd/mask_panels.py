"""Where does it distil? The masks of one real distillation step, as tensors and as TensorBoard images (pure torch).

:func:`collect_masks` records **one** distillation step of a :class:`~detkd.distiller.Distiller` on a small batch
with the Distiller's own :meth:`~detkd.distiller.Distiller.record_step` (the record the losses read in training);
every mask then comes from the very :class:`~detkd.losses.context.LevelContext` methods the losses call
(``box_masks``, ``spatial_attention``, ``channel_attention``, ``fgfi``, ``difference``, ``feature_difference``) and
each configured feature loss supplies its own per-location weight (:meth:`~detkd.losses.base.FeatureLoss.weight_map`)
— there is no second implementation, so the picture shows what the losses weigh, for built-in and registered losses
alike. :func:`snapshot_grid` tiles a level's masks over the images for
TensorBoard, and :class:`MaskImageCallback` logs those tiles every ``every`` training iterations.

Side effects of the forward, and how they are undone (:func:`collect_masks` leaves the distiller as it found it):

* The step runs in **train mode** (the student's detection loss needs targets, the pseudo labels are merged, and the
  student's BatchNorm layers normalise with batch statistics — what the losses see during training). Train mode
  updates BatchNorm running statistics, so every buffer of the distiller outside the teacher (``running_mean``,
  ``running_var``, ``num_batches_tracked`` ...) is saved before and copied back after; a deep copy of the model
  would cost far more. The train/eval mode is restored too.
* Faster R-CNN samples proposals with the global RNG: the RNG state is forked, so a callback during training does not
  change the batches or samples that follow (resumed runs stay reproducible).
* The Distiller's loss timings (read by the speed benchmark) are restored; the recorders are cleared.

Nothing here imports matplotlib: :mod:`detkd.vis` draws the figures from the same tensors.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes

from detkd.engine.checkpoint import unwrap
from detkd.losses.context import LevelContext, StepRecord
from detkd.pseudo_labels import filter_detections

__all__ = [
    "DEFAULT_TEMPERATURE",
    "LevelMasks",
    "MaskSnapshot",
    "collect_masks",
    "loss_weight_map",
    "colorize",
    "overlay",
    "draw_boxes",
    "mask_grid_image",
    "snapshot_grid",
    "grid_shape",
    "MaskImageCallback",
]

DEFAULT_TEMPERATURE = 0.5
"""Attention temperature shown on levels where no configured loss sets one (FGD's RetinaNet value)."""


# ----------------------------------------------------------------------------------------------------------------
# What one step's masks look like
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LevelMasks:
    """The masks of one FPN level for a batch of ``N`` images, on CPU and detached.

    Attributes:
        name: Level name, e.g. ``"p3"``.
        stride: Stride of the level in pixels.
        feat_hw: ``(H, W)`` of the level's feature map.
        image_hw: ``(H_img, W_img)`` of the padded canvas the masks cover.
        fg: Foreground box mask of :meth:`LevelContext.box_masks`, (N, H, W).
        bg: Background mask, (N, H, W).
        t_spatial: Teacher spatial attention at :attr:`temperature`, (N, H, W) (each image sums to ``H * W``).
        s_spatial: Student spatial attention (the adapted student feature), (N, H, W).
        t_channel: Teacher channel attention, (N, C_t).
        s_channel: Student channel attention, (N, C_s) (``C_s = C_t`` when the level has an adapter).
        temperature: The attention temperature (the first configured loss of the level that has one, else
            :data:`DEFAULT_TEMPERATURE`).
        difference: Teacher-student difference mask (N, H, W), or None when it cannot be formed (no logits and
            different teacher/student widths).
        difference_kind: ``"gid"`` (GID's selection from both dense heads' logits), ``"feature"`` (the feature
            distance variant) or ``"none"``.
        weights: ``{loss name: (N, H, W)}``: the per-location weight of every feature loss configured on this
            level (:func:`loss_weight_map`), in config order.
        distilled: Whether any feature loss runs on this level.
    """

    name: str
    stride: int
    feat_hw: tuple[int, int]
    image_hw: tuple[int, int]
    fg: Tensor
    bg: Tensor
    t_spatial: Tensor
    s_spatial: Tensor
    t_channel: Tensor
    s_channel: Tensor
    temperature: float
    difference: Optional[Tensor]
    difference_kind: str
    weights: dict[str, Tensor] = field(default_factory=dict)
    distilled: bool = True

    def spatial_maps(self) -> dict[str, Tensor]:
        """The (N, H, W) maps in panel order: ``fg``, ``bg``, ``t_spatial``, ``s_spatial``, ``difference`` (when
        present) and ``weight/<loss>`` per configured loss."""
        maps = {"fg": self.fg, "bg": self.bg, "t_spatial": self.t_spatial, "s_spatial": self.s_spatial}
        if self.difference is not None:
            maps["difference"] = self.difference
        maps.update({f"weight/{name}": w for name, w in self.weights.items()})
        return maps


@dataclass
class MaskSnapshot:
    """Everything one recorded step shows: the canvas, the boxes and the masks of every shown level (on CPU).

    Attributes:
        images: The padded batch the backbones saw, de-normalised to RGB in ``[0, 1]``, (N, 3, H_img, W_img).
        image_sizes: ``(h, w)`` of each resized image inside the canvas (the rest is padding).
        gt_boxes: Ground-truth boxes per image, ``(K_i, 4)`` ``xyxy`` canvas pixels (the dataset's boxes resized by
            the student's transform).
        pseudo_boxes: The teacher's filtered pseudo labels per image (canvas pixels), or None without a
            ``pseudo_label`` head loss.
        mask_boxes: The boxes the box masks were built from (the student's transformed targets: GT plus merged
            pseudo labels in ``merge`` mode, pseudo labels only in ``replace`` mode).
        levels: ``{level: LevelMasks}``, fine to coarse.
        feature_losses: ``{loss name: registry type}`` of the recipe's feature losses.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    gt_boxes: list[Tensor]
    pseudo_boxes: Optional[list[Tensor]]
    mask_boxes: list[Tensor]
    levels: dict[str, LevelMasks]
    feature_losses: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# The per-location weight of every feature loss
# ----------------------------------------------------------------------------------------------------------------


def loss_weight_map(loss_name: str, module: nn.Module, ctx: LevelContext) -> Optional[Tensor]:
    """The weight a feature loss puts on every location of one level: ``(N, H, W)``, detached, or None.

    The loss supplies it (:meth:`detkd.losses.base.FeatureLoss.weight_map`): its imitation term is
    ``sum_{n,h,w} W[n,h,w] * e[n,h,w]`` with a per-location error ``e`` that its docstring names; the config weight
    is not included. None: the loss weighs no location.

    Args:
        loss_name: The loss's name in the recipe (``fgd``, ``fgd_1`` ...), for the error message.
        module: The configured loss module.
        ctx: The level's context (the one the loss sees).

    Raises:
        TypeError: ``module`` does not follow the feature-loss protocol (no ``weight_map``).
    """
    if not callable(getattr(module, "weight_map", None)):
        raise TypeError(
            f"feature loss '{loss_name}' ({type(module).__name__}) has no weight_map(ctx); subclass "
            f"detkd.losses.FeatureLoss"
        )
    weight = module.weight_map(ctx)
    return None if weight is None else weight.detach()


# ----------------------------------------------------------------------------------------------------------------
# One recorded step
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _untouched(distiller: nn.Module) -> Iterator[None]:
    """Restore the train/eval mode, every non-teacher buffer (BatchNorm statistics), the RNG and the timings."""
    was_training = distiller.training
    buffers = {k: b.detach().clone() for k, b in distiller.named_buffers() if not k.startswith("teacher.")}
    timings = {k: deque(v, maxlen=v.maxlen) for k, v in getattr(distiller, "timings", {}).items()}
    devices = sorted({b.device.index or 0 for b in buffers.values() if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        live = dict(distiller.named_buffers())
        with torch.no_grad():
            for k, saved in buffers.items():
                live[k].copy_(saved)
        distiller.train(was_training)
        if hasattr(distiller, "timings"):
            distiller.timings.clear()
            distiller.timings.update(timings)


def _canvas_boxes(boxes: Sequence[Tensor], images: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Boxes in input-image pixels -> canvas pixels, by the student transform's per-axis resize ratios."""
    out = []
    for b, img, size in zip(boxes, images, sizes):
        b = b.detach().reshape(-1, 4).float()
        out.append(resize_boxes(b, list(img.shape[-2:]), list(size)).cpu())
    return out


@torch.no_grad()
def collect_masks(
    distiller: nn.Module,
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Any]],
    levels: Optional[Sequence[str]] = None,
) -> MaskSnapshot:
    """Run one distillation step on ``images`` and return its masks; the distiller is left unchanged.

    The Distiller records the step as in training (:meth:`~detkd.distiller.Distiller.record_step`, train mode,
    under ``no_grad``; see the module docstring for what is saved and restored), so the student's features, head
    outputs and transformed targets (pseudo labels merged) are those of a real step, except that the teacher's dense
    head always runs so the difference mask can use both heads' logits even when no loss needs them. Masks come from
    that record's :class:`LevelContext` of each level (with the level's adapter, as the losses see it).

    Args:
        distiller: A :class:`~detkd.distiller.Distiller` (a DDP wrapper is unwrapped).
        images: Input images, (3, H_i, W_i) float in ``[0, 1]``, on the distiller's device.
        targets: Their targets (``boxes`` xyxy pixels of the input images, ``labels``), on the same device.
        levels: Levels to show; default: every level a feature loss distils, or every level teacher and student share
            when the recipe has no feature loss (head-only recipes).

    Returns:
        A :class:`MaskSnapshot` on CPU.

    Raises:
        ValueError: ``levels`` names a level teacher and student do not share.
    """
    d = unwrap(distiller)
    images = list(images)
    targets = [dict(t) for t in targets]
    distilled = sorted({lvl for s in d.feature_specs for lvl in s.levels}, key=lambda name: d.s_strides[name])
    shown = list(levels) if levels is not None else (distilled or list(d.levels))
    unknown = [lvl for lvl in shown if lvl not in d.levels]
    if unknown:
        raise ValueError(f"levels {unknown} are not shared by teacher and student; shared levels: {list(d.levels)}")

    try:
        with _untouched(d):
            d.train()
            record, _ = d.record_step(images, targets, extra_needs=frozenset({"teacher_head"}), run_teacher_always=True)
            level_masks = {lvl: _level_masks(d, record, lvl, lvl in distilled) for lvl in shown}
    finally:
        d.recorder.clear()
        d.t_tap.clear()
    image_list, s_targets, dets = record.image_list, record.targets, record.teacher.detections

    sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
    transform = d.student.transform
    mean = torch.tensor(transform.image_mean, device=image_list.tensors.device)[:, None, None]
    std = torch.tensor(transform.image_std, device=image_list.tensors.device)[:, None, None]
    canvas = (image_list.tensors * std + mean).clamp(0.0, 1.0).cpu()
    gt = [t["boxes"] if not t.get("unlabeled", False) else t["boxes"][:0] for t in targets]
    pseudo = None
    if d.pseudo_labeler is not None and dets is not None:
        pl = d.pseudo_labeler
        kept = filter_detections(dets, pl.score_thr, pl.class_score_thr, pl.nms_iou, pl.max_dets)
        pseudo = _canvas_boxes([k["boxes"] for k in kept], images, sizes)
    return MaskSnapshot(
        images=canvas,
        image_sizes=sizes,
        gt_boxes=_canvas_boxes(gt, images, sizes),
        pseudo_boxes=pseudo,
        mask_boxes=[t["boxes"].detach().float().cpu() for t in s_targets],
        levels=level_masks,
        feature_losses={s.name: _registry_type(s.module) for s in d.feature_specs},
    )


def _registry_type(module: nn.Module) -> str:
    from detkd.losses.feature import FEATURE_LOSSES

    return next((name for name, cls in FEATURE_LOSSES.items() if type(module) is cls), type(module).__name__)


def _level_masks(d: nn.Module, record: StepRecord, level: str, distilled: bool) -> LevelMasks:
    """Every mask of ``level`` from the record's :class:`LevelContext` (adapter applied, as the losses see it)."""
    ctx = record.level_context(level, d.adapter(level))
    specs = [s for s in d.feature_specs if level in s.levels]
    temperature = next(
        (float(t) for s in specs if (t := s.module.attention_temperature) is not None), DEFAULT_TEMPERATURE
    )
    own = next((m for s in specs if (m := s.module.difference_map(ctx)) is not None), None)
    if ctx.has_cls_logits:
        difference, kind = (own if own is not None else ctx.difference()), "gid"
    elif ctx.s_feat.shape == ctx.t_feat.shape:
        difference, kind = (own if own is not None else ctx.feature_difference()), "feature"
    else:
        difference, kind = None, "none"
    weights = {s.name: loss_weight_map(s.name, s.module, ctx) for s in specs}
    fg, bg = ctx.box_masks()

    def cpu(x: Tensor) -> Tensor:
        return x.detach().float().cpu()

    return LevelMasks(
        name=level,
        stride=int(ctx.stride),
        feat_hw=ctx.feat_hw,
        image_hw=tuple(int(v) for v in ctx.image_hw),
        fg=cpu(fg),
        bg=cpu(bg),
        t_spatial=cpu(ctx.spatial_attention("t", temperature)),
        s_spatial=cpu(ctx.spatial_attention("s", temperature)),
        t_channel=cpu(ctx.channel_attention("t", temperature)),
        s_channel=cpu(ctx.channel_attention("s", temperature)),
        temperature=temperature,
        difference=None if difference is None else cpu(difference),
        difference_kind=kind,
        weights={name: cpu(w) for name, w in weights.items() if w is not None},
        distilled=distilled,
    )


# ----------------------------------------------------------------------------------------------------------------
# Pictures in pure torch (TensorBoard)
# ----------------------------------------------------------------------------------------------------------------

# viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's values), interpolated linearly in between
_VIRIDIS = (
    torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32)
    / 255.0
)


def colorize(mask: Tensor, vmin: Optional[float] = None, vmax: Optional[float] = None) -> Tensor:
    """A (H, W) map -> a (3, H, W) float RGB image in ``[0, 1]`` with a viridis-like colour map.

    Values are scaled linearly from ``[vmin, vmax]`` (default: the map's own min and max) to ``[0, 1]`` and coloured
    by interpolating five viridis anchors. A constant map is drawn in the colour of 0.
    """
    mask = mask.detach().float()
    lo = float(mask.min()) if vmin is None else float(vmin)
    hi = float(mask.max()) if vmax is None else float(vmax)
    x = ((mask - lo) / (hi - lo)).clamp(0.0, 1.0) if hi > lo else torch.zeros_like(mask)
    anchors = _VIRIDIS.to(mask.device)
    pos = x * (len(anchors) - 1)
    low = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - low.float())[..., None]
    rgb = anchors[low] * (1 - frac) + anchors[low + 1] * frac  # (H, W, 3)
    return rgb.permute(2, 0, 1).contiguous()


def overlay(image: Tensor, mask: Tensor, alpha: float = 0.6) -> Tensor:
    """Blend a colorised (h, w) mask, upsampled (nearest: one block per feature cell) to the image, over a grey
    version of the (3, H, W) image: ``(1 - alpha) * grey + alpha * colour``."""
    h, w = image.shape[-2:]
    up = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).expand(3, h, w)
    return (1 - alpha) * grey + alpha * colorize(up)


def draw_boxes(image: Tensor, boxes: Tensor, color: Sequence[float] = (0.1, 1.0, 0.1), width: int = 1) -> Tensor:
    """A copy of the (3, H, W) image with the outlines of ``(K, 4)`` ``xyxy`` pixel boxes drawn in ``color``.

    Built by broadcasting the boxes against the pixel grid (no loop over boxes).
    """
    out = image.clone()
    boxes = boxes.reshape(-1, 4).to(image.device, torch.float32)
    if boxes.shape[0] == 0:
        return out
    h, w = image.shape[-2:]
    ys = torch.arange(h, device=image.device, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, device=image.device, dtype=torch.float32)[None, None, :]
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    outer = (xs >= x1.floor()) & (xs <= x2.ceil() - 1) & (ys >= y1.floor()) & (ys <= y2.ceil() - 1)
    inner = (xs >= x1.floor() + width) & (xs <= x2.ceil() - 1 - width) & (ys >= y1.floor() + width)
    inner = inner & (ys <= y2.ceil() - 1 - width)
    edge = (outer & ~inner).any(dim=0)
    colour = torch.tensor(list(color), device=image.device, dtype=image.dtype)[:, None, None]
    return torch.where(edge[None], colour.expand_as(out), out)


def mask_grid_image(
    images: Tensor,
    masks: Sequence[Tensor],
    boxes: Optional[Sequence[Tensor]] = None,
    alpha: float = 0.6,
    pad: int = 2,
) -> Tensor:
    """Tile images and masks: one row per image, columns = the image (with ``boxes`` outlined) then every mask
    overlaid on it (:func:`overlay`, each map scaled to its own min..max per image). White ``pad``-pixel gutters.

    Args:
        images: (N, 3, H, W) RGB in ``[0, 1]``.
        masks: Column maps, each (N, h, w) (any resolution; upsampled to (H, W)).
        boxes: Optional ``(K_i, 4)`` ``xyxy`` pixel boxes per image, outlined in green on the first column.
        alpha: Opacity of the colour.
        pad: Gutter width in pixels.

    Returns:
        (3, N * H + (N + 1) * pad, (1 + M) * W + (M + 2) * pad) float in ``[0, 1]`` for ``M = len(masks)``.
    """
    n, _, h, w = images.shape
    cols = 1 + len(masks)
    grid = images.new_ones(3, n * h + (n + 1) * pad, cols * w + (cols + 1) * pad)
    for i in range(n):
        tiles = [draw_boxes(images[i], boxes[i]) if boxes is not None else images[i]]
        tiles += [overlay(images[i], m[i].to(images.device), alpha) for m in masks]
        top = pad + i * (h + pad)
        for j, tile in enumerate(tiles):
            left = pad + j * (w + pad)
            grid[:, top : top + h, left : left + w] = tile
    return grid


def snapshot_grid(snapshot: MaskSnapshot, level: str) -> Tensor:
    """The TensorBoard tile of one level: columns image (GT green, pseudo labels orange), then
    :meth:`LevelMasks.spatial_maps` in order (fg, bg, teacher and student spatial attention, difference, the
    per-location weight of each configured loss). (3, H', W') float in ``[0, 1]``."""
    lm = snapshot.levels[level]
    images = snapshot.images
    if snapshot.pseudo_boxes is not None:
        images = torch.stack(
            [draw_boxes(img, b, color=(1.0, 0.55, 0.0)) for img, b in zip(images, snapshot.pseudo_boxes)]
        )
    return mask_grid_image(images, list(lm.spatial_maps().values()), boxes=snapshot.gt_boxes)


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard callback
# ----------------------------------------------------------------------------------------------------------------


class MaskImageCallback:
    """Trainer iteration callback: every ``every`` iterations, log the mask tiles of a fixed small batch.

    Called as ``callback(trainer, iteration, values)`` (see ``Trainer.iter_callbacks``); on iterations divisible
    by ``every`` it runs :func:`collect_masks` on its batch (the distiller is left unchanged) and calls
    ``trainer.logger.image(f"{tag}/{level}", tile, iteration)`` per level with the :func:`snapshot_grid` tile:
    one row per image, columns image | fg | bg | teacher A_s | student A_s | difference | weight per loss.
    Only the main process logs (``trainer.is_main``).

    Args:
        distiller: The Distiller being trained (or its DDP wrapper).
        images: The fixed batch, (3, H, W) float images (e.g. the first two val images).
        targets: Their targets.
        every: Iterations between two logs (> 0).
        levels: Levels to log (default as in :func:`collect_masks`).
        tag: TensorBoard tag prefix.
    """

    def __init__(
        self,
        distiller: nn.Module,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Any]],
        every: int,
        levels: Optional[Sequence[str]] = None,
        tag: str = "masks",
    ) -> None:
        if every <= 0:
            raise ValueError(f"every must be a positive number of iterations, got {every}")
        self.distiller = distiller
        self.images = [img.detach() for img in images]
        self.targets = [{k: v.detach() if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        self.every = int(every)
        self.levels = levels
        self.tag = tag

    @classmethod
    def from_dataset(
        cls, distiller: nn.Module, dataset: Any, every: int, num_images: int = 2, **kwargs: Any
    ) -> MaskImageCallback:
        """A callback on the first ``num_images`` items of ``dataset`` (e.g. the val split)."""
        items = [dataset[i] for i in range(min(num_images, len(dataset)))]
        return cls(distiller, [img for img, _ in items], [t for _, t in items], every, **kwargs)

    def __call__(self, trainer: Any, iteration: int, values: Mapping[str, float]) -> None:
        if iteration % self.every != 0 or not getattr(trainer, "is_main", True):
            return
        device = next(unwrap(self.distiller).student.parameters()).device
        images = [img.to(device) for img in self.images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in self.targets]
        snapshot = collect_masks(self.distiller, images, targets, self.levels)
        for level in snapshot.levels:
            trainer.logger.image(f"{self.tag}/{level}", snapshot_grid(snapshot, level), iteration)


def grid_shape(num_images: int, num_masks: int, image_hw: tuple[int, int], pad: int = 2) -> tuple[int, int, int]:
    """The shape :func:`mask_grid_image` returns for ``num_images`` rows and ``num_masks`` mask columns."""
    cols = 1 + num_masks
    h, w = image_hw
    return 3, num_images * h + (num_images + 1) * pad, cols * w + (cols + 1) * pad
