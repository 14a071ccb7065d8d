"""DACS pseudo-labels from teacher logits: argmax label plus a confidence-based pixel weight.

As in DAFormer/MIC ``get_pseudo_label_and_weight`` + ``filter_valid_pseudo_region``:

* the weight is one scalar for the whole batch: the fraction of all B*H*W pixels whose max softmax
  probability is >= ``threshold`` (``ps_size`` in the reference is the size of the whole label batch);
* the scalar counts every row; afterwards the weight is zeroed on the top ``ignore_top`` and bottom
  ``ignore_bottom`` rows (rectification artefacts / ego-car in Cityscapes).

The reference row counts (``[daformer] pseudo_ignore_top/bottom``: 15, 120) are meant for 512-pixel-high
crops. With ``scale_rows=True`` (default) lower crops get them scaled proportionally (e.g. 2 and 15 rows
for a 64-pixel crop, which would otherwise be ignored entirely); crops of 512 or more keep the reference
numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssr_train.uda import REFERENCE_CROP


def ignore_rows_for(
    height: int,
    *,
    ignore_top: int,
    ignore_bottom: int,
    scale_rows: bool = True,
) -> tuple[int, int]:
    """Rows (top, bottom) to zero for a crop of ``height``; scaled by ``height / REFERENCE_CROP`` below it."""
    if not scale_rows or height >= REFERENCE_CROP:
        return ignore_top, ignore_bottom
    return round(ignore_top * height / REFERENCE_CROP), round(ignore_bottom * height / REFERENCE_CROP)


@torch.no_grad()
def pseudo_labels(
    teacher_logits: Tensor,
    *,
    threshold: float,
    ignore_top: int,
    ignore_bottom: int,
    scale_rows: bool = True,
    size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(labels long (B,H,W), weight float (B,H,W))`` from ``teacher_logits`` (B,C,h,w).

    ``size`` first upsamples the logits (bilinear, align_corners=False) to the image size, which is what
    the reference ``encode_decode`` hands to the pseudo-labeller; leave it None for full-size logits.
    """
    logits = teacher_logits.detach().float()
    if size is not None and tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    prob, labels = torch.softmax(logits, dim=1).max(dim=1)
    confident = (prob >= threshold).sum().item()
    weight = torch.full_like(prob, confident / prob.numel())
    top, bottom = ignore_rows_for(
        prob.shape[1], ignore_top=ignore_top, ignore_bottom=ignore_bottom, scale_rows=scale_rows
    )
    if top > 0:
        weight[:, :top, :] = 0
    if bottom > 0:
        weight[:, -bottom:, :] = 0
    return labels, weight
