"""SegFormer/DAFormer mmseg-named MiT checkpoints -> timm MiT backbone.

The mmseg key/shape table and the reference forward below are written from the MiT definition alone
(SegFormer's mix_transformer), independent of the converter, so they check it rather than mirror it.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from ssr_cache.errors import SSRError
from ssr_train.models.backbones import MIT_VARIANTS, create_backbone
from ssr_train.models.mit_checkpoint import (
    load_mit_checkpoint,
    mit_tensors,
    mmseg_to_timm_key,
    timm_to_mmseg_key,
)

DIMS = {"mit_b0": (32, 64, 160, 256)}
DEPTHS = {
    "mit_b0": (2, 2, 2, 2),
    "mit_b1": (2, 2, 2, 2),
    "mit_b2": (3, 4, 6, 3),
    "mit_b3": (3, 4, 18, 3),
    "mit_b4": (3, 8, 27, 3),
    "mit_b5": (3, 6, 40, 3),
}
HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)


def mmseg_shapes(variant: str, *, mlp_ratio: int = 4, head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of an ImageNet `mit_b*.pth` (SegFormer naming) with its shape."""
    dims = DIMS.get(variant, (64, 128, 320, 512))
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = 3
    for s, (c, depth) in enumerate(zip(dims, DEPTHS[variant], strict=True)):
        n, k = s + 1, (7 if s == 0 else 3)
        shapes[f"patch_embed{n}.proj.weight"] = (c, c_in, k, k)
        shapes[f"patch_embed{n}.proj.bias"] = (c,)
        shapes[f"patch_embed{n}.norm.weight"] = shapes[f"patch_embed{n}.norm.bias"] = (c,)
        hidden = mlp_ratio * c
        for i in range(depth):
            p = f"block{n}.{i}."
            block = {
                "norm1.weight": (c,), "norm1.bias": (c,),
                "attn.q.weight": (c, c), "attn.q.bias": (c,),
                "attn.kv.weight": (2 * c, c), "attn.kv.bias": (2 * c,),
                "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
                "norm2.weight": (c,), "norm2.bias": (c,),
                "mlp.fc1.weight": (hidden, c), "mlp.fc1.bias": (hidden,),
                "mlp.dwconv.dwconv.weight": (hidden, 1, 3, 3), "mlp.dwconv.dwconv.bias": (hidden,),
                "mlp.fc2.weight": (c, hidden), "mlp.fc2.bias": (c,),
            }
            if SR_RATIOS[s] > 1:
                r = SR_RATIOS[s]
                block |= {
                    "attn.sr.weight": (c, c, r, r), "attn.sr.bias": (c,),
                    "attn.norm.weight": (c,), "attn.norm.bias": (c,),
                }
            shapes |= {p + key: shape for key, shape in block.items()}
        shapes[f"norm{n}.weight"] = shapes[f"norm{n}.bias"] = (c,)
        c_in = c
    if head:
        shapes["head.weight"], shapes["head.bias"] = (1000, dims[-1]), (1000,)
    return shapes


