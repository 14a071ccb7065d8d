"""A step's logged scalars come back in one read, equal to float() of each."""

from __future__ import annotations

import torch

from ssr_train.methods.step_log import read_scalars


def test_read_scalars_equals_float_of_each_and_keeps_order():
    loss = torch.tensor(1.2345678, requires_grad=True) * 3
    log = {"loss": loss, "pseudo_weight": torch.tensor([0.75]).max(), "loss_bf16": torch.tensor(0.3, dtype=torch.bfloat16)}
    out = read_scalars(log)
    assert list(out) == ["loss", "pseudo_weight", "loss_bf16"]
    assert out == {k: float(v.detach()) for k, v in log.items()}
    assert all(type(v) is float for v in out.values())
    assert read_scalars({}) == {}
