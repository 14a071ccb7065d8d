from __future__ import annotations

import hashlib

import numpy as np
import pytest
from layout_fixtures import (
    CITYSCAPES_IDS,
    cityscapes_paths,
    image,
    label_ids,
    make_cityscapes,
    make_gta5,
    write_cityscapes_sample,
    write_gta5_sample,
)
from PIL import Image

from ssr_cache.data.datasets import DATASETS, GTA5, Cityscapes, SampleFiles, open_dataset
from ssr_cache.data.labels import ID_PALETTE
from ssr_cache.data.png_io import image_size, read_label_ids, read_rgb, write_png_atomic
from ssr_cache.errors import SSRError

# Train ids of the fixture label rows (see layout_fixtures): sky band, car band, road band.
SKY, CAR, ROAD, PERSON = 10, 13, 0, 11


# --- png_io -------------------------------------------------------------------------------------------------


def test_png_roundtrip_and_header_size(tmp_path):
    rgb = image(2)
    write_png_atomic(tmp_path / "a" / "x.png", rgb)
    assert image_size(tmp_path / "a" / "x.png") == (32, 24)
    back = read_rgb(tmp_path / "a" / "x.png")
    assert back.dtype == np.uint8 and back.shape == (24, 32, 3)
    assert np.array_equal(back, rgb)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.png"]  # no temp file left behind


def test_palette_label_png_stores_ids_as_indices(tmp_path):
    ids = label_ids(1)
    write_png_atomic(tmp_path / "l.png", ids, palette=ID_PALETTE)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
        assert im.getpalette()[26 * 3 : 26 * 3 + 3] == [0, 0, 142]  # car colour at index 26
    assert np.array_equal(read_label_ids(tmp_path / "l.png"), ids)
    write_png_atomic(tmp_path / "g.png", ids)  # greyscale, Cityscapes style
    assert np.array_equal(read_label_ids(tmp_path / "g.png"), ids)


