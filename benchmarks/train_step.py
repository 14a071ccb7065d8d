"""Train-step benchmark: what SSR costs per DAFormer iteration when SAM tokens come from the cache, against
plain DAFormer and against the reference's online SAM.

One fixed source + target batch is read once from real caches (`build_cache` over `ssr data synth` scenes)
and fed, every step, to three DAFormer methods built with the same seed (same backbone and head init):

    plain       DAFormer without SSR
    ssr_cache   DAFormer + SSR, SAM tokens from the cache (sam_source="cache")
    ssr_online  DAFormer + SSR, frozen SAM run in the loop on the source and the mixed image (the reference)

A step is what `Trainer.train` does per iteration: set the poly lr, zero grads, `DAFormer.step` (source CE
(+SSR), EMA teacher pseudo-labels, ClassMix, strong aug, mixed CE (+SSR), FD) under the trainer's autocast,
then `optimizer.step()`. The variants run interleaved, round by round (order rotated each round), and the
medians are reported. Peak memory is measured per variant in a fresh subprocess.

    python benchmarks/train_step.py --quick                 # mit_b0, vit_tiny, 128 crops, head 64: < 3 min
    python benchmarks/train_step.py --recipe --device cuda  # mit_b5, vit_b at 1024, 512 crops, batch 2, bf16
    python benchmarks/train_step.py --recipe --flops-only   # FLOP estimate only, seconds on any machine

SAM and the backbone have random weights (seeded): the timings are those of the real architectures and sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_output import line, release_cached_memory, run_in_workdir, select_device, sync
from rich.console import Console

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import build_cache
from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.data.synthetic import synthesize
from ssr_cache.sam_encoder import get_encoder_config
from ssr_cache.store.feature_store import FeatureStore
from ssr_train.models.model_factory import sam_level_name
from ssr_train.training.cached_views import CachedViewDataset, batch_to_device, collate_views
from ssr_train.training.config import TrainConfig
from ssr_train.training.engine import Trainer, _seed_everything
from ssr_train.training.optim import poly_lr, set_lr
from ssr_train.training.train_data import open_stores

VARIANTS = {"plain": (False, "cache"), "ssr_cache": (True, "cache"), "ssr_online": (True, "online")}
GOALS = {"ssr_cache_over_plain": 1.35, "ssr_cache_over_online": 0.5}
QUICK = {"backbone": "mit_b0", "sam": "vit_tiny", "crop": 128, "head_dim": 64, "steps": 15, "warmup": 2}
RECIPE = {"backbone": "mit_b5", "sam": "vit_b", "crop": 512, "head_dim": 256, "steps": 20, "warmup": 5}
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="mit_b0, vit_tiny, 128 crops, head 64, 15 steps: under 3 min on 2 CPU cores")
    mode.add_argument("--recipe", action="store_true",
                      help="the real sizes (also the default): mit_b5, vit_b, 512 crops, head 256")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the trainer's bf16 autocast)")
    p.add_argument("--backbone", default=None, help="mit_b0…mit_b5 (default mit_b5, --quick mit_b0)")
    p.add_argument("--sam", default=None, choices=["vit_tiny", "vit_b", "vit_l", "vit_h"],
                   help="SAM encoder of the caches and of online mode (default vit_b, --quick vit_tiny)")
    p.add_argument("--crop", type=int, default=None, help="square crop size (default 512, --quick 128)")
    p.add_argument("--batch-size", type=int, default=2, help="source and target batch (the recipe's 2)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="DAFormer head width (default the recipe's 256; --quick 64, as the demo uses)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20, --quick 15)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per variant first (default 5, --quick 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default on CPU 1: on a shared machine more threads stall at "
                        "every op and the timings scatter 5-20x; on CUDA torch's default)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps run by each peak-memory subprocess")
    p.add_argument("--flops-only", action="store_true",
                   help="print only the FLOP estimate (meta device: seconds at any size; no timing)")
    p.add_argument("--out", type=Path, default=None,
                   help="working folder (default: a temporary one, deleted)")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)  # peak-memory subprocess
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else RECIPE
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    counts = (args.steps, args.batch_size, args.crop, args.head_dim, args.mem_steps, args.threads or 1)
    if min(counts) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size, --crop, --head-dim, --mem-steps and --threads must be at least 1, "
                "--warmup at least 0")
    return args


# ---------------------------------------------------------------- data: caches and the fixed batch


def synth_size(crop: int) -> tuple[int, int]:
    """(W, H) of the synthetic scenes: GTA5's 1280x720 resize at crop 512, scaled with the crop."""
    return crop * 5 // 2, crop * 45 // 32


