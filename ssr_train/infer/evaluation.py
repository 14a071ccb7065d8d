"""Evaluating an exported segmentor on a labelled dataset, the way mmseg (DAFormer/MIC/SSR) does.

Per image: keep-ratio rescale to ``resize`` exactly as the training views are made (mmcv ``imrescale``
sampling), predict at that size — whole image, or mmseg ``slide_inference`` windows whose overlapping
logits are averaged — then upsample the logits bilinearly to the original label resolution and compare
there. Flip TTA averages the softmax of the plain and the (un-flipped) flipped prediction, as mmseg's
``aug_test`` does. Images stream through a DataLoader (decoding in workers); only the confusion matrix
is kept.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssr_cache.atomic_file import write_atomic
from ssr_cache.build.view_plan import View, apply_view, rescale_size
from ssr_cache.data.datasets import SegmentationDataset
from ssr_cache.data.labels import CLASS_NAMES
from ssr_cache.errors import SSRError
from ssr_train.infer.metrics import Confusion
from ssr_train.infer.prediction_io import PredictionWriter, prediction_name
from ssr_train.training.cached_views import PIXEL_MEAN, PIXEL_STD
from ssr_train.training.config import TrainConfig, config_from_dict, load_config

MODES = ("whole", "slide")
EVAL_JSON, CONFUSION_NPY = "eval.json", "confusion.npy"
REGULARIZER_PREFIX = "regularizer."
_WINDOW_BATCH = 4  # slide windows per forward pass


@dataclass(frozen=True, eq=False)
class EvalResult:
    confusion: np.ndarray  # int64 (C, C), rows ground truth, columns prediction
    scores: dict  # ssr_train.infer.metrics.scores output, percent
    n_images: int
    settings: dict = field(default_factory=dict)  # mode, resize, crop, stride, flip

    @property
    def miou(self) -> float | None:
        return self.scores["miou"]


# ---------------------------------------------------------------- inference on one image


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def slide_windows(
    height: int, width: int, crop: int | tuple[int, int], stride: int | tuple[int, int]
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


def _resize_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _encode_decode(model: nn.Module, img: Tensor) -> Tensor:
    """Logits at the input's size (mmseg ``encode_decode``: head output upsampled bilinearly)."""
    return _resize_logits(model(img), tuple(img.shape[2:]))


def slide_logits(model: nn.Module, img: Tensor, crop: int | tuple[int, int], stride: int | tuple[int, int]) -> Tensor:
    """(B, C, H, W) logits averaged over the overlapping windows of ``slide_windows``."""
    height, width = img.shape[2:]
    windows = slide_windows(height, width, crop, stride)
    logits = count = None
    for start in range(0, len(windows), _WINDOW_BATCH):
        chunk = windows[start : start + _WINDOW_BATCH]
        # Every window has the same size (min(crop, side) per side), so a chunk is one batch.
        crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = _encode_decode(model, crops).split(img.shape[0])
        if logits is None:
            logits = img.new_zeros((img.shape[0], out[0].shape[1], height, width))
            count = img.new_zeros((1, 1, height, width))
        for (y1, y2, x1, x2), window_logits in zip(chunk, out, strict=True):
            logits[:, :, y1:y2, x1:x2] += window_logits
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def _logits(model: nn.Module, img: Tensor, mode: str, crop, stride) -> Tensor:
    return slide_logits(model, img, crop, stride) if mode == "slide" else _encode_decode(model, img)


def predict_scores(
    model: nn.Module,
    img: Tensor,
    *,
    out_size: tuple[int, int],
    mode: str = "whole",
    crop: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    flip: bool = False,
) -> Tensor:
    """Class scores (B, C, *out_size) of a normalised batch ``img`` (B, 3, H, W); argmax is the prediction.

    Without flip these are the logits (upsampled to ``out_size``); with flip, the mean of the softmax of
    the plain prediction and of the prediction on the mirrored image, mirrored back.
    """
    if mode not in MODES:
        raise SSRError(f"unknown inference mode {mode!r}; choose one of: {', '.join(MODES)}")
    logits = _resize_logits(_logits(model, img, mode, crop, stride), out_size)
    if not flip:
        return logits
    mirrored = _resize_logits(_logits(model, img.flip(3), mode, crop, stride), out_size)
    return (logits.softmax(1) + mirrored.softmax(1).flip(3)) / 2


