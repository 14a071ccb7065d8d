"""Helpers shared by the cache pipeline tests: run the CLI, hash a store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

TINY_BUILD = ["--sam", "vit_tiny", "--crop", "64", "--resize", "128x64", "--views-per-image", "2",
              "--views-per-shard", "4", "--batch-size", "2", "--workers", "0"]


def run_ssr(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "ssr_cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def store_digest(path: Path) -> dict[str, str]:
    """sha256 of every file in a store, by relative path."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
