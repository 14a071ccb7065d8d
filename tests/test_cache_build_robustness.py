"""A build that survives its failures: interrupted store creation, disk full, unreadable images, a refused
output found before SAM loads; and SAM's precision as a recorded choice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from cache_helpers import TINY_BUILD, run_ssr, store_digest

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import build_cache
from ssr_cache.sam_encoder import build_sam_encoder
from ssr_cache.store.feature_store import CREATING_MARKER, FeatureStore, store_state


def build_args(synth_root, out, *extra) -> list[str]:
    return ["cache", "build", "--dataset", "gta5", "--data-root", str(synth_root / "gta5"), "--out", str(out),
            *TINY_BUILD, *extra]


@pytest.fixture(scope="module")
def reference(synth_root, tmp_path_factory):
    """The tiny build, uninterrupted (the CLI's settings)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    cfg = CacheBuildConfig(dataset="gta5", data_root=synth_root / "gta5", out=str(out), sam="vit_tiny",
                           crop=(64, 64), resize=(128, 64), views_per_image=2, views_per_shard=4, batch_size=2,
                           workers=0)
    build_cache(cfg, progress=False)
    return out


def test_first_line_states_device_precision_threads_and_the_cache_records_the_precision(synth_root, tmp_path):
    out = tmp_path / "c.zarr"
    result = run_ssr(*build_args(synth_root, out, "--max-images", "1"))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("device cpu") and "precision fp32" in first and "threads 1" in first
    store = FeatureStore.open(str(out))
    assert store.fingerprint["precision"] == "fp32"
    assert store.fingerprint["crop_definition"].startswith("cv2-inter-linear")
    info = run_ssr("cache", "info", str(out))
    assert info.returncode == 0 and "SAM precision fp32" in info.stdout
    refused = run_ssr(*build_args(synth_root, tmp_path / "d.zarr", "--autocast", "bf16", "--device", "cpu"))
    assert refused.returncode == 2 and "needs a CUDA device" in refused.stderr and "Traceback" not in refused.stderr
    bad = run_ssr(*build_args(synth_root, tmp_path / "e.zarr", "--autocast", "fp8"))
    assert bad.returncode == 2 and "--autocast must be one of bf16, fp16, fp32" in bad.stderr


def test_the_output_is_checked_before_sam_loads(synth_root, tmp_path):
    """A refused output is reported even when the checkpoint could not be loaded at all."""
    garbage = tmp_path / "sam.pth"
    garbage.write_bytes(b"not a checkpoint")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    result = run_ssr(*build_args(synth_root, tmp_path / "photos", "--sam-checkpoint", str(garbage)))
    assert result.returncode == 2 and "is not an ssr cache" in result.stderr and "sam.pth" not in result.stderr
    # ...and a checkpoint that fails to load leaves no store behind (creation comes after loading)
    result = run_ssr(*build_args(synth_root, tmp_path / "new.zarr", "--sam-checkpoint", str(garbage)))
    assert result.returncode == 2 and "sam.pth" in result.stderr and not (tmp_path / "new.zarr").exists()


def test_an_older_cache_format_is_refused_with_a_clear_line(synth_root, tmp_path, reference):
    old = tmp_path / "old.zarr"
    shutil.copytree(reference, old)
    meta = json.loads((old / "zarr.json").read_text())
    meta["attributes"]["ssr_cache_format"] = 1
    (old / "zarr.json").write_text(json.dumps(meta))
    result = run_ssr(*build_args(synth_root, old))
    assert result.returncode == 2 and "cache format 1" in result.stderr and "--overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    again = run_ssr(*build_args(synth_root, old, "--overwrite"))
    assert again.returncode == 0, again.stderr
    assert store_digest(old) == store_digest(reference)


@pytest.mark.parametrize("leftover", ["half_root_json", "marker_temp_only"])  # every write point: test_feature_store
def test_a_creation_killed_at_any_point_is_finished_by_rerunning(synth_root, tmp_path, reference, leftover):
    out = tmp_path / "c.zarr"
    out.mkdir()
    if leftover == "marker_temp_only":  # killed while the marker itself was written
        (out / "ssr-creating.5f2a.partial").write_bytes(b'{"ssr_ver')
    else:
        (out / CREATING_MARKER).write_text('{"ssr_version": "x"}')
    if leftover == "half_root_json":  # killed while the root zarr.json was written (zarr writes temp + rename)
        (out / "zarr.9c1d.partial").write_bytes(b'{"attributes": {"ssr_cache_fo')
    assert store_state(out) == "unfinished"
    result = run_ssr(*build_args(synth_root, out))
    assert result.returncode == 0, result.stderr
    assert store_digest(out) == store_digest(reference)


def test_overwrite_always_succeeds_on_a_folder_this_tool_started(synth_root, tmp_path, reference):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / CREATING_MARKER).write_text("{")
    (out / "zarr.9c1d.partial").write_bytes(b"{")
    (out / "pixels").mkdir()
    result = run_ssr(*build_args(synth_root, out, "--overwrite", "--seed", "5"))
    assert result.returncode == 0, result.stderr
    assert FeatureStore.open(str(out)).fingerprint["plan"]["seed"] == 5


