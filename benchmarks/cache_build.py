"""Cache-build benchmark: what a real `build_cache` costs beyond the SAM encoder, what the stored features
weigh, how lossy int8 is, and how much faster a cached sample reads than a decoded GTA5 frame.

Every figure is measured side by side in one run and printed as one `name=value` line (details follow in
parentheses). The data are synthetic 1914x1052 street scenes written in the GTA5 layout (textured renderer,
so the PNGs weigh about what photographs do); views are planned with the gta5 resize 1280x720 and 512 crops.

    python benchmarks/cache_build.py --quick          # 2 vit_b views, under 3 minutes on 2 CPU cores
    python benchmarks/cache_build.py --views 8        # fuller CPU run
    python benchmarks/cache_build.py --device cuda    # on a GPU (autocast bf16)
    python benchmarks/cache_build.py --pipeline       # the pipeline around a free stand-in encoder vs its floor

The SAM encoder has random weights (seeded): its timings are those of the real architecture and input size,
but its features are not SAM features, so the byte and cosine figures are also given on smooth Gaussian
fields like the store tests use.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_data import CROP, GTA5_SIZE, RESIZE, smooth_feature_set, write_gta5_like
from bench_output import line, run_in_workdir, select_device, sync
from pipeline_cost import run_pipeline
from rich.console import Console

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import (
    ViewCropDataset,
    build_cache,
    iter_batches,
    open_build_dataset,
    plan_build,
)
from ssr_cache.data.png_io import read_rgb
from ssr_cache.runtime import set_cpu_threads
from ssr_cache.sam_encoder import build_sam_encoder, get_encoder_config
from ssr_cache.store.feature_store import FeatureStore, StoreLayout
from ssr_cache.store.inspect import store_info

GOALS = {"build_over_encoder": ("<=", 1.10), "fp16_bytes_ratio": ("<=", 0.45), "int8_bytes_ratio": ("<=", 0.23),
         "read_speedup": (">=", 2.0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 views, few read rounds: under 3 minutes on 2 CPU cores")
    p.add_argument("--views", type=int, default=None, help="views to build (default 8, --quick 2)")
    p.add_argument("--views-per-image", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="encoder batch, the same on both sides")
    p.add_argument("--workers", type=int, default=2, help="build DataLoader workers (the build's default on a CPU)")
    p.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_tiny"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda runs under autocast bf16)")
    p.add_argument("--read-rounds", type=int, default=None, help="read benchmark rounds (default 20, --quick 5)")
    p.add_argument("--pipeline", action="store_true",
                   help="time the pipeline around a no-cost stand-in encoder against its floor (pipeline_cost.py)")
    p.add_argument("--images", type=int, default=96, help="--pipeline: GTA5-size frames to build (x K views)")
    p.add_argument("--views-per-shard", type=int, default=64, help="--pipeline: the build's shard size")
    p.add_argument("--rounds", type=int, default=3, help="--pipeline: alternating build/floor rounds (medians)")
    p.add_argument("--writer-rounds", type=int, default=7,
                   help="--pipeline: alternating 1/2-thread writer rounds (medians; a round takes ~3 s)")
    p.add_argument("--writer-views", type=int, default=64, help="--pipeline: views the writer benchmark writes")
    p.add_argument("--writer-views-per-shard", type=int, default=16, help="--pipeline: shard size of that writer")
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, deleted)")
    args = p.parse_args(argv)
    args.views = args.views or (2 if args.quick else 8)
    args.read_rounds = args.read_rounds or (5 if args.quick else 20)
    if min(args.views, args.views_per_image, args.batch_size, args.read_rounds, args.rounds, args.writer_rounds) < 1:
        p.error("--views, --views-per-image, --batch-size, --read-rounds, --rounds and --writer-rounds must be "
                "at least 1")
    return args


# ---------------------------------------------------------------- encoder alone vs build


def encode_all(encoder, batches: list[list[dict]], levels: tuple[int, ...], autocast, device: str
               ) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds of `encoder.encode` over prepared batches (sum of timed calls) and the fp32 outputs."""
    seconds, outputs = 0.0, {}
    for group in batches:
        # already on the device: the encoder's own rate (the build copies up without waiting)
        pixels = torch.from_numpy(np.concatenate([g["pixels"] for g in group])).to(device)
        sync(device)
        t = time.perf_counter()
        feats = encoder.encode(pixels, levels=levels, autocast_dtype=autocast)
        sync(device)
        seconds += time.perf_counter() - t
        for name, value in feats.items():
            outputs.setdefault(name, []).append(value.float().cpu().numpy())
    return seconds, {name: np.concatenate(parts) for name, parts in outputs.items()}


