"""Masks that decide *where* a student imitates its teacher: pure, batched tensor functions.

Geometry (shared by every box-based mask): boxes are ``xyxy`` float pixels on the padded canvas of size
``image_hw = (H_img, W_img)``; a feature map of size ``feat_hw = (H, W)`` covers that canvas with a stride per axis
``s_y = H_img / H``, ``s_x = W_img / W`` (not necessarily integers when the canvas is not a multiple of the map).
A box covers the cells ``floor(x1 / s_x) .. ceil(x2 / s_x) - 1`` (same for y), at least one cell, clipped to the map.

No function loops over boxes or pixels: per-image box lists are padded to ``(N, Kmax, 4)`` with a validity mask and
compared against coordinate grids by broadcasting. Every mask is returned detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import batched_nms, box_iou

__all__ = [
    "box_masks",
    "spatial_attention",
    "attention_spread",
    "flat_attention_temperature",
    "channel_attention",
    "grid_anchors",
    "retinanet_anchor_sizes",
    "fgfi_mask",
    "difference_mask",
    "feature_difference_mask",
]


def _pad_boxes(boxes: Sequence[Tensor], device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """List of ``(K_i, 4)`` -> padded ``(N, Kmax, 4)`` float boxes and a ``(N, Kmax)`` validity mask."""
    if len(boxes) == 0:
        raise ValueError("expected a list with one (K_i, 4) box tensor per image, got an empty list")
    device = boxes[0].device if device is None else device
    dtype = boxes[0].dtype if boxes[0].is_floating_point() else torch.float32
    rows = [b.to(device=device, dtype=dtype).reshape(-1, 4) for b in boxes]
    padded = pad_sequence(rows, batch_first=True)  # (N, Kmax, 4); Kmax may be 0
    counts = torch.tensor([r.shape[0] for r in rows], device=device)
    valid = torch.arange(padded.shape[1], device=device)[None, :] < counts[:, None]
    return padded, valid


def _cell_ranges(boxes: Tensor, feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[Tensor, ...]:
    """Inclusive cell index ranges ``(c1, c2, r1, r2)`` of ``(..., 4)`` pixel boxes, each ``(...)`` int64."""
    h, w = feat_hw
    s_y, s_x = image_hw[0] / h, image_hw[1] / w
    c1 = torch.floor(boxes[..., 0] / s_x).long().clamp(0, w - 1)
    r1 = torch.floor(boxes[..., 1] / s_y).long().clamp(0, h - 1)
    c2 = torch.maximum((torch.ceil(boxes[..., 2] / s_x).long() - 1).clamp(0, w - 1), c1)
    r2 = torch.maximum((torch.ceil(boxes[..., 3] / s_y).long() - 1).clamp(0, h - 1), r1)
    return c1, c2, r1, r2


def _rasterise(boxes: Tensor, valid: Tensor, feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> Tensor:
    """``max`` over valid boxes of ``1 / (cells of the box)`` on its cells. (N, K, 4), (N, K) -> (N, H, W) float."""
    h, w = feat_hw
    c1, c2, r1, r2 = _cell_ranges(boxes, feat_hw, image_hw)  # each (N, K)
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    in_y = (ys[None, None, :] >= r1[..., None]) & (ys[None, None, :] <= r2[..., None])  # (N, K, H)
    in_x = (xs[None, None, :] >= c1[..., None]) & (xs[None, None, :] <= c2[..., None])  # (N, K, W)
    inside = in_y[..., :, None] & in_x[..., None, :] & valid[..., None, None]  # (N, K, H, W)
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    inv_area = 1.0 / ((c2 - c1 + 1) * (r2 - r1 + 1)).to(dtype)  # (N, K)
    weights = inside.to(dtype) * inv_area[..., None, None]
    if weights.shape[1] == 0:
        return weights.new_zeros(weights.shape[0], h, w)
    return weights.amax(dim=1)


def box_masks(boxes: Sequence[Tensor], feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Foreground and background masks from GT boxes, as in FGD (Yang et al., CVPR 2022, Eq. 3-4).

    ``fg[n, i, j] = max over boxes b of image n covering cell (i, j) of 1 / (cells covered by b)`` (so a small box
    weighs as much in total as a large one); ``bg[n] = 1[fg[n] == 0] / sum(1[fg[n] == 0])``, all zero if every cell is
    foreground. An image without boxes gives ``fg = 0`` and ``bg = 1 / (H * W)``.

    Uses the exact geometry of the module docstring. FGD's official code instead scales boxes by the *un-padded* image
    size and includes one extra row and column (``hmax + 1``, ``wmax + 1`` with ``hmax = ceil(y2 / s)``); it also
    indexes its mask as ``[x, y]`` rather than ``[y, x]``. Neither is reproduced here.

    Args:
        boxes: One ``(K_i, 4)`` tensor of ``xyxy`` pixel boxes per image (``K_i`` may be 0).
        feat_hw: Feature map size ``(H, W)``.
        image_hw: Padded canvas size ``(H_img, W_img)`` in pixels.

    Returns:
        ``(fg, bg)``, each ``(N, H, W)`` float, detached.
    """
    padded, valid = _pad_boxes(boxes)
    fg = _rasterise(padded, valid, feat_hw, image_hw)
    is_bg = (fg == 0).to(fg.dtype)
    count = is_bg.sum(dim=(1, 2), keepdim=True)
    bg = is_bg / torch.where(count > 0, count, torch.ones_like(count))
    return fg.detach(), bg.detach()


