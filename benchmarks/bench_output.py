"""Shared by the benchmark scripts: one `name=value` line per figure, a CUDA sync before reading a clock
(on the device being measured), and the work folder (a temp dir unless --out is given)."""

from __future__ import annotations

import argparse
import gc
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def line(name: str, value: float | str, detail: str = "", fmt: str = ".4g") -> None:
    text = format(value, fmt) if isinstance(value, float) else str(value)
    print(f"{name}={text}" + (f"  ({detail})" if detail else ""), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def release_cached_memory(device: str) -> None:
    """Hand the blocks torch's allocator keeps cached back to the driver, for a process started next (a
    memory measurement, train_step after the build): vit_b at batch 32 in fp32 peaks near 80 GB."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def select_device(device: str) -> None:
    """Make cuda:N the current device, so that torch's device-less calls (synchronize, the memory
    statistics, get_device_name, pinned allocation) mean the GPU being measured, not cuda:0."""
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))


def run_in_workdir(run: Callable[[argparse.Namespace, Path], None], args: argparse.Namespace, *, prefix: str) -> None:
    """Call run(args, folder): args.out if given (created), else a temp dir removed afterwards."""
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            run(args, Path(tmp))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args, args.out)