def random_mmseg_state_dict(variant: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in mmseg_shapes(variant, **kwargs).items():
        value = torch.randn(shape, generator=gen)
        # LayerNorm scales near 1 keep activations in a sane range through 8 random blocks.
        sd[key] = 1.0 + 0.1 * value if re.search(r"norm\d?\.weight$", key) else 0.1 * value
    return sd


def lazy_mmseg_state_dict(variant: str, **kwargs) -> dict[str, torch.Tensor]:
    """Right shapes, one stored float each: a big variant's checkpoint without its memory."""
    return {k: torch.zeros(1).expand(shape) for k, shape in mmseg_shapes(variant, **kwargs).items()}


def mit_reference_forward(sd: dict[str, torch.Tensor], variant: str, x: torch.Tensor) -> list[torch.Tensor]:
    """MiT encoder forward straight from mmseg-named weights, as SegFormer defines it."""

    def ln(t, name, eps):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(t, name):
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    outs = []
    for s in range(4):
        n = s + 1
        k, stride = (7, 4) if s == 0 else (3, 2)
        x = F.conv2d(x, sd[f"patch_embed{n}.proj.weight"], sd[f"patch_embed{n}.proj.bias"], stride, k // 2)
        b, c, h, w = x.shape
        t = ln(x.flatten(2).transpose(1, 2), f"patch_embed{n}.norm", 1e-5)
        heads, r = HEADS[s], SR_RATIOS[s]
        for i in range(DEPTHS[variant][s]):
            p = f"block{n}.{i}."
            y = ln(t, p + "norm1", 1e-6)
            q = lin(y, p + "attn.q").reshape(b, -1, heads, c // heads).transpose(1, 2)
            src = y
            if r > 1:
                grid = y.transpose(1, 2).reshape(b, c, h, w)
                grid = F.conv2d(grid, sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"], r)
                src = ln(grid.flatten(2).transpose(1, 2), p + "attn.norm", 1e-5)
            kv = lin(src, p + "attn.kv").reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
            attn = (q @ kv[0].transpose(-2, -1) / math.sqrt(c // heads)).softmax(-1)
            t = t + lin((attn @ kv[1]).transpose(1, 2).reshape(b, h * w, c), p + "attn.proj")
            y = lin(ln(t, p + "norm2", 1e-6), p + "mlp.fc1")
            grid = y.transpose(1, 2).reshape(b, -1, h, w)
            dw = p + "mlp.dwconv.dwconv"
            grid = F.conv2d(grid, sd[dw + ".weight"], sd[dw + ".bias"], 1, 1, groups=grid.shape[1])
            t = t + lin(F.gelu(grid.flatten(2).transpose(1, 2)), p + "mlp.fc2")
        x = ln(t, f"norm{n}", 1e-6).transpose(1, 2).reshape(b, c, h, w)
        outs.append(x)
    return outs


@pytest.mark.filterwarnings("ignore:.*to a meta parameter.*:UserWarning")  # meta backbone: shapes only
@pytest.mark.parametrize("variant", ["mit_b0", "mit_b2"])
def test_full_key_and_shape_mapping(variant: str, tmp_path) -> None:
    mmseg = lazy_mmseg_state_dict(variant)
    path = tmp_path / f"{variant}.pth"
    torch.save(mmseg, path)
    with torch.device("meta"):
        backbone = create_backbone(variant)
    report = load_mit_checkpoint(backbone, path)  # refuses any shape that differs
    target = backbone.body.state_dict()
    assert report.loaded == tuple(target) and report.missing == () and report.unexpected == ()
    assert report.dropped == ("head.weight", "head.bias")  # only the classifier head is dropped
    assert len(report.loaded) == len(mmseg) - 2
    for mmseg_key in mmseg:
        if not mmseg_key.startswith("head."):
            assert timm_to_mmseg_key(mmseg_to_timm_key(mmseg_key)) == mmseg_key


def test_spot_mapping() -> None:
    assert mmseg_to_timm_key("patch_embed1.proj.weight") == "patch_embed.proj.weight"
    assert mmseg_to_timm_key("patch_embed3.norm.bias") == "stages_2.downsample.norm.bias"
    assert mmseg_to_timm_key("block4.2.mlp.dwconv.dwconv.weight") == "stages_3.blocks.2.mlp.dwconv.weight"
    assert mmseg_to_timm_key("block1.0.attn.kv.bias") == "stages_0.blocks.0.attn.kv.bias"
    assert mmseg_to_timm_key("norm2.weight") == "stages_1.norm.weight"
    assert mmseg_to_timm_key("head.weight") is None


@pytest.mark.parametrize("variant", list(MIT_VARIANTS))
def test_mit_definition_param_count_matches_backbone(variant: str) -> None:
    expected = sum(math.prod(shape) for shape in mmseg_shapes(variant, head=False).values())
    with torch.device("meta"):
        backbone = create_backbone(variant)
    assert sum(p.numel() for p in backbone.parameters()) == expected
    assert round(expected / 1e6, 1) == {
        "mit_b0": 3.3, "mit_b1": 13.2, "mit_b2": 24.2, "mit_b3": 44.1, "mit_b4": 60.8, "mit_b5": 81.4,
    }[variant]


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "backbone_prefix", "ddp_prefix", "daformer_uda"])
def test_checkpoint_wrappers_are_unwrapped(wrap: str) -> None:
    sd = lazy_mmseg_state_dict("mit_b0")
    segmentor = {f"backbone.{k}": v for k, v in sd.items()} | {"decode_head.conv_seg.bias": torch.zeros(19)}
    saved = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "meta": {"epoch": 300}},
        "model": {"model": sd},
        "backbone_prefix": {"state_dict": segmentor},
        "ddp_prefix": {f"module.backbone.{k}": v for k, v in sd.items()},
        # A DAFormer/MIC UDA run saves student, EMA teacher and ImageNet copy; the student is the
        # model DAFormer evaluates, so it is the one taken.
        "daformer_uda": {"state_dict": {f"{m}.backbone.{k}": v if m == "model" else torch.zeros_like(v)
                                        for m in ("model", "ema_model", "imnet_model") for k, v in sd.items()}
                         | {"model.decode_head.conv_seg.bias": torch.zeros(19)}},
    }[wrap]
    unwrapped = mit_tensors(saved)
    assert unwrapped.keys() == sd.keys()
    assert unwrapped["block4.1.mlp.dwconv.dwconv.weight"] is sd["block4.1.mlp.dwconv.dwconv.weight"]


def test_load_covers_every_parameter_and_matches_reference_forward(tmp_path) -> None:
    sd = random_mmseg_state_dict("mit_b0")
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()}}, path)

    backbone = create_backbone("mit_b0", drop_path_rate=0.0)
    report = load_mit_checkpoint(backbone, path)
    assert report.variant == "mit_b0"
    assert report.summary() == "backbone mit_b0: 176 tensors from mit_b0.pth, ImageNet classifier dropped (2)"
    assert len(report.loaded) == len(backbone.body.state_dict()) == 176
    assert report.missing == () and report.unexpected == ()
    assert report.dropped == ("head.weight", "head.bias")
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, sd[timm_to_mmseg_key(key)]), key

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backbone.eval()(x)
        reference = mit_reference_forward(sd, "mit_b0", x)
    for a, b in zip(ours, reference, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_timm_model_round_trip_through_mmseg_names_is_exact(tmp_path) -> None:
    torch.manual_seed(3)
    source = create_backbone("mit_b0", drop_path_rate=0.0).eval()
    path = tmp_path / "exported.pth"
    torch.save({timm_to_mmseg_key(k): v for k, v in source.body.state_dict().items()}, path)
    fresh = create_backbone("mit_b0", checkpoint=path, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        for a, b in zip(source(x), fresh(x), strict=True):
            assert torch.equal(a, b)


def test_missing_key_is_named(tmp_path) -> None:
    sd = random_mmseg_state_dict("mit_b0")
    del sd["block1.0.attn.q.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    backbone = create_backbone("mit_b0")
    with pytest.raises(SSRError, match=r"lacks 1 of the mit_b0 weights, first: block1\.0\.attn\.q\.weight"):
        load_mit_checkpoint(backbone, path)
    report = load_mit_checkpoint(backbone, path, strict=False)
    assert report.missing == ("stages_0.blocks.0.attn.q.weight",)


@pytest.mark.parametrize(("saved", "into"), [("mit_b5", "mit_b0"), ("mit_b1", "mit_b2")])
def test_wrong_variant_names_both(tmp_path, saved: str, into: str) -> None:
    path = tmp_path / f"{saved}.pth"
    torch.save(lazy_mmseg_state_dict(saved), path)
    assert path.stat().st_size < 2_000_000  # expanded tensors keep their one-float storage
    with torch.device("meta"):  # the check comes before any copy: no need for real weights
        backbone = create_backbone(into)
    with pytest.raises(SSRError, match=f"holds {saved} weights but the backbone is {into}"):
        load_mit_checkpoint(backbone, path)


def test_pvtv2_checkpoint_is_a_shape_error(tmp_path) -> None:
    path = tmp_path / "pvt_v2_b1.pth"
    torch.save(lazy_mmseg_state_dict("mit_b1", mlp_ratio=8), path)  # PVTv2 widths, MiT names
    with torch.device("meta"):
        backbone = create_backbone("mit_b1")
    expected = r"not a mit_b1 MiT checkpoint: block1\.0\.mlp\.fc1\.weight has shape \(512, 64\)"
    with pytest.raises(SSRError, match=expected):
        load_mit_checkpoint(backbone, path)


def test_truncated_backbone_reports_unused_stages(tmp_path) -> None:
    path = tmp_path / "mit_b0.pth"
    torch.save(random_mmseg_state_dict("mit_b0"), path)
    report = load_mit_checkpoint(create_backbone("mit_b0", out_indices=(0, 1)), path)
    assert len(report.loaded) == 2 * (4 + 2 * 20 + 2)  # per stage: patch embed, 2 blocks, norm
    assert "block3.0.attn.q.weight" in report.unexpected and "norm4.bias" in report.unexpected
    assert "unused (stages this backbone does not build)" in report.summary()


def test_garbage_and_foreign_files(tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with torch.device("meta"):  # every error comes before any copy
        mit, resnet = create_backbone("mit_b0"), create_backbone("resnet18")
    with pytest.raises(SSRError, match="cannot read MiT checkpoint"):
        load_mit_checkpoint(mit, garbage)

    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(SSRError, match="expected a dict of tensors, got Tensor"):
        load_mit_checkpoint(mit, tensor)

    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, foreign)
    with pytest.raises(SSRError, match="no patch_embed"):
        load_mit_checkpoint(mit, foreign)

    with pytest.raises(SSRError, match="only into mit_b0"):
        load_mit_checkpoint(resnet, foreign)
    with pytest.raises(SSRError, match="not found"):
        load_mit_checkpoint(mit, tmp_path / "absent.pth")
