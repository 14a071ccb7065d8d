from __future__ import annotations

import math

import pytest
import torch

from ssr_cache.image_norm import PIXEL_MEAN, PIXEL_STD
from ssr_train.uda.classmix import classmix_masks, mix, mix_features, mixed_pixel_weight
from ssr_train.uda.mic_mask import BlockMaskGenerator, block_size_for
from ssr_train.uda.strong_aug import (
    blur_kernel_size,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
    strong_transform,
)


def _stripes(classes: list[int], h: int = 4) -> torch.Tensor:
    """(h, 2*len) label with two columns per class."""
    return torch.tensor(classes).repeat_interleave(2).repeat(h, 1)


def _classes_in_mask(label: torch.Tensor, mask: torch.Tensor) -> set[int]:
    inside = set(label[mask[0] == 1].tolist())
    outside = set(label[mask[0] == 0].tolist())
    assert not inside & outside  # every class is pasted whole or not at all
    return inside


@pytest.mark.parametrize(
    "classes, kwargs, expected",
    [
        ([0, 1, 2, 3, 4], {}, 3),  # ceil(5 / 2)
        ([0, 1, 2, 3, 4, 255], {}, 3),  # 255 is a candidate in the reference
        ([0, 1, 2, 3, 255], {"exclude_ignore": True}, 2),
        ([7], {}, 1),
    ],
)
def test_classmix_takes_half_of_the_classes(classes, kwargs, expected):
    label = _stripes(classes)[None]
    for seed in range(10):
        mask = classmix_masks(label, generator=torch.Generator().manual_seed(seed), **kwargs)
        assert mask.shape == (1, 1, 4, 2 * len(classes)) and mask.dtype == torch.float32
        chosen = _classes_in_mask(label[0], mask[0])
        assert len(chosen) == expected
        if kwargs.get("exclude_ignore"):
            assert 255 not in chosen


def test_classmix_candidates_come_from_the_whole_batch():
    labels = torch.stack([_stripes([0, 1, 0, 1]), _stripes([2, 3, 4, 5])])  # batch classes: 6 -> 3 chosen
    sizes, sizes_per_image = set(), set()
    for seed in range(40):
        masks = classmix_masks(labels, generator=torch.Generator().manual_seed(seed))
        sizes.add(len(_classes_in_mask(labels[0], masks[0])))
        own = classmix_masks(labels, generator=torch.Generator().manual_seed(seed), per_image_classes=True)
        sizes_per_image.add(len(_classes_in_mask(labels[0], own[0])))
        assert len(_classes_in_mask(labels[1], own[1])) == 2
    assert sizes == {0, 1, 2}  # image 0 may get none of its own classes
    assert sizes_per_image == {1}


