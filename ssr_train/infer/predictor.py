"""``Predictor``: the one inference path — from a run (or a model file) and images to label maps.

In the manner of segment-anything's ``SamPredictor``: construct it from a run, call ``predict`` with
uint8 HWC RGB arrays or image paths, get full-resolution label maps (and, if asked, class probabilities)
as numpy. Preprocessing (keep-ratio resize as in training, normalisation) runs in torch on the device.

Modes, as mmseg (DAFormer/MIC/SSR) evaluates: "whole" — the rescaled image in one forward pass; "slide" —
``crop`` windows every ``stride`` pixels whose logits are averaged where they overlap. ``flip`` averages
the softmax of the unmirrored and the mirrored (then un-mirrored) prediction, as mmseg's ``aug_test`` does.
The head predicts at 1/4 resolution; logits are upsampled bilinearly to the input image's size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssr_cache.data.label_space import LabelSpace
from ssr_cache.errors import SSRError
from ssr_cache.runtime import resolve_device
from ssr_train.infer.image_files import read_image
from ssr_train.infer.preprocess import check_resize, prepare
from ssr_train.infer.run_model import RunModel, load_run_model

MODES = ("whole", "slide")
SLIDE_CROP, SLIDE_STRIDE = 512, 341  # DAFormer's slide test (test_cfg: crop 512, stride 341)
PRECISIONS = ("auto", "fp32", "bf16")
_WINDOW_BATCH = 4  # slide windows per forward pass


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def slide_windows(height: int, width: int, crop: int | tuple[int, int], stride: int | tuple[int, int]
                  ) -> list[tuple[int, int, int, int]]:
    """mmseg ``slide_inference`` windows (y1, y2, x1, x2): a grid of ``stride`` steps, the last window of
    each row/column shifted back to end at the border; a side shorter than the crop gets one window of
    that side's length. ``crop`` and ``stride`` are (H, W) or one int."""
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop), _pair(stride)
    if min(crop_h, crop_w, stride_h, stride_w) <= 0:
        raise SSRError(f"slide crop and stride must be positive, got crop {crop} and stride {stride}")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) to ``size`` (H, W), as mmseg ``resize`` does; a no-op at that size."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def slide_logits(model: nn.Module, img: Tensor, crop: int | tuple[int, int], stride: int | tuple[int, int]) -> Tensor:
    """(B, C, H, W) logits averaged over the overlapping windows of ``slide_windows``."""
    height, width = img.shape[2:]
    windows = slide_windows(height, width, crop, stride)
    logits = count = None
    for start in range(0, len(windows), _WINDOW_BATCH):
        chunk = windows[start: start + _WINDOW_BATCH]
        # Every window has the same size (min(crop, side) per side), so a chunk is one batch.
        crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = upsample(model(crops).float(), tuple(crops.shape[2:])).split(img.shape[0])
        if logits is None:
            logits = img.new_zeros((img.shape[0], out[0].shape[1], height, width), dtype=torch.float32)
            count = img.new_zeros((1, 1, height, width), dtype=torch.float32)
        for (y1, y2, x1, x2), window_logits in zip(chunk, out, strict=True):
            logits[:, :, y1:y2, x1:x2] += window_logits
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def _logits(model: nn.Module, img: Tensor, mode: str, crop, stride) -> Tensor:
    if mode == "slide":
        return slide_logits(model, img, crop, stride)
    return upsample(model(img).float(), tuple(img.shape[2:]))


def predict_scores(model: nn.Module, img: Tensor, *, out_size: tuple[int, int], mode: str = "whole",
                   crop: int | tuple[int, int] = SLIDE_CROP, stride: int | tuple[int, int] = SLIDE_STRIDE,
                   flip: bool = False) -> Tensor:
    """Class scores (B, C, *out_size) of a normalised batch ``img`` (B, 3, H, W); argmax is the prediction.

    Without flip these are the logits (upsampled to ``out_size``); with flip, the mean of the softmax of
    the unmirrored prediction and of the prediction on the mirrored image, mirrored back.
    """
    if mode not in MODES:
        raise SSRError(f"unknown inference mode {mode!r}; choose one of: {', '.join(MODES)}")
    logits = upsample(_logits(model, img, mode, crop, stride), out_size)
    if not flip:
        return logits
    mirrored = upsample(_logits(model, img.flip(3), mode, crop, stride), out_size)
    return (logits.softmax(1) + mirrored.softmax(1).flip(3)) / 2


def _as_uint8_hwc(image, index: int) -> Tensor:
    if isinstance(image, (str, os.PathLike)):
        return torch.from_numpy(read_image(image))
    array = image if isinstance(image, Tensor) else torch.as_tensor(np.asarray(image))
    if array.dtype != torch.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise SSRError(f"image {index}: expected uint8 (H, W, 3) RGB, got {array.dtype} {tuple(array.shape)}")
    return array


