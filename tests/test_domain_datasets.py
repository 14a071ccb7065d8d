"""Readers of SYNTHIA, ACDC, Dark Zurich and a user's own folder, on files written the way each dataset
ships them (`ssr data synth --layout …` and hand-made fixtures); every bad input is one SSRError line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ssr_cache.data.class_stats import dataset_stats
from ssr_cache.data.datasets import open_dataset
from ssr_cache.data.datasets.synthia import SYNTHIA_TO_TRAINID
from ssr_cache.data.label_space import CITYSCAPES
from ssr_cache.data.labels import ID_TO_TRAINID
from ssr_cache.data.png_io import read_label_16bit_red, write_label_16bit, write_png_atomic
from ssr_cache.data.synthetic import synthesize
from ssr_cache.data.synthetic_layouts import FOLDER_VALUE_OF_ID, SYNTHIA_ID_OF_ID
from ssr_cache.errors import SSRError

ALL = ("synthia", "acdc", "dark_zurich", "folder")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("domains")
    return synthesize(out, train=6, val=3, size=(64, 64), seed=5, progress=False, layouts=ALL)


# --- SYNTHIA -------------------------------------------------------------------------------------------------


def test_synthia_16bit_labels_decode_by_the_readme_table(synth):
    ds = open_dataset("synthia", synth.roots["synthia"])
    assert len(ds) == 9 and ds.labelled_by_default() and ds.resize_to == (1280, 760)
    raw = read_label_16bit_red(ds.items[0].label)
    assert raw.dtype == np.uint16
    expected = np.full(raw.shape, 255, np.uint8)
    for sid, tid in SYNTHIA_TO_TRAINID.items():
        expected[raw == sid] = tid
    label = ds.load_label(0)
    assert np.array_equal(label, expected) and (label != 255).any()
    # terrain (SYNTHIA 16), truck (18) and train (20) exist in SYNTHIA's files but not in its classes
    assert not np.isin(label, [9, 14, 16]).any()
    # PIL opens the same file as 8-bit RGB and returns other values: the reason for OpenCV
    with Image.open(ds.items[0].label) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB"))[..., 0], raw)


def test_synthia_writer_matches_the_scene_through_the_table(tmp_path):
    ids = np.array([[7, 8, 11], [26, 22, 0]], np.uint8)  # road, sidewalk, building, car, terrain, unlabeled
    write_label_16bit(tmp_path / "l.png", SYNTHIA_ID_OF_ID[ids], np.full(ids.shape, 4242, np.uint16))
    import cv2

    bgr = cv2.imread(str(tmp_path / "l.png"), cv2.IMREAD_UNCHANGED)
    assert bgr.dtype == np.uint16 and bgr.shape == (2, 3, 3)
    assert bgr[..., 2].tolist() == [[3, 4, 2], [8, 16, 0]] and (bgr[..., 1] == 4242).all()


def test_synthia_label_space_has_16_classes_and_the_paper_subsets(synth):
    space = open_dataset("synthia", synth.roots["synthia"]).label_space
    assert space.same_classes(CITYSCAPES) and space.num_classes == 19
    assert len(space.present_classes) == 16 and "terrain" not in space.present_classes
    subsets = space.subset_indices()
    assert subsets["miou16"] == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert subsets["miou13"] == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def test_synthia_8bit_label_is_one_clear_error(tmp_path):
    (tmp_path / "RGB").mkdir()
    write_png_atomic(tmp_path / "RGB" / "0000000.png", np.zeros((8, 8, 3), np.uint8))
    write_png_atomic(tmp_path / "GT" / "LABELS" / "0000000.png", np.full((8, 8, 3), 3, np.uint8))  # 8-bit RGB
    ds = open_dataset("synthia", tmp_path)
    with pytest.raises(SSRError, match=r"0000000\.png: SYNTHIA label is 8-bit; expected the 16-bit"):
        ds.load_label(0)


def test_synthia_converted_train_ids_are_accepted(tmp_path):
    write_png_atomic(tmp_path / "RGB" / "0000001.png", np.zeros((4, 4, 3), np.uint8))
    write_png_atomic(tmp_path / "GT" / "LABELS" / "0000001_labelTrainIds.png", np.full((4, 4), 13, np.uint8))
    assert (open_dataset("synthia", tmp_path).load_label(0) == 13).all()


# --- ACDC ----------------------------------------------------------------------------------------------------


def test_acdc_download_layout_and_conditions(synth):
    root = synth.roots["acdc"]
    ds = open_dataset("acdc", root, "train", require_labels=False)
    assert len(ds) == 6 and not ds.labelled_by_default() and ds.resize_to == (960, 540)
    assert {sid.split("/")[0] for sid in ds.sample_ids} == {"fog", "night", "rain", "snow"}
    night = open_dataset("acdc", root, "train", conditions=("night",))
    assert night.sample_ids == [s for s in ds.sample_ids if s.startswith("night/")]
    assert all(item.label.name.endswith("_gt_labelIds.png") for item in night.items)  # not _gt_labelColor
    ids = np.asarray(Image.open(night.items[0].label))
    assert np.array_equal(night.load_label(0), ID_TO_TRAINID[ids])
    with pytest.raises(SSRError, match=r"^acdc has no condition 'fgo'; choose from fog, night, rain, snow$"):
        open_dataset("acdc", root, "train", conditions=("fgo",))


def test_acdc_flattened_layout(tmp_path, synth):
    # DAFormer's README: rsync rgb_anon/*/train/*/* → rgb_anon/train/, gt/*/train/*/*_labelTrainIds.png → gt/train/
    src = open_dataset("acdc", synth.roots["acdc"], "val")
    for i, item in enumerate(src.items):
        stem = item.image.name[: -len("_rgb_anon.png")]
        write_png_atomic(tmp_path / "rgb_anon" / "val" / item.image.name, np.asarray(Image.open(item.image)))
        write_png_atomic(tmp_path / "gt" / "val" / f"{stem}_gt_labelTrainIds.png", src.load_label(i))
    flat = open_dataset("acdc", tmp_path, "val")
    assert len(flat) == len(src)
    for i in range(len(src)):
        j = flat.sample_ids.index(src.items[i].image.name[: -len("_rgb_anon.png")])
        assert np.array_equal(flat.load_label(j), src.load_label(i))
    with pytest.raises(SSRError, match="flattened layout, which does not keep the condition"):
        open_dataset("acdc", tmp_path, "val", conditions=("fog",))


def test_acdc_and_dark_zurich_roots_in_neither_layout(tmp_path):
    (tmp_path / "rgb_anon" / "somewhere").mkdir(parents=True)
    with pytest.raises(SSRError, match=r"is not an ACDC root: expected rgb_anon/\{fog,night,rain,snow\}/train/"):
        open_dataset("acdc", tmp_path, "train")
    with pytest.raises(SSRError, match=r"is not a Dark Zurich root: expected rgb_anon/train/\{day,twilight,night\}"):
        open_dataset("dark_zurich", tmp_path, "train")


# --- Dark Zurich ---------------------------------------------------------------------------------------------


def test_dark_zurich_night_by_default_and_val_labels(synth):
    root = synth.roots["dark_zurich"]
    night = open_dataset("dark_zurich", root, "train", require_labels=False)
    every = open_dataset("dark_zurich", root, "train", require_labels=False,
                         conditions=("day", "twilight", "night"))
    assert len(every) == 6 and night.sample_ids == [s for s in every.sample_ids if s.startswith("night/")]
    assert not every.has_labels
    val = open_dataset("dark_zurich", root, "val")
    assert len(val) == 3 and val.labelled_by_default()
    assert np.array_equal(val.load_label(0), ID_TO_TRAINID[np.asarray(Image.open(val.items[0].label))])
    with pytest.raises(SSRError, match=r"dark_zurich val has no day images"):
        open_dataset("dark_zurich", root, "val", conditions=("day",))
    with pytest.raises(SSRError, match=r"^dark_zurich has no condition 'dusk'"):
        open_dataset("dark_zurich", root, "train", conditions=("dusk",))
    with pytest.raises(SSRError, match=r"^gta5 has no conditions; --conditions is for acdc and dark_zurich$"):
        open_dataset("gta5", root, conditions=("night",))


# --- a user's own folder -------------------------------------------------------------------------------------


def test_folder_jpegs_nested_any_case_with_classes_toml(synth):
    ds = open_dataset("folder", synth.roots["folder_source"], "train")
    assert len(ds) == 6 and ds.labelled_by_default()
    assert {p.image.suffix for p in ds.items} == {".jpg", ".JPG"}
    assert ds.label_space.class_names == ("ground", "structure", "agent")
    assert ds.label_space.thing_classes == ("agent",) and ds.label_space.palette[2] == (220, 20, 60)
    values = np.asarray(Image.open(ds.items[0].label))
    label, unlisted = ds.read_label(0)
    expected = np.select([values == 10, np.isin(values, (20, 21)), values == 30], [0, 1, 2], 255)
    assert np.array_equal(label, expected) and unlisted == int((values == 0).sum())
    stats = dataset_stats(ds, workers=1, progress=False)
    assert stats["class_names"] == ["ground", "structure", "agent"] and stats["n_images"] == 6
    assert sum(stats["pixels_per_class"]) + stats["ignored_pixels"] == 6 * 64 * 64
    assert stats["unlisted_pixels"] == stats["ignored_pixels"] > 0  # void is value 0, not listed
    assert set(FOLDER_VALUE_OF_ID.tolist()) == {0, 10, 20, 21, 30}


def _folder(root, toml: str | None, labels: bool = True, ext: str = "png"):
    rgb = np.zeros((4, 6, 3), np.uint8)
    img = Image.fromarray(rgb)
    (root / "images" / "a" / "b").mkdir(parents=True)
    img.save(root / "images" / "a" / "b" / f"x.{ext}")
    img.save(root / "images" / f"y.{ext.upper()}")
    if labels:
        write_png_atomic(root / "labels" / "a" / "b" / "x.png", np.array([[0, 1, 2, 3, 255, 7]] * 4, np.uint8))
        write_png_atomic(root / "labels" / "y.png", np.ones((4, 6), np.uint8))
    if toml is not None:
        (root / "classes.toml").write_text(toml)


def test_folder_default_values_webp_and_unlabelled(tmp_path):
    _folder(tmp_path, 'names = ["soil", "crop", "weed"]\n', ext="webp")
    ds = open_dataset("folder", tmp_path)
    assert ds.sample_ids == ["a/b/x", "y"] and ds.label_space.thing_classes == ()
    label, unlisted = ds.read_label(0)
    assert label[0].tolist() == [0, 1, 2, 255, 255, 255] and unlisted == 4 * 2  # values 3 and 7; 255 is ignore
    bare = tmp_path / "bare"
    bare.mkdir()
    _folder(bare, 'names = ["soil", "crop", "weed"]\n', labels=False)
    assert not open_dataset("folder", bare, require_labels=False).labelled_by_default()
    with pytest.raises(SSRError, match=r"^no label for image .*x\.png \(expected .*labels/a/b/x\.png\)$"):
        open_dataset("folder", bare)


def test_folder_with_the_cityscapes_names_is_a_cityscapes_target(tmp_path):
    names = ", ".join(f'"{n}"' for n in CITYSCAPES.class_names)
    _folder(tmp_path, f"names = [{names}]\n")
    space = open_dataset("folder", tmp_path).label_space
    assert space == CITYSCAPES


@pytest.mark.parametrize(("toml", "match"), [
    (None, r"classes\.toml not found: a folder dataset names its classes there"),
    ("names = [", r"classes\.toml: not valid TOML"),
    ('names = "soil"', r"classes\.toml: `names` must be a non-empty list of class names"),
    ('names = ["a", "b", "a"]', r"classes\.toml: duplicate class name\(s\) a$"),
    ('names = ["a", "b"]\n[label_values]\na = [1, 2]\nb = [2]', r"label value 2 is mapped to two classes, 'a' and 'b'"),
    ('names = ["a", "b"]\n[label_values]\nc = [1]', r"\[label_values\] names 'c', which is not in `names`"),
    ('names = ["a", "b"]\n[label_values]\na = [300]', r"label values of 'a' must be integers in 0\.\.255"),
    ('names = ["a", "b"]\npalette = [[0, 0, 0]]', r"`palette` must hold 2 \[r, g, b\] triples"),
    ('names = ["a"]\nthing_classes = ["b"]', r"`thing_classes` must be a list of names from `names`"),
    ('names = ["a"]\ncolours = 1', r"unknown key\(s\) colours"),
])
def test_bad_classes_toml_is_one_line(tmp_path, toml, match):
    _folder(tmp_path, toml)
    with pytest.raises(SSRError, match=match) as info:
        open_dataset("folder", tmp_path)
    assert "\n" not in str(info.value)


def test_folder_jpeg_where_a_label_is_expected(tmp_path):
    _folder(tmp_path, 'names = ["a", "b"]\n', labels=False)
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "labels" / "y.png", format="JPEG")
    ds = open_dataset("folder", tmp_path, require_labels=False)
    with pytest.raises(SSRError, match=r"labels/y\.png: expected a PNG file, found JPEG"):
        ds.load_label(ds.sample_ids.index("y"))


def test_synth_refuses_an_unknown_layout_and_records_the_layouts(tmp_path):
    import json

    with pytest.raises(SSRError, match=r"^unknown layout 'gta6'; choose from gta5, cityscapes, synthia, acdc, "
                                       r"dark_zurich, folder$"):
        synthesize(tmp_path / "x", train=1, val=0, size=(64, 64), progress=False, layouts=("gta6",))
    assert not (tmp_path / "x").exists()
    summary = synthesize(tmp_path / "y", train=1, val=0, size=(64, 64), progress=False, layouts=("folder",))
    marker = json.loads((tmp_path / "y" / "synthetic.json").read_text())
    assert marker["layouts"] == ["folder"] and marker["complete"]
    assert set(summary.roots) == {"folder_source", "folder_target"}
    assert (tmp_path / "y" / "folder_source" / "classes.toml").is_file()
