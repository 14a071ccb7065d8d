"""fp16 training's loss scale (ssr_train/training/loss_scaling.py): an overflow skips the step and halves the
scale, a true non-finite loss still stops the run, and the engine's scaled path trains exactly as the
unscaled one. torch's GradScaler runs on the CPU too, so the real component is exercised here; the engine
enables it only for --amp fp16 on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import build_tiny_caches, read_metrics

from ssr_cache.errors import SSRError
from ssr_train.models.model_factory import build_model
from ssr_train.training.checkpoint import load_checkpoint
from ssr_train.training.config import TrainConfig
from ssr_train.training.engine import Trainer
from ssr_train.training.loss_scaling import LossScaling

CPU = torch.device("cpu")


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def backward_and_judge(scaling, model, optimizer, it, *, factor=1.0):
    """One step's backward (`factor` inf: gradients that overflowed), unscale and the guard's verdict."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(torch.ones(3, 4)).square().mean()
    scaling.scale(loss * factor if factor != float("inf") else loss).backward()
    if factor == float("inf"):
        for p in model.parameters():
            p.grad.fill_(float("inf"))
    scaling.unscale(optimizer)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    return scaling.judge(it, {"loss": float(loss.detach()), "grad_norm": float(norm)}, lambda: "no checkpoint yet")


def test_an_overflow_skips_the_step_and_halves_the_scale():
    scaling = LossScaling(CPU, enabled=True)
    model, optimizer = model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    logged = backward_and_judge(scaling, model, optimizer, 0, factor=float("inf"))
    assert logged["amp_scale"] == 2.0**16 and logged["amp_skipped"] == 1 and "grad_norm" not in logged
    assert scaling.skips_in_a_row == 1
    scaling.step(optimizer)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # skipped
    assert scaling.scaler.get_scale() == 2.0**15
    logged = backward_and_judge(scaling, model, optimizer, 1)
    assert logged["amp_scale"] == 2.0**15 and scaling.skips_in_a_row == 0 and "amp_skipped" not in logged
    scaling.step(optimizer)
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # stepped


def test_the_unscaled_gradients_are_the_true_ones():
    plain, scaled = LossScaling(CPU, enabled=False), LossScaling(CPU, enabled=True)
    grads = []
    for scaling in (plain, scaled):
        model, optimizer = model_and_optimizer()
        backward_and_judge(scaling, model, optimizer, 0)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # a power-of-two scale divides out exactly


def test_a_non_finite_loss_stops_the_run_even_with_scaling():
    scaling = LossScaling(CPU, enabled=True)
    with pytest.raises(SSRError, match=r"non-finite loss or gradient at iteration 8 \(loss=nan"):
        scaling.judge(7, {"loss": float("nan"), "grad_norm": float("inf")}, lambda: "no checkpoint yet")


def test_without_scaling_a_non_finite_gradient_stops_the_run():
    with pytest.raises(SSRError, match=r"iteration 3 \(grad_norm=inf\); stopped before the optimiser step"):
        LossScaling(CPU, enabled=False).judge(2, {"loss": 1.0, "grad_norm": float("inf")}, lambda: "x")


def test_twenty_overflows_in_a_row_stop_the_run_with_one_line():
    scaling = LossScaling(CPU, enabled=True)
    model, optimizer = model_and_optimizer()
    for it in range(LossScaling.MAX_SKIPS_IN_A_ROW - 1):
        backward_and_judge(scaling, model, optimizer, it, factor=float("inf"))
        scaling.step(optimizer)
    with pytest.raises(SSRError, match=r"overflowed in 20 steps in a row \(iterations 1-20, loss scale down to "
                                       r"0\.125\).*--amp bf16") as caught:
        backward_and_judge(scaling, model, optimizer, 19, factor=float("inf"))
    assert "\n" not in str(caught.value)


def test_the_scale_survives_a_checkpoint():
    scaling = LossScaling(CPU, enabled=True)
    model, optimizer = model_and_optimizer()
    for it in range(3):
        backward_and_judge(scaling, model, optimizer, it, factor=float("inf"))
        scaling.step(optimizer)
    restored = LossScaling(CPU, enabled=True)
    restored.load_state_dict(scaling.state_dict())
    assert restored.scaler.get_scale() == 2.0**13 and restored.skips_in_a_row == 3
    assert LossScaling(CPU, enabled=False).state_dict() == {}
    older = LossScaling(CPU, enabled=True)
    older.load_state_dict(None)  # a checkpoint from before loss scaling, or from a bf16 run
    assert older.scaler.get_scale() == 2.0**16 and older.skips_in_a_row == 0


