"""Training configuration: one frozen dataclass per concern, validated whatever its source, saved with
every run.

Defaults are the DAFormer/MIC/SSR reference values (docs/recipe.md lists each with its source); each lives
once, in a `setting(...)` below (or in the method's own config: `[daformer]`, `[mic]`), together with its
help text and its allowed range. Values arrive from three places — these defaults, a TOML file, CLI flags
and `--set section.key=value` — and every one of them passes `validated(...)`, which names `section.key`
and the bad value in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.errors import SSRError
from ssr_train.methods import METHODS, method_config_sections
from ssr_train.training.settings import setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _device_spec(value: str) -> str | None:
    head, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return None
    return "use auto, cpu, cuda or cuda:N"


@dataclass(frozen=True)
class RunConfig:
    method: str = setting("source-only", "UDA method: " + ", ".join(METHODS) + ".", choices=tuple(METHODS))
    iters: int = setting(40000, "Training iterations (reference 40000).", gt=0)
    seed: int = setting(0, "Random seed.", min=0)
    out: str = setting("runs/ssr", "Run folder.")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:N.", check=_device_spec)
    threads: int | None = setting(None, "CPU intra-op threads (default: all cores but one, or "
                                  "$OMP_NUM_THREADS).", min=1)
    amp: str | None = setting(None, "bf16, fp16 (with a dynamic loss scale) or fp32 on CUDA (default bf16); "
                              "the CPU runs fp32.",
                              choices=("bf16", "fp16", "fp32"))
    log_every: int = setting(50, "Iterations between metric lines.", gt=0)
    checkpoint_every: int = setting(4000, "Iterations between checkpoints.", gt=0)
    val_every: int | None = setting(None, "Iterations between target-val evaluations (best.pth kept).", gt=0)
    val_data_root: str | None = setting(None, "Target dataset root for --val-every (default: the one the "
                                        "target cache was built from).")
    deterministic: bool = setting(True, "torch deterministic algorithms (warn only).")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = setting("mit_b5", "mit_b0…mit_b5 or a timm features_only model with 4 stages.")
    backbone_checkpoint: str | None = setting(
        None, "ImageNet weights (SegFormer mit_b*.pth; the reference starts mit_b5 from them) or 'none' "
        "for random initialisation. Required.")
    num_classes: int | None = setting(None, "Classes; default: the caches' label space (must agree).", gt=0)
    drop_path_rate: float = setting(0.1, "Stochastic depth of the backbone.", min=0.0, lt=1.0)
    head_embed_dim: int = setting(256, "DAFormer head embedding width.", gt=0)
    ssr: bool = setting(True, "SAM cross-attention regulariser.")
    ssr_stages: tuple[int, ...] = setting((0, 1, 2, 3), "Backbone stages regularised, e.g. 0,1,2,3.",
                                          min=0, max=3, unique=True, nonempty=True)
    ssr_key_level: int | None = setting(None, "Stored SAM level (grid size) keys/values come from; "
                                        "default: the finest.", gt=0)
    # "cache": SAM features streamed from the stores (SAM never loaded). "online": the reference mode,
    # frozen SAM run in the loop on the exact (mixed, jittered) images — for fidelity/speed comparisons.
    sam_source: str = setting("cache", "cache (SAM never loaded) or online (the reference: SAM in the loop).",
                              choices=("cache", "online"))
    sam_encoder: str = setting("vit_b", "SAM encoder for --sam-source online.")
    sam_checkpoint: str | None = setting(None, "SAM checkpoint for --sam-source online.")
    sam_seed: int = setting(0, "Seed of a randomly initialised online SAM (no checkpoint).", min=0)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = setting(6e-5, "Backbone learning rate (reference 6e-5; head x head_lr_mult).", gt=0.0)
    head_lr_mult: float = setting(10.0, "Decode-head learning-rate multiplier.", gt=0.0)
    weight_decay: float = setting(0.01, "AdamW weight decay.", min=0.0)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas.", min=0.0, lt=1.0)
    no_decay_norm_and_pos: bool = setting(True, "DAFormer: decay_mult 0 for norms and position blocks.")
    warmup_iters: int = setting(1500, "Linear warmup iterations (reference 1500).", min=0)
    warmup_ratio: float = setting(1e-6, "Warmup starts at lr x warmup_ratio.", min=0.0, max=1.0)
    power: float = setting(1.0, "Poly schedule power.", min=0.0)
    min_lr: float = setting(0.0, "Poly schedule floor.", min=0.0)
    grad_clip: float | None = setting(None, "Clip the gradient norm (default: no clipping).", gt=0.0)


@dataclass(frozen=True)
class DataConfig:
    source_cache: str | None = setting(None, "Labelled source feature store (required).")
    target_cache: str | None = setting(None, "Target feature store (UDA methods).")
    batch_size: int = setting(2, "Views per batch per process (reference 2).", gt=0)
    workers: int = setting(2, "DataLoader workers per stream.", min=0)
    flip: bool = setting(False, "Random horizontal flip (views were already flipped at cache time).")
    photometric: bool = setting(False, "mmseg PhotoMetricDistortion on source views (not in the recipe).")


# The sections every run has; the methods add their own ([daformer], [mic], …) from the registry.
CORE_SECTIONS = {"run": RunConfig, "model": ModelConfig, "optim": OptimConfig, "data": DataConfig}


def _default_method_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in method_config_sections().items()}


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    methods: Mapping[str, Any] = field(default_factory=_default_method_sections)  # section -> method config

    def section(self, name: str) -> Any:
        if name in CORE_SECTIONS:
            return getattr(self, name)
        if name in self.methods:
            return self.methods[name]
        raise SSRError(f"unknown config section [{name}]; known: {', '.join(section_classes())}")

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in CORE_SECTIONS}
        return out | {name: dataclasses.asdict(cfg) for name, cfg in self.methods.items()}

    def replace(self, section: str, **changes: Any) -> TrainConfig:
        """A copy with `section.key` values changed; each new value is validated."""
        cls = section_classes().get(section)
        if cls is None:
            raise SSRError(f"unknown config section [{section}]; known: {', '.join(section_classes())}")
        values = dataclasses.asdict(self.section(section)) | changes
        updated = _build_section(cls, section, values)
        if section in CORE_SECTIONS:
            return dataclasses.replace(self, **{section: updated})
        return dataclasses.replace(self, methods={**self.methods, section: updated})


def section_classes() -> dict[str, type]:
    return {**CORE_SECTIONS, **method_config_sections()}


# ---------------------------------------------------------------- validation


def _describe(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp` (the field's annotation) or a one-line SSRError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SSRError(f"{where} = {_describe(value)}: expected a list")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise SSRError(f"{where} = {_describe(value)}: expected {len(items)} values")
        return tuple(_convert(v, t, where) for v, t in zip(value, items, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise SSRError(f"{where} = {_describe(value)}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SSRError(f"{where} = {_describe(value)}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SSRError(f"{where} = {_describe(value)}: expected a number")
        if not math.isfinite(value):
            raise SSRError(f"{where} = {_describe(value)}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SSRError(f"{where} = {_describe(value)}: expected a string")
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")  # a programming error, not a user's


def _check_range(value: Any, meta: Mapping, where: str, given: Any) -> None:
    """`value` (converted) against the field's range; messages show the value as `given`."""
    items = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple):
        if meta.get("nonempty") and not value:
            raise SSRError(f"{where} = {_describe(given)}: needs at least one value")
        if meta.get("unique") and len(set(value)) != len(value):
            raise SSRError(f"{where} = {_describe(given)}: values repeat")
    for v in items:
        bad = None
        if "choices" in meta and v not in meta["choices"]:
            bad = f"choose one of {', '.join(map(str, meta['choices']))}"
        elif "min" in meta and v < meta["min"]:
            bad = f"must be >= {meta['min']}"
        elif "gt" in meta and v <= meta["gt"]:
            bad = f"must be > {meta['gt']}"
        elif "max" in meta and v > meta["max"]:
            bad = f"must be <= {meta['max']}"
        elif "lt" in meta and v >= meta["lt"]:
            bad = f"must be < {meta['lt']}"
        elif "check" in meta:
            bad = meta["check"](v)
        if bad:
            raise SSRError(f"{where} = {_describe(given)}: {bad}")