def spatial_attention(feat: Tensor, temperature: float) -> Tensor:
    """Spatial attention ``A_S = H * W * softmax_{HW}(mean_C |F| / T)`` (Zhang & Ma, ICLR 2021; FGD Eq. 2).

    Args:
        feat: Feature map, shape (N, C, H, W).
        temperature: Softmax temperature ``T > 0``.

    Returns:
        (N, H, W); each image's map sums to ``H * W``. Not detached (gradients flow to ``feat``).
    """
    n, _, h, w = feat.shape
    pooled = feat.abs().mean(dim=1).reshape(n, h * w)
    return (h * w * torch.softmax(pooled / temperature, dim=1)).reshape(n, h, w)


def channel_attention(feat: Tensor, temperature: float) -> Tensor:
    """Channel attention ``A_C = C * softmax_C(mean_{HW} |F| / T)`` (Zhang & Ma, ICLR 2021; FGD Eq. 2).

    Args:
        feat: Feature map, shape (N, C, H, W).
        temperature: Softmax temperature ``T > 0``.

    Returns:
        (N, C); each row sums to ``C``. Not detached.
    """
    c = feat.shape[1]
    return c * torch.softmax(feat.abs().mean(dim=(2, 3)) / temperature, dim=1)


def attention_spread(feat: Tensor, temperature: float) -> tuple[float, float]:
    """How many locations and channels the attention maps of :func:`spatial_attention` / :func:`channel_attention`
    actually spread over: the perplexity ``exp(H(p))`` of each softmax (``H`` its entropy), averaged over the
    images. ``H * W`` (``C``) for a flat map, 1 for a one-hot one.

    The temperature of FGD and attention-guided distillation (``T = 0.5``) was set for ImageNet/COCO-trained FPN
    features, whose ``mean |F|`` is of order 1; the softmax sees ``mean |F| / T``, so features ten times larger make
    the same ``T`` ten times colder and the maps nearly one-hot (the loss then imitates about one cell and one channel
    per image).

    Args:
        feat: Feature map, shape (N, C, H, W).
        temperature: Softmax temperature ``T > 0``.

    Returns:
        ``(spatial cells, channels)``, between 1 and ``H * W`` (``C``).
    """

    def perplexity(logits: Tensor) -> float:
        logp = torch.log_softmax(logits.double() / temperature, dim=1)
        return float(torch.exp(-(logp.exp() * logp).sum(dim=1)).mean())

    pooled = feat.detach().abs()
    return perplexity(pooled.mean(dim=1).flatten(1)), perplexity(pooled.mean(dim=(2, 3)))


