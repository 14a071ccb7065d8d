"""Cityscapes: ROOT/leftImg8bit/SPLIT/CITY/CITY_SEQ_FRAME_leftImg8bit.png with
ROOT/gtFine/SPLIT/CITY/CITY_SEQ_FRAME_gtFine_labelTrainIds.png (preferred) or _gtFine_labelIds.png.

The unlabelled target of GTA/SYNTHIA→Cityscapes (train) and the labelled evaluation set (val); as the
labelled source of CS→ACDC and CS→Dark Zurich, build its train split with `--labelled`. DAFormer resizes
it to 1024×512 in every role."""

from __future__ import annotations

from pathlib import Path

from ssr_cache.data.datasets.base import SampleFiles, SegmentationDataset, sorted_files
from ssr_cache.errors import SSRError

_TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
_LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
_IMAGE_SUFFIX = "_leftImg8bit.png"


class Cityscapes(SegmentationDataset):
    name = "cityscapes"
    resize_to = (1024, 512)
    labelled_splits = ("val",)

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
            labels = {path.name for path in sorted_files(label_dir, "*.png")}
            for image in sorted_files(city_dir, f"*{_IMAGE_SUFFIX}"):
                sample_id = image.name[: -len(_IMAGE_SUFFIX)]
                label = next((label_dir / (sample_id + suffix) for suffix in (_TRAIN_IDS_SUFFIX, _LABEL_IDS_SUFFIX)
                              if sample_id + suffix in labels), None)
                items.append(SampleFiles(sample_id, image, label))
        if not items:
            raise SSRError(f"no cityscapes images found: looked for {split_dir}/*/*{_IMAGE_SUFFIX}")
        return items

    def _expected_label(self, item: SampleFiles) -> Path:
        return self.root / "gtFine" / self.split / item.image.parent.name / (item.sample_id + _LABEL_IDS_SUFFIX)
