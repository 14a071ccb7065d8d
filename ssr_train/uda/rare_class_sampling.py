"""DAFormer rare class sampling (RCS) over cached source views.

Reference (``get_rcs_class_probs`` + ``UDADataset``): class frequencies come from the pixel counts of all
samples, ``f_c = n_c / sum n`` over the classes that occur at all; ``P(c) = softmax((1 - f_c) / T)``.
A sample is drawn by picking a class from ``P`` and then, uniformly, one of the samples with strictly
more than ``min_pixels`` pixels of it.

Deviations forced by the cache: the views are fixed crops, so eligibility uses the per-view crop counts
(the reference checks the full label, > 3000 px, then re-crops up to 10 times until the crop holds
> 3000 * min_crop_ratio px). ``min_pixels_for_crop`` scales ``min_pixels`` with the crop area for crops
smaller than 512². A class that occurs but has no eligible view is never drawn (the reference asserts):
its probability is 0 and the others are renormalised, which equals a softmax over the eligible classes.
"""

from __future__ import annotations

import numpy as np


def min_pixels_for_crop(min_pixels: int, crop_hw: tuple[int, int], base_crop: int = 512) -> int:
    """``min_pixels`` scaled by crop area / ``base_crop``², only for crops smaller than that."""
    area = crop_hw[0] * crop_hw[1]
    if area >= base_crop * base_crop:
        return int(min_pixels)
    return int(round(min_pixels * area / (base_crop * base_crop)))


def rcs_class_probs(counts: np.ndarray, *, temperature: float = 0.01, min_pixels: int = 3000) -> np.ndarray:
    """(C,) sampling probability per class from (N,C) per-view pixel counts (0 for never-drawn classes)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = counts.sum(axis=0)
    present = total > 0
    drawable = present & (counts > min_pixels).any(axis=0)
    probs = np.zeros(counts.shape[1], dtype=np.float64)
    if not drawable.any():
        return probs
    freq = total[present] / total[present].sum()
    logits = (1.0 - freq) / temperature
    logits = logits[drawable[present]]
    e = np.exp(logits - logits.max())
    probs[drawable] = e / e.sum()
    return probs


class RareClassSampler:
    """Draws source view indices: a class from ``class_probs``, then a uniform eligible view of it."""

    def __init__(self, counts: np.ndarray, *, temperature: float = 0.01, min_pixels: int = 3000) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] == 0:
            raise ValueError(f"counts must be a non-empty (N, C) array, got shape {counts.shape}")
        self.class_probs = rcs_class_probs(counts, temperature=temperature, min_pixels=min_pixels)
        if not self.class_probs.any():
            raise ValueError(f"no view has more than {min_pixels} pixels of any class")
        self.views_with_class = [np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])]

    def draw_classes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(len(self.class_probs), size=n, p=self.class_probs)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` view indices (int64)."""
        classes = self.draw_classes(rng, n)
        return np.array([rng.choice(self.views_with_class[c]) for c in classes], dtype=np.int64)
