"""`ssr export`: the shadow branch of a run as one ONNX or TorchScript file (preprocessing inside)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssr_cli.parsing import parse_size
from ssr_train.infer.export import export_model
from ssr_train.infer.run_model import load_run_model

console = Console()


def export(
    run: Path = typer.Argument(..., help="Run folder (or a model .pth file).", show_default=False),
    out: Path = typer.Option(..., "--out", help="The file to write (.onnx or .pt)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    checkpoint: str = typer.Option("model", help="model, best or latest."),
    output: str = typer.Option("labels", help="labels (uint8 class map) or logits (float32, full resolution)."),
    size: str = typer.Option(None, "--size", help="Input WxH fixed in the graph (default: the run's resize)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="ONNX: any height and width."),
) -> None:
    """Export the shadow branch: uint8 RGB (N, 3, H, W) in, labels or logits at (H, W) out."""
    loaded = load_run_model(run, checkpoint)
    wh = parse_size(size, what="--size") if size else None
    path = export_model(loaded, out, fmt=fmt, size=wh, dynamic=dynamic, output=output)
    w, h = wh or loaded.resize
    shape = "dynamic H, W" if dynamic else f"{w}x{h}"
    console.print(f"wrote {path} ({fmt}, input uint8 RGB (N, 3, H, W) at {shape}, output {output}, "
                  f"{loaded.label_space.num_classes} classes of {loaded.label_space.name})", highlight=False)
