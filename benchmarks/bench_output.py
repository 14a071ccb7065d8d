"""Shared by the benchmark scripts: one `name=value` line per figure, and a CUDA sync before reading a clock."""

from __future__ import annotations

import torch


def line(name: str, value: float | str, detail: str = "", fmt: str = ".4g") -> None:
    text = format(value, fmt) if isinstance(value, float) else str(value)
    print(f"{name}={text}" + (f"  ({detail})" if detail else ""), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