class Predictor:
    """Label maps of images from a segmentor (the shadow branch of a run).

    ``model`` maps a normalised (B, 3, h, w) batch to logits (B, C, h/4, w/4); ``resize`` is the (W, H)
    keep-ratio training size (None: images as they are); ``precision`` "auto" means bf16 autocast on CUDA
    and fp32 on the CPU; ``batch_size`` images of the same size share one forward pass.
    """

    def __init__(self, model: nn.Module, *, label_space: LabelSpace, resize: tuple[int, int] | None = (1024, 512),
                 device: str | torch.device = "auto", mode: str = "whole",
                 crop: int | tuple[int, int] = SLIDE_CROP, stride: int | tuple[int, int] = SLIDE_STRIDE,
                 flip: bool = False, batch_size: int = 1,
                 precision: str = "auto", info: dict | None = None) -> None:
        if mode not in MODES:
            raise SSRError(f"unknown inference mode {mode!r}; choose one of: {', '.join(MODES)}")
        if precision not in PRECISIONS:
            raise SSRError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if batch_size < 1:
            raise SSRError(f"batch size must be >= 1, got {batch_size}")
        if mode == "slide":
            slide_windows(1, 1, crop, stride)  # validates crop and stride
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device).eval()
        self.label_space = label_space
        self.resize = None if resize is None else check_resize(resize)
        self.mode, self.crop, self.stride, self.flip = mode, crop, stride, bool(flip)
        self.batch_size = int(batch_size)
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        self.info = dict(info or {})

    @classmethod
    def from_run(cls, run: str | os.PathLike, checkpoint: str = "model", **kwargs) -> Predictor:
        """From a run folder (``checkpoint``: "model", "best" or "latest") or a model file (.pth)."""
        return cls.from_run_model(load_run_model(run, checkpoint), **kwargs)

    @classmethod
    def from_run_model(cls, loaded: RunModel, **kwargs) -> Predictor:
        kwargs.setdefault("resize", loaded.resize)
        return cls(loaded.model, label_space=loaded.label_space, info=loaded.info, **kwargs)

    def settings(self) -> dict:
        """What the predictions depend on (recorded in evaluation results)."""
        out = {"mode": self.mode, "resize": None if self.resize is None else list(self.resize),
               "flip": self.flip, "precision": self.precision}
        if self.mode == "slide":
            out.update(crop=list(_pair(self.crop)), stride=list(_pair(self.stride)))
        return out

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def scores(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) RGB on any device → float32 class scores (B, C, H, W) on ``self.device``
        (logits; with flip, averaged probabilities)."""
        x = images.to(self.device, non_blocking=True)
        with self._autocast():
            img = prepare(x, self.resize)
            return predict_scores(self.model, img, out_size=tuple(x.shape[2:]), mode=self.mode, crop=self.crop,
                                  stride=self.stride, flip=self.flip).float()

    def labels(self, images: Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) RGB → uint8 (B, H, W) class indices (numpy)."""
        return self.scores(images).argmax(1).to(torch.uint8).cpu().numpy()

    def _batches(self, tensors: list[Tensor]):
        """Consecutive same-sized images, at most ``batch_size`` each: (first index, (B, 3, H, W) uint8)."""
        start = 0
        while start < len(tensors):
            stop = start + 1
            while (stop < len(tensors) and stop - start < self.batch_size
                   and tensors[stop].shape == tensors[start].shape):
                stop += 1
            yield start, torch.stack(tensors[start:stop]).permute(0, 3, 1, 2)
            start = stop

    def predict(self, images, *, probabilities: bool = False):
        """Label maps of ``images`` at their own resolution.

        ``images``: one image or a sequence; an image is a uint8 (H, W, 3) RGB array (numpy or torch) or a
        path to an image file. Returns, per image, uint8 (H, W) class indices (train ids of the label
        space) — or, with ``probabilities``, a pair (labels, float32 (C, H, W) class probabilities).
        One image in gives one result; a sequence gives a list.
        """
        single = isinstance(images, (str, os.PathLike, np.ndarray, Tensor))
        batch = [images] if single else list(images)
        tensors = [_as_uint8_hwc(image, i) for i, image in enumerate(batch)]
        results: list = [None] * len(tensors)
        for start, stacked in self._batches(tensors):
            scores = self.scores(stacked)
            labels = scores.argmax(1).to(torch.uint8).cpu().numpy()
            probs = None
            if probabilities:
                probs = (scores if self.flip else scores.softmax(1)).cpu().numpy()
            for j in range(stacked.shape[0]):
                results[start + j] = labels[j] if probs is None else (labels[j], probs[j])
        return results[0] if single else results