# ---------------------------------------------------------------- in the engine


@pytest.fixture(scope="module")
def caches(synth_root, tmp_path_factory):
    return build_tiny_caches(synth_root, tmp_path_factory.mktemp("scaling_caches"))


def daformer_cfg(caches, out) -> TrainConfig:
    src, tgt = caches
    cfg = TrainConfig().replace("model", backbone="mit_b0", backbone_checkpoint="none", ssr=True)
    cfg = cfg.replace("optim", warmup_iters=0, lr=3e-4)
    cfg = cfg.replace("data", source_cache=str(src), target_cache=str(tgt), workers=0)
    return cfg.replace("run", out=str(out), log_every=1, iters=3, checkpoint_every=3, method="daformer",
                       device="cpu")


def test_daformer_with_the_loss_scale_trains_exactly_as_without(caches, tmp_path):
    """Every backward of the method (source, then the mixed target) goes through the scale, and the engine
    unscales before clipping, the guard and the step: the losses match bit for bit."""
    Trainer(daformer_cfg(caches, tmp_path / "plain"), progress=False).train()
    scaled = Trainer(daformer_cfg(caches, tmp_path / "scaled"), progress=False)
    scaled.loss_scaling = LossScaling(CPU, enabled=True)  # what --amp fp16 on CUDA builds
    scaled.train()
    plain, got = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "scaled")
    assert [m["amp_scale"] for m in got] == [2.0**16] * 3
    timing = {"amp_scale", "sec_per_iter"}
    for a, b in zip(plain, got, strict=True):
        assert {k: v for k, v in b.items() if k not in timing} == {k: v for k, v in a.items() if k not in timing}
        assert {"loss", "loss_src", "loss_mix", "loss_src_ssr", "loss_mix_ssr", "grad_norm"} <= set(a)
    state = load_checkpoint(tmp_path / "scaled" / "latest.pth")["loss_scaling"]
    assert state["scaler"]["scale"] == 2.0**16 and state["skips_in_a_row"] == 0


def test_in_the_engine_skipped_steps_leave_the_weights_and_twenty_stop_the_run(caches, tmp_path):
    """At an infinite scale every step overflows: each is skipped and logged (never a stop on its own), the
    weights stay as initialised, checkpoints stay finite, and the 20th in a row stops the run in one line."""
    cfg = daformer_cfg(caches, tmp_path / "run").replace("run", method="source-only", iters=30, checkpoint_every=5)
    cfg = cfg.replace("model", ssr=False)
    trainer = Trainer(cfg, progress=False)
    trainer.loss_scaling = LossScaling(CPU, enabled=True, init_scale=float("inf"))
    with pytest.raises(SSRError, match=r"overflowed in 20 steps in a row \(iterations 1-20.*--amp bf16") as caught:
        trainer.train()
    assert "\n" not in str(caught.value) and "latest.pth" in str(caught.value)
    metrics = read_metrics(tmp_path / "run")
    assert [m["iter"] for m in metrics] == list(range(1, 20))
    assert all(m["amp_skipped"] == 1 and "grad_norm" not in m and np.isfinite(m["loss"]) for m in metrics)
    checkpoint = load_checkpoint(tmp_path / "run" / "latest.pth")  # refuses non-finite tensors itself
    assert checkpoint["iteration"] == 15 and checkpoint["loss_scaling"]["skips_in_a_row"] == 15
    torch.manual_seed(cfg.run.seed)  # the engine's initialisation, redone
    initial = dict(build_model(trainer.cfg.model, num_classes=19).named_parameters())
    trained = {k[len("model."):]: v for k, v in checkpoint["method"].items() if k.startswith("model.")}
    # every parameter as initialised (BatchNorm's running statistics do move: they follow the forward pass)
    assert all(torch.equal(trained[k], p.detach()) for k, p in initial.items()) and len(initial) > 100
