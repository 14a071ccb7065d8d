"""`ssr eval`: the shadow branch of a run on a validation split (mIoU, per-class IoU, plots, predictions)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ssr_cache.errors import SSRError
from ssr_cli.parsing import parse_size

console = Console()


def default_data_source(cfg) -> tuple[Path | None, tuple[int, int] | None]:
    """The target cache remembers the dataset root and the resize it was built with."""
    url = cfg.data.target_cache
    if not url:
        return None, None
    try:
        from ssr_cache.store.feature_store import FeatureStore

        store = FeatureStore.open(url, mode="r")
    except SSRError:
        return None, None
    build = store.attrs.get("build_config") or {}
    resize = tuple(store.fingerprint.get("plan", {}).get("resize") or ()) or None
    return (Path(build["data_root"]) if build.get("data_root") else None), resize


def print_scores(title: str, per_class: dict, miou: float | None, macc: float | None, aacc: float | None) -> None:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, value in per_class.items():
        table.add_row(name, "n/a" if value is None else f"{value:.2f}")
    table.add_row("[bold]mIoU", f"[bold]{miou:.2f}" if miou is not None else "n/a")
    console.print(table)
    console.print(f"mIoU {_fmt(miou)}  mAcc {_fmt(macc)}  aAcc {_fmt(aacc)}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def print_comparison(run_a: Path, run_b: Path) -> None:
    from ssr_train.infer.eval_plots import compare_runs, plot_iou_delta

    rows = compare_runs(run_a, run_b)
    table = Table(title=f"{run_b.name} − {run_a.name}")
    for col in ("class", run_a.name, run_b.name, "Δ"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in rows:
        delta = "n/a" if r.delta is None else (f"[green]+{r.delta:.2f}" if r.delta >= 0 else f"[red]{r.delta:.2f}")
        table.add_row(r.name, _fmt(r.a), _fmt(r.b), delta)
    console.print(table)
    path = plot_iou_delta(rows, run_b / f"compare_vs_{run_a.name}.png", label_a=run_a.name, label_b=run_b.name)
    console.print(f"delta chart: {path}")


def evaluate_command(
    split: str = typer.Option("val", help="Split to evaluate (Cityscapes val: 500 images)."),
    run: Path = typer.Option(None, "--run", help="Run directory (uses its model.pth; eval.json goes there)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="An exported model.pth instead of --run."),
    data_root: Path = typer.Option(None, "--data-root", help="Dataset root (default: the target cache's)."),
    dataset: str = typer.Option("cityscapes", help="Dataset layout: cityscapes or gta5."),
    mode: str = typer.Option("whole", help="whole or slide (crop 512, stride 341, logits averaged)."),
    crop: int = typer.Option(512, help="Slide window."),
    stride: int = typer.Option(341, help="Slide stride."),
    flip: bool = typer.Option(False, "--flip", help="Horizontal-flip test-time augmentation."),
    resize: str = typer.Option(None, help="Resize WxH as in training (default: the target cache's, else 1024x512)."),
    save_preds: Path = typer.Option(None, "--save-preds", help="Write labelId, colour and overlay PNGs here."),
    compare: bool = typer.Option(False, "--compare", help="Compare two evaluated runs: --compare RUN_A RUN_B."),
    runs: list[Path] = typer.Argument(None, help="With --compare: RUN_A RUN_B.", show_default=False),
    device: str = typer.Option("cpu", help="cpu, cuda …"),
    workers: int = typer.Option(2, help="Background decoding workers."),
) -> None:
    """Evaluate the shadow branch (no SAM, no regulariser weights) and write eval.json + a bar chart."""
    if compare:
        if not runs or len(runs) != 2:
            raise SSRError("--compare takes two run directories: --compare RUN_A RUN_B")
        print_comparison(runs[0], runs[1])
        return
    if runs:
        raise SSRError(f"unexpected argument(s) {' '.join(map(str, runs))} (did you mean --compare?)")
    if (run is None) == (checkpoint is None):
        raise SSRError("give exactly one of --run RUN_DIR or --checkpoint model.pth (or --compare RUN_A RUN_B)")
    if mode not in ("whole", "slide"):
        raise SSRError(f"--mode must be whole or slide, got {mode!r}")
    from ssr_cache.data.datasets import open_dataset
    from ssr_train.infer.eval_plots import plot_class_iou
    from ssr_train.infer.evaluation import evaluate, load_run_model, write_eval_json

    model, cfg = load_run_model(run or checkpoint)
    root_default, resize_default = default_data_source(cfg)
    root = data_root or root_default
    if root is None:
        raise SSRError("--data-root is required (the run's target cache does not record one)")
    size = parse_size(resize, what="--resize") if resize else (resize_default or (1024, 512))
    ds = open_dataset(dataset, root, split=split, require_labels=True)
    result = evaluate(model, ds, resize=size, mode=mode, crop=crop, stride=stride, flip=flip, device=device,
                      workers=workers, progress=True, save_preds=save_preds)
    out_dir = run or checkpoint.parent
    path = write_eval_json(out_dir, result, extra={"dataset": dataset, "split": split, "data_root": str(root)})
    per_class = dict(zip(*_names_and_iou(result), strict=True))
    chart = plot_class_iou(per_class, out_dir / "eval_iou.png", title=f"{out_dir.name} on {dataset} {split}",
                           miou=result.miou)
    print_scores(f"{out_dir.name}: {dataset} {split} ({result.n_images} images, {mode})", per_class,
                 result.miou, result.scores["macc"], result.scores["aacc"])
    console.print(f"wrote {path} and {chart}" + (f"; predictions in {save_preds}" if save_preds else ""))


def _names_and_iou(result):
    from ssr_train.infer.evaluation import class_names

    return class_names(len(result.scores["iou"])), result.scores["iou"]
