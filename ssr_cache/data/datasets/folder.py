"""A user's own domain: a folder of images, optional labels, and the classes in a small TOML file.

    ROOT/classes.toml
    ROOT/images/**/NAME.{png,jpg,jpeg,webp}    (any case, nested folders; ROOT/images/SPLIT/ if it exists)
    ROOT/labels/**/NAME.png                    (optional; same relative path and stem; 8-bit greyscale or
                                                palette PNG of label values)

classes.toml:

    names = ["soil", "crop", "weed"]             # train ids 0..N-1, in this order
    palette = [[0,0,0], [0,255,0], [255,0,0]]    # optional (default: Cityscapes colours for the 19
                                                 # Cityscapes classes, else a fixed distinct palette)
    thing_classes = ["weed"]                     # optional: FD's classes (default none: FD off)
    [label_values]                               # optional; default: value i = class i, 255 = ignore
    soil = [0]
    crop = [10, 11]
    weed = [20]

Label values not listed are ignored (counted as "unlisted" by `ssr data stats` and the build). A folder
whose names are the 19 Cityscapes classes in order gets the Cityscapes label space, so a BDD100K or
Mapillary subset mapped to them is evaluated like a Cityscapes target. No DAFormer default size exists for
own data: `--resize` (WxH, or one number = the short side, keeping the ratio) defaults to short side 512.
"""

from __future__ import annotations

import colorsys
import sys
from pathlib import Path

import numpy as np

from ssr_cache.data.datasets.base import SHORT_SIDE_ONLY, SampleFiles, SegmentationDataset
from ssr_cache.data.label_space import CITYSCAPES, LabelSpace
from ssr_cache.data.labels import IGNORE_INDEX
from ssr_cache.data.png_io import read_label_ids
from ssr_cache.errors import SSRError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CLASSES_FILE = "classes.toml"
_KEYS = {"name", "names", "palette", "thing_classes", "label_values"}


def distinct_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """n well-separated colours (golden-ratio hues), the same for the same n."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 else 0.7)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return tuple(colours)


def read_classes(root: Path) -> tuple[LabelSpace, np.ndarray]:
    """The label space of ROOT/classes.toml and the (256,) uint8 lookup table label value → train id."""
    path = root / CLASSES_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SSRError(f"{path} not found: a folder dataset names its classes there "
                       '(names = ["a", "b", ...]; see docs/own-domain.md)') from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SSRError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise SSRError(f"{path}: unknown key(s) {', '.join(unknown)}; expected names, palette, thing_classes, "
                       "label_values, name")
    names = data.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise SSRError(f"{path}: `names` must be a non-empty list of class names")
    if len(names) >= IGNORE_INDEX:
        raise SSRError(f"{path}: at most {IGNORE_INDEX - 1} classes fit 8-bit train ids, got {len(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SSRError(f"{path}: duplicate class name(s) {', '.join(dup)}")
    cityscapes = tuple(names) == CITYSCAPES.class_names
    palette = data.get("palette")
    if palette is None:
        palette = CITYSCAPES.palette if cityscapes else distinct_palette(len(names))
    elif (not isinstance(palette, list) or len(palette) != len(names)
          or not all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                     for c in palette)):
        raise SSRError(f"{path}: `palette` must hold {len(names)} [r, g, b] triples in 0..255")
    things = data.get("thing_classes", CITYSCAPES.thing_classes if cityscapes else [])
    if not isinstance(things, list | tuple) or any(t not in names for t in things):
        raise SSRError(f"{path}: `thing_classes` must be a list of names from `names`")
    lut = _label_lut(path, names, data.get("label_values"))
    space = LabelSpace(name="cityscapes" if cityscapes else str(data.get("name", root.name)), class_names=names,
                       palette=palette, thing_classes=tuple(things))
    return space, lut


def _label_lut(path: Path, names: list[str], values) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    if values is None:
        lut[: len(names)] = np.arange(len(names))
        return lut
    if not isinstance(values, dict):
        raise SSRError(f"{path}: [label_values] must be a table of class name = [values]")
    owner: dict[int, str] = {}
    for name, vals in values.items():
        if name not in names:
            raise SSRError(f"{path}: [label_values] names {name!r}, which is not in `names`")
        vals = [vals] if isinstance(vals, int) else vals
        if not isinstance(vals, list) or not all(isinstance(v, int) and 0 <= v <= 255 for v in vals):
            raise SSRError(f"{path}: label values of {name!r} must be integers in 0..255")
        for v in vals:
            if v in owner and owner[v] != name:
                raise SSRError(f"{path}: label value {v} is mapped to two classes, {owner[v]!r} and {name!r}")
            owner[v] = name
            lut[v] = names.index(name)
    return lut


class Folder(SegmentationDataset):
    name = "folder"
    resize_to = (SHORT_SIDE_ONLY, 512)

    def __init__(self, root, split: str = "train", require_labels: bool = True, conditions=None) -> None:
        self.label_space, self.label_lut = read_classes(Path(root))
        # The raw value that counts as "ignore" without being "unlisted": 255 unless it maps to a class.
        self._unlisted = self.label_lut == IGNORE_INDEX
        self._unlisted[IGNORE_INDEX] = False
        super().__init__(root, split, require_labels, conditions)

    def labelled_by_default(self) -> bool:
        return self.has_labels

    def _image_root(self) -> tuple[Path, str]:
        images = self.root / "images"
        if not images.is_dir():
            raise SSRError(f"{self.root} is not a folder dataset: {images} does not exist")
        if (images / self.split).is_dir():
            return images / self.split, self.split
        if self.split in ("train", "all"):
            return images, ""
        raise SSRError(f"folder dataset has no split {self.split!r}: {images / self.split} does not exist")

    def _find_items(self) -> list[SampleFiles]:
        image_root, sub = self._image_root()
        label_root = self.root / "labels" / sub if sub else self.root / "labels"
        items, seen = [], {}
        for path in sorted(p for p in image_root.rglob("*") if p.is_file()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
                continue
            rel = path.relative_to(image_root).with_suffix("")
            sample_id = rel.as_posix()
            if sample_id in seen:
                raise SSRError(f"{path} and {seen[sample_id]} have the same name: one label cannot serve both")
            seen[sample_id] = path
            label = label_root / rel.parent / (rel.name + ".png")
            items.append(SampleFiles(sample_id, path, label if label.is_file() else None))
        if not items:
            raise SSRError(f"no images found under {image_root} (extensions {', '.join(IMAGE_EXTENSIONS)}, any case)")
        return items

    def _expected_label(self, item: SampleFiles) -> Path:
        image_root, sub = self._image_root()
        rel = Path(item.sample_id)
        return (self.root / "labels" / sub / rel.parent / (rel.name + ".png")) if sub else \
            (self.root / "labels" / rel.parent / (rel.name + ".png"))

    def _decode_label(self, path: Path) -> tuple[np.ndarray, int]:
        raw = read_label_ids(path)
        return self.label_lut[raw], int(self._unlisted[raw].sum())
