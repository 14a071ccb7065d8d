"""DACS ``strong_transform`` photometric part: colour jitter then Gaussian blur, in plain torch.

Semantics of DAFormer/MIC ``dacs_transforms`` with kornia 0.5 ``ColorJitter`` / ``GaussianBlur2d``:

* one uniform draw per call decides the colour jitter and one the blur, shared by the whole batch (the
  reference draws them once per training step). Jitter runs when ``u > color_jitter_p``, i.e. with
  probability ``1 - p`` (0.8 for the reference p = 0.2); blur runs when ``u > 0.5``. With ``blur=False``
  the blur draw is skipped (reference: ``'blur': random.uniform(0, 1) if self.blur else 0``).
* jitter works on the de-normalised image in [0, 1]. Each image gets its own factors (the reference calls
  kornia once per image): brightness adds ``U(-s, s)``, contrast multiplies by ``U(1-s, 1+s)``, saturation
  scales HSV saturation by ``U(1-s, 1+s)``, hue shifts by ``U(-s, s)`` turns; each result is clamped to
  [0, 1]; the four run in a random order.
* blur sigma is ``U(0.15, 1.15)`` per image; the kernel size comes from the image size, not from sigma:
  ``k = floor(ceil(0.1 d) - 0.5 + ceil(0.1 d) % 2)`` for each side d (51 for 512), reflect padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssr_cache.image_norm import PIXEL_MEAN, PIXEL_STD


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device).item()
    return low + (high - low) * u


def _as_channels(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def rgb_to_hsv(rgb: Tensor, eps: float = 1e-8) -> Tensor:
    """(…,3,H,W) RGB in [0,1] -> HSV with hue in radians [0, 2π), as kornia."""
    vmax, argmax = rgb.max(dim=-3)
    vmin = rgb.min(dim=-3).values
    delta = vmax - vmin
    sat = delta / (vmax + eps)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    r, g, b = (vmax.unsqueeze(-3) - rgb).unbind(dim=-3)
    candidates = torch.stack((b - g, (r - b) + 2.0 * safe, (g - r) + 4.0 * safe), dim=-3) / safe.unsqueeze(-3)
    hue = candidates.gather(-3, argmax.unsqueeze(-3)).squeeze(-3)
    hue = 2 * math.pi * torch.remainder(hue / 6.0, 1.0)
    return torch.stack((hue, sat, vmax), dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of ``rgb_to_hsv`` (any real hue, taken modulo 2π)."""
    h, s, v = hsv.unbind(dim=-3)
    h6 = torch.remainder(h / (2 * math.pi) * 6.0, 6.0)
    sector = torch.floor(h6)
    f = h6 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    # (r, g, b) for the six hue sectors
    table = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=-3)
    sector = sector.long().clamp(0, 5).unsqueeze(-3)
    index = torch.cat((sector, sector + 6, sector + 12), dim=-3)
    return table.gather(-3, index)


def color_jitter_image(x: Tensor, *, strength: float, generator: torch.Generator) -> Tensor:
    """Kornia-0.5 ColorJitter(b=c=s=h=strength) of one image (3,H,W) in [0,1]."""
    brightness = _uniform(generator, max(0.0, 1 - strength), min(2.0, 1 + strength)) - 1
    contrast = _uniform(generator, max(0.0, 1 - strength), 1 + strength)
    saturation = _uniform(generator, max(0.0, 1 - strength), 1 + strength)
    hue = _uniform(generator, max(-0.5, -strength), min(0.5, strength))
    order = torch.randperm(4, generator=generator, device=generator.device).tolist()
    for op in order:
        if op == 0:
            x = (x + brightness).clamp(0, 1)
        elif op == 1:
            x = (x * contrast).clamp(0, 1)
        elif op == 2:
            h, s, v = rgb_to_hsv(x).unbind(dim=-3)
            x = hsv_to_rgb(torch.stack((h, (s * saturation).clamp(0, 1), v), dim=-3))
        else:
            h, s, v = rgb_to_hsv(x).unbind(dim=-3)
            x = hsv_to_rgb(torch.stack((h + hue * 2 * math.pi, s, v), dim=-3))
    return x


def blur_kernel_size(side: int) -> int:
    """Odd kernel size about 10% of ``side`` (DACS ``gaussian_blur``)."""
    c = math.ceil(0.1 * side)
    return int(math.floor(c - 0.5 + c % 2))


def _gaussian_1d(size: int, sigma: float, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B,C,H,W) with the DACS kernel size and reflect padding."""
    _, c, height, width = x.shape
    ky, kx = blur_kernel_size(height), blur_kernel_size(width)
    gy = _gaussian_1d(ky, sigma, x).reshape(1, 1, ky, 1).repeat(c, 1, 1, 1)
    gx = _gaussian_1d(kx, sigma, x).reshape(1, 1, 1, kx).repeat(c, 1, 1, 1)
    x = F.conv2d(F.pad(x, ((kx - 1) // 2, kx // 2, (ky - 1) // 2, ky // 2), mode="reflect"), gy, groups=c)
    return F.conv2d(x, gx, groups=c)


def strong_transform(
    img: Tensor,
    *,
    generator: torch.Generator,
    mean: Sequence[float] | Tensor = PIXEL_MEAN,
    std: Sequence[float] | Tensor = PIXEL_STD,
    color_jitter_s: float,
    color_jitter_p: float,
    blur: bool,
) -> Tensor:
    """Strong augmentation of a normalised batch (B,3,H,W); returns a new normalised batch."""
    jitter_draw = _uniform(generator)
    blur_draw = _uniform(generator) if blur else 0.0
    out = img
    if jitter_draw > color_jitter_p:
        m, s = _as_channels(mean, img), _as_channels(std, img)
        unit = (img * s + m) / 255.0
        jittered = [color_jitter_image(u, strength=color_jitter_s, generator=generator) for u in unit]
        unit = torch.stack(jittered)
        out = (unit * 255.0 - m) / s
    if blur_draw > 0.5:
        out = torch.cat([gaussian_blur(x[None], _uniform(generator, 0.15, 1.15)) for x in out])
    return out
