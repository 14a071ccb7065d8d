"""`ssr eval` and `ssr compare` on trained runs: history files, predictions-only splits, seed groups, and
one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cache_helpers import run_ssr
from infer_helpers import assert_one_line_error, train_tiny_run
from PIL import Image


@pytest.fixture(scope="module")
def two_runs(synth_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("eval_cli")
    return [train_tiny_run(synth_root, work, "a", "--no-ssr"), train_tiny_run(synth_root, work, "b")]


def test_eval_writes_history_files_and_cityscapes_predictions(two_runs, tmp_path):
    run = two_runs[0]
    preds = tmp_path / "preds"
    # --data-root and --resize default to the target cache's (recorded at build time).
    result = run_ssr("eval", str(run), "--workers", "0", "--save-preds", str(preds), "--device", "auto")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("device cpu · precision fp32 · threads")
    data = json.loads((run / "eval" / "cityscapes-val.json").read_text())
    assert set(data["per_class"]) >= {"road", "sidewalk", "bicycle"} and len(data["per_class"]) == 19
    assert 0 <= data["miou"] <= 100 and data["n_images"] == 3 and data["mode"] == "whole"
    assert data["model"]["backbone_init"] == "random" and data["model"]["sam_random_init"] is False  # --no-ssr
    assert data["label_space"]["name"] == "cityscapes" and data["checkpoint"] == "model"
    assert np.load(run / "eval" / "cityscapes-val.npy").shape == (19, 19)
    assert Image.open(run / "eval" / "cityscapes-val.png").size[0] >= 800
    label_ids = sorted((preds / "labelIds").iterdir())
    assert len(label_ids) == 3 and all(p.name.endswith("_leftImg8bit.png") for p in label_ids)
    ids = np.array(Image.open(label_ids[0]))
    assert ids.dtype == np.uint8 and set(np.unique(ids)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25,
                                                             26, 27, 28, 31, 32, 33}
    assert "mIoU" in result.stdout

    # Another setting writes its own file; the first stays as it was.
    before = (run / "eval" / "cityscapes-val.json").read_bytes()
    flip = run_ssr("eval", "--run", str(run), "--workers", "0", "--flip")
    assert flip.returncode == 0, flip.stderr
    assert json.loads((run / "eval" / "cityscapes-val-flip.json").read_text())["flip"] is True
    assert (run / "eval" / "cityscapes-val.json").read_bytes() == before
    assert not (run / "eval.json").exists()


def test_eval_of_a_split_without_labels_writes_predictions_only(two_runs, synth_root, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(synth_root / "cityscapes" / "leftImg8bit" / "val", root / "leftImg8bit" / "test")
    preds = tmp_path / "test-preds"
    result = run_ssr("eval", str(two_runs[0]), "--split", "test", "--data-root", str(root), "--workers", "0",
                     "--save-preds", str(preds))
    assert result.returncode == 0, result.stderr
    assert "predictions only" in result.stdout.replace("\n", " ") or "no labels" in result.stdout
    assert len(list((preds / "labelIds").iterdir())) == 3 and not list((preds / "overlay").glob("*.tmp"))
    assert not (two_runs[0] / "eval" / "cityscapes-test.json").exists()
    refused = run_ssr("eval", str(two_runs[0]), "--split", "test", "--data-root", str(root), "--workers", "0")
    assert_one_line_error(refused, "no labels", "--save-preds")


def test_compare_runs_and_seed_groups(two_runs, tmp_path):
    a, b = two_runs
    for run in (a, b):
        if not (run / "eval" / "cityscapes-val.json").is_file():
            assert run_ssr("eval", str(run), "--workers", "0").returncode == 0
    result = run_ssr("compare", str(a / "eval" / "cityscapes-val.json"), str(b / "eval" / "cityscapes-val.json"),
                     "--out", str(tmp_path / "delta.png"))
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout and "Δ" in result.stdout and (tmp_path / "delta.png").stat().st_size > 10_000

    # Three seeds of b (the same model info but the seed) form one column with mean ± std.
    base = json.loads((b / "eval" / "cityscapes-val.json").read_text())
    files = []
    for seed, road in ((1, 10.0), (2, 20.0), (3, 30.0)):
        data = dict(base, model=dict(base["model"], seed=seed), per_class=dict(base["per_class"], road=road))
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(data))
    grouped = run_ssr("compare", str(a / "eval" / "cityscapes-val.json"), *map(str, files),
                      "--out", str(tmp_path / "g.png"))
    assert grouped.returncode == 0, grouped.stderr
    road = next(line for line in grouped.stdout.splitlines() if line.strip("│ ").startswith("road"))
    assert "20.00 ± 10.00" in road and "(n=3)" in grouped.stdout
    explicit = run_ssr("compare", *map(str, files), "--group", "x,x,y", "--out", str(tmp_path / "x.png"))
    assert explicit.returncode == 0 and "15.00 ± 7.07" in explicit.stdout


def test_compare_refuses_incomparable_evaluations(two_runs, tmp_path):
    a, b = two_runs
    for run in (a, b):
        if not (run / "eval" / "cityscapes-val.json").is_file():
            assert run_ssr("eval", str(run), "--workers", "0").returncode == 0
    base = json.loads((a / "eval" / "cityscapes-val.json").read_text())
    (tmp_path / "gta.json").write_text(json.dumps(dict(base, dataset="gta5", split="all")))
    per_class = dict(list(base["per_class"].items())[:16])
    (tmp_path / "sixteen.json").write_text(json.dumps(dict(base, per_class=per_class)))
    (tmp_path / "test.json").write_text(json.dumps(dict(base, split="test")))
    first = str(a / "eval" / "cityscapes-val.json")
    assert_one_line_error(run_ssr("compare", first, str(tmp_path / "gta.json")), "dataset")
    assert_one_line_error(run_ssr("compare", first, str(tmp_path / "test.json")), "split")
    assert_one_line_error(run_ssr("compare", first, str(tmp_path / "sixteen.json")), "label spaces")
    assert_one_line_error(run_ssr("compare", first), "at least two")


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/run"], "/nonexistent/run"),
    ([], "give one run"),
])
def test_eval_refusals_are_one_line(args, message):
    assert_one_line_error(run_ssr("eval", *args), message)
