"""The one exception type that reaches users as a single line (the CLI prints it, exits non-zero)."""

from __future__ import annotations


class SSRError(Exception):
    """A user-facing error: bad input, missing files, mismatched stores. Message is one clear line."""
