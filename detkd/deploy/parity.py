"""Parity of an exported detector with the PyTorch model: match detections, report the largest differences.

Two runs of one detector on one image (PyTorch eager = the reference, an exported file = the candidate) are matched
detection by detection: in descending reference score, each reference detection takes the unmatched candidate of
the same category with the nearest box (largest absolute coordinate difference, in input-image pixels), if that is
within :data:`MATCH_GATE_PX`; a reference detection left over then takes a candidate of another category whose box
is within the box tolerance (a *label difference*). Reported: the largest box and score differences over the
matched pairs, the number of label differences, and the detections left unmatched on either side.

Float rounding can move a score across a threshold: a detection whose score is within the score tolerance of the
model's ``score_thresh``, or of the lowest kept score when the image hit ``detections_per_img``, may exist on one
side only; such *boundary* detections are counted but do not fail the check. Everything else must agree:

* boxes within :data:`BOX_TOL_PX` pixels (each coordinate, input-image pixels),
* scores within :data:`SCORE_TOL` (absolute),
* no label difference and no unmatched detection away from a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from detkd.deploy.backends import Detections

BOX_TOL_PX = 0.01
"""Largest allowed difference of a box coordinate, in pixels of the input image."""
SCORE_TOL = 1e-4
"""Largest allowed absolute score difference."""
MATCH_GATE_PX = 4.0
"""Boxes further apart than this are different detections, not one detection with a large difference."""


@dataclass
class ImageParity:
    """The comparison of one image's detections (reference vs candidate)."""

    reference: int
    candidate: int
    matched: int
    max_box_diff: float
    max_score_diff: float
    label_diffs: int
    unmatched: int
    boundary: int


def _boundary(scores: np.ndarray, idx: int, score_thresh: float, capped: bool, score_tol: float) -> bool:
    near_thresh = abs(float(scores[idx]) - score_thresh) <= score_tol
    near_cap = capped and abs(float(scores[idx]) - float(scores.min())) <= score_tol
    return near_thresh or near_cap


def compare_image(
    reference: Detections,
    candidate: Detections,
    score_thresh: float = 0.0,
    max_detections: Optional[int] = None,
    box_tol: float = BOX_TOL_PX,
    score_tol: float = SCORE_TOL,
) -> ImageParity:
    """Match the detections of one image (module docstring) and measure their differences.

    Args:
        reference: the PyTorch model's detections.
        candidate: the exported file's detections.
        score_thresh: the model's score threshold (boundary detections near it are excused).
        max_detections: the model's ``detections_per_img`` (boundary detections at that cap are excused).
        box_tol: box tolerance in pixels (also the gate for matching across categories).
        score_tol: score tolerance (also the width of the boundary zones).
    """
    n, m = len(reference), len(candidate)
    free = np.ones(m, dtype=bool)
    pairs: list[tuple[int, int]] = []
    left: list[int] = []
    diff = np.abs(reference.boxes[:, None, :] - candidate.boxes[None, :, :]).max(axis=2) if n and m else None
    order = np.argsort(-reference.scores, kind="stable")
    for i in order:  # same category, nearest box
        if diff is None:
            left.append(int(i))
            continue
        ok = free & (candidate.labels == reference.labels[i]) & (diff[i] <= MATCH_GATE_PX)
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmin(diff[i][ok])])
            pairs.append((int(i), j))
            free[j] = False
        else:
            left.append(int(i))
    label_diffs = 0
    unmatched_ref = []
    for i in left:  # another category, same box
        ok = free & (diff[i] <= box_tol) if diff is not None else np.zeros(m, dtype=bool)
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmin(diff[i][ok])])
            pairs.append((i, j))
            free[j] = False
            label_diffs += 1
        else:
            unmatched_ref.append(i)
    unmatched_cand = [int(j) for j in np.flatnonzero(free)]
    box_d = max((float(diff[i, j]) for i, j in pairs), default=0.0)
    score_d = max((abs(float(reference.scores[i]) - float(candidate.scores[j])) for i, j in pairs), default=0.0)
    capped_ref = max_detections is not None and n >= max_detections
    capped_cand = max_detections is not None and m >= max_detections
    boundary = sum(_boundary(reference.scores, i, score_thresh, capped_ref, score_tol) for i in unmatched_ref)
    boundary += sum(_boundary(candidate.scores, j, score_thresh, capped_cand, score_tol) for j in unmatched_cand)
    unmatched = len(unmatched_ref) + len(unmatched_cand) - boundary
    return ImageParity(n, m, len(pairs), box_d, score_d, label_diffs, unmatched, boundary)


@dataclass
class ParityReport:
    """Parity over several images; :attr:`passed` applies the tolerances."""

    candidate: str
    images: list[ImageParity] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    box_tol: float = BOX_TOL_PX
    score_tol: float = SCORE_TOL

    @property
    def detections(self) -> int:
        return sum(im.reference for im in self.images)

    @property
    def max_box_diff(self) -> float:
        return max((im.max_box_diff for im in self.images), default=0.0)

    @property
    def max_score_diff(self) -> float:
        return max((im.max_score_diff for im in self.images), default=0.0)

    @property
    def label_diffs(self) -> int:
        return sum(im.label_diffs for im in self.images)

    @property
    def unmatched(self) -> int:
        return sum(im.unmatched for im in self.images)

    @property
    def boundary(self) -> int:
        return sum(im.boundary for im in self.images)

    @property
    def passed(self) -> bool:
        return (
            bool(self.images)
            and self.max_box_diff <= self.box_tol
            and self.max_score_diff <= self.score_tol
            and self.label_diffs == 0
            and self.unmatched == 0
        )

    def format(self) -> str:
        """The parity block the export tool prints."""
        counts = [im.reference for im in self.images]
        lines = [
            f"parity of {self.candidate} against the PyTorch model on {len(self.images)} val images "
            f"({self.detections} detections, {min(counts, default=0)} to {max(counts, default=0)} per image):",
            f"  largest box difference    {self.max_box_diff:.2e} px   (tolerance {self.box_tol:g} px)",
            f"  largest score difference  {self.max_score_diff:.2e}      (tolerance {self.score_tol:g})",
            f"  label differences         {self.label_diffs}             (tolerance 0)",
            f"  unmatched detections      {self.unmatched}             (tolerance 0; {self.boundary} more at the "
            f"score threshold or the detection cap, allowed)",
            f"parity: {'PASSED' if self.passed else 'FAILED'}",
        ]
        return "\n".join(lines)


def compare_runs(
    candidate: str,
    references: Sequence[Detections],
    candidates: Sequence[Detections],
    names: Sequence[str] = (),
    score_thresh: float = 0.0,
    max_detections: Optional[int] = None,
    box_tol: float = BOX_TOL_PX,
    score_tol: float = SCORE_TOL,
) -> ParityReport:
    """:func:`compare_image` over aligned lists of detections; returns the :class:`ParityReport`."""
    if len(references) != len(candidates):
        raise ValueError(f"got {len(references)} reference and {len(candidates)} candidate images")
    images = [
        compare_image(r, c, score_thresh, max_detections, box_tol, score_tol) for r, c in zip(references, candidates)
    ]
    return ParityReport(candidate, images, list(names), box_tol, score_tol)
