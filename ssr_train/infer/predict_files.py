"""``ssr predict``: label maps for every image a user points at, from a run or an exported file.

Decoding runs in DataLoader workers; an unreadable file is skipped with a warning, counted, and listed in
OUT/skipped.txt (one bad frame must not stop a 10,000-image job). Outputs mirror the input tree
(``ssr_train.infer.writers``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.errors import SSRError
from ssr_cache.progress import progress_bar
from ssr_train.infer.export import ExportedModel
from ssr_train.infer.image_files import InputImage, find_images, image_size, read_image
from ssr_train.infer.predictor import Predictor
from ssr_train.infer.writers import PredictionWriter

SKIPPED_FILE = "skipped.txt"


@dataclass
class PredictSummary:
    out_dir: Path
    written: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


class _Images(Dataset):
    def __init__(self, images: list[InputImage]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        try:
            return {"index": index, "image": torch.from_numpy(read_image(self.images[index].path))}
        except SSRError as exc:  # raised in a worker it would come back wrapped in a traceback
            return {"index": index, "error": str(exc)}


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SSRError(f"--out {out_dir} is a file, not a folder")
    return out_dir


def _labels(model: Predictor | ExportedModel, batch: torch.Tensor) -> np.ndarray:
    if isinstance(model, Predictor):
        return model.labels(batch)
    return model.labels(batch.numpy())


def predict_files(model: Predictor | ExportedModel, inputs: list[str | os.PathLike], out_dir: str | os.PathLike,
                  kinds: tuple[str, ...], *, workers: int = 2, progress: bool = True, console=None,
                  batch_size: int = 1) -> PredictSummary:
    """Predict every image of ``inputs`` (files, folders, globs) and write ``kinds`` under ``out_dir``."""
    out_dir = check_output_folder(out_dir)
    images = find_images(list(inputs))
    if isinstance(model, ExportedModel) and model.input_size is not None:
        for image in images:  # headers only: a whole job of wrong-sized images fails before writing anything
            size = image_size(image.path)
            if size is not None:
                model.check_size(*size, what=str(image.path))
    summary = PredictSummary(out_dir)
    loader = DataLoader(_Images(images), batch_size=None, shuffle=False, num_workers=workers)
    pending: list[tuple[int, torch.Tensor]] = []
    start = time.perf_counter()

    with PredictionWriter(out_dir, model.label_space, kinds) as writer, \
            progress_bar("predicting", unit="img", disable=not progress, console=console) as bar:
        task = bar.add_task("", total=len(images), info="")

        def flush() -> None:
            if not pending:
                return
            labels = _labels(model, torch.stack([t for _, t in pending]).permute(0, 3, 1, 2))
            for (index, tensor), pred in zip(pending, labels, strict=True):
                writer.submit(images[index].relative, tensor.numpy(), pred)
                summary.written += 1
            bar.update(task, advance=len(pending))
            pending.clear()

        for item in loader:
            if "error" in item:
                summary.skipped.append((images[item["index"]].path, item["error"]))
                if console is not None:
                    console.print(f"[yellow]warning:[/] skipped {item['error']}", highlight=False)
                bar.update(task, advance=1, info=f"{len(summary.skipped)} skipped")
                continue
            if pending and (len(pending) >= batch_size or pending[0][1].shape != item["image"].shape):
                flush()
            pending.append((int(item["index"]), item["image"]))
        flush()
    summary.seconds = time.perf_counter() - start
    if not summary.skipped:
        (out_dir / SKIPPED_FILE).unlink(missing_ok=True)  # an earlier job's list would mislead
    else:
        write_text_atomic(out_dir / SKIPPED_FILE, "".join(f"{p}\t{why}\n" for p, why in summary.skipped))
    if not summary.written:
        raise SSRError(f"none of the {len(images)} image(s) could be read; see {out_dir / SKIPPED_FILE}")
    return summary
