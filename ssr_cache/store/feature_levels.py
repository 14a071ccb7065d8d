"""Feature levels: a level is the SAM neck map average-pooled to a g x g grid, stored as the array "l{g}".
The one place that names, parses and validates them (the build, the store, the trainer all go through here)."""

from __future__ import annotations

from collections.abc import Iterable

from ssr_cache.errors import SSRError


def level_name(grid: int) -> str:
    """64 → "l64": the stored array name (under features/) of the level with a grid x grid map."""
    return f"l{int(grid)}"


def parse_level(level: str | int) -> int:
    """"l64" or 64 → 64; anything else is one SSRError line."""
    text = str(level).strip()
    digits = text[1:] if text[:1] == "l" else text
    if not digits.isdigit() or int(digits) < 1:
        raise SSRError(f"{level!r} is not a feature level (a grid size like 64, or its name l64)")
    return int(digits)


def default_levels(neck_grid: int) -> tuple[int, ...]:
    """The neck grid and its halves twice over (64, 32, 16 for SAM's 64x64 neck), the sizes that divide it."""
    return tuple(g for g in (neck_grid, neck_grid // 2, neck_grid // 4) if g >= 1)


def check_levels(levels: Iterable[int | str] | None, neck_grid: int) -> tuple[int, ...]:
    """Grid sizes (None: `default_levels`) checked to divide the encoder's neck grid; distinct, largest first."""
    if levels is None:
        return default_levels(neck_grid)
    grids = sorted({parse_level(g) for g in levels}, reverse=True)
    if not grids:
        raise SSRError("--levels needs at least one grid size")
    bad = [g for g in grids if neck_grid % g]
    if bad:
        raise SSRError(f"--levels {', '.join(map(str, bad))} must divide the encoder's {neck_grid}x{neck_grid} "
                       f"neck grid")
    return tuple(grids)
