"""The build's back end: writer threads that compress each batch's views the moment they are encoded and
write a shard as soon as its last view is compressed (overlapping the encoder, the last shard included).

Why streaming: a shard is about 230 MB of raw crops and features. Gathering it first meant copying every view
into a shard buffer and joining the compressed shard into one more buffer before writing; now a view is
compressed straight from the batch it arrived in, a shard waits as its compressed chunks only, and the file
is written part by part. Compression runs in numcodecs' Blosc, which releases the GIL, so N writer threads
give up to N cores of it; whichever thread compresses a shard's last view writes that shard's files.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssr_cache.errors import SSRError


def default_writer_threads(ranks_on_node: int = 1) -> int:
    """Enough threads to keep a fast GPU fed, no more than this rank's share of the node's cores (torchrun:
    the node's ranks share them), and at least 2: one may be waiting on I/O."""
    return max(2, min(8, (os.cpu_count() or 2) // max(1, ranks_on_node)))


@dataclass
class _PendingShard:
    """The compressed chunks of one shard, filled in view order as batches are compressed."""

    start: int
    size: int
    chunks: dict[str, list] = field(default_factory=dict)

    def __post_init__(self):
        self.missing = self.size


class ShardStream:
    """`threads` background threads that compress submitted batches and write complete shards.

    A bounded queue keeps at most 2 x threads batches waiting (their crops and features stay referenced
    until compressed). The first error re-raises in the caller, as one line for disk full; shards completed
    before it are still written, so a re-run resumes after them.
    """

    def __init__(self, store, shards: list[int], threads: int = 2):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=2 * threads)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.shards_written = 0
        self._lock = threading.Lock()
        self._pending: dict[int, _PendingShard] = {}
        for s in shards:
            start, stop = store.shard_range(s)
            self._pending[s] = _PendingShard(start=start, size=stop - start)
        self.threads = [threading.Thread(target=self._run, name=f"ssr-shard-writer-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, views: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Views (consecutive or not, of any shards given at construction) and their stored arrays
        ({path: (n, ...)}, `FeatureStore.stored_arrays`), compressed and written in the background."""
        self._check()
        views = np.asarray(views)
        shards = {self.store.shard_of(int(v)) for v in views}
        with self._lock:
            foreign = sorted(shards - set(self._pending))
        if foreign or len(np.unique(views)) != len(views):
            raise ValueError(f"views must be distinct and of the stream's pending shards (not {foreign})")
        self.queue.put((views, arrays))

    def close(self) -> None:
        """Compress and write everything submitted, stop the threads, raise the first error."""
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise translate_os_error(self.error, self.store.url) from self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the caller stops at its next submit
            try:
                self._compress(*item)
            except BaseException as exc:  # noqa: BLE001 - surfaced by submit()/close()
                with self._lock:
                    self.error = self.error or exc  # the first one: later ones are usually its echoes

    def _compress(self, views: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        encoded = {path: self.store.encode_chunks(path, values) for path, values in arrays.items()}
        complete = []
        with self._lock:
            for row, view in enumerate(views.tolist()):
                shard = self.store.shard_of(view)
                pending = self._pending[shard]
                for path, chunks in encoded.items():
                    slots = pending.chunks.setdefault(path, [None] * pending.size)
                    slots[view - pending.start] = chunks[row]
                pending.missing -= 1
                if pending.missing == 0:
                    complete.append(shard)
            done = [(s, self._pending.pop(s)) for s in complete]
        for shard, pending in done:
            self.store.write_shard_chunks(shard, pending.chunks)
            size = shard_disk_bytes(self.store, shard)
            with self._lock:
                self.bytes_written += size
                self.shards_written += 1


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
