"""`cache_build.py --pipeline`: what the build costs around the SAM encoder, against the floor of that work.

The real `build_cache` runs at GTA5 size (1914x1052 photograph-weight PNGs, 1280x720 resize, 512 crops, K
views per image) with a stand-in encoder that returns fixed SAM-shaped features at no cost, so every CPU
second measured is the pipeline's own: decoding, cropping, batching, casting, compressing, writing.

  pipeline_core_ms_per_view  CPU time of every process and thread of the build (workers included) / views
  pipeline_kernel_ms_per_view  the system (kernel) part of it: writes, shared memory, page faults
                             (and a comment line splits it by role: main thread, other threads (planning,
                             then the shard writers), decoding workers: what lies above the floor, by part)
  pipeline_core_ms_per_view_buffered  the same build with --buffered-io (shard files through the page cache)
  floor_core_ms_per_view     decoding one frame / K + compressing each of its K views' stored bytes with the
                             store's own codecs, measured in the same run: work no pipeline can avoid
  pipeline_over_floor(_int8) the ratio (goal <= 1.5)
  pipeline_views_per_s_wN    wall-clock views/s with N decoding workers
  planning_ms_per_image_t1   wall time to plan one labelled image (header, label, counts, crop rule) on one
                             thread; planning_speedup_t2 = 1 thread / 2 threads
  label_read_ms              CPU ms of one read of a GTA5-size palette label as the build reads it (libdeflate
                             for unfiltered files); label_read_speedup = Pillow's full decode / that
  writer_views_per_s_tN      shards written per second (as views) by N writer threads; writer_scaling = t2 / t1
                             (medians of --writer-rounds rounds, thread counts alternating)

CPU times are per-process rusage (workers counted once they exit). Builds and floor measurements alternate
for --rounds rounds and each figure is the median of its rounds, since this VM's speed drifts within
minutes; the views/s figures move with the machine's load, which is printed with every run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import torch
from bench_data import CROP, GTA5_SIZE, RESIZE, smooth_feature_set, write_gta5_like
from bench_output import line
from rich.console import Console

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import ViewCropDataset, build_cache, open_build_dataset, plan_build
from ssr_cache.data.png_io import read_label_ids, read_label_ids_with_pillow, read_rgb
from ssr_cache.data.png_unfiltered import decode_unfiltered_label
from ssr_cache.sam_encoder import get_encoder_config
from ssr_cache.store.feature_codec import feature_compressors, lossless_compressors, quantize_int8
from ssr_cache.store.feature_store import FeatureStore, StoreLayout
from ssr_cache.store.shard_codec import numcodecs_blosc

GOALS = {"pipeline_over_floor": ("<=", 1.5), "pipeline_over_floor_int8": ("<=", 1.5), "writer_scaling": (">=", 1.7)}


class StandInEncoder:
    """A benchmark instrument, never reachable from the CLI: the encoder's interface with SAM-shaped
    fixed features (smooth fields, so they compress like real ones) returned at no cost."""

    random_init = True

    def __init__(self, name: str = "vit_b"):
        self.config = get_encoder_config(name)
        self.grid = self.config.grid
        self.levels = tuple(g for g in (self.grid, self.grid // 2, self.grid // 4) if g >= 1)
        feats = smooth_feature_set(1, self.levels, self.config.out_chans)
        self.features = {name: torch.from_numpy(f) for name, f in feats.items()}
        self._batches: dict[int, dict[str, torch.Tensor]] = {}
        self.device = torch.device("cpu")

    def fingerprint(self) -> dict:
        return {"name": f"stand-in-{self.config.name}", "grid": self.grid, "random_init": True}

    def encode(self, crops, *, levels=None, autocast_dtype=None, **_) -> dict[str, torch.Tensor]:
        n = len(crops)
        levels = self.levels if levels is None else levels
        if n not in self._batches:  # made once per batch size: contiguous, like a real encoder's output
            self._batches[n] = {k: f.expand(n, -1, -1, -1).contiguous() for k, f in self.features.items()}
        return {f"l{g}": self._batches[n][f"l{g}"] for g in levels}


def rusage_seconds(who: int) -> np.ndarray:
    """[user, system] CPU seconds of RUSAGE_SELF (this process, all threads) or RUSAGE_CHILDREN (its exited,
    waited-for children: the decoding workers)."""
    usage = resource.getrusage(who)
    return np.array([usage.ru_utime, usage.ru_stime])


def load_note() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def page_touch_note(mib: int = 256) -> str:
    """First-touch cost of memory freed just now vs freed 2 s ago. On this VM the hypervisor takes back
    freed pages after about a second (virtio-balloon free page reporting), so the next touch of such a page
    costs ~25x more: a kernel cost that falls on fresh buffers and page cache pages, not on the floor."""
    costs = []
    for pause in (0.0, 2.0):
        np.ones(mib << 20, np.uint8)  # touched, then freed
        time.sleep(pause)
        t = time.perf_counter()
        np.ones(mib << 20, np.uint8)
        costs.append(1e6 * (time.perf_counter() - t) / (mib << 8))
    return f"touching freed memory: {costs[0]:.2f} us/page at once, {costs[1]:.2f} us/page after 2 s"


@dataclass(frozen=True)
class BuildTiming:
    """One build_cache call: CPU seconds in all (and of it in the kernel), wall seconds, views built, and
    the CPU by role: the main thread (batching, casting or quantising), the process's other threads
    (planning threads, then the shard writers: compression and writes) and the decoding workers (child
    processes)."""

    cpu: float
    system: float
    wall: float
    views: int
    main: float
    workers: float

    @property
    def threads(self) -> float:
        return self.cpu - self.workers - self.main

    def ms_per_view(self, part: str) -> float:
        """CPU ms per view of `part`: "cpu", "system", "main", "threads" or "workers"."""
        return 1000 * getattr(self, part) / self.views

    def roles_ms(self) -> str:
        return (f"main {self.ms_per_view('main'):.1f}, other threads {self.ms_per_view('threads'):.1f}, "
                f"workers {self.ms_per_view('workers'):.1f} ms/view")


def timed_build(cfg: CacheBuildConfig, encoder) -> BuildTiming:
    # Into a fresh folder, as a first build runs: deleting the previous round's store (--overwrite: 0.3 ms
    # per view of unlinks, measured) is not part of building views.
    shutil.rmtree(cfg.out, ignore_errors=True)
    own, kids = rusage_seconds(resource.RUSAGE_SELF), rusage_seconds(resource.RUSAGE_CHILDREN)
    t, main = time.perf_counter(), time.thread_time()
    result = build_cache(cfg, progress=False, console=Console(quiet=True), encoder=encoder)
    wall, main = time.perf_counter() - t, time.thread_time() - main
    own, kids = rusage_seconds(resource.RUSAGE_SELF) - own, rusage_seconds(resource.RUSAGE_CHILDREN) - kids
    user, system = own + kids
    return BuildTiming(cpu=user + system, system=system, wall=wall, views=result.built_views, main=main,
                       workers=float(kids.sum()))


def median_thread_time(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return float(np.median(times))


def view_bytes(item: dict, features: dict[str, np.ndarray], dtype: str, k: int = 0
               ) -> list[tuple[np.ndarray, object]]:
    """View k's stored arrays as the store encodes them: (array, its blosc codec) per array (features: a
    copy of the stand-in's, so each view's bytes lie in memory of their own)."""
    def stored(arr: np.ndarray, codecs: tuple) -> tuple[np.ndarray, object]:
        return arr, numcodecs_blosc(codecs[0], arr.dtype.itemsize)  # as ShardEncoder compresses it

    out = [stored(np.asarray(item["pixels"][k]), lossless_compressors("uint8")),
           stored(np.asarray(item["labels"][k]), lossless_compressors("uint8")),
           stored(np.asarray(item["counts"][k]), lossless_compressors("int32"))]
    for f in features.values():
        if dtype == "float16":
            out.append(stored(f[0].astype(np.float16), feature_compressors("float16")))
        else:
            codes, scale, offset = quantize_int8(f[:1].copy())
            out += [stored(codes[0], feature_compressors("int8")), stored(scale[0], lossless_compressors("float32")),
                    stored(offset[0], lossless_compressors("float32"))]
    return out


def compress_all(arrays: list[tuple[np.ndarray, object]]) -> None:
    for arr, codec in arrays:
        data = codec.encode(np.ascontiguousarray(arr))
        google_crc32c.value(bytes(data))


def label_read_ms(path: Path, rounds: int = 15, reads: int = 10) -> tuple[float, float]:
    """CPU ms of one read of a label: (read_label_ids, as the build reads it; Pillow's full decode), medians
    of alternating rounds of `reads` reads each."""
    ms = {read_label_ids: [], read_label_ids_with_pillow: []}
    for _ in range(rounds):
        for read, samples in ms.items():
            t = time.thread_time()
            for _ in range(reads):
                read(path)
            samples.append(1000 * (time.thread_time() - t) / reads)
    return float(np.median(ms[read_label_ids])), float(np.median(ms[read_label_ids_with_pillow]))


def floor_ms(png: Path, item: dict, features: dict[str, np.ndarray], vpi: int) -> dict[str, float]:
    """Decode one frame / K + compress each of its K views' stored bytes once (fp16 and int8), single-threaded
    CPU ms per view (median of rounds). The K views lie in distinct memory, as the build's do."""
    numcodecs.blosc.use_threads = False  # the store compresses in worker threads, where blosc is serial
    decode = median_thread_time(lambda: read_rgb(png))
    out = {"decode_per_view": 1000 * decode / vpi}
    for dtype in ("float16", "int8"):
        arrays = [a for k in range(vpi) for a in view_bytes(item, features, dtype, k)]
        out[dtype] = 1000 * median_thread_time(lambda a=arrays: compress_all(a)) / vpi
    return out


def writer_rate(url: Path, src: FeatureStore, layout: StoreLayout, shards: list[dict], threads: int) -> float:
    """Views per second when `threads` threads write the prepared shards (each thread its own shards)."""
    FeatureStore.create(str(url), layout, src.view_arrays(), src.sample_ids, src.fingerprint, overwrite=True)
    store = FeatureStore.open(url, "r+", direct_io=True)  # as the build writes
    errors = []

    def work(mine: list[int]) -> None:
        try:
            for s in mine:
                store.write_shard(s, **shards[s])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    t = time.perf_counter()
    pool = [threading.Thread(target=work, args=(list(range(i, len(shards), threads)),)) for i in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    seconds = time.perf_counter() - t
    if errors:
        raise errors[0]
    return sum(np.subtract(*layout.shard_range(s)[::-1]) for s in range(len(shards))) / seconds


def run_pipeline(args: argparse.Namespace, work: Path) -> None:
    t_all = time.perf_counter()
    vpi = args.views_per_image
    n_images = args.images
    encoder = StandInEncoder("vit_b")
    root = work / "gta5"
    pngs = write_gta5_like(root, n_images, "cityscapes", distinct=2)
    mb = pngs[0].stat().st_size / 1e6
    print(f"# machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}, {load_note()}; {page_touch_note()}")
    print(f"# data: {n_images} GTA5-layout 1914x1052 frames ({mb:.1f} MB PNG each) x {vpi} views = "
          f"{n_images * vpi} views, resize {RESIZE[0]}x{RESIZE[1]}, crop {CROP}, stand-in vit_b encoder "
          f"(fixed features, levels {encoder.levels}), batch {args.batch_size}, {args.views_per_shard} views/shard")

    def config(name: str, dtype: str, workers: int, direct_io: bool = True) -> CacheBuildConfig:
        return CacheBuildConfig(dataset="gta5", data_root=root, out=str(work / name), sam="vit_b",
                                views_per_image=vpi, crop=(CROP, CROP), resize=RESIZE, batch_size=args.batch_size,
                                feature_dtype=dtype, views_per_shard=args.views_per_shard, workers=workers,
                                direct_io=direct_io, overwrite=True)

    cfg = config("fp16_w2", "float16", 2)
    ds, labelled = open_build_dataset(cfg)
    plan = plan_build(cfg, ds, labelled, progress=False).views
    item = ViewCropDataset(ds, plan, np.arange(vpi), labelled=labelled)[0]
    feats = {k: v.numpy() for k, v in encoder.encode(np.zeros((1,))).items()}

    # Builds and floor measurements alternate (a floor after every build), round after round, and each figure
    # is the median of its samples: this machine's speed drifts by +-25 % within minutes (other tenants), and
    # a ratio of two figures taken minutes apart would mostly measure that drift. The floor takes a second
    # where a build takes ten, so it is sampled after each build, not once a round.
    builds: dict[str, list[BuildTiming]] = {"float16": [], "int8": [], "buffered": []}

    def median_ms(kind: str, part: str = "cpu") -> float:
        return float(np.median([b.ms_per_view(part) for b in builds[kind]]))

    floors = {"float16": [], "int8": []}
    for r in range(args.rounds):
        round_floors = []
        for kind in ("float16", "int8", "buffered"):  # buffered: fp16 through the page cache (--buffered-io)
            dtype = "float16" if kind == "buffered" else kind
            b = timed_build(config(f"{kind}_w2", dtype, 2, kind != "buffered"), encoder)
            builds[kind].append(b)
            print(f"# round {r + 1} build {kind}, 2 workers: {b.views} views, CPU {b.cpu:.1f} s ({b.roles_ms()}), "
                  f"wall {b.wall:.1f} s, {load_note()}")
            round_floors.append(floor_ms(pngs[0], item, feats, vpi))
        for dtype in ("float16", "int8"):
            floors[dtype] += [f["decode_per_view"] + f[dtype] for f in round_floors]
        def each(key: str, samples=round_floors) -> str:
            return "/".join(f"{f[key]:.1f}" for f in samples)

        print(f"# round {r + 1} floor after each build: decode {each('decode_per_view')} ms/view, compress fp16 "
              f"{each('float16')}, int8 {each('int8')} ms/view; round ratios "
              f"{builds['float16'][-1].ms_per_view('cpu') / np.median(floors['float16'][-3:]):.2f} / "
              f"{builds['int8'][-1].ms_per_view('cpu') / np.median(floors['int8'][-3:]):.2f}")
    runs = {"fp16_w1": timed_build(config("fp16_w1", "float16", 1), encoder),
            "fp16_w2": timed_build(config("float16_w2", "float16", 2), encoder)}
    cpu16, cpu8 = median_ms("float16"), median_ms("int8")
    floor16, floor8 = float(np.median(floors["float16"])), float(np.median(floors["int8"]))
    line("pipeline_core_ms_per_view", cpu16, f"fp16, 2 workers, median of {args.rounds}; int8 {cpu8:.1f} ms")
    for dtype in ("float16", "int8"):
        print(f"# {dtype} CPU by role, medians: main thread {median_ms(dtype, 'main'):.1f}, other threads "
              f"{median_ms(dtype, 'threads'):.1f}, decoding workers {median_ms(dtype, 'workers'):.1f} ms/view")
    line("pipeline_kernel_ms_per_view", median_ms("float16", "system"),
         f"of pipeline_core: system CPU (writes, shared memory, page faults); int8 "
         f"{median_ms('int8', 'system'):.1f} ms")
    buffered, buffered_kernel = median_ms("buffered"), median_ms("buffered", "system")
    line("pipeline_core_ms_per_view_buffered", buffered,
         f"fp16 written through the page cache (--buffered-io), of it kernel {buffered_kernel:.1f} ms; "
         f"buffered / direct {buffered / cpu16:.2f}")
    line("floor_core_ms_per_view", floor16, f"fp16, median of {len(floors['float16'])} (one after each build); "
                                             f"int8 {floor8:.1f} ms")
    line("pipeline_over_floor", cpu16 / floor16)
    line("pipeline_over_floor_int8", cpu8 / floor8)
    for name in ("fp16_w1", "fp16_w2"):
        b = runs[name]
        line(f"pipeline_views_per_s_w{name[-1]}", b.views / b.wall, f"{b.views} views in {b.wall:.1f} s wall")

    # Planning (image headers, and every label for cat_max_ratio and RCS) on 1 and 2 threads, alternating:
    # the wall time before a build's first view reaches the encoder.
    plan_walls = {1: [], 2: []}
    for _ in range(args.rounds):
        for t in plan_walls:
            start = time.perf_counter()
            plan_build(cfg, ds, labelled, progress=False, threads=t)
            plan_walls[t].append(time.perf_counter() - start)
    plan_t1, plan_t2 = (float(np.median(plan_walls[t])) for t in (1, 2))
    line("planning_ms_per_image_t1", 1000 * plan_t1 / n_images, f"wall, {n_images} labelled GTA5-size images, "
                                                                 f"median of {args.rounds}")
    line("planning_speedup_t2", plan_t1 / plan_t2, "2 planning threads / 1 (the build uses this rank's share of "
                                                   "the cores, at most 8)")
    # Planning and then the decoding workers each read every source label once.
    label_path = ds.items[0].label
    fast, pillow = label_read_ms(label_path)
    unfiltered = decode_unfiltered_label(label_path.read_bytes()) is not None
    line("label_read_ms", fast, f"CPU, one {GTA5_SIZE[0]}x{GTA5_SIZE[1]} palette label, read_label_ids "
                                f"({'libdeflate path' if unfiltered else 'Pillow path: the file is filtered'})")
    line("label_read_speedup", pillow / fast, f"Pillow's full decode ({pillow:.2f} ms) / read_label_ids")

    # The writer alone: prepared shards (what the pipeline hands its writer) written by 1, 2 and N threads.
    src = FeatureStore.open(work / "float16_w2")
    vps = args.writer_views_per_shard
    layout = StoreLayout.from_dict({**src.layout.to_dict(), "views_per_shard": vps})
    n_shards = min(layout.n_shards, max(1, args.writer_views // vps))
    shards = []
    for s in range(n_shards):
        a, b = layout.shard_range(s)
        got = src.read_views(np.arange(a, b), with_pixels=True)
        shards.append({"pixels": got["pixels"], "labels": got["label"], "class_counts": got["class_counts"],
                       "features": {k: np.repeat(v.numpy(), b - a, axis=0) for k, v in encoder.features.items()}})
    threads = sorted({1, 2, max(2, os.cpu_count() or 2)})
    samples = {t: [] for t in threads}
    for _ in range(args.writer_rounds):  # alternating thread counts, medians: as for the builds above
        for t in threads:
            samples[t].append(writer_rate(work / f"writer_t{t}", src, layout, shards, t))
    rates = {t: float(np.median(v)) for t, v in samples.items()}
    for t, rate in rates.items():
        line(f"writer_views_per_s_t{t}", rate, f"{n_shards} shards of {vps} views, fp16, median of "
                                               f"{args.writer_rounds}, {load_note()}")
    scalings = ", ".join(f"{b / a:.2f}" for a, b in zip(samples[1], samples[2], strict=True))
    line("writer_scaling", rates[2] / rates[1], f"2 writer threads / 1 (per round: {scalings})")

    figures = {"pipeline_over_floor": cpu16 / floor16, "pipeline_over_floor_int8": cpu8 / floor8,
               "writer_scaling": rates[2] / rates[1]}
    for name, (op, goal) in GOALS.items():
        ok = figures[name] <= goal if op == "<=" else figures[name] >= goal
        print(f"# goal {name} {op} {goal}: {'met' if ok else 'MISSED'} ({figures[name]:.3f})")
    print(f"# total {time.perf_counter() - t_all:.0f} s, {load_note()}")
