"""Head distillation: pseudo labels, dense-head logit/box KD, and ROI-level KD for Faster R-CNN.

Each head loss is an ``nn.Module`` called once per step with the :class:`detkd.distiller.DistillStep` (the
student's recorded outputs, the teacher's features/head outputs on the same padded batch, the resized targets).
``attach(distiller)`` runs when the Distiller is built and raises a ValueError for a teacher/student pair the loss
cannot serve, so a mismatch fails at start-up, not at step 10,000.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from detkd.losses.logit_functional import alpha_divergence_loss, dkd_loss, kd_loss, sigmoid_kd_loss
from detkd.pseudo_labels import PSEUDO_LABEL_MODES, make_pseudo_targets

DENSE = ("retinanet", "fcos")


class PseudoLabelDistill(nn.Module):
    """Teacher detections as targets for the student's own detection loss (seeds: "T outputs pseudo labels and S
    learns from them, like semi-supervised detection"; e.g. Unbiased Teacher, Liu et al., ICLR 2021).

    The teacher's post-processed detections are filtered (``score_thr``, per-class ``class_score_thr`` keyed by
    the dataset's category id, class-wise NMS at ``nms_iou``, ``max_dets``) and then:

    - ``merge``: added to the ground truth where no GT box overlaps them with IoU >= ``merge_iou``;
    - ``separate``: a second term of the student's detection loss against the pseudo targets only, weighted by the
      recipe's ``weight`` (logged as ``distill/pseudo_label/<task loss>``);
    - ``replace``: the pseudo targets only.

    Images from ``data.unlabeled`` (targets marked ``unlabeled``) always train on the pseudo targets alone.
    Works for every student family, and for any teacher (heterogeneous pairs included).
    """

    is_pseudo_labeler = True

    def __init__(
        self,
        mode: str = "merge",
        score_thr: float = 0.5,
        class_score_thr: Optional[dict[int, float]] = None,
        nms_iou: float = 0.5,
        max_dets: int = 100,
        merge_iou: float = 0.5,
    ) -> None:
        super().__init__()
        if mode not in PSEUDO_LABEL_MODES:
            raise ValueError(f"pseudo_label mode '{mode}' is unknown; valid: {', '.join(PSEUDO_LABEL_MODES)}.")
        self.mode = mode
        self.score_thr = score_thr
        self.class_score_thr_by_cat = dict(class_score_thr or {})
        self.class_score_thr: Optional[dict[int, float]] = None
        self.nms_iou = nms_iou
        self.max_dets = max_dets
        self.merge_iou = merge_iou
        self.separate_weight = 1.0

    def set_category_map(self, cat_id_to_label: dict[int, int]) -> None:
        """Map the per-class thresholds from category ids (what users know) to detkd's contiguous labels."""
        unknown = [c for c in self.class_score_thr_by_cat if c not in cat_id_to_label]
        if unknown:
            raise ValueError(
                f"pseudo_label class_score_thr names category ids {unknown} that the dataset does not have; "
                f"valid ids: {sorted(cat_id_to_label)}."
            )
        self.class_score_thr = {cat_id_to_label[c]: t for c, t in self.class_score_thr_by_cat.items()} or None

    def _pseudo(self, detections: list[dict[str, Tensor]], targets: list[dict[str, Any]], mode: str):
        return make_pseudo_targets(
            targets,
            detections,
            mode,
            score_thr=self.score_thr,
            class_score_thr=self.class_score_thr,
            nms_iou=self.nms_iou,
            max_dets=self.max_dets,
            merge_iou_thr=self.merge_iou,
        )

    @torch.no_grad()
    def forward(self, detections: list[dict[str, Tensor]], targets: list[dict[str, Any]]):
        """Returns ``(targets for the student's task loss, targets for a separate term or None)``."""
        pseudo_only = self._pseudo(detections, targets, "replace")
        unlabeled = [bool(t.get("unlabeled", False)) for t in targets]
        if self.mode == "replace":
            return pseudo_only, None
        if self.mode == "merge":
            merged = self._pseudo(detections, targets, "merge")
            return [p if u else m for p, m, u in zip(pseudo_only, merged, unlabeled)], None
        # separate: labelled images keep their GT in the task loss; the pseudo targets form a second term
        main = [p if u else t for p, t, u in zip(pseudo_only, targets, unlabeled)]
        return main, pseudo_only


