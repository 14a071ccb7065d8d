"""Where the regulariser's SAM tokens come from: the cache (default) or a frozen encoder in the loop."""

from __future__ import annotations

import torch
from torch import Tensor

from ssr_cache.errors import SSRError
from ssr_cache.store.feature_levels import parse_level
from ssr_train.uda.classmix import mix_features


class SamFeatureSource:
    """The one object that decides where SAM tokens come from. `source(batch)` / `mixed(...)` give a method
    its tokens; `cached(batch)` reads the stored level; `of_images(img)` runs SAM (online mode only)."""

    def __init__(self, level: str | None, *, online: bool = False, encoder_name: str = "vit_b",
                 checkpoint: str | None = None, seed: int = 0, device: torch.device | str = "cpu"):
        self.level = level
        self.online = online and level is not None
        self.encoder = None
        if self.online:
            # Lazy: in cache mode the trainer never imports segment_anything (tests/test_train_engine.py).
            from ssr_cache.sam_encoder import build_sam_encoder

            self.encoder = build_sam_encoder(encoder_name, checkpoint, seed=seed, device=device)
            self.grid = parse_level(level)
            if self.encoder.grid % self.grid:
                raise SSRError(f"SAM level {level} does not divide the {encoder_name} grid {self.encoder.grid}")

    @property
    def enabled(self) -> bool:
        return self.level is not None

    def cached(self, batch: dict) -> Tensor | None:
        return batch["sam"][self.level] if self.level else None

    def of_images(self, img: Tensor) -> Tensor:
        """SAM features of normalised images (B,3,H,W), exactly as the reference feeds them."""
        out = self.encoder.encode(img, levels=(self.grid,), normalized=True)
        return out[self.level].to(img.device)

    def source(self, batch: dict) -> Tensor | None:
        """Tokens of a batch's own images."""
        if not self.enabled:
            return None
        return self.of_images(batch["img"]) if self.online else self.cached(batch)

    def mixed(self, mask: Tensor, source: dict, target: dict, mixed_img: Tensor) -> Tensor | None:
        """Tokens of a ClassMix image: SAM on the mixed image itself (online), or the cached source and
        target tokens mixed with the same mask (cache)."""
        if not self.enabled:
            return None
        if self.online:
            return self.of_images(mixed_img)
        return mix_features(mask, self.cached(source), self.cached(target))
