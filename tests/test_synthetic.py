"""The synthetic two-domain data: real layouts, exact labels, every class, determinism, a real domain gap."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from PIL import Image, ImageFilter

from ssr_cache.data.datasets import open_dataset
from ssr_cache.data.synthetic import SynthSummary, synthesize
from ssr_cache.data.synthetic_layouts import FORCE_GROUPS, forced_labels
from ssr_cache.errors import SSRError

TRAIN, VAL, SIZE, SEED = 16, 8, (160, 80), 3
# label ids the generator may write: the 19 train classes plus unlabeled, ego vehicle, static
TRAIN_CLASS_IDS = {lb.id for lb in id2label.values() if 0 <= lb.trainId < 19}
ALLOWED_IDS = TRAIN_CLASS_IDS | {0, 1, 4}
TO_TRAIN_ID = np.full(256, 255, dtype=np.uint8)
for _id, _label in id2label.items():
    if _id >= 0 and 0 <= _label.trainId < 19:
        TO_TRAIN_ID[_id] = _label.trainId

CITYSCAPES_NAME = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})_(leftImg8bit|gtFine_labelIds)\.png$")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synthesize(out, train=TRAIN, val=VAL, size=SIZE, seed=SEED, progress=False)


def _files(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _split_arrays(root: Path, part: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images, label-id maps) of one output part, in file order."""
    if part.startswith("gta5"):
        images = sorted((root / part / "images").glob("*.png"))
        labels = [root / part / "labels" / p.name for p in images]
    else:
        split = part.split("/")[1]
        images = sorted((root / "cityscapes" / "leftImg8bit" / split).glob("*/*.png"))
        labels = [root / "cityscapes" / "gtFine" / split / p.parent.name /
                  p.name.replace("leftImg8bit", "gtFine_labelIds") for p in images]
    return [np.asarray(Image.open(p)) for p in images], [np.asarray(Image.open(p)) for p in labels]


def test_files_in_the_real_gta5_and_cityscapes_layouts(data):
    out, summary = data
    files = set(_files(out))
    gta5 = {f"{part}/{kind}/{i:05d}.png" for part, n in (("gta5", TRAIN), ("gta5_val", VAL))
            for kind in ("images", "labels") for i in range(n)}
    cityscapes = files - gta5 - {"synthetic.json"}
    assert gta5 <= files
    assert len(cityscapes) == 2 * (TRAIN + VAL)
    per_split = {"train": set(), "val": set()}
    for name in cityscapes:
        root, kind, split, city, file = name.split("/")
        match = CITYSCAPES_NAME.match(file)
        assert root == "cityscapes" and match, name
        assert (kind, match[4]) in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds"))
        assert match[1] == city and match[3] == "000019"
        per_split[split].add((city, int(match[2])))
    assert {c for c, _ in per_split["train"]} == {"aachen", "bochum", "bremen"}
    assert {c for c, _ in per_split["val"]} == {"frankfurt", "lindau", "munster"}
    assert len(per_split["train"]) == TRAIN and len(per_split["val"]) == VAL
    for split in per_split.values():  # sequence numbers run 0, 1, 2, … within each city
        for city in {c for c, _ in split}:
            assert sorted(s for c, s in split if c == city) == list(range(sum(c == city for c, _ in split)))
    assert (summary.gta5, summary.gta5_val, summary.cityscapes) == (out / "gta5", out / "gta5_val", out / "cityscapes")
    assert summary.counts == {"gta5": TRAIN, "gta5_val": VAL, "cityscapes/train": TRAIN, "cityscapes/val": VAL}
    assert "aachen_000000_000019_leftImg8bit.png" in {Path(f).name for f in files}


