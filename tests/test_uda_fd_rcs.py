from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ssr_cache.data.label_space import CITYSCAPES
from ssr_train.uda.feature_distance import (
    downscale_label_ratio,
    feature_distance_loss,
    imnet_features,
    make_imnet_model,
)
from ssr_train.uda.rare_class_sampling import RareClassSampler, min_pixels_for_crop, rcs_class_probs


def test_downscale_label_ratio_on_crafted_cells():
    gt = torch.tensor(
        [
            [0, 0, 1, 1, 5, 5, 255, 255],
            [0, 0, 1, 2, 6, 6, 255, 1],
        ]
    )[None]
    out = downscale_label_ratio(gt, 2, 0.75, 19)
    # cells: all 0 | 1 covers 3/4 | 5 and 6 tie at 1/2 | ignore is the majority
    assert out.shape == (1, 1, 1, 4) and out.dtype == torch.long
    assert out.flatten().tolist() == [0, 1, 255, 255]
    # with min_ratio 0.5 the tie keeps the first maximal class
    assert downscale_label_ratio(gt, 2, 0.5, 19).flatten().tolist() == [0, 1, 5, 255]
    with pytest.raises(ValueError):
        downscale_label_ratio(gt, 1, 0.75, 19)


def _fd_case():
    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    gt[0, :2, :2] = 11  # person: thing cell (0, 0)
    gt[0, 2:, :2] = 13  # car: thing cell (1, 0)
    gt[0, 2:, 2:] = 255  # ignored cell (1, 1); cell (0, 1) is road
    student = torch.full((1, 2, 2, 2), 100.0)
    student[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    student[0, :, 1, 0] = torch.tensor([6.0, 8.0])
    return student.requires_grad_(True), torch.zeros(1, 2, 2, 2), gt


# DAFormer's FD settings: Cityscapes' thing classes, purity 0.75, 19 classes, lambda 0.005
REFERENCE_FD = dict(classes=CITYSCAPES.indices(CITYSCAPES.thing_classes), scale_min_ratio=0.75, num_classes=19,
                    lambda_=0.005)


def test_feature_distance_hand_computed():
    student, imnet, gt = _fd_case()
    loss = feature_distance_loss(student, imnet, gt, **REFERENCE_FD)
    assert math.isclose(loss.item(), 0.005 * (5.0 + 10.0) / 2, rel_tol=1e-6)
    loss.backward()
    expected = torch.zeros(1, 2, 2, 2)
    expected[0, :, 0, 0] = 0.005 / 2 * torch.tensor([0.6, 0.8])  # d||f|| / df = f / ||f||
    expected[0, :, 1, 0] = 0.005 / 2 * torch.tensor([0.6, 0.8])
    assert torch.allclose(student.grad, expected)
    everywhere = feature_distance_loss(student, imnet, gt, **{**REFERENCE_FD, "classes": None, "lambda_": 1.0})
    assert math.isclose(everywhere.item(), (5 + 10 + 2 * math.hypot(100, 100)) / 4, rel_tol=1e-6)


def test_feature_distance_zero_without_things():
    student, imnet, gt = _fd_case()
    gt[gt != 255] = 0
    loss = feature_distance_loss(student, imnet, gt, **REFERENCE_FD)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2, stride=2)
        self.drop = nn.Dropout(0.9)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, self.drop(self.conv(x))]


def test_imnet_model_is_a_frozen_eval_copy():
    torch.manual_seed(0)
    backbone = _Backbone()
    imnet = make_imnet_model(backbone)
    assert not imnet.training and all(not p.requires_grad for p in imnet.parameters())
    img = torch.randn(1, 3, 8, 8)
    before = imnet_features(imnet, img)
    with torch.no_grad():
        backbone.conv.weight.add_(1.0)
    imnet.train()  # e.g. a parent module's .train(); features still come from eval mode
    after = imnet_features(imnet, img)
    assert torch.equal(before, after) and after.shape == (1, 4, 4, 4) and not after.requires_grad
    assert torch.equal(after, imnet.conv(img))


