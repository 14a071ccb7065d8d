"""`ssr demo`: the embedded default — the full pipeline on synthetic data, on a CPU, in minutes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def demo(
    out: Path = typer.Option(Path("ssr-demo"), help="Folder for data, caches, runs and plots."),
    quick: bool = typer.Option(False, "--quick", help="A smaller first look (under 3 minutes on 2 cores)."),
    seed: int = typer.Option(0, help="Seed for data, plans and training."),
) -> None:
    """Synthesise two domains, cache vit_tiny features, train source-only and DAFormer+SSR, evaluate."""
    # Lazy: the demo builds caches, so it imports the SAM encoder, which only the commands that run SAM load.
    from ssr_train.demo import DemoConfig, run_demo

    cfg = DemoConfig.for_mode(out, quick=quick, seed=seed)
    rows = run_demo(cfg, console=console)
    table = Table(title="ssr demo — mIoU (%) of the shadow branch; SAM = random-init vit_tiny")
    for col in ("run", "source val (GTA-like)", "target val (Cityscapes-like)", "train time"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        table.add_row(r.name, _f(r.source_val_miou), _f(r.target_val_miou), f"{r.seconds:.0f} s")
    console.print(table)
    console.print(f"chance level is {100 / 19:.1f}; plots: {out}/iou_*.png, {out}/compare.png; overlays: "
                  f"{out}/runs/{rows[-1].name}/preds/overlay/")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"
