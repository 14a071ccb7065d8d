"""Dataset readers, one file each, and the registry that names them.

Adding a dataset = one file here (a `SegmentationDataset` subclass: layout, label decoding, label space,
DAFormer resize, which splits are labelled) plus one entry in `DATASETS`.
"""

from __future__ import annotations

from pathlib import Path

from ssr_cache.data.datasets.acdc import ACDC
from ssr_cache.data.datasets.base import SampleFiles, SegmentationDataset
from ssr_cache.data.datasets.cityscapes import Cityscapes
from ssr_cache.data.datasets.dark_zurich import DarkZurich
from ssr_cache.data.datasets.folder import Folder
from ssr_cache.data.datasets.gta5 import GTA5
from ssr_cache.data.datasets.synthia import SYNTHIA
from ssr_cache.errors import SSRError

DATASETS: dict[str, type[SegmentationDataset]] = {
    "gta5": GTA5,
    "synthia": SYNTHIA,
    "cityscapes": Cityscapes,
    "acdc": ACDC,
    "dark_zurich": DarkZurich,
    "folder": Folder,
}

__all__ = ["ACDC", "DATASETS", "GTA5", "SYNTHIA", "Cityscapes", "DarkZurich", "Folder", "SampleFiles",
           "SegmentationDataset", "check_dataset_name", "open_dataset"]


def check_dataset_name(name: str) -> type[SegmentationDataset]:
    if name not in DATASETS:
        raise SSRError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def open_dataset(name: str, root: str | Path, split: str = "train", require_labels: bool = True,
                 conditions: tuple[str, ...] | None = None) -> SegmentationDataset:
    """Open one split of a dataset by registry name; `require_labels=False` allows images without labels;
    `conditions` selects ACDC weathers / Dark Zurich times of day (None: the dataset's default)."""
    return check_dataset_name(name)(root, split=split, require_labels=require_labels, conditions=conditions)
