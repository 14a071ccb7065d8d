"""A label space: the classes a model predicts, in train-id order, with colours and the ignore value.

It is data, not code: a cache stores it (and its fingerprint covers it), a run and an exported model
carry it, and everything downstream — number of classes, tables, plots, colour outputs, FD thing
classes, rare-class sampling — reads it from there instead of assuming Cityscapes' 19 classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ssr_cache.data.labels import CLASS_NAMES, IGNORE_INDEX, PALETTE, count_values
from ssr_cache.errors import SSRError


@dataclass(frozen=True)
class LabelSpace:
    """`class_names[i]` is train id i; `palette[i]` its RGB colour; `ignore_index` marks unlabelled pixels.
    `thing_classes` are the names FD regularises by default (empty: FD off unless configured).
    `present` names the classes a dataset actually labels (empty: all); `subsets` are the class groups
    evaluation reports a mean IoU over besides all classes, e.g. {"miou16": (…16 names), "miou13": …}
    for a model trained on SYNTHIA — the numbers UDA papers quote."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    thing_classes: tuple[str, ...] = field(default=())
    present: tuple[str, ...] = field(default=())
    subsets: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "class_names", tuple(str(n) for n in self.class_names))
        put(self, "palette", tuple(tuple(int(c) for c in rgb) for rgb in self.palette))
        put(self, "thing_classes", tuple(self.thing_classes))
        put(self, "present", tuple(self.present))
        subsets = self.subsets.items() if isinstance(self.subsets, dict) else self.subsets
        put(self, "subsets", tuple((str(k), tuple(v)) for k, v in subsets))
        n = len(self.class_names)
        if n < 1:
            raise SSRError(f"label space {self.name!r} has no classes")
        if len(set(self.class_names)) != n:
            dup = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
            raise SSRError(f"label space {self.name!r}: duplicate class name(s) {', '.join(dup)}")
        if len(self.palette) != n or any(len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) for rgb in self.palette):
            raise SSRError(f"label space {self.name!r}: the palette needs {n} RGB triples in 0..255")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < n:
            raise SSRError(f"label space {self.name!r}: ignore value {self.ignore_index} must be in {n}..255")
        unknown = sorted(set(self.thing_classes) - set(self.class_names))
        if unknown:
            raise SSRError(f"label space {self.name!r}: thing class(es) {', '.join(unknown)} are not classes")
        for what, names in (("present", self.present), *self.subsets):
            unknown = sorted(set(names) - set(self.class_names))
            if unknown:
                raise SSRError(f"label space {self.name!r}: {what} class(es) {', '.join(unknown)} are not classes")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def index(self, name: str) -> int:
        try:
            return self.class_names.index(name)
        except ValueError:
            raise SSRError(f"class {name!r} is not in label space {self.name!r} "
                           f"({', '.join(self.class_names)})") from None

    def indices(self, names) -> tuple[int, ...]:
        return tuple(self.index(n) for n in names)

    @property
    def present_classes(self) -> tuple[str, ...]:
        """The classes the dataset labels (all, unless `present` says fewer)."""
        return self.present or self.class_names

    def subset_indices(self) -> dict[str, tuple[int, ...]]:
        """Evaluation subsets as train ids, e.g. {"miou16": (0, 1, 2, …)}; empty for most spaces."""
        return {name: self.indices(names) for name, names in self.subsets}

    def count(self, train_ids: np.ndarray) -> np.ndarray:
        """Pixels of each class in a train-id map, int64 (num_classes,); ignored and other values excluded."""
        flat = np.asarray(train_ids).ravel()
        if flat.dtype == np.uint8:  # every value < 256: count them all, keep the classes (no mask pass)
            return count_values(flat)[: self.num_classes]
        return np.bincount(flat[flat < self.num_classes], minlength=self.num_classes).astype(np.int64)

    def palette_lut(self) -> np.ndarray:
        """(256, 3) uint8: the colour of every train id; the ignore value and unused ids are black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut

    def same_classes(self, other: LabelSpace) -> bool:
        """Whether two spaces predict the same classes in the same order (colours may differ)."""
        return self.class_names == other.class_names and self.ignore_index == other.ignore_index

    def to_dict(self) -> dict:
        return {"name": self.name, "class_names": list(self.class_names),
                "palette": [list(rgb) for rgb in self.palette], "ignore_index": self.ignore_index,
                "thing_classes": list(self.thing_classes), "present": list(self.present),
                "subsets": {k: list(v) for k, v in self.subsets}}

    @classmethod
    def from_dict(cls, d: dict) -> LabelSpace:
        return cls(name=d["name"], class_names=tuple(d["class_names"]),
                   palette=tuple(tuple(rgb) for rgb in d["palette"]),
                   ignore_index=int(d.get("ignore_index", IGNORE_INDEX)),
                   thing_classes=tuple(d.get("thing_classes", ())), present=tuple(d.get("present", ())),
                   subsets=tuple((k, tuple(v)) for k, v in (d.get("subsets") or {}).items()))


# DAFormer's FD thing classes (`imnet_feature_dist_classes = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]`).
CITYSCAPES = LabelSpace(
    name="cityscapes",
    class_names=CLASS_NAMES,
    palette=tuple(map(tuple, PALETTE.tolist())),
    thing_classes=("traffic light", "traffic sign", "person", "rider", "car", "truck", "bus", "train",
                   "motorcycle", "bicycle"),
)

# SYNTHIA labels 16 of the 19 classes (no terrain, truck, train). Papers report the mIoU over those 16 and
# over 13 (also without wall, fence, pole), DAFormer/MIC's tables included.
_SYNTHIA_16 = tuple(n for n in CITYSCAPES.class_names if n not in ("terrain", "truck", "train"))
SYNTHIA_CLASSES = replace(
    CITYSCAPES,
    present=_SYNTHIA_16,
    subsets=(("miou16", _SYNTHIA_16), ("miou13", tuple(n for n in _SYNTHIA_16 if n not in ("wall", "fence", "pole")))),
)
