"""`ssr eval`: the shadow branch of a run on a dataset split (mIoU, per-class IoU, plots, predictions)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ssr_cache.data.datasets import DATASETS
from ssr_cache.errors import SSRError
from ssr_cache.runtime import runtime_line, set_cpu_threads
from ssr_cli.parsing import config_defaults, parse_size
from ssr_train.infer.eval_results import eval_folder, write_eval
from ssr_train.infer.evaluate import EvalRequest, evaluate_run

console = Console()
# The evaluation's defaults live in EvalRequest alone.
EVAL = config_defaults(EvalRequest)


def fmt(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def evaluate_command(
    run_arg: Path = typer.Argument(None, metavar="RUN", help="Run folder (or a model .pth file).", show_default=False),
    run: Path = typer.Option(None, "--run", help="The same as the RUN argument."),
    checkpoint: str = typer.Option(EVAL["checkpoint"], help="model, best or latest."),
    split: str = typer.Option(EVAL["split"], help="Split (Cityscapes val: 500 images; test: predictions only)."),
    data_root: Path = typer.Option(None, "--data-root", help="Dataset root (default: the target cache's)."),
    dataset: str = typer.Option(EVAL["dataset"], help=f"Dataset layout, one of: {', '.join(DATASETS)}."),
    mode: str = typer.Option(EVAL["mode"], help=f"whole or slide (crop {EVAL['crop']}, stride {EVAL['stride']}, "
                                                "logits averaged)."),
    crop: int = typer.Option(EVAL["crop"], help="Slide window."),
    stride: int = typer.Option(EVAL["stride"], help="Slide stride."),
    flip: bool = typer.Option(EVAL["flip"], "--flip", help="Horizontal-flip test-time augmentation."),
    resize: str = typer.Option(None, help="Resize WxH as in training (default: the run's)."),
    save_preds: Path = typer.Option(None, "--save-preds", help="Write labelIds/trainIds, colour and overlay PNGs here."),
    device: str = typer.Option(EVAL["device"], help="auto, cpu, cuda, cuda:N."),
    threads: int = typer.Option(None, help="CPU threads (default: all cores but one, or OMP_NUM_THREADS)."),
    workers: int = typer.Option(EVAL["workers"], help="Background decoding workers."),
) -> None:
    """Evaluate the shadow branch (no SAM): RUN/eval/<dataset>-<split>[-slide][-flip].json + matrix + chart."""
    if (run_arg is None) == (run is None):
        raise SSRError("give one run: ssr eval RUN (or --run RUN); compare evaluations with `ssr compare`")
    path = run_arg or run
    if save_preds is not None and save_preds.exists() and not save_preds.is_dir():
        raise SSRError(f"--save-preds {save_preds} is a file, not a folder")
    n_threads = set_cpu_threads(threads)
    request = EvalRequest(run=path, checkpoint=checkpoint, dataset=dataset, split=split, data_root=data_root,
                          resize=parse_size(resize, what="--resize") if resize else None, mode=mode, crop=crop,
                          stride=stride, flip=flip, device=device, workers=workers, save_preds=save_preds)
    result, predictor, context = evaluate_run(request, console=console,
                                              on_ready=lambda p: console.print(runtime_line(
                                                  p.device, precision=p.precision, threads=n_threads,
                                                  model=f"{path} ({checkpoint})"), highlight=False))
    if not result.has_labels:
        console.print(f"{dataset} {split} has no labels (or only placeholders): wrote predictions of "
                      f"{result.n_images} images to {save_preds}, no scores", highlight=False)
        return
    json_path = write_eval(eval_folder(path), result, context)
    _print_scores(json_path, context, result)
    console.print(f"wrote {json_path} (+ .npy, .png)" + (f"; predictions in {save_preds}" if save_preds else ""),
                  highlight=False)


def _print_scores(json_path: Path, context: dict, result) -> None:
    record = json.loads(json_path.read_text())
    table = Table(title=f"{context['dataset']} {context['split']} ({result.n_images} images, {record['mode']})")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, value in record["per_class"].items():
        table.add_row(name, fmt(value))
    table.add_row("[bold]mIoU", f"[bold]{fmt(record['miou'])}")
    for key in ("miou16", "miou13"):
        if key in record:
            table.add_row(f"[bold]{key.replace('miou', 'mIoU')}", f"[bold]{fmt(record[key])}")
    console.print(table)
    console.print(f"mIoU {fmt(record['miou'])}  mAcc {fmt(record['macc'])}  aAcc {fmt(record['aacc'])}")
