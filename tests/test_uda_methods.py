"""DAFormer and MIC (± SSR) on synthetic caches; reference constants; online SAM vs cached SAM."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from train_helpers import build_tiny_caches, read_metrics

from ssr_cache.data.label_space import CITYSCAPES
from ssr_train.methods.daformer import DAFormerConfig
from ssr_train.methods.mic import MICConfig
from ssr_train.methods.sam_features import SamFeatureSource
from ssr_train.models.model_factory import build_model
from ssr_train.models.segmentor import ssr_loss
from ssr_train.training.cached_views import CachedViewDataset, collate_views
from ssr_train.training.config import DataConfig, OptimConfig, TrainConfig
from ssr_train.training.engine import Trainer


@pytest.fixture(scope="module")
def caches(synth_root, tmp_path_factory):
    return build_tiny_caches(synth_root, tmp_path_factory.mktemp("uda_caches"))


def uda_cfg(src, tgt, out, method, *, ssr=True, iters=16) -> TrainConfig:
    cfg = TrainConfig().replace("model", backbone="mit_b0", backbone_checkpoint="none", ssr=ssr)
    cfg = cfg.replace("optim", warmup_iters=0, lr=3e-4)
    cfg = cfg.replace("data", source_cache=str(src), target_cache=str(tgt), workers=0)
    return cfg.replace("run", out=str(out), log_every=1, iters=iters, method=method)


@pytest.mark.parametrize("method, ssr", [("daformer", True), ("mic", True), ("daformer", False)])
def test_uda_method_runs_with_finite_losses_and_learns_the_source(caches, tmp_path, method, ssr):
    src, tgt = caches
    Trainer(uda_cfg(src, tgt, tmp_path / "run", method, ssr=ssr), progress=False).train()
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 16
    keys = {"loss_src", "loss_mix", "loss_fd", "pseudo_weight"} | ({"loss_mic"} if method == "mic" else set())
    keys |= {"loss_src_ssr", "loss_mix_ssr"} if ssr else set()
    assert keys <= set(metrics[0]) and ("loss_src_ssr" in metrics[0]) is ssr
    assert all(np.isfinite(v) for m in metrics for v in m.values())
    src_loss = [m["loss_src"] for m in metrics]
    assert np.mean(src_loss[-4:]) < 0.8 * np.mean(src_loss[:3])


def test_constants_are_the_reference_values():
    """DAFormer (configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py), MIC
    (configs/mic/gtaHR2csHR_mic_hrda.py: mask_block_size 64 at 1024 crops = 32 at 512), SSR (the same
    DAFormer/MIC schedule with the SAM regulariser)."""
    assert dataclasses.asdict(DAFormerConfig()) == {
        "ema_alpha": 0.999, "pseudo_threshold": 0.968, "pseudo_ignore_top": 15, "pseudo_ignore_bottom": 120,
        "color_jitter_strength": 0.2, "color_jitter_prob": 0.2, "blur": True, "fd_lambda": 0.005,
        "fd_classes": None, "fd_scale_min_ratio": 0.75, "rcs_temperature": 0.01, "rcs_min_pixels": 3000,
        "rcs_min_crop_ratio": 0.5,
    }
    assert dataclasses.asdict(MICConfig()) == {"block_size": 32, "mask_ratio": 0.7, "loss_weight": 1.0}
    # FD's default classes: the label space's things, which for Cityscapes are the reference's train ids
    assert CITYSCAPES.indices(CITYSCAPES.thing_classes) == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    o = OptimConfig()
    assert (o.lr, o.head_lr_mult, o.weight_decay, o.betas, o.warmup_iters, o.warmup_ratio, o.power, o.min_lr) == \
        (6e-5, 10.0, 0.01, (0.9, 0.999), 1500, 1e-6, 1.0, 0.0)
    assert DataConfig().batch_size == 2 and TrainConfig().run.iters == 40000
    m = TrainConfig().model
    assert (m.backbone, m.ssr, m.ssr_stages, m.head_embed_dim, m.sam_source) == \
        ("mit_b5", True, (0, 1, 2, 3), 256, "cache")


def test_every_constant_is_overridable_from_toml(caches, tmp_path):
    from ssr_train.training.config import load_config

    toml = tmp_path / "c.toml"
    toml.write_text("[daformer]\npseudo_threshold = 0.9\nfd_classes = ['person', 'car']\n[mic]\nblock_size = 16\n"
                    "[optim]\nlr = 1e-4\n")
    cfg = load_config(toml)
    daformer, mic = cfg.section("daformer"), cfg.section("mic")
    assert daformer.pseudo_threshold == 0.9 and mic.block_size == 16 and daformer.fd_classes == ("person", "car")
    assert cfg.optim.lr == 1e-4 and daformer.ema_alpha == 0.999
    # a run saved before each method owned its config ([uda], FD classes as train ids) still loads
    legacy = tmp_path / "legacy.toml"
    legacy.write_text("[uda]\npseudo_threshold = 0.9\nmic_block_size = 16\nfd_classes = [11, 13]\n")
    old = load_config(legacy)
    assert old.section("daformer").pseudo_threshold == 0.9 and old.section("mic").block_size == 16
    assert old.section("daformer").fd_classes == ("person", "car")


def test_online_sam_and_cached_sam_give_the_same_source_loss(caches):
    src, _ = caches
    ds = CachedViewDataset(str(src), levels=["l16"])
    batch = collate_views([ds[i] for i in range(4)])
    torch.manual_seed(0)
    model = build_model(TrainConfig().replace("model", backbone="mit_b0").model, num_classes=19).eval()
    online = SamFeatureSource("l16", online=True, encoder_name="vit_tiny", seed=0)
    cached = SamFeatureSource("l16")
    with torch.no_grad():
        sam_online = online.source(batch)
        sam_cached = cached.source(batch)
        loss_online = ssr_loss(model.forward_train(batch["img"], sam=sam_online), batch["label"])
        loss_cached = ssr_loss(model.forward_train(batch["img"], sam=sam_cached), batch["label"])
    # The cache stores fp16; everything else is the same computation on the same pixels.
    torch.testing.assert_close(sam_online, sam_cached, rtol=2e-3, atol=2e-3)
    assert float(loss_online["loss_enhanced"]) == pytest.approx(float(loss_cached["loss_enhanced"]), rel=1e-4)
    assert float(loss_online["loss_shadow"]) == float(loss_cached["loss_shadow"])


def test_flip_moves_pixels_labels_and_features_together(caches):
    src, _ = caches
    plain = CachedViewDataset(str(src), levels=["l16"])
    flipping = CachedViewDataset(str(src), levels=["l16"], flip=True)
    seed = next(s for s in range(100) if np.random.default_rng(s).random() < 0.5)  # a seed that flips
    a, b = plain[(3, seed)], flipping[(3, seed)]
    assert torch.equal(b["img"], a["img"].flip(-1)) and torch.equal(b["label"], a["label"].flip(-1))
    assert torch.equal(b["sam"]["l16"], a["sam"]["l16"].flip(-1))
