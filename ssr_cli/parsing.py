"""Small parsers for CLI values (sizes, level lists) that turn bad text into one-line errors, and the
defaults flags take from a config dataclass."""

from __future__ import annotations

import dataclasses

from ssr_cache.data.datasets.base import SHORT_SIDE_ONLY
from ssr_cache.errors import SSRError


def parse_size(text: str, *, what: str = "size") -> tuple[int, int]:
    """'512x256' → (512, 256) as (W, H); a single number means a square."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SSRError(f"{what} must look like WxH (e.g. 512x256), got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise SSRError(f"{what} must look like WxH with positive numbers, got {text!r}")
    return values[0], values[1]


def parse_resize(text: str) -> tuple[int, int]:
    """--resize: 'WxH' (a keep-ratio bound, mmcv's img_scale) or one number S = short side S, any long side."""
    if text.strip().isdigit():
        short = int(text)
        if short <= 0:
            raise SSRError(f"--resize short side must be positive, got {text!r}")
        return SHORT_SIDE_ONLY, short
    return parse_size(text, what="--resize")


def parse_int_list(text: str, *, what: str) -> tuple[int, ...]:
    """'64,32,16' → (64, 32, 16)."""
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SSRError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise SSRError(f"{what} is empty")
    return values


def config_defaults(config_class) -> dict:
    """{field: default} of a config dataclass, so that a command's flags show and use its defaults rather
    than restating them (fields without a default are left out)."""
    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
