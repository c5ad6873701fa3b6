"""Head distillation: pseudo labels, dense-head logit/box KD, and ROI-level KD for Faster R-CNN.

Each head loss is a :class:`~detkd.losses.base.HeadLoss` called once per step with the step's
:class:`~detkd.losses.context.StepRecord` (the student's recorded outputs, the teacher's features / head outputs / ROI
predictions on the same padded batch, the resized targets); it declares in ``needs`` what the teacher must compute.
``check_pair`` runs when the Distiller is built and raises a ValueError for a teacher/student pair the loss cannot
serve, so a mismatch fails at start-up, not at step 10,000.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from detkd.losses.base import HeadLoss, PairInfo, require_matched_dense_heads
from detkd.losses.logit_functional import alpha_divergence_loss, dkd_loss, kd_loss, sigmoid_kd_loss
from detkd.pseudo_labels import PSEUDO_LABEL_MODES, make_pseudo_targets


class PseudoLabelDistill(HeadLoss):
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

    In ``merge`` mode it counts the boxes the merge adds to the labelled images (:attr:`added_per_image`, logged as
    ``pseudo_label/added_per_image``): near 0 means the teacher's confident detections are already in the ground
    truth, so the targets are the GT's and the loss cannot change anything (``tools/diagnose.py`` says so).
    """

    needs = frozenset({"teacher_dets"})
    makes_targets = True

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
        self.labelled_images = 0  # merge mode: labelled images seen, and the pseudo boxes the merge added to them
        self.boxes_added = 0

    @property
    def added_per_image(self) -> Optional[float]:
        """Merge mode: the mean number of pseudo boxes added to a labelled image's GT since this process started
        (None before any)."""
        return self.boxes_added / self.labelled_images if self.labelled_images else None

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
    def make_targets(self, detections: list[dict[str, Tensor]], targets: list[dict[str, Any]]):
        """Returns ``(targets for the student's task loss, targets for a separate term or None)``."""
        pseudo_only = self._pseudo(detections, targets, "replace")
        unlabeled = [bool(t.get("unlabeled", False)) for t in targets]
        if self.mode == "replace":
            return pseudo_only, None
        if self.mode == "merge":
            merged = self._pseudo(detections, targets, "merge")
            labelled = [(m, t) for m, t, u in zip(merged, targets, unlabeled) if not u]
            self.labelled_images += len(labelled)
            self.boxes_added += sum(m["boxes"].shape[0] - t["boxes"].reshape(-1, 4).shape[0] for m, t in labelled)
            return [p if u else m for p, m, u in zip(pseudo_only, merged, unlabeled)], None
        # separate: labelled images keep their GT in the task loss; the pseudo targets form a second term
        main = [p if u else t for p, t, u in zip(pseudo_only, targets, unlabeled)]
        return main, pseudo_only


def _flat_mask(record, kind: str, temperature: float, num_anchors: int) -> Optional[Tensor]:
    """A per-position weight (N, P) for the dense head, from a per-level mask (N, H, W) repeated over anchors."""
    if kind == "none":
        return None
    parts = []
    for level in record.head_levels:
        ctx = record.level_context(level, None)
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