def make_caches(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """Source (gta5) and target (cityscapes) caches of exactly batch-size views each (one image per domain,
    batch-size views of it): the fixed batch is the whole cache, and a CPU vit_b build stays short."""
    size = synth_size(args.crop)
    data = work / "data"
    synthesize(data, train=1, val=0, size=size, seed=SEED, workers=1, progress=False)
    cuda = args.device.startswith("cuda")
    urls = {}
    for name, dataset in (("source", "gta5"), ("target", "cityscapes")):
        urls[name] = work / f"{dataset}.zarr"
        cfg = CacheBuildConfig(dataset=dataset, data_root=data / dataset, out=str(urls[name]), sam=args.sam,
                               views_per_image=args.batch_size, crop=(args.crop, args.crop), resize=size,
                               batch_size=args.batch_size, device=args.device,
                               autocast="bf16" if cuda else None, workers=0, max_images=1, overwrite=True,
                               seed=SEED)
        build_cache(cfg, progress=False, console=Console(quiet=True))
    return urls


def train_config(args: argparse.Namespace, urls: dict[str, Path], work: Path, ssr: bool, sam_source: str
                 ) -> TrainConfig:
    cfg = TrainConfig()
    cfg = cfg.replace("run", method="daformer", device=args.device, seed=SEED, out=str(work / "runs"))
    cfg = cfg.replace("model", backbone=args.backbone, backbone_checkpoint="none", head_embed_dim=args.head_dim, ssr=ssr,
                      sam_source=sam_source, sam_encoder=args.sam, sam_seed=SEED)
    return cfg.replace("data", source_cache=str(urls["source"]), target_cache=str(urls["target"]),
                       batch_size=args.batch_size, workers=0)


def fixed_batches(urls: dict[str, Path], level: str, batch_size: int, device: str) -> tuple[dict, dict]:
    """Views 0..B-1 of each cache, read and collated as the trainer's loaders do (with the SAM level)."""
    out = []
    for name in ("source", "target"):
        ds = CachedViewDataset(str(urls[name]), levels=[level])
        batch = collate_views([ds[(i, 0)] for i in range(batch_size)])
        out.append(batch_to_device(batch, torch.device(device)))
    return out[0], out[1]


# ---------------------------------------------------------------- one variant


class Variant:
    """A DAFormer method, its model and optimiser built exactly as `Trainer` builds them, plus the body of
    one `Trainer.train` iteration on a fixed batch."""

    def __init__(self, name: str, args: argparse.Namespace, urls: dict[str, Path], work: Path, level: str,
                 channels: int):
        ssr, sam_source = VARIANTS[name]
        self.name = name
        self.device = args.device
        self.trainer = Trainer(train_config(args, urls, work, ssr, sam_source), progress=False,
                               console=Console(quiet=True))
        self.trainer.stores = open_stores(self.trainer.cfg)
        self.model, self.method, self.optimizer = self.trainer._build(self.trainer.stores)
        self.autocast = self.trainer._autocast()
        self.it = 0
        self.losses: dict[str, float] = {}

    def step(self, src: dict, tgt: dict) -> float:
        """Seconds of one training iteration (the loop body of Trainer.train, without logging/checkpoints)."""
        cfg = self.trainer.cfg
        sync(self.device)
        t = time.perf_counter()
        set_lr(self.optimizer, poly_lr(self.it, cfg.run.iters, cfg.optim))
        self.method.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            self.losses = self.method.step(self.it, src, tgt)
        if cfg.optim.grad_clip:
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        self.optimizer.step()
        sync(self.device)
        self.it += 1
        return time.perf_counter() - t


def store_level(urls: dict[str, Path], args: argparse.Namespace) -> tuple[str, int]:
    store = FeatureStore.open(str(urls["source"]))
    cfg = train_config(args, urls, Path("."), True, "cache")
    return sam_level_name(cfg.model, list(store.layout.levels)), store.layout.channels


# ---------------------------------------------------------------- peak memory (fresh subprocess per variant)


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_memory(args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak memory of building one variant and running --mem-steps steps on it.

    CUDA: torch.cuda.max_memory_allocated after the steps minus memory_allocated before the model is built
    (the batch is already on the device). CPU: the kernel's peak RSS (VmHWM, reset to the current RSS just
    before the model is built) minus the RSS at that point; without clear_refs, ru_maxrss is used instead.
    """
    cuda = args.device.startswith("cuda")
    urls = {"source": args.work / "gta5.zarr", "target": args.work / "cityscapes.zarr"}
    level, channels = store_level(urls, args)
    _seed_everything(SEED, True)
    src, tgt = fixed_batches(urls, level, args.batch_size, args.device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        base = _status_kb("VmRSS") * 1024
        base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    variant = Variant(args.child, args, urls, args.work, level, channels)
    built = (torch.cuda.memory_allocated() if cuda else _status_kb("VmRSS") * 1024) - base
    for _ in range(args.mem_steps):
        variant.step(src, tgt)
    if cuda:
        peak, method = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated growth"
    elif reset:
        peak, method = _status_kb("VmHWM") * 1024 - base, "peak RSS (VmHWM after clear_refs) growth"
    else:
        peak_abs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak, method = peak_abs - base, "ru_maxrss growth" + (" (peak before the model: unreliable)"
                                                              if peak_abs <= base_max else "")
    report = {"peak_mb": peak / 2**20, "built_mb": built / 2**20, "method": method}
    print("MEM " + json.dumps(report), flush=True)


def measure_memory(args: argparse.Namespace, work: Path, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(work),
           "--device", args.device, "--backbone", args.backbone, "--sam", args.sam, "--crop", str(args.crop),
           "--batch-size", str(args.batch_size), "--head-dim", str(args.head_dim),
           "--mem-steps", str(args.mem_steps), "--steps", "1", "--warmup", "0",
           *(["--threads", str(args.threads)] if args.threads else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for text in proc.stdout.splitlines():
        if text.startswith("MEM "):
            return json.loads(text[4:])
    raise RuntimeError(f"memory subprocess for {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------- online SAM alone


def time_online_sam(variant: Variant, src: dict, mix_like: torch.Tensor) -> float:
    """Seconds of the two SAM calls an online step makes (source image, then a mixed-size image)."""
    sync(variant.device)
    t = time.perf_counter()
    with variant.autocast:
        variant.method.sam.of_images(src["img"])
        variant.method.sam.of_images(mix_like)
    sync(variant.device)
    return time.perf_counter() - t


# ---------------------------------------------------------------- FLOP estimate (meta device, no compute)


def step_flops(args: argparse.Namespace, channels: int, grid: int) -> dict[str, float]:
    """GFLOP of one step of each variant, composed from forward counts of the real modules (meta device).

    FlopCounterMode counts each forward (backbone, head, regulariser at the stored level's grid, the SAM
    image encoder at its input size); training = 3x forward (backward = 2x forward), because the counter's
    convolution-backward formula ignores groups and overcounts depthwise convs about 10x. A DAFormer step is
    then: source and mixed student passes (trained), the teacher forward (backbone + head), the FD ImageNet
    backbone forward; SSR adds the head and the regulariser on both trained passes; online SAM adds its two
    encodes (source and mixed image).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ssr_cache.sam_encoder import build_sam_encoder
    from ssr_train.models.model_factory import build_model
    from ssr_train.training.config import ModelConfig

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    b, cfg = args.batch_size, get_encoder_config(args.sam)
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone=args.backbone, head_embed_dim=args.head_dim, ssr=True),
                            num_classes=CITYSCAPES.num_classes, sam_channels=channels).train()
        encoder = build_sam_encoder(args.sam, seed=SEED, device="meta")
        img, sam = torch.empty(b, 3, args.crop, args.crop), torch.empty(b, channels, grid, grid)
        sam_in = torch.empty(b, 3, cfg.img_size, cfg.img_size)
        feats = model.extract_features(img)
        bb, head = count(lambda: model.extract_features(img)), count(lambda: model.head(feats))
        reg, enc = count(lambda: model.regularizer(feats, sam)), count(lambda: encoder.image_encoder(sam_in))
    plain = 2 * 3 * (bb + head) + (bb + head) + bb
    cache = plain + 2 * 3 * (head + reg)
    return {"backbone": bb, "head": head, "regularizer": reg, "sam": enc, "plain": plain,
            "ssr_cache": cache, "ssr_online": cache + 2 * enc}


