"""`ssr cache build`: plan views, run frozen SAM once over them, write a sharded Zarr feature store.

Data flow (bounded queues, so the encoder never waits on I/O):
  DataLoader workers: decode image (+label), resize, crop, flip, class counts  → one item per image
  main thread:        batch views → SAM encoder (+ pooled levels) → per-shard buffers
  writer thread:      compress + write whole shards, then their done flags
A rank of a torchrun job owns whole shards; finished shards are skipped on a re-run (resume).
"""

from __future__ import annotations

import dataclasses
import errno
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.view_plan import ViewPlanConfig, ViewTable, apply_view
from ssr_cache.data.datasets import SegmentationDataset, open_dataset
from ssr_cache.distributed import RankInfo, barrier, rank_device, rank_info
from ssr_cache.errors import SSRError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuildResult:
    url: str
    n_views: int
    reused_views: int
    built_views: int
    seconds: float
    random_init: bool


# ---------------------------------------------------------------- planning


def open_build_dataset(cfg: CacheBuildConfig) -> tuple[SegmentationDataset, bool]:
    """(dataset, labelled). Only a labelled source uses labels (cat_max_ratio, stored label crops, RCS
    counts); a target stays unlabelled even when its files have labels."""
    ds = open_dataset(cfg.dataset, cfg.data_root, split=cfg.split, require_labels=False, conditions=cfg.conditions)
    labelled = ds.labelled_by_default() if cfg.labelled is None else cfg.labelled
    if labelled:
        ds.check_labels()
    return ds, labelled


def plan_config(cfg: CacheBuildConfig, ds: SegmentationDataset, labelled: bool) -> ViewPlanConfig:
    return ViewPlanConfig(
        resize=cfg.resize or ds.resize_to,
        crop=cfg.crop,
        ratio_range=cfg.ratio_range,
        cat_max_ratio=cfg.cat_max_ratio if labelled else None,
        views_per_image=cfg.views_per_image,
        seed=cfg.seed,
    )


@dataclass(frozen=True, eq=False)
class BuildPlan:
    views: ViewTable
    image_class_counts: np.ndarray | None  # (n_images, num_classes) int64 at full resolution; None: unlabelled
    unlisted_pixels: int  # label pixels whose value the label table does not list (ignored)


def plan_build(cfg: CacheBuildConfig, ds: SegmentationDataset, labelled: bool, *, progress: bool = True
               ) -> BuildPlan:
    """The view table, and for a labelled source each image's full-resolution class counts (rare-class
    sampling's eligibility, as the reference computes it), from one read of every label."""
    from ssr_cache.build.view_plan import plan_views
    from ssr_cache.data.png_io import image_size

    n_images = len(ds) if cfg.max_images is None else min(cfg.max_images, len(ds))
    sizes = [image_size(ds.items[i].image) for i in range(n_images)]
    if not labelled:
        return BuildPlan(plan_views(sizes, plan_config(cfg, ds, labelled), progress=progress), None, 0)
    space = ds.label_space
    counts = np.zeros((n_images, space.num_classes), np.int64)
    unlisted = np.zeros(n_images, np.int64)

    def count_label(i: int) -> np.ndarray:
        label, unlisted[i] = ds.read_label(i, image_wh=sizes[i])
        counts[i] = space.count(label)
        return label

    if cfg.cat_max_ratio is None:
        for i in range(n_images):
            count_label(i)
        loader = None
    else:
        loader = count_label
    table = plan_views(sizes, plan_config(cfg, ds, labelled), label_loader=loader, progress=progress)
    return BuildPlan(table, counts, int(unlisted.sum()))


