"""`ssr plot RUN [RUN…] --out FILE.png`: loss, learning-rate and val-mIoU curves of training runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssr_train.training.curves import plot_runs

console = Console()


def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders (each with metrics.jsonl)."),
    out: Path = typer.Option(Path("curves.png"), "--out", help="PNG to write."),
) -> None:
    """Plot training curves (loss, learning rate, target val mIoU) of one or more runs into one PNG."""
    path = plot_runs(runs, out)
    console.print(f"wrote {path}", highlight=False)
