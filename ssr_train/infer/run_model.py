"""The shadow branch of a training run, ready for inference: weights, config, label space, resize.

A run folder holds ``model.pth`` (the shadow branch's state dict + config, written at every checkpoint),
``latest.pth`` (the full training state) and, when training validated periodically, ``best.pth``. Each of
them — or a model file given directly — loads into a segmentor without the SSR regulariser; the label
space and the training resize come with it, so nothing downstream assumes Cityscapes' 19 classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from ssr_cache.data.label_space import CITYSCAPES, LabelSpace
from ssr_cache.errors import SSRError
from ssr_cache.store.feature_store import FeatureStore
from ssr_train.models.backbones import create_backbone
from ssr_train.models.segmentor import SHADOW_PREFIXES, build_shadow_segmentor
from ssr_train.training.checkpoint import load_checkpoint, non_finite_tensors
from ssr_train.training.config import TrainConfig, config_from_dict, load_config

CHECKPOINTS = {"model": "model.pth", "best": "best.pth", "latest": "latest.pth"}
DEFAULT_RESIZE = (1024, 512)  # Cityscapes' training size, for runs whose caches cannot be opened
_METHOD_MODEL_PREFIX = "model."  # latest.pth: the method's state holds the student under model.*


@dataclass(frozen=True, eq=False)
class RunModel:
    """A loaded shadow branch (eval mode, CPU) and what inference needs to know about it."""

    model: nn.Module
    config: TrainConfig
    label_space: LabelSpace
    resize: tuple[int, int]  # (W, H) keep-ratio training size
    path: Path  # the file the weights came from
    info: dict = field(default_factory=dict)  # backbone init, SAM random init, iteration …


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _model_path(path: Path, checkpoint: str) -> Path:
    if checkpoint not in CHECKPOINTS:
        raise SSRError(f"unknown checkpoint {checkpoint!r}; choose one of: {', '.join(CHECKPOINTS)}")
    if path.is_dir():
        file = path / CHECKPOINTS[checkpoint]
        if not file.is_file():
            hint = {"best": " (best.pth is written only when training validates periodically)",
                    "model": ": not a training run folder, or training never saved"}.get(checkpoint, "")
            raise SSRError(f"{path} holds no {CHECKPOINTS[checkpoint]}{hint}")
        return file
    if path.is_file():
        return path
    raise SSRError(f"{path} does not exist (expected a run folder or a model file)")


def _shadow_state(obj: object, file: Path) -> tuple[dict, dict | None, dict]:
    """(shadow-branch state dict, config dict or None, the file's other entries)."""
    if isinstance(obj, dict) and isinstance(obj.get("method"), dict):  # a full training checkpoint
        state = {k[len(_METHOD_MODEL_PREFIX):]: v for k, v in obj["method"].items()
                 if isinstance(k, str) and k.startswith(_METHOD_MODEL_PREFIX)}
        return state, obj.get("config"), obj
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj["state_dict"], obj.get("config"), obj
    return obj, None, {}


def _check_finite(state: dict, file: Path) -> None:
    bad = non_finite_tensors(state)
    if bad:
        raise SSRError(f"{file} holds non-finite values (NaN or inf) in {bad[0]}: the model is unusable")


def _summarise(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _stores(cfg: TrainConfig) -> dict[str, FeatureStore]:
    """The run's caches that can still be opened ({} when they moved: the model file then must say)."""
    stores = {}
    for role, url in (("source", cfg.data.source_cache), ("target", cfg.data.target_cache)):
        if url:
            try:
                stores[role] = FeatureStore.open(url, mode="r")
            except SSRError:
                pass
    return stores


def _classifier_rows(state: dict) -> int:
    rows = [v.shape[0] for k, v in state.items() if k.endswith("classifier.weight")]
    return int(rows[0]) if rows else CITYSCAPES.num_classes


def run_label_space(cfg: TrainConfig, entries: dict, stores: dict) -> LabelSpace:
    """The run's classes: recorded in the model file, else the source cache's, else Cityscapes' 19."""
    if isinstance(entries.get("label_space"), dict):
        return LabelSpace.from_dict(entries["label_space"])
    for store in stores.values():
        if store.label_space.num_classes == cfg.model.num_classes:
            return store.label_space
    if cfg.model.num_classes == CITYSCAPES.num_classes:
        return CITYSCAPES
    n = cfg.model.num_classes
    return LabelSpace(name=f"{n}-classes", class_names=tuple(f"class_{i}" for i in range(n)),
                      palette=tuple(((37 * i) % 256, (91 * i) % 256, (173 * i) % 256) for i in range(n)))


def run_resize(entries: dict, stores: dict) -> tuple[int, int]:
    """The (W, H) the run's target (else source) images were rescaled to before cropping."""
    if entries.get("resize"):
        width, height = entries["resize"]
        return int(width), int(height)
    store = stores.get("target") or stores.get("source")
    return store.resize if store is not None else DEFAULT_RESIZE


def run_info(cfg: TrainConfig, entries: dict, stores: dict) -> dict:
    """What an evaluation records about the model: backbone initialisation, SAM random init, iteration,
    the source dataset; the target cache's data root (the default evaluation data)."""
    info = {"backbone": cfg.model.backbone,
            "backbone_init": cfg.model.backbone_checkpoint or "random",
            "ssr": bool(cfg.model.ssr),
            "sam_random_init": bool(cfg.model.ssr and not cfg.model.sam_checkpoint),
            "method": cfg.run.method, "seed": cfg.run.seed}
    if "source" in stores:
        info["source_dataset"] = stores["source"].dataset
    if "target" in stores and stores["target"].data_root is not None:
        info["target_data_root"] = str(stores["target"].data_root)
    if isinstance(entries.get("metadata"), dict):  # what training recorded wins over what is inferred here
        info.update(entries["metadata"])
    if "iteration" in entries:
        info["iteration"] = int(entries["iteration"])
    return info


def load_run_model(path: str | os.PathLike, checkpoint: str = "model") -> RunModel:
    """The shadow branch of a run folder (``checkpoint``: model, best or latest) or of a model file.

    The config comes from the file, else from ``config.toml`` beside it. Regulariser weights
    (``regularizer.*``) are dropped; a corrupt file, a non-finite weight or weights of another
    architecture are one line (SSRError).
    """
    file = _model_path(Path(path), checkpoint)
    # only the shadow branch is used, so only it is checked for NaN/Inf (_check_finite below)
    obj = load_checkpoint(file, what="model file", check_finite=False)
    state, config_dict, entries = _shadow_state(obj, file)
    if not _is_state_dict(state):
        raise SSRError(f"{file} is not a model file (expected {{'state_dict': ...}}, a training checkpoint "
                       "or a state dict)")
    config_path = file.parent / "config.toml"
    if config_dict is not None:
        if not isinstance(config_dict, dict):
            raise SSRError(f"{file}: its 'config' entry is not a config table")
        cfg = config_from_dict(config_dict)
    elif config_path.is_file():
        cfg = load_config(config_path)
    else:
        raise SSRError(f"{file} carries no config and there is no {config_path} beside it")
    state = {k: v for k, v in state.items() if k.startswith(SHADOW_PREFIXES)}
    _check_finite(state, file)
    if cfg.model.num_classes is None:  # a config saved unresolved: the classifier's rows are the classes
        cfg = cfg.replace("model", num_classes=_classifier_rows(state))
    backbone = create_backbone(cfg.model.backbone, drop_path_rate=0.0)
    model = build_shadow_segmentor(backbone, num_classes=cfg.model.num_classes, embed_dim=cfg.model.head_embed_dim)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [f"{label}: {_summarise(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise SSRError(f"{file} does not fit a {cfg.model.backbone} segmentor with "
                       f"{cfg.model.num_classes} classes ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)
    stores = _stores(cfg)
    label_space = run_label_space(cfg, entries, stores)
    if label_space.num_classes != cfg.model.num_classes:
        raise SSRError(f"{file}: label space {label_space.name} has {label_space.num_classes} classes, "
                       f"the model {cfg.model.num_classes}")
    return RunModel(model.eval(), cfg, label_space, run_resize(entries, stores), file, run_info(cfg, entries, stores))