def default_levels(grid: int) -> tuple[int, ...]:
    return tuple(g for g in (grid, grid // 2, grid // 4) if g >= 1)


def resolve_levels(cfg: CacheBuildConfig, grid: int) -> tuple[int, ...]:
    levels = cfg.levels or default_levels(grid)
    for g in levels:
        if g <= 0 or grid % g:
            raise SSRError(f"--levels {g} must divide the encoder's {grid}x{grid} neck grid")
    return tuple(sorted(set(levels), reverse=True))


def build_fingerprint(cfg: CacheBuildConfig, ds: SegmentationDataset, labelled: bool, plan: ViewTable,
                      encoder_fp: dict, levels: tuple[int, ...]) -> dict:
    """What must match for two builds to be the same cache (and for a trainer to accept it)."""
    from ssr_cache import __version__

    pc = plan_config(cfg, ds, labelled)
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder_fp,
        "crop": list(cfg.crop),
        "levels": list(levels),
        "interm": bool(cfg.interm),
        "feature_dtype": cfg.feature_dtype,
        "views_per_shard": cfg.views_per_shard,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "domain": 0 if labelled else 1,  # the view column's value; `labelled` is the fact to read
        "labelled": labelled,
        "label_space": ds.label_space.to_dict(),
        "file_list_sha256": ds.file_list_hash(),
        "n_images": int(len(np.unique(plan.sample_index))),
        "plan": {
            "seed": cfg.seed,
            "views_per_image": cfg.views_per_image,
            "resize": list(pc.resize),
            "ratio_range": list(pc.ratio_range),
            "cat_max_ratio": pc.cat_max_ratio,
            "digest": plan.digest(),
        },
        "package_version": __version__,
    }


# ---------------------------------------------------------------- decoding workers


class ViewCropDataset(Dataset):
    """One item per image: all of its views that this rank still has to build, cropped."""

    def __init__(self, ds: SegmentationDataset, plan: ViewTable, view_indices: np.ndarray, labelled: bool):
        self.ds = ds
        self.space = ds.label_space
        self.plan = plan
        self.labelled = labelled
        order = np.sort(view_indices)
        samples = plan.sample_index[order]
        starts = np.flatnonzero(np.r_[True, samples[1:] != samples[:-1]]) if len(order) else np.array([], int)
        self.groups = np.split(order, starts[1:]) if len(order) else []

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> dict:
        views = self.groups[k]
        image, label = self.ds.load(int(self.plan.sample_index[views[0]]))
        if not self.labelled:
            label = None
        crops, labels, counts = [], [], []
        for v in views:
            crop, label_crop = apply_view(image, label, self.plan.row(int(v)))
            if label_crop is None:
                label_crop = np.full(crop.shape[:2], self.space.ignore_index, np.uint8)
            crops.append(crop)
            labels.append(label_crop)
            counts.append(self.space.count(label_crop))
        return {"views": views, "pixels": np.stack(crops), "labels": np.stack(labels),
                "counts": np.stack(counts).astype(np.int32)}


# ---------------------------------------------------------------- shard buffers + writer


class ShardBuffer:
    def __init__(self, start: int, stop: int, crop_hw: tuple[int, int], num_classes: int):
        n = stop - start
        self.start, self.stop = start, stop
        self.pixels = np.zeros((n, *crop_hw, 3), np.uint8)
        self.labels = np.zeros((n, *crop_hw), np.uint8)
        self.counts = np.zeros((n, num_classes), np.int32)
        self.features: dict[str, np.ndarray] = {}
        self.filled = np.zeros(n, bool)

    def put_inputs(self, views: np.ndarray, pixels, labels, counts) -> None:
        idx = views - self.start
        self.pixels[idx], self.labels[idx], self.counts[idx] = pixels, labels, counts

    def put_features(self, views: np.ndarray, feats: dict[str, np.ndarray]) -> None:
        idx = views - self.start
        for name, arr in feats.items():
            if name not in self.features:
                self.features[name] = np.zeros((self.stop - self.start, *arr.shape[1:]), np.float32)
            self.features[name][idx] = arr
        self.filled[idx] = True

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())


class ShardWriter:
    """Compresses and writes finished shards in a background thread; errors re-raise in the caller."""

    def __init__(self, store, maxsize: int = 2):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._run, name="ssr-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            shard, buf = item
            if self.error is not None:
                continue
            try:
                self.store.write_shard(shard, pixels=buf.pixels, labels=buf.labels,
                                       class_counts=buf.counts, features=buf.features)
                self.bytes_written += shard_disk_bytes(self.store, shard)
            except BaseException as exc:  # surfaced by submit()/close()
                self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            raise translate_os_error(self.error, self.store.url) from self.error

    def submit(self, shard: int, buf: ShardBuffer) -> None:
        self._check()
        self.queue.put((shard, buf))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()


