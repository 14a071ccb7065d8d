"""How cached arrays are encoded: int8 affine quantisation of features and the Blosc settings per array kind.

Compressor choices were measured on smooth Gaussian random fields shaped like SAM neck maps
(256 x 64 x 64, correlation length 0 / 1.5 / 3 cells, std 0.1-1), stored size relative to float32:

  float16, zstd clevel 3, byte shuffle, 1 MiB blocks:   0.423 / 0.398 / 0.364   (~150 MB/s/core encode)
  float16, zstd clevel 3, bitshuffle,   1 MiB blocks:   0.432 / 0.418 / 0.403
  float16, zstd clevel 1, byte shuffle:                 0.423 / 0.421 / 0.388   (~450 MB/s/core)
  int8 codes, zstd clevel 3, no shuffle, 1 MiB blocks:  0.228 / 0.231 / 0.220   (~300 MB/s/core)
  int8 codes, zstd clevel 3, bitshuffle:                0.250 / 0.232 / 0.215

Byte shuffle beats bitshuffle for float16 under zstd (zstd is byte-oriented; the sign/exponent byte is
the compressible part). clevel 5+ gains < 1% at half the speed. Only codecs from the Zarr v3 spec
(blosc, crc32c) are used so any v3 reader can open a cache; a numcodecs delta filter would shrink int8
codes a further ~15-35% on smooth maps but is outside the spec.

Every chunk also carries a crc32c so a damaged chunk fails loudly on read instead of decoding to garbage.
"""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec

from ssr_cache.data.opencv import cv2
from ssr_cache.errors import SSRError

FEATURE_DTYPES = ("float16", "int8")
FEATURE_CLEVEL = 3
FEATURE_BLOCKSIZE = 1 << 20  # larger blocks give zstd more context (measured ~2-4% smaller than auto)
INT8_LEVELS = 255
FP16_MAX = 65504.0


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-view, per-channel min/max affine quantisation of (n, C, h, w) features to uint8 codes.

    Returns (codes uint8 (n,C,h,w), scale float32 (n,C), offset float32 (n,C)) with
    x ~= codes * scale + offset. A constant channel gets scale 0 and codes 0 (exact on decode).
    Non-finite input propagates into scale/offset so `verify` can flag it. numpy face of `quantize_int8_torch`.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"quantize_int8 expects (n, C, h, w) features, got shape {x.shape}")
    codes, scale, offset = quantize_int8_torch(torch.from_numpy(x))
    return codes.numpy(), scale.numpy(), offset.numpy()


