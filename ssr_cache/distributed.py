"""torchrun awareness for the cache build: which rank am I, and a barrier (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the ranks on this node, which share its cores


def rank_info() -> RankInfo:
    """Read torchrun's environment; starts the process group once when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return RankInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("SSR_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    return RankInfo(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def rank_device(device: torch.device, info: RankInfo) -> torch.device:
    """Under torchrun, a CUDA device without an index ('cuda', or 'auto' on a GPU node) means this rank's GPU
    (LOCAL_RANK), not cuda:0 for every rank; it is made the current device (NCCL, pinned memory)."""
    if device.type != "cuda" or info.world_size <= 1:
        return device
    if device.index is None:
        device = torch.device("cuda", info.local_rank)
    torch.cuda.set_device(device)
    return device


def barrier(info: RankInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
