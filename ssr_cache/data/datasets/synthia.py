"""SYNTHIA-RAND-CITYSCAPES as downloaded: ROOT/RGB/NNNNNNN.png (1280×760) and ROOT/GT/LABELS/NNNNNNN.png.

The label files are 16-bit multi-channel PNGs: class id in the first (R) channel, instance id in the
second. PIL reads them as 8-bit RGB and returns wrong values, so they are decoded with OpenCV (DAFormer's
converter does the same: `cv2.imread(file, cv2.IMREAD_UNCHANGED)[:, :, -1]`, the R of BGR). Class ids map
to the Cityscapes train ids by the SYNTHIA README's table; terrain, truck and train do not exist in
SYNTHIA, so its label space marks 16 classes present (evaluation adds miou16 / miou13). Already converted
`GT/LABELS/NNNNNNN_labelTrainIds.png` files (DAFormer's convert output) are read as train ids.
DAFormer's SYNTHIA config: resize 1280×760, 512 crops, cat_max_ratio 0.75.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssr_cache.data.datasets.base import SampleFiles, SegmentationDataset, sorted_files
from ssr_cache.data.label_space import SYNTHIA_CLASSES
from ssr_cache.data.labels import IGNORE_INDEX, check_train_ids
from ssr_cache.data.png_io import read_label_16bit_red, read_label_ids
from ssr_cache.errors import SSRError

# SYNTHIA class id → Cityscapes train id (SYNTHIA README; DAFormer tools/convert_datasets/synthia.py).
SYNTHIA_TO_TRAINID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
                      19: 15, 12: 17, 11: 18}
_LUT = np.full(1 << 16, IGNORE_INDEX, np.uint8)
for _sid, _tid in SYNTHIA_TO_TRAINID.items():
    _LUT[_sid] = _tid
_TRAIN_IDS_SUFFIX = "_labelTrainIds.png"


class SYNTHIA(SegmentationDataset):
    name = "synthia"
    resize_to = (1280, 760)
    label_space = SYNTHIA_CLASSES
    splits = ("train", "all")  # no official split: both mean the whole set (9,400 pairs)
    labelled_splits = splits

    def _find_items(self) -> list[SampleFiles]:
        if self.split not in self.splits:
            raise SSRError(f"synthia has no split {self.split!r}; choose one of: {', '.join(self.splits)}")
        image_dir, label_dir = self.root / "RGB", self.root / "GT" / "LABELS"
        images = sorted_files(image_dir, "*.png")
        if not images:
            raise SSRError(f"no synthia images found: looked for {image_dir}/*.png")
        labels = {path.name for path in sorted_files(label_dir, "*.png")}
        items = []
        for path in images:
            names = (path.stem + _TRAIN_IDS_SUFFIX, path.name)  # converted train ids win
            label = next((label_dir / n for n in names if n in labels), None)
            items.append(SampleFiles(path.stem, path, label))
        return items

    def _expected_label(self, item: SampleFiles) -> Path:
        return self.root / "GT" / "LABELS" / item.image.name

    def _decode_label(self, path: Path) -> tuple[np.ndarray, int]:
        if path.name.endswith(_TRAIN_IDS_SUFFIX):
            return check_train_ids(read_label_ids(path), str(path)), 0
        return _LUT[read_label_16bit_red(path)], 0
