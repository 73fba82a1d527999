"""The GPU benchmark's code path, at tiny size on CPU (the lead runs it on an H200)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_lora_gpu_bench_runs_at_tiny_size_on_cpu(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "lora_gpu.py"), "--out", str(tmp_path), "--size", "tiny",
           "--device", "cpu", "--seq", "32", "--steps", "1", "--peer-seqs", "32", "--peer-steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "lora_gpu.json").read_text())
    nvl, peer = record["runs"]
    assert nvl["name"] == "nvl LoRA" and nvl["tokens_per_s"] > 0 and nvl["mfu_lora"] >= 0
    assert nvl["check_fresh_adapter_loss_equals_base"]["ok"] and nvl["check_merge_reproduces_adapted_loss"]["ok"]
    assert peer["name"].startswith("transformers") and peer["result"] == "ok" and peer["tokens_per_s"] > 0
    assert "| nvl LoRA | 32 |" in (tmp_path / "lora_gpu.md").read_text()
