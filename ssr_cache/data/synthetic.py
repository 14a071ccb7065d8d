"""Synthetic domains: procedurally rendered street scenes written in each dataset's real file layout.

`layouts` picks what is written (default gta5 + cityscapes, the demo's two domains):

    gta5         OUT/gta5/{images,labels}/00000.png (palette labels), OUT/gta5_val/… (val, its own root)
    cityscapes   OUT/cityscapes/leftImg8bit/{train,val}/CITY/CITY_SEQ_FRAME_leftImg8bit.png,
                 OUT/cityscapes/gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png
    synthia      OUT/synthia/RGB/0000000.png, OUT/synthia/GT/LABELS/0000000.png (16-bit RGB: class id in R,
                 instance id in G, as SYNTHIA ships them)
    acdc         OUT/acdc/rgb_anon/{fog,night,rain,snow}/{train,val}/SEQ/SEQ_frame_NNNNNN_rgb_anon.png,
                 OUT/acdc/gt/COND/SPLIT/SEQ/SEQ_frame_NNNNNN_gt_labelIds.png (+ _gt_labelColor.png, ignored)
    dark_zurich  OUT/dark_zurich/rgb_anon/train/{day,twilight,night}/SEQ/…_rgb_anon.png (no labels),
                 OUT/dark_zurich/rgb_anon/val/night/SEQ/…, OUT/dark_zurich/gt/val/night/SEQ/…_gt_labelIds.png
    folder       OUT/folder_source/ and OUT/folder_target/: images/{train,val}/scene_N/NNNN.jpg (JPEG),
                 labels/… (PNG of label values) and a 3-class classes.toml (ground, structure, agent)
    OUT/synthetic.json   parameters and class pixel fractions

Every image has its own random generator seeded from (seed, domain, split, index), so the bytes of every
file depend on nothing else (not on `workers`, nor on the other images, nor on the other layouts). A
schedule forces every train class into some images of each split, so all Cityscapes classes occur in every
split. Layouts and label formats: synthetic_layouts.py; scenes: synthetic_scene.py; docs/synthetic-data.md.
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

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.data.labels import ID_TO_TRAINID
from ssr_cache.data.png_io import write_jpeg_atomic, write_png_atomic
from ssr_cache.data.synthetic_layouts import (
    CONDITIONS,
    LABEL_WRITERS,
    LAYOUT_JOBS,
    Job,
    layout_roots,
    write_layout_extras,
)
from ssr_cache.data.synthetic_scene import STYLES, render_scene
from ssr_cache.errors import SSRError
from ssr_cache.progress import progress_bar

MIN_SIZE = 64
MARKER = "synthetic.json"
LAYOUTS = tuple(LAYOUT_JOBS)
DEFAULT_LAYOUTS = ("gta5", "cityscapes")


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    gta5: Path  # source train root (GTA5 layout)
    gta5_val: Path  # source val root (GTA5 layout)
    cityscapes: Path  # target root (Cityscapes layout, splits train and val)
    roots: dict[str, Path]  # dataset root of every layout written (gta5, gta5_val, synthia, folder_source, …)
    size: tuple[int, int]  # (W, H)
    seed: int
    counts: dict[str, int]  # images per part: gta5, gta5_val, cityscapes/train, cityscapes/val, synthia, …
    class_fractions: dict[str, dict[str, float]]  # part → Cityscapes class name → share of all pixels
    seconds: float

    def __str__(self) -> str:
        parts = ", ".join(f"{part} {n}" for part, n in self.counts.items())
        total = sum(self.counts.values())
        return f"{total} images at {self.size[0]}x{self.size[1]} in {self.seconds:.1f} s ({parts})"


def _render_and_write(job: Job) -> np.ndarray:
    """Render one scene, write its files; returns the pixel count of each Cityscapes label id (256,)."""
    rng = np.random.default_rng(job.seed)
    image, labels = render_scene(STYLES[job.style], job.size[0], job.size[1], rng, job.force)
    if job.condition:
        image = CONDITIONS[job.condition](image, rng)
    if job.image.suffix.lower() in (".jpg", ".jpeg"):
        write_jpeg_atomic(job.image, image)
    else:
        write_png_atomic(job.image, image)
    if job.label is not None:
        LABEL_WRITERS[job.label_format](job.label, labels)
    return np.bincount(labels.ravel(), minlength=256)


def check_layouts(layouts) -> tuple[str, ...]:
    layouts = tuple(dict.fromkeys(layouts))
    unknown = [name for name in layouts if name not in LAYOUT_JOBS]
    if unknown or not layouts:
        raise SSRError(f"unknown layout {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(LAYOUTS)}")
    return layouts


def _check_args(out: Path, train: int, val: int, size: tuple[int, int], seed: int, workers: int,
                layouts: tuple[str, ...]) -> None:
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
        for root in (r for layout in layouts for r in layout_roots(out, layout).values()):
            if root.is_dir() and any(root.iterdir()):
                raise SSRError(f"{root} already holds files not written by `ssr data synth`; choose another --out")


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


_OUR_NAMES = re.compile(r"^(\d{5}\.png|\d{7}\.png|\d{4}\.(jpg|JPG|png)|[a-z]+_\d{6}_\d{6}_(leftImg8bit|gtFine_labelIds)"
                        r"\.png|GOPR\d{4}_frame_\d{6}_(rgb_anon|gt_labelIds|gt_labelColor)\.png)$")


def _remove_stale(roots, jobs: dict[str, list[Job]]) -> int:
    """Delete files a previous, larger run wrote (only names this generator makes, only under its roots)."""
    keep = {path for part_jobs in jobs.values() for job in part_jobs for path in (job.image, job.label)}
    keep |= {path.with_name(path.name.replace("_gt_labelIds", "_gt_labelColor")) for path in keep if path}
    removed = 0
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            if path not in keep and path.is_file() and _OUR_NAMES.match(path.name):
                path.unlink()
                removed += 1
    return removed


def _render_all(jobs: dict[str, list[Job]], workers: int, progress: bool) -> dict[str, np.ndarray]:
    """Render and write every job (in `workers` processes); label-id pixel counts (256,) per part."""
    flat = [(part, job) for part, part_jobs in jobs.items() for job in part_jobs]
    counts = {part: np.zeros(256, dtype=np.int64) for part in jobs}
    with progress_bar("synthetic scenes", unit="img", disable=not progress) as bar:
        task = bar.add_task("", total=len(flat), info="")
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
    return counts


def _class_fractions(counts: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    fractions = {}
    for part, pixels in counts.items():
        per_class = np.bincount(ID_TO_TRAINID, weights=pixels, minlength=256)[: CITYSCAPES.num_classes]
        total = max(int(pixels.sum()), 1)
        fractions[part] = {name: round(float(n) / total, 6)
                           for name, n in zip(CITYSCAPES.class_names, per_class, strict=True)}
    return fractions


def synthesize(
    out: Path,
    *,
    train: int = 200,
    val: int = 50,
    size: tuple[int, int] = (512, 256),
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    layouts: tuple[str, ...] = DEFAULT_LAYOUTS,
) -> SynthSummary:
    """Render `train` + `val` street scenes per domain into `out` (size is (W, H)) in each of `layouts`;
    same seed, same bytes."""
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    layouts = check_layouts(layouts)
    _check_args(out, train, val, size, seed, workers, layouts)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    params = {"generator": "ssr data synth", "train": train, "val": val, "size": list(size), "seed": seed,
              "layouts": list(layouts)}
    previous_run = (out / MARKER).is_file()
    _write_json_atomic(out / MARKER, {**params, "complete": False})

    jobs = {part: part_jobs for layout in layouts
            for part, part_jobs in LAYOUT_JOBS[layout](out, {"train": train, "val": val}, size, seed).items()}
    for layout in layouts:
        write_layout_extras(out, layout)
    counts = _render_all(jobs, workers, progress)
    roots = {name: root for layout in layouts for name, root in layout_roots(out, layout).items()}
    if previous_run:
        _remove_stale(roots.values(), jobs)
    fractions = _class_fractions(counts)
    summary = SynthSummary(
        out=out, gta5=out / "gta5", gta5_val=out / "gta5_val", cityscapes=out / "cityscapes",
        roots=roots,
        size=size, seed=seed, counts={part: len(part_jobs) for part, part_jobs in jobs.items()},
        class_fractions=fractions, seconds=time.perf_counter() - started,
    )
    _write_json_atomic(out / MARKER, {**params, "complete": True, "counts": summary.counts,
                                      "class_fractions": fractions})
    return summary
