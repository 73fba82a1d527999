"""bench/model_step_gpu.py's correctness path runs on CPU at tiny size and writes its record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_model_step_bench_tiny_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "model_step_gpu.py"), "--size", "tiny", "--device", "cpu",
           "--seq", "96", "--tiles", "3", "--iters", "1", "--warmup", "0", "--recompute", "none,ssm",
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("model_step_tiny_cpu_*.json")]
    checks = record["checks"]
    assert checks["passed"] and checks["lm_vs_transformers_max_abs_logit_diff"] <= 1e-4
    assert checks["vlm_vs_transformers_max_abs_logit_diff"] <= 1e-4
    for v in ("none", "ssm"):
        res = record["variants"][v]
        assert res["status"] == "ok" and res["grads_finite"] and res["tokens_per_s"] > 0
    # both variants compute the same loss (recomputation changes memory, not math)
    assert abs(record["variants"]["none"]["loss"] - record["variants"]["ssm"]["loss"]) < 1e-5
    assert "ssd_scan_total_s" in record["split"]
    md = next(tmp_path.glob("model_step_tiny_cpu_*.md")).read_text()
    assert "Forward + backward" in md and "SSD scan alone" in md