# ---------------------------------------------------------------- stores


def feature_bytes_ratio(url: Path, layout: StoreLayout) -> tuple[float, float]:
    """(stored feature bytes / fp32 bytes of the same views, same for the finest level alone), via store_info."""
    info = store_info(str(url))
    arrays = {a["name"]: a["stored_bytes"] for a in info["arrays"]}
    stored = sum(v for name, v in arrays.items() if name.startswith("features/"))
    finest = f"features/l{layout.levels[0]}"
    finest_stored = sum(v for name, v in arrays.items() if name.startswith(finest))
    fp32 = {name: 4 * math.prod(layout.feature_shape(name)) * info["done_views"] for name in layout.feature_names}
    return stored / sum(fp32.values()), finest_stored / fp32[f"l{layout.levels[0]}"]


def write_store(url: Path, layout: StoreLayout, view_arrays: dict, sample_ids: list[str], fingerprint: dict,
                inputs: dict, features: dict[str, np.ndarray]) -> float:
    """A store with `layout` holding these features, written shard by shard as the build's writer does;
    returns the seconds spent in write_shard (quantise + compress + write)."""
    store = FeatureStore.create(str(url), layout, view_arrays, sample_ids, fingerprint, overwrite=True)
    seconds = 0.0
    for s in range(store.n_shards):
        a, b = store.shard_range(s)
        t = time.perf_counter()
        store.write_shard(s, pixels=inputs["pixels"][a:b], labels=inputs["labels"][a:b],
                          class_counts=inputs["class_counts"][a:b],
                          features={name: f[a:b] for name, f in features.items()})
        seconds += time.perf_counter() - t
    return seconds


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the channel vectors at every (view, y, x) of two (N, C, g, g) maps."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dot = (a64 * b64).sum(axis=1)
    norm = np.sqrt((a64 * a64).sum(axis=1) * (b64 * b64).sum(axis=1))
    return (dot / np.maximum(norm, 1e-30)).ravel()


# ---------------------------------------------------------------- reading


def daformer_sample(png: Path, rng: np.random.Generator) -> np.ndarray:
    """What a DAFormer loader does per source image: decode the PNG, resize to 1280x720 (bilinear, no
    antialiasing: cv2.INTER_LINEAR's sampling), random 512 crop, random flip."""
    image = torch.from_numpy(read_rgb(png)).permute(2, 0, 1)[None]
    resized = F.interpolate(image, size=(RESIZE[1], RESIZE[0]), mode="bilinear", align_corners=False)[0]
    y0, x0 = int(rng.integers(0, RESIZE[1] - CROP + 1)), int(rng.integers(0, RESIZE[0] - CROP + 1))
    crop = resized[:, y0:y0 + CROP, x0:x0 + CROP]
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    return np.ascontiguousarray(crop.permute(1, 2, 0).numpy())


def read_benchmark(stores: dict[str, FeatureStore], pngs: dict[str, list[Path]], rounds: int
                   ) -> dict[str, float]:
    """Median seconds per sample of each reader, measured in interleaved rounds (same noise for all)."""
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {name: [] for name in [*stores, *pngs]}
    for _ in range(rounds):
        for name, store in stores.items():
            finest = [store.layout.levels[0]]
            t = time.perf_counter()
            for i in range(store.n_views):
                store.read_view(i, levels=finest, with_pixels=True)
            times[name].append((time.perf_counter() - t) / store.n_views)
        for name, files in pngs.items():
            t = time.perf_counter()
            for path in files:
                daformer_sample(path, rng)
            times[name].append((time.perf_counter() - t) / len(files))
    return {name: float(np.median(v)) for name, v in times.items()}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    select_device(args.device)
    warnings.filterwarnings("ignore", message="SAM encoder .* has no checkpoint")
    run_in_workdir(run_pipeline if args.pipeline else run, args, prefix="ssr-bench-")


