"""The synthetic two-domain data set: procedurally rendered street scenes written in the real file layouts.

    OUT/gta5/images/00000.png, OUT/gta5/labels/00000.png            source train (GTA5 layout, palette labels)
    OUT/gta5_val/images/…, OUT/gta5_val/labels/…                    source val (same layout, its own root)
    OUT/cityscapes/leftImg8bit/{train,val}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
    OUT/cityscapes/gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png   target (Cityscapes layout)
    OUT/synthetic.json                                               parameters and class pixel fractions

Every image has its own random generator seeded from (seed, domain, split, index), so the bytes of every
file depend on nothing else (not on `workers`, nor on the other images). A schedule forces every train class
into some images of each split, so all 19 classes occur in every split. See docs/synthetic-data.md.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.data.labels import CLASS_NAMES, ID_PALETTE, ID_TO_TRAINID, NUM_CLASSES
from ssr_cache.data.png_io import write_png_atomic
from ssr_cache.data.synthetic_scene import (
    BICYCLE,
    BUILDING,
    BUS,
    CAR,
    FENCE,
    MOTORCYCLE,
    PERSON,
    POLE,
    RIDER,
    ROAD,
    SIDEWALK,
    SKY,
    STYLES,
    TERRAIN,
    TRAFFIC_LIGHT,
    TRAFFIC_SIGN,
    TRAIN,
    TRUCK,
    VEGETATION,
    WALL,
    render_scene,
)
from ssr_cache.errors import SSRError

MIN_SIZE = 64
MARKER = "synthetic.json"
CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}
FRAME = 19  # the annotated frame of each Cityscapes snippet is its 20th, number 000019

# Every train class (by label id) is in one group; each split cycles through the groups so that every class
# is forced into about one image in ten, and into at least one image of any split.
FORCE_GROUPS = (
    frozenset({TRAIN, RIDER, WALL, TERRAIN, ROAD}),
    frozenset({BUS, MOTORCYCLE, FENCE, TRAFFIC_LIGHT, SKY}),
    frozenset({TRUCK, BICYCLE, TRAFFIC_SIGN, PERSON, SIDEWALK}),
    frozenset({CAR, POLE, VEGETATION, BUILDING}),
)

# (output part, renderer style, domain code, split code): the code goes into each image's seed
_PARTS = (
    ("gta5", "gta5", 0, 0),
    ("gta5_val", "gta5", 0, 1),
    ("cityscapes/train", "cityscapes", 1, 0),
    ("cityscapes/val", "cityscapes", 1, 1),
)


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    gta5: Path  # source train root (GTA5 layout)
    gta5_val: Path  # source val root (GTA5 layout)
    cityscapes: Path  # target root (Cityscapes layout, splits train and val)
    size: tuple[int, int]  # (W, H)
    seed: int
    counts: dict[str, int]  # images per part: gta5, gta5_val, cityscapes/train, cityscapes/val
    class_fractions: dict[str, dict[str, float]]  # part → class name → share of all pixels
    seconds: float

    def __str__(self) -> str:
        parts = ", ".join(f"{part} {n}" for part, n in self.counts.items())
        total = sum(self.counts.values())
        return f"{total} images at {self.size[0]}x{self.size[1]} in {self.seconds:.1f} s ({parts})"


@dataclass(frozen=True)
class _Job:
    """One image to render and write."""

    style: str
    seed: tuple[int, int, int, int]
    force: frozenset[int]
    size: tuple[int, int]
    image: Path
    label: Path
    palette_label: bool  # GTA5: palette PNG; Cityscapes: greyscale


def forced_labels(index: int, count: int) -> frozenset[int]:
    """Label ids that image `index` of a split of `count` images must show."""
    groups = min(count, len(FORCE_GROUPS))
    period = max(groups, count // 10)
    slot = index % period
    if slot >= groups:
        return frozenset()
    return frozenset().union(*(group for g, group in enumerate(FORCE_GROUPS) if g % groups == slot))


def gta5_files(root: Path, index: int) -> tuple[Path, Path]:
    name = f"{index:05d}.png"
    return root / "images" / name, root / "labels" / name


def cityscapes_stems(split: str, count: int) -> list[tuple[str, str]]:
    """(city, file stem) of each image of a split: consecutive runs per city, sequence numbers from 0."""
    cities = CITIES[split]
    stems, seen = [], dict.fromkeys(cities, 0)
    for index in range(count):
        city = cities[index * len(cities) // count]
        stems.append((city, f"{city}_{seen[city]:06d}_{FRAME:06d}"))
        seen[city] += 1
    return stems


def _jobs(out: Path, *, train: int, val: int, size: tuple[int, int], seed: int) -> dict[str, list[_Job]]:
    jobs: dict[str, list[_Job]] = {}
    for part, style, domain, split_code in _PARTS:
        count = train if split_code == 0 else val
        seeds = [(seed, domain, split_code, i) for i in range(count)]
        if style == "gta5":
            files = [gta5_files(out / part, i) for i in range(count)]
        else:
            split = part.split("/")[1]
            root = out / "cityscapes"
            files = [(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                      root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                     for city, stem in cityscapes_stems(split, count)]
        jobs[part] = [_Job(style, s, forced_labels(i, count), size, image, label, style == "gta5")
                      for i, (s, (image, label)) in enumerate(zip(seeds, files, strict=True))]
    return jobs


def _render_and_write(job: _Job) -> np.ndarray:
    """Render one scene, write its two files; returns the pixel count of each label id (256,)."""
    rng = np.random.default_rng(job.seed)
    image, labels = render_scene(STYLES[job.style], job.size[0], job.size[1], rng, job.force)
    write_png_atomic(job.image, image)
    write_png_atomic(job.label, labels, palette=ID_PALETTE if job.palette_label else None)
    return np.bincount(labels.ravel(), minlength=256)


def _check_args(out: Path, train: int, val: int, size: tuple[int, int], seed: int, workers: int) -> None:
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise SSRError(f"synthetic image size must be at least {MIN_SIZE}x{MIN_SIZE}, got {'x'.join(map(str, size))}")
    if train < 1:
        raise SSRError(f"--train must be at least 1, got {train}")
    if val < 0:
        raise SSRError(f"--val must be 0 or more, got {val}")
    if seed < 0:
        raise SSRError(f"--seed must be 0 or more, got {seed}")
    if workers < 1:
        raise SSRError(f"--workers must be at least 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise SSRError(f"{out} exists and is not a folder")
    if not (out / MARKER).is_file():
        for part in ("gta5", "gta5_val", "cityscapes"):
            if (out / part).is_dir() and any((out / part).iterdir()):
                raise SSRError(f"{out / part} already holds files not written by `ssr data synth`; "
                               "choose another --out")


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


_OUR_NAMES = re.compile(r"^(\d{5}\.png|[a-z]+_\d{6}_\d{6}_(leftImg8bit|gtFine_labelIds)\.png)$")


def _remove_stale(out: Path, jobs: dict[str, list[_Job]]) -> int:
    """Delete files a previous, larger run wrote (only names this generator makes, only in its folders)."""
    keep = {path for part_jobs in jobs.values() for job in part_jobs for path in (job.image, job.label)}
    folders = [out / part / sub for part in ("gta5", "gta5_val") for sub in ("images", "labels")]
    folders += [d for kind in ("leftImg8bit", "gtFine") for d in (out / "cityscapes" / kind).glob("*/*") if d.is_dir()]
    removed = 0
    for folder in folders:
        for path in folder.glob("*.png") if folder.is_dir() else ():
            if path not in keep and _OUR_NAMES.match(path.name):
                path.unlink()
                removed += 1
    return removed


def synthesize(
    out: Path,
    *,
    train: int = 200,
    val: int = 50,
    size: tuple[int, int] = (512, 256),
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> SynthSummary:
    """Render `train` + `val` street scenes per domain into `out` (size is (W, H)); same seed, same bytes."""
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    _check_args(out, train, val, size, seed, workers)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    params = {"generator": "ssr data synth", "train": train, "val": val, "size": list(size), "seed": seed}
    previous_run = (out / MARKER).is_file()
    _write_json_atomic(out / MARKER, {**params, "complete": False})

    jobs = _jobs(out, train=train, val=val, size=size, seed=seed)
    flat = [(part, job) for part, part_jobs in jobs.items() for job in part_jobs]
    counts = {part: np.zeros(256, dtype=np.int64) for part in jobs}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("rendering synthetic scenes", total=len(flat))
        if workers == 1:
            results = map(_render_and_write, (job for _, job in flat))
            for (part, _), pixels in zip(flat, results, strict=True):
                counts[part] += pixels
                bar.advance(task)
        else:
            # spawn, not fork: the caller may hold threads (torch, rich) that a forked child would inherit
            context = multiprocessing.get_context("spawn")
            chunk = max(1, min(16, math.ceil(len(flat) / (workers * 4))))
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                results = pool.map(_render_and_write, (job for _, job in flat), chunksize=chunk)
                for (part, _), pixels in zip(flat, results, strict=True):
                    counts[part] += pixels
                    bar.advance(task)
    if previous_run:
        _remove_stale(out, jobs)

    fractions = {}
    for part, pixels in counts.items():
        per_class = np.bincount(ID_TO_TRAINID, weights=pixels, minlength=256)[:NUM_CLASSES]
        total = max(int(pixels.sum()), 1)
        fractions[part] = {name: round(float(n) / total, 6) for name, n in zip(CLASS_NAMES, per_class, strict=True)}
    summary = SynthSummary(
        out=out,
        gta5=out / "gta5",
        gta5_val=out / "gta5_val",
        cityscapes=out / "cityscapes",
        size=size,
        seed=seed,
        counts={part: len(part_jobs) for part, part_jobs in jobs.items()},
        class_fractions=fractions,
        seconds=time.perf_counter() - started,
    )
    _write_json_atomic(out / MARKER, {**params, "complete": True, "counts": summary.counts,
                                      "class_fractions": fractions})
    return summary
