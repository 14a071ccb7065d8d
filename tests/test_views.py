from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssr_cache.build.view_plan import (
    View,
    ViewPlanConfig,
    ViewTable,
    apply_view,
    apply_views,
    plan_views,
    rescale_size,
)
from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.errors import SSRError

SMALL = ViewPlanConfig(resize=(128, 64), crop=(32, 32), views_per_image=3, seed=0)


def test_mmcv_rescale_rule_numbers():
    assert rescale_size((1914, 1052), (1280, 720)) == ((1280, 704), 1280 / 1914)
    assert rescale_size((2048, 1024), (1024, 512)) == ((1024, 512), 0.5)
    # The short edge can bind: a 1000x1000 image fits a 720 short side.
    assert rescale_size((1000, 1000), (1280, 720))[0] == (720, 720)
    gta = plan_views([(1914, 1052)], ViewPlanConfig(resize=(1280, 720), views_per_image=2), progress=True)
    city = plan_views([(2048, 1024)], ViewPlanConfig(resize=(1024, 512), views_per_image=2), progress=False)
    assert gta.resized_hw.tolist() == [[704, 1280]] * 2 and city.resized_hw.tolist() == [[512, 1024]] * 2
    assert gta.scale[0] == np.float32(1280 / 1914) and city.scale[0] == 0.5


def test_plan_is_deterministic_and_seed_dependent():
    sizes = [(256, 128), (200, 100), (300, 160)] * 4
    a = plan_views(sizes, SMALL, progress=False)
    b = plan_views(sizes, SMALL, progress=False, workers=2)
    c = plan_views(sizes, ViewPlanConfig(resize=(128, 64), crop=(32, 32), views_per_image=3, seed=1), progress=False)
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    # A sample's views depend only on (seed, its index): planning a prefix gives the same rows.
    prefix = plan_views(sizes[:5], SMALL, progress=False)
    assert np.array_equal(prefix.box, a.box[:15]) and np.array_equal(prefix.flip, a.flip[:15])


def test_k_views_per_image_in_order_with_boxes_inside():
    sizes = [(256, 128), (640, 360), (130, 70)]
    cfg = ViewPlanConfig(resize=(128, 64), crop=(40, 56), ratio_range=(1.0, 2.0), views_per_image=5, seed=3)
    table = plan_views(sizes, cfg, progress=False)
    assert len(table) == 15
    assert table.sample_index.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert table.sample_index.dtype == np.int32 and table.box.dtype == np.int32
    assert table.scale.dtype == np.float32 and table.flip.dtype == bool and table.resized_hw.shape == (15, 2)
    y0, x0, y1, x1 = table.box.T
    h, w = table.resized_hw.T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= h).all() and (x1 <= w).all()
    assert ((y1 - y0) == 40).all() and ((x1 - x0) == 56).all()
    # Ratio range: the resized size is the keep-ratio fit of img_scale * ratio, ratio in [1, 2].
    assert (h >= 64).all() and (h <= 128).all() and len(set(h.tolist())) > 3
    for i in range(len(table)):
        view = table.row(i)
        src_w, src_h = sizes[view.sample_index]
        assert view.resized_hw == (int(src_h * view.scale + 0.5), int(src_w * view.scale + 0.5))


def test_to_from_arrays_round_trip():
    table = plan_views([(256, 128)] * 2, SMALL, progress=False)
    again = ViewTable.from_arrays({k: np.array(v) for k, v in table.to_arrays().items()})
    assert again.digest() == table.digest() and len(again) == 6
    assert again.row(4) == table.row(4) and isinstance(table.row(0), View)
    with pytest.raises(SSRError, match="missing arrays: flip"):
        ViewTable.from_arrays({k: v for k, v in table.to_arrays().items() if k != "flip"})


def test_flip_fraction_is_binomial():
    cfg = ViewPlanConfig(resize=(64, 32), crop=(16, 16), views_per_image=8, seed=11)
    table = plan_views([(64, 32)] * 500, cfg, progress=False)
    n = len(table)
    # 4000 fair flips: |mean - 0.5| < 4 sigma (sigma = 0.5 / sqrt(n) ≈ 0.0079).
    assert abs(table.flip.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)
    never = plan_views([(64, 32)] * 10, ViewPlanConfig(resize=(64, 32), crop=(16, 16), flip_prob=0.0),
                       progress=False)
    assert not never.flip.any()


def road_label(h: int = 100, w: int = 200) -> np.ndarray:
    """90% road; a 20x100 block of car in the top-left corner (the only place a crop is varied)."""
    label = np.zeros((h, w), np.uint8)
    label[:20, :100] = 13
    label[-5:, :] = 255
    return label


def passes_rule(label: np.ndarray, box) -> bool:
    y0, x0, y1, x1 = box
    c = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=256)[:255]
    return (c > 0).sum() > 1 and c.max() / c.sum() < 0.75


