"""The relative-position index made once per device gives segment_anything's own embeddings and features."""

from __future__ import annotations

import warnings

import pytest
import torch
from segment_anything.modeling import image_encoder as upstream

from ssr_cache.sam_encoder import build_sam_encoder
from ssr_cache.sam_rel_pos import _UPSTREAM_GET_REL_POS, get_rel_pos, relative_index


@pytest.mark.parametrize("q_size, k_size", [(14, 14), (64, 64), (4, 4), (8, 16), (16, 8)])
def test_the_index_and_embeddings_are_upstreams(q_size, k_size):
    length = 2 * max(q_size, k_size) - 1
    table = torch.randn(length, 12, generator=torch.Generator().manual_seed(q_size * 100 + k_size))
    ours, theirs = get_rel_pos(q_size, k_size, table), _UPSTREAM_GET_REL_POS(q_size, k_size, table)
    assert ours.shape == (q_size, k_size, 12) and torch.equal(ours, theirs)
    index = relative_index(q_size, k_size, torch.device("cpu"))
    assert index.dtype == torch.int64 and int(index.min()) == 0 and int(index.max()) <= length - 1
    assert relative_index(q_size, k_size, torch.device("cpu")) is index  # made once


def test_a_table_that_needs_interpolating_goes_to_upstream_unchanged():
    table = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))  # 27 would fit q = k = 14
    assert torch.equal(get_rel_pos(14, 14, table), _UPSTREAM_GET_REL_POS(14, 14, table))


def test_the_encoders_features_are_those_of_upstreams_function(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = build_sam_encoder("vit_tiny", seed=3)
    tables = [p for name, p in enc.named_parameters() if "rel_pos" in name]
    assert len(tables) == 2 * len(enc.image_encoder.blocks)
    for i, table in enumerate(tables):  # SAM zero-initialises them: give them values that show
        table.data.normal_(generator=torch.Generator().manual_seed(i))
    crops = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert upstream.get_rel_pos is get_rel_pos  # building an encoder points segment_anything at ours
    ours = enc.encode(crops)
    monkeypatch.setattr(upstream, "get_rel_pos", _UPSTREAM_GET_REL_POS)
    theirs = enc.encode(crops)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
