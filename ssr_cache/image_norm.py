"""The one image normalisation: mmseg's ImageNet mean/std in 0–255 units (DAFormer/MIC/SSR configs
`img_norm_cfg`), which SAM's own `pixel_mean`/`pixel_std` equal. Everything that feeds a network — the
cache build, training, inference, export — normalises through here."""

from __future__ import annotations

import torch

from ssr_cache.device_constant import device_constant

PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in 0–255 (uint8 or float) → float32 (x − mean) / std, on the images' device."""
    device = images.device
    mean, std = device_constant(("pixel mean/std", device), lambda: tuple(
        torch.tensor(v, device=device, dtype=torch.float32).view(1, 3, 1, 1) for v in (PIXEL_MEAN, PIXEL_STD)))
    return (images.float() - mean) / std
