"""`ssr predict`: label maps for any images, from a run (the Predictor) or an exported ONNX/TorchScript file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssr_cache.errors import SSRError
from ssr_cache.runtime import resolve_device, runtime_line, set_cpu_threads
from ssr_cli.parsing import parse_size
from ssr_train.infer.export import ExportedModel
from ssr_train.infer.predict_files import check_output_folder, predict_files
from ssr_train.infer.predictor import SLIDE_CROP, SLIDE_STRIDE, Predictor
from ssr_train.infer.writers import parse_kinds

console = Console()


def predict(
    inputs: list[str] = typer.Argument(..., help="RUN INPUT…: a run folder, then image files, folders or globs "
                                       "(with --model: only inputs).", show_default=False),
    out: Path = typer.Option(..., "--out", help="Output folder (the input tree is mirrored below it)."),
    model: Path = typer.Option(None, "--model", help="An exported .onnx or .pt file instead of a run."),
    checkpoint: str = typer.Option("model", help="model, best or latest (with a run)."),
    save: str = typer.Option("trainid,color", help="Comma list of trainid, labelid (Cityscapes only), color, overlay."),
    mode: str = typer.Option("whole", help="whole or slide (with a run)."),
    crop: int = typer.Option(SLIDE_CROP, help="Slide window."),
    stride: int = typer.Option(SLIDE_STRIDE, help="Slide stride."),
    flip: bool = typer.Option(False, "--flip", help="Horizontal-flip test-time augmentation (with a run)."),
    resize: str = typer.Option(None, help="Resize WxH as in training (default: the run's)."),
    size: str = typer.Option(None, "--size", help="With --model: the WxH the file was exported for (checked)."),
    batch_size: int = typer.Option(1, help="Images of the same size per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N (with a run)."),
    threads: int = typer.Option(None, help="CPU threads (default: all cores but one, or OMP_NUM_THREADS)."),
    workers: int = typer.Option(2, help="Background decoding workers."),
) -> None:
    """Predict label maps for images: `ssr predict RUN img.png dir/ 'frames/*.jpg' --out preds`."""
    check_output_folder(out)
    n_threads = set_cpu_threads(threads)
    if model is not None:
        runner = ExportedModel(model, threads=n_threads)
        if size is not None and runner.input_size is not None and parse_size(size, what="--size") != runner.input_size:
            w, h = runner.input_size
            raise SSRError(f"{model.name} was exported for {w}x{h} images, not --size {size}")
        console.print(runtime_line(resolve_device("cpu"), precision="fp32", threads=n_threads,
                                   model=f"{model.name} ({model.suffix[1:]})"), highlight=False)
        images = inputs
    else:
        if len(inputs) < 2:
            raise SSRError("give a run folder and at least one input: ssr predict RUN INPUT… --out DIR "
                           "(or --model FILE INPUT…)")
        run, images = Path(inputs[0]), inputs[1:]
        kwargs = {"resize": parse_size(resize, what="--resize")} if resize else {}
        runner = Predictor.from_run(run, checkpoint, device=device, mode=mode, crop=crop, stride=stride, flip=flip,
                                    batch_size=batch_size, **kwargs)
        console.print(runtime_line(runner.device, precision=runner.precision, threads=n_threads,
                                   run=f"{run} ({checkpoint})"), highlight=False)
    kinds = parse_kinds(save, runner.label_space)
    summary = predict_files(runner, images, out, kinds, workers=workers, console=console, batch_size=batch_size)
    skipped = f", {len(summary.skipped)} skipped (listed in {out / 'skipped.txt'})" if summary.skipped else ""
    console.print(f"{summary.written} image(s) predicted in {summary.seconds:.1f} s "
                  f"({summary.images_per_second:.2f} img/s){skipped}; outputs in {out}", highlight=False)
