"""Backbones: SegFormer's MiT-B0…B5 (as timm pvt_v2 models) or any timm model with `features_only`.

`create_backbone(name)` returns a `Backbone`: an nn.Module whose forward maps an NCHW image batch to a
list of NCHW feature maps, one per stage, with `out_channels` describing them.

MiT and timm's PVTv2 share one architecture (overlapping patch embeds 7/4 then 3/2, spatial-reduction
attention with separate `q` / `kv` linears, Mix-FFN with a 3x3 depthwise conv, LayerNorm eps 1e-6 in
blocks and after each stage, 1e-5 in patch embeds and the reduction norm). They differ only in the MLP
ratio: timm's pvt_v2_b0…b4 default to (8, 8, 4, 4), MiT uses 4 everywhere. Every hyper-parameter is
passed explicitly below, so the MiT definition does not depend on timm's defaults.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ssr_cache.errors import SSRError
from ssr_train.models.mit_checkpoint import LoadReport, load_mit_checkpoint
from ssr_train.models.mit_variants import MIT_VARIANTS


class Backbone(nn.Module):
    """A timm `features_only` model behind a uniform interface: image -> list of NCHW stage features."""

    def __init__(self, name: str, body: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels: tuple[int, ...] = tuple(body.feature_info.channels())
        # Some timm models (Swin, ...) emit channels-last features; the interface promises NCHW.
        self.channels_last = getattr(getattr(body, "output_fmt", None), "value", "NCHW") == "NHWC"
        self.checkpoint_report: LoadReport | None = None  # set when MiT weights came from a checkpoint

    @property
    def is_mit(self) -> bool:
        return self.name in MIT_VARIANTS

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = list(self.body(x))
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features


def create_backbone(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    drop_path_rate: float = 0.1,
    **kwargs,
) -> Backbone:
    """Build backbone `name` ("mit_b0"…"mit_b5" or a timm model name); extra kwargs go to timm.

    Weights come only from a local `checkpoint`: a SegFormer/DAFormer `mit_b*.pth` for MiT names, a timm
    state dict otherwise. Nothing is ever downloaded, so `pretrained=True` without a checkpoint is an error.
    """
    if pretrained and checkpoint is None:
        raise SSRError(
            f"pretrained weights for backbone {name!r} are never downloaded; "
            "pass --backbone-checkpoint PATH with a local weights file instead"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise SSRError(f"backbone checkpoint not found: {checkpoint}")

    spec = MIT_VARIANTS.get(name)
    if spec is not None:
        timm_name, model_kwargs = spec.timm_name, {**spec.timm_kwargs(), **kwargs}
    elif timm.is_model(name):
        timm_name, model_kwargs = name, dict(kwargs)
    else:
        raise SSRError(
            f"unknown backbone {name!r}: use one of {', '.join(MIT_VARIANTS)} "
            "or a timm model name with features_only support (see timm.list_models())"
        )

    load_with_timm = checkpoint is not None and spec is None
    if load_with_timm:
        # timm's own local-file route: applies the model's checkpoint filter and drops the classifier.
        model_kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
    try:
        body = timm.create_model(
            timm_name, pretrained=load_with_timm, features_only=True, drop_path_rate=drop_path_rate,
            **model_kwargs,
        )
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AssertionError) as e:
        what = f"from checkpoint {checkpoint}" if load_with_timm else "as a features_only timm model"
        raise SSRError(f"cannot build backbone {name!r} {what}: {e}".splitlines()[0]) from e

    backbone = Backbone(name, body)
    if checkpoint is not None and spec is not None:
        backbone.checkpoint_report = load_mit_checkpoint(backbone, checkpoint)
    return backbone