def _build_section(cls: type, section: str, values: Mapping) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SSRError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        where = f"{section}.{name}"
        checked[name] = _convert(value, hints[name], where)
        if checked[name] is not None:
            _check_range(checked[name], known[name].metadata, where, value)
    return cls(**checked)


def config_from_dict(data: Mapping) -> TrainConfig:
    """A validated TrainConfig from nested {section: {key: value}} (TOML/JSON shape); missing keys keep
    their defaults. Configs saved before the method sections existed ([uda]) are translated."""
    data = _translate_legacy(dict(data))
    classes = section_classes()
    unknown = sorted(set(data) - set(classes))
    if unknown:
        raise SSRError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(classes)}")
    for name, values in data.items():
        if not isinstance(values, Mapping):
            raise SSRError(f"config section [{name}] must be a table of key = value lines")
    built = {name: _build_section(cls, name, data.get(name, {})) for name, cls in classes.items()}
    return TrainConfig(**{name: built[name] for name in CORE_SECTIONS},
                       methods={name: built[name] for name in method_config_sections()})


# Runs saved before each method owned its config held one [uda] section (and FD classes as train ids).
_LEGACY_MIC_KEYS = {"mic_block_size": "block_size", "mic_mask_ratio": "mask_ratio", "mic_lambda": "loss_weight"}


