"""CrossKD: the student's features through the frozen teacher's head, mimicking the teacher's own predictions."""

from __future__ import annotations

import torch
from torch import Tensor

from detkd.losses.base import HeadLoss, PairInfo, require_matched_dense_heads
from detkd.losses.logit_functional import cross_kd_loss

__all__ = ["CrossKDLoss"]


class CrossKDLoss(HeadLoss):
    """Cross-head knowledge distillation for RetinaNet and FCOS (Wang et al., CVPR 2024, "CrossKD: Cross-Head
    Knowledge Distillation for Object Detection").

    The student's FPN features, each through a 1x1 adapter to the teacher's width (identity when the widths agree),
    run through the frozen teacher's dense head; these *cross-head* predictions ``x`` imitate the teacher's own
    predictions ``t`` on its own features (:func:`detkd.losses.logit_functional.cross_kd_loss`):

    - ``cls``: sigmoid KD ``mean_p T^2 sum_c KL_bin(sigmoid(t/T) || sigmoid(x/T))`` over every position
      (``cls_loss="qfl"``: the quality-focal KD of the authors' code instead);
    - ``box``: GIoU between the decoded cross-head and teacher boxes where the teacher is confident
      (``max_c sigmoid(t) >= conf_thr``), times ``box_weight``;
    - ``ctrness`` (FCOS): BCE of the cross-head centerness logit to the teacher's centerness there, times
      ``ctrness_weight``.

    Gradients reach the student and the adapters through the teacher's head; the teacher's parameters never get one
    (they do not require grad) and the student's own head only learns from the ground truth, which is CrossKD's
    point: no target conflicts with the annotations.

    Paper vs. code vs. here: the paper and the authors' code (``reused_teacher_head_idx=3`` for RetinaNet) feed the
    student head's *intermediate* features after 3 of its 4 convolutions into the teacher head's last layers; detkd
    feeds the student's FPN outputs into the whole teacher head (index 0), which torchvision's heads allow without a
    fork and which works across FPN widths through the adapters. The code's class term is the quality-focal KD
    (``KDQualityFocalLoss``, beta 1, weight 1) and its box term GIoU weight 1; the defaults here are sigmoid KD at
    ``T = 1``, GIoU weight 1 and ``conf_thr = 0.5`` (the box term of logit_kd), with ``cls_loss: qfl`` to follow
    the code.

    Args:
        temperature: ``T`` of the sigmoid-KD class term.
        cls_loss: ``"kd"`` (sigmoid KD) or ``"qfl"`` (quality-focal KD).
        beta: Focusing exponent of ``qfl``.
        conf_thr: Teacher score above which a position's box (and centerness) is distilled.
        box_weight: Weight of the box term.
        ctrness_weight: Weight of the FCOS centerness term.
    """

    needs = frozenset({"teacher_head", "cross_head"})

    def __init__(
        self,
        temperature: float = 1.0,
        cls_loss: str = "kd",
        beta: float = 1.0,
        conf_thr: float = 0.5,
        box_weight: float = 1.0,
        ctrness_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if cls_loss not in ("kd", "qfl"):
            raise ValueError(f"cross_kd cls_loss '{cls_loss}' is unknown; valid: kd, qfl.")
        if temperature <= 0:
            raise ValueError(f"cross_kd temperature must be > 0, got {temperature}")
        self.temperature, self.cls_loss, self.beta = temperature, cls_loss, beta
        self.conf_thr, self.box_weight, self.ctrness_weight = conf_thr, box_weight, ctrness_weight

    def check_pair(self, pair: PairInfo) -> None:
        purpose = "runs the student's features through the teacher's dense head"
        require_matched_dense_heads(pair, "cross_kd", purpose, "a feature loss or pseudo_label")

    def forward(self, record) -> dict[str, Tensor]:
        cross, teacher = record.cross_head, record.teacher.head
        x_cls, t_cls = cross["cls_logits"], teacher["cls_logits"]
        n, p, k = x_cls.shape
        t_conf = t_cls.detach().sigmoid().amax(dim=2).reshape(-1)  # (N * P,)
        confident = t_conf >= self.conf_thr
        anchors = torch.stack(record.anchors()).reshape(n * p, 4)
        x_reg = cross["bbox_regression"].reshape(n * p, 4)
        t_reg = teacher["bbox_regression"].reshape(n * p, 4)
        # only the confident positions' boxes are decoded: the others are never used
        x_boxes = torch.zeros_like(x_reg)
        t_boxes = torch.zeros_like(t_reg)
        if confident.any():
            x_boxes = x_boxes.index_put((confident,), record.decode_teacher(x_reg[confident], anchors[confident]))
            t_boxes = t_boxes.index_put((confident,), record.decode_teacher(t_reg[confident], anchors[confident]))
        with_ctr = self.ctrness_weight > 0 and "bbox_ctrness" in cross
        out = cross_kd_loss(
            x_cls.reshape(n * p, k),
            t_cls.reshape(n * p, k),
            x_boxes,
            t_boxes,
            confident,
            temperature=self.temperature,
            cls_loss=self.cls_loss,
            beta=self.beta,
            cross_ctr=cross["bbox_ctrness"].reshape(-1) if with_ctr else None,
            t_ctr=teacher["bbox_ctrness"].reshape(-1) if with_ctr else None,
        )
        out["box"] = self.box_weight * out["box"]
        if "ctrness" in out:
            out["ctrness"] = self.ctrness_weight * out["ctrness"]
        return out
