"""Finding and reading the images a user points ``ssr predict`` at: files, folders (recursive), globs.

Each input file gets a relative output path that mirrors where it was found: a folder's files keep their
path below the folder, a glob's matches their path below the glob's fixed prefix, a single file its name.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssr_cache.errors import SSRError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_MAGIC = set("*?[")
# What PIL raises for missing, non-image, truncated or corrupt files ("broken PNG file" is a SyntaxError).
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class InputImage:
    path: Path
    relative: Path  # where its outputs go below each output folder (suffix replaced by the writer)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a PNG, JPEG, WebP or BMP file; anything unreadable is one SSRError line."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # Image.open reads only the header; a truncated file fails here
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise SSRError(f"{path}: file not found") from None
    except _READ_ERRORS as exc:
        raise SSRError(f"{path}: not a readable image ({str(exc).strip() or type(exc).__name__})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(W, H) from the file's header, None when the header cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except _READ_ERRORS:
        return None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _MAGIC & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def find_images(inputs: list[str | os.PathLike]) -> list[InputImage]:
    """Every image named by ``inputs``, in order, each once; a path that does not exist is one line."""
    found: list[InputImage] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if _is_image(p))
            found += [InputImage(p, p.relative_to(path)) for p in files]
        elif path.is_file():
            found.append(InputImage(path, Path(path.name)))
        elif _MAGIC & set(text):
            base = _glob_base(text)
            files = sorted(Path(p) for p in glob.glob(text, recursive=True) if _is_image(Path(p)))
            if not files:
                raise SSRError(f"{text} matches no image ({', '.join(IMAGE_SUFFIXES)})")
            found += [InputImage(p, p.relative_to(base)) for p in files]
        else:
            raise SSRError(f"input {text} does not exist")
    unique, seen, targets = [], set(), {}
    for image in found:
        key = image.path.resolve()
        if key in seen:
            continue
        seen.add(key)
        target = image.relative.with_suffix("")
        if target in targets:
            raise SSRError(f"{targets[target]} and {image.path} would write the same outputs ({target}); "
                           "give their folder instead of the files")
        targets[target] = image.path
        unique.append(image)
    if not unique:
        raise SSRError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    return unique
