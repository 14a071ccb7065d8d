"""Evaluation on a real (random-weight) MiT-B0 + DAFormer segmentor and the tiny Cityscapes fixture."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
from layout_fixtures import CITYSCAPES_IDS, HEIGHT, WIDTH, cityscapes_paths, make_cityscapes
from PIL import Image
from test_metrics import cityscapes_args

from ssr_cache.build.view_plan import View, apply_view
from ssr_cache.data.datasets import open_dataset
from ssr_cache.data.label_space import CITYSCAPES, SYNTHIA_CLASSES
from ssr_cache.data.labels import CLASS_NAMES, TRAINID_TO_ID
from ssr_cache.errors import SSRError
from ssr_train.infer.eval_results import compare, read_eval, write_eval
from ssr_train.infer.evaluate import EvalResult, evaluate
from ssr_train.infer.metrics import Confusion
from ssr_train.infer.plots import plot_class_iou, plot_iou_delta
from ssr_train.infer.predictor import predict_scores, slide_windows
from ssr_train.infer.preprocess import prepare, resize_images, training_size
from ssr_train.infer.run_model import load_run_model
from ssr_train.models.backbones import create_backbone
from ssr_train.models.segmentor import build_segmentor, build_shadow_segmentor
from ssr_train.training.config import TrainConfig, save_config

RESIZE = (64, 32)  # a 32x24 fixture image becomes 43x32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_shadow_segmentor(create_backbone("mit_b0")).eval()


@pytest.fixture(scope="module")
def street_model(model):
    """The random model restricted (by classifier bias) to road, sky, person, car: some IoUs above 0."""
    restricted = copy.deepcopy(model)
    with torch.no_grad():
        restricted.head.classifier.bias.fill_(-5.0)
        restricted.head.classifier.bias[[0, 10, 11, 13]] = 0.0
    return restricted


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    make_cityscapes(root)
    return root


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- inference


def test_slide_windows_follow_mmseg_grid():
    assert slide_windows(512, 1024, 512, 341) == [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]
    assert slide_windows(32, 64, 48, 32) == [(0, 32, 0, 48), (0, 32, 16, 64)]  # short side: one window
    assert slide_windows(20, 30, 512, 341) == [(0, 20, 0, 30)]  # image smaller than the crop
    assert slide_windows(64, 64, (32, 64), (32, 32)) == [(0, 32, 0, 64), (32, 64, 0, 64)]
    with pytest.raises(SSRError, match="positive"):
        slide_windows(64, 64, 32, 0)


@torch.inference_mode()
def test_slide_equals_whole_on_images_no_larger_than_the_crop(model):
    img = random_image(32, 64)
    whole = predict_scores(model, img, out_size=(48, 96), mode="whole")
    assert whole.shape == (1, 19, 48, 96)
    for crop in (64, 512, (32, 64)):
        slide = predict_scores(model, img, out_size=(48, 96), mode="slide", crop=crop, stride=21)
        assert torch.equal(slide, whole)


@torch.inference_mode()
def test_slide_averages_overlapping_window_logits(model):
    img = random_image(32, 64, seed=1)
    slide = predict_scores(model, img, out_size=(32, 64), mode="slide", crop=32, stride=16)
    # By hand: windows start at x = 0, 16, 32; columns 16..47 are covered twice.
    total = torch.zeros(1, 19, 32, 64)
    count = torch.zeros(64)
    for x in (0, 16, 32):
        window = img[:, :, :, x : x + 32]
        total[..., x : x + 32] += F.interpolate(model(window), size=(32, 32), mode="bilinear", align_corners=False)
        count[x : x + 32] += 1
    assert count.tolist() == [1] * 16 + [2] * 32 + [1] * 16
    assert torch.allclose(slide, total / count, atol=1e-5)
    whole = predict_scores(model, img, out_size=(32, 64), mode="whole")
    assert not torch.allclose(slide, whole, atol=1e-3)  # a different computation, not a no-op


@torch.inference_mode()
def test_flip_tta_on_a_mirror_symmetric_image_is_symmetric(model):
    half = random_image(32, 32, seed=2)
    img = torch.cat([half, half.flip(3)], dim=3)  # (1, 3, 32, 64), equal to its mirror image
    for mode in ("whole", "slide"):
        probs = predict_scores(model, img, out_size=(48, 96), mode=mode, crop=32, stride=16, flip=True)
        assert probs.shape == (1, 19, 48, 96)
        assert torch.allclose(probs.sum(1), torch.ones(1, 48, 96), atol=1e-5)  # averaged softmax
        # (p(x) + mirror(p(mirror x))) / 2 with mirror x == x is symmetric whatever the model does.
        assert torch.allclose(probs, probs.flip(3), atol=1e-6)
    plain = predict_scores(model, img, out_size=(48, 96), mode="whole").softmax(1)
    assert not torch.allclose(plain, plain.flip(3), atol=1e-4)  # the model itself is not symmetric


def test_resize_like_training_keeps_ratio_and_samples_as_the_cache_views():
    assert training_size(HEIGHT, WIDTH, RESIZE) == (32, 43)  # factor min(64/32, 32/24) = 4/3
    assert training_size(HEIGHT, WIDTH, (1024, 512)) == (512, 683)
    image = torch.randint(0, 256, (1, 3, 96, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(resize_images(image, None), image.float())
    assert torch.equal(resize_images(image, (160, 96)), image.float())
    ours = resize_images(image, (128, 64))  # 160x96 -> 107x64
    assert ours.shape == (1, 3, 64, 107)
    # The cache's views: the same bilinear half-pixel sampling, by cv2 in fixed point on uint8 (within one
    # grey level of the exact bilinear that the Predictor computes in float).
    view = View(sample_index=0, scale=64 / 96, resized_hw=(64, 107), box=(0, 0, 64, 107), flip=False)
    theirs = torch.from_numpy(apply_view(image[0].permute(1, 2, 0).numpy(), None, view)[0]).permute(2, 0, 1)
    difference = (ours[0] - theirs.float()).abs()
    assert difference.max() <= 1.0 + 1e-3 and difference.mean() < 0.3


# --------------------------------------------------------------------------- evaluate()


def by_hand(model, dataset) -> np.ndarray:
    conf = Confusion()
    with torch.inference_mode():
        for i in range(len(dataset)):
            image, label = dataset.load(i)
            img = prepare(torch.from_numpy(image).permute(2, 0, 1)[None], RESIZE)
            conf.update(predict_scores(model, img, out_size=label.shape).argmax(1)[0], label)
    return conf.matrix


def test_evaluate_scores_every_image_at_label_resolution_and_saves_predictions(street_model, cityscapes, tmp_path):
    dataset = open_dataset("cityscapes", cityscapes, split="val")
    preds = tmp_path / "preds"
    street_model.train()
    result = evaluate(street_model, dataset, resize=RESIZE, workers=0, progress=False, save_preds=preds)
    assert street_model.training  # restored
    street_model.eval()
    assert result.n_images == 4
    assert result.confusion.sum() == 4 * (WIDTH * HEIGHT - 1)  # one unlabeled pixel per image
    assert np.array_equal(result.confusion, by_hand(street_model, dataset))
    assert result.settings == {"mode": "whole", "resize": [64, 32], "flip": False, "precision": "fp32"}
    assert result.scores["iou"][0] > 10 and result.scores["iou"][13] > 10  # road, car

    valid_ids = set(TRAINID_TO_ID[:19].tolist())
    for sample_id in CITYSCAPES_IDS:
        name = f"{sample_id}_leftImg8bit"
        with Image.open(preds / "labelIds" / f"{name}.png") as label_ids:
            assert label_ids.mode == "L" and label_ids.size == (WIDTH, HEIGHT)
            ids = np.array(label_ids)
        assert set(np.unique(ids).tolist()) <= valid_ids
        with Image.open(preds / "color" / f"{name}.png") as color:
            # index = train id, palette = the label space's colours (car: train id 13)
            assert color.mode == "P" and color.getpalette()[3 * 13 : 3 * 14] == [0, 0, 142]
            assert np.array_equal(TRAINID_TO_ID[np.array(color)], ids)
        with Image.open(preds / "overlay" / f"{name}.jpg") as overlay:
            assert overlay.format == "JPEG" and overlay.size == (3 * WIDTH, HEIGHT)  # blend | pred | truth
    assert not list(preds.rglob("*.tmp"))

    # cityscapesscripts finds each saved file from its ground truth and scores it as we do.
    args = cityscapes_args(preds / "labelIds", tmp_path / "cs.json")
    gt_files = [str(cityscapes_paths(cityscapes, "val", s)[1]) for s in CITYSCAPES_IDS]
    pred_files = [cs_eval.getPrediction(args, gt) for gt in gt_files]
    theirs = cs_eval.evaluateImgLists(pred_files, gt_files, args)
    for train_id, name in enumerate(CLASS_NAMES):
        ours, score = result.scores["iou"][train_id], theirs["classScores"][name]
        assert (ours is None) if math.isnan(score) else ours == pytest.approx(100 * score, abs=1e-6)


def test_slide_flip_with_workers_matches_in_process_run(model, cityscapes):
    dataset = open_dataset("cityscapes", cityscapes, split="val")
    kwargs = dict(resize=RESIZE, mode="slide", crop=32, stride=21, flip=True)
    background = evaluate(model, dataset, workers=2, progress=True, **kwargs)
    in_process = evaluate(model, dataset, workers=0, progress=False, **kwargs)
    assert np.array_equal(background.confusion, in_process.confusion)
    assert background.settings == {"mode": "slide", "resize": [64, 32], "flip": True, "precision": "fp32",
                                   "crop": [32, 32], "stride": [21, 21]}


def test_evaluate_refuses_unlabelled_data_and_unknown_modes(model, tmp_path):
    make_cityscapes(tmp_path, labels=False)
    unlabelled = open_dataset("cityscapes", tmp_path, split="val", require_labels=False)
    with pytest.raises(SSRError, match="has no labels to evaluate against; give --save-preds"):
        evaluate(model, unlabelled, workers=0, progress=False)
    make_cityscapes(tmp_path)
    with pytest.raises(SSRError, match="unknown inference mode 'tiles'"):
        evaluate(model, open_dataset("cityscapes", tmp_path, split="val"), mode="tiles", workers=0)


# --------------------------------------------------------------------------- eval.json and plots


def crafted_result() -> EvalResult:
    conf = Confusion()
    conf.update(np.array([[0, 1, 1, 13]]), np.array([[0, 0, 1, 255]]))
    return EvalResult(conf.matrix.copy(), conf.scores(), n_images=1, settings={"mode": "whole", "flip": False})


def context(label_space=CITYSCAPES, **model) -> dict:
    return {"dataset": "cityscapes", "split": "val", "label_space": label_space.to_dict(), "model": model}


def test_write_eval_keys_values_confusion_and_history(tmp_path):
    path = write_eval(tmp_path / "run" / "eval", crafted_result(), context(iteration=40000))
    data = json.loads(path.read_text())
    assert path.name == "cityscapes-val.json"
    assert data["miou"] == pytest.approx(50.0)  # road 1/2, sidewalk 1/2; car predicted on ignore: n/a
    assert data["per_class"]["road"] == pytest.approx(50.0) and data["per_class"]["car"] is None
    assert list(data["per_class"]) == list(CLASS_NAMES)
    assert data["macc"] == pytest.approx(75.0) and data["aacc"] == pytest.approx(200 / 3)
    assert (data["n_images"], data["n_pixels"], data["mode"], data["model"]["iteration"]) == (1, 3, "whole", 40000)
    assert "miou16" not in data  # not a SYNTHIA-trained model
    assert np.array_equal(np.load(tmp_path / "run" / "eval" / "cityscapes-val.npy"), crafted_result().confusion)
    # another setting is another file: nothing is overwritten
    slide = EvalResult(crafted_result().confusion, crafted_result().scores, 1, {"mode": "slide", "flip": True})
    write_eval(tmp_path / "run" / "eval", slide, context())
    assert sorted(p.name for p in (tmp_path / "run" / "eval").iterdir()) == [
        "cityscapes-val-slide-flip.json", "cityscapes-val-slide-flip.npy", "cityscapes-val-slide-flip.png",
        "cityscapes-val.json", "cityscapes-val.npy", "cityscapes-val.png"]


def test_synthia_trained_models_report_miou16_and_miou13(tmp_path):
    conf = Confusion()
    # road right; sidewalk half right; wall (not in the 13) wrong; terrain (not in the 16) right
    conf.update(np.array([[0, 1, 0, 0, 9]]), np.array([[0, 1, 1, 3, 9]]))
    result = EvalResult(conf.matrix.copy(), conf.scores(), n_images=1, settings={"mode": "whole", "flip": False})
    data = json.loads(write_eval(tmp_path, result, context(SYNTHIA_CLASSES)).read_text())
    # IoU: road 1/3, sidewalk 1/2, wall 0, terrain 1; the other classes are absent everywhere: n/a
    assert data["miou"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 0 + 1) / 4)
    assert data["miou16"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 0) / 3)
    assert data["miou13"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)


def test_class_iou_chart_and_comparison(tmp_path):
    a = read_eval(write_eval(tmp_path / "a" / "eval", crafted_result(), context(seed=0)))
    chart = plot_class_iou(a["per_class"], tmp_path / "iou.png", miou=a["miou"], size=(900, 400))
    with Image.open(chart) as png:
        assert png.format == "PNG" and png.size == (900, 400)
    b = dict(a, miou=60.0, per_class=dict(a["per_class"], road=70.0), model={"seed": 0, "method": "daformer"})
    (tmp_path / "b.json").write_text(json.dumps(b))
    columns = compare([tmp_path / "a", tmp_path / "b.json"])
    assert len(columns) == 2 and columns[1].per_class["road"] == 70.0 and columns[0].per_class["road"] == 50.0
    delta = plot_iou_delta(columns, tmp_path / "delta.png")
    with Image.open(delta) as png:
        assert png.size == (1200, 500)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(SSRError, match="not an evaluation result"):
        read_eval(tmp_path / "junk.json")
    with pytest.raises(SSRError, match="does not exist"):
        compare([tmp_path / "a", tmp_path / "nowhere.json"])


# --------------------------------------------------------------------------- load_run_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder as the trainer leaves it, from an SSR model (regulariser weights included)."""
    cfg = TrainConfig().replace("model", backbone="mit_b0", num_classes=19)  # the trainer records it resolved
    torch.manual_seed(3)
    ssr_model = build_segmentor(create_backbone("mit_b0"), ssr_stages=(0, 1, 2, 3)).eval()
    run = tmp_path_factory.mktemp("run")
    save_config(cfg, run / "config.toml")
    torch.save({"state_dict": ssr_model.state_dict(), "config": cfg.to_dict(), "iteration": 7}, run / "model.pth")
    return run, cfg, ssr_model


