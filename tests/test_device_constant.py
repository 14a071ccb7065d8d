"""Constants made once per device: kept only when real, so a tracer's fake tensors never leak into later calls."""

from __future__ import annotations

import torch
from torch import nn

from ssr_cache import device_constant as constants
from ssr_cache.image_norm import PIXEL_MEAN, PIXEL_STD, normalize

KEY = ("pixel mean/std", torch.device("cpu"))


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x)


def _expected(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x.float() - mean) / std


def test_normalize_after_an_export_trace_is_real_and_exact():
    """torch.export (non-strict, as the ONNX export runs first) traces with fake tensors; were one kept, every
    later normalize in the process would quietly return fake tensors."""
    constants._MADE.pop(KEY, None)
    x = torch.randint(0, 256, (1, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.export.export(Normalize(), (x,), strict=False)
    out = normalize(x)
    assert type(out) is torch.Tensor and torch.equal(out, _expected(x))
    assert all(type(t) is torch.Tensor for t in constants._MADE[KEY])  # the real call kept real ones


def test_a_constant_is_made_once_and_usable_by_autograd_even_if_first_made_in_inference_mode():
    calls = []

    def make():
        calls.append(1)
        return torch.full((3,), 2.0)

    key = ("test constant", torch.device("cpu"))
    constants._MADE.pop(key, None)
    with torch.inference_mode():
        first = constants.device_constant(key, make)
    assert constants.device_constant(key, make) is first and len(calls) == 1
    w = torch.ones(3, requires_grad=True)
    (w / first).sum().backward()  # an inference tensor could not be saved for this backward
    assert torch.equal(w.grad, torch.full((3,), 0.5))
