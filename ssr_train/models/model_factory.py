"""Build the segmentor a config describes: timm backbone + DAFormer head (+ SSR regulariser)."""

from __future__ import annotations

from ssr_train.models.segmentor import SSRSegmentor, build_segmentor
from ssr_train.training.config import ModelConfig


def build_model(cfg: ModelConfig, *, sam_channels: int = 256) -> SSRSegmentor:
    from ssr_train.models.backbones import create_backbone

    backbone = create_backbone(cfg.backbone, checkpoint=cfg.backbone_checkpoint, drop_path_rate=cfg.drop_path_rate)
    return build_segmentor(backbone, num_classes=cfg.num_classes, embed_dim=cfg.head_embed_dim,
                           ssr_stages=tuple(cfg.ssr_stages) if cfg.ssr else None, sam_channels=sam_channels)


def sam_level_name(cfg: ModelConfig, store_levels: list[int]) -> str:
    """The stored feature array the regulariser's keys/values come from (finest level by default)."""
    from ssr_cache.errors import SSRError

    level = cfg.ssr_key_level or max(store_levels)
    if level not in store_levels:
        raise SSRError(f"--ssr-key-level {level} is not stored in the cache (levels: "
                       f"{', '.join(map(str, store_levels))})")
    return f"l{level}"
