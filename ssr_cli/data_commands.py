"""`ssr data …`: synthesise domains in the real dataset layouts, class statistics of a dataset split."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ssr_cache.data.class_stats import dataset_stats
from ssr_cache.data.datasets import DATASETS, open_dataset
from ssr_cache.data.synthetic import DEFAULT_LAYOUTS, LAYOUTS, synthesize
from ssr_cli.parsing import parse_size

data_app = typer.Typer(help="Datasets: synthetic domains in the real layouts, class statistics.",
                       no_args_is_help=True)
console = Console()


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write one dataset root per layout into."),
    layout: str = typer.Option(",".join(DEFAULT_LAYOUTS), help=f"Comma-separated layouts: {', '.join(LAYOUTS)}."),
    train: int = typer.Option(200, help="Training images per domain."),
    val: int = typer.Option(50, help="Validation images per domain."),
    size: str = typer.Option("512x256", help="Image size WxH."),
    seed: int = typer.Option(0, help="Random seed (same seed → identical files)."),
    workers: int = typer.Option(1, help="Processes used to render."),
) -> None:
    """Write procedurally rendered street scenes in real dataset layouts (GTA5, Cityscapes, SYNTHIA, ACDC,
    Dark Zurich, a folder of JPEGs with a 3-class classes.toml)."""
    layouts = tuple(name.strip() for name in layout.split(",") if name.strip())
    summary = synthesize(out, train=train, val=val, size=parse_size(size), seed=seed, workers=workers,
                         layouts=layouts)
    console.print(f"wrote synthetic data to {out}: {summary}")
    for name, root in summary.roots.items():
        console.print(f"  {name}: {root}")


@data_app.command("stats")
def stats(
    dataset: str = typer.Option(..., help=f"One of: {', '.join(DATASETS)}."),
    data_root: Path = typer.Option(..., "--data-root", help="Dataset root folder (real layout)."),
    split: str = typer.Option("train", help="Split (Cityscapes: train/val/test)."),
    conditions: str = typer.Option(None, help="ACDC / Dark Zurich conditions, comma-separated."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    workers: int = typer.Option(2, help="Processes reading labels."),
) -> None:
    """Class pixel counts of a labelled split at full resolution (checks a reader; how rare is a class)."""
    conds = tuple(c.strip() for c in conditions.split(",") if c.strip()) if conditions else None
    ds = open_dataset(dataset, data_root, split=split, require_labels=True, conditions=conds)
    result = dataset_stats(ds, workers=workers, progress=not as_json)
    if as_json:
        print(json.dumps(result))
        return
    total = sum(result["pixels_per_class"]) + result["ignored_pixels"]
    table = Table(title=f"{dataset} {split}: {result['n_images']} images, {total} pixels")
    for col in ("class", "pixels", "share"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, n in zip(result["class_names"], result["pixels_per_class"], strict=True):
        table.add_row(name, str(n), f"{n / max(total, 1):.2%}")
    table.add_row("(ignored)", str(result["ignored_pixels"]), f"{result['ignored_pixels'] / max(total, 1):.2%}")
    console.print(table)
    if result["unlisted_pixels"]:
        console.print(f"note: {result['unlisted_pixels']} pixels hold label values classes.toml does not list "
                      "(ignored)")
    if result["resized_labels"]:
        console.print(f"[yellow]warning:[/] {result['resized_labels']} labels differed in size from their image "
                      "and were resized (nearest neighbour)")
