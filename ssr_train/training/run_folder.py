"""A run folder and the rules that keep it trustworthy.

- A fresh run refuses a folder that holds a previous run's files (or, with `overwrite`, removes exactly
  those files first): metrics are never appended to another run's.
- `--resume` continues only the run config.toml describes: any setting that could change the result and
  differs is refused with the list of keys; config.toml is never rewritten. A finished run says so.
- Temp files a killed writer left (".latest.pth.<pid>.<hex>.tmp") are removed; a torn last metrics line
  (a kill mid-write) is dropped.
- RUN/run.json records what the config alone does not say: the label space, the backbone's and SAM's
  initialisation — evaluation copies those into its own JSON (`read_run_record`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ssr_cache.atomic_file import write_text_atomic
from ssr_cache.errors import SSRError
from ssr_train.training.config import TrainConfig, load_config, resolve_config

# Settings a resume may change: they decide what is logged, saved or evaluated and how fast, never what
# is trained (validation runs on isolated random streams; the data streams do not depend on workers).
RESUME_FREE_KEYS = frozenset({"run.out", "run.log_every", "run.checkpoint_every", "run.val_every",
                              "run.val_data_root", "run.threads", "data.workers"})
RUN_FILES = ("config.toml", "run.json", "metrics.jsonl", "latest.pth", "model.pth", "best.pth")
RUN_DIRS = ("tb",)


@dataclass(frozen=True)
class RunRecord:
    """RUN/run.json: facts about a run that evaluation and plots read."""

    label_space: dict
    backbone_init: str  # "random" or the checkpoint path
    sam_random_init: bool  # SAM features from a randomly initialised encoder (no SAM checkpoint)
    source_cache: str
    target_cache: str | None

    def write(self, run_dir: Path) -> None:
        write_text_atomic(run_dir / "run.json", json.dumps(self.__dict__, indent=1) + "\n", what="run.json")


def read_run_record(run_dir: str | Path) -> dict:
    """RUN/run.json as a dict ({} for runs written before it existed)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SSRError(f"{path} is not valid JSON") from None


def _flat(cfg: TrainConfig) -> dict:
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def config_differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """`section.key (saved -> wanted)` for every setting that differs and would change the result."""
    a, b = _flat(saved), _flat(wanted)
    return [f"{k} ({a[k]!r} -> {b[k]!r})" for k in a if a[k] != b[k] and k not in RESUME_FREE_KEYS]


def remove_leftover_temp_files(run_dir: Path) -> None:
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def previous_run_files(run_dir: Path) -> list[Path]:
    return [p for p in (*(run_dir / f for f in RUN_FILES), *(run_dir / d for d in RUN_DIRS)) if p.exists()]


def prepare_fresh(run_dir: Path, *, overwrite: bool) -> None:
    """Make `run_dir` ready for a new run: refuse a previous run's files unless `overwrite`."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SSRError(f"--out {run_dir} is a file, not a folder")
    old = previous_run_files(run_dir) if run_dir.is_dir() else []
    if old and not overwrite:
        raise SSRError(f"{run_dir} already holds a run ({', '.join(p.name for p in old)}); pass --resume to "
                       "continue it, --overwrite to replace it, or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        remove_leftover_temp_files(run_dir)
        probe = run_dir / ".write_probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SSRError(f"--out {run_dir}: cannot write there ({exc.strerror or exc})") from None


def saved_config(run_dir: Path) -> TrainConfig:
    if not (run_dir / "config.toml").is_file():
        raise SSRError(f"--resume: {run_dir} holds no run (no config.toml)")
    return load_config(run_dir / "config.toml")


def check_resumable(run_dir: Path, wanted: TrainConfig) -> None:
    """Refuse a resume whose settings differ from the run's own in a way that changes the result."""
    if not (run_dir / "latest.pth").is_file():
        raise SSRError(f"--resume: {run_dir} has no checkpoint yet (the run stopped before its first one); "
                       "start it again with --overwrite")
    differences = config_differences(saved_config(run_dir), wanted)
    if differences:
        raise SSRError(f"--resume would change the run's settings: {'; '.join(differences)}; resume without "
                       "them, or start a new run")


def read_metrics_lines(path: Path, *, up_to: int | None = None) -> list[str]:
    """The metrics lines of a run, without a torn last line and (with `up_to`) without lines after that
    iteration (a killed run logged them after its last checkpoint; the resumed run logs them again)."""
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
        if up_to is None or record.get("iter", 0) <= up_to:
            kept.append(line)
    return kept


def resolve_run_config(*, out: str | Path | None, resume: bool, config_file: str | Path | None = None,
                       flags: dict | None = None, sets: list[str] = ()) -> TrainConfig:
    """The config a `ssr train` invocation means: the reference defaults (or, with `resume`, the run's
    own config.toml), then `--config`, flags and `--set`."""
    if resume:
        if out is None:
            raise SSRError("--resume needs --out RUN_DIR")
        return resolve_config(base=saved_config(Path(out)), config_file=config_file, flags=flags, sets=sets)
    return resolve_config(config_file=config_file, flags=flags, sets=sets)
