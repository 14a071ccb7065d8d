from __future__ import annotations

import json

import numpy as np
import pytest
from layout_fixtures import expected_counts, image, label_ids, make_cityscapes, make_gta5, write_gta5_sample

from ssr_cache.data.class_stats import compute_class_counts, load_class_stats, write_class_stats
from ssr_cache.data.datasets import open_dataset
from ssr_cache.data.labels import CLASS_NAMES
from ssr_cache.errors import SSRError


def test_counts_are_exact_for_the_fixtures(tmp_path):
    make_gta5(tmp_path, n=3)
    ds = open_dataset("gta5", tmp_path)
    sample_ids, counts, n_resized = compute_class_counts(ds, workers=1, progress=False)
    assert sample_ids == ["00001", "00002", "00003"]
    assert counts.dtype == np.int64 and counts.shape == (3, 19)
    assert np.array_equal(counts, np.stack([expected_counts(k) for k in range(3)]))
    # by hand, sample 2: road 256, sky 255, person 64, car 192; one ignored pixel of 768
    assert counts[2].tolist() == [256, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 64, 0, 192, 0, 0, 0, 0, 0]
    assert int(counts.sum()) == 3 * (32 * 24 - 1)
    assert n_resized == 0


def test_multiprocess_equals_single_process_and_counts_resized_labels(tmp_path):
    make_cityscapes(tmp_path, split="val")
    ds = open_dataset("cityscapes", tmp_path, split="val")
    gta = tmp_path / "gta"
    make_gta5(gta, n=4)
    small = np.full((12, 16), 7, dtype=np.uint8)
    small[:2, :3] = 26  # 6 car pixels → 24 after resizing to 32x24
    write_gta5_sample(gta, "00005", image(0), small)
    gta_ds = open_dataset("gta5", gta)

    single = compute_class_counts(gta_ds, workers=1, progress=False)
    multi = compute_class_counts(gta_ds, workers=2, progress=True)
    assert single[0] == multi[0] == ["00001", "00002", "00003", "00004", "00005"]
    assert np.array_equal(single[1], multi[1])
    assert single[2] == multi[2] == 1
    assert multi[1][4].tolist() == [768 - 24] + [0] * 12 + [24] + [0] * 5
    assert np.array_equal(multi[1][:4], np.stack([expected_counts(k) for k in range(4)]))

    city = compute_class_counts(ds, workers=2, progress=False)
    assert np.array_equal(city[1], np.stack([expected_counts(k) for k in range(4)]))


def test_worker_errors_surface_as_one_ssr_error_line(tmp_path):
    make_gta5(tmp_path, n=3)
    bad = label_ids(0)
    bad[0, 0] = 99
    write_gta5_sample(tmp_path, "00002", image(1), bad)
    ds = open_dataset("gta5", tmp_path)
    for workers in (1, 2):
        with pytest.raises(SSRError, match=r"^\S*labels/00002\.png: label id 99 is not in the Cityscapes table") as info:
            compute_class_counts(ds, workers=workers, progress=False)
        assert info.value.__cause__ is None


def test_unlabelled_dataset_is_refused(tmp_path):
    make_cityscapes(tmp_path, split="train", labels=False)
    ds = open_dataset("cityscapes", tmp_path, split="train", require_labels=False)
    with pytest.raises(SSRError, match="cityscapes train has images without labels"):
        compute_class_counts(ds, workers=1, progress=False)


def test_write_and_load_roundtrip_with_documented_format(tmp_path):
    make_gta5(tmp_path / "data", n=3)
    ds = open_dataset("gta5", tmp_path / "data")
    sample_ids, counts, _ = compute_class_counts(ds, workers=1, progress=False)
    path = tmp_path / "out" / "stats.json"
    write_class_stats(path, "gta5", sample_ids, counts)
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]

    data = json.loads(path.read_text())
    assert data["format"] == "ssr-class-stats" and data["version"] == 1 and data["dataset"] == "gta5"
    assert data["num_classes"] == 19 and data["class_names"] == list(CLASS_NAMES) and data["num_images"] == 3
    assert data["total_pixels"] == counts.sum(axis=0).tolist()
    assert data["total_pixels"][0] == 768 and data["total_pixels"][11] == 96
    assert list(data["counts"]) == ["00001", "00002", "00003"]
    assert data["counts"]["00002"] == expected_counts(1).tolist()
    lines = path.read_text().splitlines()
    assert len(lines) == 14  # "{", 7 header keys, "counts": {, 3 rows, 2 closing braces
    assert lines[-3] == '    "00003": [256, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 64, 0, 192, 0, 0, 0, 0, 0]'

    stats = load_class_stats(path)
    assert stats.dataset == "gta5" and stats.sample_ids == sample_ids
    assert stats.counts.dtype == np.int64 and np.array_equal(stats.counts, counts)


def test_empty_stats_roundtrip(tmp_path):
    write_class_stats(tmp_path / "e.json", "cityscapes", [], np.zeros((0, 19), dtype=np.int64))
    stats = load_class_stats(tmp_path / "e.json")
    assert stats.sample_ids == [] and stats.counts.shape == (0, 19)


def test_bad_stats_files_name_the_file_and_writes_never_damage(tmp_path):
    good = tmp_path / "good.json"
    write_class_stats(good, "gta5", ["a"], np.arange(19)[None])
    before = good.read_text()
    with pytest.raises(ValueError):
        write_class_stats(good, "gta5", ["a", "b"], np.arange(19)[None])
    assert good.read_text() == before

    with pytest.raises(SSRError, match=r"missing\.json: class statistics file not found"):
        load_class_stats(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SSRError, match=r"junk\.json: not a readable class statistics file"):
        load_class_stats(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"format": "something"}')
    with pytest.raises(SSRError, match=r"other\.json: not an ssr class statistics file"):
        load_class_stats(tmp_path / "other.json")
    data = json.loads(before)
    data["counts"]["a"] = [1.5] * 19
    (tmp_path / "float.json").write_text(json.dumps(data))
    with pytest.raises(SSRError, match=r"float\.json: class counts must be lists of 19 non-negative integers"):
        load_class_stats(tmp_path / "float.json")
    data["counts"]["a"] = [1] * 18
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(SSRError, match=r"short\.json: class counts must be lists of 19"):
        load_class_stats(tmp_path / "short.json")
