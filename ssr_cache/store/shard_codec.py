"""One shard file of a per-view array, encoded in the calling threads to the exact bytes zarr writes.

Why not `array[a:b] = values`: zarr encodes every chunk through its single event-loop thread and a shared
executor, so N build writer threads never gave more than ~1.1x one thread (docs/benchmarks.md). Here the
writer threads compress views with numcodecs' Blosc (which releases the GIL off the main thread) and the
store writes the finished file's parts itself. The bytes are those of zarr's sharding codec for
our layout (bytes → blosc → crc32c per chunk, chunks in view order, uint64 (offset, length) index + crc32c
at the end; every view gets a chunk, even one equal to the fill value, as the store's writable arrays are
configured: `verify` tells written from missing by it); tests/test_shard_codec.py compares them to zarr's
own file byte for byte, and reading still goes through zarr. The build compresses each view's chunks
(`encode_chunk`) as soon as the view is encoded and writes the shard's `file_parts` once all are there.
"""

from __future__ import annotations

import sys

import google_crc32c
import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

EMPTY = np.uint64(2**64 - 1)  # the index entry of a chunk that is not stored (views past the array's end)
_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


def _crc32c(data) -> bytes:
    return np.array([google_crc32c.value(data)], "<u4").tobytes()


def numcodecs_blosc(codec: BloscCodec, typesize: int) -> numcodecs.Blosc:
    """The numcodecs compressor that writes the bytes of zarr's `codec` for elements of `typesize` bytes."""
    return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=_SHUFFLE[codec.shuffle.value],
                           blocksize=codec.blocksize, typesize=typesize)


class ShardEncoder:
    """Encodes the views of one shard of `array` (chunks of one view, shards of `shard_views`).

    `from_array` returns None for any other codec layout, so callers fall back to zarr's own write path.
    """

    def __init__(self, *, blosc: numcodecs.Blosc, dtype: np.dtype, shard_views: int):
        self.blosc = blosc
        self.dtype = np.dtype(dtype)
        self.shard_views = shard_views

    @classmethod
    def from_array(cls, array) -> ShardEncoder | None:
        meta = array.metadata
        if sys.byteorder != "little" or len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
            return None
        sharding = meta.codecs[0]
        inner, index = list(sharding.codecs), list(sharding.index_codecs)
        shard_shape = meta.chunk_grid.chunk_shape
        if not (
            sharding.index_location == ShardingCodecIndexLocation.end
            and len(inner) == 3 and isinstance(inner[0], BytesCodec) and isinstance(inner[1], BloscCodec)
            and isinstance(inner[2], Crc32cCodec)
            and len(index) == 2 and isinstance(index[0], BytesCodec) and isinstance(index[1], Crc32cCodec)
            and tuple(sharding.chunk_shape) == (1, *shard_shape[1:]) and tuple(shard_shape[1:]) == meta.shape[1:]
        ):
            return None
        b = inner[1]
        return cls(blosc=numcodecs_blosc(b, b.typesize), dtype=array.dtype, shard_views=int(shard_shape[0]))

    def encode_chunk(self, view: np.ndarray) -> bytes:
        """One view's chunk (blosc-compressed; its crc32c is added by `file_parts`). Thread-safe: the build's
        writer threads compress views as they arrive, before their shard is complete."""
        return self.blosc.encode(np.ascontiguousarray(view, self.dtype))

    def file_parts(self, chunks: list[bytes]) -> list[bytes]:
        """The shard file as a list of byte strings to write in order (no joined copy of the shard):
        each chunk with its crc32c, then the index. len(chunks) <= shard_views (the last shard may be short)."""
        index = np.full((self.shard_views, 2), EMPTY, "<u8")
        parts, offset = [], 0
        for i, data in enumerate(chunks):
            parts += [data, _crc32c(data)]
            length = len(data) + 4
            index[i] = offset, length
            offset += length
        index_bytes = index.tobytes()
        return [*parts, index_bytes, _crc32c(index_bytes)]
