"""Atomic file writes: a unique temp file beside the target, then a rename — a reader (or a resumed run)
sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ssr_cache.errors import SSRError


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, fsync: bool = False,
                 what: str = "") -> Path:
    """Call `write(handle)` on a temp file, then rename it to `path`. OSError → one-line SSRError."""
    path = Path(path)
    # Same folder, so the rename is atomic; plain open() keeps umask permissions (mkstemp would give 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise SSRError(f"{path}: cannot write{' ' + what if what else ''} ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):  # nothing to clean up when the folder itself was unusable
            tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, what: str = "") -> Path:
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")), what=what)
