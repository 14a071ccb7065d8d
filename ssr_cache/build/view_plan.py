"""View planning: which augmented crops ("views") of each image the cache holds, drawn before any SAM work.

A view is (sample, resize, crop box, horizontal flip), following the DAFormer/mmseg training pipeline:
Resize(img_scale, keep_ratio, optional ratio_range) → RandomCrop(crop, cat_max_ratio for labelled
sources) → RandomFlip(p). Each sample's random stream comes from (seed, sample index) only, so a plan is
identical whatever the worker count or order, and can be re-created or resumed per sample.

Resampling (apply_view), recorded in the fingerprint as CROP_DEFINITION so stored crops can be re-created
bit for bit:
  image: cv2.resize(INTER_LINEAR) of the whole image to the view's resized size, then the box — exactly what
    mmcv.imrescale does in the reference pipeline. cv2 computes it in 11-bit fixed point on uint8 (about
    1.5 ms for a GTA5 frame); it lies within 1 grey level of the exact float64 bilinear (half-pixel centres,
    no antialiasing), which tests/test_views.py pins against an independent reference. Views of one image
    that share a resized size share one resize.
  label nearest: source index floor(dst * in / out) — cv2.INTER_NEAREST and torch "nearest"; only the pixels
    inside the box are computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ssr_cache.data.labels import IGNORE_INDEX, count_values
from ssr_cache.data.opencv import cv2
from ssr_cache.errors import SSRError
from ssr_cache.progress import progress_bar

# mmseg RandomCrop's cat_max_ratio rule: draw up to this many crops, keep the first that passes, else the last.
CAT_MAX_TRIES = 10
# The view table's columns as stored: name -> (dtype, per-view shape).
VIEW_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "sample_index": ("int32", ()),
    "scale": ("float32", ()),  # resized / original (mmcv's rescale factor)
    "resized_hw": ("int32", (2,)),
    "box": ("int32", (4,)),  # y0, x0, y1, x1 in the resized image, end exclusive
    "flip": ("bool", ()),
}
# Changes whenever apply_view's output could change; a store built with another definition is refused.
CROP_DEFINITION = "cv2-inter-linear-resize-then-crop-v2"


@dataclass(frozen=True)
class ViewPlanConfig:
    resize: tuple[int, int] = (1280, 720)  # (W, H) img_scale; keep_ratio rescale
    crop: tuple[int, int] = (512, 512)  # (H, W)
    ratio_range: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.5
    cat_max_ratio: float | None = 0.75  # None (or >= 1) disables the rule
    views_per_image: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views_per_image <= 0:
            raise SSRError(f"views per image must be at least 1, got {self.views_per_image}")
        if len(self.crop) != 2 or min(self.crop) <= 0:
            raise SSRError(f"crop must be two positive sizes (H, W), got {tuple(self.crop)}")
        if len(self.resize) != 2 or min(self.resize) <= 0:
            raise SSRError(f"resize must be two positive sizes (W, H), got {tuple(self.resize)}")
        lo, hi = (float(r) for r in self.ratio_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise SSRError(f"ratio range must satisfy 0 < low <= high, got ({lo:g}, {hi:g})")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise SSRError(f"flip probability must be in [0, 1], got {self.flip_prob:g}")
        if self.cat_max_ratio is not None and not self.cat_max_ratio > 0:
            raise SSRError(f"cat_max_ratio must be positive (or None to disable), got {self.cat_max_ratio:g}")
        if self.seed < 0:
            raise SSRError(f"seed must be non-negative, got {self.seed}")


@dataclass(frozen=True)
class View:
    sample_index: int
    scale: float  # resized / original (mmcv's rescale factor)
    resized_hw: tuple[int, int]
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1) in resized coordinates, end exclusive
    flip: bool


@dataclass(frozen=True, eq=False)
class ViewTable:
    sample_index: np.ndarray  # int32 (N,)
    scale: np.ndarray  # float32 (N,)
    resized_hw: np.ndarray  # int32 (N, 2)
    box: np.ndarray  # int32 (N, 4)
    flip: np.ndarray  # bool (N,)

    def __len__(self) -> int:
        return len(self.sample_index)

    def row(self, i: int) -> View:
        return View(sample_index=int(self.sample_index[i]), scale=float(self.scale[i]),
                    resized_hw=(int(self.resized_hw[i, 0]), int(self.resized_hw[i, 1])),
                    box=tuple(int(v) for v in self.box[i]), flip=bool(self.flip[i]))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """{column: array} for every name of VIEW_COLUMNS."""
        return {name: getattr(self, name) for name in VIEW_COLUMNS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ViewTable:
        missing = [name for name in VIEW_COLUMNS if name not in arrays]
        if missing:
            raise SSRError(f"view table is missing arrays: {', '.join(missing)}")
        table = cls(
            sample_index=np.asarray(arrays["sample_index"], np.int32),
            scale=np.asarray(arrays["scale"], np.float32),
            resized_hw=np.asarray(arrays["resized_hw"], np.int32).reshape(-1, 2),
            box=np.asarray(arrays["box"], np.int32).reshape(-1, 4),
            flip=np.asarray(arrays["flip"], bool),
        )
        if len({len(a) for a in table.to_arrays().values()}) != 1:
            raise SSRError("view table arrays differ in length")
        return table

    def digest(self) -> str:
        """sha256 over names, dtypes, shapes and little-endian bytes: stable across machines."""
        h = hashlib.sha256(b"ssr-view-table-v1")
        for name, a in self.to_arrays().items():
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()


def rescale_size(size_wh: tuple[int, int], scale_wh: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """mmcv keep-ratio rescale: factor = min(long_max / long_edge, short_max / short_edge); new (W, H)."""
    w, h = size_wh
    factor = min(max(scale_wh) / max(w, h), min(scale_wh) / min(w, h))
    return (int(w * factor + 0.5), int(h * factor + 0.5)), factor


def ratio_scale(resize_wh: tuple[int, int], ratio: float) -> tuple[int, int]:
    """mmseg Resize with ratio_range: the img_scale multiplied by the drawn ratio, truncated."""
    return int(resize_wh[0] * ratio), int(resize_wh[1] * ratio)


def plan_views(image_sizes: Sequence[tuple[int, int]], config: ViewPlanConfig,
               label_loader: Callable[[int], np.ndarray] | None = None, progress: bool = True,
               workers: int = 1) -> ViewTable:
    """K views per image, ordered by sample then view index. image_sizes: (W, H) per sample.

    label_loader(i), when given, is called once for every sample (whether or not the cat_max_ratio rule is
    on, so whatever else it gathers, such as class counts, is complete) and returns sample i's trainId map
    (uint8, original size). Labels are loaded in `workers` threads; the table does not depend on it.
    """
    _check_crop_fits(image_sizes, config)

    def plan_one(i: int) -> list[View]:
        label = None if label_loader is None else label_loader(i)
        return plan_sample(i, tuple(image_sizes[i]), config, label)

    rows: list[View] = []
    with _progress(progress, len(image_sizes)) as advance:
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                for views in pool.map(plan_one, range(len(image_sizes))):
                    rows += views
                    advance()
        else:
            for i in range(len(image_sizes)):
                rows += plan_one(i)
                advance()
    return ViewTable(
        sample_index=np.array([v.sample_index for v in rows], np.int32),
        scale=np.array([v.scale for v in rows], np.float32),
        resized_hw=np.array([v.resized_hw for v in rows], np.int32).reshape(-1, 2),
        box=np.array([v.box for v in rows], np.int32).reshape(-1, 4),
        flip=np.array([v.flip for v in rows], bool),
    )


def plan_sample(sample_index: int, size_wh: tuple[int, int], config: ViewPlanConfig,
                label: np.ndarray | None = None) -> list[View]:
    """One sample's K views from its own random stream (seed, sample_index)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, sample_index]))
    lo, hi = config.ratio_range
    crop_h, crop_w = config.crop
    rule = label is not None and config.cat_max_ratio is not None and config.cat_max_ratio < 1
    if label is not None and tuple(label.shape[:2]) != (size_wh[1], size_wh[0]):
        raise SSRError(f"sample {sample_index}: label is {label.shape[1]}x{label.shape[0]}, "
                       f"image is {size_wh[0]}x{size_wh[1]}")
    views = []
    for _ in range(config.views_per_image):
        ratio = lo + rng.random() * (hi - lo)  # drawn even when lo == hi: the stream does not depend on it
        (new_w, new_h), factor = rescale_size(size_wh, ratio_scale(config.resize, ratio))
        box = _random_box(rng, (new_h, new_w), (crop_h, crop_w))
        if rule:
            for _ in range(CAT_MAX_TRIES - 1):
                if _crop_is_varied(label, (new_h, new_w), box, config.cat_max_ratio):
                    break
                box = _random_box(rng, (new_h, new_w), (crop_h, crop_w))
        flip = bool(rng.random() < config.flip_prob)
        views.append(View(sample_index, float(np.float32(factor)), (new_h, new_w), box, flip))
    return views


