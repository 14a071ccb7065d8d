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
