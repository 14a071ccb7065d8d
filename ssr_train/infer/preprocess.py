"""The one preprocessing of inference, in torch on the device, traceable into an exported graph.

A uint8 RGB batch (N, 3, H, W) is rescaled keeping its aspect ratio to fit the training ``resize`` (W, H)
— mmcv ``imrescale``'s size rule, bilinear with half-pixel centres and no antialiasing, as the cache's
views are sampled (they come from cv2's fixed-point uint8 resize, within one grey level of this float
result: under 1/50 of a normalised unit) — and normalised with ``ssr_cache.image_norm``. The same code runs in the Predictor, in the
evaluation and inside an exported ONNX/TorchScript graph, so all three see the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssr_cache.errors import SSRError
from ssr_cache.image_norm import normalize


def check_resize(resize) -> tuple[int, int]:
    """(W, H) positive ints, or one line."""
    try:
        width, height = (int(v) for v in resize)
    except (TypeError, ValueError):
        raise SSRError(f"resize must be two sizes (W, H), got {resize!r}") from None
    if width <= 0 or height <= 0:
        raise SSRError(f"resize must be two positive sizes (W, H), got {tuple(resize)}")
    return width, height


def training_size(height, width, resize: tuple[int, int]):
    """(new_h, new_w): mmcv keep-ratio rescale of an (height, width) image to fit ``resize`` (W, H).

    Written with ``torch.sym_*`` so it also holds for symbolic sizes (ONNX export with dynamic H, W);
    for plain ints it equals ``ssr_cache.build.view_plan.rescale_size``.
    """
    if isinstance(height, Tensor):  # torch.jit.trace hands sizes over as tensors; a trace fixes them anyway
        height, width = int(height), int(width)
    long_side, short_side = max(resize), min(resize)
    factor = torch.sym_min(long_side / torch.sym_max(height, width), short_side / torch.sym_min(height, width))
    return torch.sym_int(height * factor + 0.5), torch.sym_int(width * factor + 0.5)


def resize_images(images: Tensor, resize: tuple[int, int] | None) -> Tensor:
    """uint8 or float (N, 3, H, W) in 0–255 → float32 (N, 3, h, w) rescaled as in training (None: as is)."""
    x = images.float()
    if resize is None:
        return x
    size = training_size(x.shape[2], x.shape[3], resize)
    if isinstance(size[0], int) and tuple(size) == tuple(x.shape[2:]):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def prepare(images: Tensor, resize: tuple[int, int] | None) -> Tensor:
    """uint8 (N, 3, H, W) RGB → the normalised network input at the training scale (float32)."""
    return normalize(resize_images(images, resize))