def test_cat_max_ratio_rule_follows_mmseg_statistics():
    label = road_label()
    # Exact share p of all 61x161 crop positions that pass the rule on their own.
    p = np.mean([passes_rule(label, (y, x, y + 40, x + 40)) for y in range(61) for x in range(161)])
    assert 0.05 < p < 0.2
    n = 1000
    cfg = ViewPlanConfig(resize=(200, 100), crop=(40, 40), views_per_image=n, seed=5)
    ruled = plan_views([(200, 100)], cfg, label_loader=lambda i: label, progress=False)
    free = plan_views([(200, 100)], cfg, progress=False)  # no label loader: no rule (target domain)
    for table, want in ((free, p), (ruled, 1 - (1 - p) ** 10)):  # ten tries, the last kept regardless
        got = np.mean([passes_rule(label, b) for b in table.box])
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n)
    # The rule reads the label resized like the image: at half size, views still come out crop-sized.
    half = plan_views([(200, 100)], ViewPlanConfig(resize=(100, 50), crop=(20, 20), views_per_image=20, seed=5),
                      label_loader=lambda i: label, progress=False)
    small = label[::2, ::2]  # nearest to half size = every other pixel
    assert np.mean([passes_rule(small, b) for b in half.box]) > 0.4
    for i in range(len(half)):
        _, lab = apply_view(np.zeros((100, 200, 3), np.uint8), label, half.row(i))
        y0, x0, y1, x1 = half.row(i).box
        assert np.array_equal(lab, small[y0:y1, x0:x1][:, ::-1] if half.row(i).flip else small[y0:y1, x0:x1])


@pytest.mark.parametrize("ratio", [None, 1.0])
def test_a_label_loader_is_called_for_every_sample_even_with_the_rule_off(ratio):
    # What the loader gathers besides the label (the build's RCS class counts) must not depend on the rule.
    label, calls = road_label(), []
    cfg = ViewPlanConfig(resize=(200, 100), crop=(40, 40), views_per_image=3, seed=5, cat_max_ratio=ratio)
    loaded = plan_views([(200, 100)] * 4, cfg, label_loader=lambda i: calls.append(i) or label, progress=False)
    assert sorted(calls) == [0, 1, 2, 3]
    assert loaded.digest() == plan_views([(200, 100)] * 4, cfg, progress=False).digest()  # the rule stays off


def test_cat_max_ratio_keeps_last_try_when_impossible():
    label = np.zeros((64, 64), np.uint8)  # all road: no crop can pass
    cfg = ViewPlanConfig(resize=(64, 64), crop=(16, 16), views_per_image=4, seed=2)
    table = plan_views([(64, 64)], cfg, label_loader=lambda i: label, progress=False)
    assert len(table) == 4 and ((table.box[:, 2] - table.box[:, 0]) == 16).all()


def crafted_image(h: int = 60, w: int = 80) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 3 % 256, y * 4 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def test_apply_view_identity_resize_crop_and_flip():
    image = crafted_image()
    label = (np.arange(60 * 80).reshape(60, 80) % 19).astype(np.uint8)
    view = View(sample_index=0, scale=1.0, resized_hw=(60, 80), box=(10, 20, 42, 52), flip=False)
    crop, lab = apply_view(image, label, view)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8 and lab.shape == (32, 32)
    assert np.array_equal(crop, image[10:42, 20:52]) and np.array_equal(lab, label[10:42, 20:52])
    assert crop[0, 0].tolist() == [60, 40, 30]  # pixel (y=10, x=20)
    flipped, lab_f = apply_view(image, label, View(0, 1.0, (60, 80), (10, 20, 42, 52), True))
    assert flipped[0, 31].tolist() == [60, 40, 30] and flipped[0, 0].tolist() == image[10, 51].tolist()
    assert np.array_equal(lab_f, lab[:, ::-1])
    assert apply_view(image, None, view)[1] is None


