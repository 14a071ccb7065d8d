"""The training loop, nanoGPT-style: lr, batch, method step, guard, optimiser step, log, checkpoint,
evaluate. The method does the algorithm (methods/contract.py); the engine names no method.

Around the loop: a run folder that is fresh or resumed exactly (run_folder.py), DDP gradient averaging,
AMP (fp16 with a dynamic loss scale: loss_scaling.py), a NaN guard that stops before the optimiser step,
checkpoints that are never non-finite, validation on isolated random streams (best.pth), metrics.jsonl +
TensorBoard.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console

from ssr_cache.data.datasets import open_dataset
from ssr_cache.distributed import rank_device, rank_info
from ssr_cache.errors import SSRError
from ssr_cache.progress import progress_bar
from ssr_cache.runtime import resolve_device, runtime_line, set_cpu_threads
from ssr_train.infer.evaluate import evaluate
from ssr_train.methods import METHODS
from ssr_train.methods.contract import MethodSetup
from ssr_train.methods.sam_features import SamFeatureSource
from ssr_train.models.model_factory import build_model, sam_level_name
from ssr_train.training import run_folder
from ssr_train.training.cached_views import batch_to_device
from ssr_train.training.checkpoint import load_checkpoint, save_checkpoint
from ssr_train.training.config import TrainConfig, save_config
from ssr_train.training.loss_scaling import LossScaling
from ssr_train.training.metrics_log import MetricsLog
from ssr_train.training.optim import build_optimizer, poly_lr, set_lr
from ssr_train.training.train_data import Stores, next_batch, open_stores, stream


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    iters: int
    last_losses: dict
    first_losses: dict
    is_main: bool = True  # rank 0 (the process that prints)
    already_finished: bool = False


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


@contextmanager
def isolated_random_streams(device: torch.device):
    """Everything drawn inside (an evaluation's loader, say) leaves every global random stream as it was,
    so training continues exactly as it would have without it."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        yield
    np.random.set_state(np_state)
    random.setstate(py_state)


def _backbone_init(cfg: TrainConfig) -> str:
    checkpoint = cfg.model.backbone_checkpoint
    if checkpoint is None:
        raise SSRError(f"no --backbone-checkpoint: the reference starts {cfg.model.backbone} from ImageNet "
                       "weights (SegFormer's mit_b5.pth for mit_b5); pass that file, or `--backbone-checkpoint "
                       "none` to train from random initialisation")
    return "random" if checkpoint == "none" else checkpoint


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 console: Console | None = None, progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.console = console or Console()
        self.progress = progress
        self.backbone_init = _backbone_init(cfg)
        ranks = rank_info()  # the same torchrun handling as the cache build
        self.rank, self.world = ranks.rank, ranks.world_size
        self.device = device = rank_device(resolve_device(cfg.run.device), ranks)
        self.threads = set_cpu_threads(cfg.run.threads) if device.type == "cpu" else None
        self.precision = "fp32" if device.type != "cuda" else (cfg.run.amp or "bf16")
        self.loss_scaling = LossScaling(device, enabled=self.precision == "fp16")
        self.run_dir = Path(cfg.run.out)
        self.best_miou: float | None = None

    def say(self, text: str) -> None:
        if self.rank == 0:
            self.console.print(text, highlight=False)

    # ------------------------------------------------------------ setup

    def _open_run_folder(self) -> dict | None:
        """A fresh folder (None) or the checkpoint to resume from."""
        if not self.resume:
            if self.rank == 0:
                run_folder.prepare_fresh(self.run_dir, overwrite=self.overwrite)
            return None
        run_folder.check_resumable(self.run_dir, self.cfg)
        if self.rank == 0:
            run_folder.remove_leftover_temp_files(self.run_dir)
        return load_checkpoint(self.run_dir / "latest.pth")  # read once: weights, optimiser and RNGs

    def _build(self, stores: Stores):
        cfg = self.cfg
        source = stores.source
        sam_level = sam_level_name(cfg.model, list(source.layout.levels)) if cfg.model.ssr else None
        sam = SamFeatureSource(sam_level, online=cfg.model.sam_source == "online",
                               encoder_name=cfg.model.sam_encoder, checkpoint=cfg.model.sam_checkpoint,
                               seed=cfg.model.sam_seed, device=self.device)
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, num_classes=stores.label_space.num_classes,
                            sam_channels=source.layout.channels).to(self.device)
        if model.backbone.checkpoint_report is not None:
            self.say(model.backbone.checkpoint_report.summary())
        setup = MethodSetup(model=model, sam=sam, label_space=stores.label_space, settings=cfg.methods,
                            seed=cfg.run.seed, rank=self.rank, loss_scale=self.loss_scaling.scale)
        method = METHODS[cfg.run.method](setup).to(self.device)
        if method.needs_target and stores.target is None:
            raise SSRError(f"--method {cfg.run.method} needs --target-cache")
        # Online mode computes SAM tokens in the loop, so the stores' feature arrays are not read.
        self.levels = [sam_level] if sam_level and cfg.model.sam_source == "cache" else []
        return model, method, build_optimizer(model, cfg.optim)

    def _streams(self, stores: Stores, method, start: int) -> tuple:
        cfg, pin = self.cfg, self.device.type == "cuda"
        common = dict(levels=self.levels, rank=self.rank, world=self.world, start_iter=start, pin_memory=pin)
        source = stream(cfg.data.source_cache, stores.source, cfg, seed=cfg.run.seed, photometric=cfg.data.photometric,
                        draw=method.source_sampler(stores.source), **common)
        target = None
        if stores.target is not None and method.needs_target:
            target = stream(cfg.data.target_cache, stores.target, cfg, seed=cfg.run.seed + 1, photometric=False,
                            draw=None, **common)
        return iter(source), iter(target) if target is not None else None

    def _metadata(self, stores: Stores) -> dict:
        """What a model file carries beside its weights (inference reads it: ssr_train/infer/run_model.py)."""
        sam_random = (self.cfg.model.sam_checkpoint is None if self.cfg.model.sam_source == "online"
                      else stores.sam_random_init)
        return {"label_space": stores.label_space.to_dict(), "resize": list((stores.target or stores.source).resize),
                "metadata": {"backbone_init": self.backbone_init,
                             "sam_random_init": bool(self.cfg.model.ssr and sam_random)}}

    def _record_run(self, stores: Stores) -> None:
        if self.rank != 0:
            return
        save_config(self.cfg, self.run_dir / "config.toml")
        meta = self.model_metadata["metadata"]
        run_folder.RunRecord(label_space=stores.label_space.to_dict(), backbone_init=meta["backbone_init"],
                             sam_random_init=meta["sam_random_init"], source_cache=self.cfg.data.source_cache,
                             target_cache=self.cfg.data.target_cache).write(self.run_dir)

    # ------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        cfg = self.cfg
        self.say(runtime_line(self.device, precision=self.precision, threads=self.threads,
                              backbone=f"{cfg.model.backbone} ({self.backbone_init})"))
        _seed_everything(cfg.run.seed + self.rank, cfg.run.deterministic)
        ckpt = self._open_run_folder()
        start = int(ckpt["iteration"]) if ckpt else 0
        if start >= cfg.run.iters:
            self.say(f"{self.run_dir} already finished ({start} of {cfg.run.iters} iterations); nothing to do")
            return TrainResult(self.run_dir, start, dict(ckpt.get("losses", {})), {}, self.rank == 0, True)
        self.stores = stores = open_stores(cfg)
        # recorded resolved, so a run's config alone rebuilds its model (evaluation, export)
        self.cfg = cfg = cfg.replace("model", num_classes=stores.label_space.num_classes)
        self.model_metadata = self._metadata(stores)
        model, method, optimizer = self._build(stores)
        if ckpt:
            start = self._restore(ckpt, method, optimizer)
            del ckpt
        else:
            self._record_run(stores)
        src_iter, tgt_iter = self._streams(stores, method, start)
        params = [p for p in model.parameters() if p.requires_grad]
        metrics = MetricsLog(self.run_dir, enabled=self.rank == 0, resume_from=start if self.resume else None)
        first, losses = {}, {}
        with metrics, self._progress_bar(start) as bar:
            for it in range(start, cfg.run.iters):
                lr = poly_lr(it, cfg.run.iters, cfg.optim)
                set_lr(optimizer, lr)
                src = batch_to_device(next_batch(src_iter), self.device)
                tgt = batch_to_device(next_batch(tgt_iter), self.device) if tgt_iter is not None else None
                method.train()
                optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    losses = method.step(it, src, tgt)
                losses = self._guard(it, losses, params, optimizer)  # stops here, before the step, on NaN/Inf
                self.loss_scaling.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
                first = first or dict(losses)
                self._after_step(it + 1, lr, losses, method, optimizer, metrics, bar)
        return TrainResult(self.run_dir, cfg.run.iters, losses, first, self.rank == 0)

    def _guard(self, it: int, losses: dict, params: list, optimizer) -> dict:
        """Average gradients (DDP) and the logged scalars over ranks, add the gradient norm (clipped when
        configured), and stop before the optimiser step when anything is not finite (under fp16, gradients
        that overflowed the loss scale skip the step instead: loss_scaling.py)."""
        if self.world > 1:
            _average_gradients(params, self.world)  # first: an overflow on any rank is then seen by all
        self.loss_scaling.unscale(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else torch.nn.utils.get_total_norm(grads)
        losses = {**losses, "grad_norm": float(norm)}
        if self.world > 1:
            values = torch.tensor(list(losses.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            losses = dict(zip(losses, (values / self.world).tolist(), strict=True))
        return self.loss_scaling.judge(it, losses, self._last_checkpoint)

    def _last_checkpoint(self) -> str:
        latest = self.run_dir / "latest.pth"
        if latest.is_file():
            return f"the last checkpoint is {latest} (finite; lower the learning rate before training again)"
        return f"no checkpoint was written yet (every {self.cfg.run.checkpoint_every} iterations)"

    def _after_step(self, done: int, lr: float, losses: dict, method, optimizer, metrics, bar) -> None:
        run = self.cfg.run
        last = done == run.iters
        if done % run.log_every == 0 or last:
            metrics.write({"iter": done, "lr": lr, **losses})
        if done % run.checkpoint_every == 0 or last:
            self._save(done, method, optimizer, losses)
        if run.val_every and (done % run.val_every == 0 or last):
            self._validate(method, done, metrics)
        if bar is not None:
            bar.update(bar.task_ids[0], completed=done,
                       info=" ".join(f"{k} {v:.3f}" for k, v in losses.items() if k.startswith("loss")))

    @contextmanager
    def _progress_bar(self, start: int):
        if not self.progress or self.rank != 0:
            yield None
            return
        bar = progress_bar(self.cfg.run.method, unit="it", console=self.console)
        bar.add_task("", total=self.cfg.run.iters, completed=start, info="")
        with bar:
            yield bar

    def _autocast(self):
        if self.device.type != "cuda" or self.precision == "fp32":
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)

    # ------------------------------------------------------------ validation

    def _validate(self, method, it: int, metrics) -> None:
        if self.rank != 0:
            return
        cfg = self.cfg
        root = cfg.run.val_data_root
        store = self.stores.target or self.stores.source
        if root is None and store.data_root is not None:
            root = str(store.data_root)
        if root is None:
            raise SSRError(f"--val-every: {store.url} records no dataset root to validate on; pass "
                           "--val-data-root")
        with isolated_random_streams(self.device):
            dataset = open_dataset(store.dataset, root, split="val", require_labels=True)
            result = evaluate(method.shadow_model(), dataset, resize=store.resize, device=self.device,
                              workers=0, progress=False, label_space=store.label_space)
        method.train()
        metrics.write({"iter": it, "val_miou": result.miou})
        self.say(f"iteration {it}: {store.dataset} val mIoU {result.miou:.2f}")
        if self.best_miou is None or result.miou > self.best_miou:
            self.best_miou = result.miou
            save_checkpoint({**self._export(method, it), "val_miou": result.miou}, self.run_dir / "best.pth")

    # ------------------------------------------------------------ checkpoints

    def _rng_state(self, method) -> dict:
        """This rank's random streams: the global ones and the method's own. All tensors or plain Python
        values, so the checkpoint loads with weights_only=True."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
                # this rank's GPU only: asking for every device's state would touch every GPU from every rank
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "method_generator": method.random_state()}

    def _set_rng_state(self, rng: dict, method) -> None:
        torch.set_rng_state(rng["torch"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            if isinstance(rng["cuda"], list):  # checkpoints before per-rank states held every device's
                torch.cuda.set_rng_state_all(rng["cuda"])
            else:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        method.set_random_state(rng.get("method_generator"))

    def _export(self, method, it: int) -> dict:
        return {"state_dict": method.shadow_model().shadow_state_dict(), "config": self.cfg.to_dict(),
                "iteration": it, **self.model_metadata}

    def _save(self, it: int, method, optimizer, losses: dict) -> None:
        # Every rank's random streams differ (seeded seed + rank), so rank 0 collects them all: a resumed
        # N-rank run then continues each rank's augmentations and drop-path draws exactly.
        rng_per_rank = [self._rng_state(method)]
        if self.world > 1:
            rng_per_rank = [None] * self.world
            dist.all_gather_object(rng_per_rank, self._rng_state(method))
        if self.rank != 0:
            return
        state = {"iteration": it, "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                 "loss_scaling": self.loss_scaling.state_dict(), "rng_per_rank": rng_per_rank,
                 "config": self.cfg.to_dict(), "losses": losses, "best_val_miou": self.best_miou}
        save_checkpoint(state, self.run_dir / "latest.pth")
        save_checkpoint(self._export(method, it), self.run_dir / "model.pth")

    def _restore(self, ckpt: dict, method, optimizer) -> int:
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        self.loss_scaling.load_state_dict(ckpt.get("loss_scaling"))
        iteration = int(ckpt["iteration"])
        self.best_miou = ckpt.get("best_val_miou")
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(per_rank) == self.world:
            self._set_rng_state(per_rank[self.rank], method)
        else:
            # Another world size: the streams cannot continue exactly; give each rank fresh, distinct ones.
            self.say(f"[yellow]resuming a {len(per_rank)}-rank checkpoint on {self.world} ranks: training "
                     "continues, but not bit-exactly as the original run would have")
            _seed_everything(self.cfg.run.seed + 1_000_003 * iteration + self.rank, self.cfg.run.deterministic)
            method.reseed(int(torch.randint(2**62, ())))
        return iteration