def print_flops(fl: dict[str, float], args: argparse.Namespace) -> None:
    line("flops_ssr_cache_over_plain", fl["ssr_cache"] / fl["plain"],
         f"estimate from forward FLOP counts: step {fl['plain']:.0f} vs {fl['ssr_cache']:.0f} GFLOP; "
         f"per batch forward: backbone {fl['backbone']:.1f}, head {fl['head']:.1f}, "
         f"regulariser {fl['regularizer']:.1f}")
    line("flops_ssr_cache_over_online", fl["ssr_cache"] / fl["ssr_online"],
         f"estimate: online step {fl['ssr_online']:.0f} GFLOP; {args.sam} forward {fl['sam']:.1f} GFLOP "
         f"per batch")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="SAM encoder .* has no checkpoint")
    if args.child:
        child_memory(args)
        return
    if args.flops_only:
        enc = get_encoder_config(args.sam)
        grid = enc.grid  # the finest stored level (the default SSR keys) is the neck grid
        print(f"# FLOP estimate: DAFormer {args.backbone} (head {args.head_dim}), batch {args.batch_size}+"
              f"{args.batch_size}, crop {args.crop}; {args.sam} at {enc.img_size}, SSR keys from l{grid}")
        print_flops(step_flops(args, enc.out_chans, grid), args)
        return
    run_in_workdir(run, args, prefix="ssr-bench-step-")


