"""`store_info` sizes and counts; `verify_store` finds unfinished, damaged, missing and non-finite data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssr_cache.errors import SSRError
from ssr_cache.store.feature_store import FeatureStore, StoreLayout
from ssr_cache.store.inspect import store_info, verify_store


def build(url: Path, *, n=10, vps=4, dtype="float16", write=(0, 1, 2)) -> FeatureStore:
    layout = StoreLayout(n_views=n, crop_hw=(16, 16), channels=8, levels=(8, 4), feature_dtype=dtype,
                         views_per_shard=vps)
    arrays = {"sample_index": np.arange(n), "scale": np.ones(n), "resized_hw": np.tile([32, 32], (n, 1)),
              "box": np.tile([0, 0, 16, 16], (n, 1)), "flip": np.zeros(n, bool), "domain": np.zeros(n, np.uint8)}
    store = FeatureStore.create(str(url), layout, arrays, [f"s{i}" for i in range(n)], {"dataset": "gta5"})
    rng = np.random.default_rng(0)
    for s in write:
        a, b = store.shard_range(s)
        k = b - a
        store.write_shard(s, pixels=rng.integers(0, 256, (k, 16, 16, 3), dtype=np.uint8),
                          labels=np.full((k, 16, 16), 255, np.uint8), class_counts=np.zeros((k, 19), np.int64),
                          features={name: rng.normal(size=(k, *layout.feature_shape(name))).astype(np.float32)
                                    for name in layout.feature_names})
    return store


def chunk_range(shard_file: Path, n_chunks: int, index: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk `index` from the shard index at the end of the file."""
    raw = shard_file.read_bytes()
    table = np.frombuffer(raw[-(n_chunks * 16 + 4):-4], dtype="<u8").reshape(n_chunks, 2)
    return int(table[index, 0]), int(table[index, 1])


def test_store_info_counts_and_sizes(tmp_path):
    build(tmp_path / "c", write=(0, 2))
    info = store_info(str(tmp_path / "c"))
    assert info["n_views"] == 10 and info["done_views"] == 6 and info["n_shards"] == 3
    assert info["fingerprint"] == {"dataset": "gta5"} and info["feature_names"] == ["l8", "l4"]
    arrays = {a["name"]: a for a in info["arrays"]}
    px = arrays["pixels"]
    assert px["shape"] == [10, 16, 16, 3] and px["chunks"] == [1, 16, 16, 3] and px["shards"] == [4, 16, 16, 3]
    assert px["raw_bytes"] == 6 * 16 * 16 * 3  # only the done views count as written
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c" / "pixels" / "c").rglob("*") if p.is_file())
    assert px["stored_bytes"] == on_disk and px["ratio"] == pytest.approx(on_disk / px["raw_bytes"])
    assert arrays["labels"]["stored_bytes"] / 6 < 100  # an all-255 label map of an unlabelled view is tiny
    assert arrays["features/l8"]["dtype"] == "float16" and arrays["views/box"]["shards"] is None
    total = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert info["total_stored_bytes"] == total
    assert info["n_files"] == sum(1 for p in (tmp_path / "c").rglob("*") if p.is_file())


def test_verify_clean_store(tmp_path):
    for dtype in ("float16", "int8"):
        build(tmp_path / dtype, dtype=dtype)
        report = verify_store(str(tmp_path / dtype), progress=False)
        assert report.ok and report.n_checked == 10 and report.n_done == 10, report.problems
    with pytest.raises(SSRError, match="holds no ssr cache"):
        verify_store(str(tmp_path / "missing"), progress=False)


def test_verify_reports_unfinished_views(tmp_path):
    build(tmp_path / "c", write=(1,))
    report = verify_store(str(tmp_path / "c"), progress=False)
    assert not report.ok and report.n_checked == 4
    assert [str(p) for p in report.problems] == [
        "done: 6 of 10 views are not done (shards 0, 2); re-run `ssr cache build` to finish"]


def test_verify_detects_corrupted_chunk(tmp_path):
    url = tmp_path / "c"
    build(url)
    shard = url / "features" / "l8" / "c" / "1" / "0" / "0" / "0"
    offset, nbytes = chunk_range(shard, 4, 2)  # view 4 + 2 = 6
    raw = bytearray(shard.read_bytes())
    for k in range(8):
        raw[offset + nbytes // 3 + k] ^= 0x5A
    shard.write_bytes(bytes(raw))
    report = verify_store(str(url), progress=False)
    assert [(p.array, p.view) for p in report.problems] == [("features/l8", 6)]
    assert "chunk cannot be read" in report.problems[0].message and "checksum" in report.problems[0].message
    assert report.n_checked == 10


def test_verify_detects_damaged_shard_index_and_missing_file(tmp_path):
    url = tmp_path / "c"
    build(url)
    pixels = url / "pixels" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(pixels.read_bytes())
    raw[-10] ^= 0xFF  # the shard index itself
    pixels.write_bytes(bytes(raw))
    (url / "labels" / "c" / "2" / "0" / "0").unlink()
    problems = verify_store(str(url), progress=False).problems
    assert sorted((p.array, p.view) for p in problems if p.array == "pixels") == [("pixels", v) for v in range(4)]
    missing = [p for p in problems if p.array == "labels"]
    assert len(missing) == 1 and "shard 2 (views 8-9) is marked done but its file" in missing[0].message


def test_verify_detects_nan_bad_scale_and_labels(tmp_path):
    url = tmp_path / "c"
    build(url)
    store = FeatureStore.open(str(url), mode="r+")
    feats = store.array("features/l4")
    block = feats[3]
    block[0, 1, 1] = np.nan
    feats[3] = block  # damage written behind write_shard's back
    labels = store.array("labels")
    lab = labels[7]
    lab[0, :5] = 40
    labels[7] = lab
    problems = verify_store(str(url), progress=False).problems
    assert [str(p) for p in problems] == ["features/l4 view 3: 1 NaN/Inf values",
                                          "labels view 7: 5 pixels are not a trainId or 255"]

    build(tmp_path / "q", dtype="int8")
    q = FeatureStore.open(str(tmp_path / "q"), mode="r+")
    scale = q.array("features/l8_scale")
    row = scale[9]
    row[2] = np.inf
    scale[9] = row
    problems = verify_store(str(tmp_path / "q"), progress=False).problems
    assert [str(p) for p in problems] == ["features/l8_scale view 9: 1 non-finite or negative int8 scales"]


def test_verify_runs_deep_check_on_good_views(tmp_path):
    url = tmp_path / "c"
    build(url, write=(0, 2))
    seen = []

    def deep(store, views):
        seen.append((store.url, list(views)))
        return [f"view {views[0]}: re-encoded features differ"]

    report = verify_store(str(url), progress=False, deep_check=deep)
    assert seen == [(str(url), [0, 1, 2, 3, 8, 9])]
    assert [str(p) for p in report.problems][-1] == "deep: view 0: re-encoded features differ"
