"""A method step's logged scalars, read back from the device at once."""

from __future__ import annotations

import torch
from torch import Tensor


def read_scalars(log: dict[str, Tensor]) -> dict[str, float]:
    """Detached 0-d tensors -> floats with one device-to-host copy: each ``float(t)`` on a CUDA tensor is a
    synchronisation of its own, and a step logs up to eight of them."""
    if not log:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in log.values()]).tolist()
    return dict(zip(log, values, strict=True))
