"""Atomic training checkpoints (write to a temp file, fsync, rename) and their loading."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ssr_cache.errors import SSRError


def save_atomic(obj: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SSRError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise SSRError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
