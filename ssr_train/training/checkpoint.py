"""Atomic training checkpoints (write to a temp file, fsync, rename) and their loading."""

from __future__ import annotations

from pathlib import Path

import torch

from ssr_cache.atomic_file import write_atomic
from ssr_cache.errors import SSRError


def save_atomic(obj: dict, path: str | Path) -> None:
    write_atomic(path, lambda handle: torch.save(obj, handle), fsync=True)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SSRError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise SSRError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
