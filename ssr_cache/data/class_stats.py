"""Per-image class pixel counts of a labelled dataset: the input of rare-class sampling.

File format (JSON, UTF-8, written atomically)::

    {
      "format": "ssr-class-stats",
      "version": 1,
      "dataset": "gta5",
      "num_classes": 19,
      "class_names": ["road", "sidewalk", ..., "bicycle"],        # train-id order
      "num_images": 24966,
      "total_pixels": [n_road, ..., n_bicycle],                    # column sums of "counts"
      "counts": {
        "00001": [n_road, ..., n_bicycle],                         # one line per image, dataset order
        ...
      }
    }

A count is the number of pixels of that train id in the label *at its image's size* (a label of another
size is resized with nearest neighbour first, as in training); ignored pixels (255) are not counted.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.data.datasets import SegmentationDataset
from ssr_cache.data.labels import CLASS_NAMES, NUM_CLASSES
from ssr_cache.errors import SSRError

FORMAT_NAME = "ssr-class-stats"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class ClassStats:
    dataset: str
    sample_ids: list[str]
    counts: np.ndarray  # int64 (N, 19)


# --- counting -----------------------------------------------------------------------------------------------

_worker_dataset: SegmentationDataset | None = None


def _init_worker(dataset: SegmentationDataset) -> None:
    # The dataset is sent once per worker process, not once per task.
    global _worker_dataset
    _worker_dataset = dataset


def _count_sample(dataset: SegmentationDataset, index: int) -> tuple[int, np.ndarray | None, bool, str | None]:
    """(index, counts, resized, error line); user errors travel back as their message, not a traceback."""
    try:
        train_ids = dataset.load_label(index)
    except SSRError as exc:
        return index, None, False, str(exc)
    counts = np.bincount(train_ids.ravel(), minlength=256)[:NUM_CLASSES].astype(np.int64)
    return index, counts, dataset.was_resized(index), None


def _count_in_worker(index: int) -> tuple[int, np.ndarray | None, bool, str | None]:
    assert _worker_dataset is not None
    return _count_sample(_worker_dataset, index)


def compute_class_counts(
    dataset: SegmentationDataset, workers: int = 2, progress: bool = True
) -> tuple[list[str], np.ndarray, int]:
    """(sample_ids, counts int64 (N, 19), number of labels resized to their image's size)."""
    if not dataset.has_labels:
        raise SSRError(f"{dataset.name} {dataset.split} has images without labels; class statistics need labels")
    n = len(dataset)
    counts = np.zeros((n, NUM_CLASSES), dtype=np.int64)
    n_resized = 0
    workers = max(1, min(workers, n))

    columns = (TextColumn("class stats"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("count", total=n)
        if workers == 1:
            results = (_count_sample(dataset, index) for index in range(n))
            n_resized = _collect(results, counts, bar, task)
        else:
            # spawn: safe whatever the parent holds (threads, torch); the worker function is importable.
            context = multiprocessing.get_context("spawn")
            chunksize = max(1, min(64, n // (workers * 8)))
            with context.Pool(workers, initializer=_init_worker, initargs=(dataset,)) as pool:
                results = pool.imap_unordered(_count_in_worker, range(n), chunksize=chunksize)
                n_resized = _collect(results, counts, bar, task)
    return dataset.sample_ids, counts, n_resized


def _collect(results, counts: np.ndarray, bar: Progress, task) -> int:
    n_resized = 0
    for index, row, resized, error in results:
        if error is not None:
            raise SSRError(error)  # leaving the pool's `with` terminates the other workers
        counts[index] = row
        n_resized += int(resized)
        bar.advance(task)
    return n_resized


# --- file ---------------------------------------------------------------------------------------------------


def write_class_stats(path: str | Path, dataset_name: str, sample_ids: list[str], counts: np.ndarray) -> None:
    """Write the JSON file described in the module docstring (temp file + rename: never half a file)."""
    path = Path(path)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (len(sample_ids), NUM_CLASSES):
        raise ValueError(f"counts must be ({len(sample_ids)}, {NUM_CLASSES}), got {counts.shape}")
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError("sample ids must be unique")
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dataset": dataset_name,
        "num_classes": NUM_CLASSES,
        "class_names": list(CLASS_NAMES),
        "num_images": len(sample_ids),
        "total_pixels": counts.sum(axis=0).tolist(),
    }
    # One line per header key and per image: readable, and diff-friendly (indent= would put every number
    # on its own line).
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
    rows = [f"    {json.dumps(sid)}: {json.dumps(row)}" for sid, row in zip(sample_ids, counts.tolist(), strict=True)]
    body = "{\n" + ",\n".join(rows) + "\n  }" if rows else "{}"
    text = "{\n" + "\n".join(lines) + f'\n  "counts": {body}\n}}\n'

    write_text_atomic(path, text, what="class statistics")


def load_class_stats(path: str | Path) -> ClassStats:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SSRError(f"{path}: class statistics file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SSRError(f"{path}: not a readable class statistics file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise SSRError(f"{path}: not an ssr class statistics file (no \"format\": \"{FORMAT_NAME}\")")
    if data.get("version") != FORMAT_VERSION:
        raise SSRError(f"{path}: class statistics version {data.get('version')!r} is not supported "
                       f"(expected {FORMAT_VERSION})")
    if data.get("num_classes") != NUM_CLASSES or not isinstance(data.get("counts"), dict):
        raise SSRError(f"{path}: class statistics must hold {NUM_CLASSES} classes and a \"counts\" table")
    sample_ids = list(data["counts"])
    bad = SSRError(f"{path}: class counts must be lists of {NUM_CLASSES} non-negative integers")
    if not sample_ids:
        return ClassStats(dataset=str(data.get("dataset", "")), sample_ids=[], counts=np.zeros((0, NUM_CLASSES), np.int64))
    try:
        counts = np.array([data["counts"][sample_id] for sample_id in sample_ids])
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if counts.dtype.kind not in "iu" or counts.shape != (len(sample_ids), NUM_CLASSES) or (counts < 0).any():
        raise bad
    return ClassStats(dataset=str(data.get("dataset", "")), sample_ids=sample_ids, counts=counts.astype(np.int64))
