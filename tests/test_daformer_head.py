from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssr_train.models.daformer_head import ConvBNReLU, DAFormerHead, SeparableConvBNReLU

MIT_B0 = (32, 64, 160, 256)
MIT_B1 = (64, 128, 320, 512)


def stage_maps(channels: tuple[int, ...], batch: int = 2, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, c, size // r, size // r, generator=g)
        for c, r in zip(channels, (4, 8, 16, 32), strict=True)
    ]


def test_logits_at_quarter_resolution_for_mit_b0():
    head = DAFormerHead(MIT_B0)
    logits = head(stage_maps(MIT_B0, batch=2, size=64))
    assert logits.shape == (2, 19, 16, 16)
    assert head.forward_features(stage_maps(MIT_B0)).shape == (2, 256, 16, 16)


def test_non_square_input_and_num_classes():
    head = DAFormerHead(MIT_B0, num_classes=7, embed_dim=64)
    feats = [torch.randn(1, c, 96 // r, 64 // r) for c, r in zip(MIT_B0, (4, 8, 16, 32), strict=True)]
    assert head(feats).shape == (1, 7, 24, 16)


def test_parameter_count_matches_daformer_sepaspp():
    # embeds: sum(C_i*256 + 256); ASPP on 4*256=1024 channels: 1x1 branch conv+BN, three separable
    # branches (dw 3x3 + BN, pw 1x1 + BN), 3x3 bottleneck 1024->256 + BN; classifier 256->19 with bias.
    embeds = sum(c * 256 + 256 for c in MIT_B0)
    branch1 = 1024 * 256 + 2 * 256
    separable = 1024 * 9 + 2 * 1024 + 1024 * 256 + 2 * 256
    bottleneck = 1024 * 256 * 9 + 2 * 256
    classifier = 256 * 19 + 19
    expected = embeds + branch1 + 3 * separable + bottleneck + classifier
    assert expected == 3_581_203
    assert sum(p.numel() for p in DAFormerHead(MIT_B0).parameters()) == expected
    b1 = sum(p.numel() for p in DAFormerHead(MIT_B1).parameters())
    assert b1 - expected == 256 * (sum(MIT_B1) - sum(MIT_B0))


def test_layer_structure():
    head = DAFormerHead(MIT_B0)
    assert [m.in_features for m in head.embeds] == list(MIT_B0)
    assert all(m.out_features == 256 and m.bias is not None for m in head.embeds)
    branches = head.fuse.branches
    assert isinstance(branches[0], ConvBNReLU)
    assert branches[0][0].weight.shape == (256, 1024, 1, 1)
    for branch, d in zip(branches[1:], (6, 12, 18), strict=True):
        assert isinstance(branch, SeparableConvBNReLU)
        dw, pw = branch[0][0], branch[1][0]
        assert dw.weight.shape == (1024, 1, 3, 3) and dw.groups == 1024
        assert dw.dilation == (d, d) and dw.padding == (d, d)
        assert pw.weight.shape == (256, 1024, 1, 1)
    assert head.fuse.bottleneck[0].weight.shape == (256, 1024, 3, 3)
    assert head.fuse.bottleneck[0].padding == (1, 1)
    convs = [m for m in head.fuse.modules() if isinstance(m, nn.Conv2d)]
    # 1 + 3*2 + 1 convs in the fusion, each followed by its own BN and ReLU; none has a bias.
    assert len(convs) == 8 and all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 8
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 8
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.classifier.weight.shape == (19, 256, 1, 1) and head.classifier.bias is not None
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in head.modules())


def test_init():
    torch.manual_seed(0)
    head = DAFormerHead(MIT_B0)
    assert torch.all(head.classifier.bias == 0)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    # kaiming normal, fan_out, relu gain: std = sqrt(2 / (out * k * k))
    w = head.fuse.bottleneck[0].weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)


def test_forward_matches_manual_composition():
    torch.manual_seed(0)
    head = DAFormerHead(MIT_B0).eval()
    feats = stage_maps(MIT_B0)
    embedded = []
    for f, lin in zip(feats, head.embeds, strict=True):
        # token-wise Linear == 1x1 conv with the same weights
        x = F.conv2d(f, lin.weight[:, :, None, None], lin.bias)
        embedded.append(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    fused = head.fuse.bottleneck(torch.cat([b(torch.cat(embedded, 1)) for b in head.fuse.branches], 1))
    expected = head.classifier(fused)
    with torch.no_grad():
        torch.testing.assert_close(head(feats), expected, atol=1e-5, rtol=1e-5)


def test_dropout_drops_whole_channels_in_train_mode():
    torch.manual_seed(0)
    head = DAFormerHead(MIT_B0, dropout=0.5)
    fused = torch.randn(2, 256, 8, 8)
    head.train()
    dropped = head.dropout(fused)
    zero_channels = (dropped == 0).all(dim=(2, 3))
    assert 0 < zero_channels.float().mean().item() < 1
    kept = ~zero_channels
    torch.testing.assert_close(dropped[kept], 2 * fused[kept])
    assert isinstance(DAFormerHead(MIT_B0, dropout=0.0).dropout, nn.Identity)


def test_wrong_number_of_stages_rejected():
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        DAFormerHead(MIT_B0)(stage_maps(MIT_B0)[:3])


def test_gradients_reach_every_parameter():
    head = DAFormerHead(MIT_B0)
    feats = [f.requires_grad_() for f in stage_maps(MIT_B0)]
    head(feats).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(f.grad is not None for f in feats)
