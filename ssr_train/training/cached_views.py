"""Training data streamed from a feature store: one store read per sample, SAM never involved.

A sample is a stored view (the view *is* the crop: no re-cropping). The sampler yields
(view index, augmentation seed) pairs from a seeded, rank-aware, resumable stream, so a run resumed
at iteration k sees exactly the samples and augmentations an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ssr_cache.errors import SSRError
from ssr_cache.image_norm import normalize
from ssr_cache.store.feature_store import FeatureStore


def normalized_chw(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H,W,3) → float32 (3,H,W), the one mmseg/SAM normalisation."""
    return normalize(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None])[0]


def photometric_distortion(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion, reduced to brightness, contrast, saturation (each with p=0.5)."""
    x = pixels.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    if rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = gray[..., None] + (x - gray[..., None]) * rng.uniform(0.5, 1.5)
    return np.clip(x, 0, 255).astype(np.uint8)


class CachedViewDataset(Dataset):
    """Items: {"img" (3,H,W) float, "label" (H,W) long, "sam": {level: (C,g,g) float}, "class_counts",
    "index"}. Indexed by (view index, augmentation seed) pairs from ViewStreamSampler."""

    def __init__(self, url: str, *, levels: Sequence[str] = (), flip: bool = False, photometric: bool = False):
        self.url = url
        self.levels = tuple(levels)
        self.flip = flip
        self.photometric = photometric
        self._store = None
        store = self.store
        self.n_views = store.layout.n_views
        missing = [lv for lv in self.levels if lv not in store.feature_names]
        if missing:
            raise SSRError(f"{url} has no feature level(s) {', '.join(missing)}; it stores "
                           f"{', '.join(store.feature_names)}")

    @property
    def store(self):
        # Opened lazily so each DataLoader worker has its own handle.
        if self._store is None:
            self._store = FeatureStore.open(self.url, mode="r")
        return self._store

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return self.n_views

    def __getitem__(self, key) -> dict:
        index, aug_seed = key if isinstance(key, tuple) else (key, 0)
        try:
            view = self.store.read_view(int(index), levels=self.levels)
        except Exception as exc:  # zarr/codec errors come in many types; a checksum failure is one of them
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise SSRError(f"{self.url}: view {int(index)} cannot be read ({reason}); run "
                           f"`ssr cache verify {self.url}`") from None
        pixels, label = view["pixels"], view["label"]
        feats = view["features"]
        rng = np.random.default_rng(aug_seed)
        if self.flip and rng.random() < 0.5:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
            feats = {k: v[..., ::-1] for k, v in feats.items()}
        if self.photometric:
            pixels = photometric_distortion(pixels, rng)
        return {
            "img": normalized_chw(pixels),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
            "sam": {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in feats.items()},
            "class_counts": torch.from_numpy(np.asarray(view["class_counts"], np.int64)),
            "index": int(index),
        }


class ViewStreamSampler(Sampler):
    """Endless stream of (view index, aug seed) for one rank, resumable at any iteration.

    The global stream is a concatenation of seeded permutations (epochs) — or of draws from
    `weights` (rare-class sampling) — and rank r of w takes positions it*B*w + r*B … + B - 1.
    """

    def __init__(self, n_views: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0, draw=None):
        self.n_views = n_views
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_iter = start_iter
        self.draw = draw  # optional callable(rng, n) -> view indices (RCS); default: epoch permutations

    def _global_position_stream(self, start: int) -> Iterator[tuple[int, int]]:
        if self.draw is None:
            epoch, offset = divmod(start, self.n_views)
            while True:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_views)
                for pos in range(offset, self.n_views):
                    yield int(perm[pos]), epoch * self.n_views + pos
                epoch, offset = epoch + 1, 0
        else:
            block = 1024  # draws come in seeded blocks so any position can be reached directly
            b, offset = divmod(start, block)
            while True:
                picks = self.draw(np.random.default_rng([self.seed, b]), block)
                for pos in range(offset, block):
                    yield int(picks[pos]), b * block + pos
                b, offset = b + 1, 0

    def __iter__(self):
        per_iter = self.batch_size * self.world_size
        it = self.start_iter
        stream = self._global_position_stream(it * per_iter)
        while True:
            chunk = [next(stream) for _ in range(per_iter)]
            for index, position in chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]:
                yield index, int(np.random.default_rng([self.seed, 7, position]).integers(2**31))
            it += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


def collate_views(items: list[dict]) -> dict:
    return {
        "img": torch.stack([it["img"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "sam": {k: torch.stack([it["sam"][k] for it in items]) for k in items[0]["sam"]},
        "class_counts": torch.stack([it["class_counts"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }


def batch_to_device(batch: dict, device: torch.device) -> dict:
    return {k: ({n: t.to(device, non_blocking=True) for n, t in v.items()} if isinstance(v, dict)
                else v.to(device, non_blocking=True)) for k, v in batch.items()}
