"""SegFormer's MiT-B0…B5 as timm pvt_v2 models: one spec per variant (read by backbones.py to build them
and by mit_checkpoint.py to recognise a checkpoint's variant)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MitSpec:
    """One MiT variant as SegFormer defines it; `timm_name` is the timm model that builds it."""

    timm_name: str
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratios: tuple[float, float, float, float] = (4.0, 4.0, 4.0, 4.0)
    qkv_bias: bool = True

    def timm_kwargs(self) -> dict:
        return dict(
            embed_dims=self.embed_dims,
            depths=self.depths,
            num_heads=self.num_heads,
            sr_ratios=self.sr_ratios,
            mlp_ratios=self.mlp_ratios,
            qkv_bias=self.qkv_bias,
        )


_SMALL_DIMS = (32, 64, 160, 256)
_LARGE_DIMS = (64, 128, 320, 512)

MIT_VARIANTS: dict[str, MitSpec] = {
    "mit_b0": MitSpec("pvt_v2_b0", _SMALL_DIMS, (2, 2, 2, 2)),
    "mit_b1": MitSpec("pvt_v2_b1", _LARGE_DIMS, (2, 2, 2, 2)),
    "mit_b2": MitSpec("pvt_v2_b2", _LARGE_DIMS, (3, 4, 6, 3)),
    "mit_b3": MitSpec("pvt_v2_b3", _LARGE_DIMS, (3, 4, 18, 3)),
    "mit_b4": MitSpec("pvt_v2_b4", _LARGE_DIMS, (3, 8, 27, 3)),
    "mit_b5": MitSpec("pvt_v2_b5", _LARGE_DIMS, (3, 6, 40, 3)),
}
