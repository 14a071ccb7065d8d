"""SSR regulariser: backbone stage tokens cross-attend to frozen SAM image-encoder tokens.

Follows the SSR reference (geyanqi/SSR, ``mmseg/models/uda/ssr.py``): per stage, SAM tokens are first
embedded to the stage width (Linear 256->C, with bias), then a cross-attention with Q = Linear(C->C)
(no bias) of the stage tokens, K/V = Linear(C->2C) (no bias) of the embedded SAM tokens, scale
head_dim**-0.5, output projection Linear(C->C) (with bias), no norm and no positional encoding. The
enhanced feature is ``feat + attention``. Heads = C // 64 (at least 1 for mit_b0's C=32 stage).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

SamInput = Tensor | Sequence[Tensor] | Mapping[int, Tensor]


def default_num_heads(channels: int) -> int:
    return max(1, channels // 64)


class SamCrossAttention(nn.Module):
    """Enhance one stage: (B, C, H, W) stage map + (B, sam_channels, g, g) SAM map -> (B, C, H, W)."""

    def __init__(self, channels: int, *, sam_channels: int = 256, num_heads: int | None = None) -> None:
        super().__init__()
        num_heads = default_num_heads(channels) if num_heads is None else num_heads
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.sam_embed = nn.Linear(sam_channels, channels)
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(channels, 2 * channels, bias=False)
        self.proj = nn.Linear(channels, channels)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def attend(self, feat: Tensor, sam: Tensor) -> Tensor:
        """The attention term alone, (B, C, H, W); forward adds it to ``feat``."""
        b, c, h, w = feat.shape
        if sam.shape[0] != b:
            raise ValueError(f"SAM batch {sam.shape[0]} != feature batch {b}")
        # The cache stores SAM features in reduced precision; compute in the feature's dtype.
        sam_tokens = self.sam_embed(sam.to(feat.dtype).flatten(2).transpose(1, 2))
        q = self._split_heads(self.q(feat.flatten(2).transpose(1, 2)))
        k, v = (self._split_heads(t) for t in self.kv(sam_tokens).chunk(2, dim=-1))
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.transpose(1, 2).reshape(b, h * w, c))
        return x.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, feat: Tensor, sam: Tensor) -> Tensor:
        return feat + self.attend(feat, sam)


class SSRRegularizer(nn.Module):
    """Cross-attention enhancement of the selected backbone stages; other stages pass through unchanged.

    Args:
        stage_channels: channels of every backbone stage, e.g. (32, 64, 160, 256) for mit_b0.
        stages: indices of the stages to enhance.
        sam_channels: channels of the SAM feature maps (256 for every SAM image encoder).
    """

    def __init__(
        self, stage_channels: Sequence[int], *, stages: Sequence[int] = (0, 1, 2, 3), sam_channels: int = 256
    ) -> None:
        super().__init__()
        self.stage_channels = tuple(stage_channels)
        self.stages = tuple(sorted(set(stages)))
        for s in self.stages:
            if not 0 <= s < len(self.stage_channels):
                raise ValueError(f"stage {s} out of range for {len(self.stage_channels)} backbone stages")
        self.attentions = nn.ModuleDict(
            {
                str(s): SamCrossAttention(self.stage_channels[s], sam_channels=sam_channels)
                for s in self.stages
            }
        )

    def _sam_for_stage(self, sam: SamInput, stage: int) -> Tensor:
        if isinstance(sam, Tensor):
            return sam
        if isinstance(sam, Mapping):
            if stage not in sam:
                raise KeyError(f"no SAM map given for stage {stage}")
            return sam[stage]
        if len(sam) != len(self.stage_channels):
            raise ValueError(f"expected one SAM map per stage ({len(self.stage_channels)}), got {len(sam)}")
        return sam[stage]

    def forward(self, feats: Sequence[Tensor], sam: SamInput) -> list[Tensor]:
        """Enhanced stage maps.

        ``sam`` is one (B, 256, g, g) map shared by all stages, a sequence with one map per stage, or a
        ``{stage: map}`` mapping covering the selected stages (e.g. a pooled cache level for some stage).
        """
        if len(feats) != len(self.stage_channels):
            raise ValueError(f"expected {len(self.stage_channels)} feature maps, got {len(feats)}")
        out = list(feats)
        for s in self.stages:
            out[s] = self.attentions[str(s)](feats[s], self._sam_for_stage(sam, s))
        return out
