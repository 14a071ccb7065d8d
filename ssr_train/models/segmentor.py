"""Segmentor with the SSR shadow branch: backbone -> head (shadow), backbone -> SSR -> same head (enhanced).

The shadow branch is the deployed model; the regulariser only exists at training time. ``shadow_state_dict``
keeps exactly the shadow branch (``backbone.*`` and ``head.*``) so inference builds a segmentor without a
regulariser (``build_shadow_segmentor``) and loads it strictly (ssr_train/infer/run_model.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ssr_cache.data.labels import IGNORE_INDEX
from ssr_train.models.daformer_head import DAFormerHead
from ssr_train.models.ssr_regularizer import SamInput, SSRRegularizer

SHADOW_PREFIXES = ("backbone.", "head.")


class SSRSegmentor(nn.Module):
    """``backbone(img)`` gives 4 NCHW stage maps, ``head(feats)`` gives logits at 1/4 resolution."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, regularizer: SSRRegularizer | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.regularizer = regularizer

    def extract_features(self, img: Tensor) -> list[Tensor]:
        return list(self.backbone(img))

    def forward(self, img: Tensor) -> Tensor:
        """Inference: shadow branch logits, (B, num_classes, H/4, W/4)."""
        return self.head(self.extract_features(img))

    def forward_train(self, img: Tensor, sam: SamInput | None = None) -> dict[str, Any]:
        """Both branches on one backbone pass.

        Returns ``shadow_logits``, ``enhanced_logits`` (None without a regulariser or without ``sam``)
        and ``feats`` (the backbone stage maps, e.g. for ImageNet feature distance). As in the
        reference the head runs twice, so each branch gets its own BatchNorm batch statistics.
        """
        feats = self.extract_features(img)
        shadow_logits = self.head(feats)
        enhanced_logits = None
        if self.regularizer is not None and sam is not None:
            enhanced_logits = self.head(self.regularizer(feats, sam))
        return {"shadow_logits": shadow_logits, "enhanced_logits": enhanced_logits, "feats": feats}

    def shadow_state_dict(self) -> dict[str, Tensor]:
        """The shadow branch's state (parameters and BN buffers), regulariser dropped, detached copies."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(SHADOW_PREFIXES)}


def build_segmentor(
    backbone: nn.Module,
    *,
    num_classes: int = 19,
    embed_dim: int = 256,
    ssr_stages: Sequence[int] | None = None,
    sam_channels: int = 256,
) -> SSRSegmentor:
    """DAFormer head over ``backbone`` (which exposes ``out_channels``), plus SSR on ``ssr_stages``.

    The regulariser is created after the head, so with the same seed an SSR-on and an SSR-off model get
    identical backbone and head weights.
    """
    head = DAFormerHead(backbone.out_channels, embed_dim=embed_dim, num_classes=num_classes)
    regularizer = None
    if ssr_stages is not None:
        regularizer = SSRRegularizer(backbone.out_channels, stages=ssr_stages, sam_channels=sam_channels)
    return SSRSegmentor(backbone, head, regularizer)


def build_shadow_segmentor(
    backbone: nn.Module, *, num_classes: int = 19, embed_dim: int = 256
) -> SSRSegmentor:
    """Segmentor without a regulariser: the architecture that ``shadow_state_dict`` output loads into."""
    return build_segmentor(backbone, num_classes=num_classes, embed_dim=embed_dim)


def segmentation_loss(
    logits: Tensor,
    label: Tensor,
    pixel_weight: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    mean_over: str = "valid",
) -> Tensor:
    """Pixel-wise cross-entropy of logits upsampled (bilinear, align_corners=False) to the label size.

    ``label`` is (B, H, W) or (B, 1, H, W) with ``ignore_index`` for unlabeled pixels; ``pixel_weight``
    (same shape) multiplies each pixel's loss (e.g. DACS pseudo-label confidence) but does not enter the
    denominator. ``mean_over="valid"`` divides the weighted sum by the number of non-ignored pixels;
    ``mean_over="all"`` divides by all pixels, which is what mmseg 0.16 (DAFormer/MIC/SSR) does.
    """
    if label.dim() == 4:
        label = label.squeeze(1)
    if pixel_weight is not None and pixel_weight.dim() == 4:
        pixel_weight = pixel_weight.squeeze(1)
    if logits.shape[2:] != label.shape[1:]:
        logits = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, label.long(), reduction="none", ignore_index=ignore_index)
    if pixel_weight is not None:
        loss = loss * pixel_weight.to(loss.dtype)
    if mean_over == "valid":
        return loss.sum() / (label != ignore_index).sum().clamp(min=1)
    if mean_over == "all":
        return loss.mean()
    raise ValueError(f"mean_over must be 'valid' or 'all', got {mean_over!r}")


def ssr_loss(
    out: dict[str, Any], label: Tensor, weight: Tensor | None = None, *, mean_over: str = "valid"
) -> dict[str, Tensor | None]:
    """SSR objective: CE(shadow) + CE(enhanced), weight 1 each (reference SSR).

    ``out`` is ``forward_train`` output; ``weight`` and ``mean_over`` are as in ``segmentation_loss``.
    Without enhanced logits, ``loss_enhanced`` is None and ``total`` is CE(shadow).
    """
    loss_shadow = segmentation_loss(out["shadow_logits"], label, weight, mean_over=mean_over)
    loss_enhanced = None
    total = loss_shadow
    if out.get("enhanced_logits") is not None:
        loss_enhanced = segmentation_loss(out["enhanced_logits"], label, weight, mean_over=mean_over)
        total = loss_shadow + loss_enhanced
    return {"loss_shadow": loss_shadow, "loss_enhanced": loss_enhanced, "total": total}
