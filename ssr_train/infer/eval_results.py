"""Evaluation files that keep their history, and comparing them.

Every evaluation of a run writes its own files, named by what was evaluated and how::

    RUN/eval/<dataset>-<split>[-slide][-flip].json      scores (percent, n/a as null), settings, model info
    RUN/eval/<dataset>-<split>[-slide][-flip].npy       the confusion matrix (int64, rows = ground truth)
    RUN/eval/<dataset>-<split>[-slide][-flip].png       per-class IoU chart

so a slide, flip or other-split evaluation never overwrites another. ``compare`` reads two or more of them,
refuses evaluations of different datasets, splits or label spaces, and (for runs that differ only in seed,
or an explicit grouping) gives mean ± std per class.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssr_cache.atomic_file import write_atomic, write_text_atomic
from ssr_cache.data.label_space import LabelSpace
from ssr_cache.errors import SSRError
from ssr_train.infer.evaluate import EvalResult
from ssr_train.infer.metrics import subset_mious
from ssr_train.infer.plots import plot_class_iou

EVAL_DIR = "eval"
LEGACY_EVAL_JSON = "eval.json"  # before evaluations kept their history: RUN/eval.json
MIOU_ROW = "mIoU"


def eval_name(dataset: str, split: str, settings: dict) -> str:
    """``cityscapes-val``, ``cityscapes-val-slide-flip`` …"""
    parts = [dataset, split]
    if settings.get("mode") == "slide":
        parts.append("slide")
    if settings.get("flip"):
        parts.append("flip")
    return "-".join(parts)


def eval_folder(run_or_file: str | os.PathLike) -> Path:
    """RUN/eval for a run folder; beside a model file, ``eval`` next to it."""
    path = Path(run_or_file)
    return (path if path.is_dir() else path.parent) / EVAL_DIR


def eval_record(result: EvalResult, context: dict) -> dict:
    """The JSON content: scores, the label space's subset mIoUs (miou16 / miou13 for a model trained on
    SYNTHIA), settings, what was evaluated (dataset, split, label space) and the model's info."""
    space = LabelSpace.from_dict(context["label_space"])
    scores = result.scores
    names = list(space.class_names)
    record = {"miou": scores["miou"], "macc": scores["macc"], "aacc": scores["aacc"],
              **subset_mious(scores["iou"], space)}
    record.update({"n_images": result.n_images, "n_pixels": scores["n_pixels"], **result.settings,
                   "per_class": dict(zip(names, scores["iou"], strict=True)),
                   "per_class_acc": dict(zip(names, scores["acc"], strict=True)), **context})
    return record


