"""EMA teacher (DACS / DAFormer ``_init_ema_weights`` + ``_update_ema``).

The teacher is a segmentor without the SSR regulariser, so pseudo-labels come from the shadow
branch only, as in the reference where the regulariser lives outside the EMA-copied segmentor.

Only parameters follow the student. Buffers (BatchNorm running statistics) are never copied by the
reference: the teacher predicts pseudo-labels in train mode (batch statistics, see ``teacher_train_mode``),
so its running statistics never influence a pseudo-label.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import DropPath
from torch import nn
from torch.nn.modules.dropout import _DropoutNd


def ema_alpha(it: int, *, alpha_max: float) -> float:
    """Teacher momentum at iteration ``it``: ``min(1 - 1/(it+1), alpha_max)``; 0 at it=0 (plain copy)."""
    return min(1.0 - 1.0 / (it + 1), alpha_max)


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of ``student`` without the SSR regulariser, with gradients off."""
    teacher = copy.deepcopy(student)
    if getattr(teacher, "regularizer", None) is not None:
        teacher.regularizer = None
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, it: int, *, alpha_max: float) -> float:
    """``teacher = alpha * teacher + (1 - alpha) * student`` for every teacher parameter, matched by name.

    At ``it == 0`` (alpha 0) the student parameters are copied exactly, as ``_init_ema_weights`` does.
    Student parameters the teacher lacks (the regulariser) are skipped; buffers are left alone.
    Returns the alpha used.
    """
    alpha = ema_alpha(it, alpha_max=alpha_max)
    student_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = student_params[name].detach()
        if alpha == 0.0:
            t.copy_(s)
        else:
            t.copy_(alpha * t + (1 - alpha) * s)
    return alpha


def teacher_train_mode(teacher: nn.Module) -> nn.Module:
    """Mode the reference predicts pseudo-labels in: train mode (BatchNorm uses batch statistics) with
    every dropout and drop-path layer switched off."""
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, (_DropoutNd, DropPath)):
            m.training = False
    return teacher
