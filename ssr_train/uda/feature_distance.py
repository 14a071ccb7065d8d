"""DAFormer ImageNet feature distance (FD) on thing classes, last backbone stage.

``loss = lambda * mean_{thing cells} || f_student - f_imagenet ||_2`` where a feature cell counts as a
thing cell when its label, downscaled with ``downscale_label_ratio``, is one of ``classes``. The ImageNet
model is a frozen copy of the backbone taken before training starts (the reference builds it from the
pretrained checkpoint) and always runs in eval mode without gradients.

With no thing cell the reference returns ``mean([]) = NaN`` (with zero gradients); here the loss is an
exact 0 that is still connected to the student features, so it can be summed and backpropagated.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssr_cache.data.labels import IGNORE_INDEX


def downscale_label_ratio(
    gt: Tensor, scale_factor: int, min_ratio: float, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """(B,H,W) or (B,1,H,W) label -> (B,1,H//s,W//s): the majority class of each s×s cell, or
    ``ignore_index`` when that class covers less than ``min_ratio`` of the cell or is the ignore value."""
    if scale_factor <= 1:
        raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
    label = gt[:, 0] if gt.dim() == 4 else gt
    label = label.long().clone()
    label[label == ignore_index] = num_classes  # ignore competes as an extra class
    onehot = F.one_hot(label, num_classes=num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(onehot, kernel_size=scale_factor).max(dim=1, keepdim=True)
    out[out == num_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out


def feature_distance_loss(
    student_feat: Tensor,
    imnet_feat: Tensor,
    gt: Tensor,
    *,
    classes: Sequence[int] | None,
    scale_min_ratio: float,
    num_classes: int,
    lambda_: float,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """FD loss between last-stage maps (B,C,h,w); ``gt`` is the source label at image resolution.

    ``classes=None`` averages over every cell (reference ``fdist_classes=None``). The values come from
    ``[daformer]`` (methods/daformer.py); the classes are the label space's things by default.
    """
    dist = torch.norm(student_feat - imnet_feat.detach(), dim=1, p=2)  # (B,h,w)
    if classes is not None:
        scale = gt.shape[-1] // student_feat.shape[-1]
        cells = downscale_label_ratio(gt, scale, scale_min_ratio, num_classes, ignore_index)[:, 0]
        if cells.shape != dist.shape:
            raise ValueError(f"label {tuple(gt.shape)} does not tile the feature grid {tuple(dist.shape)}")
        mask = torch.isin(cells, torch.as_tensor(list(classes), device=cells.device))
        dist = dist[mask]
    if dist.numel() == 0:
        return student_feat.sum() * 0.0
    return lambda_ * dist.mean()


def make_imnet_model(backbone: nn.Module) -> nn.Module:
    """Frozen eval-mode copy of the (ImageNet-initialised) backbone; call before training changes it."""
    model = copy.deepcopy(backbone)
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def imnet_features(imnet_model: nn.Module, img: Tensor) -> Tensor:
    """Last-stage features of the frozen ImageNet backbone (forced into eval mode, as the reference)."""
    imnet_model.eval()
    return list(imnet_model(img))[-1].detach()
