"""One command for every GPU figure: the cache build (encoder alone, the whole pipeline, their ratio) in bf16
and fp32, the recipe train step (plain / SSR from the cache / SSR online), and predict throughput.

    python benchmarks/gpu_suite.py                 # one GPU, vit_b at 1024, 512 views per precision: < 8 min
    python benchmarks/gpu_suite.py --smoke         # CPU, vit_tiny, a few views: the test suite runs this

Every figure is one `name=value` line as it is measured; a summary table closes the run. Encoders and
backbones have random weights (seeded): the timings are those of the real architectures and sizes.

  encoder_views_per_s_P    `encoder.encode` alone on prepared crops (already on the device), the build's
                           batch size, precision P
  pipeline_views_per_s_P   a real `build_cache` (decode workers, encoder, writer threads) over the same
                           number of views, after its start-up (BuildResult.views_per_second)
  build_over_encoder_P     encoder rate / pipeline rate (1.0: the GPU never waits)
  build_call_over_encoder_P  the same with the build's whole call (planning, store creation, warm-up)
  build_host_waits_P       synchronizing CUDA calls during that build (torch's sync debug mode): none per
                           batch is the design
  train_step_*             benchmarks/train_step.py --recipe (or --flops-only in --smoke)
  predict_images_per_s     Predictor on 2048x1024 frames (DAFormer mit_b5, whole-image, bf16)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_data import RESIZE, write_gta5_like
from bench_output import line, release_cached_memory, run_in_workdir, select_device, sync
from rich.console import Console

from ssr_cache.build.config import CacheBuildConfig, autocast_dtype
from ssr_cache.build.pipeline import build_cache, decoding_workers
from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.runtime import resolve_device
from ssr_cache.sam_encoder import build_sam_encoder
from ssr_train.infer.predictor import Predictor
from ssr_train.models.backbones import create_backbone
from ssr_train.models.segmentor import build_segmentor

HERE = Path(__file__).parent
BUDGET_S = 8 * 60


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, vit_tiny, few views: checks the script, not a GPU")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda:N; --smoke: cpu")
    p.add_argument("--views", type=int, default=None, help="views per precision (default 512, --smoke 8)")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default 32, --smoke 4)")
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: the build's own, as a "
                   "user gets it; --smoke 1)")
    p.add_argument("--skip-train", action="store_true", help="leave out train_step.py")
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, deleted)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.smoke else args.device
    args.views = args.views or (8 if args.smoke else 512)  # ~2 s of bf16 encoding on a big GPU: the rate, not
    # the start-up
    args.batch_size = args.batch_size or (4 if args.smoke else 32)
    args.workers = 1 if args.smoke and args.workers is None else args.workers  # None: the build decides
    return args


def cache_build_figures(args, work: Path, device: torch.device, precision: str, results: dict) -> None:
    """Encoder alone vs the whole build, same views, same batch size, one precision."""
    sam = "vit_tiny" if args.smoke else "vit_b"
    vpi = 4
    n_images = -(-args.views // vpi)
    root = work / "gta5"
    if not root.exists():
        write_gta5_like(root, n_images, "cityscapes", distinct=2)
    encoder = build_sam_encoder(sam, seed=0, device=device)
    amp = autocast_dtype(precision)
    # Already on the device: the encoder's own rate, with no copy (and no blocking copy) per batch.
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (args.batch_size, 512, 512, 3), np.uint8))
    crops = crops.to(device)
    encoder.encode(crops, autocast_dtype=amp)  # warm-up: CUDA start-up and kernel selection
    sync(str(device))
    n_batches = -(-args.views // args.batch_size)
    t = time.perf_counter()
    for _ in range(n_batches):
        encoder.encode(crops, autocast_dtype=amp)
    sync(str(device))
    t_encoder = time.perf_counter() - t
    n_encoded = n_batches * args.batch_size

    cfg = CacheBuildConfig(dataset="gta5", data_root=root, out=str(work / f"cache_{precision}"), sam=sam,
                           views_per_image=vpi, crop=(512, 512), resize=RESIZE, batch_size=args.batch_size,
                           device=str(device), autocast=precision, workers=args.workers, overwrite=True)
    t = time.perf_counter()
    with counted_host_waits(device) as waits:
        result = build_cache(cfg, progress=False, console=Console(quiet=True), encoder=encoder)
    sync(str(device))
    t_build = time.perf_counter() - t
    del encoder, crops
    release_cached_memory(str(device))  # the next precision, and train_step's own processes, start from a clean GPU
    enc_rate, build_rate = n_encoded / t_encoder, result.views_per_second
    for name, value, detail in (
            (f"encoder_views_per_s_{precision}", enc_rate, f"{sam}, {n_encoded} views, batch {args.batch_size}"),
            (f"pipeline_views_per_s_{precision}", build_rate,
             f"build_cache of {result.built_views} GTA5-size views, {args.workers} workers, after its start-up "
             f"({result.encode_seconds:.1f} of {t_build:.1f} s)"),
            (f"build_over_encoder_{precision}", enc_rate / build_rate, "1.0: the encoder never waits"),
            (f"build_call_over_encoder_{precision}", enc_rate * t_build / result.built_views,
             "the build's whole call, start-up (planning, store creation, warm-up) included, over the encoder"),
            (f"build_host_waits_{precision}", waits["count"],
             f"synchronizing CUDA calls in the build, {-(-result.built_views // args.batch_size)} batches "
             "(at most 2 expected, both in the warm-up: none per batch; 0 on a CPU)")):
        line(name, value, detail)
        results[name] = value


@contextlib.contextmanager
def counted_host_waits(device: torch.device):
    """{"count": synchronizing CUDA calls made inside the block} (torch's sync debug mode, as warnings): the
    build must not make the host wait on the GPU between batches (ssr_cache/build/encoded_batch.py). It sees
    torch's own waits (blocking copies, .item(), stream syncs), not Event.synchronize or pinned allocation:
    the build's intended wait for batch k's copy is not counted, and an ordering mistake shows only in
    build_over_encoder."""
    counter = {"count": 0}
    if device.type != "cuda":
        yield counter
        return
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode(before)
            counter["count"] = sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def train_step_figures(args, device: torch.device, results: dict, deadline: float) -> None:
    """benchmarks/train_step.py --recipe on the GPU (--flops-only in --smoke), its lines passed through."""
    cmd = [sys.executable, str(HERE / "train_step.py"), "--recipe"]
    cmd += ["--flops-only"] if args.smoke else ["--device", str(device)]
    timeout = max(30.0, deadline - time.perf_counter())
    # Its own session, so that a timeout also stops the memory subprocesses it starts (they would hold the
    # GPU while predict is timed); the figures it printed before a timeout or a failure are kept.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        last_error = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
        ending = None if proc.returncode == 0 else ("failed", last_error)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        ending = ("timed out", f"after {timeout:.0f} s (the suite's 8-minute budget); the figures above are kept")
    finally:  # Ctrl-C or any other way out: its own session would otherwise keep it on the GPU
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for text in stdout.splitlines():
        m = re.match(r"^([A-Za-z0-9_]+)=(\S+)", text)
        if m:
            print(text, flush=True)
            try:
                results[f"train_step.{m.group(1)}"] = float(m.group(2))
            except ValueError:
                results[f"train_step.{m.group(1)}"] = m.group(2)
    if ending is not None:
        line("train_step", *ending)
        results["train_step"] = ending[0]


def predict_figures(args, device: torch.device, results: dict) -> None:
    """Images per second of the shadow branch through `Predictor`, Cityscapes-size frames."""
    backbone = create_backbone("mit_b0" if args.smoke else "mit_b5", drop_path_rate=0.0)
    model = build_segmentor(backbone, num_classes=CITYSCAPES.num_classes)
    size = (256, 128) if args.smoke else (2048, 1024)  # (W, H)
    resize = (256, 128) if args.smoke else (1024, 512)
    predictor = Predictor(model, label_space=CITYSCAPES, resize=resize, device=device,
                          batch_size=1 if args.smoke else 4)
    images = [np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), np.uint8) for i in range(4)]
    predictor.predict(images)  # warm-up, at the timed batch's shapes
    sync(str(device))
    n = 4 if args.smoke else 32
    t = time.perf_counter()
    for _ in range(0, n, len(images)):
        predictor.predict(images)
    sync(str(device))
    rate = n / (time.perf_counter() - t)
    line("predict_images_per_s", rate, f"{'mit_b0' if args.smoke else 'mit_b5'}, {size[0]}x{size[1]} frames "
         f"resized to {resize[0]}x{resize[1]}, whole-image, precision {predictor.precision}")
    results["predict_images_per_s"] = rate


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="SAM encoder .* has no checkpoint")
    run_in_workdir(run, args, prefix="ssr-gpu-suite-")


def run(args: argparse.Namespace, work: Path) -> None:
    t0 = time.perf_counter()
    deadline = t0 + BUDGET_S - 60  # the last minute is kept for predict and the table
    device = resolve_device(args.device)
    select_device(str(device))
    args.workers = decoding_workers(args.workers, device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_suite.py needs a CUDA GPU (or --smoke for the CPU check)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# gpu_suite on {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{args.views} views per precision, batch {args.batch_size}, {args.workers} workers", flush=True)
    results: dict = {}
    for precision in (["fp32"] if args.smoke else ["bf16", "fp32"]):  # reduced precision exists only on CUDA
        cache_build_figures(args, work, device, precision, results)
    if not args.skip_train:
        train_step_figures(args, device, results, deadline)
    predict_figures(args, device, results)
    if device.type == "cuda":
        line("peak_gpu_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30, "this process")
    print_table(results)
    print(f"# total {time.perf_counter() - t0:.0f} s (budget {BUDGET_S} s)")


def print_table(results: dict) -> None:
    width = max(len(k) for k in results) if results else 10
    print("\n" + "figure".ljust(width) + "  value")
    print("-" * width + "  " + "-" * 12)
    for key, value in results.items():
        print(key.ljust(width) + "  " + (f"{value:.4g}" if isinstance(value, float) else str(value)))


if __name__ == "__main__":
    main()