class DenseHeadKD(HeadLoss):
    """Logit and box distillation at matched anchors/locations of RetinaNet or FCOS heads.

    Per position ``p`` (all levels, all anchors; torchvision's flat head order):

    - classification: ``sigmoid_kd_loss(s, t, T)`` = ``T^2 * sum_c KL_bin(sigmoid(t/T) || sigmoid(s/T))`` averaged
      over positions, optionally weighted by a mask (``fg``: inside GT boxes; ``fg_bg``: the box masks' fg + bg
      weights; ``attention``: the teacher's spatial attention; ``difference``: the teacher-student disagreement
      mask), as in response-based KD for dense detectors (Hinton et al., 2015; e.g. Chen et al., NeurIPS 2017 for
      the detection adaptation), times ``cls_weight`` (0 drops the term, e.g. to measure the box terms alone);
    - box: where the teacher is confident (``max_c sigmoid(t) >= conf_thr``), the student's decoded box regresses to
      the teacher's decoded box with GIoU (default) or L1 (each coordinate divided by the anchor's width/height),
      averaged over those positions, times ``box_weight``;
    - FCOS centerness: BCE of the student's centerness logit to ``sigmoid`` of the teacher's at confident
      positions, times ``ctrness_weight``.

    Requires both detectors to be dense heads of the same family with identical anchors per location and levels:
    checked by :meth:`check_pair` (heterogeneous heads use ``pseudo_label``).
    """

    needs = frozenset({"teacher_head"})

    def __init__(
        self,
        temperature: float = 1.0,
        mask: str = "none",
        mask_temperature: float = 0.5,
        box_loss: str = "giou",
        box_weight: float = 1.0,
        conf_thr: float = 0.5,
        ctrness_weight: float = 1.0,
        cls_weight: float = 1.0,
    ) -> None:
        super().__init__()
        valid_masks = ("none", "fg", "fg_bg", "attention", "difference")
        if mask not in valid_masks:
            raise ValueError(f"logit_kd mask '{mask}' is unknown; valid: {', '.join(valid_masks)}.")
        if box_loss not in ("giou", "l1"):
            raise ValueError(f"logit_kd box_loss '{box_loss}' is unknown; valid: giou, l1.")
        if min(cls_weight, box_weight, ctrness_weight) < 0 or max(cls_weight, box_weight, ctrness_weight) == 0:
            raise ValueError(
                f"logit_kd cls_weight / box_weight / ctrness_weight must be >= 0 and not all 0, got "
                f"{cls_weight} / {box_weight} / {ctrness_weight}."
            )
        self.temperature = temperature
        self.mask = mask
        self.mask_temperature = mask_temperature
        self.box_loss = box_loss
        self.box_weight = box_weight
        self.conf_thr = conf_thr
        self.ctrness_weight = ctrness_weight
        self.cls_weight = cls_weight

    def check_pair(self, pair: PairInfo) -> None:
        require_matched_dense_heads(pair, "logit_kd", "distils dense-head logits at matched positions", "pseudo_label")

    def forward(self, record) -> dict[str, Tensor]:
        s_head, t_head = record.student.head, record.teacher.head
        s_cls, t_cls = s_head["cls_logits"], t_head["cls_logits"]
        if s_cls.shape != t_cls.shape:
            raise RuntimeError(f"logit_kd: student logits {tuple(s_cls.shape)} vs teacher {tuple(t_cls.shape)}")
        n, p, k = s_cls.shape
        losses = {}
        if self.cls_weight > 0:  # the mask only weights this term: not built when it is dropped
            weight = _flat_mask(record, self.mask, self.mask_temperature, p // record.head_positions)
            losses["cls"] = self.cls_weight * sigmoid_kd_loss(
                s_cls.reshape(n * p, k),
                t_cls.reshape(n * p, k),
                self.temperature,
                weight=None if weight is None else weight.reshape(-1),
            )
        confident = t_cls.detach().sigmoid().amax(dim=2) >= self.conf_thr  # (N, P)
        if self.box_weight > 0:
            losses["box"] = self.box_weight * self._box_loss(record, confident)
        if self.ctrness_weight > 0 and "bbox_ctrness" in s_head:
            s_ctr = s_head["bbox_ctrness"].reshape(n, p)
            t_ctr = t_head["bbox_ctrness"].reshape(n, p).sigmoid()
            if confident.any():
                losses["ctrness"] = self.ctrness_weight * F.binary_cross_entropy_with_logits(
                    s_ctr[confident], t_ctr[confident]
                )
            else:
                losses["ctrness"] = s_ctr.sum() * 0.0
        return losses

    def _box_loss(self, record, confident: Tensor) -> Tensor:
        s_reg, t_reg = record.student.head["bbox_regression"], record.teacher.head["bbox_regression"]
        if not confident.any():
            return s_reg.sum() * 0.0
        anchors = torch.stack(record.anchors())  # (N, P, 4)
        s_boxes = record.decode_student(s_reg[confident], anchors[confident])
        t_boxes = record.decode_teacher(t_reg[confident].detach(), anchors[confident])
        if self.box_loss == "giou":
            return generalized_box_iou_loss(s_boxes, t_boxes, reduction="mean")
        size = (anchors[confident][:, 2:] - anchors[confident][:, :2]).repeat(1, 2).clamp(min=1.0)
        return (torch.abs(s_boxes - t_boxes) / size).sum(dim=1).mean()


ROI_KD_MAX_ROIS = 128
"""Default ``max_rois`` of roi_kd (see :class:`RoIHeadKD`)."""


class RoIHeadKD(HeadLoss):
    """ROI-level KD for a Faster R-CNN pair: the teacher's box head scores exactly the student's sampled proposals.

    The step's record holds the proposals the student sampled in its (first) pass and their class logits and box
    deltas; the Distiller runs the teacher's ``box_roi_pool`` -> ``box_head`` -> ``box_predictor`` on the same
    proposals over the teacher's features of the same padded batch (``needs``: ``teacher_rois``; ``teacher_rpn``
    with ``rpn_weight``). Losses:

    - ``cls``: ``kd_loss(s, t, T)`` (Hinton), ``dkd_loss`` (Zhao et al., CVPR 2022; targets are the labels the
      student's proposal matcher assigns), or ``alpha_divergence_loss`` (AlphaNet, ICML 2021), chosen by ``loss``;
    - ``box``: smooth-L1 (beta 1/9, as torchvision's ROI head) between the class-specific box deltas of student and
      teacher on foreground proposals (for the proposal's assigned class), times ``box_weight``;
    - ``rpn`` (``rpn_weight`` > 0): sigmoid KD of the RPN objectness logits at every anchor.

    ``max_rois``: of the (by default 512) proposals the student samples per image, the teacher scores and the losses
    use at most this many, foreground first (then the most object-like background): the teacher's box head on all
    4,096 ROIs of a batch of 8 was 40 % of the step. ``null`` distils every sampled proposal.
    """

    def __init__(
        self,
        loss: str = "kd",
        temperature: float = 1.0,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        box_weight: float = 1.0,
        rpn_weight: float = 0.0,
        max_rois: Optional[int] = ROI_KD_MAX_ROIS,
    ) -> None:
        super().__init__()
        if max_rois is not None and max_rois < 1:
            raise ValueError(f"roi_kd max_rois must be >= 1 or null (all), got {max_rois}")
        self.max_rois = max_rois
        if loss not in ("kd", "dkd", "alpha"):
            raise ValueError(f"roi_kd loss '{loss}' is unknown; valid: kd, dkd, alpha.")
        self.loss = loss
        self.temperature = temperature
        self.dkd_alpha = dkd_alpha
        self.dkd_beta = dkd_beta
        self.box_weight = box_weight
        self.rpn_weight = rpn_weight
        self.needs = frozenset({"teacher_rois"} | ({"teacher_rpn"} if rpn_weight > 0 else set()))

    def check_pair(self, pair: PairInfo) -> None:
        t_fam, s_fam = pair.teacher_family, pair.student_family
        if t_fam.head != "two_stage" or s_fam.head != "two_stage":
            raise ValueError(
                f"roi_kd needs a Faster R-CNN (two-stage) teacher and student (it runs the teacher's ROI head on the "
                f"student's proposals); this recipe pairs a {t_fam.name} teacher with a {s_fam.name} student. Use "
                f"pseudo_label for heterogeneous pairs."
            )

    def forward(self, record) -> dict[str, Tensor]:
        student, teacher = record.student, record.teacher
        s_logits, s_deltas = student.roi_logits, student.roi_deltas
        t_logits, t_deltas = teacher.roi_logits, teacher.roi_deltas
        labels = record.roi_labels()
        keep = student.roi_keep_flat()
        if keep is not None:  # the teacher scored only these (max_rois per image)
            s_logits, s_deltas, labels = s_logits[keep], s_deltas[keep], labels[keep]
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
            s_obj = torch.cat([o.flatten() for o in student.rpn_objectness])
            t_obj = torch.cat([o.flatten() for o in teacher.rpn_objectness])
            losses["rpn"] = self.rpn_weight * sigmoid_kd_loss(s_obj[:, None], t_obj[:, None], self.temperature)
        return losses


from detkd.losses.cross_kd import CrossKDLoss  # noqa: E402 - after the shared helpers above

HEAD_LOSSES: dict[str, type[HeadLoss]] = {
    "cross_kd": CrossKDLoss,
    "pseudo_label": PseudoLabelDistill,
    "logit_kd": DenseHeadKD,
    "roi_kd": RoIHeadKD,
}