def quantize_int8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_int8` on a float (n, C, h, w) tensor, on its own device (the build quantises on the GPU
    before the copy to the host). float32 arithmetic, round half to even: the same bytes on every device
    up to float32 division rounding."""
    x = x.float()
    lo, hi = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))  # NaN propagates into both (aminmax(dim) is ~10x slower)
    scale = (hi - lo) / INT8_LEVELS
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = x - lo[:, :, None, None]
    q.mul_(inv[:, :, None, None])
    # With finite parameters every q is finite (0 <= x - lo <= hi - lo), so the NaN/Inf pass over the whole
    # tensor is needed only when they are not: the same bytes, one pass fewer in the usual case.
    if q.device.type != "cpu":
        # On a GPU the pass costs less than the host waiting for the check (the build queues the next batch
        # meanwhile); with finite parameters it changes nothing.
        q.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    elif not bool(torch.isfinite(torch.stack([lo, hi, scale, inv])).all()):
        q = torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)
    elif q.numel():
        return _round_to_codes_cpu(q), scale, lo
    codes = q.round_().clamp_(0, INT8_LEVELS)
    return codes.to(torch.uint8), scale, lo


def _round_to_codes_cpu(q: torch.Tensor) -> torch.Tensor:
    """round-half-even, clamp to 0..255 and cast to uint8 in one pass: cv2's saturating conversion, ~4x
    faster on a CPU than torch's three (its float→uint8 cast alone is 3.5x slower than cv2's). Only for finite
    parameters, where q >= 0, so the absolute value it takes changes nothing; tests pin it to the definition."""
    flat = q.numpy().reshape(q.shape[0] * q.shape[1], -1)
    return torch.from_numpy(cv2.convertScaleAbs(flat).reshape(q.shape))


def encode_features(name: str, x: torch.Tensor, dtype: str, where: str) -> dict[str, torch.Tensor]:
    """Float features (n, C, g, g) → what the store keeps of them, on x's device: {name: float16}, or for
    int8 {name: uint8 codes, name_scale: float32 (n, C), name_offset: float32 (n, C)}.

    NaN/Inf (and, for float16, values beyond its range) are refused with one line naming `where` (views).
    """
    stored, check = encode_features_unchecked(name, x, dtype)
    check_encoded_features(name, check.cpu().numpy(), dtype, where)
    return stored


def encode_features_unchecked(name: str, x: torch.Tensor, dtype: str
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`encode_features` without waiting for the device: (stored arrays, check), where check is a small
    float32 tensor on x's device for `check_encoded_features` to judge once it is on the host. The build
    copies both to the host together, so a GPU never idles while a batch is checked."""
    if dtype == "int8":
        codes, scale, offset = quantize_int8_torch(x)
        # Non-finite input shows in the per-channel parameters (NaN and ±Inf propagate into min/max): no pass
        # over the features of its own.
        check = torch.isfinite(torch.stack([scale, offset])).all().float().reshape(1)
        return {name: codes, f"{name}_scale": scale, f"{name}_offset": offset}, check
    if dtype != "float16":
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    # One fused min/max pass; both propagate NaN. (abs().amax() would materialise a copy.)
    x = x.detach()
    check = torch.stack(torch.aminmax(x)).float() if x.numel() else torch.zeros(2, device=x.device)
    return {name: x.to(torch.float16)}, check


def check_encoded_features(name: str, check: np.ndarray, dtype: str, where: str) -> None:
    """Refuse, with one line naming `where`, the features whose `encode_features_unchecked` check is bad."""
    if dtype == "int8":
        if check[0] != 1:
            raise SSRError(f"SAM features {name} of {where} contain NaN/Inf (or a channel's range exceeds "
                           "float32); not caching them")
        return
    lo, hi = float(check[0]), float(check[1])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise SSRError(f"SAM features {name} of {where} contain NaN/Inf; not caching them")
    peak = max(-lo, hi)
    if peak > FP16_MAX:
        raise SSRError(f"SAM features {name} of {where} overflow float16 (max |x| {peak:.3g}); "
                       "use --feature-dtype int8")


def dequantize_int8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Inverse of `quantize_int8`; works for (n, C, h, w) with (n, C) params or (C, h, w) with (C,)."""
    codes = np.asarray(codes)
    scale = np.asarray(scale, dtype=np.float32)[..., None, None]
    offset = np.asarray(offset, dtype=np.float32)[..., None, None]
    return codes.astype(np.float32) * scale + offset


def feature_compressors(dtype: str) -> tuple:
    """Blosc + crc32c for feature arrays: `dtype` is the stored feature dtype, "float16" or "int8"."""
    if dtype == "float16":
        blosc = BloscCodec(cname="zstd", clevel=FEATURE_CLEVEL, shuffle="shuffle", blocksize=FEATURE_BLOCKSIZE)
    elif dtype == "int8":  # the uint8 codes
        blosc = BloscCodec(cname="zstd", clevel=FEATURE_CLEVEL, shuffle="noshuffle", blocksize=FEATURE_BLOCKSIZE)
    else:
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    return (blosc, Crc32cCodec())


def lossless_compressors(dtype: np.dtype | str) -> tuple:
    """Blosc zstd + crc32c for pixels, labels, counts, quantisation params and the view table.

    Bytes (images, label maps) compress best unshuffled; wider types get byte shuffle.
    """
    shuffle = "noshuffle" if np.dtype(dtype).itemsize == 1 else "shuffle"
    return (BloscCodec(cname="zstd", clevel=3, shuffle=shuffle), Crc32cCodec())


def flag_compressors() -> tuple:
    """Done flags: a few dozen bytes per shard, so no compression; the checksum makes a torn write unreadable."""
    return (Crc32cCodec(),)
