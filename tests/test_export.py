"""Exported files predict what the run predicts: parity of the Predictor, the TorchScript file and the ONNX
file under onnxruntime (max |Δlogit| ≤ 1e-4 in fp32, argmax agreement ≥ 99.99 %), static and dynamic sizes,
embedded metadata, and one-line refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.errors import SSRError
from ssr_cache.image_norm import PIXEL_MEAN, PIXEL_STD
from ssr_train.infer.export import ExportedModel, export_model
from ssr_train.infer.predictor import Predictor
from ssr_train.infer.run_model import load_run_model
from ssr_train.models.backbones import create_backbone
from ssr_train.models.segmentor import build_shadow_segmentor
from ssr_train.training.config import TrainConfig, save_config

RESIZE = (64, 32)  # a 96x64 image is rescaled to 48x32 inside the graph, as in the Predictor
MAX_DLOGIT, MIN_AGREEMENT = 1e-4, 0.9999


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = TrainConfig().replace("model", backbone="mit_b0")
    torch.manual_seed(5)
    model = build_shadow_segmentor(create_backbone("mit_b0")).eval()
    run = tmp_path_factory.mktemp("export_run")
    save_config(cfg, run / "config.toml")
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "iteration": 3}, run / "model.pth")
    return dataclasses.replace(load_run_model(run), resize=RESIZE)


@pytest.fixture(scope="module")
def files(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    return {
        "onnx": export_model(loaded, out / "m.onnx", fmt="onnx", size=(96, 64), output="logits"),
        "torchscript": export_model(loaded, out / "m.pt", fmt="torchscript", size=(96, 64), output="logits"),
        "dynamic": export_model(loaded, out / "d.onnx", fmt="onnx", dynamic=True, output="logits"),
        "labels": export_model(loaded, out / "l.onnx", fmt="onnx", size=(96, 64)),
    }


def images(height: int, width: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, height, width), dtype=np.uint8)


def reference(loaded, batch: np.ndarray) -> np.ndarray:
    predictor = Predictor.from_run_model(loaded, device="cpu", precision="fp32")
    return predictor.scores(torch.from_numpy(batch)).numpy()


def assert_parity(ref: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= MAX_DLOGIT, np.abs(got - ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= MIN_AGREEMENT


def test_run_torchscript_and_onnx_agree_in_fp32(loaded, files):
    batch = images(64, 96)
    ref = reference(loaded, batch)
    assert ref.shape == (2, 19, 64, 96)  # full resolution
    onnx_logits = ExportedModel(files["onnx"])(batch)
    ts_logits = ExportedModel(files["torchscript"])(batch)
    assert_parity(ref, onnx_logits)
    assert_parity(ref, ts_logits)
    assert_parity(ts_logits, onnx_logits)
    labels = ExportedModel(files["labels"])(batch)
    assert labels.dtype == np.uint8 and labels.shape == (2, 64, 96)
    assert (labels == ref.argmax(1)).mean() >= MIN_AGREEMENT


def test_dynamic_onnx_takes_other_sizes(loaded, files):
    model = ExportedModel(files["dynamic"])
    assert model.input_size is None
    for height, width in ((48, 80), (70, 50)):
        batch = images(height, width, n=1, seed=height)
        assert_parity(reference(loaded, batch), model(batch))


def test_metadata_travels_inside_the_files(files):
    proto = onnx.load(str(files["onnx"]))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["ssr"])
    assert meta["input_size"] == [96, 64] and meta["resize"] == list(RESIZE) and meta["output"] == "logits"
    assert meta["mean"] == list(PIXEL_MEAN) and meta["std"] == list(PIXEL_STD)
    assert meta["label_space"] == CITYSCAPES.to_dict() and meta["model"]["backbone_init"] == "random"
    assert [i.name for i in proto.graph.input] == ["images"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ts = ExportedModel(files["torchscript"])
    assert ts.label_space == CITYSCAPES and ts.metadata["input_size"] == [96, 64]


def test_refusals_are_one_line(loaded, files, tmp_path):
    with pytest.raises(SSRError, match="exported for 96x64 images, image is 80x48"):
        ExportedModel(files["onnx"])(images(48, 80, n=1))
    with pytest.raises(SSRError, match="ONNX only"):
        export_model(loaded, tmp_path / "x.pt", fmt="torchscript", dynamic=True)
    with pytest.raises(SSRError, match="--format must be one of"):
        export_model(loaded, tmp_path / "x.tflite", fmt="tflite")
    with pytest.raises(SSRError, match="is a folder"):
        export_model(loaded, tmp_path, fmt="onnx")
    with pytest.raises(SSRError, match="does not exist"):
        ExportedModel(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(SSRError, match="cannot load"):
        ExportedModel(tmp_path / "junk.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(SSRError, match="cannot load"):
        ExportedModel(tmp_path / "junk.pt")
