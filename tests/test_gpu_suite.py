"""benchmarks/gpu_suite.py --smoke: the one-command GPU benchmark runs end to end on the CPU, so it cannot rot
while no GPU is around to run it for real."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_prints_every_figure_and_the_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = dict(re.findall(r"^([a-z0-9_]+)=(\S+)", done.stdout, re.M))
    for name in ("encoder_views_per_s_fp32", "pipeline_views_per_s_fp32", "build_over_encoder_fp32",
                 "predict_images_per_s", "flops_ssr_cache_over_plain"):
        assert name in figures, done.stdout
        assert math.isfinite(float(figures[name])) and float(figures[name]) > 0
    ratio = float(figures["encoder_views_per_s_fp32"]) / float(figures["pipeline_views_per_s_fp32"])
    assert abs(ratio - float(figures["build_over_encoder_fp32"])) < 1e-2 * ratio
    # the whole call adds planning and store creation to the same views
    assert float(figures["build_call_over_encoder_fp32"]) > float(figures["build_over_encoder_fp32"])
    assert figures["build_host_waits_fp32"] == "0"  # nothing to count on a CPU; on a GPU, no wait per batch
    assert "figure" in done.stdout and "train_step.flops_ssr_cache_over_plain" in done.stdout
    assert "cache_fp32" in {p.name for p in tmp_path.iterdir()}  # the build wrote a real store
