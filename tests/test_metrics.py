from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

from ssr_cache.data.labels import CLASS_NAMES, ID_TO_TRAINID, LABELS, TRAINID_TO_ID, ids_to_train_ids
from ssr_cache.data.png_io import read_label_ids, write_png_atomic
from ssr_train.infer.metrics import Confusion, confusion_matrix, scores

# Two crafted images (train ids; 255 = ignore). Image 1 predicts pole (5) only on an ignored pixel, so
# pole is n/a; image 2 predicts person (11), which is nowhere in the ground truth, so person scores 0.
GT_1 = np.array([[0, 0, 1, 255], [2, 2, 13, 13]], np.uint8)
PRED_1 = np.array([[0, 1, 1, 5], [2, 0, 13, 2]], np.uint8)
GT_2 = np.array([[1, 1, 255, 0, 0]], np.uint8)
PRED_2 = np.array([[1, 2, 2, 0, 11]], np.uint8)


def crafted_confusion() -> np.ndarray:
    conf = Confusion()
    conf.update(PRED_1, GT_1)
    conf.update(PRED_2, GT_2)
    return conf.matrix


def test_confusion_matrix_counts_by_hand():
    conf = crafted_confusion()
    assert conf.dtype == np.int64 and conf.shape == (19, 19)
    expected = {(0, 0): 2, (0, 1): 1, (0, 11): 1, (1, 1): 2, (1, 2): 1, (2, 2): 1, (2, 0): 1, (13, 13): 1, (13, 2): 1}
    for (g, p), count in expected.items():
        assert conf[g, p] == count
    assert conf.sum() == 11  # 13 pixels, 2 ignored
    assert conf[:, 5].sum() == 0  # the pole prediction sat on an ignored pixel


def test_scores_by_hand_with_na_class_and_ignored_pixels():
    s = scores(crafted_confusion())
    iou = s["iou"]
    assert iou[0] == pytest.approx(40.0)  # road: TP 2, GT 4, pred 3 -> 2 / 5
    assert iou[1] == pytest.approx(50.0)  # sidewalk: 2 / (3 + 3 - 2)
    assert iou[2] == pytest.approx(25.0)  # building: 1 / (2 + 3 - 1)
    assert iou[13] == pytest.approx(50.0)  # car: 1 / (2 + 1 - 1)
    assert iou[11] == 0.0  # person: predicted, never true
    assert iou[5] is None  # pole: absent from both (its only prediction was on an ignored pixel)
    assert sum(v is None for v in iou) == 14
    assert s["miou"] == pytest.approx((40 + 50 + 25 + 50 + 0) / 5)  # 33.0: n/a classes are not zeros
    assert s["acc"][1] == pytest.approx(200 / 3)
    assert s["acc"][11] is None  # no ground-truth person pixels
    assert s["macc"] == pytest.approx((50 + 200 / 3 + 50 + 50) / 4)
    assert s["aacc"] == pytest.approx(600 / 11)
    assert s["n_pixels"] == 11


def test_torch_and_numpy_paths_agree_and_accumulate():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 19, (3, 40, 30)).astype(np.uint8)
    gt[:, :5] = 255
    pred = rng.integers(0, 19, (3, 40, 30)).astype(np.uint8)
    conf = Confusion()
    for g, p in zip(gt, pred, strict=True):
        conf.update(torch.from_numpy(p), torch.from_numpy(g))
    assert np.array_equal(conf.matrix, confusion_matrix(pred, gt))
    assert conf.matrix.sum() == 3 * 35 * 30


def test_invalid_values_are_refused():
    gt = np.array([[0, 19]], np.uint8)
    with pytest.raises(ValueError, match="ground truth"):
        confusion_matrix(np.array([[0, 0]]), gt)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(np.array([[255, 0]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)))
    # A prediction of any value on an ignored pixel does not matter.
    assert confusion_matrix(np.array([[200, 3]]), np.array([[255, 3]]))[3, 3] == 1


