"""The Zarr feature store: layout, exact round trips, done flags, resume safety, URLs, sizes on disk."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from ssr_cache.errors import SSRError
from ssr_cache.store.feature_store import (
    CREATING_MARKER,
    FeatureStore,
    StoreLayout,
    check_fingerprint,
    store_exists,
    store_state,
)
from ssr_cache.store.inspect import store_info, verify_store

FINGERPRINT = {"encoder": {"name": "vit_b", "seed": 0}, "crop": [32, 32], "plan": {"seed": 0}, "dataset": "gta5"}


def view_arrays(n: int, n_samples: int = 5) -> dict[str, np.ndarray]:
    return {
        "sample_index": np.arange(n) % n_samples,
        "scale": np.linspace(0.5, 2.0, n),
        "resized_hw": np.tile([64, 96], (n, 1)),
        "box": np.tile([4, 8, 36, 40], (n, 1)),
        "flip": np.arange(n) % 2 == 1,
        "domain": np.zeros(n, np.uint8),
    }


def make_store(url, *, n=10, vps=4, dtype="float16", levels=(8, 4), channels=8, crop=(32, 32),
               overwrite=False) -> FeatureStore:
    layout = StoreLayout(n_views=n, crop_hw=crop, channels=channels, levels=levels,
                         feature_dtype=dtype, views_per_shard=vps)
    return FeatureStore.create(str(url), layout, view_arrays(n), [f"img{k}" for k in range(5)], FINGERPRINT,
                               overwrite=overwrite)


def shard_data(store: FeatureStore, shard: int, seed: int = 0) -> dict:
    """Deterministic inputs for one shard (a function of the shard and seed only)."""
    rng = np.random.default_rng([seed, shard])
    a, b = store.shard_range(shard)
    n, (h, w) = b - a, store.layout.crop_hw
    return {
        "pixels": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        "labels": rng.integers(0, 19, (n, h, w), dtype=np.uint8),
        "class_counts": rng.integers(0, 50, (n, 19)),
        "features": {name: rng.normal(0, 0.5, (n, *store.layout.feature_shape(name))).astype(np.float32)
                     for name in store.feature_names},
    }


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def data_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"]


def smooth_fields(rng, n: int, c: int, g: int, corr: float, std: float) -> np.ndarray:
    """Gaussian random fields with correlation length `corr` cells, per-channel offsets: SAM-map-like."""
    x = rng.standard_normal((n, c, g, g))
    k = np.fft.fftfreq(g)
    x = np.fft.ifft2(np.fft.fft2(x) * np.exp(-0.5 * (k[:, None] ** 2 + k ** 2) * (2 * np.pi * corr) ** 2)).real
    x = x / x.std(axis=(2, 3), keepdims=True) * std + rng.normal(0, std / 2, (n, c, 1, 1))
    return x.astype(np.float32)


def test_create_open_round_trip(tmp_path):
    url = tmp_path / "cache"
    created = make_store(url, n=10, vps=4, levels=(4, "l8"))
    store = FeatureStore.open(url)
    assert store.layout == created.layout
    assert store.layout.levels == (8, 4)
    assert store.feature_names == ("l8", "l4")
    assert store.fingerprint == FINGERPRINT
    assert store.sample_ids == [f"img{k}" for k in range(5)]
    assert store.n_shards == 3 and [store.shard_range(s) for s in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert store.pending_shards() == [0, 1, 2] and not store.done_mask().any()
    want = view_arrays(10)
    got = store.view_arrays()
    assert set(got) == set(want)
    for name, dtype in (("sample_index", np.int32), ("scale", np.float32), ("resized_hw", np.int32),
                        ("box", np.int32), ("flip", np.bool_), ("domain", np.uint8)):
        assert got[name].dtype == dtype
        np.testing.assert_array_equal(got[name], want[name].astype(dtype))
    attrs = store.attrs
    assert attrs["ssr_cache_format"] == 2 and attrs["n_views"] == 10 and attrs["views_per_shard"] == 4
    assert attrs["feature_dtype"] == "float16" and attrs["state"] == "ready" and "created" not in attrs  # no timestamp: builds compare bitwise
    assert not (url / CREATING_MARKER).exists()
    l8 = store.array("features/l8")
    assert l8.shape == (10, 8, 8, 8) and l8.chunks == (1, 8, 8, 8) and l8.shards == (4, 8, 8, 8)
    assert store.array("done").chunks == (4,) and store.array("labels").fill_value == 255
    with pytest.raises(SSRError, match="holds no ssr cache"):
        FeatureStore.open(tmp_path / "nothing", mode="r+")
    assert not (tmp_path / "nothing").exists()  # opening never creates a directory
    zarr.create_group(zarr.storage.LocalStore(tmp_path / "plain"), attributes={"x": 1})
    with pytest.raises(SSRError, match="not an ssr cache"):
        FeatureStore.open(tmp_path / "plain")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(SSRError, match="photos is not an ssr cache"):
        FeatureStore.open(tmp_path / "photos")


def test_write_then_read_is_exact_fp16(tmp_path):
    store = make_store(tmp_path / "c", n=10, vps=4)
    data = {s: shard_data(store, s) for s in range(store.n_shards)}
    for s, d in data.items():
        store.write_shard(s, **d)
    store = FeatureStore.open(tmp_path / "c")
    for v in (0, 5, 9):
        s, i = v // 4, v % 4
        got = store.read_view(v)
        assert got["pixels"].dtype == np.uint8 and got["label"].dtype == np.uint8
        np.testing.assert_array_equal(got["pixels"], data[s]["pixels"][i])
        np.testing.assert_array_equal(got["label"], data[s]["labels"][i])
        np.testing.assert_array_equal(got["class_counts"], data[s]["class_counts"][i])
        assert got["class_counts"].dtype == np.int32
        for name in ("l8", "l4"):
            g = int(name[1:])
            assert got["features"][name].dtype == np.float32 and got["features"][name].shape == (8, g, g)
            np.testing.assert_array_equal(got["features"][name],
                                          data[s]["features"][name][i].astype(np.float16).astype(np.float32))
    one = store.read_view(6, levels=[4], with_pixels=False)
    assert "pixels" not in one and set(one["features"]) == {"l4"}
    batch = store.read_views([9, 2, 2, 5], levels=["l8"])
    assert batch["pixels"].shape == (4, 32, 32, 3) and batch["features"]["l8"].shape == (4, 8, 8, 8)
    for k, v in enumerate([9, 2, 2, 5]):
        single = store.read_view(v, levels=["l8"])
        np.testing.assert_array_equal(batch["pixels"][k], single["pixels"])
        np.testing.assert_array_equal(batch["features"]["l8"][k], single["features"]["l8"])
    contiguous = store.read_views(range(3, 7))
    np.testing.assert_array_equal(contiguous["label"][1], data[1]["labels"][0])
    with pytest.raises(SSRError, match="no feature level l16"):
        store.read_view(0, levels=[16])


def test_int8_store_cosine_and_error_bound(tmp_path):
    store = make_store(tmp_path / "c", n=6, vps=6, dtype="int8", channels=64, levels=(16,))
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (6, 64, 16, 16)).astype(np.float32)
    d = shard_data(store, 0)
    store.write_shard(0, **{**d, "features": {"l16": x}})
    assert store.array("features/l16").dtype == np.uint8
    assert store.array("features/l16_scale").shape == (6, 64) and store.array("features/l16_offset").shards == (6, 64)
    y = store.read_views(range(6), with_pixels=False)["features"]["l16"]
    a, b = x.transpose(0, 2, 3, 1).reshape(-1, 64), y.transpose(0, 2, 3, 1).reshape(-1, 64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"int8 per-token cosine vs fp32: min {cos.min():.6f}, mean {cos.mean():.6f}")
    assert cos.min() >= 0.999
    step = (x.max(axis=(2, 3)) - x.min(axis=(2, 3))) / 255
    assert (np.abs(y - x) <= step[:, :, None, None] / 2 + 1e-5).all()


def test_done_only_after_write_and_pending_shards(tmp_path):
    store = make_store(tmp_path / "c", n=12, vps=4)
    assert store.pending_shards() == [0, 1, 2]
    store.write_shard(1, **shard_data(store, 1))
    mask = store.done_mask()
    assert mask.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert FeatureStore.open(tmp_path / "c").pending_shards() == [0, 2]
    bad = shard_data(store, 0)
    bad["features"]["l8"][1, 2, 3, 4] = np.nan
    with pytest.raises(SSRError, match="NaN/Inf"):
        store.write_shard(0, **bad)
    huge = shard_data(store, 1)
    huge["features"]["l4"][0, 0, 0, 0] = 1e6
    with pytest.raises(SSRError, match="overflow float16"):
        store.write_shard(1, **huge)
    assert store.done_mask().tolist() == mask.tolist()  # a refused write changes nothing
    with pytest.raises(ValueError, match="missing"):
        store.write_shard(2, **{**shard_data(store, 2), "features": {"l8": bad["features"]["l8"]}})
    with pytest.raises(SSRError, match="read-only"):
        FeatureStore.open(tmp_path / "c").write_shard(0, **shard_data(store, 0))


def test_last_partial_shard(tmp_path):
    store = make_store(tmp_path / "c", n=10, vps=4)
    assert store.shard_range(2) == (8, 10)
    d = shard_data(store, 2)
    assert d["pixels"].shape[0] == 2
    store.write_shard(2, **d)
    assert store.pending_shards() == [0, 1] and store.done_mask()[8:].all()
    np.testing.assert_array_equal(store.read_view(9)["pixels"], d["pixels"][1])
    np.testing.assert_array_equal(store.read_view(8)["features"]["l4"],
                                  d["features"]["l4"][0].astype(np.float16).astype(np.float32))
    with pytest.raises(IndexError):
        store.shard_range(3)
    small = make_store(tmp_path / "small", n=3, vps=64)  # fewer views than one shard
    assert small.n_shards == 1 and small.array("pixels").shards[0] == 3
    small.write_shard(0, **shard_data(small, 0))
    assert small.pending_shards() == []


def test_existing_store_refused_and_untouched(tmp_path):
    url = tmp_path / "c"
    store = make_store(url)
    store.write_shard(0, **shard_data(store, 0))
    before = tree_hashes(url)
    assert store_exists(url)
    with pytest.raises(SSRError, match="already exists"):
        make_store(url)
    assert tree_hashes(url) == before
    fresh = make_store(url, overwrite=True)
    assert fresh.pending_shards() == [0, 1, 2] and not fresh.done_mask().any()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(SSRError, match="not an ssr cache"):
            make_store(other, overwrite=overwrite)
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]
    (tmp_path / "empty").mkdir()
    assert not store_exists(tmp_path / "empty") and not store_exists(tmp_path / "missing")
    make_store(tmp_path / "empty")  # an empty directory is fine


def test_interrupted_create_is_recognised(tmp_path):
    url = tmp_path / "c"
    make_store(url)
    group = zarr.open_group(zarr.storage.LocalStore(url), mode="r+")
    group.update_attributes({"state": "creating"})  # as if killed before the last step of create
    with pytest.raises(SSRError, match="not fully created.*re-run"):
        FeatureStore.open(url)
    assert store_state(url) == "unfinished"
    assert make_store(url).attrs["state"] == "ready"  # finished by creating again, no --overwrite needed


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no cleanup handler of zarr's runs."""


