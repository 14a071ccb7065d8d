"""DAFormer decode head: per-stage MLP embedding, separable ASPP fusion, 1x1 classifier.

Mirrors the "daformer_sepaspp" configuration of DAFormer (embed_cfg = mlp without norm/act, fusion_cfg =
aspp with sep=True, pool=False, dilations (1, 6, 12, 18), BN + ReLU): every conv of the fusion, including
the depthwise part of each separable conv and the 3x3 bottleneck, is conv (no bias) + BN + ReLU; only
the final classifier is a plain 1x1 conv with bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Sequential):
    """Conv (no bias, BN follows) + BatchNorm + ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise kxk ConvBNReLU followed by pointwise 1x1 ConvBNReLU (both normalised and activated)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            ConvBNReLU(
                in_channels, in_channels, kernel_size, padding=padding, dilation=dilation, groups=in_channels
            ),
            ConvBNReLU(in_channels, out_channels, 1),
        )


class SeparableASPP(nn.Module):
    """ASPP without the image-pool branch: dilation 1 is a 1x1 ConvBNReLU, others are separable 3x3."""

    def __init__(self, in_channels: int, channels: int, *, dilations: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1)
            if d == 1
            else SeparableConvBNReLU(in_channels, channels, 3, dilation=d)
            for d in dilations
        )
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


class DAFormerHead(nn.Module):
    """Decode head over the 4 backbone stages; logits come out at the resolution of stage 0 (1/4 input).

    Args:
        in_channels: channels of the backbone stages, e.g. (32, 64, 160, 256) for mit_b0.
        embed_dim: width of the per-stage embeddings and of the fused map (DAFormer: 256).
        num_classes: number of output classes.
        dilations: ASPP dilation rates.
        dropout: channel dropout (Dropout2d) before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        embed_dim: int = 256,
        num_classes: int = 19,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        # Token-wise linear embedding (SegFormer MLP): no norm, no activation.
        self.embeds = nn.ModuleList(nn.Linear(c, embed_dim) for c in self.in_channels)
        self.fuse = SeparableASPP(len(self.in_channels) * embed_dim, embed_dim, dilations=dilations)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # As mmcv ConvModule (kaiming fan_out, BN 1/0) and mmseg conv_seg (normal std 0.01);
        # the embedding Linears keep PyTorch's default init like the reference MLP.
        for m in self.fuse.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, feats: Sequence[Tensor]) -> Tensor:
        """Fused (B, embed_dim, H0, W0) map at the resolution of feats[0], before dropout/classifier."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        size = feats[0].shape[2:]
        embedded = []
        for feat, embed in zip(feats, self.embeds, strict=True):
            b, _, h, w = feat.shape
            x = embed(feat.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            if x.shape[2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            embedded.append(x)
        return self.fuse(torch.cat(embedded, dim=1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Class logits (B, num_classes, H0, W0)."""
        return self.classifier(self.dropout(self.forward_features(feats)))