def _flat_mask(step, kind: str, temperature: float, num_anchors: int) -> Optional[Tensor]:
    """A per-position weight (N, P) for the dense head, from a per-level mask (N, H, W) repeated over anchors."""
    if kind == "none":
        return None
    parts = []
    for level in step.head_levels:
        ctx = step.level_context(level, None)
        if kind == "fg":
            fg, _ = ctx.box_masks()
            mask = (fg > 0).float()
        elif kind == "fg_bg":
            fg, bg = ctx.box_masks()
            mask = fg + bg
        elif kind == "attention":
            mask = ctx.spatial_attention("t", temperature)
        elif kind == "difference":
            mask = ctx.difference()
        else:  # pragma: no cover - validated in the constructor
            raise ValueError(kind)
        n, h, w = mask.shape
        parts.append(mask.reshape(n, h, w, 1).expand(n, h, w, num_anchors).reshape(n, -1))
    return torch.cat(parts, dim=1).detach()


class DenseHeadKD(nn.Module):
    """Logit and box distillation at matched anchors/locations of RetinaNet or FCOS heads.

    Per position ``p`` (all levels, all anchors; torchvision's flat head order):

    - classification: ``sigmoid_kd_loss(s, t, T)`` = ``T^2 * sum_c KL_bin(sigmoid(t/T) || sigmoid(s/T))`` averaged
      over positions, optionally weighted by a mask (``fg``: inside GT boxes; ``fg_bg``: the box masks' fg + bg
      weights; ``attention``: the teacher's spatial attention; ``difference``: the teacher-student disagreement
      mask), as in response-based KD for dense detectors (Hinton et al., 2015; e.g. Chen et al., NeurIPS 2017 for
      the detection adaptation);
    - box: where the teacher is confident (``max_c sigmoid(t) >= conf_thr``), the student's decoded box regresses to
      the teacher's decoded box with GIoU (default) or L1 (each coordinate divided by the anchor's width/height),
      averaged over those positions, times ``box_weight``;
    - FCOS centerness: BCE of the student's centerness logit to ``sigmoid`` of the teacher's at confident
      positions, times ``ctrness_weight``.

    Requires both detectors to be dense heads of the same family with identical anchors per location and levels:
    checked by :meth:`attach` (heterogeneous heads use ``pseudo_label``).
    """

    needs_teacher_head = True

    def __init__(
        self,
        temperature: float = 1.0,
        mask: str = "none",
        mask_temperature: float = 0.5,
        box_loss: str = "giou",
        box_weight: float = 1.0,
        conf_thr: float = 0.5,
        ctrness_weight: float = 1.0,
    ) -> None:
        super().__init__()
        valid_masks = ("none", "fg", "fg_bg", "attention", "difference")
        if mask not in valid_masks:
            raise ValueError(f"logit_kd mask '{mask}' is unknown; valid: {', '.join(valid_masks)}.")
        if box_loss not in ("giou", "l1"):
            raise ValueError(f"logit_kd box_loss '{box_loss}' is unknown; valid: giou, l1.")
        self.temperature = temperature
        self.mask = mask
        self.mask_temperature = mask_temperature
        self.box_loss = box_loss
        self.box_weight = box_weight
        self.conf_thr = conf_thr
        self.ctrness_weight = ctrness_weight

    def attach(self, distiller) -> None:
        t_fam, s_fam = distiller.teacher_family, distiller.student_family
        if t_fam not in DENSE or s_fam not in DENSE or t_fam != s_fam:
            raise ValueError(
                f"logit_kd distils dense-head logits at matched positions and needs a RetinaNet->RetinaNet or "
                f"FCOS->FCOS pair; this recipe pairs a {t_fam} teacher with a {s_fam} student, whose heads do not "
                f"line up. Use pseudo_label for heterogeneous pairs."
            )
        t_anchors = _anchors_per_location(distiller.teacher)
        s_anchors = _anchors_per_location(distiller.student)
        if t_anchors != s_anchors or sorted(distiller.t_strides) != sorted(distiller.s_strides):
            raise ValueError(
                f"logit_kd needs the same anchors per location and levels in teacher and student: teacher "
                f"{t_anchors} anchors on {sorted(distiller.t_strides)}, student {s_anchors} anchors on "
                f"{sorted(distiller.s_strides)}. Build both with the same anchor_sizes, or use pseudo_label."
            )

    def forward(self, step) -> dict[str, Tensor]:
        s_cls, t_cls = step.s_head["cls_logits"], step.t_head["cls_logits"]
        if s_cls.shape != t_cls.shape:
            raise RuntimeError(f"logit_kd: student logits {tuple(s_cls.shape)} vs teacher {tuple(t_cls.shape)}")
        n, p, k = s_cls.shape
        weight = _flat_mask(step, self.mask, self.mask_temperature, p // step.head_positions)
        losses = {
            "cls": sigmoid_kd_loss(
                s_cls.reshape(n * p, k),
                t_cls.reshape(n * p, k),
                self.temperature,
                weight=None if weight is None else weight.reshape(-1),
            )
        }
        confident = t_cls.detach().sigmoid().amax(dim=2) >= self.conf_thr  # (N, P)
        if self.box_weight > 0:
            losses["box"] = self.box_weight * self._box_loss(step, confident)
        if self.ctrness_weight > 0 and "bbox_ctrness" in step.s_head:
            s_ctr = step.s_head["bbox_ctrness"].reshape(n, p)
            t_ctr = step.t_head["bbox_ctrness"].reshape(n, p).sigmoid()
            if confident.any():
                losses["ctrness"] = self.ctrness_weight * F.binary_cross_entropy_with_logits(
                    s_ctr[confident], t_ctr[confident]
                )
            else:
                losses["ctrness"] = s_ctr.sum() * 0.0
        return losses

    def _box_loss(self, step, confident: Tensor) -> Tensor:
        s_reg, t_reg = step.s_head["bbox_regression"], step.t_head["bbox_regression"]
        if not confident.any():
            return s_reg.sum() * 0.0
        anchors = torch.stack(step.anchors())  # (N, P, 4)
        s_boxes = _decode(step.student, s_reg[confident], anchors[confident])
        t_boxes = _decode(step.teacher, t_reg[confident].detach(), anchors[confident])
        if self.box_loss == "giou":
            return generalized_box_iou_loss(s_boxes, t_boxes, reduction="mean")
        size = (anchors[confident][:, 2:] - anchors[confident][:, :2]).repeat(1, 2).clamp(min=1.0)
        return (torch.abs(s_boxes - t_boxes) / size).sum(dim=1).mean()


def _anchors_per_location(detector: nn.Module) -> list[int]:
    return list(detector.anchor_generator.num_anchors_per_location())


def _decode(detector: nn.Module, rel_codes: Tensor, anchors: Tensor) -> Tensor:
    coder = detector.box_coder
    if hasattr(coder, "decode_single"):  # RetinaNet's BoxCoder
        return coder.decode_single(rel_codes, anchors)
    return coder.decode(rel_codes, anchors)  # FCOS's BoxLinearCoder


class RoIHeadKD(nn.Module):
    """ROI-level KD for a Faster R-CNN pair: the teacher's box head scores exactly the student's sampled proposals.

    A forward pre-hook on the student's ``roi_heads.box_roi_pool`` records the proposals the student sampled this
    step and a hook on ``box_predictor`` its class logits and box deltas; the teacher's ``box_roi_pool`` ->
    ``box_head`` -> ``box_predictor`` then run on the same proposals over the teacher's features of the same padded
    batch. Losses:

    - ``cls``: ``kd_loss(s, t, T)`` (Hinton), ``dkd_loss`` (Zhao et al., CVPR 2022; targets are the labels the
      student's proposal matcher assigns), or ``alpha_divergence_loss`` (AlphaNet, ICML 2021), chosen by ``loss``;
    - ``box``: smooth-L1 (beta 1/9, as torchvision's ROI head) between the class-specific box deltas of student and
      teacher on foreground proposals (for the proposal's assigned class), times ``box_weight``;
    - ``rpn`` (``rpn_weight`` > 0): sigmoid KD of the RPN objectness logits at every anchor.
    """

    needs_teacher_head = False

    def __init__(
        self,
        loss: str = "kd",
        temperature: float = 1.0,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        box_weight: float = 1.0,
        rpn_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if loss not in ("kd", "dkd", "alpha"):
            raise ValueError(f"roi_kd loss '{loss}' is unknown; valid: kd, dkd, alpha.")
        self.loss = loss
        self.temperature = temperature
        self.dkd_alpha = dkd_alpha
        self.dkd_beta = dkd_beta
        self.box_weight = box_weight
        self.rpn_weight = rpn_weight
        self._record: dict[str, Any] = {}
        self._handles: list = []

    def attach(self, distiller) -> None:
        if distiller.teacher_family != "faster_rcnn" or distiller.student_family != "faster_rcnn":
            raise ValueError(
                f"roi_kd needs a Faster R-CNN teacher and student (it runs the teacher's ROI head on the student's "
                f"proposals); this recipe pairs a {distiller.teacher_family} teacher with a "
                f"{distiller.student_family} student. Use pseudo_label for heterogeneous pairs."
            )
        roi = distiller.student.roi_heads
        self._handles = [
            roi.box_roi_pool.register_forward_pre_hook(self._record_proposals),
            roi.box_predictor.register_forward_hook(self._record_predictions),
        ]
        if self.rpn_weight > 0:
            self._handles.append(distiller.student.rpn.head.register_forward_hook(self._record_rpn))

    def _record_proposals(self, module, args) -> None:
        features, proposals, image_shapes = args
        self._record["proposals"] = [p.detach() for p in proposals]
        self._record["image_shapes"] = image_shapes

    def _record_predictions(self, module, args, output) -> None:
        self._record["class_logits"], self._record["box_regression"] = output

    def _record_rpn(self, module, args, output) -> None:
        self._record["objectness"] = output[0]

    def forward(self, step) -> dict[str, Tensor]:
        rec = self._record
        proposals, s_logits, s_deltas = rec["proposals"], rec["class_logits"], rec["box_regression"]
        t_roi = step.teacher.roi_heads
        with torch.no_grad():
            pooled = t_roi.box_roi_pool(step.t_backbone_out, proposals, rec["image_shapes"])
            t_logits, t_deltas = t_roi.box_predictor(t_roi.box_head(pooled))
        s_roi = step.student.roi_heads
        gt_boxes = [t["boxes"] for t in step.targets]
        gt_labels = [t["labels"] for t in step.targets]
        _, labels = s_roi.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        labels = torch.cat(labels)
        if self.loss == "kd":
            cls = kd_loss(s_logits, t_logits, self.temperature)
        elif self.loss == "dkd":
            cls = dkd_loss(s_logits, t_logits, labels, self.dkd_alpha, self.dkd_beta, self.temperature)
        else:
            cls = alpha_divergence_loss(s_logits, t_logits)
        losses = {"cls": cls}
        if self.box_weight > 0:
            fg = torch.where(labels > 0)[0]
            n_cls = s_logits.shape[1]
            s_d = s_deltas.reshape(-1, n_cls, 4)[fg, labels[fg]]
            t_d = t_deltas.reshape(-1, n_cls, 4)[fg, labels[fg]]
            box = F.smooth_l1_loss(s_d, t_d, beta=1 / 9, reduction="sum") / max(labels.numel(), 1)
            losses["box"] = self.box_weight * box
        if self.rpn_weight > 0:
            with torch.no_grad():
                t_obj, _ = step.teacher.rpn.head(list(step.t_backbone_out.values()))
            s_obj = torch.cat([o.flatten() for o in rec["objectness"]])
            t_obj = torch.cat([o.flatten() for o in t_obj])
            losses["rpn"] = self.rpn_weight * sigmoid_kd_loss(s_obj[:, None], t_obj[:, None], self.temperature)
        rec.clear()
        return losses


HEAD_LOSSES: dict[str, type] = {
    "pseudo_label": PseudoLabelDistill,
    "logit_kd": DenseHeadKD,
    "roi_kd": RoIHeadKD,
}