def test_load_run_model_builds_the_shadow_model(trained, tmp_path):
    run, cfg, ssr_model = trained
    loaded = load_run_model(run)
    model, loaded_cfg = loaded.model, loaded.config
    assert loaded_cfg == cfg and model.regularizer is None and not model.training
    assert loaded.label_space == CITYSCAPES and loaded.info["iteration"] == 7
    assert loaded.info["backbone_init"] == "random" and loaded.info["sam_random_init"] is True
    exported = ssr_model.shadow_state_dict()
    assert set(model.state_dict()) == set(exported)
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    img = random_image(32, 32, seed=4)
    with torch.inference_mode():
        assert torch.equal(model(img), ssr_model(img))

    # A bare exported state dict takes its config from config.toml beside it.
    (tmp_path / "config.toml").write_bytes((run / "config.toml").read_bytes())
    torch.save(exported, tmp_path / "bare.pth")
    bare_loaded = load_run_model(tmp_path / "bare.pth")
    bare, bare_cfg = bare_loaded.model, bare_loaded.config
    assert bare_cfg == cfg
    assert all(torch.equal(v, exported[k]) for k, v in bare.state_dict().items())


def test_load_run_model_refuses_garbage_clearly(trained, tmp_path):
    run, cfg, ssr_model = trained
    with pytest.raises(SSRError, match="holds no model.pth"):
        load_run_model(tmp_path)
    with pytest.raises(SSRError, match="does not exist"):
        load_run_model(tmp_path / "missing")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(SSRError, match="cannot read model file .*text.pth"):
        load_run_model(tmp_path / "text.pth")
    torch.save({"method": {}, "optimizer": {}}, tmp_path / "latest.pth")
    with pytest.raises(SSRError, match="not a model file"):
        load_run_model(tmp_path / "latest.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(SSRError, match="not a model file"):
        load_run_model(tmp_path / "odd.pth")
    torch.save(ssr_model.shadow_state_dict(), tmp_path / "lonely.pth")
    with pytest.raises(SSRError, match="carries no config"):
        load_run_model(tmp_path / "lonely.pth")
    other = tmp_path / "other"
    other.mkdir()
    b1 = cfg.replace("model", backbone="mit_b1")
    torch.save({"state_dict": ssr_model.shadow_state_dict(), "config": b1.to_dict()}, other / "model.pth")
    with pytest.raises(SSRError, match="does not fit a mit_b1 segmentor .*wrong shape"):
        load_run_model(other)
    nan = ssr_model.shadow_state_dict()
    nan["head.classifier.bias"][3] = float("nan")
    torch.save({"state_dict": nan, "config": cfg.to_dict()}, tmp_path / "nan.pth")
    with pytest.raises(SSRError, match="non-finite values .* head.classifier.bias"):
        load_run_model(tmp_path / "nan.pth")
    (tmp_path / "cut.pth").write_bytes((run / "model.pth").read_bytes()[:5000])
    with pytest.raises(SSRError, match="cannot read model file .*cut.pth"):
        load_run_model(tmp_path / "cut.pth")
