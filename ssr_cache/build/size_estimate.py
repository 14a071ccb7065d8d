"""`ssr cache build --dry-run`: how many views, bytes per view per array, projected store size."""

from __future__ import annotations

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import open_build_dataset
from ssr_cache.sam_encoder import get_encoder_config
from ssr_cache.store.feature_levels import check_levels, level_name

# Stored/raw ratios used only to project sizes before anything is built. Features: measured in
# docs/benchmarks.md (fp16 0.379 of fp32 = 0.76 of raw fp16; int8 0.240 of fp32 = 0.96 of raw codes).
# Pixels, labels, counts: estimates for photographs / label maps (not measured on real data yet).
PROJECTED_RATIO = {"pixels": 0.70, "labels": 0.05, "class_counts": 0.30, "float16": 0.76, "int8": 0.96}


def feature_bytes_per_view(channels: int, grid: int, dtype: str) -> int:
    if dtype == "int8":
        return channels * grid * grid + 2 * channels * 4  # codes + per-channel scale and offset (fp32)
    return channels * grid * grid * 2


def describe_plan(cfg: CacheBuildConfig) -> dict:
    enc = get_encoder_config(cfg.sam)
    levels = check_levels(cfg.levels, enc.grid)
    ds, _ = open_build_dataset(cfg)
    n_images = len(ds) if cfg.max_images is None else min(cfg.max_images, len(ds))
    n_views = n_images * cfg.views_per_image
    h, w = cfg.crop
    arrays = [
        ("pixels", h * w * 3, PROJECTED_RATIO["pixels"]),
        ("labels", h * w, PROJECTED_RATIO["labels"]),
        ("class_counts", ds.label_space.num_classes * 4, PROJECTED_RATIO["class_counts"]),
    ]
    for g in levels:
        arrays.append((f"features/{level_name(g)}", feature_bytes_per_view(enc.out_chans, g, cfg.feature_dtype),
                       PROJECTED_RATIO[cfg.feature_dtype]))
    rows = [{"name": name, "bytes_per_view": b, "projected_bytes": b * n_views * r} for name, b, r in arrays]
    return {
        "n_images": n_images, "views_per_image": cfg.views_per_image, "n_views": n_views,
        "n_shards": -(-n_views // cfg.views_per_shard), "views_per_shard": cfg.views_per_shard,
        "encoder": cfg.sam, "input_size": enc.img_size, "levels": list(levels), "feature_dtype": cfg.feature_dtype,
        "arrays": rows,
        "uncompressed_bytes": sum(r["bytes_per_view"] for r in rows) * n_views,
        "projected_bytes": sum(r["projected_bytes"] for r in rows),
    }
