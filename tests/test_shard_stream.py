"""The build's streaming writer: views compressed as their batches arrive, in any order and split across
shards, give exactly the files `write_shard` gives; a failing write is one line and keeps finished shards."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from test_feature_store import make_store, shard_data, tree_hashes

from ssr_cache.build.shard_writer import ShardStream, default_writer_threads
from ssr_cache.errors import SSRError
from ssr_cache.store.feature_store import FeatureStore


def all_views(store: FeatureStore, seed: int) -> dict:
    """Every view's inputs and raw features, as one (n_views, ...) array per key."""
    parts = [shard_data(store, s, seed) for s in range(store.n_shards)]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("pixels", "labels", "class_counts")}
    out["features"] = {name: np.concatenate([p["features"][name] for p in parts]) for name in store.feature_names}
    return out


def submit(stream: ShardStream, store: FeatureStore, data: dict, views: np.ndarray) -> None:
    arrays = store.stored_arrays(len(views), pixels=data["pixels"][views], labels=data["labels"][views],
                                 class_counts=data["class_counts"][views],
                                 features={k: v[views] for k, v in data["features"].items()})
    stream.submit(views, arrays)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_streamed_batches_write_the_files_write_shard_writes(tmp_path, dtype):
    """10 views in shards of 4 (the last one short), submitted as batches of 3 in shuffled order: batches
    that straddle two shards and views that are not consecutive, compressed by 3 threads."""
    serial = make_store(tmp_path / "serial", dtype=dtype)
    for s in range(serial.n_shards):
        serial.write_shard(s, **shard_data(serial, s, 7))
    streamed = make_store(tmp_path / "streamed", dtype=dtype)
    data = all_views(streamed, 7)
    order = np.random.default_rng(0).permutation(streamed.n_views)
    stream = ShardStream(streamed, list(range(streamed.n_shards)), threads=3)
    for k in range(0, len(order), 3):
        submit(stream, streamed, data, order[k:k + 3])
    stream.close()
    assert stream.shards_written == streamed.n_shards and stream.bytes_written > 0
    assert FeatureStore.open(str(tmp_path / "streamed")).done_mask().all()
    assert tree_hashes(tmp_path / "streamed") == tree_hashes(tmp_path / "serial")


def test_a_failed_write_is_one_line_and_finished_shards_stay_done(tmp_path):
    store = make_store(tmp_path / "c", n=8, vps=4)
    data = all_views(store, 1)
    stream = ShardStream(store, [0, 1], threads=2)
    submit(stream, store, data, np.arange(4))
    while stream.shards_written < 1 and stream.error is None:  # shard 0 is written before the damage
        time.sleep(0.01)
    shutil.rmtree(tmp_path / "c" / "pixels" / "c")
    (tmp_path / "c" / "pixels" / "c").write_text("not a folder")  # shard 1's pixels cannot be written
    submit(stream, store, data, np.arange(4, 8))
    with pytest.raises(SSRError, match=r"^cannot write to .*c: ") as info:
        stream.close()
    assert "\n" not in str(info.value)
    assert FeatureStore.open(str(tmp_path / "c")).done_mask().tolist() == [True] * 4 + [False] * 4


def test_views_of_other_shards_or_twice_are_refused_at_submit(tmp_path):
    store = make_store(tmp_path / "c", n=8, vps=4)
    data = all_views(store, 2)
    stream = ShardStream(store, [1], threads=1)
    with pytest.raises(ValueError, match=r"not \[0\]"):
        submit(stream, store, data, np.array([3, 4]))  # view 3 lies in shard 0, which this stream does not own
    with pytest.raises(ValueError, match="distinct"):
        submit(stream, store, data, np.array([4, 4]))
    submit(stream, store, data, np.arange(4, 8))
    stream.close()
    assert FeatureStore.open(str(tmp_path / "c")).done_mask().tolist() == [False] * 4 + [True] * 4


def test_a_killed_writers_temp_files_go_when_the_shard_is_rewritten(tmp_path):
    store = make_store(tmp_path / "c", n=8, vps=4)
    key = tmp_path / "c" / store.shard_key("features/l8", 1)
    key.parent.mkdir(parents=True, exist_ok=True)
    leftover = key.with_name(f"{key.name}.0123456789abcdef.partial")
    leftover.write_bytes(b"half a shard")
    stream = ShardStream(store, [0, 1], threads=2)
    submit(stream, store, all_views(store, 3), np.arange(8))
    stream.close()
    assert not leftover.exists() and not list((tmp_path / "c").rglob("*.partial"))


@pytest.mark.parametrize("cores, world, expected", [(16, 1, 8), (16, 4, 4), (16, 8, 2), (64, 8, 8), (2, 1, 2),
                                                     (1, 1, 2)])
def test_default_writer_threads_are_this_ranks_share_of_the_cores(monkeypatch, cores, world, expected):
    """torchrun ranks share a node: 8 ranks on 16 cores get 2 writers each, not 8 (64 threads on 16 cores)."""
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert default_writer_threads(world) == expected