def test_label_pngs_hold_cityscapes_ids_like_the_real_datasets(data):
    out, _ = data
    gta_label = Image.open(out / "gta5" / "labels" / "00000.png")
    assert gta_label.mode == "P" and gta_label.size == SIZE
    palette = np.asarray(gta_label.getpalette()[: 34 * 3]).reshape(34, 3)
    for label_id in range(34):  # index = label id, colour = the Cityscapes colour of that id
        assert tuple(palette[label_id]) == id2label[label_id].color
    city_label = next((out / "cityscapes" / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert Image.open(city_label).mode == "L"
    for part in ("gta5", "gta5_val", "cityscapes/train", "cityscapes/val"):
        images, labels = _split_arrays(out, part)
        for image, label in zip(images, labels, strict=True):
            assert image.shape == (SIZE[1], SIZE[0], 3) and image.dtype == np.uint8
            assert label.shape == (SIZE[1], SIZE[0])
            assert set(np.unique(label).tolist()) <= ALLOWED_IDS
            # the ego car's bonnet (id 1) is a target-domain trait, as in Cityscapes
            assert (label == 1).any() == part.startswith("cityscapes")


def test_every_train_class_occurs_in_every_split(data):
    out, summary = data
    for part in ("gta5", "gta5_val", "cityscapes/train", "cityscapes/val"):
        _, labels = _split_arrays(out, part)
        present = set(np.unique(TO_TRAIN_ID[np.stack(labels)]).tolist()) - {255}
        assert present == set(range(19)), part
        assert all(f > 0 for f in summary.class_fractions[part].values())
    # even at the smallest size
    small = synthesize(out.parent / "small", train=4, val=0, size=(64, 64), seed=0, progress=False)
    for part in ("gta5", "cityscapes/train"):
        _, labels = _split_arrays(small.out, part)
        assert set(np.unique(TO_TRAIN_ID[np.stack(labels)]).tolist()) - {255} == set(range(19)), part


def test_schedule_forces_every_class_into_every_split():
    every = frozenset().union(*FORCE_GROUPS)
    assert len(every) == 19 and sum(len(g) for g in FORCE_GROUPS) == 19
    for count in (1, 2, 3, 4, 5, 39, 200):
        assert frozenset().union(*(forced_labels(i, count) for i in range(count))) == every
    per_class = [sum(label in forced_labels(i, 200) for i in range(200)) for label in sorted(every)]
    assert per_class == [10] * 19  # about one image in ten per class, not every image


def test_summary_fractions_match_the_files(data):
    out, summary = data
    _, labels = _split_arrays(out, "cityscapes/val")
    train_ids = TO_TRAIN_ID[np.stack(labels)]
    fractions = summary.class_fractions["cityscapes/val"]
    assert list(fractions) == [lb.name for lb in sorted(id2label.values(), key=lambda lb: lb.trainId)
                               if 0 <= lb.trainId < 19]
    for train_id, name in enumerate(fractions):
        assert fractions[name] == pytest.approx((train_ids == train_id).mean(), abs=1e-6)
    assert 0.8 < sum(fractions.values()) < 1.0  # the rest is the ignored bonnet and street furniture
    marker = json.loads((out / "synthetic.json").read_text())
    assert marker["complete"] and marker["seed"] == SEED and marker["class_fractions"] == summary.class_fractions
    assert "in" in str(summary) and f"{SIZE[0]}x{SIZE[1]}" in str(summary)


def test_readers_open_the_synthetic_data(data):
    out, _ = data
    assert len(open_dataset("gta5", out / "gta5", split="train", require_labels=True)) == TRAIN
    val = open_dataset("gta5", out / "gta5_val", split="train", require_labels=True)
    assert len(val) == VAL
    target = open_dataset("cityscapes", out / "cityscapes", split="val", require_labels=True)
    image, train_ids = target.load(0)
    assert len(target) == VAL and image.shape == (SIZE[1], SIZE[0], 3)
    label_ids = np.asarray(Image.open(target.items[0].label))
    assert np.array_equal(train_ids, TO_TRAIN_ID[label_ids])


def test_same_seed_same_bytes_whatever_the_workers_other_seed_differs(data, tmp_path):
    out, _ = data
    reference = _files(out)
    synthesize(tmp_path / "again", train=TRAIN, val=VAL, size=SIZE, seed=SEED, workers=2, progress=True)
    assert _files(tmp_path / "again") == reference
    other = _files(synthesize(tmp_path / "other", train=TRAIN, val=VAL, size=SIZE, seed=SEED + 1,
                              progress=False).out)
    assert other.keys() == reference.keys()
    pngs = [name for name in reference if name.endswith(".png")]
    assert all(other[name] != reference[name] for name in pngs)


def test_source_labels_are_exact_for_the_rendered_shapes(data):
    """Source images are flat colours without blur: every label edge is a colour edge, each colour one class."""
    out, _ = data
    images, labels = _split_arrays(out, "gta5")
    silent_edges = edges = 0
    for image, label in zip(images, labels, strict=True):
        packed = (image[..., 0].astype(np.int64) << 16) | (image[..., 1].astype(np.int64) << 8) | image[..., 2]
        pairs = np.unique(np.stack([packed.ravel(), label.ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]  # colour → label is a function
        for axis in (0, 1):
            label_edge = np.diff(label.astype(np.int16), axis=axis) != 0
            colour_edge = np.diff(packed, axis=axis) != 0
            edges += int(label_edge.sum())
            silent_edges += int((label_edge & ~colour_edge).sum())
    assert edges > 1000 and silent_edges == 0


def _class_means(images: list[np.ndarray], labels: list[np.ndarray]) -> np.ndarray:
    rgb = np.concatenate([i.reshape(-1, 3) for i in images]).astype(np.float64)
    train_ids = TO_TRAIN_ID[np.concatenate([lb.ravel() for lb in labels])]
    return np.stack([rgb[train_ids == c].mean(0) for c in range(19)])


def test_domain_gap_in_class_colours(data):
    """The same class looks alike within a domain and different across domains."""
    out, _ = data
    means = {part: _class_means(*_split_arrays(out, part))
             for part in ("gta5", "gta5_val", "cityscapes/train", "cityscapes/val")}

    def distance(a: str, b: str) -> float:
        return float(np.linalg.norm(means[a] - means[b], axis=1).mean())

    within = max(distance("gta5", "gta5_val"), distance("cityscapes/train", "cityscapes/val"))
    across = min(distance("gta5", "cityscapes/train"), distance("gta5_val", "cityscapes/val"))
    assert within < 25.0
    assert across > 60.0 and across > 4 * within


def _pixel_features(images: list[np.ndarray], labels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: colour averaged over 7x7 (so sensor noise does not decide) and the image row."""
    features, targets = [], []
    for image, label in zip(images, labels, strict=True):
        smooth = np.asarray(Image.fromarray(image).filter(ImageFilter.BoxBlur(3)), dtype=np.float64)
        rows = np.broadcast_to(np.linspace(0, 255, image.shape[0])[:, None, None], (*image.shape[:2], 1))
        features.append(np.concatenate([smooth, rows], -1).reshape(-1, 4))
        targets.append(TO_TRAIN_ID[label.ravel()])
    x, y = np.concatenate(features), np.concatenate(targets)
    return x[y < 19], y[y < 19]


class _GaussianPixelClassifier:
    """Naive-Bayes pixel classifier: one diagonal Gaussian per class over the pixel features."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.mean = np.stack([x[y == c].mean(0) for c in range(19)])
        self.var = np.stack([x[y == c].var(0) + 25.0 for c in range(19)])
        self.log_prior = np.log(np.bincount(y, minlength=19) / len(y) + 1e-6)

    def miou(self, x: np.ndarray, y: np.ndarray) -> float:
        log_lik = -0.5 * (((x[:, None] - self.mean) ** 2) / self.var + np.log(self.var)).sum(-1)
        pred = (log_lik + self.log_prior).argmax(1)
        ious = [((pred == c) & (y == c)).sum() / ((pred == c) | (y == c)).sum() for c in range(19)]
        return float(np.mean(ious))


def test_domain_gap_hurts_a_source_only_model_and_target_stays_learnable(data):
    out, _ = data
    source, source_val = (_pixel_features(*_split_arrays(out, p)) for p in ("gta5", "gta5_val"))
    target, target_val = (_pixel_features(*_split_arrays(out, p)) for p in ("cityscapes/train", "cityscapes/val"))
    source_only = _GaussianPixelClassifier(*source)
    oracle = _GaussianPixelClassifier(*target)
    on_source, on_target = source_only.miou(*source_val), source_only.miou(*target_val)
    assert on_source > 0.4
    assert on_target < on_source - 0.25  # the gap: same classifier, far worse on the other domain
    assert oracle.miou(*target_val) > on_target + 0.03  # target labels would help: the target is learnable


def test_refuses_bad_arguments(tmp_path):
    with pytest.raises(SSRError, match="at least 64x64"):
        synthesize(tmp_path / "a", size=(63, 64), progress=False)
    with pytest.raises(SSRError, match="at least 64x64"):
        synthesize(tmp_path / "a", size=(64, 63), progress=False)
    with pytest.raises(SSRError, match="--train"):
        synthesize(tmp_path / "a", train=0, progress=False)
    with pytest.raises(SSRError, match="--val"):
        synthesize(tmp_path / "a", val=-1, progress=False)
    with pytest.raises(SSRError, match="--workers"):
        synthesize(tmp_path / "a", workers=0, progress=False)
    with pytest.raises(SSRError, match="--seed"):
        synthesize(tmp_path / "a", seed=-1, progress=False)
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    with pytest.raises(SSRError, match="not a folder"):
        synthesize(a_file, progress=False)
    assert a_file.read_text() == "keep me"
    foreign = tmp_path / "foreign"
    (foreign / "gta5" / "images").mkdir(parents=True)
    (foreign / "gta5" / "images" / "00000.png").write_bytes(b"real data")
    with pytest.raises(SSRError, match="not written by"):
        synthesize(foreign, train=1, val=0, size=(64, 64), progress=False)
    assert (foreign / "gta5" / "images" / "00000.png").read_bytes() == b"real data"
    assert not (tmp_path / "a").exists()


def test_rerun_with_fewer_images_removes_only_its_own_old_files(tmp_path):
    out = tmp_path / "data"
    synthesize(out, train=6, val=3, size=(64, 64), progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "gta5" / "class_stats_train.json").write_text("{}")
    synthesize(out, train=4, val=1, size=(64, 64), progress=False)
    fresh = tmp_path / "fresh"
    synthesize(fresh, train=4, val=1, size=(64, 64), progress=False)
    kept = _files(out)
    assert kept.pop("notes.txt") and kept.pop("gta5/class_stats_train.json")
    assert kept == _files(fresh)