def _random_box(rng: np.random.Generator, hw: tuple[int, int], crop_hw: tuple[int, int]):
    y0 = int(rng.integers(0, hw[0] - crop_hw[0] + 1))
    x0 = int(rng.integers(0, hw[1] - crop_hw[1] + 1))
    return y0, x0, y0 + crop_hw[0], x0 + crop_hw[1]


def _crop_is_varied(label: np.ndarray, resized_hw: tuple[int, int], box, cat_max_ratio: float) -> bool:
    """mmseg's rule: more than one labelled class, and the largest below cat_max_ratio of labelled pixels."""
    counts = count_values(_nearest_crop(label, resized_hw, box))
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _check_crop_fits(image_sizes: Sequence[tuple[int, int]], config: ViewPlanConfig) -> None:
    # The smallest ratio gives the smallest resized image; check it once per distinct size before any work.
    scale = ratio_scale(config.resize, config.ratio_range[0])
    crop_h, crop_w = config.crop
    for size in sorted({tuple(s) for s in image_sizes}):
        (w, h), _ = rescale_size(size, scale)
        if crop_h > h or crop_w > w:
            raise SSRError(f"crop {crop_w}x{crop_h} is larger than the resized image {w}x{h} "
                           f"(a {size[0]}x{size[1]} image resized to fit {scale[0]}x{scale[1]})")


