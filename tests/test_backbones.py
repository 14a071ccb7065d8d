"""create_backbone: MiT-B0…B5 built from timm pvt_v2 with SegFormer's hyper-parameters, other timm models."""

from __future__ import annotations

import pytest
import timm
import torch

from ssr_cache.errors import SSRError
from ssr_train.models.backbones import MIT_VARIANTS, Backbone, create_backbone

# Parameter counts of the MiT encoders (no classifier), also derived from the MiT definition key by key
# in test_mit_checkpoint.py::test_mit_definition_param_count_matches_backbone.
MIT_PARAMS = {
    "mit_b0": 3_319_392,
    "mit_b1": 13_151_424,
    "mit_b2": 24_196_288,
    "mit_b3": 44_072_128,
    "mit_b4": 60_842_688,
    "mit_b5": 81_443_008,
}
MIT_DEPTHS = {
    "mit_b0": (2, 2, 2, 2),
    "mit_b1": (2, 2, 2, 2),
    "mit_b2": (3, 4, 6, 3),
    "mit_b3": (3, 4, 18, 3),
    "mit_b4": (3, 8, 27, 3),
    "mit_b5": (3, 6, 40, 3),
}


def test_mit_b0_forward_shapes() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("mit_b0", drop_path_rate=0.0).eval()
    assert isinstance(backbone, Backbone)
    assert backbone.out_channels == (32, 64, 160, 256)
    assert tuple(backbone.body.feature_info.reduction()) == (4, 8, 16, 32)
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 96))
    shapes = [tuple(f.shape) for f in features]
    assert shapes == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)]
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize("name", list(MIT_VARIANTS))
def test_mit_variant_matches_segformer_definition(name: str) -> None:
    with torch.device("meta"):  # structure only: no memory, no init cost
        backbone = create_backbone(name)
    body = backbone.body
    dims = (32, 64, 160, 256) if name == "mit_b0" else (64, 128, 320, 512)
    assert backbone.out_channels == dims
    assert tuple(backbone.body.feature_info.reduction()) == (4, 8, 16, 32)
    assert sum(p.numel() for p in backbone.parameters()) == MIT_PARAMS[name]

    stem = body.patch_embed.proj
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (4, 4), (3, 3))
    assert body.patch_embed.norm.eps == 1e-5
    for s in range(4):
        stage = getattr(body, f"stages_{s}")
        if s > 0:
            down = stage.downsample.proj
            assert (down.kernel_size, down.stride, down.padding) == ((3, 3), (2, 2), (1, 1))
            assert (down.in_channels, down.out_channels) == (dims[s - 1], dims[s])
            assert stage.downsample.norm.eps == 1e-5
        assert len(stage.blocks) == MIT_DEPTHS[name][s]
        assert stage.norm.eps == 1e-6
        for block in stage.blocks:
            attn = block.attn
            assert attn.num_heads == (1, 2, 5, 8)[s]
            assert attn.q.bias is not None and attn.kv.bias is not None
            assert attn.kv.out_features == 2 * dims[s]
            sr = (8, 4, 2, 1)[s]
            if sr > 1:
                assert attn.sr.kernel_size == (sr, sr) and attn.sr.stride == (sr, sr)
                assert attn.norm.eps == 1e-5
            else:
                assert attn.sr is None and attn.norm is None
            assert block.mlp.fc1.out_features == 4 * dims[s]  # MiT mlp ratio 4, not PVTv2's 8
            assert block.mlp.dwconv.groups == 4 * dims[s] and block.mlp.dwconv.kernel_size == (3, 3)
            assert isinstance(block.mlp.relu, torch.nn.Identity)
            assert block.norm1.eps == 1e-6 and block.norm2.eps == 1e-6


def test_mit_drop_path_rises_linearly_over_all_blocks() -> None:
    with torch.device("meta"):
        backbone = create_backbone("mit_b2", drop_path_rate=0.3)
    rates = [
        getattr(block.drop_path1, "drop_prob", 0.0)  # rate 0 builds an Identity
        for s in range(4)
        for block in getattr(backbone.body, f"stages_{s}").blocks
    ]
    assert len(rates) == 16
    assert rates == pytest.approx(torch.linspace(0, 0.3, 16).tolist())


def test_mit_out_indices_truncates_stages() -> None:
    backbone = create_backbone("mit_b0", out_indices=(0, 1), drop_path_rate=0.0).eval()
    assert backbone.out_channels == (32, 64)
    assert not hasattr(backbone.body, "stages_2")
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape) for f in features] == [(1, 32, 8, 8), (1, 64, 4, 4)]


def test_timm_resnet_backbone_and_its_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("resnet18", checkpoint=path, out_indices=(1, 2, 3, 4)).eval()
    assert backbone.out_channels == (64, 128, 256, 512)
    assert tuple(backbone.body.feature_info.reduction()) == (4, 8, 16, 32)
    assert torch.equal(backbone.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    shapes = [tuple(f.shape) for f in features]
    assert shapes == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]


def test_channels_last_timm_features_come_back_nchw() -> None:
    backbone = create_backbone(
        "swin_tiny_patch4_window7_224", drop_path_rate=0.0, img_size=64, window_size=2,
        depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1),
    ).eval()
    assert backbone.channels_last
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    shapes = [tuple(f.shape) for f in features]
    assert shapes == [(1, 24, 16, 16), (1, 48, 8, 8), (1, 96, 4, 4), (1, 192, 2, 2)]


def test_unknown_name_lists_mit_variants() -> None:
    with pytest.raises(SSRError, match=r"unknown backbone 'mit_b9'.*mit_b0, mit_b1.*mit_b5.*timm"):
        create_backbone("mit_b9")


def test_pretrained_without_checkpoint_never_downloads() -> None:
    with pytest.raises(SSRError, match="--backbone-checkpoint"):
        create_backbone("mit_b0", pretrained=True)
    with pytest.raises(SSRError, match="--backbone-checkpoint"):
        create_backbone("resnet18", pretrained=True)


def test_missing_checkpoint_file(tmp_path) -> None:
    with pytest.raises(SSRError, match="checkpoint not found"):
        create_backbone("mit_b0", checkpoint=tmp_path / "absent.pth")


def test_bad_timm_kwargs_are_user_errors() -> None:
    with pytest.raises(SSRError, match="cannot build backbone 'resnet18'"):
        create_backbone("resnet18", out_indices=(7,))