def normalize_on_device(image: Tensor, device: torch.device) -> Tensor:
    """uint8 (H, W, 3) → normalised float (1, 3, H, W) on ``device`` (uint8 travels: 4x less to copy)."""
    x = image.to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
    mean = torch.as_tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- the evaluation loop


def resize_like_training(image: np.ndarray, resize: tuple[int, int] | None) -> np.ndarray:
    """Keep-ratio rescale of uint8 (H, W, 3) to fit ``resize`` (W, H), sampled as the cached views are."""
    if resize is None:
        return image
    height, width = image.shape[:2]
    (new_w, new_h), factor = rescale_size((width, height), tuple(resize))
    if (new_w, new_h) == (width, height):
        return image
    view = View(sample_index=0, scale=factor, resized_hw=(new_h, new_w), box=(0, 0, new_h, new_w), flip=False)
    return apply_view(image, None, view)[0]


class _EvalImages(Dataset):
    """Worker-side decoding: (index, resized image, label at original size[, original image])."""

    def __init__(self, dataset: SegmentationDataset, resize: tuple[int, int] | None, keep_original: bool):
        self.dataset, self.resize, self.keep_original = dataset, resize, keep_original

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            image, label = self.dataset.load(index)
        except SSRError as exc:
            # Raised in a worker, the DataLoader would re-raise it with a traceback in the message.
            return {"index": index, "error": str(exc)}
        if label is None:
            return {"index": index, "error": f"{self.dataset.items[index].image} has no label to evaluate against"}
        item = {"index": index, "image": resize_like_training(image, self.resize), "label": label}
        if self.keep_original:
            item["original"] = image
        return item


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("evaluating", total=total)
        yield lambda description: bar.update(task, advance=1, description=description)


