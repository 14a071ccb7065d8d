"""`ssr cache verify --deep`: re-create a sample of views from the dataset, re-encode them, compare."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ssr_cache.build.config import autocast_dtype
from ssr_cache.build.view_plan import ViewTable, apply_view
from ssr_cache.data.datasets import open_dataset
from ssr_cache.errors import SSRError
from ssr_cache.runtime import resolve_device, runtime_line
from ssr_cache.sam_encoder import build_sam_encoder
from ssr_cache.store.feature_store import FeatureStore

# fp16 storage: relative error per element ≤ 2^-11; allow for encoder nondeterminism across batch shapes.
# A store built under bf16/fp16 autocast is compared with its precision's rounding on top (bf16: 8 bits).
RTOL = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 5e-2}
FP16_RTOL = RTOL["fp32"]
INT8_MIN_COSINE = 0.999


def deep_precision(store_precision: str, device: torch.device) -> str:
    """The precision --deep re-encodes in: the store's on CUDA; fp32 elsewhere (reduced precision is CUDA-only)."""
    return store_precision if device.type == "cuda" and store_precision in RTOL else "fp32"


def deep_runtime_line(url: str, device: str = "auto") -> str:
    """The first line of `ssr cache verify --deep`: where and in what precision SAM re-encodes."""
    dev = resolve_device(device)
    return runtime_line(dev, precision=deep_precision(FeatureStore.open(url).precision, dev),
                        threads=torch.get_num_threads())


def make_deep_check(*, n_views: int = 4, data_root: Path | None = None, sam_checkpoint: Path | None = None,
                    seed: int = 0, device: str = "auto") -> Callable:
    def check(store, candidates: list[int]) -> list[str]:
        return deep_check(store, candidates, n_views=n_views, data_root=data_root,
                          sam_checkpoint=sam_checkpoint, seed=seed, device=device)

    return check


def deep_check(store, candidates: list[int], *, n_views: int, data_root: Path | None,
               sam_checkpoint: Path | None, seed: int = 0, device: str = "auto") -> list[str]:
    """Re-create `n_views` of `candidates` from the dataset, re-encode them in the precision the store was
    built in (on `device`), and list every difference beyond storage rounding."""
    cfg = store.attrs.get("build_config")
    if not cfg:
        raise SSRError(f"{store.url} records no build configuration; --deep cannot re-create its views")
    fp = store.fingerprint
    root = Path(data_root or cfg["data_root"])
    ckpt = sam_checkpoint or cfg.get("sam_checkpoint")
    ds = open_dataset(cfg["dataset"], root, split=cfg["split"], require_labels=False,
                      conditions=cfg.get("conditions"))
    if ds.file_list_hash() != fp["file_list_sha256"]:
        raise SSRError(f"dataset at {root} is not the one {store.url} was built from (file list differs)")
    dev = resolve_device(device)
    precision = deep_precision(fp.get("precision", "fp32"), dev)
    encoder = build_sam_encoder(cfg["sam"], ckpt, seed=cfg["sam_seed"], device=dev)
    if encoder.fingerprint() != fp["encoder"]:
        raise SSRError("the encoder for --deep differs from the one the store was built with "
                       "(checkpoint or seed); pass the original --sam-checkpoint")
    plan = ViewTable.from_arrays(store.view_arrays())
    labelled = store.labelled
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(candidates, size=min(n_views, len(candidates)), replace=False).tolist())
    problems = []
    for v in chosen:
        image, label = ds.load(int(plan.sample_index[v]))
        crop, label_crop = apply_view(image, label if labelled else None, plan.row(v))
        stored = store.read_view(v)
        if not np.array_equal(stored["pixels"], crop):
            problems.append(f"view {v}: stored pixels differ from the re-created crop")
        if labelled and not np.array_equal(stored["label"], label_crop):
            problems.append(f"view {v}: stored label differs from the re-created label crop")
        fresh = encoder.encode(torch.from_numpy(crop[None]), levels=tuple(fp["levels"]),
                               autocast_dtype=autocast_dtype(precision))
        for name, arr in stored["features"].items():
            if name not in fresh:
                continue
            ref = fresh[name][0].float().cpu().numpy()
            problems += compare_features(v, name, arr, ref, fp["feature_dtype"],
                                         rtol=RTOL[fp.get("precision", "fp32")])
    return problems


def compare_features(view: int, name: str, stored: np.ndarray, ref: np.ndarray, dtype: str,
                     rtol: float = FP16_RTOL) -> list[str]:
    if dtype == "int8":
        cos = float((stored * ref).sum() / (np.linalg.norm(stored) * np.linalg.norm(ref) + 1e-12))
        return [] if cos >= INT8_MIN_COSINE else [f"view {view} {name}: cosine {cos:.5f} < {INT8_MIN_COSINE}"]
    err = np.abs(stored - ref).max() / (np.abs(ref).max() + 1e-12)
    return [] if err <= rtol else [f"view {view} {name}: max relative error {err:.2e} > {rtol}"]
