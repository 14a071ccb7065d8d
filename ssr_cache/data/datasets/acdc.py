"""ACDC (adverse conditions; 1920×1080), as downloaded or in DAFormer's flattened layout.

    download   ROOT/rgb_anon/COND/SPLIT/SEQ/SEQ_frame_NNNNNN_rgb_anon.png
               ROOT/gt/COND/SPLIT/SEQ/SEQ_frame_NNNNNN_gt_labelTrainIds.png  (preferred) or _gt_labelIds.png
    flattened  ROOT/rgb_anon/SPLIT/*_rgb_anon.png, ROOT/gt/SPLIT/*_gt_labelTrainIds.png (DAFormer's README
               rsyncs the download into this; the condition is no longer in the path)

COND is fog, night, rain or snow (`--conditions`, default all); `_gt_labelColor.png` and `_gt_invIds.png`
are ignored. The target of CS→ACDC; DAFormer resizes it to 960×540, 512 crops, no cat_max_ratio.
"""

from __future__ import annotations

from pathlib import Path

from ssr_cache.data.datasets.base import SampleFiles, SegmentationDataset, sorted_files
from ssr_cache.errors import SSRError

IMAGE_SUFFIX = "_rgb_anon.png"
LABEL_SUFFIXES = ("_gt_labelTrainIds.png", "_gt_labelIds.png")


def find_condition_items(ds: SegmentationDataset, splits_of: dict[str, str]) -> list[SampleFiles]:
    """Samples of the download layout rgb_anon/COND/SPLIT/SEQ/ (ACDC) — or rgb_anon/SPLIT/COND/SEQ/ (Dark
    Zurich) —, for the selected conditions. `splits_of` maps each condition to its image folder relative
    to rgb_anon/ (the gt/ folder mirrors it)."""
    items = []
    for cond in ds.selected_conditions:
        rel = splits_of[cond]
        for image in sorted_files(ds.root / "rgb_anon" / rel, f"*/*{IMAGE_SUFFIX}"):
            stem = image.name[: -len(IMAGE_SUFFIX)]
            label_dir = ds.root / "gt" / rel / image.parent.name
            label = next((label_dir / (stem + s) for s in LABEL_SUFFIXES if (label_dir / (stem + s)).is_file()), None)
            items.append(SampleFiles(f"{cond}/{stem}", image, label))
    return items


class ACDC(SegmentationDataset):
    name = "acdc"
    resize_to = (960, 540)
    conditions = ("fog", "night", "rain", "snow")
    labelled_splits = ("val",)

    def _find_items(self) -> list[SampleFiles]:
        rgb = self.root / "rgb_anon"
        if any((rgb / c).is_dir() for c in self.conditions):
            items = find_condition_items(self, {c: f"{c}/{self.split}" for c in self.conditions})
            where = f"{rgb}/{{{','.join(self.selected_conditions)}}}/{self.split}/*/*{IMAGE_SUFFIX}"
        elif (rgb / self.split).is_dir():
            if self.selected_conditions != self.conditions:
                raise SSRError(f"{rgb / self.split} is ACDC's flattened layout, which does not keep the "
                               "condition of an image: --conditions needs the download layout")
            items = []
            for image in sorted_files(rgb / self.split, f"*{IMAGE_SUFFIX}"):
                stem = image.name[: -len(IMAGE_SUFFIX)]
                label_dir = self.root / "gt" / self.split
                label = next((label_dir / (stem + s) for s in LABEL_SUFFIXES if (label_dir / (stem + s)).is_file()),
                             None)
                items.append(SampleFiles(stem, image, label))
            where = f"{rgb / self.split}/*{IMAGE_SUFFIX}"
        else:
            raise SSRError(f"{self.root} is not an ACDC root: expected rgb_anon/{{fog,night,rain,snow}}/{self.split}/ "
                           f"(download layout) or rgb_anon/{self.split}/ (DAFormer's flattened layout)")
        if not items:
            raise SSRError(f"no acdc images found: looked for {where}")
        return items

    def _expected_label(self, item: SampleFiles) -> Path:
        stem = item.image.name[: -len(IMAGE_SUFFIX)]
        rel = item.image.parent.relative_to(self.root / "rgb_anon")
        return self.root / "gt" / rel / (stem + LABEL_SUFFIXES[1])