def shard_disk_bytes(store, shard: int) -> int:
    """Bytes on disk of one shard across all arrays (local stores; 0 for remote URLs)."""
    root = getattr(store, "local_path", None)
    if root is None:
        return 0
    total = 0
    for pattern in (f"*/c/{shard}", f"features/*/c/{shard}", f"views/*/c/{shard}"):
        for path in Path(root).glob(pattern):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            total += sum(f.stat().st_size for f in files)
    return total


def translate_os_error(exc: BaseException, url: str) -> BaseException:
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return SSRError(f"out of disk space while writing {url}; finished shards are kept, re-run to resume")
        return SSRError(f"cannot write to {url}: {exc.strerror or exc}")
    return exc


# ---------------------------------------------------------------- the build


def _autocast_dtype(cfg: CacheBuildConfig) -> torch.dtype | None:
    if not cfg.device.startswith("cuda"):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, None: torch.bfloat16, "fp32": None}[cfg.autocast]


def iter_batches(loader: DataLoader, batch_size: int) -> Iterator[list[dict]]:
    """Regroup per-image items into encoder batches of about batch_size views."""
    pending: list[dict] = []
    n = 0
    for item in loader:
        pending.append(item)
        n += len(item["views"])
        if n >= batch_size:
            yield pending
            pending, n = [], 0
    if pending:
        yield pending


def open_or_create_store(cfg: CacheBuildConfig, layout_kwargs: dict, build_plan: BuildPlan,
                         ds: SegmentationDataset, fingerprint: dict, rank: RankInfo):
    from ssr_cache.store.feature_store import FeatureStore, StoreLayout, check_fingerprint, store_exists

    layout = StoreLayout(**layout_kwargs)
    plan = build_plan.views
    n_views = len(plan)
    sample_ids = [ds.sample_ids[i] for i in range(int(plan.sample_index.max()) + 1)]
    if rank.rank == 0:
        if store_exists(cfg.out) and not cfg.overwrite:
            existing = FeatureStore.open(cfg.out, mode="r")
            # The package version is recorded, not compared: an upgrade may resume an existing build.
            keys = [k for k in fingerprint if k != "package_version"]
            check_fingerprint(existing, fingerprint, keys, hint="pass --overwrite to rebuild it from scratch")
        else:
            view_arrays = dict(plan.to_arrays(), domain=np.full(n_views, fingerprint["domain"], np.uint8))
            try:
                FeatureStore.create(cfg.out, layout, view_arrays, sample_ids, fingerprint,
                                    overwrite=cfg.overwrite, extra_attrs={"build_config": cfg.stored_dict()},
                                    image_class_counts=build_plan.image_class_counts)
            except OSError as exc:
                raise translate_os_error(exc, cfg.out) from exc
    barrier(rank)
    return FeatureStore.open(cfg.out, mode="r+")


