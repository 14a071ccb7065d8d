"""`ssr train`: the reference defaults, then --config FILE.toml, then flags, then --set section.key=value."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssr_cli.parsing import parse_int_list
from ssr_train.training.config import config_toml, setting_help
from ssr_train.training.engine import Trainer
from ssr_train.training.run_folder import resolve_run_config

console = Console()


def _opt(key: str, *names: str) -> typer.Option:
    """A flag for config key `section.key`, its help (and default) taken from the config."""
    return typer.Option(None, *names, help=setting_help(*key.split(".")), show_default=False)


def train(
    method: str = _opt("run.method", "--method"),
    source_cache: str = _opt("data.source_cache", "--source-cache"),
    target_cache: str = _opt("data.target_cache", "--target-cache"),
    out: Path = _opt("run.out", "--out"),
    config: Path = typer.Option(None, "--config", help="TOML config (flags and --set override it)."),
    set_: list[str] = typer.Option(None, "--set", help="section.key=value, repeatable; reaches every key "
                                   "(see --print-config), e.g. --set daformer.pseudo_threshold=0.9."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config (TOML), exit."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly (settings that "
                                "would change the result are refused)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run files already in --out."),
    backbone: str = _opt("model.backbone", "--backbone"),
    backbone_checkpoint: str = _opt("model.backbone_checkpoint", "--backbone-checkpoint"),
    ssr: bool = typer.Option(None, "--ssr/--no-ssr", help=setting_help("model", "ssr"), show_default=False),
    ssr_stages: str = _opt("model.ssr_stages", "--ssr-stages"),
    ssr_key_level: int = _opt("model.ssr_key_level", "--ssr-key-level"),
    sam_source: str = _opt("model.sam_source", "--sam-source"),
    sam: str = _opt("model.sam_encoder", "--sam"),
    sam_checkpoint: Path = _opt("model.sam_checkpoint", "--sam-checkpoint"),
    iters: int = _opt("run.iters", "--iters"),
    batch_size: int = _opt("data.batch_size", "--batch-size"),
    lr: float = _opt("optim.lr", "--lr"),
    warmup_iters: int = _opt("optim.warmup_iters", "--warmup-iters"),
    grad_clip: float = _opt("optim.grad_clip", "--grad-clip"),
    seed: int = _opt("run.seed", "--seed"),
    device: str = _opt("run.device", "--device"),
    threads: int = _opt("run.threads", "--threads"),
    amp: str = _opt("run.amp", "--amp"),
    workers: int = _opt("data.workers", "--workers"),
    log_every: int = _opt("run.log_every", "--log-every"),
    checkpoint_every: int = _opt("run.checkpoint_every", "--checkpoint-every"),
    val_every: int = _opt("run.val_every", "--val-every"),
    val_data_root: Path = _opt("run.val_data_root", "--val-data-root"),
) -> None:
    """Train a segmenter (source-only, DAFormer, MIC; ± SSR) from feature caches. SAM is never loaded
    unless --sam-source online."""
    flags = {
        "run.method": method, "run.out": out, "run.iters": iters, "run.seed": seed, "run.device": device,
        "run.threads": threads, "run.amp": amp, "run.log_every": log_every,
        "run.checkpoint_every": checkpoint_every, "run.val_every": val_every, "run.val_data_root": val_data_root,
        "model.backbone": backbone, "model.backbone_checkpoint": backbone_checkpoint, "model.ssr": ssr,
        "model.ssr_stages": parse_int_list(ssr_stages, what="--ssr-stages") if ssr_stages else None,
        "model.ssr_key_level": ssr_key_level, "model.sam_source": sam_source, "model.sam_encoder": sam,
        "model.sam_checkpoint": sam_checkpoint,
        "optim.lr": lr, "optim.warmup_iters": warmup_iters, "optim.grad_clip": grad_clip,
        "data.source_cache": source_cache, "data.target_cache": target_cache, "data.batch_size": batch_size,
        "data.workers": workers,
    }
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
    cfg = resolve_run_config(out=out, resume=resume, config_file=config, flags=flags, sets=set_ or [])
    if print_config:
        console.print(config_toml(cfg), markup=False, highlight=False, end="")
        return
    result = Trainer(cfg, resume=resume, overwrite=overwrite, console=console).train()
    if result.is_main and not result.already_finished:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in result.last_losses.items() if k.startswith("loss"))
        console.print(f"trained {result.iters} iterations → {result.run_dir} (model.pth: shadow branch only); "
                      f"{losses}", highlight=False)
