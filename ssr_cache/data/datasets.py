"""Readers for GTA5 and Cityscapes in their real on-disk layouts.

A dataset is a sorted list of `SampleFiles` plus loaders: images come back as uint8 (H, W, 3), labels as
uint8 (H, W) train ids (0..18, 255 = ignore), mapped from label ids on the fly. The synthetic generator
writes the same layouts, so everything downstream sees one kind of dataset.

    GTA5        ROOT/images/NNNNN.png            ROOT/labels/NNNNN.png (palette PNG, index = label id)
    Cityscapes  ROOT/leftImg8bit/SPLIT/CITY/CITY_SEQ_FRAME_leftImg8bit.png
                ROOT/gtFine/SPLIT/CITY/CITY_SEQ_FRAME_gtFine_labelTrainIds.png   (preferred: train ids)
                ROOT/gtFine/SPLIT/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png        (else: label ids)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssr_cache.data.labels import check_train_ids, ids_to_train_ids
from ssr_cache.data.png_io import image_size, read_label_ids, read_rgb
from ssr_cache.errors import SSRError

_TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
_LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
_IMAGE_SUFFIX = "_leftImg8bit.png"


@dataclass(frozen=True)
class SampleFiles:
    sample_id: str
    image: Path
    label: Path | None


class SegmentationDataset:
    """Files of one split of one dataset, in a fixed order, with loaders. Picklable (workers get a copy)."""

    name: str = ""
    resize_to: tuple[int, int] = (0, 0)  # default training size (W, H)

    def __init__(self, root: str | Path, split: str = "train", require_labels: bool = True) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise SSRError(f"{self.name} dataset root {self.root} does not exist or is not a folder")
        items = sorted(self._find_items(), key=lambda item: item.sample_id)
        if require_labels:
            for item in items:
                if item.label is None:
                    raise SSRError(f"no label for image {item.image} (expected {self._expected_label(item)})")
        self.items: list[SampleFiles] = items
        self._resized: set[int] = set()

    # --- layout-specific --------------------------------------------------------------------------------

    def _find_items(self) -> list[SampleFiles]:
        raise NotImplementedError

    def _expected_label(self, item: SampleFiles) -> Path:
        raise NotImplementedError

    # --- common -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, samples={len(self)})"

    @property
    def sample_ids(self) -> list[str]:
        return [item.sample_id for item in self.items]

    @property
    def has_labels(self) -> bool:
        return bool(self.items) and all(item.label is not None for item in self.items)

    @property
    def size_mismatches(self) -> int:
        """How many distinct samples loaded so far (in this process) had a label of another size than the image."""
        return len(self._resized)

    def was_resized(self, index: int) -> bool:
        """Whether this sample's label, when loaded in this process, had to be resized to its image."""
        return index in self._resized

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self.items[index].image)

    def load_label(self, index: int, image_wh: tuple[int, int] | None = None) -> np.ndarray:
        """Train ids (H, W) at the image's size; `image_wh` saves reading the image header when known."""
        item = self.items[index]
        if item.label is None:
            raise SSRError(f"sample {item.sample_id} has no label (image {item.image})")
        raw = read_label_ids(item.label)
        if item.label.name.endswith(_TRAIN_IDS_SUFFIX):
            train_ids = check_train_ids(raw, str(item.label))
        else:
            train_ids = ids_to_train_ids(raw, str(item.label))
        width, height = image_wh if image_wh is not None else image_size(item.image)
        if train_ids.shape != (height, width):
            # Some GTA5 labels differ in size from their image; nearest neighbour keeps ids intact.
            train_ids = np.asarray(Image.fromarray(train_ids).resize((width, height), Image.Resampling.NEAREST))
            self._resized.add(index)
        return train_ids

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image = self.load_image(index)
        if self.items[index].label is None:
            return image, None
        height, width = image.shape[:2]
        return image, self.load_label(index, image_wh=(width, height))

    def file_list_hash(self) -> str:
        """sha256 over the sorted root-relative paths of all images and labels (part of the cache fingerprint)."""
        digest = hashlib.sha256()
        for item in self.items:
            label = item.label.relative_to(self.root).as_posix() if item.label is not None else ""
            digest.update(f"{item.image.relative_to(self.root).as_posix()}\t{label}\n".encode())
        return digest.hexdigest()


class GTA5(SegmentationDataset):
    name = "gta5"
    resize_to = (1280, 720)
    splits = ("train", "all")  # GTA5 has no official split: both mean the whole set (24,966 pairs)

    def _find_items(self) -> list[SampleFiles]:
        if self.split not in self.splits:
            raise SSRError(f"gta5 has no split {self.split!r}; choose one of: {', '.join(self.splits)}")
        image_dir, label_dir = self.root / "images", self.root / "labels"
        images = sorted(image_dir.glob("*.png")) if image_dir.is_dir() else []
        if not images:
            raise SSRError(f"no gta5 images found: looked for {image_dir}/*.png")
        labels = {path.name for path in label_dir.glob("*.png")} if label_dir.is_dir() else set()
        return [
            SampleFiles(path.stem, path, label_dir / path.name if path.name in labels else None) for path in images
        ]

    def _expected_label(self, item: SampleFiles) -> Path:
        return self.root / "labels" / item.image.name


class Cityscapes(SegmentationDataset):
    name = "cityscapes"
    resize_to = (1024, 512)

    def _find_items(self) -> list[SampleFiles]:
        image_root = self.root / "leftImg8bit"
        split_dir = image_root / self.split
        if not split_dir.is_dir():
            found = sorted(path.name for path in image_root.iterdir() if path.is_dir()) if image_root.is_dir() else []
            choices = f"found splits: {', '.join(found)}" if found else f"{image_root} has no split folders"
            raise SSRError(f"no cityscapes split folder {split_dir} ({choices})")
        items = []
        for city_dir in sorted(path for path in split_dir.iterdir() if path.is_dir()):
            label_dir = self.root / "gtFine" / self.split / city_dir.name
            labels = {path.name for path in label_dir.glob("*.png")} if label_dir.is_dir() else set()
            for image in sorted(city_dir.glob(f"*{_IMAGE_SUFFIX}")):
                sample_id = image.name[: -len(_IMAGE_SUFFIX)]
                label = None
                for suffix in (_TRAIN_IDS_SUFFIX, _LABEL_IDS_SUFFIX):
                    if sample_id + suffix in labels:
                        label = label_dir / (sample_id + suffix)
                        break
                items.append(SampleFiles(sample_id, image, label))
        if not items:
            raise SSRError(f"no cityscapes images found: looked for {split_dir}/*/*{_IMAGE_SUFFIX}")
        return items

    def _expected_label(self, item: SampleFiles) -> Path:
        return self.root / "gtFine" / self.split / item.image.parent.name / (item.sample_id + _LABEL_IDS_SUFFIX)


DATASETS: dict[str, type[SegmentationDataset]] = {"gta5": GTA5, "cityscapes": Cityscapes}


def open_dataset(
    name: str, root: str | Path, split: str = "train", require_labels: bool = True
) -> SegmentationDataset:
    """Open one split of a dataset by registry name; `require_labels=False` allows images without labels."""
    if name not in DATASETS:
        raise SSRError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root, split=split, require_labels=require_labels)
