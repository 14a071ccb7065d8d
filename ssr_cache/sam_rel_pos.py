"""segment_anything's `get_rel_pos` without a host wait per attention block on a GPU.

Why: upstream builds each block's relative-position index with `torch.arange` on the CPU and indexes the
block's (GPU) table with it; torch copies such an index up with a blocking copy, and every blocking copy
makes the host wait for all work queued so far (24 waits per vit_b batch, 64 per vit_h). The cache build
queues the next batch while the host hands the previous one to the writers, so a wait inside the encoder
left the GPU idle. Here each index is made once per (q, k, device) by upstream's own function (applied to
an identity table, so its arithmetic is not restated) and reused: the same index, the same gathered
values. Tables whose length needs upstream's interpolation go to upstream unchanged.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import image_encoder as upstream

from ssr_cache.device_constant import device_constant

_UPSTREAM_GET_REL_POS = upstream.get_rel_pos


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Upstream's `get_rel_pos(q_size, k_size, rel_pos)`: the (q_size, k_size, C) relative embeddings."""
    if rel_pos.shape[0] != 2 * max(q_size, k_size) - 1:
        return _UPSTREAM_GET_REL_POS(q_size, k_size, rel_pos)
    return rel_pos[relative_index(q_size, k_size, rel_pos.device)]


def relative_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """(q_size, k_size) int64 rows of the relative-position table, on `device`, as upstream computes them."""
    length = 2 * max(q_size, k_size) - 1

    def make() -> torch.Tensor:
        identity = torch.arange(length).reshape(length, 1)
        return _UPSTREAM_GET_REL_POS(q_size, k_size, identity)[..., 0].to(device)

    return device_constant(("SAM relative position index", q_size, k_size, device), make)


def use_in_segment_anything() -> None:
    """Point segment_anything's attention (which looks `get_rel_pos` up in its module at each call) at ours."""
    upstream.get_rel_pos = get_rel_pos