def _translate_legacy(data: dict) -> dict:
    uda = data.pop("uda", None)
    if uda is None:
        return data
    daformer, mic = dict(data.get("daformer", {})), dict(data.get("mic", {}))
    for key, value in dict(uda).items():
        if key in _LEGACY_MIC_KEYS:
            mic[_LEGACY_MIC_KEYS[key]] = value
        elif key == "fd_classes" and all(isinstance(v, int) for v in value):
            daformer[key] = [CITYSCAPES.class_names[v] for v in value if 0 <= v < CITYSCAPES.num_classes]
        else:
            daformer[key] = value
    return data | {"daformer": daformer, "mic": mic}


# ---------------------------------------------------------------- sources: files, --set, saving


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise SSRError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SSRError(f"cannot parse config {path}: {exc}".splitlines()[0]) from None
    return config_from_dict(data)


def parse_set(assignment: str) -> tuple[str, str, Any]:
    """'optim.lr=1e-4' -> ('optim', 'lr', 1e-4). The value is read as a TOML value (numbers, true/false,
    [lists], "strings"); anything that is not one is taken as a bare string (mit_b0, bf16)."""
    key, sep, text = assignment.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise SSRError(f"--set {assignment!r}: expected section.key=value, e.g. optim.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, name.strip(), value


def apply_overrides(cfg: TrainConfig, overrides: list[tuple[str, str, Any]]) -> TrainConfig:
    for section, key, value in overrides:
        cfg = cfg.replace(section, **{key: value})
    return cfg


def _toml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return list(value)
    return value


def config_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML (None values are omitted: they mean 'the default')."""
    return tomli_w.dumps(_toml_ready(cfg.to_dict()))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    write_text_atomic(path, config_toml(cfg), what="the run config")


def setting_help(section: str, key: str) -> str:
    """A flag's help: the setting's description and its default (shown by `ssr train --help`)."""
    f = {f.name: f for f in fields(section_classes()[section])}[key]
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{f.metadata.get('help', '')} ({section}.{key}, default {shown})"


# ---------------------------------------------------------------- resolution: defaults < file < flags < --set

_PATH_KEYS = (("data", "source_cache"), ("data", "target_cache"), ("run", "val_data_root"),
              ("model", "backbone_checkpoint"), ("model", "sam_checkpoint"))


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so a run folder works from any working directory (`ssr eval --run`)."""
    for section, key in _PATH_KEYS:
        value = getattr(cfg.section(section), key)
        if value and value != "none" and "://" not in value:
            cfg = cfg.replace(section, **{key: str(Path(value).expanduser().absolute())})
    return cfg


def _file_overrides(path: Path) -> list[tuple[str, str, Any]]:
    data = _translate_legacy(dict(tomllib.loads(path.read_text()))) if path.is_file() else None
    if data is None:
        raise SSRError(f"config file {path} does not exist")
    return [(section, key, value) for section, values in data.items() for key, value in values.items()]


def resolve_config(*, base: TrainConfig | None = None, config_file: str | Path | None = None,
                   flags: Mapping[str, Any] | None = None, sets: list[str] = ()) -> TrainConfig:
    """`base` (default: the reference defaults), then the keys of `config_file`, then `flags`
    ({"optim.lr": 1e-4}; None = not given), then `--set section.key=value` strings; paths made absolute."""
    cfg = base or TrainConfig()
    overrides: list[tuple[str, str, Any]] = []
    if config_file is not None:
        load_config(config_file)  # validates the whole file (and parses it) before its keys are applied
        overrides += _file_overrides(Path(config_file))
    overrides += [(*key.split(".", 1), value) for key, value in (flags or {}).items() if value is not None]
    overrides += [parse_set(text) for text in sets]
    return _absolute(apply_overrides(cfg, overrides))
