"""The training loop: data streams, optimiser + poly schedule, AMP, DDP gradient averaging,
JSONL metrics (+ TensorBoard when installed), atomic checkpoints, exact resume, NaN guard."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ssr_cache.distributed import rank_device, rank_info
from ssr_cache.errors import SSRError
from ssr_train.training.cached_views import (
    CachedViewDataset,
    ViewStreamSampler,
    batch_to_device,
    collate_views,
)
from ssr_train.training.checkpoint import load_checkpoint, save_atomic
from ssr_train.training.config import TrainConfig, save_config
from ssr_train.training.optim import build_optimizer, poly_lr, set_lr


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    iters: int
    last_losses: dict
    first_losses: dict


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """DDP-equivalent gradient averaging (one flat all-reduce): the methods call the model's
    forward_train, which DistributedDataParallel's hooks would not see."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_store_compat(source, target, cfg: TrainConfig) -> None:
    """Stores must be trainable together: labelled source, same encoder, crop and levels."""
    sfp = source.fingerprint
    if sfp.get("domain") != 0:
        raise SSRError(f"{cfg.data.source_cache} is not a labelled source cache (dataset {sfp.get('dataset')})")
    if target is None:
        return
    tfp = target.fingerprint
    for key in ("encoder", "crop", "levels", "feature_dtype"):
        if sfp.get(key) != tfp.get(key):
            raise SSRError(f"source and target caches disagree on {key}: {sfp.get(key)} vs {tfp.get(key)}")


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, console=None, progress: bool = True):
        from rich.console import Console

        self.cfg = cfg
        self.resume = resume
        self.console = console or Console()
        self.progress = progress
        ranks = rank_info()  # the same torchrun handling as the cache build
        self.rank, self.world = ranks.rank, ranks.world_size
        device = rank_device(cfg.run.device, ranks)  # torchrun: 'cuda' means this rank's GPU
        if device.startswith("cuda:") and self.world > 1:
            torch.cuda.set_device(device)
        self.device = torch.device(device)
        self.run_dir = Path(cfg.run.out)

    # ------------------------------------------------------------ setup

    def _open_data(self, start_iter: int):
        from ssr_cache.store.feature_store import FeatureStore

        cfg = self.cfg
        if not cfg.data.source_cache:
            raise SSRError("--source-cache is required")
        source = FeatureStore.open(cfg.data.source_cache, mode="r")
        target = FeatureStore.open(cfg.data.target_cache, mode="r") if cfg.data.target_cache else None
        check_store_compat(source, target, cfg)
        if source.done_mask().sum() < source.layout.n_views:
            raise SSRError(f"{cfg.data.source_cache} is not fully built; re-run `ssr cache build` to finish it")
        from ssr_train.models.model_factory import sam_level_name

        self.sam_level = sam_level_name(cfg.model, list(source.layout.levels)) if cfg.model.ssr else None
        # Online mode computes SAM tokens in the loop, so the stores' feature arrays are not read.
        levels = [self.sam_level] if self.sam_level and cfg.model.sam_source == "cache" else []
        self.sam_channels = source.layout.channels
        self.eval_resize = tuple((target or source).fingerprint["plan"]["resize"])
        loaders = {}
        for name, store, url in (("source", source, cfg.data.source_cache), ("target", target, cfg.data.target_cache)):
            if store is None:
                continue
            ds = CachedViewDataset(url, levels=levels, flip=cfg.data.flip,
                                   photometric=cfg.data.photometric and name == "source")
            sampler = ViewStreamSampler(len(ds), batch_size=cfg.data.batch_size,
                                        seed=cfg.run.seed + (0 if name == "source" else 1),
                                        rank=self.rank, world_size=self.world, start_iter=start_iter,
                                        draw=self.method_sampler_draw(name, store))
            loaders[name] = DataLoader(ds, batch_size=cfg.data.batch_size, sampler=sampler,
                                       num_workers=cfg.data.workers, collate_fn=collate_views,
                                       pin_memory=self.device.type == "cuda",
                                       # own generator: creating the iterator must not draw from the global
                                       # RNG, or a resumed run would be one draw off the uninterrupted one
                                       generator=torch.Generator().manual_seed(cfg.run.seed),
                                       persistent_workers=cfg.data.workers > 0)
        return source, target, loaders

    def method_sampler_draw(self, name: str, store):
        """Rare-class sampling of source views for the UDA methods (DAFormer RCS), from stored counts."""
        u = self.cfg.uda
        if name != "source" or self.cfg.run.method == "source-only" or not u.rcs_temperature:
            return None
        from ssr_train.uda.rare_class_sampling import RareClassSampler

        return RareClassSampler.from_store(store, temperature=u.rcs_temperature, min_pixels=u.rcs_min_pixels).draw

    def _build(self):
        from ssr_train.methods import METHODS
        from ssr_train.models.model_factory import build_model

        cfg = self.cfg
        if cfg.run.method not in METHODS:
            raise SSRError(f"unknown method {cfg.run.method!r}; choose one of {', '.join(METHODS)}")
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, sam_channels=self.sam_channels).to(self.device)
        method = METHODS[cfg.run.method](model, cfg, sam_level=self.sam_level).to(self.device)
        optimizer = build_optimizer(model, cfg.optim)
        return model, method, optimizer

    # ------------------------------------------------------------ checkpoints

    def _rng_state(self, method) -> dict:
        """This rank's random streams: the global ones and the method's own augmentation generator."""
        generator = getattr(method, "generator", None)
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                # this rank's GPU only: asking for every device's state would touch every GPU from every rank
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "method_generator": generator.get_state() if generator is not None else None}

    def _checkpoint_state(self, it: int, method, optimizer, losses: dict, rng_per_rank: list[dict]) -> dict:
        return {"iteration": it, "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank,
                "config": self.cfg.to_dict(), "losses": losses}

    def _save(self, it: int, method, optimizer, losses: dict) -> None:
        # Every rank's random streams differ (seeded seed + rank), so rank 0 collects them all: a resumed
        # N-rank run then continues each rank's augmentations and drop-path draws exactly.
        rng_per_rank = [self._rng_state(method)]
        if self.world > 1:
            rng_per_rank = [None] * self.world
            dist.all_gather_object(rng_per_rank, self._rng_state(method))
        if self.rank != 0:
            return
        save_atomic(self._checkpoint_state(it, method, optimizer, losses, rng_per_rank), self.run_dir / "latest.pth")
        export = {"state_dict": method.export_model().shadow_state_dict(), "config": self.cfg.to_dict(),
                  "iteration": it}
        save_atomic(export, self.run_dir / "model.pth")

    def _restore(self, ckpt: dict, method, optimizer) -> int:
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iteration = int(ckpt["iteration"])
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(per_rank) == self.world:
            self._set_rng_state(per_rank[self.rank], method)
        else:
            # Another world size: the streams cannot continue exactly; give each rank fresh, distinct ones.
            if self.rank == 0:
                self.console.print(f"[yellow]resuming a {len(per_rank)}-rank checkpoint on {self.world} ranks: "
                                   "training continues, but not bit-exactly as the original run would have")
            _seed_everything(self.cfg.run.seed + 1_000_003 * iteration + self.rank, self.cfg.run.deterministic)
            generator = getattr(method, "generator", None)
            if generator is not None:
                generator.manual_seed(int(torch.randint(2**62, ())))
        return iteration

    def _set_rng_state(self, rng: dict, method) -> None:
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            if isinstance(rng["cuda"], list):  # checkpoints before per-rank states held every device's
                torch.cuda.set_rng_state_all(rng["cuda"])
            else:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        generator = getattr(method, "generator", None)
        if generator is not None and rng.get("method_generator") is not None:
            generator.set_state(rng["method_generator"])

    # ------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if self.resume and not (self.run_dir / "latest.pth").is_file():
            raise SSRError(f"--resume: {self.run_dir} has no checkpoint (latest.pth)")
        if not self.resume and (self.run_dir / "latest.pth").is_file():
            raise SSRError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
        _seed_everything(cfg.run.seed + self.rank, cfg.run.deterministic)
        if self.resume:
            ckpt = load_checkpoint(self.run_dir / "latest.pth")  # read once: weights, optimiser and RNGs
            start = int(ckpt["iteration"])
        source, target, loaders = self._open_data(start)
        model, method, optimizer = self._build()
        if self.resume:
            start = self._restore(ckpt, method, optimizer)
            del ckpt
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.toml")
        if method.needs_target and "target" not in loaders:
            raise SSRError(f"--method {cfg.run.method} needs --target-cache")
        metrics = MetricsLog(self.run_dir, enabled=self.rank == 0, resume_from=start if self.resume else None)
        src_iter = iter(loaders["source"])
        tgt_iter = iter(loaders["target"]) if "target" in loaders else None
        params = [p for p in model.parameters() if p.requires_grad]
        autocast = self._autocast()
        first, losses = {}, {}
        bar = self._progress()
        t_last = t_start = time.perf_counter()
        try:
            if bar:
                bar.start()
                task = bar.add_task("train", total=cfg.run.iters, completed=start, info="", rate="")
            for it in range(start, cfg.run.iters):
                lr = poly_lr(it, cfg.run.iters, cfg.optim)
                set_lr(optimizer, lr)
                src = batch_to_device(next(src_iter), self.device)
                tgt = batch_to_device(next(tgt_iter), self.device) if tgt_iter is not None else None
                method.train()
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    losses = method.step(it, src, tgt)
                if not all(math.isfinite(v) for v in losses.values()):
                    bad = ", ".join(f"{k}={v}" for k, v in losses.items() if not math.isfinite(v))
                    raise SSRError(f"non-finite loss at iteration {it} ({bad}); stopped, the last good "
                                   f"checkpoint is {self.run_dir / 'latest.pth'}")
                if self.world > 1:
                    _average_gradients(params, self.world)
                if cfg.optim.grad_clip:
                    losses["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
                optimizer.step()
                first = first or dict(losses)
                done = it + 1
                if done % cfg.run.log_every == 0 or done == cfg.run.iters:
                    now = time.perf_counter()
                    metrics.write({"iter": done, "lr": lr, **losses,
                                   "sec_per_iter": (now - t_last) / min(cfg.run.log_every, done - start)})
                    t_last = now
                if done % cfg.run.checkpoint_every == 0 or done == cfg.run.iters:
                    self._save(done, method, optimizer, losses)
                if cfg.run.val_every and done % cfg.run.val_every == 0:
                    self._validate(method, done, metrics)
                if bar:
                    rate = (done - start) / max(time.perf_counter() - t_start, 1e-9)
                    bar.update(task, completed=done, rate=f"{rate:.2f} it/s",
                               info=" ".join(f"{k}={v:.3f}" for k, v in losses.items() if k.startswith("loss")))
        finally:
            if bar:
                bar.stop()
            metrics.close()
        return TrainResult(self.run_dir, cfg.run.iters, losses, first)

    def _validate(self, method, it: int, metrics) -> None:
        from ssr_cache.data.datasets import open_dataset
        from ssr_train.infer.evaluate import evaluate

        if self.rank != 0 or not self.cfg.run.val_data_root:
            return
        ds = open_dataset("cityscapes", self.cfg.run.val_data_root, split="val", require_labels=True)
        result = evaluate(method.export_model(), ds, resize=self.eval_resize, device=self.device,
                          workers=0, progress=False)
        method.train()
        metrics.write({"iter": it, "val_miou": result.miou})
        self.console.print(f"iter {it}: target val mIoU {result.miou:.2f}")

    def _autocast(self):
        amp = self.cfg.run.amp
        if self.device.type != "cuda" or amp == "fp32":
            return torch.autocast("cpu", enabled=False)
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)

    def _progress(self):
        if not self.progress or self.rank != 0:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn(f"[bold]{self.cfg.run.method}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), console=self.console)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard scalars when tensorboard is installed."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_from: int | None):
        self.enabled = enabled
        path = run_dir / "metrics.jsonl"
        if enabled and resume_from is not None and path.is_file():
            # Lines a killed run logged after its last checkpoint are replayed by the resumed run: drop them.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iter", 0) <= resume_from]
            path.write_text("".join(line + "\n" for line in kept))
        self.fh = open(path, "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["iter"])

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()