def build_cache(cfg: CacheBuildConfig, *, progress: bool = True, console=None, encoder=None) -> BuildResult:
    """`encoder`: an already built encoder (benchmarks time the pipeline around a stand-in); None builds
    the one `cfg` names. The CLI never passes one."""
    from rich.console import Console

    from ssr_cache.sam_encoder import build_sam_encoder

    console = console or Console()
    rank = rank_info()
    cfg = dataclasses.replace(cfg, device=rank_device(cfg.device, rank))
    t0 = time.perf_counter()
    ds, labelled = open_build_dataset(cfg)
    build_plan = plan_build(cfg, ds, labelled, progress=progress and rank.rank == 0)
    plan = build_plan.views
    if build_plan.unlisted_pixels and rank.rank == 0:
        console.print(f"[yellow]note:[/] {build_plan.unlisted_pixels} label pixels hold values the label table "
                      "does not list; they are ignored")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if encoder is None:
            encoder = build_sam_encoder(cfg.sam, cfg.sam_checkpoint, seed=cfg.sam_seed, device=cfg.device)
    if encoder.random_init and rank.rank == 0:
        console.print(f"[bold yellow]WARNING: {cfg.sam} has no checkpoint: RANDOM weights (seed "
                      f"{cfg.sam_seed}). These are NOT SAM features; the cache records random_init: true.[/]")
    for w in caught:
        if not encoder.random_init:
            console.print(f"[yellow]warning:[/] {w.message}")
    levels = resolve_levels(cfg, encoder.grid)
    interm = tuple((k, encoder.config.embed_dim) for k in encoder.config.global_attn_indexes) if cfg.interm else ()
    fingerprint = build_fingerprint(cfg, ds, labelled, plan, encoder.fingerprint(), levels)
    layout_kwargs = dict(n_views=len(plan), crop_hw=tuple(cfg.crop), channels=encoder.config.out_chans,
                         levels=levels, interm=interm, feature_dtype=cfg.feature_dtype,
                         views_per_shard=cfg.views_per_shard, num_classes=ds.label_space.num_classes)
    store = open_or_create_store(cfg, layout_kwargs, build_plan, ds, fingerprint, rank)

    pending = store.pending_shards()
    done_before = int(store.done_mask().sum())
    mine = pending[rank.rank::rank.world_size]
    if rank.rank == 0 and done_before:
        console.print(f"resuming: reused {done_before} finished views, {len(plan) - done_before} to build")
    view_idx = np.concatenate([np.arange(*store.shard_range(s)) for s in mine]) if mine else np.zeros(0, int)

    crops = ViewCropDataset(ds, plan, view_idx, labelled)
    loader = DataLoader(crops, batch_size=None, shuffle=False, num_workers=cfg.workers,
                        prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
    buffers = {s: None for s in mine}
    shard_of = {}
    for s in mine:
        a, b = store.shard_range(s)
        shard_of.update({v: s for v in range(a, b)})
    writer = ShardWriter(store)
    autocast = _autocast_dtype(cfg)

    bar = _progress(progress and rank.rank == 0, console)
    task = bar.add_task("views", total=len(view_idx), info="") if bar else None
    built = 0
    try:
        if bar:
            bar.start()
        for group in iter_batches(loader, cfg.batch_size):
            views = np.concatenate([g["views"] for g in group])
            pixels = np.concatenate([g["pixels"] for g in group])
            for g in group:
                _route_inputs(g, buffers, shard_of, store, cfg)
            feats = encoder.encode(torch.from_numpy(pixels), levels=levels, interm=cfg.interm,
                                   autocast_dtype=autocast)
            feats_np = {k: v.float().cpu().numpy() for k, v in feats.items()}
            for s in sorted({shard_of[int(v)] for v in views}):
                sel = np.array([shard_of[int(v)] == s for v in views])
                buffers[s].put_features(views[sel], {k: a[sel] for k, a in feats_np.items()})
                if buffers[s].complete:
                    writer.submit(s, buffers[s])
                    buffers[s] = None
            built += len(views)
            if bar:
                done = built + done_before
                size = writer.bytes_written / max(built, 1) * len(plan)
                bar.update(task, advance=len(views),
                           info=f"{_mb(writer.bytes_written)} written, ~{_mb(size)} projected ({done}/{len(plan)})")
    finally:
        if bar:
            bar.stop()
        writer.close()
    barrier(rank)
    return BuildResult(url=cfg.out, n_views=len(plan), reused_views=done_before, built_views=built,
                       seconds=time.perf_counter() - t0, random_init=encoder.random_init)


def _route_inputs(item: dict, buffers: dict, shard_of: dict, store, cfg: CacheBuildConfig) -> None:
    views = item["views"]
    for s in sorted({shard_of[int(v)] for v in views}):
        if buffers[s] is None:
            buffers[s] = ShardBuffer(*store.shard_range(s), tuple(cfg.crop), store.layout.num_classes)
        sel = np.array([shard_of[int(v)] == s for v in views])
        buffers[s].put_inputs(views[sel], item["pixels"][sel], item["labels"][sel], item["counts"][sel])


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _progress(enabled: bool, console):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    class RateColumn(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return super().render(task) if speed is None else f"{speed:.2f} views/s"

    return Progress(TextColumn("[bold]building cache"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    RateColumn(""), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False)
