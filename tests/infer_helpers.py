"""A tiny trained run shared by the inference CLI tests (3 iterations of mit_b0 on the synthetic caches)."""

from __future__ import annotations

from pathlib import Path

from cache_helpers import run_ssr
from train_helpers import build_tiny_caches, tiny_train_args


def train_tiny_run(synth_root: Path, work: Path, name: str, *extra: str) -> Path:
    src, tgt = work / "src.zarr", work / "tgt.zarr"
    if not src.exists():
        build_tiny_caches(synth_root, work)
    out = work / name
    result = run_ssr(*tiny_train_args(src, out, "--iters", "3", "--target-cache", str(tgt), *extra))
    assert result.returncode == 0, result.stderr
    return out


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
