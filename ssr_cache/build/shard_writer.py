"""The build's back end: per-shard buffers that fill as views are encoded, and writer threads that compress
and write each shard the moment its last view arrives (overlapping the encoder, the last shard included).

Compression runs in numcodecs' Blosc, which releases the GIL, so N writer threads give up to N cores of
compression; each thread writes whole shards, so no two threads ever touch the same file.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from ssr_cache.errors import SSRError


def default_writer_threads() -> int:
    """Enough threads to keep a fast GPU fed, no more than the cores (at least 2: one may be waiting on I/O)."""
    return max(2, min(8, os.cpu_count() or 2))


class ShardBuffer:
    """One shard's inputs and encoded features, filled view by view (features already in their stored form).

    Buffers are recycled from shard to shard (`ShardBuffers.release`): a fresh 200 MB numpy buffer per shard
    cost more in page faults than copying into it did.
    """

    def __init__(self, rows: int, crop_hw: tuple[int, int], num_classes: int):
        # np.empty: every row is written before the shard counts as complete (has_inputs/has_features)
        self.pixels = np.empty((rows, *crop_hw, 3), np.uint8)
        self.labels = np.empty((rows, *crop_hw), np.uint8)
        self.counts = np.empty((rows, num_classes), np.int32)
        self._features: dict[str, np.ndarray] = {}
        self.has_inputs = np.zeros(rows, bool)
        self.has_features = np.zeros(rows, bool)
        self.start = self.stop = 0

    def reset(self, start: int, stop: int) -> ShardBuffer:
        self.start, self.stop = start, stop
        self.has_inputs[:] = False
        self.has_features[:] = False
        self.has_inputs[stop - start:] = self.has_features[stop - start:] = True  # rows past a short last shard
        return self

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return {"pixels": self.pixels[:self.n], "labels": self.labels[:self.n], "class_counts": self.counts[:self.n]}

    @property
    def features(self) -> dict[str, np.ndarray]:
        return {name: arr[:self.n] for name, arr in self._features.items()}

    def _rows(self, views: np.ndarray):
        """Rows of `views` in this buffer: a slice when they are consecutive (the usual case: no gather)."""
        idx = np.asarray(views) - self.start
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx) and (np.diff(idx) == 1).all():
            return slice(int(idx[0]), int(idx[-1]) + 1)
        return idx

    def put_inputs(self, views: np.ndarray, pixels, labels, counts) -> None:
        idx = self._rows(views)
        self.pixels[idx], self.labels[idx], self.counts[idx] = pixels, labels, counts
        self.has_inputs[idx] = True

    def put_features(self, views: np.ndarray, encoded: dict[str, torch.Tensor]) -> None:
        """Copy a batch's stored-form features (on any device) straight into this buffer's rows."""
        idx = self._rows(views)
        for name, x in encoded.items():
            if name not in self._features:
                self._features[name] = np.empty((len(self.pixels), *x.shape[1:]), torch_to_numpy_dtype(x.dtype))
            if isinstance(idx, slice):
                torch.from_numpy(self._features[name][idx]).copy_(x)  # one device-to-host copy, no temporary
            else:
                self._features[name][idx] = x.cpu().numpy()
        self.has_features[idx] = True

    @property
    def complete(self) -> bool:
        return bool(self.has_inputs.all() and self.has_features.all())


def torch_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


class ShardBuffers:
    """Routes each batch's views into the buffers of the shards they belong to; hands out complete shards
    and takes them back, once written, for the next shards."""

    def __init__(self, store, shards: list[int]):
        self.store = store
        self.buffers: dict[int, ShardBuffer] = {}
        self.shard_of: dict[int, int] = {}
        self._free: list[ShardBuffer] = []
        self._lock = threading.Lock()
        for s in shards:
            a, b = store.shard_range(s)
            self.shard_of.update(dict.fromkeys(range(a, b), s))

    def _buffer_for(self, shard: int) -> ShardBuffer:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            L = self.store.layout
            buf = ShardBuffer(L.shard_views, L.crop_hw, L.num_classes)
        return buf.reset(*self.store.shard_range(shard))

    def release(self, buf: ShardBuffer) -> None:
        """A written shard's buffer, free for the next shard (called from the writer threads)."""
        with self._lock:
            self._free.append(buf)

    def _split(self, views: np.ndarray):
        shards = np.array([self.shard_of[int(v)] for v in views])
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            if sel[-1] - sel[0] + 1 == len(sel):
                sel = slice(int(sel[0]), int(sel[-1]) + 1)  # a view, not a copy
            if int(s) not in self.buffers:
                self.buffers[int(s)] = self._buffer_for(int(s))
            yield int(s), sel

    def put_inputs(self, views: np.ndarray, pixels, labels, counts) -> None:
        for s, sel in self._split(views):
            self.buffers[s].put_inputs(views[sel], pixels[sel], labels[sel], counts[sel])

    def put_features(self, views: np.ndarray, encoded: dict[str, torch.Tensor]) -> list[tuple[int, ShardBuffer]]:
        """Store the batch's encoded features; returns the shards this completed (and forgets them)."""
        complete = []
        for s, sel in self._split(views):
            buf = self.buffers[s]
            buf.put_features(views[sel], {k: a[sel] for k, a in encoded.items()})
            if buf.complete:
                complete.append((s, self.buffers.pop(s)))
        return complete


class ShardWriter:
    """`threads` background threads writing whole shards; the first error re-raises in the caller (one line
    for disk full). A bounded queue keeps at most `threads` finished shards waiting in memory."""

    def __init__(self, store, threads: int = 2, on_written=None):
        self.store = store
        self.on_written = on_written  # called with each written shard's buffer (ShardBuffers.release)
        self.queue: queue.Queue = queue.Queue(maxsize=threads)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.shards_written = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"ssr-shard-writer-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            shard, buf = item
            if self.error is not None:
                continue
            try:
                self.store.write_shard(shard, **buf.inputs, encoded_features=buf.features)
                size = shard_disk_bytes(self.store, shard)
                if self.on_written is not None:
                    self.on_written(buf)
                with self._lock:
                    self.bytes_written += size
                    self.shards_written += 1
            except BaseException as exc:  # noqa: BLE001 - surfaced by submit()/close()
                self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            raise translate_os_error(self.error, self.store.url) from self.error

    def submit(self, shard: int, buf: ShardBuffer) -> None:
        self._check()
        self.queue.put((shard, buf))

    def close(self) -> None:
        """Write everything submitted, stop the threads, raise the first error."""
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        self._check()


def shard_disk_bytes(store, shard: int) -> int:
    """Bytes on disk of one shard across all arrays (local stores; 0 for remote URLs)."""
    root = getattr(store, "local_path", None)
    if root is None:
        return 0
    total = 0
    for pattern in (f"*/c/{shard}", f"features/*/c/{shard}", f"views/*/c/{shard}"):
        for path in Path(root).glob(pattern):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            total += sum(f.stat().st_size for f in files)
    return total


def translate_os_error(exc: BaseException, url: str) -> BaseException:
    """Disk full and other OS errors as one SSRError line; anything else unchanged."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return SSRError(f"out of disk space while writing {url}; finished shards are kept: free some space "
                            "and re-run the same command to resume")
        return SSRError(f"cannot write to {url}: {exc.strerror or exc}")
    return exc
