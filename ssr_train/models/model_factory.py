"""Build the segmentor a config describes: timm backbone + DAFormer head (+ SSR regulariser)."""

from __future__ import annotations

from ssr_cache.errors import SSRError
from ssr_cache.store.feature_levels import level_name
from ssr_train.models.backbones import create_backbone
from ssr_train.models.segmentor import SSRSegmentor, build_segmentor


def build_model(cfg, *, num_classes: int, sam_channels: int = 256) -> SSRSegmentor:
    """`cfg` is a ModelConfig; `num_classes` comes from the caches' label space."""
    checkpoint = None if cfg.backbone_checkpoint in (None, "none") else cfg.backbone_checkpoint
    backbone = create_backbone(cfg.backbone, checkpoint=checkpoint, drop_path_rate=cfg.drop_path_rate)
    if len(backbone.out_channels) != 4:
        raise SSRError(f"backbone {cfg.backbone!r} has {len(backbone.out_channels)} feature stages; the DAFormer "
                       "head needs 4 (use mit_b0…mit_b5 or a 4-stage timm model such as convnext or swin)")
    return build_segmentor(backbone, num_classes=num_classes, embed_dim=cfg.head_embed_dim,
                           ssr_stages=tuple(cfg.ssr_stages) if cfg.ssr else None, sam_channels=sam_channels)


def sam_level_name(cfg, store_levels: list[int]) -> str:
    """The stored feature array the regulariser's keys/values come from (finest level by default)."""
    level = cfg.ssr_key_level or max(store_levels)
    if level not in store_levels:
        raise SSRError(f"model.ssr_key_level = {level} is not stored in the cache (levels: "
                       f"{', '.join(map(str, store_levels))})")
    return level_name(level)
