"""The trainer's data: the two stores, checked to belong together and to be intact, and their streams."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ssr_cache.data.label_space import LabelSpace
from ssr_cache.errors import SSRError
from ssr_cache.store.feature_store import FeatureStore
from ssr_train.training.cached_views import CachedViewDataset, ViewStreamSampler, collate_views
from ssr_train.training.config import TrainConfig


@dataclass
class Stores:
    source: FeatureStore
    target: FeatureStore | None
    label_space: LabelSpace

    @property
    def sam_random_init(self) -> bool:
        """Whether the cached SAM features come from a randomly initialised encoder (no SAM checkpoint)."""
        return bool(self.source.fingerprint.get("encoder", {}).get("random_init", False))


def open_stores(cfg: TrainConfig) -> Stores:
    """Open, match and check the caches: a labelled source, a target built alike, one label space."""
    if not cfg.data.source_cache:
        raise SSRError("--source-cache is required")
    source = FeatureStore.open(cfg.data.source_cache, mode="r")
    target = FeatureStore.open(cfg.data.target_cache, mode="r") if cfg.data.target_cache else None
    if not source.labelled:
        raise SSRError(f"{cfg.data.source_cache} is not a labelled source cache (dataset {source.dataset})")
    space = source.label_space
    if target is not None:
        for key in ("encoder", "crop", "levels", "feature_dtype"):
            if source.fingerprint.get(key) != target.fingerprint.get(key):
                raise SSRError(f"source and target caches disagree on {key}: {source.fingerprint.get(key)} vs "
                               f"{target.fingerprint.get(key)}")
        if not space.same_classes(target.label_space):
            raise SSRError(f"source and target caches predict different classes: {source.url} "
                           f"({space.name}, {space.num_classes}) vs {target.url} ({target.label_space.name}, "
                           f"{target.label_space.num_classes})")
    if cfg.model.num_classes is not None and cfg.model.num_classes != space.num_classes:
        raise SSRError(f"model.num_classes = {cfg.model.num_classes} but the caches' label space {space.name} "
                       f"has {space.num_classes} classes; leave it unset")
    for store in (source, target):
        if store is not None:
            check_intact(store)
    return Stores(source, target, space)


def check_intact(store: FeatureStore, feature_names=None) -> None:
    """Every view is built and every shard file a done view needs is there: a listing, not a read. (zarr
    would read a missing file as fill values: black pixels, zero features, all-ignore labels.)"""
    if not store.done_mask().all():
        raise SSRError(f"{store.url} is not fully built; re-run `ssr cache build` to finish it")
    if store.local_path is None:
        return
    paths = ["pixels", "labels", "class_counts"] + [f"features/{n}" for n in feature_names or store.feature_names]
    if store.layout.feature_dtype == "int8":
        paths += [f"{p}_{part}" for p in paths if p.startswith("features/") for part in ("scale", "offset")]
    for path in paths:
        for shard in range(store.n_shards):
            key = store.shard_key(path, shard)
            if not (store.local_path / key).is_file():
                raise SSRError(f"{store.url} is damaged: shard {shard} of {path} is marked done but its file "
                               f"{key} is missing; run `ssr cache verify {store.url}`")


def stream(url: str, store: FeatureStore, cfg: TrainConfig, *, levels: list[str], seed: int, rank: int,
           world: int, start_iter: int, draw, photometric: bool, pin_memory: bool) -> DataLoader:
    """An endless, resumable loader of one store's views (`draw`: the method's source sampler or None)."""
    dataset = CachedViewDataset(url, levels=levels, flip=cfg.data.flip, photometric=photometric)
    sampler = ViewStreamSampler(len(dataset), batch_size=cfg.data.batch_size, seed=seed, rank=rank,
                                world_size=world, start_iter=start_iter, draw=draw)
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=cfg.data.workers,
                      collate_fn=collate_views, pin_memory=pin_memory,
                      # own generator: creating the iterator must not draw from the global RNG, or a
                      # resumed run would be one draw off the uninterrupted one
                      generator=torch.Generator().manual_seed(cfg.run.seed),
                      persistent_workers=cfg.data.workers > 0)


def next_batch(iterator) -> dict:
    """The next batch; an SSRError raised in a DataLoader worker arrives wrapped in a traceback's text:
    keep its one line."""
    try:
        return next(iterator)
    except SSRError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise SSRError(lines[-1].split("SSRError: ", 1)[-1] if lines else "data loading failed") from None
