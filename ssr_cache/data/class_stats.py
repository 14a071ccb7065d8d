"""Class pixel counts of a labelled dataset split at full resolution: `ssr data stats --json`.

Useful on its own (how rare is a class? did the reader map ids right?) and the same numbers the build
records per source image for rare-class sampling. A count is the number of pixels of that train id in the
label *at its image's size* (a label of another size is resized with nearest neighbour first, as in
training); `ignored_pixels` are those mapped to the ignore value, `unlisted_pixels` (a folder dataset) those
whose label value classes.toml does not list (ignored too, and counted among `ignored_pixels`).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ssr_cache.data.datasets import SegmentationDataset
from ssr_cache.errors import SSRError
from ssr_cache.progress import progress_bar


@dataclass(frozen=True, eq=False)
class ClassCounts:
    sample_ids: list[str]
    counts: np.ndarray  # int64 (N, num_classes)
    ignored: np.ndarray  # int64 (N,): pixels mapped to the ignore value
    unlisted: np.ndarray  # int64 (N,): pixels whose value the label table does not list (part of ignored)
    n_resized: int  # labels that differed in size from their image


_worker_dataset: SegmentationDataset | None = None


def _init_worker(dataset: SegmentationDataset) -> None:
    # The dataset is sent once per worker process, not once per task.
    global _worker_dataset
    _worker_dataset = dataset


def _count_sample(dataset: SegmentationDataset, index: int):
    """(index, counts, ignored, unlisted, resized, error line); user errors travel back as their message."""
    try:
        train_ids, unlisted = dataset.read_label(index)
    except SSRError as exc:
        return index, None, 0, 0, False, str(exc)
    counts = dataset.label_space.count(train_ids)
    ignored = int(train_ids.size - counts.sum())
    return index, counts, ignored, unlisted, dataset.was_resized(index), None


def _count_in_worker(index: int):
    assert _worker_dataset is not None
    return _count_sample(_worker_dataset, index)


def compute_class_counts(dataset: SegmentationDataset, workers: int = 2, progress: bool = True) -> ClassCounts:
    """Per-image class pixel counts of a labelled split (in `workers` processes)."""
    if not dataset.has_labels:
        raise SSRError(f"{dataset.name} {dataset.split} has images without labels; class statistics need labels")
    n = len(dataset)
    out = ClassCounts(dataset.sample_ids, np.zeros((n, dataset.label_space.num_classes), np.int64),
                      np.zeros(n, np.int64), np.zeros(n, np.int64), 0)
    workers = max(1, min(workers, n))
    n_resized = 0
    with progress_bar("class stats", unit="img", disable=not progress) as bar:
        task = bar.add_task("", total=n, info="")
        if workers == 1:
            n_resized = _collect((_count_sample(dataset, i) for i in range(n)), out, lambda: bar.advance(task))
        else:
            # spawn: safe whatever the parent holds (threads, torch); the worker function is importable.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(dataset,))
            chunksize = max(1, min(64, n // (workers * 8)))
            try:
                results = pool.map(_count_in_worker, range(n), chunksize=chunksize)
                n_resized = _collect(results, out, lambda: bar.advance(task))
            finally:
                # After an error the labels not yet started are not read. (multiprocessing.Pool's terminate,
                # used before, hung about once in 40 errors: its task thread blocked on a full queue.)
                pool.shutdown(wait=True, cancel_futures=True)
    return ClassCounts(out.sample_ids, out.counts, out.ignored, out.unlisted, n_resized)


def _collect(results, out: ClassCounts, advance) -> int:
    n_resized = 0
    for index, row, ignored, unlisted, resized, error in results:
        if error is not None:
            raise SSRError(error)
        out.counts[index], out.ignored[index], out.unlisted[index] = row, ignored, unlisted
        n_resized += int(resized)
        advance()
    return n_resized


def dataset_stats(dataset: SegmentationDataset, workers: int = 2, progress: bool = True) -> dict:
    """What `ssr data stats --json` prints: totals over the split, at full resolution."""
    c = compute_class_counts(dataset, workers=workers, progress=progress)
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "n_images": len(c.sample_ids),
        "class_names": list(dataset.label_space.class_names),
        "pixels_per_class": c.counts.sum(axis=0).tolist(),
        "ignored_pixels": int(c.ignored.sum()),
        "unlisted_pixels": int(c.unlisted.sum()),
        "resized_labels": c.n_resized,
    }
