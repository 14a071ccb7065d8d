"""What every dataset reader is: a sorted list of `SampleFiles` plus loaders, and the facts a build needs.

Images come back as uint8 (H, W, 3) RGB, labels as uint8 (H, W) train ids of the reader's label space
(`ignore_index` for unlabelled pixels), mapped from the file's own ids on the fly — no convert step. A
reader says which label space it uses, its DAFormer resize, and whether a split is labelled by default
(a labelled store is a source; `--labelled/--unlabelled` overrides, e.g. Cityscapes as a source).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssr_cache.data.label_space import CITYSCAPES, LabelSpace
from ssr_cache.data.labels import check_train_ids, ids_to_train_ids
from ssr_cache.data.png_io import image_size, read_label_ids, read_rgb
from ssr_cache.errors import SSRError

# A resize of (SHORT_SIDE_ONLY, S) bounds only the short side: a keep-ratio rescale to short side S.
SHORT_SIDE_ONLY = 1 << 15


@dataclass(frozen=True)
class SampleFiles:
    sample_id: str
    image: Path
    label: Path | None


class SegmentationDataset:
    """Files of one split of one dataset, in a fixed order, with loaders. Picklable (workers get a copy).

    A subclass sets `name`, `resize_to`, `label_space` and `labelled_splits`, and implements `_find_items`
    and `_expected_label` (and `_decode_label` when its label files are not Cityscapes ids / train ids).
    """

    name: str = ""
    resize_to: tuple[int, int] = (0, 0)  # default training size (W, H), from the DAFormer config
    label_space: LabelSpace = CITYSCAPES
    labelled_splits: tuple[str, ...] = ()  # splits that are a labelled source by default
    conditions: tuple[str, ...] = ()  # selectable sub-domains (ACDC's weather, Dark Zurich's time of day)
    default_conditions: tuple[str, ...] = ()  # () = all

    def __init__(self, root: str | Path, split: str = "train", require_labels: bool = True,
                 conditions: tuple[str, ...] | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.selected_conditions = self._check_conditions(conditions)
        if not self.root.is_dir():
            raise SSRError(f"{self.name} dataset root {self.root} does not exist or is not a folder")
        self.items: list[SampleFiles] = sorted(self._find_items(), key=lambda item: item.sample_id)
        self._resized: set[int] = set()
        if require_labels:
            self.check_labels()

    def check_labels(self) -> None:
        """Raise one line naming the first image without a label."""
        for item in self.items:
            if item.label is None:
                raise SSRError(f"no label for image {item.image} (expected {self._expected_label(item)})")

    def labelled_by_default(self) -> bool:
        """Whether a cache of this split is a labelled source unless told otherwise."""
        return self.split in self.labelled_splits

    def _check_conditions(self, conditions: tuple[str, ...] | None) -> tuple[str, ...]:
        if not conditions:
            return self.default_conditions or self.conditions
        if not self.conditions:
            raise SSRError(f"{self.name} has no conditions; --conditions is for acdc and dark_zurich")
        unknown = [c for c in conditions if c not in self.conditions]
        if unknown:
            raise SSRError(f"{self.name} has no condition {unknown[0]!r}; choose from {', '.join(self.conditions)}")
        return tuple(dict.fromkeys(conditions))

    # --- layout-specific --------------------------------------------------------------------------------

    def _find_items(self) -> list[SampleFiles]:
        raise NotImplementedError

    def _expected_label(self, item: SampleFiles) -> Path:
        raise NotImplementedError

    def _decode_label(self, path: Path) -> tuple[np.ndarray, int]:
        """(train ids uint8 (H, W), pixels whose value the label table does not list). Default: Cityscapes
        `*_labelTrainIds.png` (checked) or `*_labelIds.png` (mapped), greyscale or palette."""
        raw = read_label_ids(path)
        if "labelTrainIds" in path.name:
            return check_train_ids(raw, str(path)), 0
        return ids_to_train_ids(raw, str(path)), 0

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

    def was_resized(self, index: int) -> bool:
        """Whether this sample's label, when loaded in this process, had to be resized to its image."""
        return index in self._resized

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self.items[index].image)

    def read_label(self, index: int, image_wh: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
        """(train ids (H, W) at the image's size, pixels of values the label table does not list)."""
        item = self.items[index]
        if item.label is None:
            raise SSRError(f"sample {item.sample_id} has no label (image {item.image})")
        train_ids, unlisted = self._decode_label(item.label)
        width, height = image_wh if image_wh is not None else image_size(item.image)
        if train_ids.shape != (height, width):
            # Some GTA5 labels differ in size from their image; nearest neighbour keeps ids intact.
            train_ids = np.asarray(Image.fromarray(train_ids).resize((width, height), Image.Resampling.NEAREST))
            self._resized.add(index)
        return train_ids, unlisted

    def load_label(self, index: int, image_wh: tuple[int, int] | None = None) -> np.ndarray:
        """Train ids (H, W) at the image's size; `image_wh` saves reading the image header when known."""
        return self.read_label(index, image_wh)[0]

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


def sorted_files(folder: Path, pattern: str) -> list[Path]:
    """Files under `folder` matching a glob pattern, sorted; [] when the folder does not exist."""
    return sorted(p for p in folder.glob(pattern) if p.is_file()) if folder.is_dir() else []