def test_creation_killed_at_any_write_is_finished_by_creating_again(tmp_path, monkeypatch):
    """Kill the creation at its k-th file write, for every k, leaving that file half-written under the
    writer's temp name (what a kill mid-write leaves). Creating again (with or without --overwrite) must
    give exactly the cache an uninterrupted creation gives; before that, the folder is recognisably ours."""
    make_store(tmp_path / "ref")
    reference = tree_hashes(tmp_path / "ref")
    real_set = zarr.storage.LocalStore.set
    writes = []

    async def counting_set(self, key, value):
        writes.append(key)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    make_store(tmp_path / "count")
    n_writes = len(writes)
    assert writes[0] == CREATING_MARKER and n_writes > 10

    for k in range(n_writes):
        url = tmp_path / f"killed{k}"
        seen = []

        async def dying_set(self, key, value, k=k, seen=seen):
            if len(seen) == k:
                path = Path(self.root) / key
                path.parent.mkdir(parents=True, exist_ok=True)
                data = value.to_bytes()
                path.with_suffix(".0123456789abcdef.partial").write_bytes(data[: len(data) // 2])
                raise Killed
            seen.append(key)
            return await real_set(self, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", dying_set)
        with pytest.raises(Killed):
            make_store(url)
        monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
        assert store_state(url) in ("absent", "unfinished"), k
        if store_state(url) == "unfinished":
            with pytest.raises(SSRError, match="not fully created|holds no ssr cache|not an ssr cache"):
                FeatureStore.open(url)
        make_store(url, overwrite=bool(k % 2))
        assert tree_hashes(url) == reference, k


def test_foreign_folders_are_never_replaced(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    assert store_state(tmp_path / "photos") == "foreign"
    for overwrite in (False, True):
        with pytest.raises(SSRError, match="exists and is not an ssr cache"):
            make_store(tmp_path / "photos", overwrite=overwrite)
    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"x"
    (tmp_path / "empty").mkdir()
    assert store_state(tmp_path / "empty") == "absent" and make_store(tmp_path / "empty").n_views == 10


def test_fingerprint_mismatch_names_the_keys(tmp_path):
    store = make_store(tmp_path / "c")
    check_fingerprint(store, FINGERPRINT)
    with pytest.raises(SSRError) as err:
        check_fingerprint(store, {**FINGERPRINT, "crop": [256, 256]}, hint="pass --overwrite")
    msg = str(err.value)
    assert "crop 32x32" in msg and "this run uses crop 256x256" in msg and msg.endswith("pass --overwrite")
    assert "encoder" not in msg and "\n" not in msg
    with pytest.raises(SSRError, match=r"plan\.seed 0.*plan\.seed 7"):
        check_fingerprint(store, {**FINGERPRINT, "plan": {"seed": 7}})
    with pytest.raises(SSRError, match=r"encoder\.name vit_b.*encoder\.name vit_h"):
        check_fingerprint(store, {"encoder": {"name": "vit_h", "seed": 0}}, keys=["encoder"])
    check_fingerprint(store, {**FINGERPRINT, "crop": [256, 256]}, keys=["encoder", "plan"])
    with pytest.raises(SSRError, match=r"levels \(nothing\)"):
        check_fingerprint(store, {**FINGERPRINT, "levels": [64]})


def test_memory_url(tmp_path):
    url = f"memory://ssr-test-{uuid.uuid4().hex}/cache"
    assert not store_exists(url)
    store = make_store(url, n=6, vps=4)
    assert store.local_path is None and store_exists(url)
    d = shard_data(store, 1)
    store.write_shard(1, **d)
    again = FeatureStore.open(url)
    assert again.pending_shards() == [0]
    np.testing.assert_array_equal(again.read_view(5)["pixels"], d["pixels"][1])
    np.testing.assert_array_equal(again.read_view(4)["features"]["l8"],
                                  d["features"]["l8"][0].astype(np.float16).astype(np.float32))
    with pytest.raises(SSRError, match="already exists"):
        make_store(url)
    with pytest.raises(SSRError, match="holds no ssr cache"):
        FeatureStore.open(f"memory://ssr-test-{uuid.uuid4().hex}/none")
    assert store_info(url)["done_views"] == 2


@pytest.mark.parametrize("dtype, limit", [("float16", 0.45), ("int8", 0.23)])
def test_compression_ratio_on_smooth_fields(tmp_path, dtype, limit):
    store = make_store(tmp_path / "c", n=4, vps=4, dtype=dtype, channels=256, levels=(64, 32, 16))
    rng = np.random.default_rng(0)
    l64 = smooth_fields(rng, 4, 256, 64, corr=3.0, std=0.5)
    feats = {"l64": l64}
    for g in (32, 16):  # coarser levels are average-pooled, as the encoder makes them
        f = 64 // g
        feats[f"l{g}"] = l64.reshape(4, 256, g, f, g, f).mean(axis=(3, 5))
    store.write_shard(0, **{**shard_data(store, 0), "features": feats})
    info = {a["name"]: a for a in store_info(tmp_path / "c")["arrays"]}
    stored = sum(a["stored_bytes"] for name, a in info.items() if name.startswith("features/"))
    fp32 = sum(x.nbytes for x in feats.values())
    print(f"{dtype}: stored / fp32 = {stored / fp32:.4f} (l64 alone {info['features/l64']['stored_bytes'] / l64.nbytes:.4f})")
    assert stored / fp32 <= limit


def test_rewrite_is_bitwise_identical(tmp_path):
    for dtype in ("float16", "int8"):
        url = tmp_path / dtype
        store = make_store(url, n=10, vps=4, dtype=dtype)
        for s in range(store.n_shards):
            store.write_shard(s, **shard_data(store, s))
        before = tree_hashes(url)
        store.write_shard(2, **shard_data(store, 2))
        FeatureStore.open(url, mode="r+").write_shard(0, **shard_data(store, 0))
        assert tree_hashes(url) == before
        assert not list(url.rglob("*.partial"))


def test_file_count_is_per_shard_not_per_view(tmp_path):
    url = tmp_path / "c"
    store = make_store(url, n=200, vps=64, crop=(8, 8), channels=4, levels=(4, 2))
    for s in range(store.n_shards):
        store.write_shard(s, **shard_data(store, s))
    per_view = [p for p, spec in store.specs.items() if spec.per_view]
    assert store.n_shards == 4 and len(per_view) == 5  # pixels, labels, class_counts, l4, l2
    n_files = len(data_files(url))
    print(f"200 views, 64 per shard: {n_files} data files")
    assert n_files == 6 + 4 + len(per_view) * 4  # view table + done flags + one file per array per shard


def test_read_view_reads_only_its_chunk(tmp_path):
    url = tmp_path / "c"
    store = make_store(url, n=8, vps=8)
    d = shard_data(store, 0)
    store.write_shard(0, **d)
    shard = url / "pixels" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-(8 * 16 + 4):-4]), dtype="<u8").reshape(8, 2)  # (offset, nbytes) per view
    offset, nbytes = (int(v) for v in index[5])
    raw[offset + nbytes // 2] ^= 0xFF  # damage view 5's chunk only
    shard.write_bytes(bytes(raw))
    for v in (0, 4, 6, 7):
        np.testing.assert_array_equal(store.read_view(v)["pixels"], d["pixels"][v])
    with pytest.raises(ValueError, match="checksum"):
        store.read_view(5)


def test_torn_done_chunk_counts_as_not_done(tmp_path):
    url = tmp_path / "c"
    store = make_store(url, n=8, vps=4)
    for s in range(2):
        store.write_shard(s, **shard_data(store, s))
    flag = url / "done" / "c" / "1"
    flag.write_bytes(flag.read_bytes()[:3])  # a half-written flag file
    assert store.done_mask().tolist() == [True] * 4 + [False] * 4
    assert store.pending_shards() == [1]
    store.write_shard(1, **shard_data(store, 1))
    assert store.pending_shards() == []


CHILD = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_feature_store import shard_data
from ssr_cache.store.feature_store import FeatureStore
store = FeatureStore.open({url!r}, mode="r+")
print("ready", flush=True)
while True:
    for s in range(store.n_shards):
        store.write_shard(s, **shard_data(store, s))
"""


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_a_false_done_flag(tmp_path):
    url = tmp_path / "c"
    store = make_store(url, n=12, vps=4, channels=32, levels=(16, 8), crop=(64, 64))
    expected = {s: shard_data(store, s) for s in range(store.n_shards)}
    code = CHILD.format(tests=str(Path(__file__).parent), url=str(url))
    for delay in (0.05, 0.4, 0.9):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        reopened = FeatureStore.open(url)
        mask = reopened.done_mask()
        for s in range(store.n_shards):
            a, b = reopened.shard_range(s)
            if mask[a:b].all():
                got = reopened.read_views(range(a, b))
                np.testing.assert_array_equal(got["pixels"], expected[s]["pixels"])
                np.testing.assert_array_equal(got["features"]["l16"],
                                              expected[s]["features"]["l16"].astype(np.float16).astype(np.float32))
    resumed = FeatureStore.open(url, mode="r+")
    for s in resumed.pending_shards():
        resumed.write_shard(s, **expected[s])
    assert resumed.pending_shards() == []
    assert verify_store(str(url), progress=False).ok
