"""Synthetic inputs shared by the cache benchmarks: GTA5-size frames that weigh what photographs do, and
smooth Gaussian fields shaped like SAM neck maps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ssr_cache.data.labels import ID_PALETTE
from ssr_cache.data.png_io import write_png_atomic
from ssr_cache.data.synthetic_layouts import forced_labels, gta5_files
from ssr_cache.data.synthetic_scene import STYLES, render_scene

GTA5_SIZE = (1914, 1052)  # (W, H) of a GTA5 frame
RESIZE = (1280, 720)  # DAFormer's gta5 img_scale (W, H)
CROP = 512


def write_gta5_like(root: Path, n_images: int, style: str, seed: int = 0, distinct: int | None = None
                    ) -> list[Path]:
    """n_images scenes at 1914x1052 in the GTA5 layout (images/NNNNN.png, palette labels/NNNNN.png).
    `distinct`: render only this many and copy them round-robin (decoding costs the same, rendering does not)."""
    distinct = n_images if distinct is None else min(distinct, n_images)
    paths = []
    for i in range(n_images):
        image_path, label_path = gta5_files(root, i)
        if i < distinct:
            image, labels = render_scene(STYLES[style], *GTA5_SIZE, np.random.default_rng([seed, i]),
                                         forced_labels(i, n_images))
            write_png_atomic(image_path, image)
            write_png_atomic(label_path, labels, palette=ID_PALETTE)
        else:
            src_image, src_label = gta5_files(root, i % distinct)
            image_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src_image, image_path)
            shutil.copyfile(src_label, label_path)
        paths.append(image_path)
    return paths


def smooth_fields(rng: np.random.Generator, n: int, c: int, g: int, corr: float, std: float) -> np.ndarray:
    """Gaussian random fields with correlation length `corr` cells and per-channel offsets (as the store tests)."""
    x = rng.standard_normal((n, c, g, g))
    k = np.fft.fftfreq(g)
    x = np.fft.ifft2(np.fft.fft2(x) * np.exp(-0.5 * (k[:, None] ** 2 + k**2) * (2 * np.pi * corr) ** 2)).real
    x = x / x.std(axis=(2, 3), keepdims=True) * std + rng.normal(0, std / 2, (n, c, 1, 1))
    return x.astype(np.float32)


def smooth_feature_set(n: int, levels: tuple[int, ...], channels: int) -> dict[str, np.ndarray]:
    finest = smooth_fields(np.random.default_rng(0), n, channels, levels[0], corr=3.0, std=0.5)
    out = {}
    for g in levels:  # coarser levels are average pools, as the encoder makes them
        f = levels[0] // g
        out[f"l{g}"] = finest.reshape(n, channels, g, f, g, f).mean(axis=(3, 5))
    return out
