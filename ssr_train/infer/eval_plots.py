"""Charts and comparisons of ``eval.json`` results: per-class IoU bars, and run B minus run A.

Figures are drawn on matplotlib's Agg canvas through ``Figure`` objects (no pyplot global state), at a
fixed pixel size, and saved atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ssr_cache.atomic_file import write_atomic
from ssr_cache.data.labels import PALETTE
from ssr_cache.errors import SSRError

EVAL_JSON = "eval.json"
DPI = 100
DEFAULT_SIZE = (1200, 500)  # (W, H) pixels
MIOU_ROW = "mIoU"


@dataclass(frozen=True)
class ComparisonRow:
    name: str  # class name, or "mIoU" for the last row
    a: float | None  # IoU in percent; None: n/a
    b: float | None
    delta: float | None  # b - a; None when either is n/a


def read_eval_json(path: str | os.PathLike) -> dict:
    """An ``eval.json``, given itself or the run folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_JSON
    if not path.is_file():
        raise SSRError(f"{path} does not exist (run `ssr eval` on that run first)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SSRError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("per_class"), dict) or "miou" not in data:
        raise SSRError(f"{path} is not an evaluation result (needs 'miou' and 'per_class')")
    return data


def _as_eval(value: Mapping | str | os.PathLike) -> Mapping:
    return value if isinstance(value, Mapping) else read_eval_json(value)


def compare_runs(eval_a: Mapping | str | os.PathLike, eval_b: Mapping | str | os.PathLike) -> list[ComparisonRow]:
    """One row per class (in A's order) and a final mIoU row; each eval is a dict, an eval.json or a run."""
    a, b = _as_eval(eval_a), _as_eval(eval_b)
    names_a, names_b = list(a["per_class"]), list(b["per_class"])
    if names_a != names_b:
        raise SSRError(f"the two evaluations have different classes ({len(names_a)} vs {len(names_b)})")

    def row(name: str, value_a: float | None, value_b: float | None) -> ComparisonRow:
        delta = None if value_a is None or value_b is None else value_b - value_a
        return ComparisonRow(name, value_a, value_b, delta)

    rows = [row(name, a["per_class"][name], b["per_class"][name]) for name in names_a]
    return rows + [row(MIOU_ROW, a["miou"], b["miou"])]


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


def plot_class_iou(
    per_class: Mapping[str, float | None],
    path: str | os.PathLike,
    *,
    title: str = "per-class IoU",
    miou: float | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> Path:
    """Bars of IoU (percent) per class, in the Cityscapes colours; an n/a class is a hatched empty column."""
    names = list(per_class)
    figure = _figure(size)
    axes = _class_axes(figure, names)
    colours = [PALETTE[i] / 255 if i < len(PALETTE) else (0.5, 0.5, 0.5) for i in range(len(names))]
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


def plot_iou_delta(
    rows: list[ComparisonRow],
    path: str | os.PathLike,
    *,
    label_a: str = "A",
    label_b: str = "B",
    size: tuple[int, int] = DEFAULT_SIZE,
) -> Path:
    """Per-class IoU change B − A (green up, red down); mIoU change in the title; n/a classes marked."""
    class_rows = [r for r in rows if r.name != MIOU_ROW]
    summary = next((r for r in rows if r.name == MIOU_ROW), None)
    figure = _figure(size)
    axes = _class_axes(figure, [r.name for r in class_rows])
    axes.axhline(0, color="0.2", linewidth=0.8)
    for i, r in enumerate(class_rows):
        if r.delta is None:
            axes.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8, color="0.3")
            continue
        axes.bar(i, r.delta, width=0.8, color="tab:green" if r.delta >= 0 else "tab:red")
        axes.text(i, r.delta, f"{r.delta:+.1f}", ha="center", va="bottom" if r.delta >= 0 else "top", fontsize=7)
    axes.set_ylabel("IoU change (points)")
    title = f"{label_b} − {label_a}"
    if summary is not None and summary.delta is not None:
        title += f": mIoU {summary.a:.2f} → {summary.b:.2f} ({summary.delta:+.2f})"
    axes.set_title(title)
    figure.tight_layout()
    return _save_atomic(figure, path)