def test_classmix_deterministic_per_generator():
    labels = torch.randint(0, 19, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    a = classmix_masks(labels, generator=torch.Generator().manual_seed(5))
    b = classmix_masks(labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    others = [classmix_masks(labels, generator=torch.Generator().manual_seed(s)) for s in range(6, 9)]
    assert any(not torch.equal(a, o) for o in others)


def test_mix_images_labels_and_weights():
    g = torch.Generator().manual_seed(0)
    src_lbl = torch.stack([_stripes([0, 1, 2, 3]), _stripes([4, 5, 255, 6])])
    tgt_lbl = torch.full((2, 4, 8), 9)
    mask = classmix_masks(src_lbl, generator=g)
    src_img, tgt_img = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    img = mix(mask, src_img, tgt_img)
    lbl = mix(mask, src_lbl, tgt_lbl)
    pseudo_w = torch.full((2, 4, 8), 0.25)
    weight = mixed_pixel_weight(mask, pseudo_w)
    assert lbl.dtype == torch.long and img.shape == (2, 3, 4, 8) and weight.shape == (2, 4, 8)
    m = mask.bool()
    assert torch.equal(img, mask * src_img + (1 - mask) * tgt_img)
    assert torch.equal(lbl[m[:, 0]], src_lbl[m[:, 0]])
    assert torch.equal(lbl[~m[:, 0]], torch.full((int((~m).sum()),), 9))
    assert torch.equal(weight, torch.where(m[:, 0], 1.0, 0.25))


def test_mix_features_uses_nearest_resized_mask():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :4, 4:] = 1  # top-right quadrant
    mask[0, 0, 5, 1] = 1  # a stray pixel that the nearest sample at (4, 0) misses
    src, tgt = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    out = mix_features(mask, src, tgt)
    assert torch.equal(out, torch.tensor([[0.0, 1.0], [0.0, 0.0]]).expand(1, 2, 2, 2))


def _image(seed: int, b: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    pixels = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _denorm(img: torch.Tensor) -> torch.Tensor:
    return (img * torch.tensor(PIXEL_STD).view(1, 3, 1, 1) + torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / 255


def test_strong_transform_identity_when_nothing_fires():
    img = _image(0)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        out = strong_transform(img, generator=g, color_jitter_s=0.2, color_jitter_p=1.0, blur=False)
        assert torch.equal(out, img)


def test_strong_transform_jitter_always_with_p0():
    img = _image(1)
    out = strong_transform(img, generator=torch.Generator().manual_seed(0), color_jitter_s=0.2, color_jitter_p=0.0, blur=False)
    again = strong_transform(img, generator=torch.Generator().manual_seed(0), color_jitter_s=0.2, color_jitter_p=0.0, blur=False)
    other = strong_transform(img, generator=torch.Generator().manual_seed(1), color_jitter_s=0.2, color_jitter_p=0.0, blur=False)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert not torch.allclose(out, img)
    unit = _denorm(out)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


def test_strong_transform_jitter_rate_follows_reference_comparison():
    img = _image(2, b=1, h=4, w=4)
    fired = sum(
        not torch.equal(strong_transform(img, generator=torch.Generator().manual_seed(s), color_jitter_s=0.2, color_jitter_p=0.2,
                                   blur=False), img)
        for s in range(400)
    )
    assert abs(fired / 400 - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 400)  # applied when u > p = 0.2


def _high_freq(x: torch.Tensor) -> float:
    return ((x[..., 1:] - x[..., :-1]) ** 2).mean().item()


def test_strong_transform_blur_removes_high_frequencies():
    img = _image(3)
    seeds = [torch.Generator().manual_seed(s) for s in range(20)]
    blurred = [strong_transform(img, generator=g, color_jitter_s=0.2, color_jitter_p=1.0, blur=True) for g in seeds]
    changed = [b for b in blurred if not torch.equal(b, img)]
    assert changed, "blur never fired in 20 seeds"
    for out in changed:
        assert out.shape == img.shape and out.dtype == img.dtype
        assert _high_freq(out) < _high_freq(img) and out.var() < img.var()
        assert torch.allclose(out.mean(), img.mean(), atol=0.05)
    strong = gaussian_blur(img, 1.15)  # largest reference sigma: white noise loses most of its energy
    assert _high_freq(strong) < 0.1 * _high_freq(img) and strong.var() < 0.3 * img.var()


def test_blur_kernel_size_and_weights():
    assert [blur_kernel_size(d) for d in (512, 1024, 64, 100, 10)] == [51, 103, 7, 9, 1]
    delta = torch.zeros(1, 1, 64, 64)
    delta[0, 0, 32, 32] = 1.0
    out = gaussian_blur(delta, 1.0)  # kernel 7x7
    g = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / 2)
    g = g / g.sum()
    assert torch.allclose(out[0, 0, 29:36, 29:36], torch.outer(g, g), atol=1e-7)
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-6)


def test_hsv_conversion():
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]).T.reshape(3, 1, 3)
    hsv = rgb_to_hsv(rgb)
    assert torch.allclose(hsv[:, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.allclose(hsv[:, 0, 1], torch.tensor([4 * math.pi / 3, 1.0, 1.0]))
    assert torch.allclose(hsv[:, 0, 2], torch.tensor([0.0, 0.0, 0.5]))
    shifted = hsv.clone()
    shifted[0] += 2 * math.pi / 3  # one third turn: red -> green, blue -> red
    assert torch.allclose(hsv_to_rgb(shifted)[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(hsv_to_rgb(shifted)[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)


def test_block_size_scales_with_crop():
    assert [block_size_for(c, base=32) for c in (512, 1024, 256, 64, 16, 8)] == [32, 64, 16, 4, 1, 1]


def test_mic_mask_ratio_and_blocks():
    gen = BlockMaskGenerator(mask_ratio=0.7, mask_block_size=32)
    imgs = torch.ones(20, 3, 128, 128)
    mask = gen.generate_mask(imgs, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (20, 1, 128, 128)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    blocks = mask.reshape(20, 4, 32, 4, 32)
    assert torch.equal(blocks.amin(dim=(2, 4)), blocks.amax(dim=(2, 4)))  # constant in each 32x32 block
    masked = 1 - blocks[:, :, 0, :, 0].mean().item()  # 320 blocks
    assert abs(masked - 0.7) < 4 * math.sqrt(0.7 * 0.3 / 320)
    many = BlockMaskGenerator(0.7, 4).generate_mask(torch.ones(50, 1, 64, 64), generator=torch.Generator())
    assert abs((1 - many.mean().item()) - 0.7) < 4 * math.sqrt(0.7 * 0.3 / (50 * 256))


def test_mic_mask_image_and_determinism():
    gen = BlockMaskGenerator(mask_ratio=0.7, mask_block_size=8)
    img = torch.randn(2, 3, 100, 60)
    a = gen.mask_image(img, generator=torch.Generator().manual_seed(3))
    mask = gen.generate_mask(img, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (2, 1, 100, 60)  # 13 x 8 grid (rounded), nearest-upsampled
    assert torch.equal(a, img * mask)
    assert not torch.equal(mask, gen.generate_mask(img, generator=torch.Generator().manual_seed(4)))