def run(args: argparse.Namespace, work: Path) -> None:
    t_all = time.perf_counter()
    cuda = args.device.startswith("cuda")
    enc = get_encoder_config(args.sam)
    print(f"# machine: {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads, device {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"{'autocast bf16' if cuda else 'fp32'}")
    print(f"# model: DAFormer {args.backbone} (head {args.head_dim}, random init, seed {SEED}), batch "
          f"{args.batch_size}+{args.batch_size}, crop {args.crop}; SAM {args.sam} with RANDOM weights at its "
          f"real {enc.img_size}x{enc.img_size} input")

    t = time.perf_counter()
    urls = make_caches(args, work)
    t_caches = time.perf_counter() - t
    level, channels = store_level(urls, args)
    print(f"# caches: 1 synthetic image per domain at {'x'.join(map(str, synth_size(args.crop)))}, "
          f"{args.batch_size} views each, built with build_cache in {t_caches:.1f} s; SSR keys from {level}")

    _seed_everything(SEED, True)  # as Trainer.train does (deterministic is the config default)
    src, tgt = fixed_batches(urls, level, args.batch_size, args.device)
    variants = {name: Variant(name, args, urls, work, level, channels) for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "sam_online"]}
    order = list(times)
    mix_like = tgt["img"].flip(-1)  # a second, different image of the mixed image's shape
    t = time.perf_counter()
    for r in range(args.warmup + args.steps):
        k = r % len(order)
        for name in order[k:] + order[:k]:  # rotated each round: no variant always runs first
            if name == "sam_online":
                dt = time_online_sam(variants["ssr_online"], src, mix_like)
            else:
                dt = variants[name].step(src, tgt)
            if r >= args.warmup:
                times[name].append(dt)
    t_loop = time.perf_counter() - t
    med = {name: float(np.median(v)) for name, v in times.items()}
    for name in VARIANTS:
        v = 1000 * np.array(times[name])
        losses = variants[name].losses
        finite = all(np.isfinite(x) for x in losses.values())
        line(f"{name}_ms_per_step", 1000 * med[name],
             f"median of {len(v)}, min {v.min():.0f} max {v.max():.0f} ms; last loss {losses['loss']:.3f}"
             f"{'' if finite else ' NOT FINITE'}", fmt=".1f")
    paired = {name: float(np.median(np.array(times["ssr_cache"]) / np.array(times[name])))
              for name in ("plain", "ssr_online")}
    line("ssr_cache_over_plain", med["ssr_cache"] / med["plain"],
         f"ratio of medians; median of per-round ratios {paired['plain']:.3f}; "
         f"goal <= {GOALS['ssr_cache_over_plain']}")
    line("ssr_cache_over_online", med["ssr_cache"] / med["ssr_online"],
         f"ratio of medians; median of per-round ratios {paired['ssr_online']:.3f}; "
         f"goal <= {GOALS['ssr_cache_over_online']} on GPU")
    line("online_sam_ms_per_step", 1000 * med["sam_online"],
         f"the 2 SAM encodes of an online step alone ({args.batch_size} images each), median of {args.steps}",
         fmt=".1f")
    print(f"# timing loop: {t_loop:.1f} s for {args.warmup} warm-up + {args.steps} timed rounds "
          f"of 3 variants + online SAM alone")
    del variants, src, tgt
    release_cached_memory(args.device)  # the memory children are separate processes

    names = {"plain": "peak_mem_plain_mb", "ssr_cache": "peak_mem_cache_mb",
             "ssr_online": "peak_mem_online_mb"}
    for name, key in names.items():
        mem = measure_memory(args, work, name)
        line(key, mem["peak_mb"], f"{mem['method']} over build + {args.mem_steps} steps in a fresh process; "
             f"after the build (models, teacher, FD copy{', SAM' if name == 'ssr_online' else ''}) "
             f"{mem['built_mb']:.0f} MB", fmt=".0f")

    print_flops(step_flops(args, channels, int(level[1:])), args)

    figures = {"ssr_cache_over_plain": med["ssr_cache"] / med["plain"],
               "ssr_cache_over_online": med["ssr_cache"] / med["ssr_online"]}
    for name, goal in GOALS.items():
        where = "" if name == "ssr_cache_over_plain" or cuda else " (the goal is for a GPU)"
        print(f"# goal {name} <= {goal}: {'met' if figures[name] <= goal else 'MISSED'} "
              f"({figures[name]:.3f}){where}")
    print(f"# total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
