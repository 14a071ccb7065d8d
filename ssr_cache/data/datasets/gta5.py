"""GTA5 ("Playing for Data"): ROOT/images/NNNNN.png, ROOT/labels/NNNNN.png (palette PNG, index = Cityscapes
label id). The labelled source of GTA→Cityscapes; DAFormer resizes it to 1280×720."""

from __future__ import annotations

from pathlib import Path

from ssr_cache.data.datasets.base import SampleFiles, SegmentationDataset, sorted_files
from ssr_cache.errors import SSRError


class GTA5(SegmentationDataset):
    name = "gta5"
    resize_to = (1280, 720)
    splits = ("train", "all")  # GTA5 has no official split: both mean the whole set (24,966 pairs)
    labelled_splits = splits

    def _find_items(self) -> list[SampleFiles]:
        if self.split not in self.splits:
            raise SSRError(f"gta5 has no split {self.split!r}; choose one of: {', '.join(self.splits)}")
        image_dir, label_dir = self.root / "images", self.root / "labels"
        images = sorted_files(image_dir, "*.png")
        if not images:
            raise SSRError(f"no gta5 images found: looked for {image_dir}/*.png")
        labels = {path.name for path in sorted_files(label_dir, "*.png")}
        return [SampleFiles(path.stem, path, label_dir / path.name if path.name in labels else None)
                for path in images]

    def _expected_label(self, item: SampleFiles) -> Path:
        return self.root / "labels" / item.image.name
