"""The FP8 hook of bench/finetune_gpu.py: an FP8 row beside its bf16 row, and what it records on a CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "finetune_gpu.py"
FP8 = "bf16_with_fp8_current_scaling_mixed"


def _bench():
    spec = importlib.util.spec_from_file_location("finetune_gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _row(variant: dict, tps: float | None, status: str = "ok", **extra) -> dict:
    return {"system": "nvl", "workload": "text", "method": "full", "seq": 4096, "gpus": 2, "tp": 2,
            "variant": variant, "tokens_per_s": tps, "mfu": 0.4 if tps else None, "peak_gb": 60.0,
            "status": status, "command": "nvl finetune ...", **extra}


def test_the_fp8_row_is_stated_against_its_bf16_row_of_the_same_run():
    bench = _bench()
    meta = {"date": "2026-12-07", "machine": "2x H100", "warmup": 3}
    fp8 = _row({"mixed_precision": FP8}, 11000.0, fp8_linears="120 linear layer(s) in FP8, kept bf16: ...")
    md = bench.markdown([_row({}, 8800.0), fp8], meta)
    assert f"- text full seq 4096 {FP8}: 11,000 vs 8,800 tokens/s = 1.25x" in md
    assert "120 linear layer(s) in FP8" in md
    # an FP8 row without its bf16 row, or one that failed, says so instead of a ratio
    md = bench.markdown([_row({"mixed_precision": FP8}, None, status="error (exit 1): ...")], meta)
    assert f"- text full seq 4096 {FP8}: error (exit 1): ... (bf16 row: not in this run)" in md


@pytest.mark.slow
def test_an_fp8_variant_on_a_cpu_is_recorded_as_refused_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH), "--size", "tiny", "--device", "cpu", "--seq", "256", "--steps", "2",
           "--warmup", "1", "--gbs", "2", "--workloads", "text", "--methods", "full", "--peer-seqs", "",
           "--skip-default", "--variants", f"mixed_precision={FP8}", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a run that failed fails the bench
    (rec,) = json.loads((tmp_path / "out" / "finetune_gpu.json").read_text())
    assert rec["variant"] == {"mixed_precision": FP8} and f"mixed_precision={FP8}" in rec["command"]
    assert rec["status"].startswith("error") and "needs a CUDA GPU" in rec["status"]
