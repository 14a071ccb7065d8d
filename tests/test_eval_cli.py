"""`ssr eval` on a trained run: eval.json, chart, predictions, --compare, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cache_helpers import run_ssr
from PIL import Image
from train_helpers import build_tiny_caches, tiny_train_args


@pytest.fixture(scope="module")
def two_runs(synth_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("eval_cli")
    src, tgt = build_tiny_caches(synth_root, work)
    runs = []
    for name, extra in (("a", ["--no-ssr"]), ("b", [])):
        out = work / name
        r = run_ssr(*tiny_train_args(src, out, "--iters", "3", "--target-cache", str(tgt), *extra))
        assert r.returncode == 0, r.stderr
        runs.append(out)
    return runs


def test_eval_writes_scores_chart_and_cityscapes_predictions(two_runs, tmp_path):
    run = two_runs[0]
    preds = tmp_path / "preds"
    # --data-root and --resize default to the target cache's (recorded at build time).
    result = run_ssr("eval", "--split", "val", "--run", str(run), "--workers", "0", "--save-preds", str(preds))
    assert result.returncode == 0, result.stderr
    data = json.loads((run / "eval.json").read_text())
    assert set(data["per_class"]) >= {"road", "sidewalk", "bicycle"} and len(data["per_class"]) == 19
    assert 0 <= data["miou"] <= 100 and data["n_images"] == 3 and data["mode"] == "whole"
    assert np.load(run / "confusion.npy").shape == (19, 19)
    assert Image.open(run / "eval_iou.png").size[0] >= 800
    label_ids = sorted((preds / "labelIds").iterdir())
    assert len(label_ids) == 3 and all(p.name.endswith("_leftImg8bit.png") for p in label_ids)
    ids = np.array(Image.open(label_ids[0]))
    assert ids.dtype == np.uint8 and set(np.unique(ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25,
                                                             26, 27, 28, 31, 32, 33}
    assert "mIoU" in result.stdout


def test_compare_two_runs(two_runs):
    a, b = two_runs
    for run in (a, b):
        if not (run / "eval.json").is_file():
            assert run_ssr("eval", "--run", str(run), "--workers", "0").returncode == 0
    result = run_ssr("eval", "--compare", str(a), str(b))
    assert result.returncode == 0, result.stderr
    assert (b / f"compare_vs_{a.name}.png").is_file() and "mIoU" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--run", "/nonexistent/run"], "/nonexistent/run"),
    ([], "exactly one of --run"),
    (["--compare", "onlyone"], "two run directories"),
])
def test_eval_refusals_are_one_line(args, message):
    result = run_ssr("eval", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
