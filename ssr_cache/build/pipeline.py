"""`ssr cache build`: plan views, run frozen SAM once over them, write a sharded Zarr feature store.

First the plan, in planning threads (this rank's share of the cores): every image header, and for a labelled
source every label (cat_max_ratio, RCS counts). Then the build's data flow (bounded queues, so the encoder
never waits on I/O):
  DataLoader workers: decode image (+label), resize, crop, flip, class counts  → one item per image
  main thread:        batch views → SAM encoder (+ pooled levels) → cast or quantise and check on the
                      encoder's device → copy the stored form to the host → writer queue; on a GPU nothing
                      waits for the device before the next batch is queued (encoded_batch.py)
  writer threads:     compress each view's chunks as its batch arrives; write a shard (then its done flags)
                      as soon as its last view is compressed, past the page cache where offered (O_DIRECT)
The output is checked (or created) before SAM loads. A rank of a torchrun job owns whole shards; finished
shards are skipped on a re-run (resume), and an interrupted store creation is finished by re-running.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ssr_cache import __version__
from ssr_cache.build.config import CacheBuildConfig, autocast_dtype, resolve_precision
from ssr_cache.build.encoded_batch import EncodedBatch
from ssr_cache.build.shard_writer import ShardStream, default_writer_threads, translate_os_error
from ssr_cache.build.view_plan import CROP_DEFINITION, ViewPlanConfig, ViewTable, plan_views, write_view_crops
from ssr_cache.data.datasets import SegmentationDataset, open_dataset
from ssr_cache.data.png_io import image_size
from ssr_cache.distributed import RankInfo, barrier, rank_device, rank_info
from ssr_cache.errors import SSRError
from ssr_cache.progress import progress_bar
from ssr_cache.runtime import resolve_device, runtime_line, set_cpu_threads
from ssr_cache.sam_encoder import build_sam_encoder, encoder_fingerprint, get_encoder_config
from ssr_cache.store.feature_levels import check_levels
from ssr_cache.store.feature_store import (
    FORMAT_VERSION,
    FeatureStore,
    StoreLayout,
    check_fingerprint,
    store_state,
)


@dataclass(frozen=True)
class BuildResult:
    url: str
    n_views: int
    reused_views: int
    built_views: int
    seconds: float  # the whole call
    random_init: bool
    encode_seconds: float = 0.0  # decoding, encoding and writing the built views: the call less its start-up
    # (checks, planning, store creation, SAM load and warm-up)

    @property
    def views_per_second(self) -> float:
        """The build's steady rate: built views / encode_seconds (0 when nothing was built)."""
        return self.built_views / self.encode_seconds if self.built_views and self.encode_seconds > 0 else 0.0


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


def plan_build(cfg: CacheBuildConfig, ds: SegmentationDataset, labelled: bool, *, progress: bool = True,
               threads: int = 1) -> BuildPlan:
    """The view table, and for a labelled source each image's full-resolution class counts (rare-class
    sampling's eligibility, as the reference computes it), from one read of every label. Headers and labels
    are read in `threads` threads (their decoding releases the GIL); the plan does not depend on it."""
    n_images = len(ds) if cfg.max_images is None else min(cfg.max_images, len(ds))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        sizes = list(pool.map(lambda i: image_size(ds.items[i].image), range(n_images)))
    config = plan_config(cfg, ds, labelled)
    if not labelled:
        return BuildPlan(plan_views(sizes, config, progress=progress, workers=threads), None, 0)
    space = ds.label_space
    counts = np.zeros((n_images, space.num_classes), np.int64)
    unlisted = np.zeros(n_images, np.int64)

    def count_label(i: int) -> np.ndarray:
        label, unlisted[i] = ds.read_label(i, image_wh=sizes[i])
        counts[i] = space.count(label)
        return label

    # plan_views reads every label through count_label, whether or not the cat_max_ratio rule is on.
    table = plan_views(sizes, config, label_loader=count_label, progress=progress, workers=threads)
    return BuildPlan(table, counts, int(unlisted.sum()))


def decoding_workers(workers: int | None, device: torch.device, ranks_on_node: int = 1) -> int:
    """`--workers`, or by default: 2 on a CPU (SAM itself needs the cores there); on a GPU half this rank's
    share of the node's cores, 2-8. One worker decodes about 100 GTA5-size views/s (docs/benchmarks.md); a
    big GPU encodes a few hundred in bf16. The writer threads (shard_writer.default_writer_threads) may
    take the whole share: compressing costs about twice the decoding per view."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 2
    return max(2, min(8, (os.cpu_count() or 2) // max(1, ranks_on_node) // 2))


def planning_threads(ranks_on_node: int = 1) -> int:
    """Threads that plan (read headers and labels): this rank's share of the node's cores, at most 8. A GTA5
    plan reads 25k labels at ~7 ms of CPU each: 3 minutes on one thread, before the GPU starts."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, ranks_on_node)))


