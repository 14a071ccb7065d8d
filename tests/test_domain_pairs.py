"""Every benchmark pair end to end on synthetic data in the real layouts: build → tiny train → eval for
SYNTHIA→Cityscapes, Cityscapes→ACDC, Cityscapes→Dark Zurich and a 3-class folder→folder; the stores'
facts (`ssr cache info --json`), `ssr data stats --json`, and the bad inputs of a build (one line, exit 2,
nothing written). One module fixture builds everything once (tiny: 64² crops, vit_tiny, mit_b0)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cache_helpers import run_ssr
from train_helpers import tiny_train_args
from typer.testing import CliRunner

from ssr_cache.data.class_stats import compute_class_counts
from ssr_cache.data.datasets import open_dataset
from ssr_cache.data.synthetic import synthesize
from ssr_cache.errors import SSRError
from ssr_cache.store.feature_store import FeatureStore
from ssr_cli.app import app
from ssr_train.uda.rare_class_sampling import RareClassSampler

TINY = ["--sam", "vit_tiny", "--crop", "64", "--resize", "64", "--views-per-image", "2", "--views-per-shard", "4",
        "--batch-size", "4", "--workers", "0"]
# store name → (dataset, root name in the synthetic output, extra build flags)
STORES = {
    "synthia": ("synthia", "synthia", []),
    "cs_target": ("cityscapes", "cityscapes", []),
    "cs_source": ("cityscapes", "cityscapes", ["--labelled"]),
    "acdc": ("acdc", "acdc", []),
    "dz": ("dark_zurich", "dark_zurich", ["--conditions", "night,twilight"]),
    "folder_src": ("folder", "folder_source", []),
    "folder_tgt": ("folder", "folder_target", ["--unlabelled"]),
}
# pair → (source store, target store, eval dataset, eval root name)
PAIRS = {
    "synthia2cs": ("synthia", "cs_target", "cityscapes", "cityscapes"),
    "cs2acdc": ("cs_source", "acdc", "acdc", "acdc"),
    "cs2dz": ("cs_source", "dz", "dark_zurich", "dark_zurich"),
    "folder2folder": ("folder_src", "folder_tgt", "folder", "folder_target"),
}


def ssr(*args: str) -> str:
    """Run the CLI in-process (no interpreter start-up per call); returns stdout."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("pairs")
    synth = synthesize(work / "data", train=4, val=2, size=(64, 64), seed=7, progress=False,
                       layouts=("cityscapes", "synthia", "acdc", "dark_zurich", "folder"))
    roots = {**synth.roots}
    stores, printed = {}, {}
    for name, (dataset, root, extra) in STORES.items():
        stores[name] = work / f"{name}.zarr"
        printed[name] = ssr("cache", "build", "--dataset", dataset, "--data-root", str(roots[root]), "--out", str(stores[name]),
            *TINY, *extra)
    runs = {}
    for pair, (src, tgt, dataset, root) in PAIRS.items():
        runs[pair] = work / pair
        ssr(*tiny_train_args(stores[src], runs[pair], "--method", "daformer", "--iters", "2", "--no-ssr",
                             "--target-cache", str(stores[tgt])))
        ssr("eval", "--run", str(runs[pair]), "--dataset", dataset, "--data-root", str(roots[root]),
            "--split", "val", "--workers", "0")
    return {"roots": roots, "stores": stores, "runs": runs, "work": work, "printed": printed}


