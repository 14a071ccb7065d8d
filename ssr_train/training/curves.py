"""`ssr plot`: training curves of one or more runs (loss, learning rate, validation mIoU) from their
metrics.jsonl, as one PNG — what a user would otherwise open TensorBoard or write code for."""

from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.figure import Figure

from ssr_cache.atomic_file import write_atomic
from ssr_cache.errors import SSRError
from ssr_train.training.run_folder import read_metrics_lines

PANELS = (("loss", "training loss"), ("lr", "learning rate"), ("val_miou", "target val mIoU (%)"))


def read_curves(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (iterations, values)} of a run's metrics.jsonl (a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SSRError(f"{run_dir} has no metrics.jsonl (not a training run folder?)")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for line in read_metrics_lines(path):
        record = json.loads(line)
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)):
                its, values = curves.setdefault(key, ([], []))
                its.append(int(record["iter"]))
                values.append(float(value))
    return curves


def plot_runs(run_dirs: list[str | Path], out: str | Path, *, size: tuple[int, int] = (1500, 450)) -> Path:
    """One row of panels (loss, lr, val mIoU when any run has it), one line per run; written atomically."""
    runs = {str(Path(r)): read_curves(r) for r in run_dirs}
    panels = [(key, title) for key, title in PANELS if any(key in c for c in runs.values())]
    if not panels:
        raise SSRError("the runs logged nothing to plot yet")
    fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, curves in runs.items():
            if key in curves:
                its, values = curves[key]
                ax.plot(its, values, label=Path(name).name, marker="o" if key == "val_miou" else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.axes[0].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_atomic(out, lambda handle: handle.write(buffer.getvalue()), what="the plot")
