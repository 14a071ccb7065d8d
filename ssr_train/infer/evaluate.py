"""Evaluating the shadow branch on a dataset split: the Predictor plus a confusion matrix.

Per image, the Predictor rescales as in training, predicts (whole, slide, ± flip) and upsamples to the
label's resolution; the confusion matrix is counted there, as mmseg (DAFormer/MIC/SSR) does. Images stream
through a DataLoader (decoding in workers). A split without labels — or with Cityscapes' placeholder test
labels (every pixel ignored) — gives predictions only. Results keep their history: each setting writes
its own RUN/eval/<dataset>-<split>[-slide][-flip].json (``ssr_train.infer.eval_results``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssr_cache.data.datasets import SegmentationDataset, open_dataset
from ssr_cache.data.label_space import CITYSCAPES, LabelSpace
from ssr_cache.errors import SSRError
from ssr_cache.progress import progress_bar
from ssr_train.infer.metrics import Confusion
from ssr_train.infer.predictor import SLIDE_CROP, SLIDE_STRIDE, Predictor
from ssr_train.infer.run_model import load_run_model
from ssr_train.infer.writers import PredictionWriter, is_cityscapes


@dataclass(frozen=True, eq=False)
class EvalResult:
    confusion: np.ndarray  # int64 (C, C), rows ground truth, columns prediction
    scores: dict  # ssr_train.infer.metrics.scores output, percent
    n_images: int
    settings: dict = field(default_factory=dict)  # mode, resize, flip, precision (+ crop, stride)

    @property
    def miou(self) -> float | None:
        return self.scores["miou"]

    @property
    def has_labels(self) -> bool:
        return self.scores["n_pixels"] > 0


class _EvalImages(Dataset):
    """Worker-side decoding: {index, image (H, W, 3) uint8, label (H, W) or absent} or {index, error}."""

    def __init__(self, dataset: SegmentationDataset, with_labels: bool):
        self.dataset, self.with_labels = dataset, with_labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            if self.with_labels:
                image, label = self.dataset.load(index)
            else:
                image, label = self.dataset.load_image(index), None
        except SSRError as exc:  # raised in a worker, it would come back wrapped in a traceback
            return {"index": index, "error": str(exc)}
        if self.with_labels and label is None:
            return {"index": index, "error": f"{self.dataset.items[index].image} has no label to evaluate against"}
        return {"index": index, "image": image} | ({"label": label} if label is not None else {})


def _placeholder_labels(dataset: SegmentationDataset, label_space: LabelSpace) -> bool:
    """Cityscapes' test split ships label files whose every pixel is 'unlabeled': judged by the first."""
    if not dataset.items or dataset.items[0].label is None:
        return False
    return bool((dataset.load_label(0) == label_space.ignore_index).all())


