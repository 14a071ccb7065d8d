"""int8 affine quantisation of feature maps and the Blosc settings chosen per array kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zarr.codecs import BloscCodec, Crc32cCodec

from ssr_cache.errors import SSRError
from ssr_cache.store.feature_codec import (
    check_encoded_features,
    dequantize_int8,
    encode_features,
    encode_features_unchecked,
    feature_compressors,
    lossless_compressors,
    quantize_int8,
)


def test_quantize_shapes_and_error_bound():
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 0.3, (3, 16, 8, 8)) + rng.normal(0, 2, (3, 16, 1, 1))).astype(np.float32)
    codes, scale, offset = quantize_int8(x)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    assert scale.dtype == offset.dtype == np.float32 and scale.shape == offset.shape == (3, 16)
    assert codes.min() == 0 and codes.max() == 255  # min/max map to the ends of the code range
    np.testing.assert_allclose(offset, x.min(axis=(2, 3)))
    np.testing.assert_allclose(scale, (x.max(axis=(2, 3)) - x.min(axis=(2, 3))) / 255, rtol=1e-6)
    y = dequantize_int8(codes, scale, offset)
    assert y.dtype == np.float32
    assert (np.abs(y - x) <= scale[:, :, None, None] / 2 + 1e-6).all()
    single = dequantize_int8(codes[1], scale[1], offset[1])  # one view: (C,h,w) with (C,) params
    np.testing.assert_array_equal(single, y[1])


def test_constant_channel_is_exact():
    x = np.random.default_rng(1).normal(size=(2, 4, 5, 5)).astype(np.float32)
    x[0, 2] = 3.25
    x[1, 0] = 0.0
    codes, scale, offset = quantize_int8(x)
    assert scale[0, 2] == 0 and scale[1, 0] == 0 and not codes[0, 2].any()
    y = dequantize_int8(codes, scale, offset)
    assert (y[0, 2] == 3.25).all() and (y[1, 0] == 0.0).all()
    assert np.isfinite(y).all()


def test_int8_cosine_on_gaussian_features():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (4, 256, 32, 32)).astype(np.float32) * rng.uniform(0.1, 1.0, (1, 256, 1, 1))
    y = dequantize_int8(*quantize_int8(x))
    a = x.transpose(0, 2, 3, 1).reshape(-1, 256)
    b = y.transpose(0, 2, 3, 1).reshape(-1, 256)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"int8 per-token cosine on Gaussian features: min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() >= 0.999


def test_nonfinite_input_shows_in_scale():
    x = np.zeros((1, 2, 3, 3), np.float32)
    x[0, 1, 1, 1] = np.nan
    codes, scale, offset = quantize_int8(x)
    assert np.isfinite(scale[0, 0]) and not np.isfinite(scale[0, 1])
    assert codes.dtype == np.uint8
    with pytest.raises(ValueError, match="expects"):
        quantize_int8(np.zeros((2, 3, 3), np.float32))


def reference_codes(x: np.ndarray) -> np.ndarray:
    """An independent reading of the definition: float32 steps as written, numpy instead of torch."""
    lo, hi = x.min(axis=(2, 3)), x.max(axis=(2, 3))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = ((hi - lo) / np.float32(255)).astype(np.float32)
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        q = (x - lo[:, :, None, None]) * inv[:, :, None, None]
    q = np.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(q), 0, 255).astype(np.uint8)


def test_codes_match_the_definition_with_and_without_nonfinite_parameters():
    """The NaN/Inf pass over the codes is skipped when every channel's parameters are finite; the codes stay
    those of the definition either way: tiny ranges (1/scale overflows), huge ones (hi - lo overflows), NaN, ±Inf."""
    rng = np.random.default_rng(5)
    x = (rng.normal(0, 3, (3, 8, 6, 6))).astype(np.float32)
    np.testing.assert_array_equal(quantize_int8(x)[0], reference_codes(x))
    x[0, 0] = 1e-44
    x[0, 0, 0, 0] = 0.0  # scale a denormal: 1/scale is inf
    x[0, 1, 0, 0], x[0, 1, 0, 1] = 3e38, -3e38  # hi - lo overflows float32
    x[1, 2, 1, 1], x[2, 3, 0, 0], x[2, 4, 2, 2] = np.nan, np.inf, -np.inf
    np.testing.assert_array_equal(quantize_int8(x)[0], reference_codes(x))


def test_codes_round_half_to_even_as_the_definition_does():
    """The CPU's one-pass rounding (cv2's saturating conversion) on exact ties k + 0.5 and at both ends."""
    rng = np.random.default_rng(7)
    x = rng.normal(0, 2, (2, 6, 40, 40)).astype(np.float32)
    x[0, 0] = rng.integers(0, 511, (40, 40)) / np.float32(2)  # lo 0, hi 255: q = x, half of them ties
    x[0, 0, 0, :4] = 0.0, 255.0, 2.5, 3.5
    assert (x[0, 0] % 1 == 0.5).sum() > 500
    codes = quantize_int8(x)[0]
    np.testing.assert_array_equal(codes, reference_codes(x))
    assert codes[0, 0][x[0, 0] == 2.5].max() == 2 and codes[0, 0][x[0, 0] == 3.5].min() == 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_features_refuses_nonfinite_int8_input(bad):
    x = np.random.default_rng(6).normal(size=(2, 4, 5, 5)).astype(np.float32)
    x[1, 3, 2, 2] = bad
    with pytest.raises(SSRError, match="views 4-5 contain NaN/Inf"):
        encode_features("l8", torch.from_numpy(x), "int8", "views 4-5")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_the_unchecked_encoding_is_encode_features_with_its_check_left_for_the_host(dtype):
    """The build checks a batch's features once they reach the host (no wait on the GPU): same stored
    arrays, and the check refuses what encode_features refuses, naming the views."""
    x = torch.from_numpy(np.random.default_rng(7).normal(size=(2, 4, 5, 5)).astype(np.float32))
    stored, check = encode_features_unchecked("l8", x, dtype)
    want = encode_features("l8", x, dtype, "views 0-1")
    assert stored.keys() == want.keys() and all(torch.equal(stored[k], want[k]) for k in want)
    assert check.dtype == torch.float32 and check.numel() == (1 if dtype == "int8" else 2)
    check_encoded_features("l8", check.numpy(), dtype, "views 0-1")  # good features pass
    bad = x.clone()
    bad[1, 3, 2, 2] = 7e4 if dtype == "float16" else np.inf
    _, check = encode_features_unchecked("l8", bad, dtype)
    message = "overflow float16" if dtype == "float16" else "contain NaN/Inf"
    with pytest.raises(SSRError, match=f"l8 of views 6-7 {message}"):
        check_encoded_features("l8", check.numpy(), dtype, "views 6-7")


def test_compressor_choices():
    fp16, crc = feature_compressors("float16")
    assert isinstance(fp16, BloscCodec) and isinstance(crc, Crc32cCodec)
    assert fp16.cname.value == "zstd" and fp16.clevel == 3 and fp16.shuffle.value == "shuffle"
    int8 = feature_compressors("int8")[0]
    assert int8.shuffle.value == "noshuffle" and int8.blocksize == 1 << 20
    assert lossless_compressors("uint8")[0].shuffle.value == "noshuffle"
    assert lossless_compressors("int32")[0].shuffle.value == "shuffle"
    with pytest.raises(ValueError, match="float16"):
        feature_compressors("bfloat16")