def flat_attention_temperature(feat: Tensor, temperature: float, share: float = 0.9) -> float:
    """The smallest temperature (from ``temperature`` up, within 1 %) at which both attention maps of ``feat``
    spread over at least ``share`` of their cells and channels (:func:`attention_spread`). Bisection in log space;
    the perplexity grows with the temperature."""

    def flat(t: float) -> bool:
        cells, channels = attention_spread(feat, t)
        return cells >= share * feat.shape[2] * feat.shape[3] and channels >= share * feat.shape[1]

    low, high = float(temperature), float(temperature)
    if flat(low):
        return low
    while not flat(high):
        low, high = high, high * 4
        if high > 1e8:  # a constant map is flat at any T; this only guards against a degenerate input
            return high
    while high / low > 1.01:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if flat(mid) else (mid, high)
    return high


def retinanet_anchor_sizes(stride: float) -> tuple[float, ...]:
    """RetinaNet's anchor sizes for one level: ``4 * stride * 2^(k/3)``, ``k = 0, 1, 2`` (Lin et al., ICCV 2017)."""
    return tuple(4.0 * stride * 2.0 ** (k / 3.0) for k in range(3))


def grid_anchors(
    feat_hw: tuple[int, int],
    image_hw: tuple[int, int],
    sizes: Sequence[float],
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    device: Optional[torch.device] = None,
) -> Tensor:
    """Anchors centred on every cell centre: ``(H, W, A, 4)`` ``xyxy`` pixels, ``A = len(sizes) * len(ratios)``.

    Used as pseudo-anchors for masks that need anchors (FGFI) when the detector is anchor-free. Unlike torchvision's
    ``AnchorGenerator`` (anchors centred on the cell's top-left corner ``(j * s_x, i * s_y)``), these are centred on
    ``((j + 0.5) * s_x, (i + 0.5) * s_y)``. For an aspect ratio ``r = h / w``: ``h = size * sqrt(r)`` and
    ``w = size / sqrt(r)``.
    """
    h, w = feat_hw
    s_y, s_x = image_hw[0] / h, image_hw[1] / w
    size_t = torch.tensor(list(sizes), dtype=torch.float32, device=device)
    ratio_t = torch.tensor(list(aspect_ratios), dtype=torch.float32, device=device).sqrt()
    half_h = (size_t[None, :] * ratio_t[:, None]).reshape(-1) / 2  # (A,)
    half_w = (size_t[None, :] / ratio_t[:, None]).reshape(-1) / 2
    cy = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * s_y
    cx = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * s_x
    cy, cx = cy[:, None, None], cx[None, :, None]
    return torch.stack(torch.broadcast_tensors(cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def fgfi_mask(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    psi: float = 0.5,
    max_iou: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """FGFI fine-grained imitation mask (Wang et al., CVPR 2019, "Distilling Object Detectors with Fine-grained
    Feature Imitation", Sec. 3.1).

    For every GT box ``b`` of image ``n``: ``m_nb = max IoU(b, anchor)``; the box selects the locations where *some*
    anchor has ``IoU(b, anchor) > psi * m_nb``; the mask is the union over boxes. A box overlapping no anchor selects
    nothing. ``psi = 0.5`` is the paper's value.

    The paper takes ``m_nb`` over the anchors of *all* FPN levels; this function sees one level, so by default it uses
    that level's maximum (more locations on levels that fit the box badly). Pass ``max_iou`` (e.g. the element-wise
    max of each level's per-box maxima) to reproduce the paper exactly.

    Args:
        anchors: Anchors of one level, ``(H, W, A, 4)`` ``xyxy`` pixels, the same for every image.
        gt_boxes: One ``(K_n, 4)`` ``xyxy`` tensor per image.
        psi: Relative IoU threshold in ``(0, 1)``.
        max_iou: Optional per-image ``(K_n,)`` maximum IoU of each box over all levels' anchors.

    Returns:
        (N, H, W) float mask with values in {0, 1}, detached.
    """
    h, w, a, _ = anchors.shape
    padded, valid = _pad_boxes(gt_boxes, device=anchors.device)
    n, k = valid.shape
    if k == 0:
        return anchors.new_zeros(n, h, w)
    iou = box_iou(padded.reshape(-1, 4).to(anchors.dtype), anchors.reshape(-1, 4)).reshape(n, k, h, w, a)
    if max_iou is None:
        best = iou.reshape(n, k, -1).amax(dim=2)
    else:
        best = pad_sequence([m.to(device=anchors.device, dtype=iou.dtype).reshape(-1) for m in max_iou], True)
        if best.shape != (n, k):
            raise ValueError(f"max_iou must hold one (K_n,) tensor per image matching gt_boxes; got {best.shape}")
    selected = (iou > psi * best[..., None, None, None]).any(dim=-1) & valid[..., None, None]  # (N, K, H, W)
    return selected.any(dim=1).to(anchors.dtype).detach()


def _keep_top_k_per_image(
    boxes: Tensor, scores: Tensor, image_idx: Tensor, num_images: int, top_k: int, nms_iou: float
) -> tuple[Tensor, Tensor]:
    """NMS per image (``batched_nms`` grouped by image), then the ``top_k`` best per image, padded.

    Returns ``(padded (N, top_k, 4), valid (N, top_k))``.
    """
    padded = boxes.new_zeros(num_images, top_k, 4)
    valid = torch.zeros(num_images, top_k, dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] == 0 or top_k <= 0:
        return padded, valid
    keep = batched_nms(boxes, scores, image_idx, nms_iou)  # sorted by decreasing score
    img = image_idx[keep]
    onehot = torch.nn.functional.one_hot(img, num_images)
    rank = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1  # rank of each kept box within its image
    take = rank < top_k
    padded[img[take], rank[take]] = boxes[keep][take]
    valid[img[take], rank[take]] = True
    return padded, valid


@torch.no_grad()
def difference_mask(
    t_cls_logits: Tensor,
    s_cls_logits: Tensor,
    image_hw: tuple[int, int],
    anchors: Optional[Tensor] = None,
    top_k: int = 10,
    nms_iou: float = 0.3,
    window: int = 5,
    score_thr: float = 0.0,
    pre_nms_top_n: int = 1000,
) -> Tensor:
    """Teacher-student difference mask after GID's general-instance selection (Dai et al., CVPR 2021, "General
    Instance Distillation for Object Detection", Sec. 3.1).

    1. Score of every location: ``max over anchors a and classes c of |sigmoid(t_acij) - sigmoid(s_acij)|``.
    2. One candidate box per location: with ``anchors``, the anchor with the largest score at that location;
       otherwise a ``window x window``-cell square centred on the cell (``window = 5`` covers about RetinaNet's
       base anchor of ``4 * stride``). GID uses the detectors' predicted boxes; this is the feature-level analogue.
    3. Per image: the ``pre_nms_top_n`` best locations with ``score > score_thr``, NMS at ``nms_iou`` (GID: 0.3),
       the ``top_k`` best survivors (GID: K = 10 per image; here per level).
    4. Rasterised like the foreground of :func:`box_masks`: each kept region puts ``1 / (its cells)`` on its cells,
       max where regions overlap. Weights are uniform per region rather than the score: every selected instance
       counts equally (as GID averages its per-instance losses over K), the mask does not shrink as the student
       catches up, and disagreement is not counted twice (the feature loss already measures it). Each region sums
       to 1, so ``sum(mask * err) / sum(mask)`` is the mean over regions of the region-mean error.

    Identical logits give an all-zero mask. Computed under ``no_grad``; the result is detached.

    Args:
        t_cls_logits: Teacher classification logits of one level, (N, A*K, H, W).
        s_cls_logits: Student logits, same shape.
        image_hw: Padded canvas ``(H_img, W_img)`` in pixels.
        anchors: Optional (H, W, A, 4) ``xyxy`` anchors of this level (``A`` must divide ``A*K``).
        top_k: Regions kept per image.
        nms_iou: NMS IoU threshold.
        window: Side of the fallback square candidate box, in cells.
        score_thr: Only locations with ``score > score_thr`` are candidates.
        pre_nms_top_n: Candidates per image entering NMS.

    Returns:
        (N, H, W) float mask, detached.
    """
    if t_cls_logits.shape != s_cls_logits.shape:
        raise ValueError(
            f"difference_mask needs teacher and student logits of the same shape (same anchors and classes), got "
            f"{tuple(t_cls_logits.shape)} and {tuple(s_cls_logits.shape)}"
        )
    n, ak, h, w = t_cls_logits.shape
    diff = (t_cls_logits.detach().float().sigmoid() - s_cls_logits.detach().float().sigmoid()).abs()
    s_y, s_x = image_hw[0] / h, image_hw[1] / w
    if anchors is not None:
        a = anchors.shape[2]
        if anchors.shape[:2] != (h, w) or ak % a != 0:
            raise ValueError(f"anchors of shape {tuple(anchors.shape)} do not fit logits of shape {(n, ak, h, w)}")
        per_anchor = diff.reshape(n, a, ak // a, h, w).amax(dim=2)  # (N, A, H, W)
        score, best = per_anchor.max(dim=1)  # (N, H, W)
        rows = torch.arange(h, device=diff.device)[:, None]
        cols = torch.arange(w, device=diff.device)[None, :]
        cand = anchors.to(diff.dtype).permute(2, 0, 1, 3)[best, rows, cols]  # (N, H, W, 4)
    else:
        score = diff.amax(dim=1)
        half = window / 2.0
        cy = (torch.arange(h, device=diff.device, dtype=diff.dtype) + 0.5)[:, None].expand(h, w)
        cx = (torch.arange(w, device=diff.device, dtype=diff.dtype) + 0.5)[None, :].expand(h, w)
        cand = torch.stack([(cx - half) * s_x, (cy - half) * s_y, (cx + half) * s_x, (cy + half) * s_y], dim=-1)
        cand = cand.expand(n, h, w, 4)
    score, cand = score.reshape(n, h * w), cand.reshape(n, h * w, 4)
    top_scores, idx = score.topk(min(pre_nms_top_n, h * w), dim=1)
    top_boxes = cand.gather(1, idx[..., None].expand(-1, -1, 4))
    image_idx = torch.arange(n, device=diff.device)[:, None].expand_as(top_scores)
    ok = top_scores > score_thr
    padded, valid = _keep_top_k_per_image(top_boxes[ok], top_scores[ok], image_idx[ok], n, top_k, nms_iou)
    return _rasterise(padded, valid, (h, w), image_hw).to(t_cls_logits.dtype).detach()


@torch.no_grad()
def feature_difference_mask(t_feat: Tensor, s_feat: Tensor, top_k_ratio: float = 0.1) -> Tensor:
    """Difference mask for detectors without a dense classification head (e.g. a Faster R-CNN student).

    Per-location distance ``d_nij = mean_c (t_ncij - s_ncij)^2``; per image the ``ceil(top_k_ratio * H * W)``
    locations with the largest ``d`` (and ``d > 0``) are kept, each with weight ``1 / (locations kept)`` so the mask
    of an image sums to 1 (0 when teacher and student agree everywhere). A detkd choice in GID's spirit (distil where
    teacher and student disagree most); ``top_k_ratio = 0.1`` is not from a paper.

    Args:
        t_feat: Teacher feature, (N, C, H, W).
        s_feat: Student feature (adapted to the teacher's channels), (N, C, H, W).
        top_k_ratio: Fraction of locations kept per image, in ``(0, 1]``.

    Returns:
        (N, H, W) float mask, detached.
    """
    if not 0.0 < top_k_ratio <= 1.0:
        raise ValueError(f"top_k_ratio must be in (0, 1], got {top_k_ratio}")
    n, _, h, w = t_feat.shape
    dist = (t_feat.detach() - s_feat.detach()).pow(2).mean(dim=1).reshape(n, h * w)
    k = max(1, math.ceil(top_k_ratio * h * w))
    _, idx = dist.topk(k, dim=1)
    keep = torch.zeros_like(dist, dtype=torch.bool).scatter_(1, idx, True) & (dist > 0)
    keep = keep.to(dist.dtype)
    count = keep.sum(dim=1, keepdim=True)
    return (keep / torch.where(count > 0, count, torch.ones_like(count))).reshape(n, h, w).detach()
