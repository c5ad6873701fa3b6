"""Are the attention maps of FGD and attention-guided distillation spread over the feature map, or one-hot?

Both losses weight the imitation by ``A_S = H W softmax_{HW}(mean_C |F| / T)`` and ``A_C = C softmax_C(mean_{HW} |F| /
T)`` of the teacher (:func:`detkd.masks.spatial_attention`), with the papers' ``T = 0.5``. That temperature was set
for ImageNet/COCO-trained FPN features, whose ``mean |F|`` is of order 1. A teacher trained from scratch can have
features ten times larger; the same ``T`` is then ten times colder, the maps are nearly one-hot, and the loss
imitates about one cell and one channel per image while putting all its weight there. On the regime-v2 benchmark
teacher (``mean |F|`` 13.4 at P3) FGD's spatial map at P3 spreads over 1.7 of 256 cells and its channel map over
1.1 of 128 channels, and FGD lost 20 AP against the baseline; with near-flat maps (``T = 50``) it gained (README,
"Results").

The Distiller measures the spread of every such loss's teacher maps on its first training step
(:attr:`detkd.distiller.Distiller.attention_spread`); :class:`AttentionCheckReport` writes them to
``<work_dir>/attention_check.json`` and prints a warning for each peaked level, and :func:`detkd.diagnose.diagnose_run`
reports the same finding after the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PEAKED", "AttentionCheckReport", "describe", "is_peaked", "suggested_temperature"]

PEAKED = 0.05
"""A map whose perplexity is below this fraction of its cells (or channels), or below 2, counts as peaked."""


def is_peaked(entry: dict[str, Any]) -> bool:
    """Whether a level's spatial or channel attention spreads over fewer than ``max(2, PEAKED x n)`` of its ``n``
    cells (channels): mostly one of them, or a small share of a large map. A map of one cell is never peaked."""
    return any(
        entry[n] > 1 and entry[what] < max(2.0, PEAKED * entry[n]) for what, n in (("cells", "of_cells"),
                                                                                  ("channels", "of_channels"))
    )  # fmt: skip


def suggested_temperature(entries: Sequence[dict[str, Any]]) -> float:
    """The temperature at which every level's maps spread over 90 % of their cells and channels
    (:func:`detkd.masks.flat_attention_temperature`, the largest over the loss's levels), two significant digits.

    Why that far: on the benchmark teacher, FGD at ``T = 4`` (maps over 22 % of the P3 cells and 25 % of the
    channels) still lost 12 tune AP against the baseline, while ``T = 50`` (flat maps) gained; a temperature that
    only scales ``T`` with the features' magnitude (``0.5 x mean |F|``) is not enough."""
    return float(f"{max(e['flat_temperature'] for e in entries):.2g}")


def describe(entries: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """``(what was measured, what to try)`` for one loss (one teacher) whose entries include a peaked level."""
    peaked = [e for e in entries if is_peaked(e)]
    levels = "; ".join(
        f"{e['level']}: {e['cells']:.1f} of {e['of_cells']} cells, {e['channels']:.1f} of {e['of_channels']} channels"
        for e in peaked
    )
    first = entries[0]
    magnitudes = ", ".join(f"{e['mean_abs']:.2g}" for e in entries)
    message = (
        f"at temperature {first['temperature']:g} the teacher's attention maps are nearly one-hot ({levels}), so "
        f"the loss imitates about one location and channel per image; the teacher's mean |F| is {magnitudes} on "
        f"{', '.join(e['level'] for e in entries)}, while the papers' T assumes features of magnitude ~1"
    )
    suggestion = (
        f"set the loss's temperature to about {suggested_temperature(entries):g}, where the maps spread over 90 % of "
        f"the cells (on the benchmark teacher only near-flat maps made FGD help), then re-measure its weight "
        f"(weight: auto)"
    )
    return message, suggestion


def by_loss(entries: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The entries grouped per loss term prefix (``fgd`` or ``fgd/<teacher>``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        out.setdefault(e["loss"] + (f"/{e['teacher']}" if e.get("teacher") else ""), []).append(e)
    return out


class AttentionCheckReport:
    """A trainer callback: after the first step, write the Distiller's attention spreads to ``out_file`` (a JSON
    list, one entry per loss, teacher and level) and print one warning paragraph per loss with a peaked level.

    Args:
        distiller: the :class:`~detkd.distiller.Distiller` (its ``attention_spread`` is filled on the first step).
        out_file: where the entries go.
        show: print the warnings.
    """

    def __init__(self, distiller, out_file, show: bool = True) -> None:
        self.distiller, self.out_file, self.show = distiller, Path(out_file), show
        self.done = False

    def __call__(self, trainer, iteration: int, values) -> None:
        if self.done:
            return
        self.done = True
        entries = list(self.distiller.attention_spread)
        if not entries:
            return
        from detkd.files import atomic_write

        atomic_write(self.out_file, lambda f: f.write(json.dumps(entries, indent=1) + "\n"), binary=False)
        if self.show:
            for name, group in by_loss(entries).items():
                if any(is_peaked(e) for e in group):
                    message, suggestion = describe(group)
                    print(f"warning: distill/{name}: {message}. Suggestion: {suggestion} ({self.out_file}).")


def read_entries(run_dir: Path) -> list[dict[str, Any]]:
    """The entries a run wrote (``attention_check.json``), or [] when it wrote none."""
    path = Path(run_dir) / "attention_check.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
