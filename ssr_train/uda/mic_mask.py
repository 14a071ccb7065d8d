"""MIC block masking (``BlockMaskGenerator``): drop random square blocks of the input image.

A (B,1,round(H/b),round(W/b)) grid is drawn uniformly; a block is kept where the draw is > ``mask_ratio``,
so ``mask_ratio`` is the expected masked fraction. The grid is upsampled with nearest interpolation to
(H, W) and multiplies the image (masked pixels become 0 in normalised space, i.e. the mean colour).
The block size (``[mic] block_size``) is for 512 crops; ``block_size_for`` scales it for other crop sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssr_train.uda import REFERENCE_CROP


def block_size_for(crop: int, *, base: int) -> int:
    """Block size for a ``crop``-pixel crop, proportional to ``base`` at 512-pixel crops (at least 1)."""
    return max(1, round(base * crop / REFERENCE_CROP))


@dataclass(frozen=True)
class BlockMaskGenerator:
    mask_ratio: float
    mask_block_size: int

    @torch.no_grad()
    def generate_mask(self, imgs: Tensor, *, generator: torch.Generator) -> Tensor:
        """Float 0/1 keep-mask (B,1,H,W) for a batch ``imgs`` (B,C,H,W)."""
        b, _, h, w = imgs.shape
        grid = (b, 1, round(h / self.mask_block_size), round(w / self.mask_block_size))
        draw = torch.rand(grid, generator=generator, device=generator.device)
        keep = (draw > self.mask_ratio).float().to(imgs.device)
        return F.interpolate(keep, size=(h, w), mode="nearest")

    @torch.no_grad()
    def mask_image(self, imgs: Tensor, *, generator: torch.Generator) -> Tensor:
        return imgs * self.generate_mask(imgs, generator=generator)
