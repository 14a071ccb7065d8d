"""The Cityscapes label table and the lookup tables derived from it.

Both domains share it. Cityscapes `*_gtFine_labelIds.png` files are greyscale PNGs of label ids. GTA5
(Richter et al., "Playing for Data") labels are palette-mode PNGs whose pixel *index* is the Cityscapes
label id; their palette holds the Cityscapes colours, so a viewer shows the usual colour coding while
the raw indices are what we read. Either way, label ids are mapped to the 19 training ids on the fly
with `ID_TO_TRAINID`; everything else (void, parking, rail track, guard rail, …) becomes `IGNORE_INDEX`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssr_cache.data.opencv import cv2
from ssr_cache.errors import SSRError


@dataclass(frozen=True)
class Label:
    name: str
    id: int  # value in *_labelIds.png / GTA5 palette index; -1 only for the license plate
    train_id: int  # 0..18, or 255 (ignored in training), or -1 (license plate)
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    #     name                    id  trainId  category        catId  instances  ignore  color
    Label("unlabeled",             0,  255,    "void",          0,    False,     True,   (0, 0, 0)),
    Label("ego vehicle",           1,  255,    "void",          0,    False,     True,   (0, 0, 0)),
    Label("rectification border",  2,  255,    "void",          0,    False,     True,   (0, 0, 0)),
    Label("out of roi",            3,  255,    "void",          0,    False,     True,   (0, 0, 0)),
    Label("static",                4,  255,    "void",          0,    False,     True,   (0, 0, 0)),
    Label("dynamic",               5,  255,    "void",          0,    False,     True,   (111, 74, 0)),
    Label("ground",                6,  255,    "void",          0,    False,     True,   (81, 0, 81)),
    Label("road",                  7,    0,    "flat",          1,    False,     False,  (128, 64, 128)),
    Label("sidewalk",              8,    1,    "flat",          1,    False,     False,  (244, 35, 232)),
    Label("parking",               9,  255,    "flat",          1,    False,     True,   (250, 170, 160)),
    Label("rail track",           10,  255,    "flat",          1,    False,     True,   (230, 150, 140)),
    Label("building",             11,    2,    "construction",  2,    False,     False,  (70, 70, 70)),
    Label("wall",                 12,    3,    "construction",  2,    False,     False,  (102, 102, 156)),
    Label("fence",                13,    4,    "construction",  2,    False,     False,  (190, 153, 153)),
    Label("guard rail",           14,  255,    "construction",  2,    False,     True,   (180, 165, 180)),
    Label("bridge",               15,  255,    "construction",  2,    False,     True,   (150, 100, 100)),
    Label("tunnel",               16,  255,    "construction",  2,    False,     True,   (150, 120, 90)),
    Label("pole",                 17,    5,    "object",        3,    False,     False,  (153, 153, 153)),
    Label("polegroup",            18,  255,    "object",        3,    False,     True,   (153, 153, 153)),
    Label("traffic light",        19,    6,    "object",        3,    False,     False,  (250, 170, 30)),
    Label("traffic sign",         20,    7,    "object",        3,    False,     False,  (220, 220, 0)),
    Label("vegetation",           21,    8,    "nature",        4,    False,     False,  (107, 142, 35)),
    Label("terrain",              22,    9,    "nature",        4,    False,     False,  (152, 251, 152)),
    Label("sky",                  23,   10,    "sky",           5,    False,     False,  (70, 130, 180)),
    Label("person",               24,   11,    "human",         6,    True,      False,  (220, 20, 60)),
    Label("rider",                25,   12,    "human",         6,    True,      False,  (255, 0, 0)),
    Label("car",                  26,   13,    "vehicle",       7,    True,      False,  (0, 0, 142)),
    Label("truck",                27,   14,    "vehicle",       7,    True,      False,  (0, 0, 70)),
    Label("bus",                  28,   15,    "vehicle",       7,    True,      False,  (0, 60, 100)),
    Label("caravan",              29,  255,    "vehicle",       7,    True,      True,   (0, 0, 90)),
    Label("trailer",              30,  255,    "vehicle",       7,    True,      True,   (0, 0, 110)),
    Label("train",                31,   16,    "vehicle",       7,    True,      False,  (0, 80, 100)),
    Label("motorcycle",           32,   17,    "vehicle",       7,    True,      False,  (0, 0, 230)),
    Label("bicycle",              33,   18,    "vehicle",       7,    True,      False,  (119, 11, 32)),
    Label("license plate",        -1,   -1,    "vehicle",       7,    False,     True,   (0, 0, 142)),
)
# fmt: on

NUM_CLASSES = 19
IGNORE_INDEX = 255

# Ids that can appear in a label file (the license plate's -1 cannot: it is never stored in a PNG).
VALID_IDS: tuple[int, ...] = tuple(label.id for label in LABELS if label.id >= 0)
MAX_ID = max(VALID_IDS)

_TRAIN_LABELS = sorted((label for label in LABELS if 0 <= label.train_id < NUM_CLASSES), key=lambda lb: lb.train_id)
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _TRAIN_LABELS)
PALETTE = np.array([label.color for label in _TRAIN_LABELS], dtype=np.uint8)  # (19, 3), trainId order


def _build_luts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    id_to_train = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    train_to_id = np.zeros(256, dtype=np.uint8)  # ignored / unknown train ids → 0 ("unlabeled")
    id_palette = np.zeros((256, 3), dtype=np.uint8)
    for label in LABELS:
        if label.id < 0:
            continue
        id_palette[label.id] = label.color
        if 0 <= label.train_id < NUM_CLASSES:
            id_to_train[label.id] = label.train_id
            train_to_id[label.train_id] = label.id
    return id_to_train, train_to_id, id_palette


ID_TO_TRAINID, TRAINID_TO_ID, ID_PALETTE = _build_luts()
# ID_PALETTE: (256, 3) colour of each label id — the palette of a GTA5-style label PNG.

# Colour of each train id for visualising predictions; 255 (ignored) stays black.
TRAINID_PALETTE = np.zeros((256, 3), dtype=np.uint8)
TRAINID_PALETTE[:NUM_CLASSES] = PALETTE


def count_values(values: np.ndarray) -> np.ndarray:
    """How often each value 0..255 occurs in a uint8 array: int64 (256,).

    cv2.calcHist counts uint8 pixels in place, ~4x faster than np.bincount (which first widens every pixel to
    int64). Its float32 counts are exact below 2**24 per bin, so larger arrays take bincount.
    """
    values = np.ascontiguousarray(values)
    if values.dtype != np.uint8:
        raise ValueError(f"count_values takes uint8, got {values.dtype}")
    if values.size >= 2**24 or values.size == 0:
        return np.bincount(values.ravel(), minlength=256).astype(np.int64)
    hist = cv2.calcHist([values.reshape(1, -1)], [0], None, [256], [0, 256])  # one row: fastest layout
    return hist.ravel().astype(np.int64)


def ids_to_train_ids(label_ids: np.ndarray, source: str) -> np.ndarray:
    """Map an array of Cityscapes label ids to train ids (uint8, same shape); `source` names the file."""
    label_ids = np.asarray(label_ids)
    if label_ids.dtype != np.uint8:
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
            raise SSRError(f"{source}: label ids must lie in 0..{MAX_ID}, found {int(label_ids.min())}..{int(label_ids.max())}")
        label_ids = label_ids.astype(np.uint8)
    if label_ids.size:
        highest = int(label_ids.max())
        if highest > MAX_ID:
            raise SSRError(f"{source}: label id {highest} is not in the Cityscapes table (ids 0..{MAX_ID})")
    if label_ids.ndim == 2 and label_ids.size:
        return cv2.LUT(np.ascontiguousarray(label_ids), ID_TO_TRAINID)  # the same table lookup, ~5x faster
    return ID_TO_TRAINID[label_ids]


def check_train_ids(train_ids: np.ndarray, source: str) -> np.ndarray:
    """Validate an array that already holds train ids (0..18 or 255), as in `*_labelTrainIds.png`; returned
    writable (a copy of a read-only input)."""
    train_ids = np.asarray(train_ids, dtype=np.uint8)
    if not train_ids.flags.writeable:
        train_ids = train_ids.copy()
    bad = (train_ids >= NUM_CLASSES) & (train_ids != IGNORE_INDEX)
    if bad.any():
        raise SSRError(f"{source}: train id {int(train_ids[bad][0])} is not valid (0..{NUM_CLASSES - 1} or {IGNORE_INDEX})")
    return train_ids
