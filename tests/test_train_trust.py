"""Runs you can trust (issue 10): every way a training run can go wrong ends in one line and a non-zero
exit, and leaves existing runs, caches and checkpoints byte-identical; resume is exact or refused;
validation does not perturb training; checkpoints never hold NaN."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import run_ssr, store_digest
from train_helpers import build_tiny_caches, read_metrics, tiny_train_args
from typer.testing import CliRunner

from ssr_cache.errors import SSRError
from ssr_cli.app import app
from ssr_train.models.backbones import create_backbone
from ssr_train.models.mit_checkpoint import timm_to_mmseg_key
from ssr_train.training.checkpoint import load_checkpoint, non_finite_tensors


@pytest.fixture(scope="module")
def caches(synth_root, tmp_path_factory):
    return build_tiny_caches(synth_root, tmp_path_factory.mktemp("trust_caches"))


@pytest.fixture(scope="module")
def finished_run(caches, tmp_path_factory):
    """A finished 3-iteration source-only run (checkpoint every 2)."""
    src, _ = caches
    run = tmp_path_factory.mktemp("finished") / "run"
    ok = invoke(tiny_train_args(src, run, "--iters", "3", "--checkpoint-every", "2", "--no-ssr"))
    assert ok.exit_code == 0, ok.output
    return run


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def fails(args: list[str]) -> str:
    """Run `ssr ARGS` in-process; it must end in an SSRError (which `ssr` prints as one line, exit 2)."""
    result = invoke(args)
    assert isinstance(result.exception, SSRError), (result.exception, result.output[-2000:])
    message = str(result.exception)
    assert message and "\n" not in message, message
    return message


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- safe defaults


def test_a_backbone_without_checkpoint_is_an_error_that_names_the_reference(caches, tmp_path):
    src, _ = caches
    args = [a for a in tiny_train_args(src, tmp_path / "run", "--iters", "1") if a not in ("--backbone-checkpoint",
                                                                                          "none")]
    message = fails(args)
    assert "mit_b5.pth" in message and "--backbone-checkpoint none" in message
    assert not (tmp_path / "run").exists()


def test_a_backbone_checkpoint_is_reported_in_one_line(caches, tmp_path):
    src, _ = caches
    torch.manual_seed(0)
    weights = create_backbone("mit_b0").body.state_dict()
    checkpoint = tmp_path / "mit_b0.pth"
    torch.save({timm_to_mmseg_key(k): v for k, v in weights.items()}, checkpoint)  # SegFormer's names
    args = tiny_train_args(src, tmp_path / "run", "--iters", "1", "--no-ssr")
    args[args.index("--backbone-checkpoint") + 1] = str(checkpoint)
    result = invoke(args)
    assert result.exit_code == 0, result.output[-2000:]
    assert "backbone mit_b0: 176 tensors from mit_b0.pth" in result.output


def test_first_line_and_run_record_state_device_precision_threads_and_initialisation(finished_run):
    record = json.loads((finished_run / "run.json").read_text())
    assert record["backbone_init"] == "random" and record["sam_random_init"] is False  # --no-ssr: no SAM used
    assert record["label_space"]["name"] == "cityscapes" and len(record["label_space"]["class_names"]) == 19
    assert Path(record["source_cache"]).is_absolute()


def test_first_line(caches, tmp_path):
    src, _ = caches
    result = run_ssr(*tiny_train_args(src, tmp_path / "run", "--iters", "1", "--threads", "1"))
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("device cpu · precision fp32 · threads 1 · backbone mit_b0 (random)"), first
    assert sum("trained 1 iterations" in line for line in result.stdout.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(caches, tmp_path):
    src, _ = caches
    assert "no CUDA GPU" in fails(tiny_train_args(src, tmp_path / "run", "--iters", "1", "--device", "cuda"))


# ---------------------------------------------------------------- bad settings: one line each


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "-1"], "optim.lr = -1.0: must be > 0.0"),
    (["--lr", "inf"], "optim.lr = inf: expected a finite number"),
    (["--lr", "nan"], "optim.lr = nan: expected a finite number"),
    (["--batch-size", "0"], "data.batch_size = 0: must be > 0"),
    (["--checkpoint-every", "0"], "run.checkpoint_every = 0: must be > 0"),
    (["--log-every", "0"], "run.log_every = 0: must be > 0"),
    (["--iters", "0"], "run.iters = 0: must be > 0"),
    (["--iters", "-1"], "run.iters = -1: must be > 0"),
    (["--amp", "fp8"], "run.amp = 'fp8'"),
    (["--ssr-stages", "0,9"], "model.ssr_stages = [0, 9]: must be <= 3"),
    (["--sam-source", "foo"], "model.sam_source = 'foo'"),
    (["--workers", "-1"], "data.workers = -1: must be >= 0"),
    (["--set", "optim.lr=abc"], "optim.lr = 'abc': expected a number"),
    (["--set", "model.num_classes=5"], "model.num_classes = 5 but the caches' label space cityscapes has 19"),
    (["--backbone", "vit_tiny_patch16_224"], "vit_tiny_patch16_224"),
    (["--method", "daformer"], "needs --target-cache"),
])
def test_bad_settings_are_one_line_and_write_nothing(caches, tmp_path, extra, expected):
    src, _ = caches
    message = fails(tiny_train_args(src, tmp_path / "run", "--iters", "2", *extra))
    assert expected in message, message
    assert not (tmp_path / "run" / "latest.pth").exists()


def test_config_file_errors_name_the_key(caches, tmp_path):
    src, _ = caches
    for text, expected in [('[optim]\nlr = "fast"\n', "optim.lr = 'fast': expected a number"),
                           ("[optim]\nlearning_rate = 1.0\n", "unknown key(s) in [optim]: learning_rate")]:
        path = tmp_path / "c.toml"
        path.write_text(text)
        assert expected in fails(tiny_train_args(src, tmp_path / "run", "--config", str(path)))


def test_unwritable_out_folder_is_one_line(caches, tmp_path):
    src, _ = caches
    (tmp_path / "a_file").write_text("x")
    assert "cannot write there" in fails(tiny_train_args(src, tmp_path / "a_file" / "run", "--iters", "1"))
    assert (tmp_path / "a_file").read_text() == "x"


# ---------------------------------------------------------------- resume: exact or refused


def test_resume_with_other_settings_is_refused_and_touches_nothing(finished_run, caches):
    src, _ = caches
    before = digest(finished_run)
    message = fails(tiny_train_args(src, finished_run, "--resume", "--lr", "1e-3", "--batch-size", "1"))
    assert "optim.lr" in message and "data.batch_size" in message and "run.iters" not in message
    message = fails(tiny_train_args(src, finished_run, "--resume", "--iters", "5"))
    assert "run.iters (3 -> 5)" in message
    assert digest(finished_run) == before


def test_resuming_a_finished_run_says_so_and_touches_nothing(finished_run, caches):
    src, _ = caches
    before = digest(finished_run)
    result = invoke(tiny_train_args(src, finished_run, "--resume", "--log-every", "5"))  # a free key
    assert result.exit_code == 0, result.output
    assert "already finished (3 of 3 iterations)" in " ".join(result.output.split())
    assert digest(finished_run) == before


def test_a_fresh_run_never_appends_to_another_run(finished_run, caches, tmp_path):
    src, _ = caches
    before = digest(finished_run)
    assert "already holds a run" in fails(tiny_train_args(src, finished_run, "--iters", "2"))
    assert digest(finished_run) == before
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.toml", "metrics.jsonl"):  # a run killed before its first checkpoint
        (copy / name).write_bytes((finished_run / name).read_bytes())
    (copy / ".latest.pth.123.abcd.tmp").write_bytes(b"x" * 1000)  # its torn checkpoint write
    assert "no checkpoint yet" in fails(tiny_train_args(src, copy, "--resume"))
    ok = invoke(tiny_train_args(src, copy, "--iters", "2", "--no-ssr", "--overwrite"))
    assert ok.exit_code == 0, ok.output
    assert [m["iter"] for m in read_metrics(copy)] == [1, 2] and not list(copy.glob("*.tmp"))


# ---------------------------------------------------------------- the NaN guard


def test_nan_guard_stops_before_the_step_and_no_checkpoint_holds_nan(caches, tmp_path):
    src, _ = caches
    run = tmp_path / "nan"
    message = fails(tiny_train_args(src, run, "--iters", "30", "--checkpoint-every", "1", "--lr", "1e10"))
    assert "non-finite loss or gradient at iteration" in message and "stopped before the optimiser step" in message
    failed_at = int(message.split("iteration ")[1].split()[0])
    checkpoint = load_checkpoint(run / "latest.pth")  # the loader itself refuses non-finite files
    assert checkpoint["iteration"] == failed_at - 1 and str(run / "latest.pth") in message
    assert not non_finite_tensors(torch.load(run / "model.pth", weights_only=True))
    late = tmp_path / "late"
    message = fails(tiny_train_args(src, late, "--iters", "30", "--checkpoint-every", "25", "--lr", "1e10"))
    assert "no checkpoint was written yet" in message and not (late / "latest.pth").exists()


def test_a_non_finite_or_corrupt_checkpoint_is_refused_by_resume_and_eval(finished_run, caches, tmp_path):
    src, _ = caches
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.toml", "run.json", "metrics.jsonl"):
        (bad / name).write_bytes((finished_run / name).read_bytes())
    state = load_checkpoint(finished_run / "latest.pth")
    state["iteration"] = 2
    next(v for v in state["method"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, bad / "latest.pth")
    before = digest(bad)
    assert "hold NaN/Inf" in fails(tiny_train_args(src, bad, "--resume"))
    (bad / "latest.pth").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in fails(tiny_train_args(src, bad, "--resume"))
    with pytest.raises(SSRError, match="hold NaN/Inf"):
        torch.save({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "inf.pth")
        load_checkpoint(tmp_path / "inf.pth")
    assert digest(bad).keys() == before.keys()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_disk_full_while_writing_a_checkpoint_is_one_line(caches, tmp_path):
    src, _ = caches
    run = tmp_path / "full"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "ssr_cli", *tiny_train_args(src, run, "--iters", "1")],
                            capture_output=True, text=True, env=env, preexec_fn=_limit_file_size, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot write checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (run / "latest.pth").exists() and not list(run.glob(".*.tmp"))


# ---------------------------------------------------------------- only intact data


def _damaged_copy(store: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / store.name
    shutil.copytree(store, copy)
    return copy


def test_a_missing_shard_file_is_found_before_training(caches, tmp_path):
    src, _ = caches
    damaged = _damaged_copy(src, tmp_path)
    chunk = next(p for p in sorted((damaged / "pixels").rglob("*")) if p.is_file() and "/c/" in str(p))
    chunk.unlink()
    before = store_digest(damaged)
    message = fails(tiny_train_args(damaged, tmp_path / "run", "--iters", "1"))
    assert "is marked done but its file" in message and f"ssr cache verify {damaged}" in message
    assert store_digest(damaged) == before


def test_a_corrupt_chunk_is_one_line_naming_store_view_and_verify(caches, tmp_path):
    src, _ = caches
    damaged = _damaged_copy(src, tmp_path)
    chunk = next(p for p in sorted((damaged / "labels").rglob("*")) if p.is_file() and "/c/" in str(p))
    data = bytearray(chunk.read_bytes())
    for at in range(64, len(data), 64):  # the file is a shard of per-view chunks: damage every one
        data[at] ^= 0xFF
    chunk.write_bytes(bytes(data))
    message = fails(tiny_train_args(damaged, tmp_path / "run", "--iters", "6", "--no-ssr"))
    assert str(damaged) in message and "view" in message and "ssr cache verify" in message


# ---------------------------------------------------------------- validation


def test_validation_does_not_perturb_training_and_keeps_the_best(caches, tmp_path):
    src, tgt = caches
    common = ("--iters", "4", "--method", "daformer", "--target-cache", str(tgt), "--checkpoint-every", "4")
    plain = invoke(tiny_train_args(src, tmp_path / "plain", *common))
    validated = invoke(tiny_train_args(src, tmp_path / "val", *common, "--val-every", "2"))
    assert plain.exit_code == 0 and validated.exit_code == 0, validated.output
    losses = {m["iter"]: m["loss"] for m in read_metrics(tmp_path / "plain")}
    val_metrics = read_metrics(tmp_path / "val")
    assert {m["iter"]: m["loss"] for m in val_metrics if "loss" in m} == losses  # bit for bit
    mious = [m["val_miou"] for m in val_metrics if "val_miou" in m]
    assert len(mious) == 2 and all(np.isfinite(mious))
    best = load_checkpoint(tmp_path / "val" / "best.pth")
    assert best["val_miou"] == max(mious)


# ---------------------------------------------------------------- observability


def test_plot_draws_the_curves_of_several_runs(finished_run, tmp_path):
    from PIL import Image

    out = tmp_path / "curves.png"
    result = invoke(["plot", str(finished_run), str(finished_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (1500, 450)
    assert list((finished_run / "tb").iterdir())  # TensorBoard scalars are always written
    assert "no metrics.jsonl" in fails(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")])
