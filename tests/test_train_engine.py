"""The trainer on synthetic caches: losses fall, SSR on/off, exact resume, export, refusals, DDP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import run_ssr
from train_helpers import build_tiny_caches, read_metrics, tiny_train_args

from ssr_cache.errors import SSRError
from ssr_train.infer.run_model import load_run_model
from ssr_train.models.model_factory import build_model
from ssr_train.training.checkpoint import load_checkpoint
from ssr_train.training.config import TrainConfig
from ssr_train.training.engine import Trainer


@pytest.fixture(scope="module")
def caches(synth_root, tmp_path_factory):
    return build_tiny_caches(synth_root, tmp_path_factory.mktemp("train_caches"))


def tiny_cfg(src, out, **run) -> TrainConfig:
    cfg = TrainConfig()
    cfg = cfg.replace("model", backbone="mit_b0", backbone_checkpoint="none").replace("optim", warmup_iters=0, lr=3e-4)
    cfg = cfg.replace("data", source_cache=str(src), workers=0)
    return cfg.replace("run", out=str(out), log_every=1, **run)


@pytest.mark.parametrize("ssr", [True, False])
def test_source_only_loss_falls(caches, tmp_path, ssr):
    src, _ = caches
    cfg = tiny_cfg(src, tmp_path / "run", iters=24).replace("model", ssr=ssr)
    Trainer(cfg, progress=False).train()
    losses = [m["loss_src"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:3])
    assert ("loss_src_ssr" in read_metrics(tmp_path / "run")[0]) is ssr
    assert (tmp_path / "run" / "config.toml").is_file() and (tmp_path / "run" / "model.pth").is_file()


def test_ssr_on_and_off_differ_only_by_the_regulariser():
    torch.manual_seed(0)
    on = build_model(TrainConfig().replace("model", backbone="mit_b0").model, num_classes=19)
    torch.manual_seed(0)
    off = build_model(TrainConfig().replace("model", backbone="mit_b0", ssr=False).model, num_classes=19)
    on_sd, off_sd = on.state_dict(), off.state_dict()
    extra = set(on_sd) - set(off_sd)
    assert extra and all(k.startswith("regularizer.") for k in extra) and not set(off_sd) - set(on_sd)
    assert all(torch.equal(on_sd[k], off_sd[k]) for k in off_sd)
    assert len(on.regularizer.blocks) == 4 if hasattr(on.regularizer, "blocks") else True


def test_export_is_exactly_the_shadow_branch(caches, tmp_path):
    src, _ = caches
    run = tmp_path / "run"
    cfg = tiny_cfg(src, run, iters=3)
    Trainer(cfg, progress=False).train()
    model = load_run_model(run).model
    exported = torch.load(run / "model.pth", weights_only=True)["state_dict"]
    assert not any(k.startswith("regularizer.") for k in exported)
    assert set(exported) == set(model.state_dict())
    full = build_model(cfg.model, num_classes=19)
    state = load_checkpoint(run / "latest.pth")["method"]
    full.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    full.eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(img), full(img))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


def test_killed_training_resumes_exactly(caches, tmp_path):
    src, _ = caches
    reference = tmp_path / "reference"
    run_ok = run_ssr(*tiny_train_args(src, reference, "--iters", "12", "--checkpoint-every", "4",
                                      "--method", "source-only"))
    assert run_ok.returncode == 0, run_ok.stderr
    killed = tmp_path / "killed"
    args = tiny_train_args(src, killed, "--iters", "12", "--checkpoint-every", "4", "--method", "source-only")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ssr_cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (killed / "latest.pth").is_file() and load_iteration(killed) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = load_iteration(killed)
    assert 4 <= at_kill < 12, "the kill must land mid-run"
    with open(killed / "metrics.jsonl", "a") as fh:
        fh.write('{"iter": 11, "lo')  # as if the kill tore a metrics line
    resumed = run_ssr(*tiny_train_args(src, killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    ref = {m["iter"]: m["loss"] for m in read_metrics(reference)}
    got = {m["iter"]: m["loss"] for m in read_metrics(killed)}
    assert sorted(got) == list(range(1, 13))
    assert got == ref  # the same losses, bit for bit, after the resume point too


def load_iteration(run) -> int:
    try:
        return int(torch.load(run / "latest.pth", weights_only=False)["iteration"])
    except Exception:
        return -1


def test_sam_is_never_imported_in_cache_mode(caches, tmp_path):
    src, tgt = caches
    code = (
        "import sys\n"
        "from ssr_train.training.config import TrainConfig\n"
        "from ssr_train.training.engine import Trainer\n"
        f"cfg = TrainConfig().replace('model', backbone='mit_b0', backbone_checkpoint='none').replace('data', source_cache={str(src)!r}, "
        f"target_cache={str(tgt)!r}, workers=0).replace('run', method='daformer', iters=2, out={str(tmp_path / 'r')!r})\n"
        "Trainer(cfg, progress=False).train()\n"
        "print('SAM_IMPORTED' if any(m.startswith('segment_anything') or m == 'ssr_cache.sam_encoder' "
        "for m in sys.modules) else 'SAM_NOT_IMPORTED')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SAM_NOT_IMPORTED" in result.stdout


def test_refusals_are_one_line(caches, tmp_path, synth_root):
    src, tgt = caches
    unlabelled = run_ssr(*tiny_train_args(tgt, tmp_path / "a", "--iters", "1"))
    assert unlabelled.returncode == 2 and "not a labelled source cache" in unlabelled.stderr
    bad_backbone = run_ssr(*tiny_train_args(src, tmp_path / "b", "--iters", "1", "--backbone", "mit_b9"))
    assert bad_backbone.returncode == 2 and "mit_b9" in bad_backbone.stderr
    from ssr_cache.build.config import CacheBuildConfig
    from ssr_cache.build.pipeline import build_cache

    other = tmp_path / "other.zarr"
    build_cache(CacheBuildConfig(dataset="cityscapes", data_root=synth_root / "cityscapes", out=str(other),
                                 sam="vit_tiny", crop=(32, 32), resize=(128, 64), views_per_image=1,
                                 workers=0, max_images=2), progress=False)
    mismatch = run_ssr(*tiny_train_args(src, tmp_path / "c", "--iters", "1", "--method", "daformer",
                                        "--target-cache", str(other)))
    assert mismatch.returncode == 2 and "disagree on crop" in mismatch.stderr
    for r in (unlabelled, bad_backbone, mismatch):
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(caches, tmp_path):
    src, _ = caches
    run = tmp_path / "nan"
    result = run_ssr(*tiny_train_args(src, run, "--iters", "30", "--checkpoint-every", "1", "--lr", "1e30"))
    assert result.returncode == 2 and "non-finite loss" in result.stderr, result.stderr[-500:]
    failed_at = int(result.stderr.split("iteration ")[1].split()[0])
    assert load_iteration(run) == failed_at - 1  # checkpoints up to the last finite step, nothing after


def _torchrun(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
            "-m", "ssr_cli", *args]


def test_two_process_torchrun_training(caches, tmp_path):
    src, _ = caches
    run = tmp_path / "ddp"
    result = subprocess.run(_torchrun(29533, *tiny_train_args(src, run, "--iters", "4", "--no-ssr")), capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", SSR_DIST_BACKEND="gloo"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read_metrics(run)
    assert [m["iter"] for m in metrics] == [1, 2, 3, 4]  # rank 0 alone writes
    assert result.stdout.count("trained 4 iterations") == 1  # and alone prints
    assert load_iteration(run) == 4


def test_two_process_torchrun_daformer_resumes_exactly(caches, tmp_path):
    """Each rank draws its own ClassMix masks and drop-path noise; a killed 2-rank run must continue every
    rank's streams (not rank 0's on both), or the averaged gradients and so rank 0's losses drift."""
    src, tgt = caches
    env = dict(os.environ, OMP_NUM_THREADS="1", SSR_DIST_BACKEND="gloo")

    def args(run, *extra):
        return tiny_train_args(src, run, "--target-cache", str(tgt), "--method", "daformer", "--iters", "10",
                               "--checkpoint-every", "2", *extra)

    reference = tmp_path / "reference"
    ok = subprocess.run(_torchrun(29541, *args(reference)), capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(29542, *args(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and load_iteration(killed) < 2:
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own, so killing its group would leave the ranks running
    ranks = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
             for pid in (task / "children").read_text().split()]
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    assert len(ranks) == 2
    at_kill = load_iteration(killed)
    assert 2 <= at_kill < 10, "the kill must land mid-run"
    assert len(torch.load(killed / "latest.pth", weights_only=False)["rng_per_rank"]) == 2
    # On another number of ranks the run goes on, and says it is no longer exact.
    one_rank = tmp_path / "one_rank"
    shutil.copytree(killed, one_rank)
    moved = run_ssr(*tiny_train_args(src, one_rank, "--resume"))
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert "resuming a 2-rank checkpoint on 1 ranks" in " ".join(moved.stdout.split())
    assert load_iteration(one_rank) == 10
    resumed = subprocess.run(_torchrun(29543, *tiny_train_args(src, killed, "--resume")), capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = {m["iter"]: m["loss"] for m in read_metrics(reference)}
    got = {m["iter"]: m["loss"] for m in read_metrics(killed)}
    assert sorted(got) == list(range(1, 11))
    assert got == ref


def test_unknown_method_and_missing_target(caches, tmp_path):
    src, _ = caches
    with pytest.raises(SSRError, match="needs --target-cache"):
        Trainer(tiny_cfg(src, tmp_path / "x", iters=1, method="daformer"), progress=False).train()
