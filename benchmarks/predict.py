"""Inference throughput: images/s of whole-image prediction at 1024x512 for the Predictor, the TorchScript
file and the ONNX file under onnxruntime, side by side in one run, plus the model's bare forward pass.

Per backbone (mit_b0, mit_b5; random weights, seeded: the timings are those of the real architectures),
one uint8 RGB 1024x512 image is predicted by

    forward      the segmentor alone on the already normalised tensor (no resize, upsampling, argmax, copies)
    predictor    ``Predictor.predict(numpy HWC image)`` → numpy label map (everything a user call does)
    torchscript  ``ssr export --format torchscript`` file, run with torch.jit (uint8 NCHW in, labels out)
    onnx         ``ssr export --format onnx`` file, run with onnxruntime (CPU execution provider)

The variants run interleaved, round by round (order rotated each round); medians are reported.
Goals: onnx on the CPU at least as fast as the Predictor (``onnx_over_predictor`` ≥ 1), and the Predictor's
overhead beyond the forward pass at batch 1 ≤ 10 % (``predictor_overhead`` ≤ 0.10).

    python benchmarks/predict.py --quick                      # mit_b0 only, 3 rounds
    python benchmarks/predict.py --repeats 3                  # mit_b0 and mit_b5
    python benchmarks/predict.py --device cuda --repeats 20   # Predictor/forward/TorchScript on the GPU (bf16
                                                              # autocast for the Predictor); onnx stays on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_output import line, run_in_workdir, select_device, sync

from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.runtime import resolve_device, runtime_line, set_cpu_threads
from ssr_train.infer.export import ExportedModel, export_model
from ssr_train.infer.predictor import Predictor
from ssr_train.infer.preprocess import prepare
from ssr_train.infer.run_model import RunModel
from ssr_train.models.backbones import create_backbone
from ssr_train.models.segmentor import build_shadow_segmentor
from ssr_train.training.config import TrainConfig

GOALS = {"onnx_over_predictor": 1.0, "predictor_overhead": 0.10}
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="mit_b0,mit_b5", help="comma list (default mit_b0,mit_b5)")
    p.add_argument("--size", default="1024x512", help="image WxH, also the training resize (default 1024x512)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, auto (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime")
    p.add_argument("--quick", action="store_true", help="mit_b0 only, 3 rounds")
    p.add_argument("--out", type=Path, default=None, help="keep the exported files here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.backbones, args.repeats = "mit_b0", 3
    return args


def run_model(backbone: str, resize: tuple[int, int]) -> RunModel:
    torch.manual_seed(SEED)
    model = build_shadow_segmentor(create_backbone(backbone)).eval()
    cfg = TrainConfig().replace("model", backbone=backbone)
    return RunModel(model=model, config=cfg, label_space=CITYSCAPES, resize=resize, path=Path(f"random-{backbone}"),
                    info={"backbone": backbone, "backbone_init": "random"})


def bench_backbone(args, folder: Path, backbone: str, device: torch.device, threads: int) -> dict[str, float]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    loaded = run_model(backbone, (width, height))
    t0 = time.perf_counter()
    ts_file = export_model(loaded, folder / f"{backbone}.pt", fmt="torchscript", size=(width, height))
    onnx_file = export_model(loaded, folder / f"{backbone}.onnx", fmt="onnx", size=(width, height))
    line(f"{backbone}_export_s", time.perf_counter() - t0, "TorchScript + ONNX export, not part of the timings")
    ts, onnx = ExportedModel(ts_file), ExportedModel(onnx_file, threads=threads)
    if device.type == "cuda":  # the traced module runs where it is loaded; onnxruntime stays on the CPU here
        module = torch.jit.load(str(ts_file), map_location=device)

        def run_ts(nchw: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(nchw).to(device)).cpu().numpy()
    else:
        run_ts = ts
    predictor = Predictor.from_run_model(loaded, device=device)
    model = predictor.model
    image = np.random.default_rng(SEED).integers(0, 256, (height, width, 3), dtype=np.uint8)
    nchw = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
    normalised = prepare(torch.from_numpy(nchw).to(device), (width, height))

    def forward() -> None:
        with torch.inference_mode(), predictor._autocast():
            model(normalised)
        sync(str(device))

    variants = {
        "forward": forward,
        "predictor": lambda: predictor.predict(image),
        "torchscript": lambda: run_ts(nchw),
        "onnx": lambda: onnx(nchw),
    }
    reference = predictor.predict(image)
    agree = {name: float((np.asarray(fn(nchw)).reshape(height, width) == reference).mean())
             for name, fn in (("torchscript", run_ts), ("onnx", onnx))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.warmup + args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            variants[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts_) for name, ts_ in times.items()}
    for name in names:
        line(f"{backbone}_{name}_img_s", 1 / med[name], f"median of {args.repeats}: {med[name] * 1000:.1f} ms")
    for name, value in agree.items():
        line(f"{backbone}_{name}_argmax_agreement", value, "against the Predictor")
    result = {f"{name}_img_s": 1 / med[name] for name in names}
    result["onnx_over_predictor"] = med["predictor"] / med["onnx"]
    result["predictor_overhead"] = med["predictor"] / med["forward"] - 1
    line(f"{backbone}_onnx_over_predictor", result["onnx_over_predictor"], f"goal >= {GOALS['onnx_over_predictor']}")
    line(f"{backbone}_predictor_overhead", result["predictor_overhead"], f"goal <= {GOALS['predictor_overhead']}")
    return result


def run(args: argparse.Namespace, folder: Path) -> None:
    device = resolve_device(args.device)
    threads = set_cpu_threads(args.threads)
    print("# " + runtime_line(device, precision="bf16" if device.type == "cuda" else "fp32", threads=threads,
                              torch=torch.__version__), flush=True)
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}; whole image {args.size}, batch 1, "
          f"{args.repeats} rounds after {args.warmup} warm-up", flush=True)
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backbone in args.backbones.split(","):
            rows[backbone] = bench_backbone(args, folder, backbone, device, threads)
    print("\n| backbone | forward img/s | Predictor img/s | TorchScript img/s | ONNX (onnxruntime) img/s "
          "| ONNX ÷ Predictor | Predictor overhead |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for backbone, r in rows.items():
        print(f"| {backbone} | {r['forward_img_s']:.3g} | {r['predictor_img_s']:.3g} | {r['torchscript_img_s']:.3g} "
              f"| {r['onnx_img_s']:.3g} | {r['onnx_over_predictor']:.2f} | {r['predictor_overhead'] * 100:+.1f} % |")
    met = [f"{b} {g}: {'met' if (r[g] >= v if g == 'onnx_over_predictor' else r[g] <= v) else 'NOT met'}"
           for b, r in rows.items() for g, v in GOALS.items()]
    print("# goals: " + "; ".join(met))


if __name__ == "__main__":
    args = parse_args()
    select_device(args.device)
    run_in_workdir(run, args, prefix="ssr_bench_predict_")
