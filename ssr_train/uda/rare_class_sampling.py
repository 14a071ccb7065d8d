"""DAFormer rare class sampling (RCS) over cached source views, as the reference draws samples.

Reference (DAFormer/MIC ``mmseg/datasets/uda_dataset.py``: ``get_rcs_class_probs`` + ``UDADataset``):

1. class frequencies from the full-resolution label counts of all source images, ``f_c = n_c / sum n``
   over the classes that occur; ``P(c) = softmax((1 - f_c) / T)``, T = 0.01;
2. a class ``c`` is drawn from ``P``; an image uniformly among those with more than ``min_pixels`` (3000)
   pixels of ``c`` in the full label;
3. the image is cropped at random up to 10 times until the crop holds more than ``min_pixels *
   min_crop_ratio`` (1500) pixels of ``c``; the last crop is kept otherwise.

Here the crops are the image's K cached views: step 3 draws uniformly among that image's views with more
than 1500 px of ``c``, else among all its views. What remains different: the choice is among K fixed views,
not fresh crops (with K = 4 an image whose class is in one view out of 10 random crops' worth is biased
towards that one view, and an image with none of the K views holding the class yields a random view,
where the reference's 10 tries might have found one); a class that occurs but has no eligible image is
never drawn (the reference asserts): its probability is 0 and the others are renormalised. For crops
smaller than 512² (tiny test caches) both thresholds scale with crop area / 512², so that RCS does
something on 64-pixel crops. Caches built before per-image counts were stored (no
``image_class_counts``) use the sum of each image's view counts as its counts.
"""

from __future__ import annotations

import numpy as np

from ssr_train.uda import REFERENCE_CROP


def min_pixels_for_crop(min_pixels: int, crop_hw: tuple[int, int]) -> int:
    """``min_pixels`` scaled by crop area / 512², only for crops smaller than that."""
    area = crop_hw[0] * crop_hw[1]
    if area >= REFERENCE_CROP * REFERENCE_CROP:
        return int(min_pixels)
    return int(round(min_pixels * area / (REFERENCE_CROP * REFERENCE_CROP)))


def rcs_class_probs(counts: np.ndarray, *, temperature: float, min_pixels: int) -> np.ndarray:
    """(C,) sampling probability per class from (N, C) per-image pixel counts (0 for never-drawn classes)."""
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
    """Draws source view indices: a class, an eligible image of it, then one of that image's views.

    image_counts (I, C): full-resolution class pixels per image; view_counts (V, C): class pixels per
    cached view crop; view_image (V,): the image each view was cropped from.
    """

    def __init__(self, image_counts: np.ndarray, view_counts: np.ndarray, view_image: np.ndarray, *,
                 temperature: float, min_pixels: int, min_crop_pixels: int) -> None:
        image_counts = np.asarray(image_counts, dtype=np.int64)
        view_counts = np.asarray(view_counts, dtype=np.int64)
        view_image = np.asarray(view_image, dtype=np.int64)
        if image_counts.ndim != 2 or image_counts.shape[0] == 0:
            raise ValueError(f"image counts must be a non-empty (N, C) array, got shape {image_counts.shape}")
        if view_counts.shape != (len(view_image), image_counts.shape[1]):
            raise ValueError(f"view counts {view_counts.shape} do not match {len(view_image)} views of "
                             f"{image_counts.shape[1]} classes")
        order = np.argsort(view_image, kind="stable")
        bounds = np.searchsorted(view_image[order], np.arange(len(image_counts) + 1))
        self.views_of_image = [order[bounds[i]:bounds[i + 1]] for i in range(len(image_counts))]
        has_views = np.array([len(v) > 0 for v in self.views_of_image])
        image_counts = image_counts * has_views[:, None]  # an image without views cannot be drawn
        self.class_probs = rcs_class_probs(image_counts, temperature=temperature, min_pixels=min_pixels)
        if not self.class_probs.any():
            raise ValueError(f"no image has more than {min_pixels} pixels of any class")
        self.images_with_class = [np.flatnonzero(image_counts[:, c] > min_pixels)
                                  for c in range(image_counts.shape[1])]
        self.view_counts = view_counts
        self.min_crop_pixels = int(min_crop_pixels)

    @classmethod
    def from_store(cls, store, *, temperature: float, min_pixels: int, min_crop_ratio: float) -> RareClassSampler:
        """The sampler of a labelled source store: its per-image counts (recorded at build time), its
        per-view counts and view → image table; thresholds scaled for crops smaller than 512²."""
        view_counts = store.class_counts()
        view_image = store.view_arrays()["sample_index"]
        image_counts = store.image_class_counts()
        if image_counts is None:  # a cache built before per-image counts were stored
            image_counts = np.zeros((len(store.sample_ids), view_counts.shape[1]), np.int64)
            np.add.at(image_counts, view_image, view_counts)
        crop = tuple(store.layout.crop_hw)
        return cls(image_counts, view_counts, view_image, temperature=temperature,
                   min_pixels=min_pixels_for_crop(min_pixels, crop),
                   min_crop_pixels=min_pixels_for_crop(int(round(min_pixels * min_crop_ratio)), crop))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` view indices (int64)."""
        classes = rng.choice(len(self.class_probs), size=n, p=self.class_probs)
        out = np.empty(n, dtype=np.int64)
        for k, c in enumerate(classes):
            views = self.views_of_image[rng.choice(self.images_with_class[c])]
            good = views[self.view_counts[views, c] > self.min_crop_pixels]
            out[k] = rng.choice(good if len(good) else views)
        return out
