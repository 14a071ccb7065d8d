from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssr_train.models.ssr_regularizer import SamCrossAttention, SSRRegularizer

MIT_B0 = (32, 64, 160, 256)


def manual_attention(att: SamCrossAttention, feat: torch.Tensor, sam: torch.Tensor) -> torch.Tensor:
    """Reference-style computation: explicit reshapes as in SSR's AttentionCross, explicit softmax."""
    b, c, h, w = feat.shape
    heads, d = att.num_heads, c // att.num_heads
    x1 = feat.flatten(2).transpose(1, 2)
    x2 = sam.flatten(2).transpose(1, 2) @ att.sam_embed.weight.T + att.sam_embed.bias
    q = (x1 @ att.q.weight.T).reshape(b, h * w, heads, d).permute(0, 2, 1, 3)
    kv = (x2 @ att.kv.weight.T).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
    x = x @ att.proj.weight.T + att.proj.bias
    return feat + x.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("channels", [32, 128, 160, 320])
def test_matches_manual_softmax_attention(channels):
    torch.manual_seed(0)
    att = SamCrossAttention(channels)
    feat = torch.randn(2, channels, 6, 5)
    sam = torch.randn(2, 256, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(att(feat, sam), manual_attention(att, feat, sam), atol=1e-5, rtol=1e-5)


def test_zero_output_projection_is_identity():
    torch.manual_seed(0)
    att = SamCrossAttention(64)
    torch.nn.init.zeros_(att.proj.weight)
    torch.nn.init.zeros_(att.proj.bias)
    feat = torch.randn(2, 64, 8, 8)
    assert torch.equal(att(feat, torch.randn(2, 256, 4, 4)), feat)


def test_known_projection_adds_value_mean_for_constant_keys():
    # Identical SAM tokens -> uniform attention -> every query gets the same value vector; with
    # proj = identity and no bias the enhancement is exactly that vector.
    att = SamCrossAttention(64)
    with torch.no_grad():
        att.proj.weight.copy_(torch.eye(64))
        att.proj.bias.zero_()
        sam = torch.ones(1, 256, 3, 3)
        feat = torch.randn(1, 64, 4, 4)
        value = att.kv(att.sam_embed(torch.ones(256)))[64:]
        out = att(feat, sam)
    torch.testing.assert_close(out - feat, value[None, :, None, None].expand(1, 64, 4, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("channels", "heads"), [(32, 1), (64, 1), (128, 2), (160, 2), (256, 4), (320, 5), (512, 8)]
)
def test_heads_and_projection_shapes(channels, heads):
    att = SamCrossAttention(channels)
    assert att.num_heads == heads
    assert att.sam_embed.weight.shape == (channels, 256) and att.sam_embed.bias is not None
    assert att.q.weight.shape == (channels, channels) and att.q.bias is None
    assert att.kv.weight.shape == (2 * channels, channels) and att.kv.bias is None
    assert att.proj.weight.shape == (channels, channels) and att.proj.bias is not None
    params = sum(p.numel() for p in att.parameters())
    assert params == 256 * channels + channels + 4 * channels * channels + channels


def test_indivisible_heads_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        SamCrossAttention(96, num_heads=5)


def test_reduced_precision_sam_is_cast_to_feature_dtype():
    torch.manual_seed(0)
    att = SamCrossAttention(64)
    feat = torch.randn(2, 64, 4, 4)
    sam16 = torch.randn(2, 256, 4, 4).half()
    out = att(feat, sam16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, att(feat, sam16.float()))


def test_batch_mismatch_rejected():
    with pytest.raises(ValueError, match="SAM batch"):
        SamCrossAttention(64)(torch.randn(2, 64, 4, 4), torch.randn(1, 256, 4, 4))


def feats_b0(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(batch, c, 32 // r, 32 // r, generator=g)
        for c, r in zip(MIT_B0, (4, 8, 16, 32), strict=True)
    ]


def test_stage_selection_leaves_other_stages_unchanged():
    torch.manual_seed(0)
    reg = SSRRegularizer(MIT_B0, stages=(0,))
    assert list(reg.attentions.keys()) == ["0"]
    feats = feats_b0()
    out = reg(feats, torch.randn(2, 256, 4, 4))
    assert out[0].shape == feats[0].shape and not torch.allclose(out[0], feats[0])
    assert all(out[i] is feats[i] for i in (1, 2, 3))


def test_all_stages_enhanced_with_shared_sam_map():
    torch.manual_seed(0)
    reg = SSRRegularizer(MIT_B0)
    assert reg.stages == (0, 1, 2, 3)
    assert [reg.attentions[str(i)].num_heads for i in range(4)] == [1, 1, 2, 4]
    feats = feats_b0()
    sam = torch.randn(2, 256, 8, 8)
    out = reg(feats, sam)
    for i in range(4):
        torch.testing.assert_close(out[i], reg.attentions[str(i)](feats[i], sam))


def test_per_stage_sam_maps_by_mapping_and_sequence():
    torch.manual_seed(0)
    reg = SSRRegularizer(MIT_B0, stages=(1, 2))
    feats = feats_b0()
    full = torch.randn(2, 256, 8, 8)
    pooled = F.avg_pool2d(full, 2)  # e.g. a coarser cache level for stage 2
    by_stage = reg(feats, {1: full, 2: pooled})
    torch.testing.assert_close(by_stage[1], reg.attentions["1"](feats[1], full))
    torch.testing.assert_close(by_stage[2], reg.attentions["2"](feats[2], pooled))
    assert not torch.allclose(by_stage[2], reg.attentions["2"](feats[2], full))
    as_list = reg(feats, [None, full, pooled, None])
    assert all(torch.equal(a, b) for a, b in zip(as_list, by_stage, strict=True))
    with pytest.raises(KeyError, match="stage 2"):
        reg(feats, {1: full})
    with pytest.raises(ValueError, match="one SAM map per stage"):
        reg(feats, [full, pooled])


def test_invalid_stage_rejected():
    with pytest.raises(ValueError, match="out of range"):
        SSRRegularizer(MIT_B0, stages=(4,))


def test_gradients_flow_to_regularizer_and_features():
    torch.manual_seed(0)
    reg = SSRRegularizer(MIT_B0, stages=(0, 3))
    feats = [f.requires_grad_() for f in feats_b0()]
    out = reg(feats, torch.randn(2, 256, 4, 4))
    sum(o.square().sum() for o in out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters())
    assert all(f.grad is not None for f in feats)
