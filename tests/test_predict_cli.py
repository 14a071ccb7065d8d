"""`ssr predict` and `ssr export` on a trained run: any images in, mirrored outputs, skipped frames, exported
files that predict what the run predicts, and one-line refusals that leave existing outputs alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cache_helpers import run_ssr
from infer_helpers import assert_one_line_error, train_tiny_run
from PIL import Image

from ssr_train.infer.predictor import Predictor


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
    return train_tiny_run(synth_root, tmp_path_factory.mktemp("predict_cli"), "run")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder tree of own photos in four formats and two sizes, and one corrupt frame."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    files = {"a.png": (64, 96), "day/b.jpg": (64, 96), "day/night/c.webp": (48, 80), "d.bmp": (64, 96)}
    for name, (h, w) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "day" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


def test_predict_mirrors_the_input_tree_and_skips_a_bad_frame(run, photos, tmp_path):
    out = tmp_path / "out"
    result = run_ssr("predict", str(run), str(photos), "--out", str(out), "--save", "trainid,labelid,color,overlay",
                     "--workers", "1", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("device cpu · precision fp32")
    assert "4 image(s) predicted" in result.stdout and "1 skipped" in result.stdout
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(photos / "day" / "broken.png"))
    predictor = Predictor.from_run(run, device="cpu")
    for rel in ("a", "day/b", "day/night/c", "d"):
        source = next(photos.glob(rel + ".*"))
        image = np.array(Image.open(source).convert("RGB"))
        train_ids = np.array(Image.open(out / "trainIds" / f"{rel}.png"))
        assert train_ids.shape == image.shape[:2]  # the input's resolution
        assert np.array_equal(train_ids, predictor.predict(image))  # the same as the Python API
        assert np.array_equal(np.array(Image.open(out / "color" / f"{rel}.png")), train_ids)
        assert Image.open(out / "overlay" / f"{rel}.jpg").size == image.shape[1::-1]
        assert (out / "labelIds" / f"{rel}.png").is_file()


def test_predict_takes_files_and_globs(run, photos, tmp_path):
    out = tmp_path / "out"
    result = run_ssr("predict", str(run), str(photos / "a.png"), str(photos / "day" / "*.jpg"),
                     "--out", str(out), "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(out / "trainIds").as_posix() for p in (out / "trainIds").rglob("*.png")) == [
        "a.png", "b.png"]
    assert not (out / "skipped.txt").exists()


def test_predictor_api_batches_and_probabilities(run, photos):
    predictor = Predictor.from_run(run, device="auto", batch_size=3)
    images = [np.array(Image.open(photos / "a.png")), photos / "d.bmp", np.array(Image.open(photos / "a.png"))]
    batched = predictor.predict(images)
    one_by_one = [Predictor.from_run(run, device="cpu").predict(i) for i in images]
    assert all(np.array_equal(a, b) for a, b in zip(batched, one_by_one, strict=True))
    labels, probs = predictor.predict(images[0], probabilities=True)
    assert probs.shape == (19, 64, 96) and np.allclose(probs.sum(0), 1, atol=1e-4)
    assert np.array_equal(probs.argmax(0), labels)


def test_export_torchscript_predicts_what_the_run_predicts(run, photos, tmp_path):
    model = tmp_path / "model.pt"
    result = run_ssr("export", str(run), "--format", "torchscript", "--size", "96x64", "--out", str(model))
    assert result.returncode == 0, result.stderr
    extra = {"ssr.json": ""}
    torch.jit.load(str(model), _extra_files=extra)
    meta = json.loads(extra["ssr.json"])
    assert meta["input_size"] == [96, 64] and len(meta["label_space"]["class_names"]) == 19
    assert meta["mean"] == [123.675, 116.28, 103.53] and meta["output"] == "labels"
    out_run, out_model = tmp_path / "from_run", tmp_path / "from_model"
    assert run_ssr("predict", str(run), str(photos / "a.png"), "--out", str(out_run), "--workers", "0").returncode == 0
    by_model = run_ssr("predict", "--model", str(model), str(photos / "a.png"), "--out", str(out_model),
                       "--workers", "0")
    assert by_model.returncode == 0, by_model.stderr
    a = np.array(Image.open(out_run / "trainIds" / "a.png"))
    b = np.array(Image.open(out_model / "trainIds" / "a.png"))
    assert (a == b).mean() >= 0.9999

    # an exported file fixed at 96x64 refuses other sizes before writing anything
    wrong = tmp_path / "wrong"
    assert_one_line_error(run_ssr("predict", "--model", str(model), str(photos), "--out", str(wrong)),
                          "exported for 96x64", "80x48")
    assert not wrong.exists()
    assert_one_line_error(run_ssr("predict", "--model", str(model), str(photos / "a.png"), "--size", "128x64",
                                  "--out", str(wrong)), "exported for 96x64")


def test_bad_inputs_are_one_line_and_overwrite_nothing(run, photos, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_ssr("predict", str(run), str(tmp_path / "missing.png"), "--out", str(out)),
                          "missing.png", "does not exist")
    (tmp_path / "file").write_text("keep me")
    assert_one_line_error(run_ssr("predict", str(run), str(photos), "--out", str(tmp_path / "file")), "is a file")
    assert (tmp_path / "file").read_text() == "keep me"
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert_one_line_error(run_ssr("predict", str(empty), str(photos), "--out", str(out)), "holds no model.pth")
    assert_one_line_error(run_ssr("export", str(empty), "--out", str(tmp_path / "m.onnx")), "holds no model.pth")
    # corrupt and non-finite model files
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.pth").write_bytes((run / "model.pth").read_bytes()[:3000])
    assert_one_line_error(run_ssr("predict", str(broken), str(photos), "--out", str(out)), "cannot read")
    state = torch.load(run / "model.pth", weights_only=True)
    name = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][name] = state["state_dict"][name].clone().fill_(float("inf"))
    nonfinite = tmp_path / "nonfinite"
    nonfinite.mkdir()
    torch.save(state, nonfinite / "model.pth")
    assert_one_line_error(run_ssr("eval", str(nonfinite)), "non-finite")
    assert_one_line_error(run_ssr("predict", str(nonfinite), str(photos), "--out", str(out)), "non-finite")
    assert_one_line_error(run_ssr("predict", str(run), str(photos), "--out", str(out), "--checkpoint", "best"),
                          "no best.pth")
    assert_one_line_error(run_ssr("export", str(run), "--format", "torchscript", "--dynamic",
                                  "--out", str(tmp_path / "m.pt")), "ONNX only")
    assert not out.exists()