def test_stores_record_dataset_role_and_label_space(world):
    facts = {name: json.loads(ssr("cache", "info", "--json", str(path))) for name, path in world["stores"].items()}
    labelled = {name: f["labelled"] for name, f in facts.items()}
    assert labelled == {"synthia": True, "cs_target": False, "cs_source": True, "acdc": False, "dz": False,
                        "folder_src": True, "folder_tgt": False}
    assert facts["synthia"]["label_space"]["subsets"]["miou13"][:3] == ["road", "sidewalk", "building"]
    assert len(facts["synthia"]["label_space"]["present"]) == 16
    assert facts["folder_src"]["label_space"]["class_names"] == ["ground", "structure", "agent"]
    assert facts["dz"]["conditions"] == ["night", "twilight"] and facts["dz"]["n_images"] == 2
    assert facts["acdc"]["n_images"] == 4 and facts["cs_source"]["resize"] == [32768, 64]
    for f in facts.values():
        assert f["encoder"]["name"] == "vit_tiny" and f["encoder"]["random_init"]
        assert f["crop"] == [64, 64] and f["total_stored_bytes"] > 0
    store = FeatureStore.open(world["stores"]["folder_src"])
    assert store.layout.num_classes == 3 and store.class_counts().shape == (store.n_views, 3)


def test_build_reports_unlisted_label_values(world):
    stats = compute_class_counts(open_dataset("folder", world["roots"]["folder_source"]), workers=1, progress=False)
    assert f"{int(stats.unlisted.sum())} label pixels hold values the label table does not list" in \
        " ".join(world["printed"]["folder_src"].split())
    assert "does not list" not in world["printed"]["synthia"]


def test_an_unlabelled_store_is_refused_as_source(world, tmp_path):
    result = CliRunner().invoke(app, tiny_train_args(world["stores"]["folder_tgt"], tmp_path / "run", "--iters", "1"))
    assert isinstance(result.exception, SSRError) and "is not a labelled source cache" in str(result.exception)
    assert not (tmp_path / "run" / "model.pth").exists()


def test_image_class_counts_are_the_full_resolution_counts(world):
    store = FeatureStore.open(world["stores"]["synthia"])
    ds = open_dataset("synthia", world["roots"]["synthia"])
    reference = compute_class_counts(ds, workers=1, progress=False).counts
    assert np.array_equal(store.image_class_counts(), reference)
    assert FeatureStore.open(world["stores"]["cs_target"]).image_class_counts() is None
    sampler = RareClassSampler.from_store(store, temperature=0.01, min_pixels=3000, min_crop_ratio=0.5)
    drawn = sampler.draw(np.random.default_rng(0), 50)
    assert drawn.min() >= 0 and drawn.max() < store.n_views
    assert not sampler.class_probs[[9, 14, 16]].any()  # terrain, truck, train: not in SYNTHIA


def _eval(world, pair: str) -> dict:
    dataset = PAIRS[pair][2]
    return json.loads((world["runs"][pair] / "eval" / f"{dataset}-val.json").read_text())


def test_every_pair_trains_and_evaluates(world):
    for pair in PAIRS:
        data = _eval(world, pair)
        assert 0 <= data["miou"] <= 100 and data["n_images"] >= 1, pair
    for pair in ("synthia2cs", "cs2acdc", "cs2dz"):
        assert len(_eval(world, pair)["per_class"]) == 19
    # the 3-class folder pair: the model has 3 outputs (from the stores) and is scored on 3 classes
    assert list(_eval(world, "folder2folder")["per_class"]) == ["ground", "structure", "agent"]


def test_label_spaces_that_differ_are_one_line_naming_both(world, tmp_path):
    src, tgt = world["stores"]["folder_src"], world["stores"]["cs_target"]
    result = CliRunner().invoke(app, tiny_train_args(src, tmp_path / "run", "--method", "daformer", "--iters", "1",
                                                     "--target-cache", str(tgt)))
    assert isinstance(result.exception, SSRError), result.output
    message = str(result.exception)
    assert str(src) in message and str(tgt) in message and "\n" not in message
    assert not (tmp_path / "run" / "model.pth").exists()


def test_synthia_to_cityscapes_reports_miou16_and_miou13(world):
    data = _eval(world, "synthia2cs")
    iou = data["per_class"]
    for key, names in (("miou16", 16), ("miou13", 13)):
        subset = dict(FeatureStore.open(world["stores"]["synthia"]).label_space.subsets)[key]
        assert len(subset) == names
        valid = [iou[n] for n in subset if iou[n] is not None]
        assert data[key] == pytest.approx(sum(valid) / len(valid), abs=1e-6)
    assert "miou16" not in _eval(world, "cs2acdc")


