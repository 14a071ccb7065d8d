"""Everything a cache build is parameterised by, as one frozen dataclass (saved into the store)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ssr_cache.data.datasets import check_dataset_name
from ssr_cache.errors import SSRError
from ssr_cache.store.feature_codec import FEATURE_DTYPES

# SAM's compute precision. The reference runs SAM in fp32; bf16 autocast is the default on CUDA (docs/recipe.md).
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class CacheBuildConfig:
    dataset: str
    data_root: Path
    out: str
    split: str = "train"
    labelled: bool | None = None  # a labelled source? None: the dataset's default for the split
    conditions: tuple[str, ...] | None = None  # ACDC / Dark Zurich sub-domains; None: the dataset's default
    sam: str = "vit_b"
    sam_checkpoint: Path | None = None
    sam_seed: int = 0
    views_per_image: int = 4
    crop: tuple[int, int] = (512, 512)  # (H, W)
    resize: tuple[int, int] | None = None  # (W, H) keep-ratio bound; None: the dataset's DAFormer default
    ratio_range: tuple[float, float] = (1.0, 1.0)
    cat_max_ratio: float | None = 0.75
    seed: int = 0
    levels: tuple[int, ...] | None = None  # grid sizes; None: neck grid, /2, /4
    feature_dtype: str = "float16"
    views_per_shard: int = 64
    batch_size: int = 4
    device: str = "auto"  # auto: CUDA when present
    autocast: str | None = None  # "bf16" | "fp16" | "fp32"; None: bf16 on CUDA, fp32 on CPU
    workers: int | None = None  # None: pipeline.decoding_workers (2 on a CPU; on a GPU half the cores, 2-8)
    writer_threads: int | None = None  # None: shard_writer.default_writer_threads (this rank's node share)
    direct_io: bool = True  # shard files past the page cache (O_DIRECT) where offered: written once, not re-read
    max_images: int | None = None  # build over the first N images only (reduced builds)
    overwrite: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.views_per_image <= 0:
            raise SSRError(f"--views-per-image must be at least 1, got {self.views_per_image}")
        if min(self.crop) <= 0:
            raise SSRError(f"--crop must be positive, got {self.crop[0]}x{self.crop[1]}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise SSRError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        if self.views_per_shard <= 0:
            raise SSRError(f"--views-per-shard must be at least 1, got {self.views_per_shard}")
        if self.batch_size <= 0:
            raise SSRError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_images is not None and self.max_images <= 0:
            raise SSRError(f"--max-images must be at least 1, got {self.max_images}")
        if self.autocast is not None and self.autocast not in PRECISIONS:
            raise SSRError(f"--autocast must be one of {', '.join(PRECISIONS)}, got {self.autocast!r}")
        if self.workers is not None and self.workers < 0:
            raise SSRError(f"--workers must be 0 (decode in the main process) or more, got {self.workers}")
        if self.writer_threads is not None and self.writer_threads <= 0:
            raise SSRError(f"--writer-threads must be at least 1, got {self.writer_threads}")
        check_dataset_name(self.dataset)
        if self.conditions is not None:
            object.__setattr__(self, "conditions", tuple(self.conditions))

    def stored_dict(self) -> dict:
        """What the store records of its build: everything but where it was written and how it was run,
        so that two builds of the same cache are bitwise equal wherever they live."""
        out = self.to_dict()
        for key in ("out", "overwrite", "workers", "writer_threads", "direct_io", "device"):
            out.pop(key)
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("data_root", "sam_checkpoint"):
            out[key] = None if out[key] is None else str(out[key])
        return out


def resolve_precision(autocast: str | None, device: torch.device) -> str:
    """The precision SAM runs in: the --autocast choice, else bf16 on CUDA and fp32 on CPU. On CPU only fp32
    is offered (reduced precision there is slower and not what anyone measured)."""
    if autocast is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type != "cuda" and autocast != "fp32":
        raise SSRError(f"--autocast {autocast} needs a CUDA device; on {device} SAM runs in fp32")
    return autocast


def autocast_dtype(precision: str) -> torch.dtype | None:
    return PRECISIONS[precision]
