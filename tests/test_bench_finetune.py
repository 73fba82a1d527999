"""The CPU path of bench/finetune_gpu.py at toy size: it trains, checks itself and writes its records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "finetune_gpu.py"


def test_finetune_bench_cpu_path_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH), "--size", "tiny", "--device", "cpu", "--tp", "1", "--seq", "256", "--tiles", "2",
           "--steps", "2", "--warmup", "1", "--micro-batches", "2", "--recompute", "none,layers", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads((tmp_path / "finetune_gpu.json").read_text())
    assert r["status"] == "ok" and set(r["variants"]) == {"none", "layers"}
    for v in r["variants"].values():
        assert v["status"] == "ok" and all(v["checks"].values()), v
        assert v["tokens_per_s_per_gpu"] > 0 and v["tflops_per_gpu"] > v["tflops_per_gpu_lm_nominal"] > 0
    # the same fixed batches are trained on throughout: the loss goes down from step to step
    losses = [s["loss"] for k in ("none", "layers") for s in r["variants"][k]["steps"]]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert 0 < r["vision_share_of_flops"] < 1
    md = (tmp_path / "finetune_gpu.md").read_text()
    assert "tokens/s/GPU" in md and "| none | ok |" in md
