"""`ssr demo`: the whole pipeline on synthetic data — synthesise two domains, build SAM caches with a
random-init vit_tiny, train source-only and DAFormer+SSR, evaluate both on source and target val.

Demo settings are chosen to learn in minutes on a 2-core CPU (no ImageNet weights exist offline, so
the backbone starts from random init and a higher learning rate is used); they are not the paper recipe.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ssr_cache.build.config import CacheBuildConfig
from ssr_cache.build.pipeline import build_cache
from ssr_cache.data.datasets import open_dataset
from ssr_cache.data.synthetic import synthesize
from ssr_cache.errors import SSRError
from ssr_train.infer.eval_results import EVAL_DIR, compare, eval_folder, read_eval, write_eval
from ssr_train.infer.evaluate import evaluate
from ssr_train.infer.plots import plot_class_iou, plot_iou_delta
from ssr_train.infer.predictor import Predictor
from ssr_train.infer.run_model import load_run_model
from ssr_train.training.config import TrainConfig
from ssr_train.training.engine import Trainer


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    quick: bool = False
    train_images: int = 100
    val_images: int = 30
    size: tuple[int, int] = (256, 128)  # (W, H) of the synthetic images
    crop: tuple[int, int] = (128, 128)
    views_per_image: int = 2
    iters_source_only: int = 400
    iters_uda: int = 320
    lr: float = 6e-4
    batch_size: int = 4
    backbone: str = "mit_b0"
    head_embed_dim: int = 64  # the reference 256 makes the DAFormer head ~4x slower on a CPU
    seed: int = 0
    workers: int = 1
    # (run name, method, SSR on?); source-only runs get iters_source_only, the UDA methods iters_uda
    runs: tuple[tuple[str, str, bool], ...] = (("source-only", "source-only", False),
                                               ("daformer+ssr", "daformer", True))

    @classmethod
    def for_mode(cls, out: Path, *, quick: bool, seed: int = 0) -> DemoConfig:
        if quick:
            return cls(out=out, quick=True, train_images=48, val_images=16, iters_source_only=100,
                       iters_uda=90, seed=seed)
        return cls(out=out, seed=seed)


@dataclass(frozen=True)
class DemoRow:
    name: str
    source_val_miou: float | None
    target_val_miou: float | None
    seconds: float


def run_demo(cfg: DemoConfig, *, console, progress: bool = True) -> list[DemoRow]:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "demo.json").is_file():
        raise SSRError(f"{out} exists and is not a demo folder; choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    (out / "demo.json").write_text(json.dumps({"config": config, "state": "running"}, indent=2))
    t0 = time.perf_counter()
    console.rule("1/4 synthetic data (GTA5-like source, Cityscapes-like target)")
    data = out / "data"
    synthesize(data, train=cfg.train_images, val=cfg.val_images, size=cfg.size, seed=cfg.seed,
               workers=max(1, cfg.workers), progress=progress)

    console.rule("2/4 SAM feature caches (vit_tiny, RANDOM weights: a pipeline demo, not SAM features)")
    caches = {}
    for name, dataset, root in (("source", "gta5", data / "gta5"), ("target", "cityscapes", data / "cityscapes")):
        caches[name] = out / "caches" / f"{dataset}.zarr"
        build_cache(CacheBuildConfig(dataset=dataset, data_root=root, out=str(caches[name]), sam="vit_tiny",
                                     crop=cfg.crop, resize=cfg.size, views_per_image=cfg.views_per_image,
                                     views_per_shard=32, batch_size=8, workers=cfg.workers, seed=cfg.seed),
                    progress=progress, console=console)

    console.rule("3/4 training")
    rows = []
    for name, method, ssr in cfg.runs:
        iters = cfg.iters_source_only if method == "source-only" else cfg.iters_uda
        t = time.perf_counter()
        run_dir = out / "runs" / name
        _train(cfg, method=method, ssr=ssr, iters=iters, run_dir=run_dir, caches=caches, console=console,
               progress=progress)
        rows.append((name, run_dir, time.perf_counter() - t))

    console.rule("4/4 evaluation of the shadow branch (no SAM)")
    results = []
    for name, run_dir, seconds in rows:
        src = _evaluate(run_dir, "gta5", data / "gta5_val", cfg, save_preds=None)
        tgt = _evaluate(run_dir, "cityscapes", data / "cityscapes", cfg,
                        save_preds=run_dir / "preds" if name == rows[-1][0] else None, write=True)
        results.append(DemoRow(name, src, tgt, seconds))
    _plots(out, rows)
    summary = {"config": config, "state": "done", "random_init_sam": True, "seconds": time.perf_counter() - t0,
               "results": [asdict(r) for r in results]}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return results


def _train(cfg: DemoConfig, *, method, ssr, iters, run_dir, caches, console, progress) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo re-run starts its runs afresh
    tc = TrainConfig()
    tc = tc.replace("model", backbone=cfg.backbone, backbone_checkpoint="none", ssr=ssr, drop_path_rate=0.0, head_embed_dim=cfg.head_embed_dim)
    tc = tc.replace("optim", lr=cfg.lr, warmup_iters=min(50, iters // 10))
    tc = tc.replace("data", source_cache=str(caches["source"]), target_cache=str(caches["target"]),
                    batch_size=cfg.batch_size, workers=cfg.workers)
    tc = tc.replace("run", method=method, iters=iters, seed=cfg.seed, out=str(run_dir),
                    log_every=max(1, iters // 20), checkpoint_every=iters)
    Trainer(tc, console=console, progress=progress).train()


def _evaluate(run_dir: Path, dataset: str, root: Path, cfg: DemoConfig, *, save_preds, write: bool = False):
    loaded = load_run_model(run_dir)
    predictor = Predictor.from_run_model(loaded, resize=cfg.size, device="cpu")
    split = "val" if dataset == "cityscapes" else "all"
    ds = open_dataset(dataset, root, split=split, require_labels=True)
    result = evaluate(predictor, ds, workers=0, progress=False, save_preds=save_preds)
    if write:
        write_eval(eval_folder(run_dir), result, {"dataset": dataset, "split": split, "data_root": str(root),
                                                  "model": loaded.info, "label_space": loaded.label_space.to_dict()})
    return result.miou


def _plots(out: Path, rows) -> None:
    target = "cityscapes-val.json"
    for name, run_dir, _ in rows:
        ev = read_eval(run_dir / EVAL_DIR / target)
        plot_class_iou(ev["per_class"], out / f"iou_{name}.png", palette=ev["label_space"]["palette"],
                       title=f"{name}: target val", miou=ev["miou"])
    columns = compare([rows[0][1] / EVAL_DIR / target, rows[-1][1] / EVAL_DIR / target], [rows[0][0], rows[-1][0]])
    plot_iou_delta(columns, out / "compare.png")
