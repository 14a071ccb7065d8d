"""Refactors must not change results: 6-iteration losses of every method ± SSR (to 1e-6) and the decoded
arrays of a small cache build (to the byte) equal tests/data/behaviour_pin.json. Under another torch release
or on another kind of CPU than the pin's, the losses are compared to 2e-3 relative (see `loss_tolerance`)."""

from __future__ import annotations

import json

import pytest
from behaviour_pin import PIN_FILE, compute, loss_tolerance


@pytest.fixture(scope="module")
def pinned_now(tmp_path_factory):
    return compute(tmp_path_factory.mktemp("pin"))


def test_cache_build_is_byte_identical_to_the_pin(pinned_now):
    pinned = json.loads(PIN_FILE.read_text())
    assert pinned_now["stores"] == pinned["stores"]


@pytest.mark.parametrize("run", ["source-only+ssr", "source-only", "daformer+ssr", "daformer", "mic+ssr", "mic"])
def test_losses_equal_the_pin(pinned_now, run):
    pin = json.loads(PIN_FILE.read_text())
    pinned, tol = pin["runs"][run], loss_tolerance(pin.get("torch"), pin.get("cpu"))
    now = pinned_now["runs"][run]
    assert len(now) == len(pinned) == 6
    for it, (a, b) in enumerate(zip(now, pinned, strict=True)):
        assert set(a) == set(b), f"iteration {it + 1}: logged keys changed"
        for key in b:
            assert a[key] == pytest.approx(b[key], **tol), f"{run} iteration {it + 1} {key} (pin: torch {pin.get('torch')}, {pin.get('cpu')})"
