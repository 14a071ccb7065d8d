"""`ssr data …`: synthesise the two-domain demo data, per-image class statistics."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssr_cli.parsing import parse_size

data_app = typer.Typer(help="Datasets: synthetic two-domain data, class statistics.", no_args_is_help=True)
console = Console()


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write gta5/, gta5_val/ and cityscapes/ into."),
    train: int = typer.Option(200, help="Training images per domain."),
    val: int = typer.Option(50, help="Validation images per domain."),
    size: str = typer.Option("512x256", help="Image size WxH."),
    seed: int = typer.Option(0, help="Random seed (same seed → identical files)."),
    workers: int = typer.Option(1, help="Processes used to render."),
) -> None:
    """Write procedurally rendered street scenes in the real GTA5 and Cityscapes layouts."""
    from ssr_cache.data.synthetic import synthesize

    summary = synthesize(out, train=train, val=val, size=parse_size(size), seed=seed, workers=workers)
    console.print(f"wrote synthetic data to {out}: {summary}")


@data_app.command("stats")
def stats(
    dataset: str = typer.Option(..., help="gta5 or cityscapes."),
    data_root: Path = typer.Option(..., "--data-root", help="Dataset root folder (real layout)."),
    split: str = typer.Option("train", help="Split (Cityscapes: train/val/test)."),
    out: Path = typer.Option(None, help="Output JSON (default: ROOT/class_stats_SPLIT.json)."),
    workers: int = typer.Option(2, help="Processes reading labels."),
) -> None:
    """Per-image class pixel counts (the input of rare-class sampling)."""
    from ssr_cache.data.class_stats import compute_class_counts, write_class_stats
    from ssr_cache.data.datasets import open_dataset

    ds = open_dataset(dataset, data_root, split=split, require_labels=True)
    sample_ids, counts, n_resized = compute_class_counts(ds, workers=workers, progress=True)
    target = out or data_root / f"class_stats_{split}.json"
    write_class_stats(target, dataset, sample_ids, counts)
    console.print(f"{len(sample_ids)} images, class statistics written to {target}")
    if n_resized:
        console.print(f"[yellow]warning:[/] {n_resized} labels differed in size from their image "
                      "and were resized (nearest neighbour)")
