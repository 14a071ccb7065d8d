"""Semantic-segmentation scores from a confusion matrix: per-class IoU, mIoU, mAcc, aAcc (in percent).

Conventions (the Cityscapes evaluation script's and mmseg's): rows are ground truth, columns are
prediction, ground-truth pixels equal to ``ignore_index`` are left out entirely (a prediction there is
neither right nor wrong). A class with no pixel in the ground truth *and* none in the prediction has no
IoU: it is n/a (``None``; cityscapesscripts reports NaN) and left out of the mean, rather than counted as
0. A class that is predicted but absent from the ground truth scores IoU 0. Accuracy of a class is n/a
when the class is absent from the ground truth.
"""

from __future__ import annotations

import numpy as np
import torch

from ssr_cache.data.label_space import CITYSCAPES, LabelSpace


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    num_classes: int = CITYSCAPES.num_classes,
    ignore_index: int = CITYSCAPES.ignore_index,
) -> np.ndarray:
    """int64 (num_classes, num_classes): entry [g, p] counts pixels with ground truth g predicted as p.

    ``pred`` and ``gt`` are same-shaped integer arrays (numpy, or torch tensors counted on their own
    device). Ground truth must hold 0..num_classes-1 or ``ignore_index``; where it is not ignored, the
    prediction must hold 0..num_classes-1. Anything else is a ValueError.
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(gt.shape)}")
    if isinstance(gt, torch.Tensor):
        gt, pred = gt.reshape(-1).long(), torch.as_tensor(pred, device=gt.device).reshape(-1).long()
    else:
        gt, pred = np.asarray(gt).reshape(-1).astype(np.int64), np.asarray(pred).reshape(-1).astype(np.int64)
    valid = gt != ignore_index
    gt, pred = gt[valid], pred[valid]
    if bool(((gt < 0) | (gt >= num_classes)).any()):
        raise ValueError(f"ground truth holds values other than 0..{num_classes - 1} and {ignore_index}")
    if bool(((pred < 0) | (pred >= num_classes)).any()):
        raise ValueError(f"prediction holds values outside 0..{num_classes - 1} on labelled pixels")
    codes = gt * num_classes + pred
    if isinstance(codes, torch.Tensor):
        counts = torch.bincount(codes, minlength=num_classes**2).cpu().numpy()
    else:
        counts = np.bincount(codes, minlength=num_classes**2)
    return counts.astype(np.int64).reshape(num_classes, num_classes)


class Confusion:
    """A running confusion matrix: ``update(pred, gt)`` per image, ``scores()`` at the end."""

    def __init__(self, label_space: LabelSpace = CITYSCAPES) -> None:
        self.num_classes = label_space.num_classes
        self.ignore_index = label_space.ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)

    def scores(self) -> dict:
        return scores(self.matrix)


def _percent(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
    return [100.0 * float(n) / float(d) if d > 0 else None for n, d in zip(numerator, denominator, strict=True)]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def scores(conf: np.ndarray) -> dict:
    """Scores of a confusion matrix, all in percent; ``None`` marks a score that does not exist.

    ``iou``: per-class IoU = TP / (TP + FP + FN), None for a class absent from ground truth and prediction;
    ``miou``: mean over the classes that have an IoU; ``acc``: per-class TP / ground-truth pixels, None for
    a class absent from the ground truth; ``macc``: mean over the classes that have one; ``aacc``: all
    correct pixels over all labelled pixels; ``n_pixels``: labelled pixels counted.
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {conf.shape}")
    tp = np.diag(conf)
    gt_pixels = conf.sum(axis=1)
    pred_pixels = conf.sum(axis=0)
    iou = _percent(tp, gt_pixels + pred_pixels - tp)
    acc = _percent(tp, gt_pixels)
    total = int(conf.sum())
    return {
        "iou": iou,
        "miou": _mean(iou),
        "acc": acc,
        "macc": _mean(acc),
        "aacc": 100.0 * float(tp.sum()) / total if total else None,
        "n_pixels": total,
    }



def subset_mious(iou: list[float | None], label_space: LabelSpace) -> dict[str, float | None]:
    """mIoU over each of the label space's evaluation subsets (e.g. SYNTHIA's miou16 / miou13), over the
    classes of the subset that have an IoU; {} for spaces without subsets."""
    return {name: _mean([iou[i] for i in indices]) for name, indices in label_space.subset_indices().items()}