def build_fingerprint(cfg: CacheBuildConfig, ds: SegmentationDataset, labelled: bool, plan: ViewTable,
                      encoder_fp: dict, levels: tuple[int, ...], precision: str) -> dict:
    """What must match for two builds to be the same cache (and for a trainer to accept it)."""
    pc = plan_config(cfg, ds, labelled)
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder_fp,
        "precision": precision,  # SAM's compute precision (--autocast)
        "crop": list(cfg.crop),
        "crop_definition": CROP_DEFINITION,
        "levels": list(levels),
        "feature_dtype": cfg.feature_dtype,
        "views_per_shard": cfg.views_per_shard,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "domain": 0 if labelled else 1,  # kept for older readers; `labelled` is the fact to read
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
    """One item per image: all of its views that this rank still has to build, cropped.

    A file that cannot be read gives an item {"error": one line naming it} instead of an exception, so
    the main thread can stop cleanly (finished shards written, store resumable) with that one line.
    """

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
        sample = int(self.plan.sample_index[views[0]])
        try:
            image, label = self.ds.load(sample)
        except SSRError as exc:  # already one line naming the file
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - any reader failure is about this sample's files
            return {"error": f"{self.ds.items[sample].image}: cannot be read ({type(exc).__name__}: {exc})"}
        if not self.labelled:
            label = None
        try:
            return self._crops(views, image, label)
        except SSRError as exc:  # shared memory ran out
            return {"error": str(exc)}

    def _crops(self, views: np.ndarray, image: np.ndarray, label: np.ndarray | None) -> dict:
        # Every array goes straight into the memory the DataLoader hands to the main process: one block of
        # shared memory per item, allocated in a worker (here, where running out of it is one line), so it
        # crosses without a copy, and as one file descriptor rather than one per array (each costs a socket
        # round trip and a mapping on both sides).
        rows = [self.plan.row(int(v)) for v in views]
        h, w = rows[0].box[2] - rows[0].box[0], rows[0].box[3] - rows[0].box[1]
        n = len(views)
        out = item_tensors({"views": ((n,), torch.int64), "pixels": ((n, h, w, 3), torch.uint8),
                            "labels": ((n, h, w), torch.uint8), "counts": ((n, self.space.num_classes), torch.int32)},
                           shared=get_worker_info() is not None)
        views_np, pixels_np, labels_np, counts_np = (out[k].numpy() for k in ("views", "pixels", "labels", "counts"))
        views_np[:] = views
        write_view_crops(image, label, rows, pixels_np, labels_np)
        if label is None:  # unlabelled: every pixel ignored, so no class is counted
            labels_np[:] = self.space.ignore_index
            counts_np[:] = 0
        else:
            for i in range(n):
                counts_np[i] = self.space.count(labels_np[i])
        return out


