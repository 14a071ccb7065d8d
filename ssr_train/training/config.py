"""Training configuration: one frozen dataclass per concern, loadable from TOML, saved with every run.

Defaults are the DAFormer/MIC/SSR reference values (docs/recipe.md lists each with its source).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.errors import SSRError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-5
    head_lr_mult: float = 10.0  # decode head (and SSR regulariser) learn 10x faster
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_norm_and_pos: bool = True  # DAFormer: decay_mult 0 for norms and position blocks
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    grad_clip: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "mit_b5"
    backbone_checkpoint: str | None = None
    num_classes: int = 19
    drop_path_rate: float = 0.1
    head_embed_dim: int = 256
    ssr: bool = True
    ssr_stages: tuple[int, ...] = (0, 1, 2, 3)
    ssr_key_level: int | None = None  # grid size of the stored SAM level K/V come from; None: finest
    # "cache": SAM features streamed from the stores (SAM never loaded). "online": the reference mode,
    # frozen SAM run in the loop on the exact (mixed, jittered) images — for fidelity/speed comparisons.
    sam_source: str = "cache"
    sam_encoder: str = "vit_b"
    sam_checkpoint: str | None = None
    sam_seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    source_cache: str | None = None
    target_cache: str | None = None
    batch_size: int = 2
    workers: int = 2
    flip: bool = False  # views were already flipped at cache time
    photometric: bool = False  # mmseg PhotoMetricDistortion on source views (not in the DAFormer recipe)


@dataclass(frozen=True)
class UDAConfig:
    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    pseudo_ignore_top: int = 15
    pseudo_ignore_bottom: int = 120
    color_jitter_strength: float = 0.2
    color_jitter_prob: float = 0.2
    blur: bool = True
    fd_lambda: float = 0.005
    fd_classes: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    fd_scale_min_ratio: float = 0.75
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    mic_block_size: int = 32
    mic_mask_ratio: float = 0.7
    mic_lambda: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    method: str = "source-only"
    iters: int = 40000
    seed: int = 0
    out: str = "runs/ssr"
    device: str = "cpu"
    amp: str | None = None  # "bf16" | "fp16" on CUDA; None: bf16 on CUDA, fp32 on CPU
    log_every: int = 50
    checkpoint_every: int = 4000
    val_every: int | None = None
    val_data_root: str | None = None
    deterministic: bool = True


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    uda: UDAConfig = field(default_factory=UDAConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, section: str, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def _coerce(cls, section: str, values: dict) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SSRError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; known: {', '.join(known)}")
    out = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}  # TOML arrays
    return cls(**out)


def config_from_dict(data: dict) -> TrainConfig:
    sections = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise SSRError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(sections)}")
    classes = {"run": RunConfig, "model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "uda": UDAConfig}
    return TrainConfig(**{name: _coerce(classes[name], name, data.get(name, {})) for name in classes})


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise SSRError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SSRError(f"cannot parse config {path}: {exc}") from None
    return config_from_dict(data)


def _toml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return list(value)
    return value


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as TOML (None values are omitted: they mean 'the default')."""
    import tomli_w

    write_text_atomic(path, tomli_w.dumps(_toml_ready(cfg.to_dict())))
