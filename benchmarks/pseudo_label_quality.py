"""What the pseudo labels of a recipe add to the ground truth: how many boxes, and whether any of them is an object.

``pseudo_label`` (mode ``merge``) adds to an image's targets every confident teacher detection that no GT box covers
(IoU < ``merge_iou`` with all of them). That helps where the ground truth misses objects (semi-supervised
detection, sparse labels). This script measures, on training batches (train split, seed 0, the recipe's own
augmentation; never val), what the added boxes are:

- per image: GT boxes, teacher detections kept by the recipe's filter (score, NMS, cap), boxes added by the merge;
- the teacher's recall of the GT (a kept detection of the same class with IoU >= 0.5) and the precision of its kept
  detections;
- each added box by its best IoU with any GT box: ``0`` (on no object: background or clutter), ``(0, 0.3)``,
  ``[0.3, merge_iou)`` (a second, misplaced box on an object the GT already has), and whether its class equals that
  GT box's.

On data whose every object is labelled (detkd's synthetic sets), an added box is by construction a box on no
unlabelled object, so every one of them is a false positive the student is trained to fire on.

    python benchmarks/pseudo_label_quality.py --teacher checkpoints/bench/v2_teacher/last_weights.pth pseudo_label
    python benchmarks/pseudo_label_quality.py --teacher T pseudo_label --batches 50 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_common import batches_of, build_probe, probe_main, shown  # noqa: E402

IOU_BINS = ("0", "(0,0.3)", "[0.3,merge)")


def added_box_bin(best_iou: float) -> str:
    """The :data:`IOU_BINS` name of an added pseudo box whose best IoU with any GT box is ``best_iou``."""
    if best_iou <= 0.0:
        return "0"
    return "(0,0.3)" if best_iou < 0.3 else "[0.3,merge)"


def image_stats(gt: dict[str, Any], kept: dict[str, Any], merge_iou: float) -> dict[str, Any]:
    """Counts for one image: GT boxes, kept teacher detections, the ones of them that match a GT box of their class
    at IoU >= 0.5 (true positives, greedy by score, each GT once), GT boxes found, and the added boxes by IoU bin and
    class agreement with their best-overlapping GT box."""
    import torch
    from torchvision.ops import box_iou

    gt_boxes, gt_labels = gt["boxes"].reshape(-1, 4).float(), gt["labels"].reshape(-1)
    boxes, labels = kept["boxes"].reshape(-1, 4).float(), kept["labels"].reshape(-1)
    out: dict[str, Any] = {"gt": int(gt_boxes.shape[0]), "kept": int(boxes.shape[0]), "tp": 0, "added": 0}
    out.update({f"added_iou_{b}": 0 for b in IOU_BINS})
    out["added_same_class"] = 0
    if boxes.shape[0] == 0:
        return out
    if gt_boxes.shape[0] == 0:
        out["added"] = out["added_iou_0"] = int(boxes.shape[0])
        return out
    iou = box_iou(boxes, gt_boxes)  # (K, N); kept detections are sorted by decreasing score
    same = labels[:, None] == gt_labels[None, :]
    taken = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
    for k in range(boxes.shape[0]):
        candidates = torch.where(same[k] & ~taken & (iou[k] >= 0.5), iou[k], torch.full_like(iou[k], -1.0))
        j = int(candidates.argmax())
        if candidates[j] >= 0.5:
            taken[j] = True
            out["tp"] += 1
    best_iou, best_gt = iou.max(dim=1)
    added = best_iou < merge_iou
    out["added"] = int(added.sum())
    for value, gt_index, label in zip(best_iou[added].tolist(), best_gt[added].tolist(), labels[added].tolist()):
        out[f"added_iou_{added_box_bin(value)}"] += 1
        if value > 0 and label == int(gt_labels[gt_index]):
            out["added_same_class"] += 1
    return out


def summarize(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and rates over images: per-image means, the teacher's recall and precision, the added boxes' bins."""
    n = max(len(per_image), 1)
    total = {k: sum(s[k] for s in per_image) for k in per_image[0]} if per_image else {}
    added = max(total.get("added", 0), 1)
    return {
        "images": len(per_image),
        "gt_per_image": total.get("gt", 0) / n,
        "kept_per_image": total.get("kept", 0) / n,
        "added_per_image": total.get("added", 0) / n,
        "images_with_added": sum(1 for s in per_image if s["added"]) / n,
        "teacher_recall": total.get("tp", 0) / max(total.get("gt", 0), 1),
        "teacher_precision": total.get("tp", 0) / max(total.get("kept", 0), 1),
        "added_share_by_best_iou": {b: total.get(f"added_iou_{b}", 0) / added for b in IOU_BINS},
        "added_same_class_share": total.get("added_same_class", 0) / added,
    }


def measure(recipe: Path, teacher_ckpt: str, batches: int) -> dict[str, Any]:
    import torch

    from detkd.losses.head import PseudoLabelDistill
    from detkd.pseudo_labels import filter_detections

    cfg, train_set, distiller = build_probe(recipe, teacher_ckpt)
    losses = [m for m in distiller.modules() if isinstance(m, PseudoLabelDistill)]
    if not losses:
        raise SystemExit(f"{recipe}: the recipe has no pseudo_label head loss")
    pl = losses[0]
    per_image = []
    with torch.no_grad():
        for images, targets in batches_of(train_set, cfg.data.batch_size, batches):
            detections, _ = distiller._teacher_detections(images)
            kept = filter_detections(detections, pl.score_thr, pl.class_score_thr, pl.nms_iou, pl.max_dets)
            per_image += [image_stats(t, d, pl.merge_iou) for t, d in zip(targets, kept)]
    params = {"mode": pl.mode, "score_thr": pl.score_thr, "nms_iou": pl.nms_iou, "merge_iou": pl.merge_iou}
    return {"recipe": shown(recipe), "split": "train", "batches": batches, "pseudo_label": params,
            **summarize(per_image)}  # fmt: skip


def report(r: dict[str, Any]) -> None:
    bins = ", ".join(f"IoU {b}: {v:.0%}" for b, v in r["added_share_by_best_iou"].items())
    teacher = f"recall {r['teacher_recall']:.1%}, precision {r['teacher_precision']:.1%}"
    print(
        f"{r['recipe']}  [{r['images']} train images]  GT {r['gt_per_image']:.2f}/image, teacher keeps "
        f"{r['kept_per_image']:.2f} ({teacher}), merge adds {r['added_per_image']:.2f}/image on "
        f"{r['images_with_added']:.0%} of the images; added boxes by best IoU with a GT box: {bins}; "
        f"same class as that box: {r['added_same_class_share']:.0%}"
    )


if __name__ == "__main__":
    probe_main(__doc__, measure, report, default_batches=25, what="pseudo_label")
