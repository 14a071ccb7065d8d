"""metrics.jsonl (one JSON object per line, what `ssr plot` reads) and the same scalars in RUN/tb for
TensorBoard. Only rank 0 writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ssr_cache.atomic_file import write_text_atomic
from ssr_train.training.run_folder import read_metrics_lines


class MetricsLog:
    def __init__(self, run_dir: Path, *, enabled: bool, resume_from: int | None):
        self.enabled = enabled
        self.fh = self.tb = None
        self.t_last = time.perf_counter()
        self.last_iter = resume_from or 0
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if resume_from is not None:
            # Lines a killed run logged after its last checkpoint are replayed by the resumed run, and a
            # line torn by the kill is dropped.
            kept = read_metrics_lines(path, up_to=resume_from)
            write_text_atomic(path, "".join(line + "\n" for line in kept), what="metrics")
        self.fh = open(path, "a")
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if "loss" in record:  # a training line: how long its iterations took
            now = time.perf_counter()
            record = {**record, "sec_per_iter": (now - self.t_last) / max(record["iter"] - self.last_iter, 1)}
            self.t_last, self.last_iter = now, record["iter"]
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        for k, v in record.items():
            if k != "iter" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["iter"])

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
