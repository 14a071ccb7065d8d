from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ssr_train.models.daformer_head import DAFormerHead
from ssr_train.models.segmentor import (
    SSRSegmentor,
    build_segmentor,
    build_shadow_segmentor,
    segmentation_loss,
    ssr_loss,
)
from ssr_train.models.ssr_regularizer import SSRRegularizer


class MitB0(nn.Module):
    """Thin adapter: timm pvt_v2_b0 (== MiT-B0) stage maps as a list, with out_channels."""

    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model("pvt_v2_b0", features_only=True, mlp_ratios=(4, 4, 4, 4))
        self.out_channels = tuple(self.model.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


def make(ssr_stages=(0, 1, 2, 3), seed: int = 0) -> SSRSegmentor:
    torch.manual_seed(seed)
    return build_segmentor(MitB0(), ssr_stages=ssr_stages)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 32, 32, generator=g)
    sam = torch.randn(2, 256, 2, 2, generator=g)
    label = torch.randint(0, 19, (2, 32, 32), generator=g)
    return img, sam, label


def test_forward_equals_plain_branch_of_forward_train(batch):
    img, sam, _ = batch
    model = make()
    torch.manual_seed(1)
    logits = model(img)
    torch.manual_seed(1)  # same dropout mask in train mode
    out = model.forward_train(img, sam)
    assert logits.shape == (2, 19, 8, 8)
    assert torch.equal(logits, out["shadow_logits"])
    assert out["enhanced_logits"].shape == (2, 19, 8, 8)
    assert not torch.allclose(out["enhanced_logits"], out["shadow_logits"])
    assert [f.shape[1] for f in out["feats"]] == [32, 64, 160, 256]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(img), model.forward_train(img, sam)["shadow_logits"])


def test_enhanced_branch_shares_the_head(batch):
    img, sam, _ = batch
    model = make().eval()
    with torch.no_grad():
        out = model.forward_train(img, sam)
        expected = model.head(model.regularizer(out["feats"], sam))
    assert torch.equal(out["enhanced_logits"], expected)
    assert not any(isinstance(m, DAFormerHead) for m in model.regularizer.modules())


def test_without_regularizer_only_plain_loss(batch):
    img, sam, label = batch
    model = make(ssr_stages=None)
    assert model.regularizer is None
    out = model.forward_train(img, sam)
    assert out["enhanced_logits"] is None
    losses = ssr_loss(out, label)
    assert losses["loss_enhanced"] is None
    assert torch.equal(losses["total"], segmentation_loss(out["shadow_logits"], label))
    # with a regulariser but no SAM features (e.g. a step without them) there is no enhanced branch
    assert make().forward_train(img)["enhanced_logits"] is None


def test_ssr_loss_sums_both_branches_and_trains_regularizer(batch):
    img, sam, label = batch
    model = make(ssr_stages=(1, 2))
    out = model.forward_train(img, sam)
    losses = ssr_loss(out, label)
    torch.testing.assert_close(losses["loss_shadow"], segmentation_loss(out["shadow_logits"], label))
    torch.testing.assert_close(losses["loss_enhanced"], segmentation_loss(out["enhanced_logits"], label))
    torch.testing.assert_close(losses["total"], losses["loss_shadow"] + losses["loss_enhanced"])
    losses["loss_shadow"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.regularizer.parameters())
    losses["loss_enhanced"].backward()
    assert all(p.grad is not None for p in model.regularizer.parameters())
    assert model.head.classifier.weight.grad is not None


def test_ssr_on_and_off_share_initial_weights():
    on, off = make(), make(ssr_stages=None)
    on_state, off_state = on.state_dict(), off.state_dict()
    extra = set(on_state) - set(off_state)
    assert extra and all(k.startswith("regularizer.") for k in extra)
    assert set(off_state) <= set(on_state)
    assert all(torch.equal(off_state[k], on_state[k]) for k in off_state)


