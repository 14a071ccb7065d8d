"""Shard files written past the page cache: the same bytes as a plain write, at every length around the
block and buffer sizes, the cache really bypassed, and a filesystem that refuses O_DIRECT (ramfs) written
the plain way with no trace of the attempt."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from cache_helpers import TINY_BUILD, run_ssr, store_digest

from ssr_cache.store.direct_write import BLOCK, BUFFER_BYTES, write_direct


def _parts(total: int, seed: int) -> list[bytes]:
    """Random bytes split at random places, with 4-byte parts (the crc32c's) in between."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, total, np.uint8).tobytes()
    cuts = sorted(rng.integers(0, total + 1, 5).tolist()) if total else []
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    return [p for piece in pieces for p in (piece, b"")] + [b"\x01\x02\x03\x04"]


def _direct_or_skip(path, parts) -> None:
    if not write_direct(path, parts):
        assert not path.exists()
        pytest.skip(f"O_DIRECT is not offered on {path.parent}'s filesystem")


@pytest.mark.parametrize("length", [0, 1, BLOCK - 5, BLOCK - 4, BLOCK, BLOCK + 1, BUFFER_BYTES - 4,
                                    BUFFER_BYTES + 3 * BLOCK + 7, 2 * BUFFER_BYTES + 1])
def test_a_direct_write_holds_exactly_the_parts(tmp_path, length):
    parts = _parts(length, seed=length)
    path = tmp_path / "shard"
    path.write_bytes(b"x" * (3 * BUFFER_BYTES))  # a longer old file: the write must truncate it
    _direct_or_skip(path, parts)
    assert path.read_bytes() == b"".join(parts)
    assert path.stat().st_size == length + 4


def test_threads_write_through_their_own_buffers(tmp_path):
    jobs = {tmp_path / f"f{i}": _parts(BUFFER_BYTES + 1000 * i, seed=i) for i in range(4)}
    _direct_or_skip(tmp_path / "probe", [b"p"])
    threads = [threading.Thread(target=write_direct, args=(p, parts)) for p, parts in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for path, parts in jobs.items():
        assert path.read_bytes() == b"".join(parts)


def _resident_pages(path) -> int:
    """Pages of `path` in the page cache (mincore over a read-only mapping of the file)."""
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapped:
        view = np.frombuffer(mapped, np.uint8)  # its address, without touching (faulting in) any page
        ok = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) == 0
        del view  # the mapping cannot close while exported
    if not ok:
        pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
    return sum(b & 1 for b in vec)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore residency is Linux's")
def test_a_direct_write_leaves_the_page_cache_alone(tmp_path):
    parts = _parts(4 << 20, seed=1)
    plain = tmp_path / "plain"
    with open(plain, "wb") as handle:
        handle.writelines(parts)
    direct = tmp_path / "direct"
    _direct_or_skip(direct, parts)
    pages = -(-direct.stat().st_size // mmap.PAGESIZE)
    assert _resident_pages(plain) == pages  # written through the cache: all of it is there
    assert _resident_pages(direct) == 0


def _can_mount_ramfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t ramfs ramfs /mnt"], capture_output=True
                          ).returncode == 0


@pytest.mark.skipif(not _can_mount_ramfs(), reason="cannot mount ramfs here (needs user namespaces)")
def test_a_filesystem_without_o_direct_gets_the_same_cache(synth_root, tmp_path):
    """ramfs refuses O_DIRECT: the build writes plainly there and the cache is byte for byte the one a
    direct-writing build makes elsewhere."""
    if not write_direct(tmp_path / "probe", [b"p"]):
        pytest.skip("O_DIRECT is not offered on tmp_path's filesystem either")
    args = ["cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"), *TINY_BUILD]
    reference = tmp_path / "direct.zarr"
    assert run_ssr(*args, "--out", str(reference)).returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = f"from ssr_cache.store.direct_write import write_direct as w; print(w('{mnt}/probe', [b'p']))"
    cli = " ".join([sys.executable, "-m", "ssr_cli", *args, "--out", str(mnt / "c.zarr")])
    script = f"""mount -t ramfs ramfs {mnt} || exit 99
{sys.executable} -c "{probe}" > {tmp_path}/probe.out; ls {mnt} > {tmp_path}/ls.out
{cli} > {tmp_path}/build.out 2>&1 || exit 98
cp -r {mnt}/c.zarr {tmp_path}/kept.zarr"""
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert done.returncode == 0, (tmp_path / "build.out").read_text() if done.returncode == 98 else done.stderr
    assert (tmp_path / "probe.out").read_text().strip() == "False"
    assert (tmp_path / "ls.out").read_text().strip() == ""  # the refused attempt left no file
    assert store_digest(tmp_path / "kept.zarr") == store_digest(reference)


def test_buffered_and_direct_builds_write_the_same_cache(synth_root, tmp_path):
    args = ["cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"), *TINY_BUILD]
    for name, flag in (("direct", "--direct-io"), ("buffered", "--buffered-io")):
        done = run_ssr(*args, "--out", str(tmp_path / f"{name}.zarr"), flag)
        assert done.returncode == 0, done.stderr
    assert store_digest(tmp_path / "direct.zarr") == store_digest(tmp_path / "buffered.zarr")
