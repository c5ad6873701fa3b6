"""Several teachers: how their pseudo labels are fused and how much each one teaches (pure functions and one small
policy module). The Distiller (:mod:`detkd.distiller`) runs the teachers; this package decides how they combine.

* :mod:`detkd.teachers.fusion`: the teachers' detections of one image -> one set of pseudo-label candidates
  (weighted box fusion or class-wise NMS across teachers).
* :mod:`detkd.teachers.weighting`: the weights of the teachers' distillation terms (``fixed``, ``confidence``) and
  the ``adaptive`` bandit (EXP3) that picks which teachers the student follows.
"""

from detkd.teachers.fusion import FUSION_METHODS, fuse_detections, nms_fusion, weighted_box_fusion
from detkd.teachers.weighting import (
    WEIGHTING_MODES,
    Exp3Policy,
    TeacherWeighting,
    confidence_weights,
    draw_arm,
    exp3_probabilities,
    exp3_update,
    improvement_reward,
    normalized_weights,
    teacher_subsets,
)

__all__ = [
    "FUSION_METHODS",
    "WEIGHTING_MODES",
    "Exp3Policy",
    "TeacherWeighting",
    "confidence_weights",
    "draw_arm",
    "exp3_probabilities",
    "exp3_update",
    "fuse_detections",
    "improvement_reward",
    "nms_fusion",
    "normalized_weights",
    "teacher_subsets",
    "weighted_box_fusion",
]
