"""Shared by the benchmark scripts: one `name=value` line per figure, a CUDA sync before reading a clock,
and the work folder (a temp dir unless --out is given)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def line(name: str, value: float | str, detail: str = "", fmt: str = ".4g") -> None:
    text = format(value, fmt) if isinstance(value, float) else str(value)
    print(f"{name}={text}" + (f"  ({detail})" if detail else ""), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_in_workdir(run: Callable[[argparse.Namespace, Path], None], args: argparse.Namespace, *, prefix: str) -> None:
    """Call run(args, folder): args.out if given (created), else a temp dir removed afterwards."""
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            run(args, Path(tmp))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args, args.out)
