"""Checkpoints: written atomically and only when every tensor is finite; read by one loader
(`weights_only=True`, a one-line error for a missing, corrupt or non-finite file) that training resume,
evaluation and prediction all use."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr_cache.atomic_file import write_atomic
from ssr_cache.errors import SSRError

# Training checkpoints written before RNG states were stored as tensors hold numpy's MT19937 state as an
# ndarray; these are the only non-tensor globals such a file needs (nothing executable).
_LEGACY_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def non_finite_tensors(obj: Any) -> list[str]:
    """Names of the floating-point tensors in `obj` (nested dicts/lists) holding NaN or Inf."""
    return [name for name, t in _tensors(obj)
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


def _refuse_non_finite(obj: Any, path: Path, verb: str) -> None:
    bad = non_finite_tensors(obj)
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SSRError(f"{verb} {path}: {len(bad)} tensor(s) hold NaN/Inf, e.g. {bad[0]}{more}")


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Write `obj` atomically (temp file, fsync, rename); refuses, writing nothing, when a tensor is not finite."""
    path = Path(path)
    _refuse_non_finite(obj, path, "not writing")
    def write(handle) -> None:
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (disk full) this way
            raise OSError(f"the write failed, disk full? ({str(exc).splitlines()[0]})") from None

    write_atomic(path, write, fsync=True, what="checkpoint")


def load_checkpoint(path: str | Path, *, what: str = "checkpoint", check_finite: bool = True) -> Any:
    """The object in a torch file, on the CPU, loaded with weights_only=True. Missing, unreadable, foreign
    (needs code to unpickle) or — with ``check_finite`` — non-finite files are one-line SSRErrors.

    ``check_finite=False`` is for callers that use only part of the file and check that part themselves
    (inference keeps the shadow branch of a file whose other entries it ignores)."""
    path = Path(path)
    if not path.is_file():
        raise SSRError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a pickle of arbitrary objects, not a torn file
            raise SSRError(f"{path} is not a checkpoint ssr can read safely (it needs arbitrary code to load)") from None
        raise SSRError(f"cannot read {what} {path} (truncated or corrupt?)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, KeyError,
            zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SSRError(f"cannot read {what} {path} (truncated or corrupt?): {reason}") from None
    if check_finite:
        _refuse_non_finite(obj, path, "refusing")
    return obj


def unwrap_state_dict(obj: Any) -> Any:
    """The state dict inside a checkpoint: {"state_dict": …} (ours, mmseg) or {"model": …} (timm,
    DeiT), else `obj` itself. The one place that knows these wrappers."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj
