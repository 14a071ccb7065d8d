"""Tiny PNG datasets written in the real GTA5 and Cityscapes layouts, with known pixel contents.

Every fixture label is 32x24 (W x H) in three horizontal bands of 8 rows: sky (id 23), car (id 26),
road (id 7). Sample k then gets a person (id 24) block over the first 4k columns of the car band, and
pixel (0, 0) is "unlabeled" (id 0). So in train ids, sample k counts exactly:

    sky (10): 255    car (13): 256 - 32k    person (11): 32k    road (0): 256    ignored (255): 1
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssr_cache.data.labels import ID_PALETTE
from ssr_cache.data.png_io import write_png_atomic

WIDTH, HEIGHT = 32, 24
SKY, CAR, ROAD, PERSON, UNLABELED = 23, 26, 7, 24, 0  # label ids


def label_ids(k: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """The label ids of fixture sample k (uint8, H x W); bands are height // 3 rows each."""
    band = height // 3
    ids = np.full((height, width), ROAD, dtype=np.uint8)
    ids[:band] = SKY
    ids[band : 2 * band] = CAR
    ids[band : 2 * band, : 4 * k] = PERSON
    ids[0, 0] = UNLABELED
    return ids


def expected_counts(k: int) -> np.ndarray:
    """Train-id pixel counts (19,) of fixture sample k at 32x24, written out by hand (see module docstring)."""
    counts = np.zeros(19, dtype=np.int64)
    counts[10] = 255  # sky, minus the unlabeled pixel
    counts[13] = 256 - 32 * k  # car
    counts[11] = 32 * k  # person
    counts[0] = 256  # road
    return counts


def image(k: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A deterministic RGB image for sample k: a gradient, with k in the blue channel."""
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 7
    rgb[..., 1] = np.arange(height, dtype=np.uint8)[:, None] * 9
    rgb[..., 2] = k
    return rgb


def write_gta5_sample(root: Path, stem: str, rgb: np.ndarray, ids: np.ndarray | None) -> None:
    """ROOT/images/STEM.png and, unless `ids` is None, ROOT/labels/STEM.png (palette PNG, index = label id)."""
    write_png_atomic(root / "images" / f"{stem}.png", rgb)
    if ids is not None:
        write_png_atomic(root / "labels" / f"{stem}.png", ids, palette=ID_PALETTE)


def make_gta5(root: Path, n: int = 3) -> list[str]:
    """n fixture samples with stems 00001.. written in reverse order (listing order must not matter)."""
    stems = [f"{k + 1:05d}" for k in range(n)]
    for k in reversed(range(n)):
        write_gta5_sample(root, stems[k], image(k), label_ids(k))
    return stems


def cityscapes_paths(root: Path, split: str, sample_id: str) -> tuple[Path, Path, Path]:
    """(image, labelIds, labelTrainIds) paths of a sample id "CITY_SEQ_FRAME"."""
    city = sample_id.split("_")[0]
    image_path = root / "leftImg8bit" / split / city / f"{sample_id}_leftImg8bit.png"
    label_dir = root / "gtFine" / split / city
    return image_path, label_dir / f"{sample_id}_gtFine_labelIds.png", label_dir / f"{sample_id}_gtFine_labelTrainIds.png"


def write_cityscapes_sample(
    root: Path,
    split: str,
    sample_id: str,
    rgb: np.ndarray,
    ids: np.ndarray | None = None,
    train_ids: np.ndarray | None = None,
) -> None:
    """The image, plus greyscale `_gtFine_labelIds.png` / `_gtFine_labelTrainIds.png` when given."""
    image_path, ids_path, train_ids_path = cityscapes_paths(root, split, sample_id)
    write_png_atomic(image_path, rgb)
    if ids is not None:
        write_png_atomic(ids_path, ids)
    if train_ids is not None:
        write_png_atomic(train_ids_path, train_ids)


CITYSCAPES_IDS = ("aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313", "zurich_000002_000019")


def make_cityscapes(root: Path, split: str = "val", labels: bool = True) -> list[str]:
    """Four fixture samples in three cities (sample k = CITYSCAPES_IDS[k]), labels as `_labelIds.png`."""
    for k in reversed(range(len(CITYSCAPES_IDS))):
        write_cityscapes_sample(root, split, CITYSCAPES_IDS[k], image(k), label_ids(k) if labels else None)
    return list(CITYSCAPES_IDS)
