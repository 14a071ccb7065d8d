"""`ssr compare`: per-class IoU of two or more evaluations side by side, Δ against the first, seed groups."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ssr_cli.eval_command import fmt
from ssr_train.infer.eval_results import compare
from ssr_train.infer.plots import plot_iou_delta

console = Console()


def compare_command(
    inputs: list[Path] = typer.Argument(..., metavar="RUN_OR_JSON...", help="Two or more runs or eval JSON files.",
                                        show_default=False),
    group: str = typer.Option(None, help="Group names, one per input, comma-separated (default: runs that "
                              "differ only in seed form a group)."),
    out: Path = typer.Option(Path("compare.png"), help="Where to write the Δ chart."),
) -> None:
    """Compare evaluations of the same dataset, split and label space (mean ± std for seed groups)."""
    columns = compare(inputs, group.split(",") if group else None)
    base = columns[0]
    table = Table(title=f"per-class IoU %, Δ against {base.label}")
    table.add_column("class")
    for column in columns:
        table.add_column(column.label + (f" (n={column.members})" if column.members > 1 else ""), justify="right")
        if column is not base:
            table.add_column("Δ", justify="right")
    names = list(base.per_class) + ["mIoU"]
    for name in names:
        row = [name]
        for column in columns:
            value, std = ((column.miou, column.miou_std) if name == "mIoU"
                          else (column.per_class[name], column.std[name]))
            row.append(fmt(value, std))
            if column is not base:
                a = base.miou if name == "mIoU" else base.per_class[name]
                row.append("n/a" if a is None or value is None else
                           (f"[green]+{value - a:.2f}" if value >= a else f"[red]{value - a:.2f}"))
        table.add_row(*row)
    console.print(table)
    if len(columns) > 1:
        console.print(f"Δ chart: {plot_iou_delta(columns, out)}", highlight=False)