def evaluate(model: nn.Module | Predictor, dataset: SegmentationDataset, *, resize: tuple[int, int] | None = (1024, 512),
             device: str | torch.device = "auto", mode: str = "whole", crop: int | tuple[int, int] = SLIDE_CROP,
             stride: int | tuple[int, int] = SLIDE_STRIDE, flip: bool = False, workers: int = 2,
             progress: bool = True, save_preds: str | os.PathLike | None = None, save_kinds: tuple[str, ...] | None = None,
             label_space: LabelSpace = CITYSCAPES, console=None) -> EvalResult:
    """Score ``model`` — a Predictor, or a segmentor (normalised batch → logits, e.g. a run's shadow branch,
    the engine's periodic validation) with ``resize``/``device``/``mode``/``crop``/``stride``/``flip`` — on
    every image of ``dataset``; ``save_preds`` writes predictions (``save_kinds``, default labelid (Cityscapes)
    or trainid, color, overlay). Without labels only predictions are made (``result.has_labels`` False).
    A segmentor's training flag is restored afterwards.
    """
    if len(dataset) == 0:
        raise SSRError(f"{dataset!r} has no images to evaluate")
    network = model.model if isinstance(model, Predictor) else model
    was_training = network.training  # the Predictor puts it in eval mode
    predictor = model if isinstance(model, Predictor) else Predictor(
        model, label_space=label_space, resize=resize, device=device, mode=mode, crop=crop, stride=stride,
        flip=flip)
    space = predictor.label_space
    with_labels = dataset.has_labels and not _placeholder_labels(dataset, space)
    if not with_labels and save_preds is None:
        raise SSRError(f"{dataset.name} {dataset.split} has no labels to evaluate against; "
                       "give --save-preds DIR to write predictions only")
    kinds = save_kinds or (("labelid" if is_cityscapes(space) else "trainid"), "color", "overlay")
    loader = DataLoader(_EvalImages(dataset, with_labels), batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=predictor.device.type == "cuda")
    confusion = Confusion(space)
    writer = PredictionWriter(save_preds, space, kinds) if save_preds is not None else None
    try:
        with progress_bar("evaluating" if with_labels else "predicting", unit="img", disable=not progress,
                          console=console) as bar:
            task = bar.add_task("", total=len(dataset), info="")
            for item in loader:
                if "error" in item:
                    raise SSRError(item["error"])
                label = item.get("label")
                pred = predictor.scores(item["image"].permute(2, 0, 1)[None]).argmax(1)[0]
                if label is not None:
                    confusion.update(pred, label.to(predictor.device, non_blocking=True))
                if writer is not None:
                    name = Path(dataset.items[int(item["index"])].image.name)
                    writer.submit(name, item["image"].numpy(), pred.to(torch.uint8).cpu().numpy(),
                                  None if label is None else label.numpy())
                miou = confusion.scores()["miou"] if label is not None else None
                bar.update(task, advance=1, info="" if miou is None else f"mIoU {miou:.2f}")
    finally:
        if writer is not None:
            writer.close()
        network.train(was_training)
    return EvalResult(confusion.matrix.copy(), confusion.scores(), len(dataset), predictor.settings())


@dataclass(frozen=True)
class EvalRequest:
    """What ``ssr eval`` evaluates: a run (or model file), a dataset split, and the inference settings."""

    run: Path
    checkpoint: str = "model"
    dataset: str = "cityscapes"
    split: str = "val"
    data_root: Path | None = None
    resize: tuple[int, int] | None = None  # None: the run's
    mode: str = "whole"
    crop: int = SLIDE_CROP
    stride: int = SLIDE_STRIDE
    flip: bool = False
    device: str = "auto"
    workers: int = 2
    save_preds: Path | None = None


def evaluate_run(request: EvalRequest, *, progress: bool = True, console=None,
                 on_ready=None) -> tuple[EvalResult, Predictor, dict]:
    """Load the run's shadow branch, open the split (data root default: the run's target cache's) and
    evaluate (``on_ready(predictor)`` first, e.g. to print where it runs). Returns the result, the
    Predictor, and the context an evaluation file records."""
    loaded = load_run_model(request.run, request.checkpoint)
    root = request.data_root or loaded.info.get("target_data_root")
    if root is None:
        raise SSRError("--data-root is required (the run's target cache does not record one)")
    kwargs = {"resize": request.resize} if request.resize else {}
    predictor = Predictor.from_run_model(loaded, device=request.device, mode=request.mode, crop=request.crop,
                                         stride=request.stride, flip=request.flip, **kwargs)
    dataset = open_dataset(request.dataset, root, split=request.split, require_labels=False)
    if on_ready is not None:
        on_ready(predictor)
    result = evaluate(predictor, dataset, workers=request.workers, progress=progress,
                      save_preds=request.save_preds, console=console)
    context = {"dataset": request.dataset, "split": request.split, "data_root": str(root),
               "checkpoint": request.checkpoint, "model_file": str(loaded.path), "model": loaded.info,
               "label_space": loaded.label_space.to_dict()}
    return result, predictor, context
