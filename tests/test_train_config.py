"""Training config (TOML round trip, clear errors) and the optimiser recipe (groups, poly + warmup)."""

import pytest
import torch

from ssr_cache.errors import SSRError
from ssr_train.training.config import OptimConfig, TrainConfig, config_from_dict, load_config, save_config
from ssr_train.training.optim import build_optimizer, poly_lr


def test_toml_round_trip_keeps_every_value(tmp_path):
    cfg = TrainConfig().replace("model", backbone="mit_b0", ssr_stages=(0, 2)).replace("run", iters=123)
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_unknown_keys_and_sections_are_refused(tmp_path):
    with pytest.raises(SSRError, match="unknown key.*lrr"):
        config_from_dict({"optim": {"lrr": 1.0}})
    with pytest.raises(SSRError, match="unknown config section.*optimizer"):
        config_from_dict({"optimizer": {}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=")
    with pytest.raises(SSRError, match="cannot parse config"):
        load_config(bad)


def test_poly_schedule_with_linear_warmup_matches_mmcv():
    cfg = OptimConfig()
    assert poly_lr(0, 40000, cfg) == pytest.approx(6e-5 * 1e-6)
    # mmcv: warmup_lr = regular * (1 - (1 - it/warmup) * (1 - ratio))
    regular = 6e-5 * (1 - 750 / 40000)
    assert poly_lr(750, 40000, cfg) == pytest.approx(regular * (1 - 0.5 * (1 - 1e-6)))
    assert poly_lr(1500, 40000, cfg) == pytest.approx(6e-5 * (1 - 1500 / 40000))
    assert poly_lr(20000, 40000, cfg) == pytest.approx(3e-5)
    assert poly_lr(40000, 40000, cfg) == 0.0


def test_param_groups_head_lr_x10_and_no_decay_on_norms():
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.fc = torch.nn.Linear(4, 4)
    model.backbone.norm1 = torch.nn.LayerNorm(4)
    model.head = torch.nn.Module()
    model.head.fc = torch.nn.Linear(4, 2)
    model.head.bn = torch.nn.BatchNorm1d(2)  # mmcv's 'bn' does not match the 'norm' key: it decays
    opt = build_optimizer(model, OptimConfig())
    groups = {(round(g["lr"], 12), g["weight_decay"]): sum(p.numel() for p in g["params"])
              for g in opt.param_groups}
    assert groups == {(6e-5, 0.01): 20, (6e-5, 0.0): 8, (6e-4, 0.01): 10 + 4}


def test_ssr_regulariser_trains_at_the_base_lr_as_in_the_reference():
    from ssr_train.models.model_factory import build_model

    model = build_model(TrainConfig().replace("model", backbone="mit_b0").model)
    opt = build_optimizer(model, OptimConfig())
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert {lr_of[id(p)] for n, p in named.items() if n.startswith("regularizer.")} == {6e-5}
    assert {round(lr_of[id(p)], 12) for n, p in named.items() if n.startswith("head.")} == {6e-4}