def test_overwrite_is_atomic_and_bad_arrays_leave_the_old_file(tmp_path):
    path = tmp_path / "x.png"
    write_png_atomic(path, image(0))
    write_png_atomic(path, image(5))
    assert read_rgb(path)[0, 0, 2] == 5
    with pytest.raises(ValueError):
        write_png_atomic(path, np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        write_png_atomic(path, np.zeros((4, 4), dtype=np.uint8), palette=np.zeros((300, 3), np.uint8))
    assert np.array_equal(read_rgb(path), image(5))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SSRError, match=r"file/y\.png: cannot write"):
        write_png_atomic(tmp_path / "file" / "y.png", image(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "x.png"]


def test_rgb_label_is_refused_by_name(tmp_path):
    write_png_atomic(tmp_path / "colour.png", image(0))
    with pytest.raises(SSRError, match=r"colour\.png: label PNG has mode RGB; expected a palette \(P\) or greyscale"):
        read_label_ids(tmp_path / "colour.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_read_rgb_gives_pils_pixels_whichever_decoder_runs(tmp_path, mode):
    """RGB(A) PNGs decode with OpenCV (faster), the rest with PIL: the pixels are PIL's either way, and a
    flipped byte inside the image data is caught, not decoded to garbage."""
    rng = np.random.default_rng(1)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    data = rng.integers(0, 256, (29, 41, channels) if channels else (29, 41), dtype=np.uint8)
    Image.fromarray(data, mode="L" if mode == "P" else mode).convert(mode).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        expected = np.array(im.convert("RGB"))
    assert np.array_equal(read_rgb(tmp_path / "x.png"), expected)
    raw = bytearray((tmp_path / "x.png").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "flipped.png").write_bytes(bytes(raw))
    with pytest.raises(SSRError, match=r"flipped\.png: (truncated or corrupt PNG|not a readable image)"):
        read_rgb(tmp_path / "flipped.png")


def test_opencv_runs_in_the_calling_thread():
    """cv2's pool, once used, hangs DataLoader workers forked after it (the cache build stalled for good)."""
    from ssr_cache.data.opencv import cv2

    assert cv2.getNumThreads() == 1


def test_unreadable_files_name_the_file(tmp_path):
    write_png_atomic(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("hello")
    Image.fromarray(image(0)).save(tmp_path / "jpeg.png", format="JPEG")
    assert image_size(tmp_path / "cut.png") == (64, 64)  # the header survives truncation …
    with pytest.raises(SSRError, match=r"cut\.png: truncated or corrupt PNG"):
        read_rgb(tmp_path / "cut.png")  # … but a full decode does not
    with pytest.raises(SSRError, match=r"text\.png: not a readable image"):
        read_rgb(tmp_path / "text.png")
    with pytest.raises(SSRError, match=r"jpeg\.png: expected a PNG file, found JPEG"):
        read_label_ids(tmp_path / "jpeg.png")  # a JPEG where a label is expected
    assert image_size(tmp_path / "jpeg.png") == (32, 24)  # images may be JPEG (a user's own folder)
    with pytest.raises(SSRError, match=r"missing\.png: file not found"):
        read_label_ids(tmp_path / "missing.png")


# --- GTA5 ---------------------------------------------------------------------------------------------------


def test_gta5_listing_is_sorted_and_stable(tmp_path):
    make_gta5(tmp_path, n=3)
    ds = open_dataset("gta5", tmp_path)
    assert isinstance(ds, GTA5) and ds.name == "gta5" and ds.split == "train" and ds.root == tmp_path
    assert len(ds) == 3
    assert ds.sample_ids == ["00001", "00002", "00003"]
    assert ds.items[0] == SampleFiles("00001", tmp_path / "images" / "00001.png", tmp_path / "labels" / "00001.png")
    assert ds.has_labels and ds.resize_to == (1280, 720)
    assert open_dataset("gta5", tmp_path, split="all").items == ds.items


def test_gta5_load_maps_ids_to_train_ids(tmp_path):
    make_gta5(tmp_path, n=3)
    ds = open_dataset("gta5", tmp_path)
    img, label = ds.load(2)
    assert img.dtype == np.uint8 and img.shape == (24, 32, 3)
    assert np.array_equal(img, image(2))
    assert label.dtype == np.uint8 and label.shape == (24, 32)
    assert label[0, 0] == 255  # id 0 unlabeled → ignored
    assert label[0, 1] == SKY  # id 23
    assert label[8, 0] == PERSON and label[15, 7] == PERSON  # id 24 over the first 4k = 8 columns of the car band
    assert label[8, 8] == CAR and label[15, 8] == CAR and label[16, 0] == ROAD
    assert label[8, 31] == CAR  # id 26 → 13
    assert (label[16:] == ROAD).all()  # id 7 → 0
    assert np.array_equal(ds.load_label(2), label)
    assert np.array_equal(ds.load_image(0), image(0))
    assert not any(ds.was_resized(i) for i in range(len(ds)))


def test_gta5_label_of_another_size_is_resized_nearest_and_counted(tmp_path):
    make_gta5(tmp_path, n=2)
    small = np.full((12, 16), 7, dtype=np.uint8)  # half size: road …
    small[0, 0] = 26  # … with one car pixel → a 2x2 car block
    small[11, 15] = 24  # … and one person pixel at the far corner
    write_gta5_sample(tmp_path, "00003", image(2), small)
    ds = open_dataset("gta5", tmp_path)
    img, label = ds.load(2)
    assert label.shape == img.shape[:2] == (24, 32)
    expected = np.zeros((24, 32), dtype=np.uint8)
    expected[:2, :2] = CAR
    expected[22:, 30:] = PERSON
    assert np.array_equal(label, expected)
    assert ds.was_resized(2) and not ds.was_resized(0) and not ds.was_resized(1)
    ds.load(2)
    ds.load_label(2)
    ds.load(0)
    assert len(ds._resized) == 1  # distinct samples, not loads


def test_gta5_image_without_label_names_the_file(tmp_path):
    make_gta5(tmp_path, n=2)
    write_gta5_sample(tmp_path, "00007", image(0), None)
    with pytest.raises(SSRError, match=r"^no label for image .*images/00007\.png \(expected .*labels/00007\.png\)$"):
        open_dataset("gta5", tmp_path, require_labels=True)
    ds = open_dataset("gta5", tmp_path, require_labels=False)
    assert ds.sample_ids == ["00001", "00002", "00007"] and not ds.has_labels
    img, label = ds.load(2)
    assert label is None and np.array_equal(img, image(0))
    with pytest.raises(SSRError, match="sample 00007 has no label"):
        ds.load_label(2)


def test_gta5_bad_inputs(tmp_path):
    with pytest.raises(SSRError, match=r"gta5 dataset root .*nowhere does not exist"):
        open_dataset("gta5", tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(SSRError, match=r"^no gta5 images found: looked for .*images/\*\.png$"):
        open_dataset("gta5", tmp_path)
    make_gta5(tmp_path, n=1)
    with pytest.raises(SSRError, match=r"gta5 has no split 'val'; choose one of: train, all"):
        open_dataset("gta5", tmp_path, split="val")
    with pytest.raises(SSRError, match=r"^unknown dataset 'gta6'; choose one of: gta5, synthia, cityscapes, acdc, dark_zurich, folder$"):
        open_dataset("gta6", tmp_path)


def test_gta5_bad_files_fail_when_loaded_naming_the_file(tmp_path):
    make_gta5(tmp_path, n=3)
    bad = label_ids(0)
    bad[5, 5] = 40  # not a Cityscapes id
    write_gta5_sample(tmp_path, "00002", image(1), bad)
    data = (tmp_path / "images" / "00003.png").read_bytes()
    (tmp_path / "images" / "00003.png").write_bytes(data[: len(data) // 2])
    ds = open_dataset("gta5", tmp_path)  # listing does not decode anything
    assert len(ds) == 3
    ds.load(0)
    with pytest.raises(SSRError, match=r"labels/00002\.png: label id 40 is not in the Cityscapes table"):
        ds.load(1)
    with pytest.raises(SSRError, match=r"images/00003\.png: truncated or corrupt PNG"):
        ds.load(2)


def test_file_list_hash_is_sha256_of_sorted_relative_paths(tmp_path):
    make_gta5(tmp_path / "a", n=2)
    make_gta5(tmp_path / "b", n=2)
    listing = "images/00001.png\tlabels/00001.png\nimages/00002.png\tlabels/00002.png\n"
    expected = hashlib.sha256(listing.encode()).hexdigest()
    assert open_dataset("gta5", tmp_path / "a").file_list_hash() == expected
    assert open_dataset("gta5", tmp_path / "b").file_list_hash() == expected  # relative: root does not matter
    write_gta5_sample(tmp_path / "b", "00003", image(0), label_ids(0))
    assert open_dataset("gta5", tmp_path / "b").file_list_hash() != expected


# --- Cityscapes ---------------------------------------------------------------------------------------------


def test_cityscapes_listing_and_label_ids(tmp_path):
    make_cityscapes(tmp_path, split="val")
    ds = open_dataset("cityscapes", tmp_path, split="val")
    assert isinstance(ds, Cityscapes) and ds.resize_to == (1024, 512)
    assert ds.sample_ids == list(CITYSCAPES_IDS)
    image_path, ids_path, _ = cityscapes_paths(tmp_path, "val", "bochum_000000_000313")
    assert ds.items[2] == SampleFiles("bochum_000000_000313", image_path, ids_path)
    img, label = ds.load(3)
    assert np.array_equal(img, image(3))
    assert label[0, 0] == 255 and label[0, 5] == SKY and label[8, 11] == PERSON and label[8, 12] == CAR
    assert (label[16:] == ROAD).all()
    listing = "".join(
        f"leftImg8bit/val/{s.split('_')[0]}/{s}_leftImg8bit.png\tgtFine/val/{s.split('_')[0]}/{s}_gtFine_labelIds.png\n"
        for s in CITYSCAPES_IDS
    )
    assert ds.file_list_hash() == hashlib.sha256(listing.encode()).hexdigest()


def test_cityscapes_prefers_label_train_ids(tmp_path):
    make_cityscapes(tmp_path, split="val")
    train_ids = np.full((24, 32), 255, dtype=np.uint8)
    train_ids[:, :3] = 18  # bicycle: differs from what the labelIds file would give
    write_cityscapes_sample(tmp_path, "val", CITYSCAPES_IDS[1], image(1), ids=label_ids(1), train_ids=train_ids)
    ds = open_dataset("cityscapes", tmp_path, split="val")
    assert ds.items[1].label.name == f"{CITYSCAPES_IDS[1]}_gtFine_labelTrainIds.png"
    assert ds.items[0].label.name.endswith("_gtFine_labelIds.png")
    assert np.array_equal(ds.load_label(1), train_ids)  # used as is, not mapped again
    bad = train_ids.copy()
    bad[0, 0] = 19
    write_cityscapes_sample(tmp_path, "val", CITYSCAPES_IDS[1], image(1), train_ids=bad)
    with pytest.raises(SSRError, match=r"aachen_000001_000019_gtFine_labelTrainIds\.png: train id 19 is not valid"):
        ds.load_label(1)


def test_cityscapes_target_images_without_labels(tmp_path):
    make_cityscapes(tmp_path, split="train", labels=False)
    ds = open_dataset("cityscapes", tmp_path, split="train", require_labels=False)
    assert len(ds) == 4 and not ds.has_labels
    assert all(item.label is None for item in ds.items)
    img, label = ds.load(0)
    assert label is None and img.shape == (24, 32, 3)
    with pytest.raises(SSRError, match=r"no label for image .*aachen_000000_000019_leftImg8bit\.png \(expected "
                       r".*gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds\.png\)"):
        open_dataset("cityscapes", tmp_path, split="train")


def test_cityscapes_bad_inputs(tmp_path):
    with pytest.raises(SSRError, match="cityscapes dataset root .* does not exist"):
        open_dataset("cityscapes", tmp_path / "none")
    make_cityscapes(tmp_path, split="val")
    with pytest.raises(SSRError, match=r"no cityscapes split folder .*leftImg8bit/train \(found splits: val\)"):
        open_dataset("cityscapes", tmp_path, split="train")
    (tmp_path / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    with pytest.raises(SSRError, match=r"^no cityscapes images found: looked for .*leftImg8bit/test/\*/\*_leftImg8bit"):
        open_dataset("cityscapes", tmp_path, split="test")


def test_registry_and_pickling(tmp_path):
    import pickle

    assert list(DATASETS) == ["gta5", "synthia", "cityscapes", "acdc", "dark_zurich", "folder"]
    assert DATASETS["gta5"] is GTA5 and DATASETS["cityscapes"] is Cityscapes
    make_gta5(tmp_path, n=2)
    ds = open_dataset("gta5", tmp_path)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.items == ds.items and np.array_equal(copy.load_label(1), ds.load_label(1))
