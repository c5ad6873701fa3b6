"""Pictures of distillation: mask figures per image and level, an HTML index of them, and loss/AP curves.

A leaf module: it imports matplotlib (figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg
canvas, never through ``pyplot``, so no GUI backend is touched) and nothing in ``detkd`` imports it; the tools
``tools/visualize_masks.py`` and ``tools/plot_logs.py`` do. The masks come from :mod:`detkd.mask_panels`, which
records them from a real distillation step with the functions the losses use.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter
from torch import Tensor, nn

from detkd.mask_panels import LevelMasks, MaskSnapshot, collect_masks

__all__ = [
    "GT_COLOR",
    "PSEUDO_COLOR",
    "plot_level_figure",
    "write_index_html",
    "load_student_weights",
    "visualize_recipe",
    "read_metrics",
    "metric_series",
    "plot_logs",
]

PathLike = Union[str, os.PathLike]
GT_COLOR = "#39e639"
PSEUDO_COLOR = "#ff8c00"
MASK_ALPHA = 0.65
PANEL_INCHES = 3.1
PANEL_COLUMNS = 4


# ----------------------------------------------------------------------------------------------------------------
# One figure per image and level
# ----------------------------------------------------------------------------------------------------------------


def _panels(level: LevelMasks, index: int, loss_names: Optional[Sequence[str]]) -> list[tuple[str, np.ndarray]]:
    """``(title, (H, W) array)`` of every mask panel of image ``index``, in display order."""
    t = f"T={level.temperature:g}"
    panels = [
        ("foreground fg (GT box masks)", level.fg[index]),
        ("background bg (uniform off the boxes)", level.bg[index]),
        (f"teacher spatial attention A_s ({t})", level.t_spatial[index]),
        (f"student spatial attention A_s ({t})", level.s_spatial[index]),
    ]
    if level.difference is not None:
        kind = "GID: teacher vs student logits" if level.difference_kind == "gid" else "feature distance, top 10%"
        panels.append((f"difference mask ({kind})", level.difference[index]))
    names = list(level.weights) if loss_names is None else [n for n in loss_names if n in level.weights]
    panels += [(f"final per-pixel weight ({name})", level.weights[name][index]) for name in names]
    return [(title, m.detach().float().cpu().numpy()) for title, m in panels]


def _draw_boxes(ax: Any, boxes: Optional[Tensor], color: str, lw: float, ls: str = "-") -> None:
    if boxes is None:
        return
    for x1, y1, x2, y2 in boxes.reshape(-1, 4).tolist():
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=lw, linestyle=ls))


def _mask_panel(
    fig: Figure,
    ax: Any,
    image: np.ndarray,
    mask: np.ndarray,
    title: str,
    gt: Optional[Tensor],
    pseudo: Optional[Tensor],
) -> None:
    """The grey image, the mask on its feature grid stretched over it (one block per cell), the boxes dashed (GT
    white, pseudo labels orange), a colour bar."""
    h, w = image.shape[:2]
    grey = image @ np.array([0.299, 0.587, 0.114])
    ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, w, h, 0))
    im = ax.imshow(mask, cmap="viridis", alpha=MASK_ALPHA, extent=(0, w, h, 0), interpolation="nearest")
    _draw_boxes(ax, gt, "white", 0.7, "--")
    _draw_boxes(ax, pseudo, PSEUDO_COLOR, 0.7, "--")
    ax.set_title(title, fontsize=8.5)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, format=FuncFormatter(lambda v, _: f"{v:.3g}"))
    bar.ax.tick_params(labelsize=7)


def plot_level_figure(
    image: Tensor,
    gt_boxes: Optional[Tensor],
    pseudo_boxes: Optional[Tensor],
    level_masks: LevelMasks,
    out_path: PathLike,
    index: int = 0,
    loss_names: Optional[Sequence[str]] = None,
    caption: str = "",
) -> dict[str, np.ndarray]:
    """Write one PNG for one image and one level: labelled panels of every mask, and channel attention bars.

    Panels: the image with its GT boxes (green) and the teacher's pseudo labels (orange) with a legend; then, each
    drawn over the grey image on its feature grid with a colour bar and the boxes dashed: foreground, background,
    teacher and student spatial attention, the difference mask, and "final per-pixel weight (<loss>)" for each
    configured loss (:func:`detkd.mask_panels.loss_weight_map`); last, the teacher's and the student's channel
    attention as bars.

    Args:
        image: The canvas image, (3, H, W) RGB in ``[0, 1]``.
        gt_boxes: ``(K, 4)`` ``xyxy`` canvas pixels, or None.
        pseudo_boxes: The teacher's pseudo labels, ``(P, 4)``, or None (no pseudo-label loss).
        level_masks: The level's masks for a batch; image ``index`` is drawn.
        out_path: PNG file to write (folders are created).
        index: Which image of the batch.
        loss_names: Per-loss panels to draw (default: every loss of ``level_masks.weights``).
        caption: Extra text for the title (e.g. the image file name).

    Returns:
        ``{panel title: (H, W) array drawn}`` of the mask panels, in order.
    """
    img = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    panels = _panels(level_masks, index, loss_names)
    n_cells = 1 + len(panels)
    cols = min(PANEL_COLUMNS, n_cells)
    rows = math.ceil(n_cells / cols)
    fig = Figure(figsize=(cols * PANEL_INCHES + 0.6, rows * PANEL_INCHES + 2.4), dpi=110)
    grid = GridSpec(rows + 1, cols, figure=fig, height_ratios=[1.0] * rows + [0.62], hspace=0.35, wspace=0.35)

    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0))
    _draw_boxes(ax, gt_boxes, GT_COLOR, 1.4)
    _draw_boxes(ax, pseudo_boxes, PSEUDO_COLOR, 1.2, "--")
    n_gt = 0 if gt_boxes is None else int(gt_boxes.reshape(-1, 4).shape[0])
    handles = [Line2D([], [], color=GT_COLOR, lw=1.4, label=f"GT boxes ({n_gt})")]
    if pseudo_boxes is not None:
        n_ps = int(pseudo_boxes.reshape(-1, 4).shape[0])
        handles.append(Line2D([], [], color=PSEUDO_COLOR, lw=1.2, ls="--", label=f"teacher pseudo labels ({n_ps})"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, frameon=False)
    ax.set_title("image (padded canvas both detectors see)", fontsize=8.5)
    ax.set_xticks([])
    ax.set_yticks([])

    for k, (title, mask) in enumerate(panels, start=1):
        _mask_panel(fig, fig.add_subplot(grid[k // cols, k % cols]), img, mask, title, gt_boxes, pseudo_boxes)

    _channel_bars(fig.add_subplot(grid[rows, :]), level_masks, index)
    h, w = level_masks.feat_hw
    note = "" if level_masks.distilled else " — no feature loss on this level: generic masks only"
    title = f"level {level_masks.name} (stride {level_masks.stride}, {h}x{w} cells){note}"
    fig.suptitle(f"{title}\n{caption}" if caption else title, fontsize=11)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, bbox_inches="tight")
    return dict(panels)


def _channel_bars(ax: Any, level: LevelMasks, index: int) -> None:
    t = level.t_channel[index].numpy()
    s = level.s_channel[index].numpy()
    if t.shape == s.shape:
        x = np.arange(t.shape[0])
        ax.bar(x - 0.2, t, width=0.4, color="#3b528b", label="teacher")
        ax.bar(x + 0.2, s, width=0.4, color="#f28e2b", label="student (after adapter)")
    else:  # no adapter on a head-only level: the student's channels are its own
        ax.bar(np.arange(t.shape[0]), t, width=0.8, color="#3b528b", label=f"teacher ({t.shape[0]} channels)")
        ax.bar(np.arange(s.shape[0]), s, width=0.4, color="#f28e2b", label=f"student ({s.shape[0]} channels)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    positive = np.concatenate([t, s])
    positive = positive[positive > 0]
    floor = max(float(positive.min()), 1e-4) if positive.size else 1.0
    if positive.size and positive.max() / floor > 100:  # a peaked attention: keep the small bars visible
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor / 2)
    ax.set_xlim(-1, max(t.shape[0], s.shape[0]))
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel("A_c", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"channel attention A_c (T={level.temperature:g}; mean 1): teacher vs student", fontsize=8.5)
    ax.legend(fontsize=7, loc="upper right")


def write_index_html(out_dir: PathLike, entries: Sequence[Mapping[str, Any]], title: str = "detkd masks") -> Path:
    """Write ``out_dir/index.html`` showing every PNG, grouped by image then level, with captions.

    Args:
        out_dir: Folder of the PNGs; links are relative to it.
        entries: One mapping per PNG: ``path`` (the file), ``image`` (group heading, e.g. ``"image 0 (a.png)"``),
            ``level`` and optionally ``caption``. Groups keep the order of first appearance.
        title: Page title.

    Returns:
        The path of ``index.html``.
    """
    out_dir = Path(out_dir)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(str(entry["image"]), []).append(entry)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}figure{margin:0 0 2em 0}"
        "img{max-width:100%;border:1px solid #ccc}figcaption{color:#444;font-size:0.9em}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, items in groups.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for entry in items:
            rel = os.path.relpath(Path(entry["path"]), out_dir).replace(os.sep, "/")
            caption = entry.get("caption") or f"{heading}, level {entry['level']}"
            parts.append(
                f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" '
                f'alt="{html.escape(str(caption))}"></a><figcaption>{html.escape(str(caption))}</figcaption></figure>'
            )
    parts.append("</body></html>")
    path = out_dir / "index.html"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# A recipe's masks, end to end
# ----------------------------------------------------------------------------------------------------------------


def load_student_weights(distiller: nn.Module, path: PathLike) -> str:
    """Load a checkpoint into the distiller's student; returns which kind it was.

    Accepted: ``student_best.pth`` (``{"model": plain student state_dict, ...}``) or a plain student state_dict
    (kind ``"student"``, loaded strictly into ``distiller.student``); ``last.pth`` of a distillation run, whose
    ``"model"`` is the Distiller's ``trainable_state_dict`` (keys ``student.*``, ``adapters.*`` ...; kind
    ``"distiller"``, loaded with ``load_trainable_state_dict``, so adapters and learnable loss parts come too).
    """
    from detkd.engine.checkpoint import load_checkpoint, load_state_dict_checked, state_dict_of

    state = state_dict_of(load_checkpoint(path), path)
    if any(k.startswith("student.") for k in state):
        expected, load = distiller.trainable_state_dict(), distiller.load_trainable_state_dict
        load_state_dict_checked(
            distiller, state, f"checkpoint {path}", expected=expected, load=load, check_missing=False
        )
        return "distiller"
    load_state_dict_checked(distiller.student, state, f"checkpoint {path}", target="the recipe's student")
    return "student"


def visualize_recipe(
    cfg: Any,
    ckpt: Optional[PathLike] = None,
    num_images: int = 4,
    split: str = "val",
    out_dir: Optional[PathLike] = None,
    levels: Optional[Sequence[str]] = None,
    batch_size: int = 4,
) -> list[Path]:
    """Mask figures of a recipe's first ``num_images`` images: one PNG per image and level, plus ``index.html``.

    Builds the distiller as ``train_distill`` does (same seed right before, so without ``ckpt`` the student is the
    one a run starts from), loads ``ckpt`` into the student if given (:func:`load_student_weights`), records the
    masks of one distillation step per batch of ``batch_size`` images (:func:`detkd.mask_panels.collect_masks`;
    the student's BatchNorm uses the batch's statistics, as in training) and draws them (:func:`plot_level_figure`).

    Args:
        cfg: A distillation recipe (:class:`detkd.config.Config` with ``teacher`` and ``student``).
        ckpt: Optional student checkpoint (``student_best.pth``, ``last.pth`` or a plain state_dict).
        num_images: Images to draw (the first ones of the split).
        split: ``"val"`` or ``"train"`` (train applies its random augmentation, seeded).
        out_dir: Output folder (default ``<work_dir>/mask_vis``).
        levels: Levels to draw (default: the distilled levels, or every shared level for head-only recipes).
        batch_size: Images per recorded step.

    Returns:
        The PNG paths, then the ``index.html`` path.

    Raises:
        FileNotFoundError: The teacher checkpoint does not exist (the message says how to make it).
    """
    from detkd.config import teacher_entries
    from detkd.data.build import build_dataset, ensure_data
    from detkd.distiller import build_distiller_from_cfg
    from detkd.engine.runner import resolve_work_dir
    from detkd.engine.trainer import resolve_device, seed_everything

    if not teacher_entries(cfg) or cfg.student is None:
        raise ValueError(f"recipe '{cfg.name}' is not a distillation recipe (it needs 'teacher' and 'student').")
    for _, key, teacher, _ in teacher_entries(cfg):  # several teachers: the pictures show the first
        teacher_ckpt = teacher.checkpoint
        if teacher_ckpt is not None and not Path(teacher_ckpt).is_file():
            how = (
                f"the recipe trains it when missing ({key}.train_if_missing={teacher.train_if_missing}): run "
                f"tools/train_distill.py --cfg <this recipe> (or tools/train.py --cfg {teacher.train_if_missing}) "
                f"first"
                if teacher.train_if_missing
                else f"train it with tools/train.py or point {key}.checkpoint at an existing file"
            )
            raise FileNotFoundError(f"teacher checkpoint {teacher_ckpt} does not exist; {how}.")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    ensure_data(cfg.data, show_progress=False)
    dataset = build_dataset(cfg.data, split, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    distiller = build_distiller_from_cfg(cfg, dataset.num_classes, dataset.cat_id_to_label)
    state = "at initialisation"
    if ckpt is not None:
        load_student_weights(distiller, ckpt)
        state = f"from {Path(ckpt).name}"
    device = resolve_device(cfg.train.device)
    distiller.to(device).eval()
    out = Path(out_dir) if out_dir is not None else resolve_work_dir(cfg) / "mask_vis"
    out.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    entries: list[dict[str, Any]] = []
    indices = list(range(min(num_images, len(dataset))))
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        items = [dataset[i] for i in chunk]
        images = [img.to(device) for img, _ in items]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for _, t in items]
        snapshot = collect_masks(distiller, images, targets, levels)
        paths += _draw_snapshot(snapshot, dataset, chunk, out, state, entries)
    index = write_index_html(out, entries, title=f"detkd masks: {cfg.name} (student {state})")
    return paths + [index]


def _draw_snapshot(
    snapshot: MaskSnapshot, dataset: Any, indices: Sequence[int], out: Path, state: str, entries: list
) -> list[Path]:
    paths = []
    for row, idx in enumerate(indices):
        name = dataset.image_path(idx).name if hasattr(dataset, "image_path") else str(idx)
        heading = f"image {idx} ({name})"
        for level, lm in snapshot.levels.items():
            path = out / f"img{idx:03d}_{level}.png"
            losses = ", ".join(lm.weights) or "none"
            caption = f"{heading} — student {state} — feature losses here: {losses}"
            pseudo = snapshot.pseudo_boxes[row] if snapshot.pseudo_boxes is not None else None
            plot_level_figure(
                snapshot.images[row], snapshot.gt_boxes[row], pseudo, lm, path, index=row, caption=caption
            )
            entries.append({"path": path, "image": heading, "level": level, "caption": f"level {level}: {caption}"})
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------------

_NOT_A_TERM = {"type", "iter", "epoch", "time", "lr"}


def read_metrics(run: PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (``run`` is the run folder or the file itself).

    Blank or truncated lines (a run killed mid-write) are skipped.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (a run folder holds metrics.jsonl).")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def metric_series(records: Sequence[Mapping[str, Any]], kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (iters, values)}`` of the numeric fields of records of ``kind``; the last record of an iteration
    wins (a resumed run re-logs the iterations after its checkpoint)."""
    by_key: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.get("type") != kind or "iter" not in rec:
            continue
        for key, value in rec.items():
            if key in _NOT_A_TERM - {"lr"} or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            by_key.setdefault(key, {})[int(rec["iter"])] = float(value)
    out = {}
    for key, points in by_key.items():
        iters = np.array(sorted(points))
        out[key] = (iters, np.array([points[i] for i in iters]))
    return out


