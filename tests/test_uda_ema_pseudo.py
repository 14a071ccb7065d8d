from __future__ import annotations

import pytest
import torch
from torch import nn

from ssr_train.methods.daformer import DAFormerConfig
from ssr_train.models.backbones import create_backbone
from ssr_train.models.segmentor import build_segmentor
from ssr_train.uda.ema import ema_alpha, make_teacher, teacher_train_mode, update_ema
from ssr_train.uda.pseudo_label import ignore_rows_for, pseudo_labels

REF = DAFormerConfig()  # the reference values live in the method's config
ALPHA = REF.ema_alpha
ROWS = {"ignore_top": REF.pseudo_ignore_top, "ignore_bottom": REF.pseudo_ignore_bottom}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.tensor(2.0))  # scalar parameter, as DACS special-cases
        self.regularizer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)) * self.scale


def test_alpha_schedule():
    assert ema_alpha(0, alpha_max=ALPHA) == 0.0
    assert ema_alpha(1, alpha_max=ALPHA) == 0.5
    assert ema_alpha(10, alpha_max=ALPHA) == 1 - 1 / 11
    assert ema_alpha(999, alpha_max=ALPHA) == 0.999
    assert ema_alpha(5000, alpha_max=ALPHA) == 0.999
    assert ema_alpha(5000, alpha_max=0.9999) == 1 - 1 / 5001


def test_make_teacher_drops_regularizer_and_grads():
    torch.manual_seed(0)
    student = Tiny()
    teacher = make_teacher(student)
    assert teacher.regularizer is None and student.regularizer is not None
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        assert torch.equal(p, s[name]) and p.data_ptr() != s[name].data_ptr()


@pytest.mark.parametrize("it", [0, 1, 10, 5000])
def test_update_ema_formula(it):
    torch.manual_seed(0)
    student = Tiny()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn_like(p))
        teacher.backbone[1].running_mean.fill_(7.0)
        student.backbone[1].running_mean.fill_(-3.0)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    alpha = update_ema(teacher, student, it, alpha_max=0.999)
    assert alpha == ema_alpha(it, alpha_max=0.999)
    for name, p in teacher.named_parameters():
        s = dict(student.named_parameters())[name].detach()
        expected = s if it == 0 else alpha * before[name] + (1 - alpha) * s
        assert torch.equal(p, expected), name
    # buffers are never touched (reference copies parameters only)
    assert torch.equal(teacher.backbone[1].running_mean, torch.full((4,), 7.0))
    assert teacher.backbone[1].num_batches_tracked.item() == 0


def test_update_ema_it0_is_exact_copy_even_over_nan():
    student = Tiny()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(float("nan"))
    update_ema(teacher, student, 0, alpha_max=ALPHA)
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        assert torch.equal(p, s[name]), name


def test_update_ema_numbers():
    student, teacher = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
    update_ema(teacher, student, 1, alpha_max=ALPHA)  # alpha 0.5
    assert teacher.weight.item() == 0.5
    update_ema(teacher, student, 3, alpha_max=ALPHA)  # alpha 0.75: 0.75 * 0.5 + 0.25
    assert teacher.weight.item() == 0.625


def test_teacher_train_mode_disables_dropout_only():
    teacher = teacher_train_mode(make_teacher(Tiny()).eval())
    assert teacher.training and teacher.backbone[1].training
    assert not teacher.backbone[2].training
    x = torch.randn(8, 3)
    assert torch.equal(teacher(x), teacher(x))


def test_teacher_of_real_segmentor():
    torch.manual_seed(0)
    student = build_segmentor(create_backbone("mit_b0", drop_path_rate=0.1), ssr_stages=(0, 1, 2, 3))
    teacher = teacher_train_mode(make_teacher(student))
    assert teacher.regularizer is None
    assert not any(k.startswith("regularizer.") for k in teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_ema(teacher, student, 1, alpha_max=ALPHA)  # regulariser parameters of the student are skipped
    name, p = next(iter(teacher.named_parameters()))
    assert torch.allclose(p, dict(student.named_parameters())[name] - 0.5)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(img), teacher(img))  # no drop path / dropout noise


def _logits(confident_rows: slice, batch: int = 2, h: int = 8, w: int = 4) -> torch.Tensor:
    logits = torch.zeros(batch, 3, h, w)
    logits[:, 0] = 1.0  # softmax max prob 0.576 < 0.968
    logits[0, 0, confident_rows] = 10.0  # 0.99991 >= 0.968
    logits[1, 2] = 2.0  # class 2 wins in image 1
    return logits


def test_pseudo_weight_is_one_batch_scalar_and_rows_zeroed():
    labels, weight = pseudo_labels(_logits(slice(0, 4)), threshold=REF.pseudo_threshold, ignore_top=1, ignore_bottom=2, scale_rows=False)
    assert labels.dtype == torch.long and labels.shape == (2, 8, 4)
    assert torch.equal(labels[0], torch.zeros(8, 4, dtype=torch.long))
    assert torch.equal(labels[1], torch.full((8, 4), 2))
    # 16 confident pixels of 2*8*4 = 64 in the batch -> 0.25 for both images
    expected = torch.full((2, 8, 4), 0.25)
    expected[:, 0] = 0
    expected[:, 6:] = 0
    assert torch.equal(weight, expected)


def test_pseudo_weight_counts_ignored_rows():
    _, weight = pseudo_labels(_logits(slice(0, 1)), threshold=REF.pseudo_threshold, ignore_top=1, ignore_bottom=0, scale_rows=False)
    assert torch.equal(weight[:, 1:], torch.full((2, 7, 4), 4 / 64))
    assert torch.equal(weight[:, 0], torch.zeros(2, 4))


def test_ignore_rows_scale_with_small_crops():
    assert ignore_rows_for(512, **ROWS) == (15, 120)
    assert ignore_rows_for(1024, **ROWS) == (15, 120)
    assert ignore_rows_for(256, **ROWS) == (8, 60)
    assert ignore_rows_for(64, **ROWS) == (2, 15)
    assert ignore_rows_for(64, **ROWS, scale_rows=False) == (15, 120)
    logits = torch.zeros(1, 2, 64, 8)
    logits[:, 0] = 10.0
    _, weight = pseudo_labels(logits, threshold=REF.pseudo_threshold, **ROWS)  # everything confident -> scalar 1
    rows = weight[0, :, 0]
    assert torch.equal(rows[:2], torch.zeros(2))
    assert torch.equal(rows[2:49], torch.ones(47))
    assert torch.equal(rows[49:], torch.zeros(15))
    _, unscaled = pseudo_labels(logits, threshold=REF.pseudo_threshold, **ROWS, scale_rows=False)
    assert unscaled.sum().item() == 0  # 15 + 120 rows cover the whole 64-pixel crop


def test_pseudo_labels_upsample_to_size():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 10.0
    labels, weight = pseudo_labels(logits, threshold=REF.pseudo_threshold, ignore_top=0, ignore_bottom=0, size=(8, 8))
    assert labels.shape == weight.shape == (1, 8, 8)
    assert labels[0, 0, 0].item() == 1 and labels[0, 7, 7].item() == 0
    assert torch.equal(weight, torch.full((1, 8, 8), weight[0, 0, 0].item()))
