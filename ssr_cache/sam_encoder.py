"""The frozen SAM image encoder: registry of shapes, checkpoint loading, preprocessing, multi-scale encoding.

SAM runs here: once per view in the cache build (and `cache verify --deep`), or in the training loop in the
trainer's online mode (ssr_train/methods/sam_features.py, through `encode(..., normalized=True)`).
Preprocessing follows the SSR reference: the crop is normalised with the mmseg/ImageNet mean and std
(image_norm; they equal SAM's pixel_mean/pixel_std) and then stretched bilinearly to img_size x img_size
(no aspect-preserving resize and no padding, unlike `segment_anything.SamPredictor`), on the encoder's device.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from ssr_cache.errors import SSRError
from ssr_cache.image_norm import normalize
from ssr_cache.sam_rel_pos import use_in_segment_anything
from ssr_cache.store.feature_levels import check_levels, default_levels, level_name

# Recorded in the fingerprint: a change of preprocessing changes every stored feature.
PREPROCESS = "mmseg-normalise-then-bilinear-stretch-v1"


@dataclass(frozen=True)
class SamEncoderConfig:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int
    window_size: int
    patch_size: int = 16
    out_chans: int = 256

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


SAM_ENCODERS: dict[str, SamEncoderConfig] = {
    # Random init only: a few ms per crop on CPU, a 16x16 neck grid; for tests and the demo.
    "vit_tiny": SamEncoderConfig("vit_tiny", embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3),
                                 img_size=256, window_size=8),
    "vit_b": SamEncoderConfig("vit_b", embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
                              img_size=1024, window_size=14),
    "vit_l": SamEncoderConfig("vit_l", embed_dim=1024, depth=24, num_heads=16,
                              global_attn_indexes=(5, 11, 17, 23), img_size=1024, window_size=14),
    "vit_h": SamEncoderConfig("vit_h", embed_dim=1280, depth=32, num_heads=16,
                              global_attn_indexes=(7, 15, 23, 31), img_size=1024, window_size=14),
}


def get_encoder_config(name: str) -> SamEncoderConfig:
    if name not in SAM_ENCODERS:
        raise SSRError(f"unknown SAM encoder {name!r}; choose one of {', '.join(SAM_ENCODERS)}")
    return SAM_ENCODERS[name]


def build_image_encoder(config: SamEncoderConfig) -> ImageEncoderViT:
    """segment_anything's ImageEncoderViT with the same settings as its build_sam (rel-pos, eps 1e-6), its
    relative positions indexed without a host wait on a GPU (sam_rel_pos.py)."""
    use_in_segment_anything()
    return ImageEncoderViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=4,
        out_chans=config.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=tuple(config.global_attn_indexes),
    )


def pool_levels(neck: torch.Tensor, levels: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """{level_name(g): neck average-pooled to g x g} for each grid size g (g must divide the neck's grid)."""
    grid = neck.shape[-1]
    out = {}
    for g in check_levels(levels, grid):
        k = grid // g
        out[level_name(g)] = neck if k == 1 else F.avg_pool2d(neck, kernel_size=k, stride=k)
    return out


def encoder_fingerprint(name: str, checkpoint: str | Path | None, *, seed: int = 0,
                        checkpoint_sha256: str | None = None) -> dict:
    """What identifies the features an encoder produces (JSON-plain), known before any weights are loaded:
    the build checks its output against it before SAM loads."""
    c = get_encoder_config(name)
    if checkpoint is not None and checkpoint_sha256 is None:
        path = Path(checkpoint)
        if not path.is_file():
            raise SSRError(f"SAM checkpoint not found: {path}")
        checkpoint_sha256 = file_sha256(path)
    random_init = checkpoint is None
    return {
        "name": c.name,
        "img_size": c.img_size,
        "patch_size": c.patch_size,
        "grid": c.grid,
        "embed_dim": c.embed_dim,
        "depth": c.depth,
        "num_heads": c.num_heads,
        "global_attn_indexes": list(c.global_attn_indexes),
        "window_size": c.window_size,
        "out_chans": c.out_chans,
        "random_init": random_init,
        "init_seed": seed if random_init else None,
        "checkpoint_sha256": checkpoint_sha256,
        "preprocess": PREPROCESS,
    }


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FrozenSamEncoder(nn.Module):
    """A SAM image encoder in eval mode with no gradients; `image_encoder.*` keys like a full SAM state dict."""

    def __init__(self, config: SamEncoderConfig, image_encoder: ImageEncoderViT, *, random_init: bool,
                 init_seed: int | None = None, checkpoint_sha256: str | None = None):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.random_init = random_init
        self.init_seed = init_seed
        self.checkpoint_sha256 = checkpoint_sha256
        self.grid = config.img_size // config.patch_size
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenSamEncoder:
        # Frozen: a parent's .train() must not flip it (SAM has no dropout/BN, but stay explicit).
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.image_encoder.pos_embed.device

    def fingerprint(self) -> dict:
        """What identifies the features this encoder produces (see `encoder_fingerprint`)."""
        return encoder_fingerprint(self.config.name, None if self.random_init else "checkpoint",
                                   seed=self.init_seed or 0, checkpoint_sha256=self.checkpoint_sha256)

    def preprocess(self, crops: np.ndarray | torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Crops → (B, 3, img_size, img_size) float32 on the encoder's device.

        Accepts uint8 (B, H, W, 3) pixels, float (B, 3, H, W) pixels in 0..255, or with normalized=True
        float (B, 3, H, W) already mean/std-normalised (the trainer's online mode). Normalise first, then
        resize, as the SSR reference does with its mmseg-normalised batch.
        """
        x = torch.from_numpy(np.ascontiguousarray(crops)) if isinstance(crops, np.ndarray) else crops
        if x.ndim != 4:
            raise SSRError(f"crops must be a batch of 4 dimensions, got shape {tuple(x.shape)}")
        x = x.to(self.device)
        if x.dtype == torch.uint8:
            if normalized:
                raise SSRError("normalized=True needs float (B, 3, H, W) input, got uint8")
            if x.shape[-1] != 3:
                raise SSRError(f"uint8 crops must be (B, H, W, 3), got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2)
        elif not x.is_floating_point():
            raise SSRError(f"crops must be uint8 or float, got {x.dtype}")
        elif x.shape[1] != 3:
            raise SSRError(f"float crops must be (B, 3, H, W), got shape {tuple(x.shape)}")
        x = x.float() if normalized else normalize(x)
        size = self.config.img_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.contiguous()

    def encode(self, crops: np.ndarray | torch.Tensor, *, levels: tuple[int, ...] | None = None,
               autocast_dtype: torch.dtype | None = None, normalized: bool = False) -> dict[str, torch.Tensor]:
        """{level_name(g): float32 (B, out_chans, g, g)} for each level g, on the encoder's device.

        crops: see `preprocess` (normalized=True: the trainer's online mode). autocast_dtype: bf16/fp16 on
        CUDA (None: fp32). The outputs are ordinary tensors (made outside inference mode), so the trainer may
        feed them to trainable layers.
        """
        levels = self.default_levels() if levels is None else tuple(levels)
        # Reduced precision only on CUDA; on CPU fp32 is both exact and the fastest path.
        use_autocast = autocast_dtype is not None and self.device.type == "cuda"
        amp = torch.autocast("cuda", dtype=autocast_dtype) if use_autocast else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            x = self.preprocess(crops, normalized=normalized)
            out = pool_levels(self.image_encoder(x).float(), levels)
        return {name: t.clone() for name, t in out.items()}

    def default_levels(self) -> tuple[int, ...]:
        return default_levels(self.grid)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.encode(crops, levels=(self.grid,))[level_name(self.grid)]


def build_sam_encoder(name: str, checkpoint: str | Path | None = None, *, seed: int = 0,
                      device: str | torch.device = "cpu", checkpoint_sha256: str | None = None) -> FrozenSamEncoder:
    """A frozen encoder from an official SAM .pth (or an encoder-only state dict), or seeded random weights.
    `checkpoint_sha256`: the file's hash when the caller already computed it."""
    config = get_encoder_config(name)
    if checkpoint is None:
        warnings.warn(f"SAM encoder {name} has no checkpoint: using RANDOM weights (seed {seed}); its features "
                      "are NOT meaningful SAM features (fine for tests and demos only)", stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image_encoder = build_image_encoder(config)
        encoder = FrozenSamEncoder(config, image_encoder, random_init=True, init_seed=seed)
    else:
        path = Path(checkpoint)
        state = load_encoder_state(path, config)
        image_encoder = build_image_encoder(config)
        try:
            missing, unexpected = image_encoder.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches, e.g. another window size
            first = str(exc).strip().splitlines()[-1].strip()
            raise SSRError(f"checkpoint {path.name} does not fit {name}: {first}") from exc
        if missing or unexpected:
            raise SSRError(f"checkpoint {path.name}: {_key_problem(missing, unexpected)}")
        encoder = FrozenSamEncoder(config, image_encoder, random_init=False,
                                   checkpoint_sha256=checkpoint_sha256 or file_sha256(path))
    return encoder.to(device)


def load_encoder_state(path: Path, config: SamEncoderConfig) -> dict[str, torch.Tensor]:
    """The image-encoder tensors of a checkpoint, prefix stripped, checked to be of config's model type."""
    if not path.is_file():
        raise SSRError(f"SAM checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and tensor errors all mean the same thing to a user
        raise SSRError(f"{path.name} is not a readable torch checkpoint ({type(exc).__name__})") from exc
    if isinstance(raw, dict) and isinstance(raw.get("model", raw.get("state_dict")), dict):
        raw = raw.get("model", raw.get("state_dict"))
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise SSRError(f"{path.name} is not a state dict of tensors")
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in raw):
        state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    else:
        state = dict(raw)
    patch = state.get("patch_embed.proj.weight")
    if patch is None:
        raise SSRError(f"{path.name} holds no SAM image encoder weights (no patch_embed.proj.weight)")
    embed_dim = int(patch.shape[0])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    pos = state.get("pos_embed")
    grid = int(pos.shape[1]) if pos is not None and pos.ndim == 4 else None
    if (embed_dim, depth) != (config.embed_dim, config.depth) or grid not in (None, config.grid):
        kind = _infer_type(embed_dim, depth, grid)
        raise SSRError(f"checkpoint {path.name} holds a {kind} encoder (embed dim {embed_dim}, depth {depth}"
                       f"{'' if grid is None else f', {grid}x{grid} grid'}), not {config.name}")
    return state


def _infer_type(embed_dim: int, depth: int, grid: int | None) -> str:
    for cfg in SAM_ENCODERS.values():
        if (cfg.embed_dim, cfg.depth) == (embed_dim, depth) and grid in (None, cfg.grid):
            return cfg.name
    return "non-standard"


def _key_problem(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} encoder keys ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected encoder keys "
                     f"({', '.join(unexpected[:3])}{', …' if len(unexpected) > 3 else ''})")
    return "; ".join(parts)
