"""`ssr train`: flags override the TOML config, which overrides the reference defaults."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ssr_cache.errors import SSRError
from ssr_cli.parsing import parse_int_list

console = Console()

# flag name → (config section, field)
FLAG_TO_FIELD = {
    "method": ("run", "method"), "iters": ("run", "iters"), "seed": ("run", "seed"), "out": ("run", "out"),
    "device": ("run", "device"), "amp": ("run", "amp"), "log_every": ("run", "log_every"),
    "checkpoint_every": ("run", "checkpoint_every"), "val_every": ("run", "val_every"),
    "val_data_root": ("run", "val_data_root"),
    "backbone": ("model", "backbone"), "backbone_checkpoint": ("model", "backbone_checkpoint"),
    "ssr": ("model", "ssr"), "ssr_stages": ("model", "ssr_stages"), "ssr_key_level": ("model", "ssr_key_level"),
    "sam_source": ("model", "sam_source"), "sam": ("model", "sam_encoder"),
    "sam_checkpoint": ("model", "sam_checkpoint"),
    "lr": ("optim", "lr"), "warmup_iters": ("optim", "warmup_iters"), "grad_clip": ("optim", "grad_clip"),
    "source_cache": ("data", "source_cache"), "target_cache": ("data", "target_cache"),
    "batch_size": ("data", "batch_size"), "workers": ("data", "workers"),
}


def resolve_train_config(flags: dict, *, config_file: Path | None, resume: bool):
    from ssr_train.training.config import TrainConfig, load_config

    run_dir = Path(flags["out"]) if flags.get("out") else None
    if resume:
        if run_dir is None:
            raise SSRError("--resume needs --out RUN_DIR")
        cfg = load_config(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else None
        if cfg is None:
            raise SSRError(f"--resume: {run_dir} has no config.toml")
    else:
        cfg = load_config(config_file) if config_file else TrainConfig()
    for flag, value in flags.items():
        if value is None:
            continue
        section, field = FLAG_TO_FIELD[flag]
        if flag == "ssr_stages":
            value = parse_int_list(value, what="--ssr-stages")
        cfg = cfg.replace(section, **{field: str(value) if isinstance(value, Path) else value})
    return cfg


def train(
    method: str = typer.Option(None, help="source-only, daformer or mic."),
    source_cache: str = typer.Option(None, "--source-cache", help="Labelled source feature store."),
    target_cache: str = typer.Option(None, "--target-cache", help="Unlabelled target feature store."),
    out: Path = typer.Option(None, help="Run directory."),
    config: Path = typer.Option(None, "--config", help="TOML config (flags override it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly."),
    backbone: str = typer.Option(None, help="mit_b0…mit_b5 or any timm features_only model."),
    backbone_checkpoint: Path = typer.Option(None, "--backbone-checkpoint", help="ImageNet mit_b*.pth (mmseg)."),
    ssr: bool = typer.Option(None, "--ssr/--no-ssr", help="SAM cross-attention regulariser (default on)."),
    ssr_stages: str = typer.Option(None, help="Backbone stages regularised, e.g. 0,1,2,3."),
    ssr_key_level: int = typer.Option(None, help="Stored SAM level (grid size) keys/values come from."),
    sam_source: str = typer.Option(None, help="cache (default) or online (reference: SAM in the loop)."),
    sam: str = typer.Option(None, help="SAM encoder for --sam-source online."),
    sam_checkpoint: Path = typer.Option(None, "--sam-checkpoint", help="SAM checkpoint for online mode."),
    iters: int = typer.Option(None, help="Training iterations (reference 40000)."),
    batch_size: int = typer.Option(None, help="Views per batch per process (reference 2)."),
    lr: float = typer.Option(None, help="Backbone learning rate (reference 6e-5; head x10)."),
    warmup_iters: int = typer.Option(None, help="Linear warmup iterations (reference 1500)."),
    grad_clip: float = typer.Option(None, help="Clip the gradient norm."),
    seed: int = typer.Option(None, help="Random seed."),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 …"),
    amp: str = typer.Option(None, help="bf16, fp16 or fp32 (CUDA only)."),
    workers: int = typer.Option(None, help="DataLoader workers per stream."),
    log_every: int = typer.Option(None, help="Iterations between metric lines."),
    checkpoint_every: int = typer.Option(None, help="Iterations between checkpoints."),
    val_every: int = typer.Option(None, help="Iterations between target-val evaluations."),
    val_data_root: Path = typer.Option(None, "--val-data-root", help="Cityscapes root for periodic val mIoU."),
) -> None:
    """Train a segmenter (source-only, DAFormer, MIC; ± SSR) from feature caches. SAM is never loaded
    unless --sam-source online."""
    from ssr_train.training.engine import Trainer

    flags = {k: v for k, v in locals().items() if k in FLAG_TO_FIELD}
    cfg = resolve_train_config(flags, config_file=config, resume=resume)
    result = Trainer(cfg, resume=resume, console=console).train()
    losses = ", ".join(f"{k} {v:.4f}" for k, v in result.last_losses.items() if k.startswith("loss"))
    console.print(f"trained {result.iters} iterations → {result.run_dir} (model.pth: shadow branch only); {losses}")
