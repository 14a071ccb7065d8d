"""`ssr cache info` and `ssr cache verify`: what a cache holds, and whether every byte of it is sound."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from zarr.core.sync import sync

from ssr_cache.data.labels import IGNORE_INDEX
from ssr_cache.progress import progress_bar
from ssr_cache.store.feature_store import DONE, FeatureStore

DeepCheck = Callable[[FeatureStore, list[int]], list[str]]


# ---------------------------------------------------------------- info


def store_info(url: str) -> dict:
    """Fingerprint, counts and per-array storage of a cache.

    Per array: shape, dtype, chunks (one view), shards, stored_bytes (its chunk/shard files; metadata is
    only in total_stored_bytes),
    raw_bytes (uncompressed size of what is written: the done views of per-view arrays) and
    ratio = stored_bytes / raw_bytes.
    """
    store = FeatureStore.open(url, mode="r")
    done = store.done_mask()
    n_done = int(done.sum())
    arrays = []
    for path, spec in store.specs.items():
        arr = store.array(path)
        stored = int(sync(store.group.store.getsize_prefix(f"{arr.path}/c")))  # chunk/shard files only
        written = n_done if spec.per_view else store.n_views
        raw = int(arr.nbytes // store.n_views * written)
        arrays.append({
            "name": path, "shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None, "stored_bytes": stored, "raw_bytes": raw,
            "ratio": stored / raw if raw else 0.0,
        })
    keys = list(sync(_list_keys(store)))
    total = sum(a["stored_bytes"] for a in arrays)
    total_all = int(sync(store.group.store.getsize_prefix(""))) if keys else total
    raw_total = sum(a["raw_bytes"] for a in arrays)
    enc = store.fingerprint.get("encoder", {})
    return {
        "url": store.url,
        **store_facts(store),
        "encoder": {"name": enc.get("name"), "checkpoint_sha256": enc.get("checkpoint_sha256"),
                    "random_init": bool(enc.get("random_init")), "init_seed": enc.get("init_seed")},
        "precision": store.precision,
        "format_version": store.attrs.get("ssr_cache_format"),
        "ssr_version": store.attrs.get("ssr_version"),
        "fingerprint": store.fingerprint,
        "n_views": store.n_views,
        "done_views": n_done,
        "n_shards": store.n_shards,
        "views_per_shard": store.layout.views_per_shard,
        "feature_dtype": store.layout.feature_dtype,
        "levels": list(store.layout.levels),
        "feature_names": list(store.feature_names),
        "n_samples": len(store.sample_ids),
        "arrays": arrays,
        "n_files": len(keys),
        "total_stored_bytes": total_all,
        "total_raw_bytes": raw_total,
        "ratio": total / raw_total if raw_total else 0.0,
    }


def store_facts(store: FeatureStore) -> dict:
    """What a cache is of, from the typed accessors: dataset, split, labelled, label space, crop, resize."""
    build = store.attrs.get("build_config") or {}
    fp = store.fingerprint  # read leniently: info also describes hand-made and partial stores
    return {
        "dataset": fp.get("dataset"),
        "split": fp.get("split"),
        "conditions": build.get("conditions"),
        "labelled": store.labelled,
        "label_space": store.label_space.to_dict(),
        "n_images": len(store.sample_ids),
        "crop": list(store.layout.crop_hw),
        "resize": list(store.resize) if "resize" in fp.get("plan", {}) else None,
    }


async def _list_keys(store: FeatureStore) -> list[str]:
    return [k async for k in store.group.store.list_prefix("")]


# ---------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyProblem:
    array: str
    view: int | None
    message: str

    def __str__(self) -> str:
        where = self.array if self.view is None else f"{self.array} view {self.view}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    url: str
    n_views: int
    n_done: int
    n_checked: int  # done views whose every chunk was read and checked
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(url: str, progress: bool = True, *, deep_check: DeepCheck | None = None,
                 block_views: int = 8, console=None) -> VerifyReport:
    """Check a cache end to end: attributes and array metadata as the layout says, every view done, every
    shard file present, every chunk readable (checksums, decompression), finite features and int8
    parameters, labels in range. Data is read `block_views` views at a time, with a rich progress bar.

    `deep_check(store, views)` (e.g. re-encoding a sample with SAM) runs once, last, on the views that
    passed every other check; each string it returns is reported as a problem.
    """
    store = FeatureStore.open(url, mode="r")
    problems: list[VerifyProblem] = []
    broken = _check_metadata(store, problems)
    _check_view_table(store, broken, problems)
    done = store.done_mask()
    if not done.all():
        shards = [s for s in range(store.n_shards) if not done[slice(*store.shard_range(s))].all()]
        problems.append(VerifyProblem(DONE, None, f"{int((~done).sum())} of {store.n_views} views are not done "
                                      f"(shards {_ranges(shards)}); re-run `ssr cache build` to finish"))
    bad = np.zeros(store.n_views, dtype=bool)
    checked = 0
    per_view = [p for p, spec in store.specs.items() if spec.per_view and p not in broken]
    with _progress(progress, console) as bar:
        task = bar.add_task("", total=int(done.sum()), info="")
        for s in range(store.n_shards):
            a, b = store.shard_range(s)
            views = np.flatnonzero(done[a:b]) + a
            if views.size == 0:
                continue
            present = _check_shard_files(store, s, per_view, views, bad, problems)
            for lo in range(0, views.size, block_views):
                block = views[lo:lo + block_views]
                for path in present:
                    _check_block(store, path, block, bad, problems)
                checked += block.size
                bar.advance(task, block.size)
    good = [int(v) for v in np.flatnonzero(done & ~bad)]
    if deep_check is not None and good:
        problems += [VerifyProblem("deep", None, msg) for msg in deep_check(store, good)]
    return VerifyReport(url=store.url, n_views=store.n_views, n_done=int(done.sum()), n_checked=checked,
                        problems=tuple(problems))


def _check_metadata(store: FeatureStore, problems: list[VerifyProblem]) -> set[str]:
    """Arrays that are missing or shaped unlike the layout; their data is not read."""
    broken = set()
    for key in ("fingerprint", "layout", "sample_ids", "views_per_shard", "n_views", "feature_dtype"):
        if key not in store.attrs:
            problems.append(VerifyProblem("attributes", None, f"attribute {key!r} is missing"))
    for path, spec in store.specs.items():
        try:
            arr = store.array(path)
        except Exception as exc:
            problems.append(VerifyProblem(path, None, _brief(exc)))
            broken.add(path)
            continue
        have = (tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks), arr.shards and tuple(arr.shards))
        want = (spec.shape, np.dtype(spec.dtype), spec.chunks, spec.shards)
        for what, h, w in zip(("shape", "dtype", "chunks", "shards"), have, want, strict=True):
            if h != w:
                problems.append(VerifyProblem(path, None, f"{what} is {h}, the layout says {w}"))
                broken.add(path)
    return broken


def _check_view_table(store: FeatureStore, broken: set[str], problems: list[VerifyProblem]) -> None:
    table = {}
    for col in store.view_columns:
        path = f"views/{col}"
        if path in broken:
            continue
        try:
            table[col] = store.array(path)[...]
        except Exception as exc:
            problems.append(VerifyProblem(path, None, f"cannot be read: {_brief(exc)}"))
    if "sample_index" in table:
        idx = table["sample_index"]
        for v in np.flatnonzero((idx < 0) | (idx >= len(store.sample_ids)))[:10]:
            problems.append(VerifyProblem("views/sample_index", int(v), f"{idx[v]} is not a sample "
                                          f"(there are {len(store.sample_ids)})"))
    if "box" in table and "resized_hw" in table:
        box, hw = table["box"], table["resized_hw"]
        ok = (box[:, 0] >= 0) & (box[:, 1] >= 0) & (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]) \
            & (box[:, 2] <= hw[:, 0]) & (box[:, 3] <= hw[:, 1])
        for v in np.flatnonzero(~ok)[:10]:
            problems.append(VerifyProblem("views/box", int(v), f"box {box[v].tolist()} lies outside the "
                                          f"resized image {hw[v].tolist()}"))


def _check_shard_files(store: FeatureStore, shard: int, paths: list[str], views: np.ndarray, bad: np.ndarray,
                       problems: list[VerifyProblem]) -> list[str]:
    """A done shard must have its file in every per-view array (zarr would silently read fill values)."""
    present = []
    for path in paths:
        key = store.shard_key(path, shard)
        if sync(store.group.store.exists(key)):
            present.append(path)
        else:
            a, b = store.shard_range(shard)
            problems.append(VerifyProblem(path, None, f"shard {shard} (views {a}-{b - 1}) is marked done "
                                          f"but its file {key} is missing"))
            bad[views] = True
    return present


def _check_block(store: FeatureStore, path: str, block: np.ndarray, bad: np.ndarray,
                 problems: list[VerifyProblem]) -> None:
    arr = store.array(path)
    try:
        values = arr[int(block[0]):int(block[-1]) + 1][block - block[0]]
    except Exception:
        # find which view's chunk is damaged
        for v in block:
            try:
                _check_values(store, path, arr[int(v)][None], np.array([v]), bad, problems)
            except Exception as exc:
                problems.append(VerifyProblem(path, int(v), f"chunk cannot be read: {_brief(exc)}"))
                bad[v] = True
        return
    _check_values(store, path, values, block, bad, problems)


def _check_values(store: FeatureStore, path: str, values: np.ndarray, views: np.ndarray, bad: np.ndarray,
                  problems: list[VerifyProblem]) -> None:
    flat = values.reshape(len(views), -1)
    if path.startswith("features/") and values.dtype.kind == "f":
        nonfinite = (~np.isfinite(flat)).sum(axis=1)
        what = "NaN/Inf values"
        if path.endswith("_scale"):
            nonfinite = nonfinite + (flat < 0).sum(axis=1)
            what = "non-finite or negative int8 scales"
        for i in np.flatnonzero(nonfinite):
            problems.append(VerifyProblem(path, int(views[i]), f"{int(nonfinite[i])} {what}"))
            bad[views[i]] = True
    elif path == "labels":
        invalid = ((flat >= store.layout.num_classes) & (flat != IGNORE_INDEX)).sum(axis=1)
        for i in np.flatnonzero(invalid):
            problems.append(VerifyProblem(path, int(views[i]), f"{int(invalid[i])} pixels are not a trainId or 255"))
            bad[views[i]] = True
    elif path == "class_counts":
        h, w = store.layout.crop_hw
        invalid = (flat < 0).any(axis=1) | (flat.sum(axis=1) > h * w)
        for i in np.flatnonzero(invalid):
            problems.append(VerifyProblem(path, int(views[i]), f"counts {flat[i].tolist()} are impossible "
                                          f"for a {h}x{w} crop"))
            bad[views[i]] = True


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def _ranges(values: list[int]) -> str:
    """[0,1,2,5,7,8] -> "0-2, 5, 7-8"."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _progress(enabled: bool, console):
    return progress_bar("verifying", unit="views", disable=not enabled, console=console)
