"""Where `ssr data synth` writes each image, in which file format, and how each domain's condition looks.

One function per dataset layout turns (out, counts, size, seed) into render jobs; every image's random
generator is seeded from (seed, domain, split, index), so its bytes depend on nothing else. The scene
renderer produces Cityscapes label ids; each layout writes them the way that dataset ships its labels
(palette PNG, greyscale ids, SYNTHIA's 16-bit RGB, a folder's own label values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.data.datasets.synthia import SYNTHIA_TO_TRAINID
from ssr_cache.data.labels import ID_PALETTE, ID_TO_TRAINID, TRAINID_TO_ID
from ssr_cache.data.png_io import write_label_16bit, write_png_atomic
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
    TERRAIN,
    TRAFFIC_LIGHT,
    TRAFFIC_SIGN,
    TRAIN,
    TRUCK,
    VEGETATION,
    WALL,
)

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
# The domain code in each image's seed (gta5 0 and cityscapes 1 predate the others: their bytes are pinned).
DOMAIN_CODE = {"gta5": 0, "cityscapes": 1, "synthia": 2, "acdc": 3, "dark_zurich": 4, "folder_source": 5,
               "folder_target": 6}
SPLIT_CODE = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Job:
    """One image to render and write."""

    style: str
    seed: tuple[int, int, int, int]
    force: frozenset[int]
    size: tuple[int, int]
    image: Path
    label: Path | None  # None: an unlabelled image (Dark Zurich train)
    label_format: str  # a key of LABEL_WRITERS
    condition: str = ""  # a key of CONDITIONS: how weather / time of day changes the rendered image


def forced_labels(index: int, count: int) -> frozenset[int]:
    """Label ids that image `index` of a split of `count` images must show."""
    groups = min(count, len(FORCE_GROUPS))
    period = max(groups, count // 10)
    slot = index % period
    if slot >= groups:
        return frozenset()
    return frozenset().union(*(group for g, group in enumerate(FORCE_GROUPS) if g % groups == slot))


def _jobs(domain: str, split: str, style: str, files: list[tuple[Path, Path | None, str]], size, seed: int,
          label_format: str) -> list[Job]:
    """files: (image, label or None, condition) per image, in index order."""
    count = len(files)
    return [Job(style, (seed, DOMAIN_CODE[domain], SPLIT_CODE[split], i), forced_labels(i, count), size, image,
                label, label_format, condition) for i, (image, label, condition) in enumerate(files)]


# ---------------------------------------------------------------- layouts


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


def gta5_jobs(out: Path, counts: dict[str, int], size, seed: int) -> dict[str, list[Job]]:
    return {part: _jobs("gta5", split, "gta5", [(*gta5_files(out / part, i), "") for i in range(counts[split])],
                        size, seed, "palette")
            for part, split in (("gta5", "train"), ("gta5_val", "val"))}


def cityscapes_jobs(out: Path, counts: dict[str, int], size, seed: int) -> dict[str, list[Job]]:
    root, jobs = out / "cityscapes", {}
    for split in ("train", "val"):
        files = [(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                  root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", "")
                 for city, stem in cityscapes_stems(split, counts[split])]
        jobs[f"cityscapes/{split}"] = _jobs("cityscapes", split, "cityscapes", files, size, seed, "grey")
    return jobs


def synthia_jobs(out: Path, counts: dict[str, int], size, seed: int) -> dict[str, list[Job]]:
    root = out / "synthia"  # SYNTHIA-RAND-CITYSCAPES has no split: one folder of train + val images
    files = [(root / "RGB" / f"{i:07d}.png", root / "GT" / "LABELS" / f"{i:07d}.png", "")
             for i in range(counts["train"] + counts["val"])]
    return {"synthia": _jobs("synthia", "train", "gta5", files, size, seed, "synthia16")}


def _sequence_files(root: Path, rel: str, count: int, conditions: tuple[str, ...], labelled: bool, first_seq: int):
    """ACDC / Dark Zurich names: rgb_anon/REL(cond)/GOPRnnnn/GOPRnnnn_frame_NNNNNN_rgb_anon.png, conditions
    cycling over the images, two sequences per condition."""
    files = []
    for i in range(count):
        cond = conditions[i % len(conditions)]
        seq = f"GOPR{first_seq + 10 * conditions.index(cond) + (i // len(conditions)) % 2:04d}"
        stem = f"{seq}_frame_{i:06d}"
        sub = rel.format(cond=cond)
        label = root / "gt" / sub / seq / f"{stem}_gt_labelIds.png" if labelled else None
        files.append((root / "rgb_anon" / sub / seq / f"{stem}_rgb_anon.png", label, cond))
    return files


def acdc_jobs(out: Path, counts: dict[str, int], size, seed: int) -> dict[str, list[Job]]:
    root, conditions = out / "acdc", ("fog", "night", "rain", "snow")
    return {f"acdc/{split}": _jobs("acdc", split, "cityscapes",
                                   _sequence_files(root, f"{{cond}}/{split}", counts[split], conditions, True, 475),
                                   size, seed, "grey_and_colour")
            for split in ("train", "val")}


def dark_zurich_jobs(out: Path, counts: dict[str, int], size, seed: int) -> dict[str, list[Job]]:
    root = out / "dark_zurich"
    train = _sequence_files(root, "train/{cond}", counts["train"], ("day", "twilight", "night"), False, 356)
    val = _sequence_files(root, "val/{cond}", counts["val"], ("night",), True, 356)
    return {"dark_zurich/train": _jobs("dark_zurich", "train", "cityscapes", train, size, seed, "grey"),
            "dark_zurich/val": _jobs("dark_zurich", "val", "cityscapes", val, size, seed, "grey")}


def folder_jobs(out: Path, counts: dict[str, int], size, seed: int) -> dict[str, list[Job]]:
    jobs = {}
    for domain, style in (("folder_source", "gta5"), ("folder_target", "cityscapes")):
        root = out / domain
        for split in ("train", "val"):
            files = []
            for i in range(counts[split]):
                # nested folders, and extensions in any case, as a user's own photos come
                rel = Path(split) / f"scene_{i % 2}" / f"{i:04d}"
                files.append((root / "images" / rel.with_suffix(".JPG" if i % 3 == 2 else ".jpg"),
                              root / "labels" / rel.with_suffix(".png"), ""))
            jobs[f"{domain}/{split}"] = _jobs(domain, split, style, files, size, seed, "folder")
    return jobs


LAYOUT_JOBS: dict[str, Callable[..., dict[str, list[Job]]]] = {
    "gta5": gta5_jobs, "cityscapes": cityscapes_jobs, "synthia": synthia_jobs, "acdc": acdc_jobs,
    "dark_zurich": dark_zurich_jobs, "folder": folder_jobs,
}


def layout_roots(out: Path, layout: str) -> dict[str, Path]:
    """Dataset roots a layout writes (by the name `ssr cache build --data-root` wants)."""
    if layout == "gta5":
        return {"gta5": out / "gta5", "gta5_val": out / "gta5_val"}
    if layout == "folder":
        return {"folder_source": out / "folder_source", "folder_target": out / "folder_target"}
    return {layout: out / layout}


# ---------------------------------------------------------------- label files


# The folder layout's 3 classes, from the Cityscapes train ids, written as *label values* (not train ids) so
# that classes.toml's [label_values] table is exercised; void (value 0) is not listed, so it is ignored.
FOLDER_CLASSES_TOML = """\
# Three classes of a user's own domain (written by `ssr data synth --layout folder`).
names = ["ground", "structure", "agent"]
palette = [[128, 64, 128], [70, 70, 70], [220, 20, 60]]
thing_classes = ["agent"]

