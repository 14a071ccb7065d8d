"""Shared test settings: one torch thread (tiny models on 2 shared cores run faster and steadier)."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SSR_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic two-domain dataset in the real layouts (shared by the pipeline tests)."""
    from ssr_cache.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, train=6, val=3, size=(128, 64), seed=3, progress=False)
    return root
