from __future__ import annotations

import numpy as np
import pytest
from layout_fixtures import expected_counts, image, label_ids, make_cityscapes, make_gta5, write_gta5_sample

from ssr_cache.data.class_stats import compute_class_counts
from ssr_cache.data.datasets import open_dataset
from ssr_cache.errors import SSRError


def test_counts_are_exact_for_the_fixtures(tmp_path):
    make_gta5(tmp_path, n=3)
    ds = open_dataset("gta5", tmp_path)
    c = compute_class_counts(ds, workers=1, progress=False)
    sample_ids, counts, n_resized = c.sample_ids, c.counts, c.n_resized
    assert c.ignored.tolist() == [1, 1, 1] and c.unlisted.tolist() == [0, 0, 0]
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

    c1 = compute_class_counts(gta_ds, workers=1, progress=False)
    c2 = compute_class_counts(gta_ds, workers=2, progress=True)
    single, multi = (c1.sample_ids, c1.counts, c1.n_resized), (c2.sample_ids, c2.counts, c2.n_resized)
    assert single[0] == multi[0] == ["00001", "00002", "00003", "00004", "00005"]
    assert np.array_equal(single[1], multi[1])
    assert single[2] == multi[2] == 1
    assert multi[1][4].tolist() == [768 - 24] + [0] * 12 + [24] + [0] * 5
    assert np.array_equal(multi[1][:4], np.stack([expected_counts(k) for k in range(4)]))

    city = compute_class_counts(ds, workers=2, progress=False)
    assert np.array_equal(city.counts, np.stack([expected_counts(k) for k in range(4)]))


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