def item_tensors(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], shared: bool) -> dict[str, torch.Tensor]:
    """{name: empty tensor of (shape, dtype)}, all in one block of memory (shared memory when `shared`),
    each starting on a 64-byte boundary."""
    offsets, size = {}, 0
    for name, (shape, dtype) in specs.items():
        offsets[name] = size
        size += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    if not shared:
        storage = torch.UntypedStorage(size)
    else:
        try:
            # Allocated in shared memory directly, as torch's default_collate does in a worker:
            # share_memory_() would first fault in private pages, then copy them there.
            storage = torch.UntypedStorage._new_shared(size)
        except (RuntimeError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SSRError(f"the decoding workers ran out of shared memory ({reason}): give /dev/shm more room "
                           "(in Docker: --shm-size=2g) or build with --workers 0") from None
    return {name: torch.empty((0,), dtype=dtype).set_(storage, offsets[name] // dtype.itemsize, shape)
            for name, (shape, dtype) in specs.items()}


def iter_batches(loader, batch_size: int) -> Iterator[list[dict]]:
    """Regroup per-image items into encoder batches of about batch_size views; a worker's error item
    becomes its one-line SSRError here."""
    pending: list[dict] = []
    n = 0
    for item in start_workers(loader):
        if "error" in item:
            raise SSRError(item["error"])
        pending.append(item)
        n += len(item["views"])
        if n >= batch_size:
            yield pending
            pending, n = [], 0
    if pending:
        yield pending


def start_workers(loader):
    """iter(loader), with a /dev/shm too full for the workers' queues (their semaphores live there) as one
    line. torch's half-built iterator then fails once more in its __del__; that echo is not printed."""
    failure, hook = None, sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        try:
            return iter(loader)
        except OSError as exc:
            failure = f"cannot start the decoding workers ({exc.strerror or exc})"
    finally:
        sys.unraisablehook = hook  # the except clause has released the half-built iterator by now
    raise SSRError(f"{failure}: they need room in /dev/shm (in Docker: --shm-size=2g), or build with --workers 0")


# ---------------------------------------------------------------- the build


def build_cache(cfg: CacheBuildConfig, *, progress: bool = True, console: Console | None = None,
                encoder=None) -> BuildResult:
    """Build (or resume) the cache `cfg` describes. `encoder`: an already built encoder (benchmarks time
    the pipeline around a stand-in); None loads the one `cfg` names, after the output has been checked.
    The CLI never passes one."""
    console = console or Console()
    rank = rank_info()
    device = rank_device(resolve_device(cfg.device), rank)
    precision = resolve_precision(cfg.autocast, device)
    # How it runs, not what it builds (neither is fingerprinted): resolved once, for this rank's node share.
    cfg = replace(cfg, workers=decoding_workers(cfg.workers, device, rank.local_world_size),
                  writer_threads=cfg.writer_threads or default_writer_threads(rank.local_world_size))
    threads = set_cpu_threads(None)
    if rank.rank == 0:
        console.print(runtime_line(device, precision=precision, threads=threads, workers=cfg.workers))
    t0 = time.perf_counter()
    ds, labelled = open_build_dataset(cfg)
    build_plan = plan_build(cfg, ds, labelled, progress=progress and rank.rank == 0,
                            threads=planning_threads(rank.local_world_size))
    plan = build_plan.views
    if build_plan.unlisted_pixels and rank.rank == 0:
        console.print(f"[yellow]note:[/] {build_plan.unlisted_pixels} label pixels hold values the label table "
                      "does not list; they are ignored")

    if encoder is None:
        enc_fp = encoder_fingerprint(cfg.sam, cfg.sam_checkpoint, seed=cfg.sam_seed)
        channels, grid = get_encoder_config(cfg.sam).out_chans, get_encoder_config(cfg.sam).grid
    else:
        enc_fp, channels, grid = encoder.fingerprint(), encoder.config.out_chans, encoder.grid
    levels = check_levels(cfg.levels, grid)
    fingerprint = build_fingerprint(cfg, ds, labelled, plan, enc_fp, levels, precision)
    layout = StoreLayout(n_views=len(plan), crop_hw=tuple(cfg.crop), channels=channels, levels=levels,
                         feature_dtype=cfg.feature_dtype, views_per_shard=cfg.views_per_shard,
                         num_classes=ds.label_space.num_classes)
    # The output is checked before SAM loads (a refused output costs nothing), and created after it
    # loaded (a bad checkpoint leaves nothing behind).
    resuming = check_output(cfg, fingerprint) if rank.rank == 0 else True
    if not resuming and encoder is None:
        encoder = load_encoder(cfg, device, enc_fp, console, rank)
    store = open_or_create_store(cfg, layout, build_plan, ds, fingerprint, rank, create=not resuming)

    done_before = int(store.done_mask().sum())
    mine = store.pending_shards()[rank.rank::rank.world_size]
    if rank.rank == 0 and done_before:
        console.print(f"resuming: reused {done_before} finished views, {len(plan) - done_before} to build")
    built, encode_seconds = 0, 0.0
    if mine:
        if encoder is None:
            encoder = load_encoder(cfg, device, enc_fp, console, rank)
        warm_up(encoder, cfg, levels, precision, device)
        t_encode = time.perf_counter()
        built = encode_and_write(cfg, store, ds, plan, mine, labelled, encoder, levels, device, precision,
                                 progress=progress and rank.rank == 0, console=console)
        encode_seconds = time.perf_counter() - t_encode
    barrier(rank)
    return BuildResult(url=cfg.out, n_views=len(plan), reused_views=done_before, built_views=built,
                       seconds=time.perf_counter() - t0, random_init=bool(enc_fp["random_init"]),
                       encode_seconds=encode_seconds)


def check_output(cfg: CacheBuildConfig, fingerprint: dict) -> bool:
    """Whether the build resumes the cache at cfg.out (True) or creates one (False); raises, writing
    nothing, when the output is refused: a folder that is no ssr cache, an older cache format, or a cache
    of other settings without --overwrite. An interrupted creation (whatever its settings: it holds
    nothing yet) is created again."""
    state = store_state(cfg.out)
    if state == "foreign":
        raise SSRError(f"{cfg.out} exists and is not an ssr cache; refusing to write there")
    if state != "ready" or cfg.overwrite:
        return False
    existing = FeatureStore.open(cfg.out, mode="r")
    # The package version is recorded, not compared: an upgrade may resume an existing build.
    keys = [k for k in fingerprint if k != "package_version"]
    check_fingerprint(existing, fingerprint, keys, hint="pass --overwrite to rebuild it from scratch")
    return True


def open_or_create_store(cfg: CacheBuildConfig, layout: StoreLayout, build_plan: BuildPlan,
                         ds: SegmentationDataset, fingerprint: dict, rank: RankInfo, *, create: bool
                         ) -> FeatureStore:
    """Rank 0 creates the store when `create`; every rank then opens it for writing."""
    plan = build_plan.views
    sample_ids = [ds.sample_ids[i] for i in range(int(plan.sample_index.max()) + 1)]
    if rank.rank == 0 and create:
        try:
            FeatureStore.create(cfg.out, layout, plan.to_arrays(), sample_ids, fingerprint,
                                overwrite=cfg.overwrite, extra_attrs={"build_config": cfg.stored_dict()},
                                image_class_counts=build_plan.image_class_counts)
        except OSError as exc:
            raise translate_os_error(exc, cfg.out) from exc
    barrier(rank)
    return FeatureStore.open(cfg.out, mode="r+", direct_io=cfg.direct_io)


def load_encoder(cfg: CacheBuildConfig, device: torch.device, enc_fp: dict, console: Console, rank: RankInfo):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = build_sam_encoder(cfg.sam, cfg.sam_checkpoint, seed=cfg.sam_seed, device=device,
                                    checkpoint_sha256=enc_fp["checkpoint_sha256"])
    if rank.rank == 0:
        if encoder.random_init:
            console.print(f"[bold yellow]WARNING: {cfg.sam} has no checkpoint: RANDOM weights (seed "
                          f"{cfg.sam_seed}). These are NOT SAM features; the cache records random_init: true.[/]")
        else:
            for w in caught:
                console.print(f"[yellow]warning:[/] {w.message}")
    return encoder


def warm_up(encoder, cfg: CacheBuildConfig, levels: tuple[int, ...], precision: str, device: torch.device) -> None:
    """On a GPU, one batch through the encoder before the first real one: CUDA/cuBLAS start-up and kernel
    selection, and the build's one intended wait for the device (the zeros are copied up blocking)."""
    if device.type == "cuda":
        encoder.encode(torch.zeros((cfg.batch_size, *cfg.crop, 3), dtype=torch.uint8), levels=levels,
                       autocast_dtype=autocast_dtype(precision))
        torch.cuda.synchronize(device)


def encode_and_write(cfg: CacheBuildConfig, store: FeatureStore, ds: SegmentationDataset, plan: ViewTable,
                     shards: list[int], labelled: bool, encoder, levels: tuple[int, ...], device: torch.device,
                     precision: str, *, progress: bool, console: Console) -> int:
    """Encode every view of `shards` and write them; returns the number of views built."""
    view_idx = np.concatenate([np.arange(*store.shard_range(s)) for s in shards])
    loader = DataLoader(ViewCropDataset(ds, plan, view_idx, labelled), batch_size=None, shuffle=False,
                        num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
                        persistent_workers=False)  # one decoding worker = one core (ssr_cache/data/opencv.py)
    stream = ShardStream(store, shards, threads=cfg.writer_threads)
    amp = autocast_dtype(precision)
    bar = progress_bar("building cache", unit="views", disable=not progress, console=console)
    task = bar.add_task("", total=len(view_idx), info="")
    built = 0
    pending: EncodedBatch | None = None  # encoded (on a GPU: still running) but not yet handed to the writers

    def hand_over() -> None:
        nonlocal pending, built
        batch, pending = pending, None
        stream.submit(batch.views, batch.stored_arrays(store))
        built += len(batch.views)
        projected = stream.bytes_written / max(stream.shards_written, 1) * store.n_shards
        bar.update(task, advance=len(batch.views), info=f"{_mb(stream.bytes_written)} written, "
                                                        f"~{_mb(projected)} projected")

    try:
        with bar, frozen_gc():
            for group in iter_batches(loader, cfg.batch_size):
                launched = EncodedBatch.launch(encoder, group, levels, amp, cfg.feature_dtype)
                if pending is not None:
                    hand_over()  # batch k, while the GPU computes batch k + 1
                pending = launched
            if pending is not None:
                hand_over()
    except Exception:  # (an interrupt goes straight to the writers' close)
        if pending is not None:  # encoded before a later batch failed (an unreadable file): still kept
            try:
                hand_over()
            except SSRError as earlier:  # its own features were refused: that came first, so say that
                raise earlier from None
            except Exception:  # noqa: BLE001 - an echo of the error being raised
                pass
        raise
    finally:
        stream.close()  # shards completed before an error are still written: a re-run resumes after them
    return built


@contextlib.contextmanager
def frozen_gc():
    """Everything alive before the loop (torch, zarr, the plan: ~350k objects) moved out of the garbage
    collector's sight while it runs: full collections then scan only the loop's own objects, and forked
    decoding workers do not write (copy-on-write) into the parent's pages when they collect."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
