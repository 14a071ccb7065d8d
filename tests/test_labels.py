from __future__ import annotations

import numpy as np
import pytest
from cityscapesscripts.helpers import labels as reference

from ssr_cache.data.labels import (
    CLASS_NAMES,
    ID_PALETTE,
    ID_TO_TRAINID,
    IGNORE_INDEX,
    LABELS,
    NUM_CLASSES,
    PALETTE,
    TRAINID_TO_ID,
    VALID_IDS,
    check_train_ids,
    count_values,
    ids_to_train_ids,
)
from ssr_cache.data.png_io import read_label_ids, write_png_atomic
from ssr_cache.errors import SSRError


def test_table_matches_cityscapesscripts_entry_by_entry():
    assert len(LABELS) == len(reference.labels) == 35
    for ours, ref in zip(LABELS, reference.labels, strict=True):
        assert (ours.name, ours.id, ours.train_id) == (ref.name, ref.id, ref.trainId)
        assert (ours.category, ours.category_id) == (ref.category, ref.categoryId)
        assert (ours.has_instances, ours.ignore_in_eval) == (ref.hasInstances, ref.ignoreInEval)
        assert ours.color == tuple(ref.color)


def test_license_plate_keeps_its_negative_id():
    plate = next(label for label in LABELS if label.name == "license plate")
    assert (plate.id, plate.train_id) == (-1, -1)
    assert -1 not in VALID_IDS


def test_constants():
    assert (NUM_CLASSES, IGNORE_INDEX) == (19, 255)
    assert VALID_IDS == tuple(range(34))
    expected_names = [ref.name for ref in sorted(reference.labels, key=lambda lb: lb.trainId) if 0 <= ref.trainId < 19]
    assert list(CLASS_NAMES) == expected_names
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[13] == "car" and CLASS_NAMES[18] == "bicycle"
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (19, 3)
    assert PALETTE[0].tolist() == [128, 64, 128] and PALETTE[10].tolist() == [70, 130, 180]
    for train_id, colour in enumerate(PALETTE.tolist()):
        assert tuple(colour) == tuple(reference.trainId2label[train_id].color)


def test_id_to_trainid_lut():
    assert ID_TO_TRAINID.dtype == np.uint8 and ID_TO_TRAINID.shape == (256,)
    for label_id in range(256):
        ref = reference.id2label.get(label_id)
        expected = ref.trainId if ref is not None and 0 <= ref.trainId < 19 else 255
        assert ID_TO_TRAINID[label_id] == expected, label_id
    assert (ID_TO_TRAINID[34:] == 255).all()
    assert int((ID_TO_TRAINID < 19).sum()) == 19


def test_trainid_to_id_lut():
    assert TRAINID_TO_ID.dtype == np.uint8 and TRAINID_TO_ID.shape == (256,)
    for train_id in range(19):
        assert TRAINID_TO_ID[train_id] == reference.trainId2label[train_id].id
    assert TRAINID_TO_ID[255] == 0
    assert (TRAINID_TO_ID[19:] == 0).all()
    assert (ID_TO_TRAINID[TRAINID_TO_ID[:19]] == np.arange(19)).all()


def test_id_palette_gives_each_label_id_its_colour():
    assert ID_PALETTE.shape == (256, 3) and ID_PALETTE.dtype == np.uint8
    for label_id in range(34):
        assert tuple(ID_PALETTE[label_id]) == tuple(reference.id2label[label_id].color)


def test_ids_to_train_ids_maps_known_pixels():
    ids = np.array([[7, 26, 0], [33, 9, 24]], dtype=np.uint8)
    out = ids_to_train_ids(ids, "x.png")
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 13, 255], [18, 255, 11]]


def test_ids_outside_the_table_name_the_file():
    with pytest.raises(SSRError, match=r"^labels/00042\.png: label id 200 is not in the Cityscapes table"):
        ids_to_train_ids(np.array([[7, 200, 34]], dtype=np.uint8), "labels/00042.png")
    with pytest.raises(SSRError, match="34"):
        ids_to_train_ids(np.array([34], dtype=np.uint8), "a.png")
    with pytest.raises(SSRError, match=r"^b\.png"):
        ids_to_train_ids(np.array([-1, 7]), "b.png")


def test_check_train_ids():
    ok = np.array([0, 18, 255], dtype=np.uint8)
    assert check_train_ids(ok, "t.png").tolist() == [0, 18, 255]
    with pytest.raises(SSRError, match=r"^t\.png: train id 19 is not valid"):
        check_train_ids(np.array([0, 19], dtype=np.uint8), "t.png")


def test_label_ids_read_only_as_read_and_train_ids_writable_once_checked(tmp_path):
    # read_label_ids hands out Pillow's decoded bytes without a copy; what leaves the dataset is writable.
    values = np.array([[0, 7, 18], [255, 3, 1]], dtype=np.uint8)
    write_png_atomic(tmp_path / "l_labelTrainIds.png", values)
    raw = read_label_ids(tmp_path / "l_labelTrainIds.png")
    assert raw.tolist() == values.tolist() and not raw.flags.writeable
    checked = check_train_ids(raw, "l_labelTrainIds.png")
    assert checked.flags.writeable and checked.tolist() == values.tolist()
    ids = np.minimum(raw, 33)  # Cityscapes label ids: 0..33
    ids.setflags(write=False)
    assert ids_to_train_ids(ids, "l.png").flags.writeable


@pytest.mark.parametrize("shape", [(1052, 1914), (512, 512), (3, 7), (1,), (0, 4), (4097, 4097)])
def test_count_values_equals_bincount(shape):
    """OpenCV's histogram below 2**24 pixels, bincount above it (float32 counts would round), strided input."""
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    if x.size:
        x.reshape(-1)[: x.size // 3] = 255  # one bin far above the others
    assert count_values(x).dtype == np.int64
    np.testing.assert_array_equal(count_values(x), np.bincount(x.ravel(), minlength=256))
    if x.ndim == 2:
        np.testing.assert_array_equal(count_values(x[:, ::-2]), np.bincount(x[:, ::-2].ravel(), minlength=256))
    with pytest.raises(ValueError, match="uint8"):
        count_values(x.astype(np.int16))
