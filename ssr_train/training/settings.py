"""`setting(...)`: a config field with its default, help text and allowed range in one place.

Used by every config dataclass (the core sections in training/config.py and each method's own);
training/config.py validates every value against this metadata, whatever its source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any


def setting(default: Any, help: str = "", *, choices: tuple | None = None, min: float | None = None,
            gt: float | None = None, max: float | None = None, lt: float | None = None,
            unique: bool = False, nonempty: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field. Ranges apply to the value, or to each item of a tuple value; `check(value)`
    returns a reason when the value is bad, else None."""
    meta = {"help": help, "choices": choices, "min": min, "gt": gt, "max": max, "lt": lt, "unique": unique,
            "nonempty": nonempty, "check": check}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None and v is not False})
