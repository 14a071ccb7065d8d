"""Writing predictions: label PNGs at the input's resolution, colour PNGs and overlays, each atomically.

For an input whose relative output path is ``REL`` (``ssr_train.infer.image_files``), the kinds asked for
are written to::

    OUT/trainIds/REL.png   greyscale class indices of the run's label space (its train ids; ignore = never)
    OUT/labelIds/REL.png   Cityscapes label ids — what cityscapesscripts and the benchmark server read; only
                           for the Cityscapes label space. Point CITYSCAPES_RESULTS at OUT/labelIds.
    OUT/color/REL.png      palette PNG: index = train id, palette = the label space's colours
    OUT/overlay/REL.jpg    the image blended with the colours; with a ground truth: image | prediction |
                           ground truth side by side (ignored pixels black)

Encoding runs on a small thread pool (PIL releases the GIL while compressing), with a bounded number of
pending images so memory stays flat over a long job.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ssr_cache.atomic_file import write_atomic
from ssr_cache.data.label_space import CITYSCAPES, LabelSpace
from ssr_cache.data.labels import TRAINID_TO_ID
from ssr_cache.data.png_io import write_png_atomic
from ssr_cache.errors import SSRError

KINDS = {"trainid": "trainIds", "labelid": "labelIds", "color": "color", "overlay": "overlay"}
OVERLAY_ALPHA = 0.5


def parse_kinds(text: str | list[str], label_space: LabelSpace) -> tuple[str, ...]:
    """'trainid,color' → ('trainid', 'color'); labelid only for the Cityscapes label space."""
    kinds = [k.strip().lower() for k in (text.split(",") if isinstance(text, str) else text) if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise SSRError(f"--save takes a comma-separated list of {', '.join(KINDS)}, got {text!r}")
    if "labelid" in kinds and not is_cityscapes(label_space):
        raise SSRError(f"labelid outputs exist only for the Cityscapes label space; this model predicts "
                       f"{label_space.name} ({label_space.num_classes} classes): use trainid")
    return tuple(dict.fromkeys(kinds))


def is_cityscapes(label_space: LabelSpace) -> bool:
    return label_space.same_classes(CITYSCAPES)


def train_ids_to_label_ids(pred: np.ndarray) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.size and int(pred.max()) >= CITYSCAPES.num_classes:
        raise ValueError(f"predictions must be train ids 0..{CITYSCAPES.num_classes - 1}, found {int(pred.max())}")
    return TRAINID_TO_ID[pred.astype(np.uint8)]


def overlay_image(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, lut: np.ndarray) -> np.ndarray:
    """uint8 RGB: the image blended with the prediction's colours; with ``label``, [blend | prediction |
    ground truth] side by side."""
    if pred.shape != image.shape[:2]:
        raise ValueError(f"prediction shape {pred.shape} differs from image {image.shape[:2]}")
    colours = lut[pred.astype(np.uint8)]
    blend = (image.astype(np.float32) * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA + 0.5).astype(np.uint8)
    if label is None:
        return blend
    return np.concatenate([blend, colours, lut[np.asarray(label, dtype=np.uint8)]], axis=1)


def _write_jpeg_atomic(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    image = Image.fromarray(np.ascontiguousarray(rgb))
    write_atomic(path, lambda handle: image.save(handle, format="JPEG", quality=quality))


class PredictionWriter:
    """Writes the chosen ``kinds`` per image in the background: ``submit(...)`` per image, then ``close()``
    (or use ``with``). At most ``max_pending`` images wait in memory; an error in a write surfaces at the
    next ``submit`` or at ``close``."""

    def __init__(self, out_dir: str | os.PathLike, label_space: LabelSpace, kinds=("labelid", "color", "overlay"),
                 *, threads: int = 2, max_pending: int = 4) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise SSRError(f"output folder {self.out_dir} is a file")
        self.kinds = parse_kinds(list(kinds), label_space)
        self.label_space, self.lut = label_space, label_space.palette_lut()
        for kind in self.kinds:
            try:
                (self.out_dir / KINDS[kind]).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SSRError(f"cannot create output folder {self.out_dir / KINDS[kind]}: {exc.strerror}") from None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssr-preds")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def paths(self, relative: str | os.PathLike) -> dict[str, Path]:
        rel = Path(relative).with_suffix("")
        return {kind: self.out_dir / KINDS[kind] / rel.with_name(rel.name + (".jpg" if kind == "overlay" else ".png"))
                for kind in self.kinds}

    def write(self, relative: str | os.PathLike, image: np.ndarray | None, pred: np.ndarray,
              label: np.ndarray | None = None) -> None:
        """The files of one image; ``pred`` (and ``label``) are train ids at the image's resolution."""
        for kind, path in self.paths(relative).items():
            if kind == "trainid":
                write_png_atomic(path, pred.astype(np.uint8))
            elif kind == "labelid":
                write_png_atomic(path, train_ids_to_label_ids(pred))
            elif kind == "color":
                write_png_atomic(path, pred.astype(np.uint8), palette=self.lut)
            elif image is not None:
                _write_jpeg_atomic(path, overlay_image(image, pred, label, self.lut))

    def submit(self, relative, image: np.ndarray | None, pred: np.ndarray, label: np.ndarray | None = None) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self.write, relative, image, pred, label))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