def run(args: argparse.Namespace, work: Path) -> None:
    t_all = time.perf_counter()
    cuda = args.device.startswith("cuda")
    set_cpu_threads(None)  # the build's own intra-op threads, on both sides of build_over_encoder
    autocast = torch.bfloat16 if cuda else None
    vpi = min(args.views_per_image, args.views)
    n_images = math.ceil(args.views / vpi)
    enc_cfg = get_encoder_config(args.sam)
    print(f"# machine: {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"# encoder: {args.sam} with RANDOM weights (seed 0, no checkpoint) at its real "
          f"{enc_cfg.img_size}x{enc_cfg.img_size} input: real cost, but NOT SAM features")
    print(f"# data: {n_images} synthetic {GTA5_SIZE[0]}x{GTA5_SIZE[1]} GTA5-layout images x {vpi} views, resize "
          f"{RESIZE[0]}x{RESIZE[1]}, crop {CROP}, batch {args.batch_size}, {args.workers} workers, "
          f"{'autocast bf16' if cuda else 'fp32'}")

    root = work / "gta5"
    pngs = write_gta5_like(root, n_images, "cityscapes")  # textured + noisy: photograph-like PNG weight
    flat_png = write_gta5_like(work / "gta5_flat", 1, "gta5")  # flat colours: a much lighter PNG
    cfg = CacheBuildConfig(dataset="gta5", data_root=root, out=str(work / "cache_fp16"), sam=args.sam,
                           views_per_image=vpi, crop=(CROP, CROP), resize=RESIZE, batch_size=args.batch_size,
                           device=args.device, autocast="bf16" if cuda else None, workers=args.workers,
                           max_images=n_images, overwrite=True)

    # One-time start-up, timed as build_cache does it: open the dataset, plan, construct the encoder.
    t = time.perf_counter()
    ds, labelled = open_build_dataset(cfg)
    plan = plan_build(cfg, ds, labelled, progress=False).views
    t_plan = time.perf_counter() - t
    t = time.perf_counter()
    encoder = build_sam_encoder(args.sam, seed=cfg.sam_seed, device=args.device)
    t_model = time.perf_counter() - t
    levels = encoder.default_levels()

    # Crops prepared beforehand, exactly as the build's workers make them (timed serially: per-view CPU cost).
    t = time.perf_counter()
    items = list(ViewCropDataset(ds, plan, np.arange(len(plan)), labelled=True))
    t_crops = time.perf_counter() - t
    batches = list(iter_batches(items, cfg.batch_size))  # the build's batching of per-image items

    warm = torch.from_numpy(np.concatenate([g["pixels"] for g in batches[0]]))
    t = time.perf_counter()
    encoder.encode(warm if cuda else warm[:1], levels=levels, autocast_dtype=autocast)
    sync(args.device)
    t_warm = time.perf_counter() - t

    t_enc, fp32 = encode_all(encoder, batches, levels, autocast, args.device)
    t = time.perf_counter()
    result = build_cache(cfg, progress=False, console=Console(quiet=True))
    t_build = time.perf_counter() - t
    n = result.built_views
    # The build's own GPU warm-up is left out here: this process's first encode (t_warm) was a cold one,
    # the build's comes after it and is much shorter; it only counts on the build's side.
    t_startup = t_plan + t_model
    line("build_over_encoder", result.encode_seconds / t_enc,
         f"build {result.encode_seconds:.1f} s after its start-up (BuildResult.encode_seconds) / encoder alone "
         f"{t_enc:.1f} s, {n} views, {result.encode_seconds / n:.2f} vs {t_enc / n:.2f} s per view")
    line("build_over_encoder_with_startup", t_build / (t_enc + t_startup),
         f"build {t_build:.1f} s / (encoder {t_enc:.1f} s + start-up {t_startup:.1f} s: plan {t_plan:.1f}, "
         f"model {t_model:.1f})")
    line("prep_ms_per_view", 1000 * t_crops / n, "decode + resize + crop + counts, one process, done beforehand")
    line("warmup_s", t_warm, f"one untimed warm-up encode of {len(warm) if cuda else 1} view(s)")

    built = FeatureStore.open(cfg.out)
    stored = built.read_views(np.arange(n))
    err = max(float(np.abs(stored["features"][k] - fp32[k]).max()) for k in fp32)
    line("fp16_store_vs_encoder_max_abs_err", err, "built store against the encoder-alone outputs: same views")

    # int8 (and an fp16 copy, to time the writer) from the encoder-alone fp32 outputs, as build's writer writes.
    inputs = {"pixels": stored["pixels"], "labels": stored["label"], "class_counts": stored["class_counts"]}
    meta = (built.view_arrays(), built.sample_ids)
    int8_layout = StoreLayout.from_dict({**built.layout.to_dict(), "feature_dtype": "int8"})
    t_w16 = write_store(work / "copy_fp16", built.layout, *meta, built.fingerprint, inputs, fp32)
    t_w8 = write_store(work / "cache_int8", int8_layout, *meta, {**built.fingerprint, "feature_dtype": "int8"},
                       inputs, fp32)
    line("write_ms_per_view", 1000 * t_w16 / n, f"write_shard, fp16; int8 {1000 * t_w8 / n:.1f} ms")
    fp16_ratio, fp16_finest = feature_bytes_ratio(Path(cfg.out), built.layout)
    int8_ratio, int8_finest = feature_bytes_ratio(work / "cache_int8", int8_layout)
    finest = f"l{levels[0]}"
    line("fp16_bytes_ratio", fp16_ratio, f"all levels {'/'.join(map(str, levels))}, {finest} alone "
         f"{fp16_finest:.3f}; random-init {args.sam} features")
    line("int8_bytes_ratio", int8_ratio, f"codes + scale + offset, {finest} alone {int8_finest:.3f}; "
         f"random-init {args.sam} features")
    int8_store = FeatureStore.open(work / "cache_int8")
    deq = int8_store.read_views(np.arange(n))["features"]
    cos = token_cosine(deq[finest], fp32[finest])
    coarse = ", ".join(f"l{g} {token_cosine(deq[f'l{g}'], fp32[f'l{g}']).mean():.6f}" for g in levels[1:])
    line("int8_cosine", float(cos.mean()), f"min {cos.min():.6f} over {cos.size} {finest} tokens; mean {coarse}",
         fmt=".6f")

    # The same figures on smooth Gaussian fields shaped like SAM neck maps (correlation 3 cells, std 0.5),
    # as tests/test_feature_store.py measures them.
    n_smooth = 4 if args.quick else 8
    smooth = smooth_feature_set(n_smooth, levels, enc_cfg.out_chans)
    tiny = {"pixels": np.zeros((n_smooth, 8, 8, 3), np.uint8), "labels": np.full((n_smooth, 8, 8), 255, np.uint8),
            "class_counts": np.zeros((n_smooth, 19), np.int32)}
    views = {k: np.resize(v, (n_smooth, *v.shape[1:])) for k, v in built.view_arrays().items()}
    for dtype in ("float16", "int8"):
        layout = StoreLayout(n_views=n_smooth, crop_hw=(8, 8), channels=enc_cfg.out_chans, levels=levels,
                             feature_dtype=dtype, views_per_shard=n_smooth)
        write_store(work / f"smooth_{dtype}", layout, views, built.sample_ids, {"smooth": True}, tiny, smooth)
        ratio, ratio_finest = feature_bytes_ratio(work / f"smooth_{dtype}", layout)
        name = "fp16" if dtype == "float16" else "int8"
        line(f"smooth_{name}_bytes_ratio", ratio, f"Gaussian fields, corr 3 cells, {finest} alone {ratio_finest:.3f}")
    deq = FeatureStore.open(work / "smooth_int8").read_views(np.arange(n_smooth))["features"][finest]
    cos = token_cosine(deq, smooth[finest])
    line("smooth_int8_cosine", float(cos.mean()), f"min {cos.min():.6f} over {cos.size} {finest} tokens", fmt=".6f")

    # Reading: a cached view (pixels + label + finest level) against a DAFormer-style decode of a 1914x1052 PNG.
    per = read_benchmark({"fp16": built, "int8": int8_store}, {"textured": pngs, "flat": flat_png}, args.read_rounds)
    mb = np.mean([p.stat().st_size for p in pngs]) / 1e6
    flat_mb = flat_png[0].stat().st_size / 1e6
    line("read_speedup", per["textured"] / per["fp16"],
         f"cached fp16 view {1000 * per['fp16']:.1f} ms vs decode+resize+crop {1000 * per['textured']:.1f} ms of "
         f"a textured {mb:.1f} MB PNG; medians of {args.read_rounds} rounds")
    line("read_speedup_int8", per["textured"] / per["int8"], f"cached int8 view {1000 * per['int8']:.1f} ms")
    line("read_speedup_flat_png", per["flat"] / per["fp16"],
         f"against a flat-colour {flat_mb:.2f} MB PNG ({1000 * per['flat']:.1f} ms): a lower bound")

    figures = {"build_over_encoder": result.encode_seconds / t_enc, "fp16_bytes_ratio": fp16_ratio,
               "int8_bytes_ratio": int8_ratio, "read_speedup": per["textured"] / per["fp16"]}
    for name, (op, goal) in GOALS.items():
        ok = figures[name] <= goal if op == "<=" else figures[name] >= goal
        print(f"# goal {name} {op} {goal}: {'met' if ok else 'MISSED'} ({figures[name]:.3f})")
    print(f"# total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
