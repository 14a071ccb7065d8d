"""Synthetic-data comparison: source-only vs DAFormer vs MIC, each with and without SSR, on the target
(Cityscapes-like) val split — the demo pipeline with more runs, over one or more seeds. Prints markdown
tables: one row per run and seed, then the mean ± sample standard deviation over the seeds.

    python benchmarks/uda_table.py --out /tmp/uda-table                         # demo scale, seed 0
    python benchmarks/uda_table.py --out /tmp/uda-table --quick --seeds 0,1,2   # demo --quick scale, 3 seeds

Each seed synthesises its own data, builds its own caches and initialises its own models, so the spread
covers data, cache views and initialisation. SAM is a random-init vit_tiny here (no checkpoint offline), so
"SSR" regularises towards random features: the table measures the pipeline honestly, not the paper's claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from rich.console import Console

from ssr_train.demo import DemoConfig, DemoRow, run_demo

RUNS = (
    ("source-only", "source-only", False),
    ("source-only+ssr", "source-only", True),
    ("daformer", "daformer", False),
    ("daformer+ssr", "daformer", True),
    ("mic", "mic", False),
    ("mic+ssr", "mic", True),
)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct integers, got {text!r}")
    return seeds


def mean_std(values: list[float]) -> str:
    """'m ± s' with the sample standard deviation; just 'm' for one value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    parser.add_argument("--runs", default=",".join(r[0] for r in RUNS),
                        help="comma-separated subset of: " + ", ".join(r[0] for r in RUNS))
    args = parser.parse_args()
    wanted = args.runs.split(",")
    unknown = sorted(set(wanted) - {r[0] for r in RUNS})
    if unknown:
        parser.error(f"unknown run(s): {', '.join(unknown)}")
    runs = tuple(r for r in RUNS if r[0] in wanted)
    console = Console()
    per_seed: dict[int, list[DemoRow]] = {}
    for seed in args.seeds:
        cfg = dataclasses.replace(DemoConfig.for_mode(args.out / f"seed-{seed}", quick=args.quick, seed=seed),
                                  runs=runs)
        per_seed[seed] = run_demo(cfg, console=console)
    (args.out / "uda_table.json").write_text(json.dumps(
        {str(s): [dataclasses.asdict(r) for r in rows] for s, rows in per_seed.items()}, indent=2))

    print(f"\n{cfg.train_images} train images/domain, {cfg.val_images} val, {cfg.size[0]}x{cfg.size[1]}, "
          f"crop {cfg.crop[0]}, {cfg.iters_source_only} source-only / {cfg.iters_uda} UDA iterations, "
          f"batch {cfg.batch_size}, {cfg.backbone}, seeds {','.join(map(str, args.seeds))}\n")
    print("| run | seed | source val mIoU | target val mIoU | train time |")
    print("|---|---:|---:|---:|---:|")
    for seed, rows in per_seed.items():
        for r in rows:
            print(f"| {r.name} | {seed} | {r.source_val_miou:.1f} | {r.target_val_miou:.1f} | {r.seconds:.0f} s |")
    print("\n| run | source val mIoU | target val mIoU | target − source-only (same seed) |")
    print("|---|---:|---:|---:|")
    base = {seed: {r.name: r for r in rows}.get("source-only") for seed, rows in per_seed.items()}
    for i, (name, _, _) in enumerate(runs):
        src = [per_seed[s][i].source_val_miou for s in args.seeds]
        tgt = [per_seed[s][i].target_val_miou for s in args.seeds]
        gain = ("—" if name == "source-only" or any(b is None for b in base.values())
                else mean_std([per_seed[s][i].target_val_miou - base[s].target_val_miou for s in args.seeds]))
        print(f"| {name} | {mean_std(src)} | {mean_std(tgt)} | {gain} |")


if __name__ == "__main__":
    main()
