"""bench/memory_gpu.py end to end on CPU at toy size (its docstring's smoke command): a QLoRA row runs beside its
unconstrained baseline, each a fresh `nvl finetune`, and the record carries issue 22's fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_memory_bench_runs_a_qlora_row_beside_its_baseline_on_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench/memory_gpu.py"), "--size", "tiny", "--device", "cpu", "--seq", "256",
           "--steps", "2", "--warmup", "0", "--rows", "qlora_24", "--out", str(out), "--work", str(tmp_path / "w"),
           "--tag", "smoke"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    base, row = json.loads((out / "memory_gpu_smoke.json").read_text())
    assert (base["row"], row["row"]) == ("qlora_24 (baseline)", "qlora_24")
    assert base["status"] == row["status"] == "ok"
    assert row["method"] == "qlora" and base["method"] == "lora"
    assert row["variant"]["peft.base_dtype"] == "nf4" and "peft.base_dtype" not in (base.get("variant") or {})
    assert row["baseline_tokens_per_s"] == base["tokens_per_s"] > 0
    assert row["budget_gb"] == 24 and row["target_gb"] == 22 and row["emulated"] is False  # nothing emulated on CPU
    for key in ("plan_gb", "reserved_gb", "outside_allocator_gb", "global_batch_size", "device", "date"):
        assert key in row, key
    assert "qlora_24" in (out / "memory_gpu_smoke.md").read_text()
