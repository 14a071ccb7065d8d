"""Training config (TOML round trip, clear errors) and the optimiser recipe (groups, poly + warmup)."""

import re
from pathlib import Path

import pytest
import tomllib
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

    model = build_model(TrainConfig().replace("model", backbone="mit_b0").model, num_classes=19)
    opt = build_optimizer(model, OptimConfig())
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert {lr_of[id(p)] for n, p in named.items() if n.startswith("regularizer.")} == {6e-5}
    assert {round(lr_of[id(p)], 12) for n, p in named.items() if n.startswith("head.")} == {6e-4}


@pytest.mark.parametrize("toml, message", [
    ('[optim]\nlr = "fast"', "optim.lr = 'fast': expected a number"),
    ("[optim]\nlr = nan", "optim.lr = nan: expected a finite number"),
    ("[optim]\nlr = inf", "optim.lr = inf: expected a finite number"),
    ("[optim]\nlr = -1", "optim.lr = -1: must be > 0.0"),
    ("[run]\niters = 0", "run.iters = 0: must be > 0"),
    ("[run]\niters = 1.5", "run.iters = 1.5: expected an integer"),
    ("[run]\nlog_every = 0", "run.log_every = 0: must be > 0"),
    ('[run]\namp = "fp8"', "run.amp = 'fp8': choose one of bf16, fp16, fp32"),
    ('[run]\ndevice = "gpu"', "run.device = 'gpu': use auto, cpu, cuda or cuda:N"),
    ('[run]\nmethod = "dacs"', "run.method = 'dacs': choose one of source-only, daformer, mic"),
    ("[model]\nssr_stages = [0, 9]", "model.ssr_stages = [0, 9]: must be <= 3"),
    ('[model]\nsam_source = "foo"', "model.sam_source = 'foo': choose one of cache, online"),
    ("[model]\nssr = 1", "model.ssr = 1: expected true or false"),
    ("[data]\nworkers = -1", "data.workers = -1: must be >= 0"),
    ("[data]\nbatch_size = 0", "data.batch_size = 0: must be > 0"),
    ("[daformer]\npseudo_threshold = 2.0", "daformer.pseudo_threshold = 2.0: must be <= 1.0"),
    ("[mic]\nmask_ratio = -0.1", "mic.mask_ratio = -0.1: must be >= 0.0"),
    ("[optim]\nlearning_rate = 1e-4", "unknown key(s) in [optim]: learning_rate"),
])
def test_every_setting_is_validated_with_its_name_and_value(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(SSRError) as info:
        load_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_set_reaches_every_key_and_is_validated():
    from ssr_train.training.config import resolve_config

    cfg = resolve_config(sets=["daformer.pseudo_threshold=0.9", "mic.block_size=16", "model.backbone=mit_b0",
                               "model.ssr_stages=[1, 2]", "run.amp=bf16", 'daformer.fd_classes=["car"]'])
    assert cfg.section("daformer").pseudo_threshold == 0.9 and cfg.section("mic").block_size == 16
    assert cfg.model.backbone == "mit_b0" and cfg.model.ssr_stages == (1, 2) and cfg.run.amp == "bf16"
    assert cfg.section("daformer").fd_classes == ("car",)
    # flags sit between the file and --set; --set wins
    assert resolve_config(flags={"optim.lr": 1e-3}, sets=["optim.lr=2e-3"]).optim.lr == 2e-3
    for bad, message in [("optim.lr=abc", "optim.lr = 'abc': expected a number"),
                         ("optim", "expected section.key=value"), ("optimizer.lr=1", "unknown config section"),
                         ("optim.lrr=1", "unknown key(s) in [optim]: lrr")]:
        with pytest.raises(SSRError, match=re.escape(message)):
            resolve_config(sets=[bad])


def test_print_config_and_help_show_the_resolved_values_and_defaults(tmp_path):
    from typer.testing import CliRunner

    from ssr_cli.app import app

    result = CliRunner().invoke(app, ["train", "--print-config", "--lr", "1e-4", "--set", "mic.mask_ratio=0.5",
                                      "--source-cache", "rel/src.zarr"])
    assert result.exit_code == 0, result.output
    printed = tomllib.loads(result.output)
    assert printed["optim"]["lr"] == 1e-4 and printed["mic"]["mask_ratio"] == 0.5
    assert printed["run"]["device"] == "auto" and printed["daformer"]["pseudo_threshold"] == 0.968
    assert Path(printed["data"]["source_cache"]).is_absolute()  # a run works from any working directory
    assert config_from_dict(printed) == config_from_dict(printed)  # the output is a loadable config
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output.split())
    assert "optim.lr, default 6e-05" in help_text and "run.device, default auto" in help_text and "--set" in help_text