def _counts() -> np.ndarray:
    counts = np.zeros((4, 19), dtype=np.int64)
    counts[0, [0, 2]] = [5000, 1000]
    counts[1, [0, 1]] = [3000, 4000]  # exactly 3000 of class 0: not eligible (reference uses >)
    counts[2, 2] = 3500
    counts[3, [0, 3]] = [900, 100]  # class 3 occurs but never in an eligible amount
    return counts


def test_rcs_class_probs_by_hand():
    totals = {0: 8900, 1: 4000, 2: 4500, 3: 100}
    norm = sum(totals.values())
    t = 0.1
    e = {c: math.exp((1 - n / norm) / t) for c, n in totals.items() if c != 3}
    probs = rcs_class_probs(_counts(), temperature=t, min_pixels=3000)
    expected = np.zeros(19)
    for c, v in e.items():
        expected[c] = v / sum(e.values())
    assert np.allclose(probs, expected, rtol=1e-12, atol=0)
    assert probs[3] == 0 and math.isclose(probs.sum(), 1.0)
    assert probs[1] > probs[2] > probs[0]  # rarer classes are drawn more often


def _views():
    """Two views per image of _counts(): (view counts (8, 19), view → image (8,))."""
    views = np.zeros((8, 19), dtype=np.int64)
    views[0, 0], views[1, 0] = 2000, 1000  # image 0: only view 0 holds > 1500 px of class 0
    views[2, 1], views[3, 1] = 1500, 1400  # image 1: no view holds > 1500 px of class 1 → either view
    views[4, 2], views[5, 2] = 100, 1600  # image 2: only view 5 holds > 1500 px of class 2
    views[6, 0], views[7, 3] = 900, 100
    return views, np.repeat(np.arange(4), 2)


def test_rcs_class_eligibility_is_per_image_then_a_view_of_that_image():
    views, view_image = _views()
    sampler = RareClassSampler(_counts(), views, view_image, temperature=0.1, min_pixels=3000, min_crop_pixels=1500)
    assert [v.tolist() for v in sampler.images_with_class[:4]] == [[0], [1], [2], []]
    rng = np.random.default_rng(0)
    n = 20000
    drawn = sampler.draw(rng, n)
    assert drawn.dtype == np.int64 and drawn.shape == (n,)
    observed = np.bincount(drawn, minlength=8)
    assert observed[[1, 4, 6, 7]].sum() == 0  # views without the class when a sibling has it; image 3
    per_class = np.array([observed[0], observed[2] + observed[3], observed[5]])
    expected = n * sampler.class_probs[:3]
    chi2 = (((per_class - expected) ** 2) / expected).sum()
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001
    assert abs(observed[2] - observed[3]) < 4 * np.sqrt(per_class[1])  # no eligible view: uniform over both
    assert np.array_equal(drawn, sampler.draw(np.random.default_rng(0), n))


def test_rcs_errors():
    views, view_image = _views()
    with pytest.raises(ValueError, match="no image has more than 3000 pixels"):
        RareClassSampler(np.full((4, 19), 10), views, view_image, temperature=0.01, min_pixels=3000,
                         min_crop_pixels=1500)
    with pytest.raises(ValueError, match="do not match"):
        RareClassSampler(_counts(), views[:5], view_image, temperature=0.01, min_pixels=3000, min_crop_pixels=1500)


def test_min_pixels_scale_with_crop_area():
    assert min_pixels_for_crop(3000, (512, 512)) == 3000
    assert min_pixels_for_crop(3000, (1024, 512)) == 3000
    assert min_pixels_for_crop(3000, (64, 64)) == 47  # 3000 * 4096 / 262144 = 46.875
    assert min_pixels_for_crop(3000, (256, 512)) == 1500