[label_values]
ground = [10]
structure = [20, 21]
agent = [30]
"""
_FOLDER_VALUE = np.zeros(256, np.uint8)  # train id → label value; ignored (255) → 0 (unlisted)
_FOLDER_VALUE[[0, 1, 9]] = 10  # road, sidewalk, terrain
_FOLDER_VALUE[[2, 3, 4, 5, 6, 7]] = 20  # building, wall, fence, pole, traffic light, traffic sign
_FOLDER_VALUE[[8, 10]] = 21  # vegetation, sky
_FOLDER_VALUE[11:19] = 30  # person … bicycle
FOLDER_VALUE_OF_ID = _FOLDER_VALUE[ID_TO_TRAINID]  # Cityscapes label id → folder label value

# Cityscapes label id → SYNTHIA class id: the inverse of the README table; terrain, truck and train become
# SYNTHIA classes that map to nothing (16 terrain, 18 truck, 20 train), everything else void (0).
SYNTHIA_ID_OF_ID = np.zeros(256, np.uint16)
for _sid, _tid in SYNTHIA_TO_TRAINID.items():
    SYNTHIA_ID_OF_ID[TRAINID_TO_ID[_tid]] = _sid
SYNTHIA_ID_OF_ID[[TERRAIN, TRUCK, TRAIN]] = (16, 18, 20)
_THINGS = np.zeros(256, bool)
_THINGS[[PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE]] = True


def _write_synthia16(path: Path, ids: np.ndarray) -> None:
    # instance ids (G) above 255 on thing pixels: only a 16-bit reader sees both channels right
    instances = np.where(_THINGS[ids], 1000 + ids.astype(np.uint16), 0).astype(np.uint16)
    write_label_16bit(path, SYNTHIA_ID_OF_ID[ids], instances)


def _write_grey_and_colour(path: Path, ids: np.ndarray) -> None:
    write_png_atomic(path, ids)
    # ACDC ships colour renderings beside the ids; readers must not mistake them for labels
    write_png_atomic(path.with_name(path.name.replace("_gt_labelIds", "_gt_labelColor")), ID_PALETTE[ids])


LABEL_WRITERS: dict[str, Callable[[Path, np.ndarray], None]] = {
    "palette": lambda path, ids: write_png_atomic(path, ids, palette=ID_PALETTE),
    "grey": lambda path, ids: write_png_atomic(path, ids),
    "grey_and_colour": _write_grey_and_colour,
    "synthia16": _write_synthia16,
    "folder": lambda path, ids: write_png_atomic(path, FOLDER_VALUE_OF_ID[ids]),
}


def write_layout_extras(out: Path, layout: str) -> None:
    if layout == "folder":
        for domain in ("folder_source", "folder_target"):
            write_text_atomic(out / domain / "classes.toml", FOLDER_CLASSES_TOML)


# ---------------------------------------------------------------- conditions


def _mix(image: np.ndarray, scale: float, add, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = image.astype(np.float32) * scale + np.asarray(add, np.float32)
    if noise:
        out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


CONDITIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "fog": lambda im, rng: _mix(im, 0.45, (120, 122, 125), 2.0, rng),
    "night": lambda im, rng: _mix(im, 0.25, (4, 6, 18), 6.0, rng),
    "rain": lambda im, rng: _mix(im, 0.7, (10, 14, 22), 10.0, rng),
    "snow": lambda im, rng: _mix(im, 0.6, (95, 98, 100), 8.0, rng),
    "day": lambda im, rng: im,
    "twilight": lambda im, rng: _mix(im, 0.55, (25, 10, 30), 4.0, rng),
}
