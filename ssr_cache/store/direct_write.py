"""Writing a new file past the page cache (O_DIRECT), where the OS and the filesystem offer it.

Why: a build writes every view's ~2.6 MB once and reads none of it back. Through the page cache the CPU
copies each byte into freshly allocated cache pages: 8.5 ms of kernel time per 2.6 MB on the 2-core VM
(docs/benchmarks.md), about a sixth of the whole pipeline's CPU, and a 200 GB build also evicts whatever
else the node had cached. With O_DIRECT the device takes the bytes from one reused, page-aligned buffer per
thread (0.7 ms, most of it the copy into that buffer). Reading the file back (zarr, training) is unchanged.

O_DIRECT writes whole blocks from aligned memory, so the last block is padded with zeros and the file is
then truncated to its length. Where O_DIRECT is refused (no O_DIRECT on this OS, a filesystem without it:
EINVAL at open or at the first write) `write_direct` returns False having left nothing, and the caller
writes the file the plain way; the refusal is remembered per device.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

BLOCK = 4096  # a multiple of every logical block size O_DIRECT aligns to (512 or 4096)
BUFFER_BYTES = 8 << 20  # per writer thread; a multiple of BLOCK

_local = threading.local()
_refused_devices: set[int] = set()


def write_direct(path: str | os.PathLike, parts) -> bool:
    """Write the byte strings `parts`, in order, as the new file `path` (created or truncated) with O_DIRECT.
    True when written; False when O_DIRECT is refused here, with no file left at `path`. Other OS errors
    (disk full, …) propagate, possibly leaving a partial file at `path`: callers write to a temp name."""
    path = Path(path)
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or _device(path.parent) in _refused_devices:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        path.unlink(missing_ok=True)  # Linux may create the file before refusing O_DIRECT (ramfs does)
        _refused_devices.add(_device(path.parent))
        return False
    try:
        _write_blocks(fd, parts)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        refused = True
    else:
        refused = False
    finally:
        os.close(fd)
    if refused:
        path.unlink(missing_ok=True)
        _refused_devices.add(_device(path.parent))
    return not refused


def _write_blocks(fd: int, parts) -> None:
    """Copy the parts through this thread's aligned buffer, writing it whenever full; the tail is padded to
    a whole block, then cut off again by truncating the file to the parts' total length."""
    buf = _buffer()
    view = memoryview(buf)
    filled = total = 0
    for part in parts:
        data = memoryview(part).cast("B")
        while len(data):
            n = min(len(data), BUFFER_BYTES - filled)
            view[filled:filled + n] = data[:n]
            filled, total, data = filled + n, total + n, data[n:]
            if filled == BUFFER_BYTES:
                _write_all(fd, view)
                filled = 0
    if filled:
        padded = -(-filled // BLOCK) * BLOCK
        view[filled:padded] = bytes(padded - filled)
        _write_all(fd, view[:padded])
    os.ftruncate(fd, total)


def _write_all(fd: int, data: memoryview) -> None:
    written = os.write(fd, data)
    if written != len(data):  # a regular file writes short only when the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _buffer() -> mmap.mmap:
    """This thread's page-aligned staging buffer (anonymous mmap), kept warm across files."""
    buf = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = mmap.mmap(-1, BUFFER_BYTES)
    return buf


def _device(folder: Path) -> int:
    try:
        return os.stat(folder).st_dev
    except OSError:
        return -1
