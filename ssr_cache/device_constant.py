"""Small constant tensors made once per device and reused (normalisation constants, SAM's position index).

Why: on a GPU, making one afresh is a copy up from the host, and such a copy makes the host wait for all
work queued so far; the cache build queues the next batch meanwhile. Only real tensors are kept: under a
tracer (torch.export, torch.compile, FakeTensorMode) they are made afresh, as its fake tensors must not
outlive it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")
_MADE: dict[Hashable, object] = {}


def device_constant(key: Hashable, make: Callable[[], T]) -> T:
    """make(), made once per `key` (which names the device); a tensor or a tuple of tensors."""
    if torch.compiler.is_compiling():
        return make()
    value = _MADE.get(key)
    if value is None:
        with torch.inference_mode(False):  # ordinary tensors, usable by autograd whoever asks first
            value = make()
        tensors = value if isinstance(value, tuple) else (value,)
        if all(type(t) is torch.Tensor for t in tensors):  # not a tracer's fake tensor
            _MADE[key] = value
    return value