def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    *,
    resize: tuple[int, int] | None = (1024, 512),
    mode: str = "whole",
    crop: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    flip: bool = False,
    device: str | torch.device = "cpu",
    workers: int = 2,
    progress: bool = True,
    save_preds: str | os.PathLike | None = None,
    num_classes: int = len(CLASS_NAMES),
) -> EvalResult:
    """Score ``model`` (image batch → logits, e.g. an exported SSRSegmentor) on every image of ``dataset``.

    ``resize`` is the (W, H) keep-ratio target (None: native size); ``mode`` "whole" or "slide" (windows
    ``crop`` with ``stride``, (H, W) or one int); ``flip`` adds horizontal-flip TTA; ``save_preds`` writes
    label-id, colour and overlay images (see ``prediction_io``). The model is put in eval mode on
    ``device`` and its training flag restored afterwards.
    """
    if mode not in MODES:
        raise SSRError(f"unknown inference mode {mode!r}; choose one of: {', '.join(MODES)}")
    if len(dataset) == 0:
        raise SSRError(f"{dataset!r} has no images to evaluate")
    if not dataset.has_labels:
        missing = next(item for item in dataset.items if item.label is None)
        raise SSRError(f"cannot evaluate {dataset.name} {dataset.split}: {missing.image} has no label")
    device = torch.device(device)
    images = _EvalImages(dataset, None if resize is None else _pair_wh(resize), keep_original=save_preds is not None)
    loader = DataLoader(images, batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    confusion = Confusion(num_classes=num_classes)
    was_training = model.training
    model.to(device).eval()
    writer = PredictionWriter(save_preds) if save_preds is not None else None
    try:
        with _progress_bar(progress, len(dataset)) as advance, writer or nullcontext(), torch.inference_mode():
            for item in loader:
                if "error" in item:
                    raise SSRError(item["error"])
                label = item["label"]
                img = normalize_on_device(item["image"], device)
                scores = predict_scores(model, img, out_size=tuple(label.shape), mode=mode, crop=crop,
                                        stride=stride, flip=flip)
                pred = scores.argmax(1)[0]
                confusion.update(pred, label.to(device, non_blocking=True))
                if writer is not None:
                    name = prediction_name(dataset.items[int(item["index"])].image)
                    writer.submit(name, item["original"].numpy(), pred.to(torch.uint8).cpu().numpy(), label.numpy())
                if advance is not None:
                    miou = confusion.scores()["miou"]
                    advance(f"evaluating (mIoU {miou:.2f})" if miou is not None else "evaluating")
    finally:
        model.train(was_training)
    settings = {"mode": mode, "resize": None if resize is None else list(_pair_wh(resize)), "flip": bool(flip)}
    if mode == "slide":
        settings.update(crop=list(_pair(crop)), stride=list(_pair(stride)))
    return EvalResult(confusion.matrix.copy(), confusion.scores(), len(dataset), settings)


def _pair_wh(resize) -> tuple[int, int]:
    width, height = (int(v) for v in resize)
    if width <= 0 or height <= 0:
        raise SSRError(f"resize must be two positive sizes (W, H), got {tuple(resize)}")
    return width, height


# ---------------------------------------------------------------- run folders


def _read_torch_file(path: Path) -> object:
    try:
        # weights_only: a checkpoint is data (tensors, dicts, numbers), never code to run.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SSRError(f"cannot read {path} as a model checkpoint: {first}") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _run_files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        checkpoint = path / "model.pth"
        if not checkpoint.is_file():
            raise SSRError(f"{path} holds no model.pth: not a training run folder, or training never saved")
        return checkpoint, path / "config.toml"
    if path.is_file():
        return path, path.parent / "config.toml"
    raise SSRError(f"{path} does not exist (expected a run folder or a model.pth file)")


def _summarise(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_run_model(path: str | os.PathLike) -> tuple[nn.Module, TrainConfig]:
    """The plain (exported) segmentor of a run folder or checkpoint file, in eval mode on the CPU, and
    the config it was trained with.

    Accepts ``model.pth`` as the trainer writes it ({"state_dict", "config", "iteration"}) or a bare
    exported state dict; the config comes from the checkpoint, else from ``config.toml`` beside it.
    Regulariser weights (``regularizer.*``) are dropped: the deployed model never uses them.
    """
    from ssr_train.models.backbones import create_backbone
    from ssr_train.models.segmentor import build_plain_segmentor

    checkpoint, config_path = _run_files(Path(path))
    obj = _read_torch_file(checkpoint)
    if isinstance(obj, dict) and "method" in obj:
        raise SSRError(f"{checkpoint} is a full training checkpoint; evaluate the model.pth written beside it")
    if isinstance(obj, dict) and "state_dict" in obj:
        state, config_dict = obj["state_dict"], obj.get("config")
    else:
        state, config_dict = obj, None
    if not _is_state_dict(state):
        raise SSRError(f"{checkpoint} is not an exported model (expected {{'state_dict': ...}} or a state dict)")
    if config_dict is not None:
        if not isinstance(config_dict, dict):
            raise SSRError(f"{checkpoint}: its 'config' entry is not a config table")
        cfg = config_from_dict(config_dict)
    elif config_path.is_file():
        cfg = load_config(config_path)
    else:
        raise SSRError(f"{checkpoint} carries no config and there is no {config_path} beside it")

    state = {k: v for k, v in state.items() if not k.startswith(REGULARIZER_PREFIX)}
    backbone = create_backbone(cfg.model.backbone, drop_path_rate=cfg.model.drop_path_rate)
    model = build_plain_segmentor(backbone, num_classes=cfg.model.num_classes, embed_dim=cfg.model.head_embed_dim)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [f"{label}: {_summarise(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise SSRError(f"{checkpoint} does not fit a {cfg.model.backbone} segmentor with "
                       f"{cfg.model.num_classes} classes ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def _write_atomic(path: Path, write) -> None:
    write_atomic(path, write)


def class_names(num_classes: int) -> list[str]:
    return list(CLASS_NAMES) if num_classes == len(CLASS_NAMES) else [f"class_{i}" for i in range(num_classes)]


def write_eval_json(run_dir: str | os.PathLike, result: EvalResult, extra: dict | None = None) -> Path:
    """``run_dir/eval.json`` (scores in percent, n/a as null) and ``run_dir/confusion.npy``, each atomic.

    The confusion matrix is written first, so an eval.json is never older than the matrix beside it.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SSRError(f"cannot create {run_dir}: {exc.strerror}") from None
    scores = result.scores
    names = class_names(len(scores["iou"]))
    data = {
        "miou": scores["miou"],
        "macc": scores["macc"],
        "aacc": scores["aacc"],
        "n_images": result.n_images,
        "n_pixels": scores["n_pixels"],
        **result.settings,
        "per_class": dict(zip(names, scores["iou"], strict=True)),
        "per_class_acc": dict(zip(names, scores["acc"], strict=True)),
        **(extra or {}),
    }
    _write_atomic(run_dir / CONFUSION_NPY, lambda handle: np.save(handle, result.confusion))
    text = json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"
    _write_atomic(run_dir / EVAL_JSON, lambda handle: handle.write(text.encode()))
    return run_dir / EVAL_JSON
