"""benchmarks/cache_build.py --pipeline on a tiny GTA5-size run: every figure the issue asks for is printed
and the ratios agree with the figures they come from, so the instrument cannot rot between measurements."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_prints_every_figure(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cache_build.py"), "--pipeline", "--images",
                           "2", "--rounds", "1", "--writer-rounds", "1", "--writer-views", "16", "--writer-views-per-shard", "8",
                           "--views-per-shard", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = {k: float(v) for k, v in re.findall(r"^([a-z0-9_]+)=(\S+)", done.stdout, re.M)}
    for name in ("pipeline_core_ms_per_view", "pipeline_kernel_ms_per_view", "pipeline_core_ms_per_view_buffered",
                 "floor_core_ms_per_view",
                 "pipeline_over_floor", "pipeline_over_floor_int8", "pipeline_views_per_s_w1",
                 "pipeline_views_per_s_w2", "writer_views_per_s_t1", "writer_views_per_s_t2", "writer_scaling",
                 "planning_ms_per_image_t1", "planning_speedup_t2", "label_read_ms", "label_read_speedup"):
        assert name in figures and math.isfinite(figures[name]) and figures[name] > 0, (name, done.stdout)
    ratio = figures["pipeline_core_ms_per_view"] / figures["floor_core_ms_per_view"]
    assert abs(ratio - figures["pipeline_over_floor"]) < 1e-2 * ratio
    assert figures["pipeline_kernel_ms_per_view"] < figures["pipeline_core_ms_per_view"]
    # The benchmark's labels are palette PNGs written as GTA5's are (unfiltered): the fast path reads them.
    assert "(libdeflate path)" in done.stdout and figures["label_read_speedup"] > 1, done.stdout
    assert "# goal pipeline_over_floor <= 1.5:" in done.stdout and "touching freed memory" in done.stdout
    # The split by role (main thread, other threads: planning and writers, decoding workers) adds up to the
    # whole, each part > 0.
    roles = re.search(r"^# float16 CPU by role, medians: main thread (\S+), other threads (\S+), decoding workers "
                      r"(\S+) ms/view", done.stdout, re.M)
    assert roles, done.stdout
    parts = [float(v) for v in roles.groups()]
    assert min(parts) > 0 and abs(sum(parts) - figures["pipeline_core_ms_per_view"]) < 0.2, (parts, figures)