def _run_labels(runs: Sequence[PathLike]) -> list[str]:
    paths = [Path(r) for r in runs]
    paths = [p.parent if p.name == "metrics.jsonl" else p for p in paths]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    return labels


def _term_order(key: str) -> tuple[int, str]:
    rank = 0 if key == "loss" else 1 if key.startswith("task/") else 2 if key.startswith("distill/") else 3
    return (4 if key == "lr" else rank), key


def plot_logs(run_dirs: Sequence[PathLike], out_file: PathLike, columns: int = 4) -> Path:
    """Plot every logged loss term and the val AP of several runs against iterations, runs overlaid.

    One subplot per training term (``loss``, ``task/...``, ``distill/...``, then ``lr``), the union over the runs
    (a baseline has no ``distill/`` terms); the last subplot is val AP (solid) and AP50 (dashed). Each run keeps
    one colour everywhere and is labelled by its folder name. A term spanning more than two decades is drawn on a
    log axis.

    Args:
        run_dirs: Run folders (or their ``metrics.jsonl`` files), e.g. a baseline and a distilled run.
        out_file: PNG to write.
        columns: Subplots per row.

    Returns:
        ``out_file`` as a Path.
    """
    if not run_dirs:
        raise ValueError("plot_logs needs at least one run folder")
    runs = [read_metrics(r) for r in run_dirs]
    labels = _run_labels(run_dirs)
    train = [metric_series(r, "train") for r in runs]
    val = [metric_series(r, "val") for r in runs]
    terms = sorted({k for series in train for k in series}, key=_term_order)
    n = len(terms) + 1
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * 3.8, rows * 2.9 + 0.6), dpi=100)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for k, term in enumerate(terms):
        ax = fig.add_subplot(rows, cols, k + 1)
        values = []
        for series, label, color in zip(train, labels, colors):
            if term in series:
                iters, v = series[term]
                ax.plot(iters, v, color=color, lw=1.1, label=label)
                values.append(v)
        finite = np.concatenate(values)
        finite = finite[np.isfinite(finite)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax.set_yscale("log")
        _style(ax, term)
    ax = fig.add_subplot(rows, cols, n)
    for series, label, color in zip(val, labels, colors):
        if "AP" in series:
            ax.plot(*series["AP"], color=color, marker="o", ms=3, lw=1.3, label=f"{label} AP")
        if "AP50" in series:
            ax.plot(*series["AP50"], color=color, ls="--", lw=1.0, label=f"{label} AP50")
    if not any("AP" in s for s in val):
        ax.text(0.5, 0.5, "no val records yet", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    _style(ax, "val AP (solid) / AP50 (dashed)")
    fig.suptitle("training curves: " + " vs ".join(labels), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _style(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("iteration", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