def float64_bilinear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Independent reference: exact bilinear resize (half-pixel centres, no antialiasing) in float64, unrounded."""
    t = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    ref = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=False)
    return ref[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("in_hw", "out_hw"), [((61, 83), (40, 54)), ((61, 83), (100, 136)),
                                               ((1052, 1914), (720, 1280)), ((513, 257), (512, 256))])
def test_uint8_crop_is_within_one_grey_level_of_exact_float64_bilinear(in_hw, out_hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8)  # noise: the worst case for interpolation error
    box = (3, 5, out_hw[0] - 2, out_hw[1] - 4)
    crop, _ = apply_view(image, None, View(0, out_hw[0] / in_hw[0], out_hw, box, False))
    ref = float64_bilinear(image, out_hw)[box[0]:box[2], box[1]:box[3]]
    assert crop.dtype == np.uint8 and crop.shape == ref.shape
    assert np.abs(crop.astype(float) - ref).max() <= 1.0
    # and it is the definition the reference's mmcv.imrescale uses: cv2 INTER_LINEAR of the whole image
    whole = cv2.resize(image, out_hw[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(crop, whole[box[0]:box[2], box[1]:box[3]])


def test_views_sharing_an_image_give_the_same_crops_together_or_alone():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (90, 120), dtype=np.uint8)
    views = [View(0, 0.5, (45, 60), (1, 2, 33, 34), False), View(0, 0.5, (45, 60), (5, 9, 37, 41), True),
             View(0, 0.75, (67, 90), (0, 0, 32, 32), False)]
    together = apply_views(image, label, views)
    for view, (crop, lab) in zip(views, together, strict=True):
        alone, alone_lab = apply_view(image, label, view)
        assert np.array_equal(crop, alone) and np.array_equal(lab, alone_lab)


def test_a_flipped_view_is_the_mirror_of_the_unflipped_one_at_gta5_size():
    """The flip goes through cv2.flip (pixels) and reversed gather columns (labels): exactly numpy's mirror."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (1052, 1914, 3), dtype=np.uint8)
    label = rng.integers(0, 256, (1052, 1914), dtype=np.uint8)
    boxes = [(0, 0, 512, 512), (208, 768, 720, 1280), (17, 301, 529, 813)]
    plain = apply_views(image, label, [View(0, 0.684, (720, 1280), b, False) for b in boxes])
    flipped = apply_views(image, label, [View(0, 0.684, (720, 1280), b, True) for b in boxes])
    for (crop, lab), (crop_f, lab_f) in zip(plain, flipped, strict=True):
        assert np.array_equal(crop_f, crop[:, ::-1]) and np.array_equal(lab_f, lab[:, ::-1])


def test_apply_view_resize_matches_torch_nearest_for_labels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (61, 83), dtype=np.uint8)
    for hw in [(40, 54), (100, 136)]:  # down and up
        box = (3, 5, hw[0] - 2, hw[1] - 4)
        crop, lab = apply_view(image, label, View(0, hw[0] / 61, hw, box, False))
        ref_lab = F.interpolate(torch.from_numpy(label)[None, None].float(), size=hw, mode="nearest")
        assert np.array_equal(lab, ref_lab[0, 0].numpy().astype(np.uint8)[box[0]:box[2], box[1]:box[3]])
    # A constant image stays constant through any resize.
    flat = np.full((50, 70, 3), 77, np.uint8)
    assert (apply_view(flat, None, View(0, 0.5, (25, 35), (0, 0, 25, 35), False))[0] == 77).all()


def test_plan_then_apply_gives_crop_sized_views():
    image = crafted_image(100, 200)
    label = road_label()
    table = plan_views([(200, 100)], ViewPlanConfig(resize=(120, 60), crop=(32, 48), views_per_image=4),
                       label_loader=lambda i: label, progress=False)
    for i in range(len(table)):
        crop, lab = apply_view(image, label, table.row(i))
        assert crop.shape == (32, 48, 3) and lab.shape == (32, 48)


def test_class_counts():
    lab = np.array([[0, 0, 18, 255], [19, 5, 5, 5]], np.uint8)
    counts = CITYSCAPES.count(lab)
    assert counts.dtype == np.int64 and counts.shape == (19,)
    assert counts[0] == 2 and counts[5] == 3 and counts[18] == 1 and counts.sum() == 6


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(views_per_image=0), "views per image must be at least 1, got 0"),
    (dict(views_per_image=-2), "views per image must be at least 1"),
    (dict(ratio_range=(2.0, 1.0)), r"ratio range must satisfy 0 < low <= high, got \(2, 1\)"),
    (dict(ratio_range=(0.0, 1.0)), "ratio range"),
    (dict(ratio_range=(0.5, float("nan"))), "ratio range"),
    (dict(flip_prob=1.5), "flip probability"),
    (dict(crop=(0, 32)), "crop must be two positive sizes"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(SSRError, match=match):
        ViewPlanConfig(**kwargs)


def test_crop_larger_than_resized_image_names_both_sizes():
    cfg = ViewPlanConfig(resize=(1024, 512), crop=(512, 512), ratio_range=(0.5, 2.0))
    with pytest.raises(SSRError, match="crop 512x512 is larger than the resized image 512x256"):
        plan_views([(2048, 1024)], cfg, progress=False)
    # At ratio 1 it fits.
    ok = plan_views([(2048, 1024)], ViewPlanConfig(resize=(1024, 512), views_per_image=2), progress=False)
    assert ok.resized_hw.tolist() == [[512, 1024], [512, 1024]]


def test_label_of_wrong_size_is_rejected():
    with pytest.raises(SSRError, match="label is 10x10, image is 64x32"):
        plan_views([(64, 32)], ViewPlanConfig(resize=(64, 32), crop=(16, 16)),
                   label_loader=lambda i: np.zeros((10, 10), np.uint8), progress=False)
