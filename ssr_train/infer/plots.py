"""Charts of evaluations: per-class IoU bars, and the per-class change of each compared column against the
first (with ± std error bars for seed groups).

Figures are drawn on matplotlib's Agg canvas through ``Figure`` objects (no pyplot global state), at a
fixed pixel size, and saved atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ssr_cache.atomic_file import write_atomic

DPI = 100
DEFAULT_SIZE = (1200, 500)  # (W, H) pixels


def _figure(size: tuple[int, int]) -> Figure:
    width, height = size
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _save_atomic(figure: Figure, path: str | os.PathLike) -> Path:
    # no bbox_inches: keep the exact pixel size
    return write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=DPI))


def _class_axes(figure: Figure, names: list[str]):
    axes = figure.add_subplot(1, 1, 1)
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axes.set_xlim(-0.6, len(names) - 0.4)
    axes.grid(axis="y", alpha=0.3)
    return axes


def plot_class_iou(per_class: Mapping[str, float | None], path: str | os.PathLike, *,
                   palette: Sequence[Sequence[int]] | None = None, title: str = "per-class IoU",
                   miou: float | None = None, size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """Bars of IoU (percent) per class in the label space's colours; an n/a class is a hatched column."""
    names = list(per_class)
    figure = _figure(size)
    axes = _class_axes(figure, names)
    colours = [np.asarray(palette[i]) / 255 if palette is not None else (0.4, 0.5, 0.7) for i in range(len(names))]
    for i, name in enumerate(names):
        value = per_class[name]
        if value is None:
            axes.axvspan(i - 0.4, i + 0.4, fill=False, hatch="//", edgecolor="0.7", linewidth=0)
            axes.text(i, 2, "n/a", ha="center", va="bottom", fontsize=8, color="0.3")
        else:
            axes.bar(i, value, width=0.8, color=colours[i], edgecolor="0.2", linewidth=0.5)
            axes.text(i, value + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    axes.set_ylim(0, 105)
    axes.set_ylabel("IoU (%)")
    if miou is not None:
        axes.axhline(miou, color="0.2", linestyle="--", linewidth=1)
        title = f"{title} — mIoU {miou:.2f}"
    axes.set_title(title)
    figure.tight_layout()
    return _save_atomic(figure, path)


def plot_iou_delta(columns, path: str | os.PathLike, *, size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """Per-class IoU change of every column against the first (``eval_results.Column``s), grouped bars,
    ± std of the column where it is a seed group; the mIoU changes in the legend."""
    base, others = columns[0], columns[1:]
    names = list(base.per_class)
    figure = _figure(size)
    axes = _class_axes(figure, names)
    axes.axhline(0, color="0.2", linewidth=0.8)
    width = 0.8 / max(len(others), 1)
    for k, column in enumerate(others):
        xs, deltas, errs = [], [], []
        for i, name in enumerate(names):
            a, b = base.per_class[name], column.per_class[name]
            if a is None or b is None:
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            deltas.append(b - a)
            errs.append(column.std.get(name) or 0.0)
        miou = "" if base.miou is None or column.miou is None else f" (mIoU {column.miou - base.miou:+.2f})"
        axes.bar(xs, deltas, width=width, yerr=errs if any(errs) else None, capsize=2,
                 label=f"{column.label}{miou}")
    axes.set_ylabel(f"IoU change vs {base.label} (points)")
    axes.set_title(f"per-class IoU change against {base.label}")
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return _save_atomic(figure, path)
