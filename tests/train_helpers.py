"""Tiny synthetic caches for the trainer tests (vit_tiny, 64x64 crops), built once per session."""

from __future__ import annotations

import json
from pathlib import Path

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import build_cache


def build_tiny_caches(synth_root: Path, out_dir: Path) -> tuple[Path, Path]:
    common = dict(sam="vit_tiny", crop=(64, 64), resize=(128, 64), views_per_image=2, views_per_shard=4,
                  batch_size=4, workers=0)
    src = out_dir / "src.zarr"
    tgt = out_dir / "tgt.zarr"
    build_cache(CacheBuildConfig(dataset="gta5", data_root=synth_root / "gta5", out=str(src), **common),
                progress=False)
    build_cache(CacheBuildConfig(dataset="cityscapes", data_root=synth_root / "cityscapes", out=str(tgt),
                                 **common), progress=False)
    return src, tgt


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tiny_train_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--source-cache", str(src), "--backbone", "mit_b0", "--out", str(out), "--workers", "0",
            "--warmup-iters", "0", "--lr", "3e-4", "--log-every", "1", "--backbone-checkpoint", "none",
            "--device", "cpu", *extra]
