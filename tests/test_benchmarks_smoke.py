"""Smoke test of benchmarks/bench_gpu.py: its --smoke mode (tiny random SD on the CPU) runs end to end.

No timing thresholds: only that every mode produced a row with finite, positive step times."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_smoke(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--steps", "2,2", "--warmup", "0",
           "--memory", "normal", "--threads", "1", "--model-dir", str(tmp_path / "models"),
           "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True
    rows = data["results"]
    assert sorted(r["mode"] for r in rows) == ["naive", "ours"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["steps_done"] == [2, 2] and r["extrapolated"] is False
        for key in ("s_step_p1", "s_step_p2", "total_s", "setup_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert "| tiny |" in proc.stdout and "s/step p1" in proc.stdout