def _damaged(good: bytes, damage: str) -> bytes:
    if damage == "truncated":
        return good[: len(good) // 2]
    flipped = bytearray(good)  # a flipped byte inside the compressed pixels: libpng's own message must
    flipped[len(flipped) // 2] ^= 0xFF  # end up in our one line, not on stderr beside it
    return bytes(flipped)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_an_unreadable_image_is_one_line_and_the_store_resumes_once_it_is_fixed(synth_root, tmp_path, reference,
                                                                               damage):
    data = tmp_path / "gta5"
    shutil.copytree(synth_root / "gta5", data)
    victim = sorted((data / "images").glob("*.png"))[4]  # views 8-9: the last of 3 shards
    good = victim.read_bytes()
    victim.write_bytes(_damaged(good, damage))
    out = tmp_path / "c.zarr"
    args = ["cache", "build", "--dataset", "gta5", "--data-root", str(data), "--out", str(out), *TINY_BUILD,
            "--workers", "1"]
    failed = run_ssr(*args)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and victim.name in failed.stderr
    store = FeatureStore.open(str(out))
    assert store.done_mask()[:8].all() and not store.done_mask()[8:].any()  # finished shards were kept
    victim.write_bytes(good)
    resumed = run_ssr(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "reused 8" in resumed.stdout
    # the data root is recorded in the build config, so compare the arrays, not that attribute
    got, want = store_digest(out), store_digest(reference)
    assert {k: v for k, v in got.items() if k != "zarr.json"} == {k: v for k, v in want.items() if k != "zarr.json"}


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a small tmpfs here (needs user namespaces)")
@pytest.mark.parametrize("size_kb", [8, 200])  # full during creation / full after some shards
def test_disk_full_is_one_line_and_rerunning_after_freeing_space_completes(synth_root, tmp_path, reference,
                                                                          size_kb):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = " ".join([sys.executable, "-m", "ssr_cli", *build_args(synth_root, mnt / "c.zarr")])
    script = f"""
mount -t tmpfs -o size={size_kb}k tmpfs {mnt} || exit 99
{cli} > {tmp_path}/first.out 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc
mount -o remount,size=64m {mnt}
{cli} > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
cp -r {mnt}/c.zarr {tmp_path}/kept.zarr
"""
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2", first_err
    assert "out of disk space" in first_err and "re-run" in first_err and "Traceback" not in first_err
    assert len(first_err.strip().splitlines()) == 1
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert store_digest(tmp_path / "kept.zarr") == store_digest(reference)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a small tmpfs here (needs user namespaces)")
@pytest.mark.parametrize("shm_kb", [4, 64])  # too small for the workers' queues / for the first crops
def test_full_shared_memory_is_one_line_and_the_build_resumes_without_workers(synth_root, tmp_path, reference,
                                                                              shm_kb):
    """A container's small /dev/shm (Docker's default is 64 MB) must not end in a DataLoader traceback."""
    out = tmp_path / "c.zarr"
    args = [*build_args(synth_root, out), "--workers", "1"]  # the last --workers wins
    script = f"mount -t tmpfs -o size={shm_kb}k tmpfs /dev/shm || exit 99\n" + " ".join([sys.executable, "-m", "ssr_cli", *args])
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "/dev/shm" in done.stderr and "--workers 0" in done.stderr
    resumed = run_ssr(*build_args(synth_root, out))  # --workers 0, as the message says
    assert resumed.returncode == 0, resumed.stderr
    got, want = store_digest(out), store_digest(reference)
    assert {k: v for k, v in got.items() if k != "zarr.json"} == {k: v for k, v in want.items() if k != "zarr.json"}


@pytest.mark.parametrize("factor, dtype, message", [
    (1e6, "float16", "overflow float16"),  # the float16 store's limit: the message points to int8
    (float("nan"), "float16", "contain NaN/Inf"),
    (float("nan"), "int8", "contain NaN/Inf"),
])
def test_features_the_store_cannot_hold_are_one_line_naming_their_views(synth_root, tmp_path, factor, dtype,
                                                                       message):
    """Checked once the features reach the host, a batch after they were computed (encoded_batch.py): the
    line still names the batch's own views, and no view of it is marked done."""
    out = tmp_path / "c.zarr"
    ckpt = _scaled_checkpoint(tmp_path, factor)
    result = run_ssr(*build_args(synth_root, out, "--sam-checkpoint", str(ckpt), "--feature-dtype", dtype))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr and "of views 0-1" in result.stderr
    assert ("--feature-dtype int8" in result.stderr) == (message == "overflow float16")
    assert not FeatureStore.open(str(out)).done_mask().any()


def test_refused_features_are_reported_before_a_later_unreadable_image(synth_root, tmp_path):
    """Batch 0's features are checked after batch 1's image fails to load; the line is still batch 0's."""
    data = tmp_path / "gta5"
    shutil.copytree(synth_root / "gta5", data)
    victim = sorted((data / "images").glob("*.png"))[1]  # batch 1 (2 views per image, batch size 2)
    victim.write_bytes(_damaged(victim.read_bytes(), "truncated"))
    ckpt = _scaled_checkpoint(tmp_path, float("nan"))
    result = run_ssr("cache", "build", "--dataset", "gta5", "--data-root", str(data), "--out",
                     str(tmp_path / "c.zarr"), *TINY_BUILD, "--sam-checkpoint", str(ckpt))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "of views 0-1 contain NaN/Inf" in result.stderr and victim.name not in result.stderr


def _scaled_checkpoint(tmp_path, factor: float):
    """A vit_tiny SAM checkpoint whose every feature is scaled by `factor` (the neck's last LayerNorm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the point here
        state = build_sam_encoder("vit_tiny", seed=0).state_dict()
    state["image_encoder.neck.3.weight"] *= factor
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(state, path)
    return path
