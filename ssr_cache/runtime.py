"""Where and how a command computes: the device (`auto` = CUDA when present), CPU threads, and the one
line every long command prints first so a user sees at once what runs where."""

from __future__ import annotations

import os

import torch

from ssr_cache.errors import SSRError


# Measured (docs/benchmarks.md): on a shared 2-core machine a CPU training step ran 5–20x slower with 2
# intra-op threads than with 1; on an idle machine more threads help. Default: all cores minus one, at
# least 1, unless OMP_NUM_THREADS says otherwise.
def default_cpu_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) - 1)


def resolve_device(spec: str | None) -> torch.device:
    """`auto` (or None) → cuda when available, else cpu; `cpu`, `cuda`, `cuda:N` are checked, and a CUDA
    device that is not there is one line, not a driver traceback."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise SSRError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SSRError(f"--device {spec}: no CUDA GPU is available here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SSRError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise SSRError(f"--device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def set_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None: `default_cpu_threads()`); returns the count in effect."""
    if threads is not None and threads < 1:
        raise SSRError(f"--threads must be >= 1, got {threads}")
    n = threads or default_cpu_threads()
    torch.set_num_threads(n)
    return n


def runtime_line(device: torch.device, *, precision: str, threads: int | None = None, **extra: str) -> str:
    """`device cuda:0 (NVIDIA H200) · precision bf16 · threads 1 · backbone …` for a command's first line."""
    name = f"{device}"
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    parts = [f"device {name}", f"precision {precision}"]
    if threads is not None:
        parts.append(f"threads {threads}")
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in extra.items()]
    return " · ".join(parts)
