"""Synthetic-data comparison: source-only vs DAFormer vs MIC, each with and without SSR, on the target
(Cityscapes-like) val split — the demo pipeline with more runs. Prints a markdown table.

    python benchmarks/uda_table.py --out /tmp/uda-table            # demo scale (≈ 30 min on 2 CPU cores)
    python benchmarks/uda_table.py --out /tmp/uda-table --quick    # demo --quick scale

SAM is a random-init vit_tiny here (no checkpoint offline), so "SSR" regularises towards random
features: the table measures the pipeline honestly, not the paper's claim.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console

from ssr_train.demo import DemoConfig, run_demo

RUNS = (
    ("source-only", "source-only", False),
    ("source-only+ssr", "source-only", True),
    ("daformer", "daformer", False),
    ("daformer+ssr", "daformer", True),
    ("mic", "mic", False),
    ("mic+ssr", "mic", True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(r[0] for r in RUNS),
                        help="comma-separated subset of: " + ", ".join(r[0] for r in RUNS))
    args = parser.parse_args()
    wanted = args.runs.split(",")
    unknown = sorted(set(wanted) - {r[0] for r in RUNS})
    if unknown:
        parser.error(f"unknown run(s): {', '.join(unknown)}")
    runs = tuple(r for r in RUNS if r[0] in wanted)
    cfg = dataclasses.replace(DemoConfig.for_mode(args.out, quick=args.quick, seed=args.seed), runs=runs)
    rows = run_demo(cfg, console=Console())
    print(f"\n{cfg.train_images} train images/domain, {cfg.val_images} val, {cfg.size[0]}x{cfg.size[1]}, "
          f"crop {cfg.crop[0]}, {cfg.iters_source_only} source-only / {cfg.iters_uda} UDA iterations, "
          f"batch {cfg.batch_size}, {cfg.backbone}, seed {cfg.seed}\n")
    print("| run | source val mIoU | target val mIoU | train time |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r.name} | {r.source_val_miou:.1f} | {r.target_val_miou:.1f} | {r.seconds:.0f} s |")


if __name__ == "__main__":
    main()