def write_eval(out_dir: str | os.PathLike, result: EvalResult, context: dict) -> Path:
    """The three files of one evaluation under ``out_dir``; the matrix first, so a JSON is never older
    than the matrix beside it. Returns the JSON's path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SSRError(f"{out_dir} is a file; cannot write evaluations there")
    name = eval_name(context["dataset"], context["split"], result.settings)
    record = eval_record(result, context)
    write_atomic(out_dir / f"{name}.npy", lambda handle: np.save(handle, result.confusion))
    text = json.dumps(record, indent=2, allow_nan=False, default=str) + "\n"
    path = write_text_atomic(out_dir / f"{name}.json", text)
    plot_class_iou(record["per_class"], out_dir / f"{name}.png", palette=LabelSpace.from_dict(record["label_space"]).palette,
                   title=f"{out_dir.parent.name}: {context['dataset']} {context['split']}", miou=record["miou"])
    return path


def read_eval(path: str | os.PathLike) -> dict:
    """An evaluation JSON, given itself or a run folder holding exactly one (else one line naming them)."""
    path = Path(path)
    if path.is_dir():
        found = sorted((path / EVAL_DIR).glob("*.json")) if (path / EVAL_DIR).is_dir() else []
        if not found and (path / LEGACY_EVAL_JSON).is_file():
            found = [path / LEGACY_EVAL_JSON]
        if not found:
            raise SSRError(f"{path} holds no evaluation (run `ssr eval {path}` first)")
        if len(found) > 1:
            raise SSRError(f"{path} holds {len(found)} evaluations ({', '.join(p.name for p in found)}); "
                           f"give one file, e.g. {found[0]}")
        path = found[0]
    if not path.is_file():
        raise SSRError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SSRError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("per_class"), dict) or "miou" not in data:
        raise SSRError(f"{path} is not an evaluation result (needs 'miou' and 'per_class')")
    data["_path"] = str(path)
    return data


@dataclass(frozen=True)
class Column:
    """One compared input (a single evaluation or a seed group): per-class IoU, mean and spread."""

    label: str
    per_class: dict  # name → mean IoU (None: n/a)
    std: dict  # name → std over the group (None: a single evaluation or n/a)
    miou: float | None
    miou_std: float | None
    members: int


def _identity(data: dict) -> tuple:
    return (data.get("dataset"), data.get("split"), tuple(data["per_class"]))


def _describe(data: dict) -> str:
    return f"{data.get('dataset')} {data.get('split')} ({len(data['per_class'])} classes)"


def check_comparable(evals: list[dict]) -> None:
    """Same dataset, split and classes, or one line naming the first that differs."""
    first = evals[0]
    for other in evals[1:]:
        for key in ("dataset", "split"):
            if first.get(key) != other.get(key):
                raise SSRError(f"cannot compare {first['_path']} ({key} {first.get(key)}) with {other['_path']} "
                               f"({key} {other.get(key)}): evaluate both on the same {key}")
        if list(first["per_class"]) != list(other["per_class"]):
            raise SSRError(f"cannot compare {first['_path']} with {other['_path']}: different label spaces "
                           f"({_describe(first)} vs {_describe(other)})")


def _seedless_key(data: dict) -> str:
    """Runs that differ only in seed share this key: their model info and settings without the seed."""
    model = {k: v for k, v in (data.get("model") or {}).items() if k not in ("seed", "iteration", "target_data_root")}
    settings = {k: data.get(k) for k in ("mode", "resize", "flip", "crop", "stride")}
    return json.dumps({"model": model, "settings": settings}, sort_keys=True, default=str)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else None)


def _label(data: dict) -> str:
    path = Path(data["_path"])
    return path.parent.parent.name if path.parent.name == EVAL_DIR else path.parent.name


def group_columns(evals: list[dict], groups: list[str] | None = None) -> list[Column]:
    """One column per group: ``groups[i]`` names input i's group; None groups runs that differ only in seed."""
    if groups is not None and len(groups) != len(evals):
        raise SSRError(f"--group needs one name per input ({len(evals)}), got {len(groups)}")
    keys = groups or [_seedless_key(d) for d in evals]
    order: dict[str, list[dict]] = {}
    for key, data in zip(keys, evals, strict=True):
        order.setdefault(key, []).append(data)
    columns = []
    for key, members in order.items():
        names = list(members[0]["per_class"])
        stats = {n: _mean_std([m["per_class"][n] for m in members]) for n in names}
        miou, miou_std = _mean_std([m["miou"] for m in members])
        label = key if groups else (_label(members[0]) + (f" (+{len(members) - 1} seeds)" if len(members) > 1 else ""))
        columns.append(Column(label, {n: s[0] for n, s in stats.items()}, {n: s[1] for n, s in stats.items()},
                              miou, miou_std, len(members)))
    return columns


def compare(inputs: list[str | os.PathLike], groups: list[str] | None = None) -> list[Column]:
    """Read ≥ 2 evaluations (files or runs), check they are comparable, and group them into columns."""
    if len(inputs) < 2:
        raise SSRError("ssr compare needs at least two evaluations (runs or eval JSON files)")
    evals = [read_eval(p) for p in inputs]
    check_comparable(evals)
    return group_columns(evals, groups)
