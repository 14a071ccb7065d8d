"""AdamW with DAFormer's parameter groups and mmcv's poly schedule with linear warmup."""

from __future__ import annotations

import torch
from torch import nn

from ssr_train.training.config import OptimConfig


def _is_no_decay(name: str) -> bool:
    # mmcv paramwise_cfg custom_keys semantics: a substring of the parameter name. DAFormer sets
    # decay_mult 0 for 'norm' and 'pos_block'; the head's BatchNorms (mmcv names them 'bn') still decay.
    return "norm" in name or "pos_block" in name


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, head_prefixes=("head.",)) -> torch.optim.AdamW:
    """Groups: backbone + SSR regulariser (lr), decode head (lr x head_lr_mult); each split by decay / no decay.

    The SSR reference names its regulariser modules so that mmcv's 'head' key does not match them: they
    train at the base learning rate, and so do ours."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = name.startswith(head_prefixes)
        no_decay = cfg.no_decay_norm_and_pos and _is_no_decay(name)
        groups.setdefault((is_head, no_decay), []).append(param)
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        mult = cfg.head_lr_mult if is_head else 1.0
        param_groups.append({"params": params, "lr": cfg.lr * mult, "lr_mult": mult,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def poly_lr(it: int, max_iters: int, cfg: OptimConfig) -> float:
    """mmcv PolyLrUpdaterHook(power, min_lr, by_epoch=False) with linear warmup (warmup_ratio)."""
    progress = min(it, max_iters) / max_iters
    regular = (cfg.lr - cfg.min_lr) * (1 - progress) ** cfg.power + cfg.min_lr
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
