from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssr_cache.errors import SSRError
from ssr_cache.image_norm import PIXEL_MEAN, PIXEL_STD
from ssr_cache.sam_encoder import (
    SAM_ENCODERS,
    build_image_encoder,
    build_sam_encoder,
    pool_levels,
)


def tiny(seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_sam_encoder("vit_tiny", seed=seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny encoder's ops are so small that a second OpenMP thread on a busy CPU costs 10x+ time.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def enc():
    return tiny()


def crops(n: int = 2, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def expected_params(embed: int, depth: int, global_idx: tuple[int, ...], heads: int, window: int, grid: int) -> int:
    """Independent count from the ViTDet/SAM block structure."""
    head = embed // heads
    block = 2 * embed + 3 * embed * embed + 3 * embed + embed * embed + embed + 2 * embed
    block += embed * 4 * embed + 4 * embed + 4 * embed * embed + embed
    rel = sum(2 * (2 * (grid if i in global_idx else window) - 1) * head for i in range(depth))
    patch = 3 * 16 * 16 * embed + embed
    neck = embed * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256
    return patch + grid * grid * embed + depth * block + rel + neck


def test_real_configs_match_segment_anything_shapes_and_parameter_counts():
    known = {"vit_b": 89_670_912, "vit_l": 308_278_272, "vit_h": 637_026_048}
    shapes = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
              "vit_h": (1280, 32, 16, (7, 15, 23, 31))}
    for name, (embed, depth, heads, glob) in shapes.items():
        cfg = SAM_ENCODERS[name]
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.global_attn_indexes) == (embed, depth, heads, glob)
        assert (cfg.img_size, cfg.window_size, cfg.patch_size, cfg.out_chans, cfg.grid) == (1024, 14, 16, 256, 64)
        with torch.device("meta"):
            model = build_image_encoder(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert n == known[name] == expected_params(embed, depth, glob, heads, 14, 64)
        assert model.blocks[glob[0]].window_size == 0 and model.blocks[0].window_size == 14
        assert model.blocks[0].attn.use_rel_pos and model.blocks[0].norm1.eps == 1e-6


def test_unknown_encoder_name():
    with pytest.raises(SSRError, match="unknown SAM encoder 'vit_x'"):
        build_sam_encoder("vit_x")


def test_encode_shapes_and_default_levels(enc):
    assert enc.grid == 16
    out = enc.encode(crops())
    assert sorted(out) == ["l16", "l4", "l8"]
    for g in (16, 8, 4):
        assert out[f"l{g}"].shape == (2, 256, g, g) and out[f"l{g}"].dtype == torch.float32
    out = enc.encode(crops(1), levels=(16, 2))
    assert sorted(out) == ["l16", "l2"] and out["l2"].shape == (1, 256, 2, 2)
    with pytest.raises(SSRError, match="levels 5 must divide"):
        pool_levels(out["l16"], (5,))


def test_pooled_levels_are_block_means_of_the_neck_map(enc):
    out = enc.encode(crops(), levels=(16, 8, 4, 1))
    neck = out["l16"]
    for g in (8, 4, 1):
        k = 16 // g
        manual = neck.reshape(2, 256, g, k, g, k).mean(dim=(3, 5))
        torch.testing.assert_close(out[f"l{g}"], manual, rtol=1e-5, atol=1e-6)
    again = pool_levels(neck, (16, 4))
    assert torch.equal(again["l16"], neck) and torch.equal(again["l4"], out["l4"])


def test_random_init_is_seeded_frozen_and_warns():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="NOT meaningful SAM features"):
        a = build_sam_encoder("vit_tiny", seed=7)
    assert torch.equal(torch.rand(3), expected_next), "building must not consume the global RNG"
    b, c = tiny(seed=7), tiny(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["image_encoder.blocks.0.attn.qkv.weight"], sc["image_encoder.blocks.0.attn.qkv.weight"])
    assert a.random_init and a.init_seed == 7 and a.checkpoint_sha256 is None
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training and not a.image_encoder.training
    fp = a.fingerprint()
    assert fp["name"] == "vit_tiny" and fp["img_size"] == 256 and fp["init_seed"] == 7 and fp["random_init"]
    assert json.loads(json.dumps(fp)) == fp  # survives being stored as JSON attributes
    assert fp != c.fingerprint()


def test_preprocess_normalises_then_stretches(enc):
    mean, std = torch.tensor(PIXEL_MEAN), torch.tensor(PIXEL_STD)
    # Constant crop at the encoder size: no resize, exact (v - mean) / std per channel.
    flat = np.zeros((1, 256, 256, 3), np.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 200, 10, 124
    x = enc.preprocess(flat)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    want = (torch.tensor([200.0, 10.0, 124.0]) - mean) / std
    torch.testing.assert_close(x[0, :, 0, 0], want)
    assert torch.equal(x, x[:, :, :1, :1].expand_as(x))
    # A non-square crop is stretched (no padding) with bilinear, align_corners=False.
    small = crops(1, 8, 12)
    x = enc.preprocess(small)
    assert x.shape == (1, 3, 256, 256)
    norm = (torch.from_numpy(small).permute(0, 3, 1, 2).float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(x, F.interpolate(norm, size=(256, 256), mode="bilinear", align_corners=False))
    # Float pixels (B, 3, H, W) and already-normalised input give the same tensor.
    as_float = torch.from_numpy(small).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(enc.preprocess(as_float), x)
    torch.testing.assert_close(enc.preprocess(norm, normalized=True), x)


@pytest.mark.parametrize(("bad", "match"), [
    (np.zeros((8, 8, 3), np.uint8), "4 dimensions"),
    (np.zeros((1, 3, 8, 8), np.uint8), r"\(B, H, W, 3\)"),
    (np.zeros((1, 8, 8, 3), np.float32), r"\(B, 3, H, W\)"),
    (np.zeros((1, 8, 8, 3), np.int32), "uint8 or float"),
])
def test_preprocess_rejects_bad_input(enc, bad, match):
    with pytest.raises(SSRError, match=match):
        enc.preprocess(bad)


def test_full_sam_checkpoint_round_trip(tmp_path):
    ref = tiny(seed=3)
    state = dict(ref.state_dict())  # keys are image_encoder.*, like an official SAM .pth
    assert all(k.startswith("image_encoder.") for k in state)
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    path = tmp_path / "sam_tiny.pth"
    torch.save(state, path)

    loaded = build_sam_encoder("vit_tiny", path)
    assert not loaded.random_init and loaded.init_seed is None
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.fingerprint()["checkpoint_sha256"] == loaded.checkpoint_sha256
    x = crops(1, 32, 32, seed=5)
    want, got = ref.encode(x), loaded.encode(x)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_encoder_only_checkpoint_loads(tmp_path):
    ref = tiny(seed=4)
    path = tmp_path / "enc.pth"
    torch.save(ref.image_encoder.state_dict(), path)
    loaded = build_sam_encoder("vit_tiny", str(path))
    x = crops(1, 16, 16)
    assert torch.equal(loaded.encode(x)["l16"], ref.encode(x)["l16"])


def test_wrong_model_type_is_named(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(SSRError, match=r"sam_tiny.pth holds a vit_tiny encoder \(embed dim 96.*not vit_b"):
        build_sam_encoder("vit_b", path)
    # A vit_h-shaped checkpoint (only the tensors needed to recognise it) offered as vit_tiny.
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(32)})
    torch.save(fake, tmp_path / "sam_vit_h.pth")
    with pytest.raises(SSRError, match=r"sam_vit_h.pth holds a vit_h encoder \(embed dim 1280, depth 32\), not vit_tiny"):
        build_sam_encoder("vit_tiny", tmp_path / "sam_vit_h.pth")


def test_missing_and_unexpected_encoder_keys(tmp_path):
    state = tiny().image_encoder.state_dict()
    missing = {k: v for k, v in state.items() if k != "neck.0.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(SSRError, match=r"missing.pth: missing 1 encoder keys \(neck.0.weight\)"):
        build_sam_encoder("vit_tiny", tmp_path / "missing.pth")
    torch.save(dict(state, **{"blocks.0.extra": torch.zeros(1)}), tmp_path / "extra.pth")
    with pytest.raises(SSRError, match=r"1 unexpected encoder keys \(blocks.0.extra\)"):
        build_sam_encoder("vit_tiny", tmp_path / "extra.pth")


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(SSRError, match="SAM checkpoint not found"):
        build_sam_encoder("vit_tiny", tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(SSRError, match="garbage.pth is not a readable torch checkpoint"):
        build_sam_encoder("vit_tiny", garbage)
    torch.save({"hello": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(SSRError, match="holds no SAM image encoder weights"):
        build_sam_encoder("vit_tiny", tmp_path / "other.pth")


def test_outputs_can_feed_trainable_layers(enc):
    out = enc.encode(crops(1))
    assert not out["l16"].is_inference() and not out["l16"].requires_grad
    proj = torch.nn.Linear(256, 8)
    proj(out["l16"].flatten(2).transpose(1, 2)).sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