def test_shadow_state_dict_is_exactly_the_shadow_branch(batch):
    img, sam, label = batch
    model = make(ssr_stages=(0, 3))
    # one training step so the weights and BN statistics differ from init
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ssr_loss(model.forward_train(img, sam), label)["total"].backward()
    opt.step()
    exported = model.shadow_state_dict()
    torch.manual_seed(123)
    plain = build_shadow_segmentor(MitB0())
    assert set(exported) == set(plain.state_dict())
    assert not any(k.startswith("regularizer.") for k in exported)
    assert any(k.startswith("backbone.") for k in exported) and any(k.startswith("head.") for k in exported)
    loaded = build_shadow_segmentor(MitB0())
    loaded.load_state_dict(exported, strict=True)
    loaded.eval()
    assert loaded.regularizer is None
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(img), model(img))
        assert torch.equal(loaded(img), model.forward_train(img, sam)["shadow_logits"])
    # the export is a snapshot, not a view of the live weights
    before = exported["head.classifier.bias"].clone()
    with torch.no_grad():
        model.head.classifier.bias.add_(1.0)
    assert torch.equal(exported["head.classifier.bias"], before)


def test_shadow_segmentor_load_is_strict():
    full = make().state_dict()  # still has regularizer.* keys
    with pytest.raises(RuntimeError, match="regularizer"):
        build_shadow_segmentor(MitB0()).load_state_dict(full, strict=True)


def test_segmentor_accepts_explicit_components():
    torch.manual_seed(0)
    backbone = MitB0()
    model = SSRSegmentor(backbone, DAFormerHead(backbone.out_channels), SSRRegularizer(backbone.out_channels))
    out = model.forward_train(torch.randn(1, 3, 32, 32), torch.randn(1, 256, 2, 2))
    assert out["enhanced_logits"].shape == (1, 19, 8, 8)


def test_uniform_logits_give_ln19_and_ignore_is_excluded():
    logits = torch.zeros(2, 19, 4, 4)
    label = torch.randint(0, 19, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    assert segmentation_loss(logits, label).item() == pytest.approx(math.log(19), rel=1e-6)
    label[:, :4] = 255  # a quarter of the pixels unlabeled
    assert segmentation_loss(logits, label).item() == pytest.approx(math.log(19), rel=1e-6)
    # mmseg 0.16 style: ignored pixels count in the denominator
    assert segmentation_loss(logits, label, mean_over="all").item() == pytest.approx(
        0.75 * math.log(19), rel=1e-6
    )
    label[:] = 255
    assert segmentation_loss(logits, label).item() == 0.0
    with pytest.raises(ValueError, match="mean_over"):
        segmentation_loss(logits, label, mean_over="sum")


def test_pixel_weights_scale_losses_but_not_the_denominator():
    logits = torch.zeros(1, 19, 2, 2)
    label = torch.tensor([[[0, 1], [2, 255]]])
    weight = torch.tensor([[[[1.0, 0.5], [0.0, 7.0]]]])  # (B, 1, H, W) accepted; the 7 sits on ignore
    # valid pixels: 3; weighted sum: (1 + 0.5 + 0) * ln 19
    expected = 1.5 * math.log(19) / 3
    assert segmentation_loss(logits, label, weight).item() == pytest.approx(expected, rel=1e-6)
    assert segmentation_loss(logits, label[:, None], weight[:, 0]).item() == pytest.approx(expected, rel=1e-6)


def test_logits_upsampled_bilinearly_to_label_size():
    # spatially constant logits stay exact under bilinear upsampling: every pixel's loss is the same
    scores = torch.linspace(-2, 3, 19)
    logits = scores[None, :, None, None].expand(1, 19, 4, 4).contiguous()
    label = torch.full((1, 16, 16), 5)
    expected = -F.log_softmax(scores, 0)[5]
    torch.testing.assert_close(segmentation_loss(logits, label), expected)
    # a non-constant map: equals CE on the explicitly upsampled logits
    logits = torch.randn(2, 19, 4, 4, generator=torch.Generator().manual_seed(0))
    label = torch.randint(0, 19, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(segmentation_loss(logits, label), F.cross_entropy(up, label))