def test_data_stats_json(world):
    out = ssr("data", "stats", "--json", "--dataset", "folder", "--data-root", str(world["roots"]["folder_target"]),
              "--split", "val", "--workers", "1")
    stats = json.loads(out)
    assert set(stats) >= {"dataset", "split", "n_images", "class_names", "pixels_per_class", "ignored_pixels"}
    assert stats["n_images"] == 2 and stats["class_names"] == ["ground", "structure", "agent"]
    assert sum(stats["pixels_per_class"]) + stats["ignored_pixels"] == 2 * 64 * 64


BAD_BUILDS = [
    (["--dataset", "synthia", "--data-root", "{root}/folder_source"], "no synthia images found"),
    (["--dataset", "folder", "--data-root", "{root}/dark_zurich"], r"classes\.toml not found"),
    (["--dataset", "acdc", "--data-root", "{root}/acdc", "--conditions", "fog,haze"], "acdc has no condition 'haze'"),
    (["--dataset", "acdc", "--data-root", "{root}/cityscapes"], "is not an ACDC root"),
    (["--dataset", "dark_zurich", "--data-root", "{root}/acdc"], "is not a Dark Zurich root"),
    (["--dataset", "dark_zurich", "--data-root", "{root}/dark_zurich", "--labelled"], "no label for image"),
    (["--dataset", "sinthia", "--data-root", "{root}/synthia"], "unknown dataset 'sinthia'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_BUILDS)
def test_bad_builds_are_one_line_and_write_nothing(world, args, message):
    out = world["work"] / "never.zarr"
    args = [a.format(root=world["work"] / "data") for a in args]
    result = CliRunner().invoke(app, ["cache", "build", *args, "--out", str(out), *TINY])
    assert isinstance(result.exception, SSRError), result.output
    assert re.search(message, str(result.exception)) and "\n" not in str(result.exception)
    assert not out.exists()


def test_folder_source_without_labels_exits_2_without_traceback(world, tmp_path):
    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    (root / "classes.toml").write_text('names = ["a", "b"]\n')
    (root / "images" / "x.jpg").write_bytes(
        (world["roots"]["folder_source"] / "images" / "train" / "scene_0" / "0000.jpg").read_bytes())
    result = run_ssr("cache", "build", "--dataset", "folder", "--data-root", str(root), "--labelled",
                     "--out", str(tmp_path / "c.zarr"), *TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: no label for image" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.zarr").exists()


def test_a_folder_with_the_cityscapes_classes_is_a_cityscapes_target(world, tmp_path):
    # Domain generalisation: a BDD/Mapillary-style folder mapped to the 19 classes, evaluated like Cityscapes.
    from PIL import Image

    from ssr_cache.data.label_space import CITYSCAPES

    cs = open_dataset("cityscapes", world["roots"]["cityscapes"], "val")
    names = ", ".join(f'"{n}"' for n in CITYSCAPES.class_names)
    (tmp_path / "classes.toml").write_text(f"names = [{names}]\n")
    for i, item in enumerate(cs.items):
        (tmp_path / "images" / "val").mkdir(parents=True, exist_ok=True)
        Image.open(item.image).convert("RGB").save(tmp_path / "images" / "val" / f"{i}.jpg", quality=98)
        (tmp_path / "labels" / "val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(cs.load_label(i)).save(tmp_path / "labels" / "val" / f"{i}.png")
    ssr("eval", "--run", str(world["runs"]["synthia2cs"]), "--dataset", "folder", "--data-root", str(tmp_path),
        "--split", "val", "--workers", "0")
    data = json.loads((world["runs"]["synthia2cs"] / "eval" / "folder-val.json").read_text())
    assert list(data["per_class"]) == list(CITYSCAPES.class_names) and data["n_images"] == len(cs)