# ---------------------------------------------------------------- applying a view


def apply_view(image: np.ndarray, label: np.ndarray | None, view: View) -> tuple[np.ndarray, np.ndarray | None]:
    """(crop uint8 (h, w, 3), label crop uint8 (h, w) or None): resize, crop the box, flip."""
    return apply_views(image, label, [view])[0]


def apply_views(image: np.ndarray, label: np.ndarray | None, views: Sequence[View]
                ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """`apply_view` for several views of one image; views sharing a resized size share one resize."""
    if not views:
        return []
    h, w = views[0].box[2] - views[0].box[0], views[0].box[3] - views[0].box[1]
    pixels = np.empty((len(views), h, w, 3), np.uint8)
    labels = None if label is None else np.empty((len(views), h, w), np.uint8)
    write_view_crops(image, label, views, pixels, labels)
    return [(pixels[i], None if labels is None else labels[i]) for i in range(len(views))]


def write_view_crops(image: np.ndarray, label: np.ndarray | None, views: Sequence[View], pixels: np.ndarray,
                     labels: np.ndarray | None) -> None:
    """`apply_views` written into `pixels[i]` (n, h, w, 3) and, when both `label` and `labels` are given,
    `labels[i]` (n, h, w): for callers that own where crops go (the build's decoding workers: shared memory).
    A flipped crop goes through cv2.flip and a flipped label through reversed gather columns: numpy's copy of
    a reversed 3-byte-pixel view takes 60x longer than a plain copy (1.8 ms per 512 crop)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SSRError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if label is not None and label.shape[:2] != image.shape[:2]:
        raise SSRError(f"label shape {label.shape[:2]} differs from image shape {image.shape[:2]}")
    resized: dict[tuple[int, int], np.ndarray] = {}
    for i, view in enumerate(views):
        if view.resized_hw not in resized:
            resized[view.resized_hw] = resize_image(image, view.resized_hw)
        y0, x0, y1, x1 = view.box
        crop = resized[view.resized_hw][y0:y1, x0:x1]
        if view.flip:
            cv2.flip(crop, 1, dst=pixels[i])
        else:
            pixels[i] = crop
        if label is not None and labels is not None:
            _nearest_crop(np.asarray(label, np.uint8), view.resized_hw, view.box, flip=view.flip, out=labels[i])


def resize_image(image: np.ndarray, resized_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) → (h, w, 3) by cv2 INTER_LINEAR, as mmcv.imrescale (no copy when the size is the same)."""
    h, w = resized_hw
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_LINEAR)


def _nearest_crop(label: np.ndarray, resized_hw: tuple[int, int], box, *, flip: bool = False,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The box of the label resized by nearest neighbour (C-contiguous; into `out` when given)."""
    y0, x0, y1, x1 = box
    in_h, in_w = label.shape[:2]
    rows = np.minimum((np.arange(y0, y1) * (in_h / resized_hw[0])).astype(np.int64), in_h - 1)
    cols = np.minimum((np.arange(x0, x1) * (in_w / resized_hw[1])).astype(np.int64), in_w - 1)
    # Rows, then columns by take: label[rows][:, cols] would give a column-major result that costs a
    # second, strided pass to make contiguous (2.5x the whole gather). mode="clip" lets take write into
    # `out` unbuffered; every index is in range already.
    return np.take(label[rows], cols[::-1] if flip else cols, axis=1, out=out, mode="clip")


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar over samples (or nothing); yields a function that advances it by one."""
    if not enabled:
        yield lambda: None
        return
    with progress_bar("planning views", unit="img", transient=True) as bar:
        task = bar.add_task("", total=total, info="")
        yield lambda: bar.advance(task)
