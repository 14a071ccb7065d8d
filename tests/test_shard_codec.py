"""The build's own shard encoder writes exactly the file zarr's sharding codec writes, so every zarr reader
(and every cache built before it) sees the same bytes; and several threads really do write at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_feature_store import make_store, shard_data, tree_hashes

from ssr_cache.store.feature_store import FeatureStore
from ssr_cache.store.inspect import verify_store
from ssr_cache.store.shard_codec import ShardEncoder


def with_edge_cases(data: dict, store: FeatureStore) -> dict:
    """Views equal to the fill value (which the store still writes as chunks) and -0.0 features."""
    data["pixels"][0] = 0
    data["labels"][1] = 255
    data["class_counts"][0] = 0
    for x in data["features"].values():
        x[0] = 0.0
        x[1] = -0.0
    return data


def write_all(store: FeatureStore, seed: int) -> None:
    for s in range(store.n_shards):
        store.write_shard(s, **with_edge_cases(shard_data(store, s, seed), store))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_shard_files_are_byte_identical_to_zarrs_own_write(tmp_path, monkeypatch, dtype):
    """10 views in shards of 4: two full shards and a short last one, with empty and -0.0 chunks."""
    ours = make_store(tmp_path / "ours", dtype=dtype)
    write_all(ours, seed=3)
    monkeypatch.setattr(ShardEncoder, "from_array", classmethod(lambda cls, array: None))  # zarr's path
    theirs = make_store(tmp_path / "theirs", dtype=dtype)
    write_all(theirs, seed=3)
    a, b = tree_hashes(tmp_path / "ours"), tree_hashes(tmp_path / "theirs")
    assert a.keys() == b.keys()
    differ = sorted(k for k in a if a[k] != b[k] and not k.endswith("zarr.json"))
    assert differ == []
    back = FeatureStore.open(str(tmp_path / "ours")).read_views([0, 1, 9])
    assert (back["pixels"][0] == 0).all() and (back["label"][1] == 255).all()
    if dtype == "float16":
        assert np.signbit(back["features"]["l8"][1]).all()
    # every view has a chunk of its own, constant ones included: verify tells written from missing by it
    report = verify_store(str(tmp_path / "ours"), progress=False)
    assert report.ok, report


def test_encoder_refuses_layouts_it_does_not_write(tmp_path):
    """Arrays that are not one-view chunks in sharded files (the done flags, view columns) go to zarr."""
    store = make_store(tmp_path / "s")
    assert ShardEncoder.from_array(store.array("pixels")) is not None
    assert ShardEncoder.from_array(store.array("done")) is None
    assert ShardEncoder.from_array(store.array("views/box")) is None


def test_writer_threads_compress_in_parallel(tmp_path):
    """Four threads writing four shards at once give the same files as one thread writing them in turn."""
    serial = make_store(tmp_path / "serial", n=16, vps=4)
    write_all(serial, seed=1)
    parallel = make_store(tmp_path / "parallel", n=16, vps=4)
    inputs = [with_edge_cases(shard_data(parallel, s, 1), parallel) for s in range(4)]
    threads = [threading.Thread(target=parallel.write_shard, args=(s,), kwargs=inputs[s]) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tree_hashes(tmp_path / "serial") == tree_hashes(tmp_path / "parallel")
