"""Dark Zurich (1920×1080), as downloaded (DAFormer uses the same layout):

    ROOT/rgb_anon/train/{day,twilight,night}/SEQ/SEQ_frame_NNNNNN_rgb_anon.png     (no labels)
    ROOT/rgb_anon/val/night/SEQ/SEQ_frame_NNNNNN_rgb_anon.png
    ROOT/gt/val/night/SEQ/SEQ_frame_NNNNNN_gt_labelTrainIds.png (preferred) or _gt_labelIds.png

The target of CS→Dark Zurich is the night part only by default, as in DAFormer (`--conditions` selects
others); resize 960×540, 512 crops, no cat_max_ratio.
"""

from __future__ import annotations

from pathlib import Path

from ssr_cache.data.datasets.acdc import IMAGE_SUFFIX, LABEL_SUFFIXES, find_condition_items
from ssr_cache.data.datasets.base import SampleFiles, SegmentationDataset
from ssr_cache.errors import SSRError


class DarkZurich(SegmentationDataset):
    name = "dark_zurich"
    resize_to = (960, 540)
    conditions = ("day", "twilight", "night")
    default_conditions = ("night",)
    labelled_splits = ("val",)

    def _find_items(self) -> list[SampleFiles]:
        split_dir = self.root / "rgb_anon" / self.split
        found = [c for c in self.conditions if (split_dir / c).is_dir()]
        if not found:
            raise SSRError(f"{self.root} is not a Dark Zurich root: expected rgb_anon/{self.split}/"
                           f"{{{','.join(self.conditions)}}}/SEQ/*{IMAGE_SUFFIX} (the download layout)")
        missing = [c for c in self.selected_conditions if c not in found]
        if missing:
            raise SSRError(f"dark_zurich {self.split} has no {missing[0]} images ({split_dir / missing[0]} does "
                           f"not exist; found {', '.join(found)})")
        items = find_condition_items(self, {c: f"{self.split}/{c}" for c in self.conditions})
        if not items:
            raise SSRError(f"no dark_zurich images found: looked for {split_dir}/"
                           f"{{{','.join(self.selected_conditions)}}}/*/*{IMAGE_SUFFIX}")
        return items

    def _expected_label(self, item: SampleFiles) -> Path:
        stem = item.image.name[: -len(IMAGE_SUFFIX)]
        rel = item.image.parent.relative_to(self.root / "rgb_anon")
        return self.root / "gt" / rel / (stem + LABEL_SUFFIXES[1])
