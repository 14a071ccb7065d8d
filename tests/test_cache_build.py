"""`ssr cache build` end to end on synthetic data with a random-init vit_tiny encoder."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import typer.main
from cache_helpers import TINY_BUILD, run_ssr, store_digest

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import (
    build_cache,
    decoding_workers,
    item_tensors,
    open_build_dataset,
    plan_build,
)
from ssr_cache.build.view_plan import ViewTable, apply_view
from ssr_cache.errors import SSRError
from ssr_cache.sam_encoder import build_sam_encoder, pool_levels
from ssr_cache.store.feature_store import FeatureStore
from ssr_cli.app import app
from ssr_cli.cache_commands import _parse_range
from ssr_cli.parsing import parse_size


def tiny_config(synth_root, out, **overrides) -> CacheBuildConfig:
    base = dict(dataset="gta5", data_root=synth_root / "gta5", out=str(out), sam="vit_tiny", crop=(64, 64),
                resize=(128, 64), views_per_image=2, views_per_shard=4, batch_size=2, workers=0)
    base.update(overrides)
    return CacheBuildConfig(**base)


@pytest.fixture(scope="module")
def gta_store(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "gta5.zarr"
    build_cache(tiny_config(synth_root, out), progress=False)
    return out


def test_store_holds_every_view_with_features_equal_to_a_direct_encoder_call(gta_store, synth_root):
    from ssr_cache.data.datasets import open_dataset

    store = FeatureStore.open(str(gta_store))
    assert store.layout.n_views == 12 and store.done_mask().all()
    assert store.fingerprint["encoder"]["random_init"] is True
    plan = ViewTable.from_arrays(store.view_arrays())
    ds = open_dataset("gta5", synth_root / "gta5")
    enc = build_sam_encoder("vit_tiny", seed=0)
    for v in (0, 5, 11):
        image, label = ds.load(int(plan.sample_index[v]))
        crop, label_crop = apply_view(image, label, plan.row(v))
        got = store.read_view(v)
        np.testing.assert_array_equal(got["pixels"], crop)
        np.testing.assert_array_equal(got["label"], label_crop)
        np.testing.assert_array_equal(got["class_counts"], np.bincount(label_crop[label_crop < 19].ravel(),
                                                                       minlength=19))
        ref = enc.encode(torch.from_numpy(crop[None]), levels=(16, 8, 4))
        for name in ("l16", "l8", "l4"):
            expected = ref[name][0].numpy().astype(np.float16).astype(np.float32)
            np.testing.assert_allclose(got["features"][name], expected, rtol=2e-3, atol=2e-3)


def test_pooled_levels_equal_pooling_the_stored_neck_map(gta_store):
    store = FeatureStore.open(str(gta_store))
    view = store.read_view(3)
    neck = torch.from_numpy(view["features"]["l16"][None])
    pooled = pool_levels(neck, (8, 4))
    for g in (8, 4):
        np.testing.assert_allclose(view["features"][f"l{g}"], pooled[f"l{g}"][0].numpy(), rtol=2e-3, atol=2e-3)


def test_target_views_are_unlabelled_and_never_use_labels(synth_root, tmp_path):
    out = tmp_path / "cs.zarr"
    result = build_cache(tiny_config(synth_root, out, dataset="cityscapes", data_root=synth_root / "cityscapes"),
                         progress=False)
    # the steady rate leaves out the start-up (planning, store creation, SAM load) that `seconds` includes
    assert result.built_views == result.n_views and 0 < result.encode_seconds < result.seconds
    assert result.views_per_second == pytest.approx(result.built_views / result.encode_seconds)
    store = FeatureStore.open(str(out))
    assert store.fingerprint["domain"] == 1 and store.fingerprint["plan"]["cat_max_ratio"] is None
    view = store.read_view(0)
    assert (view["label"] == 255).all() and view["class_counts"].sum() == 0


def test_rebuilding_with_other_settings_is_refused_and_leaves_the_store_untouched(gta_store, synth_root):
    before = store_digest(gta_store)
    with pytest.raises(SSRError, match="crop"):
        build_cache(tiny_config(synth_root, gta_store, crop=(32, 32)), progress=False)
    assert store_digest(gta_store) == before


def test_rerunning_the_same_build_reuses_every_view(gta_store, synth_root):
    before = store_digest(gta_store)
    result = build_cache(tiny_config(synth_root, gta_store), progress=False)
    assert result.reused_views == 12 and result.built_views == 0
    assert result.encode_seconds == 0 and result.views_per_second == 0
    assert store_digest(gta_store) == before


def test_int8_features_keep_cosine_above_0999(synth_root, tmp_path, gta_store):
    out = tmp_path / "int8.zarr"
    build_cache(tiny_config(synth_root, out, feature_dtype="int8", max_images=2), progress=False)
    q = FeatureStore.open(str(out))
    ref = FeatureStore.open(str(gta_store))
    for v in range(4):
        a = q.read_view(v)["features"]["l16"].ravel()
        b = ref.read_view(v)["features"]["l16"].ravel()
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos >= 0.999


def test_killed_build_resumes_to_a_bitwise_identical_store(synth_root, tmp_path):
    # 48 views in 12 shards, so that a SIGKILL lands mid-build; the reference is built without a kill.
    reference = tmp_path / "reference.zarr"
    build_cache(tiny_config(synth_root, reference, views_per_image=8), progress=False)
    out = tmp_path / "killed.zarr"
    args = ["cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"), "--out", str(out),
            *TINY_BUILD, "--views-per-image", "8"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ssr_cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and done_views(out) < 8:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = done_views(out)
    assert 8 <= done_at_kill < 48, "the kill must land mid-build"
    resumed = run_ssr(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"reused {done_at_kill}" in resumed.stdout
    assert store_digest(out) == store_digest(reference)


def done_views(path) -> int:
    try:
        return int(FeatureStore.open(str(path)).done_mask().sum())
    except Exception:
        return 0


def test_two_rank_torchrun_build_equals_one_rank(synth_root, tmp_path, gta_store):
    out = tmp_path / "ranks.zarr"
    env = dict(os.environ, OMP_NUM_THREADS="1", SSR_DIST_BACKEND="gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "ssr_cli", "cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"),
           "--out", str(out), *TINY_BUILD]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert store_digest(out) == store_digest(gta_store)


@pytest.mark.parametrize("extra, message", [
    (["--views-per-image", "0"], "--views-per-image must be at least 1"),
    (["--crop", "512"], "larger than"),
    (["--sam", "vit_q"], "vit_q"),
    (["--levels", "5"], "must divide"),
])
def test_bad_input_is_one_line_and_nonzero(synth_root, tmp_path, extra, message):
    out = tmp_path / "bad.zarr"
    result = run_ssr("cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"),
                     "--out", str(out), *TINY_BUILD, *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_wrong_checkpoint_type_is_refused(synth_root, tmp_path):
    enc = build_sam_encoder("vit_tiny", seed=1)
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(enc.state_dict(), ckpt)
    result = run_ssr("cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"),
                     "--out", str(tmp_path / "x.zarr"), *TINY_BUILD, "--sam", "vit_b", "--sam-checkpoint", str(ckpt))
    assert result.returncode == 2 and "vit_tiny" in result.stderr and "Traceback" not in result.stderr
    missing = run_ssr("cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"),
                      "--out", str(tmp_path / "y.zarr"), *TINY_BUILD, "--sam-checkpoint", str(tmp_path / "no.pth"))
    assert missing.returncode == 2 and "no.pth" in missing.stderr
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_read_only_output_is_a_clear_error(synth_root):
    result = run_ssr("cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"),
                     "--out", "/proc/ssr-cache.zarr", *TINY_BUILD)
    assert result.returncode == 2 and "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_prints_the_plan_without_building(synth_root, tmp_path):
    out = tmp_path / "dry.zarr"
    result = run_ssr("cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"),
                     "--out", str(out), "--sam", "vit_b", "--views-per-image", "4", "--dry-run", "--resize", "1280x640")
    assert result.returncode == 0, result.stderr
    assert "24 views" in result.stdout and "features/l64" in result.stdout and "features/l16" in result.stdout
    assert "2.0 MiB" in result.stdout  # 256x64x64 fp16 per view
    assert not out.exists()


def test_info_and_verify_cli_on_a_good_store(gta_store):
    info = run_ssr("cache", "info", str(gta_store))
    assert info.returncode == 0, info.stderr
    assert "12 views (12 done)" in info.stdout and "features/l16" in info.stdout and "random init" in info.stdout
    ok = run_ssr("cache", "verify", str(gta_store), "--deep", "--deep-views", "3")
    assert ok.returncode == 0, ok.stderr
    assert "12 views verified (deep)" in ok.stdout
    assert ok.stdout.splitlines()[0].startswith("device cpu") and "precision fp32" in ok.stdout.splitlines()[0]


def test_deep_verify_catches_features_that_decode_fine_but_are_wrong(gta_store, tmp_path):
    import shutil

    copy = tmp_path / "tampered.zarr"
    shutil.copytree(gta_store, copy)
    store = FeatureStore.open(str(copy), mode="r+")
    a, b = store.shard_range(0)
    views = store.read_views(list(range(a, b)))
    feats = {k: v * 1.05 for k, v in views["features"].items()}  # plausible values, wrong by 5%
    store.write_shard(0, pixels=views["pixels"], labels=views["label"], class_counts=views["class_counts"],
                      features=feats)
    shallow = run_ssr("cache", "verify", str(copy))
    assert shallow.returncode == 0  # every chunk is valid: only re-encoding can tell
    deep = run_ssr("cache", "verify", str(copy), "--deep", "--deep-views", "12")
    assert deep.returncode == 2 and "max relative error" in deep.stdout


@pytest.mark.parametrize("shared", [False, True])
def test_an_items_arrays_lie_in_one_block_each_aligned_and_apart(shared):
    # A decoding worker hands its item over as one block of shared memory (one file descriptor, not four).
    specs = {"views": ((3,), torch.int64), "pixels": ((3, 5, 7, 3), torch.uint8),
             "labels": ((3, 5, 7), torch.uint8), "counts": ((3, 19), torch.int32)}
    out = item_tensors(specs, shared=shared)
    storages = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(storages) == 1 and out["pixels"].untyped_storage().is_shared() == shared
    for name, (shape, dtype) in specs.items():
        t = out[name]
        assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 64 == 0
    for value, t in enumerate(out.values(), start=1):
        t.fill_(value)
    assert [int(t.min()) for t in out.values()] == [int(t.max()) for t in out.values()] == [1, 2, 3, 4]


def test_planning_threads_change_nothing_and_a_ratio_of_one_still_counts_classes(synth_root, tmp_path):
    cfg = tiny_config(synth_root, tmp_path / "unused", views_per_image=3)
    ds, labelled = open_build_dataset(cfg)
    one = plan_build(cfg, ds, labelled, progress=False, threads=1)
    three = plan_build(cfg, ds, labelled, progress=False, threads=3)
    assert labelled and one.views.digest() == three.views.digest()
    assert np.array_equal(one.image_class_counts, three.image_class_counts) and one.image_class_counts.min(initial=0) >= 0
    assert (one.image_class_counts.sum(axis=1) > 0).all()
    # cat_max_ratio >= 1 (or None) switches the crop rule off, not the full-resolution counts RCS samples by.
    for ratio in (1.0, None):
        ruleless = plan_build(dataclasses.replace(cfg, cat_max_ratio=ratio), ds, labelled, progress=False, threads=2)
        assert np.array_equal(ruleless.image_class_counts, one.image_class_counts), ratio


def test_every_build_flag_defaults_to_the_config_default():
    """Each default in one place: `ssr cache build` with no optional flag describes CacheBuildConfig()."""
    build = typer.main.get_command(app).commands["cache"].commands["build"]
    flags = {p.name: p.default for p in build.params}
    config = {f.name: f.default for f in dataclasses.fields(CacheBuildConfig) if f.default is not dataclasses.MISSING}
    w, h = parse_size(flags.pop("crop"))
    assert (h, w) == config["crop"]
    assert _parse_range(flags.pop("ratio_range")) == config["ratio_range"]
    shared = set(flags) & set(config)
    assert {"split", "sam", "views_per_image", "views_per_shard", "batch_size", "workers", "device",
            "feature_dtype", "seed", "direct_io", "overwrite"} <= shared
    assert {k: flags[k] for k in shared} == {k: config[k] for k in shared}


@pytest.mark.parametrize("workers, device, cores, world, expected", [
    (None, "cpu", 16, 1, 2), (None, "cuda", 16, 1, 8), (None, "cuda", 16, 2, 4), (None, "cuda", 16, 8, 2),
    (None, "cuda", 64, 1, 8), (None, "cuda", 2, 1, 2), (0, "cuda", 16, 1, 0), (5, "cpu", 16, 1, 5)])
def test_decoding_workers_default_to_half_the_ranks_cores_on_a_gpu(monkeypatch, workers, device, cores, world,
                                                                    expected):
    """On a GPU the decoding must keep up with a few hundred views/s (about 100 per worker); on a CPU SAM
    needs the cores. An explicit --workers always wins."""
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert decoding_workers(workers, torch.device(device), world) == expected


def test_negative_workers_are_refused_in_one_line(synth_root, tmp_path):
    with pytest.raises(SSRError, match=r"^--workers must be 0 \(decode in the main process\) or more, got -1$"):
        tiny_config(synth_root, tmp_path / "x", workers=-1)