def test_empty_matrix_has_no_scores():
    s = scores(np.zeros((19, 19), np.int64))
    assert s["miou"] is None and s["macc"] is None and s["aacc"] is None
    assert s["iou"] == [None] * 19


# --------------------------------------------------------------------------- cityscapesscripts agreement

IGNORED_IDS = [label.id for label in LABELS if label.id >= 0 and label.ignore_in_eval]
ABSENT_EVERYWHERE, ONLY_PREDICTED, ONLY_IN_GT = 12, 31, 32  # wall, train, motorcycle (label ids)


def cityscapes_args(prediction_root, export_file):
    """A private copy of the script's global ``args``, quiet, pixel-level only, no instance files."""
    args = cs_eval.CArgs()
    vars(args).update(vars(cs_eval.args))
    args.quiet = True
    args.colorized = False
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.exportFile = str(export_file)
    args.predictionPath = str(prediction_root)
    args.predictionWalk = None
    return args


def test_matches_cityscapesscripts_on_label_id_pngs(tmp_path):
    rng = np.random.default_rng(7)
    train_label_ids = [int(TRAINID_TO_ID[t]) for t in range(19)]
    gt_ids = [i for i in train_label_ids if i not in (ABSENT_EVERYWHERE, ONLY_PREDICTED)] + IGNORED_IDS
    pred_ids = [i for i in train_label_ids if i not in (ABSENT_EVERYWHERE, ONLY_IN_GT)]
    gt_files, pred_root = [], tmp_path / "preds" / "labelIds"
    for k in range(5):
        sample = f"frankfurt_{k:06d}_000019"
        gt = rng.choice(gt_ids, size=(32, 64)).astype(np.uint8)
        pred = rng.choice(pred_ids, size=(32, 64)).astype(np.uint8)
        pred[:, : 8 * k] = gt[:, : 8 * k]  # some agreement, so IoUs are not all near zero
        # Ids copied over that a model cannot output (ignored ones) or that must stay unpredicted: road.
        pred[(ID_TO_TRAINID[pred] == 255) | (pred == ONLY_IN_GT)] = 7
        gt_file = tmp_path / "gtFine" / "val" / "frankfurt" / f"{sample}_gtFine_labelIds.png"
        write_png_atomic(gt_file, gt)
        write_png_atomic(pred_root / f"{sample}_leftImg8bit.png", pred)
        gt_files.append(str(gt_file))

    args = cityscapes_args(pred_root, tmp_path / "cs.json")
    pred_files = [cs_eval.getPrediction(args, gt_file) for gt_file in gt_files]
    result = cs_eval.evaluateImgLists(pred_files, gt_files, args)

    conf = Confusion()
    for pred_file, gt_file in zip(pred_files, gt_files, strict=True):
        pred = ids_to_train_ids(read_label_ids(pred_file), pred_file)
        gt = ids_to_train_ids(read_label_ids(gt_file), gt_file)
        conf.update(pred, gt)
    ours = conf.scores()

    for train_id, name in enumerate(CLASS_NAMES):
        theirs = result["classScores"][name]
        if math.isnan(theirs):
            assert ours["iou"][train_id] is None, name  # NaN (no GT, no prediction) is our n/a
        else:
            assert ours["iou"][train_id] == pytest.approx(100 * theirs, abs=1e-6), name
    assert ours["iou"][ID_TO_TRAINID[ABSENT_EVERYWHERE]] is None
    assert ours["iou"][ID_TO_TRAINID[ONLY_PREDICTED]] == 0.0
    assert ours["iou"][ID_TO_TRAINID[ONLY_IN_GT]] == 0.0
    assert sum(v is None for v in ours["iou"]) == 1
    assert 3 < ours["miou"] < 60
    assert ours["miou"] == pytest.approx(100 * result["averageScoreClasses"], abs=1e-6)
