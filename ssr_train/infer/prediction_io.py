"""Saving predictions (``ssr eval --save-preds DIR``) in the Cityscapes submission convention.

For an input image ``NAME.png`` (``CITY_SEQ_FRAME_leftImg8bit.png`` for Cityscapes, ``NNNNN.png`` for
GTA5) three files are written, each atomically:

    DIR/labelIds/NAME.png   greyscale (mode L) Cityscapes label ids: what cityscapesscripts evaluates.
                            Its ``getPrediction`` matches a ground truth ``CITY_SEQ_FRAME_gtFine_labelIds.png``
                            to any ``CITY_SEQ_FRAME*.png`` under CITYSCAPES_RESULTS, so point that variable at
                            DIR/labelIds (DIR itself would match the colour file too).
    DIR/color/NAME.png      palette PNG: index = label id, palette = Cityscapes colours (the GTA5 label style).
    DIR/overlay/NAME.jpg    image | prediction | ground truth side by side (ignored pixels black; grey
                            when there is no ground truth).

Encoding runs on a small thread pool (PIL releases the GIL while compressing), with a bounded number of
pending images so memory stays flat over a long evaluation.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ssr_cache.atomic_file import write_atomic
from ssr_cache.data.labels import ID_PALETTE, NUM_CLASSES, TRAINID_PALETTE, TRAINID_TO_ID
from ssr_cache.data.png_io import write_png_atomic
from ssr_cache.errors import SSRError

LABEL_IDS_DIR, COLOR_DIR, OVERLAY_DIR = "labelIds", "color", "overlay"
_NO_LABEL_GREY = 128


def prediction_name(image_path: str | os.PathLike) -> str:
    """The stem every output of this image is named by: the image file's own stem."""
    return Path(image_path).stem


def train_ids_to_label_ids(pred: np.ndarray) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.size and int(pred.max()) >= NUM_CLASSES:
        raise ValueError(f"predictions must be train ids 0..{NUM_CLASSES - 1}, found {int(pred.max())}")
    return TRAINID_TO_ID[pred.astype(np.uint8)]


def overlay_panel(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None) -> np.ndarray:
    """uint8 (H, 3W, 3): the image, the predicted train ids in colour, the ground truth in colour."""
    height, width = image.shape[:2]
    if pred.shape != (height, width):
        raise ValueError(f"prediction shape {pred.shape} differs from image {(height, width)}")
    if label is None:
        truth = np.full((height, width, 3), _NO_LABEL_GREY, dtype=np.uint8)
    else:
        truth = TRAINID_PALETTE[np.asarray(label, dtype=np.uint8)]
    return np.concatenate([image, TRAINID_PALETTE[pred.astype(np.uint8)], truth], axis=1)


def _write_jpeg_atomic(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    image = Image.fromarray(np.ascontiguousarray(rgb))
    write_atomic(path, lambda handle: image.save(handle, format="JPEG", quality=quality))


def write_prediction(
    out_dir: str | os.PathLike, name: str, image: np.ndarray, pred: np.ndarray, label: np.ndarray | None
) -> None:
    """The three files of one image; ``pred`` and ``label`` are train ids at the image's resolution."""
    out_dir = Path(out_dir)
    label_ids = train_ids_to_label_ids(pred)
    write_png_atomic(out_dir / LABEL_IDS_DIR / f"{name}.png", label_ids)
    write_png_atomic(out_dir / COLOR_DIR / f"{name}.png", label_ids, palette=ID_PALETTE)
    _write_jpeg_atomic(out_dir / OVERLAY_DIR / f"{name}.jpg", overlay_panel(image, pred, label))


class PredictionWriter:
    """Writes predictions in the background: ``submit(...)`` per image, then ``close()`` (or use ``with``).

    At most ``max_pending`` images wait in memory; ``submit`` blocks on the oldest beyond that. An error in
    a write surfaces at the next ``submit`` or at ``close``.
    """

    def __init__(self, out_dir: str | os.PathLike, *, threads: int = 2, max_pending: int = 4) -> None:
        self.out_dir = Path(out_dir)
        for sub in (LABEL_IDS_DIR, COLOR_DIR, OVERLAY_DIR):
            try:
                (self.out_dir / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SSRError(f"cannot create prediction folder {self.out_dir / sub}: {exc.strerror}") from None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssr-preds")
        self._pending: deque[Future] = deque()
        self._max_pending = max_pending

    def submit(self, name: str, image: np.ndarray, pred: np.ndarray, label: np.ndarray | None) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write_prediction, self.out_dir, name, image, pred, label))

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
