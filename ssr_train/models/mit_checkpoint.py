"""Load SegFormer/DAFormer ImageNet `mit_b*.pth` checkpoints into the timm-built MiT backbone.

timm's FeatureListNet (features_only) flattens `stages.N` into `stages_N`, so the names map as:

mmseg name                          timm `features_only` name
patch_embed1.{proj,norm}.*          patch_embed.{proj,norm}.*
patch_embed{2,3,4}.{proj,norm}.*    stages_{1,2,3}.downsample.{proj,norm}.*
block{n}.{i}.<rest>                 stages_{n-1}.blocks.{i}.<rest>  (attn.q / attn.kv are split the same way)
block{n}.{i}.mlp.dwconv.dwconv.*    stages_{n-1}.blocks.{i}.mlp.dwconv.*
norm{n}.*                           stages_{n-1}.norm.*
head.*                              dropped (ImageNet classifier)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ssr_cache.errors import SSRError
from ssr_train.models.mit_variants import MIT_VARIANTS
from ssr_train.training.checkpoint import load_checkpoint, unwrap_state_dict

_PATCH_EMBED = re.compile(r"^patch_embed([1-4])\.(.+)$")
_BLOCK = re.compile(r"^block([1-4])\.(\d+)\.(.+)$")
_STAGE_NORM = re.compile(r"^norm([1-4])\.(.+)$")
# DDP wrapper, then a DAFormer/MIC UDA run's student (``model.``, beside ``ema_model.``/``imnet_model.``),
# then a whole segmentor's backbone.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


@dataclass(frozen=True)
class LoadReport:
    """What `load_mit_checkpoint` did; the trainer prints its `summary()`. `missing` is non-empty only
    with strict=False."""

    path: Path
    variant: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    dropped: tuple[str, ...]  # the ImageNet classifier, never part of a backbone

    def summary(self) -> str:
        """One line: what came from which file, and what was left out."""
        parts = [f"backbone {self.variant}: {len(self.loaded)} tensors from {self.path.name}"]
        if self.dropped:
            parts.append(f"ImageNet classifier dropped ({len(self.dropped)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unused (stages this backbone does not build)")
        if self.missing:
            parts.append(f"{len(self.missing)} missing (left at random init)")
        return ", ".join(parts)


def mit_tensors(obj: object) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: `state_dict` / `model` wrappers (training/checkpoint.py) and `module.` /
    `model.` / `backbone.` prefixes removed (a DAFormer/MIC UDA checkpoint gives its student backbone)."""
    obj = unwrap_state_dict(obj)
    if not isinstance(obj, Mapping):
        raise SSRError(f"not a MiT checkpoint: expected a dict of tensors, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            # A whole segmentor or UDA run: keep only the part under the prefix.
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def mmseg_to_timm_key(key: str) -> str | None:
    """The timm name of one mmseg MiT key, or None when the key is not part of a MiT backbone."""
    if m := _PATCH_EMBED.match(key):
        stage, rest = int(m[1]), m[2]
        return f"patch_embed.{rest}" if stage == 1 else f"stages_{stage - 1}.downsample.{rest}"
    if m := _BLOCK.match(key):
        rest = m[3].replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
        return f"stages_{int(m[1]) - 1}.blocks.{m[2]}.{rest}"
    if m := _STAGE_NORM.match(key):
        return f"stages_{int(m[1]) - 1}.norm.{m[2]}"
    return None


def timm_to_mmseg_key(key: str) -> str:
    """The mmseg name of one timm MiT key (the inverse of `mmseg_to_timm_key`), for messages."""
    if key.startswith("patch_embed."):
        return "patch_embed1." + key[len("patch_embed."):]
    stage, _, rest = key.partition(".")
    n = int(stage.removeprefix("stages_")) + 1
    if rest.startswith("downsample."):
        return f"patch_embed{n}." + rest[len("downsample."):]
    if rest.startswith("blocks."):
        return f"block{n}." + rest[len("blocks."):].replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
    return f"norm{n}." + rest.removeprefix("norm.")


def _split(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], list[str]]:
    """(timm-named tensors, timm name -> mmseg name, unknown mmseg keys, dropped classifier keys)."""
    converted, origin, unexpected, dropped = {}, {}, [], []
    for key, value in sd.items():
        if key.startswith("head."):
            dropped.append(key)
        elif (new_key := mmseg_to_timm_key(key)) is not None:
            converted[new_key], origin[new_key] = value, key
        else:
            unexpected.append(key)
    return converted, origin, unexpected, dropped


def infer_mit_variant(timm_sd: Mapping[str, torch.Tensor]) -> str:
    """Which mit_b* a converted state dict holds, from its stage widths and block counts."""
    dims, depths = [], []
    for stage in range(4):
        prefix = "patch_embed." if stage == 0 else f"stages_{stage}.downsample."
        # Any per-channel vector of the stage gives its width; several candidates survive a missing key.
        candidates = [f"stages_{stage}.norm.weight", f"stages_{stage}.norm.bias", f"{prefix}proj.bias"]
        width = next((timm_sd[k].shape[0] for k in candidates if k in timm_sd), None)
        blocks = {int(k.split(".")[2]) for k in timm_sd if k.startswith(f"stages_{stage}.blocks.")}
        if width is None or not blocks:
            raise SSRError(f"not a MiT checkpoint: no weights for stage {stage + 1} (norm{stage + 1}.*)")
        dims.append(int(width))
        depths.append(max(blocks) + 1)
    for name, spec in MIT_VARIANTS.items():
        if tuple(dims) == spec.embed_dims and tuple(depths) == spec.depths:
            return name
    raise SSRError(f"checkpoint matches no MiT variant (stage widths {tuple(dims)}, depths {tuple(depths)})")


def load_mit_checkpoint(backbone: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Fill a MiT `backbone` from a SegFormer/DAFormer checkpoint; every parameter must be covered."""
    if not backbone.is_mit:
        raise SSRError(f"MiT checkpoints load only into {', '.join(MIT_VARIANTS)}, not {backbone.name!r}")
    path = Path(path)
    sd = mit_tensors(load_checkpoint(path, what="MiT checkpoint"))
    converted, origin, unexpected, dropped = _split(sd)
    if not converted:
        raise SSRError(f"not a MiT checkpoint: {path} has no patch_embed*/block*/norm* keys")
    found = infer_mit_variant(converted)
    if found != backbone.name:
        raise SSRError(f"checkpoint {path.name} holds {found} weights but the backbone is {backbone.name}")

    target = backbone.body.state_dict()
    missing = [k for k in target if k not in converted]
    if missing and strict:
        first = ", ".join(timm_to_mmseg_key(k) for k in missing[:3])
        raise SSRError(f"checkpoint {path.name} lacks {len(missing)} of the {found} weights, first: {first}")
    for key in target:
        if key in converted and converted[key].shape != target[key].shape:
            raise SSRError(
                f"checkpoint {path.name} is not a {found} MiT checkpoint: {origin[key]} has shape "
                f"{tuple(converted[key].shape)}, expected {tuple(target[key].shape)}"
            )
    # A truncated backbone (out_indices) lacks later stages: their weights are unexpected, not an error.
    unexpected += [origin[k] for k in converted if k not in target]
    backbone.body.load_state_dict({k: v for k, v in converted.items() if k in target}, strict=False)
    return LoadReport(
        path=path,
        variant=found,
        loaded=tuple(k for k in target if k in converted),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        dropped=tuple(dropped),
    )
