"""bench/eval_gpu.py's CPU path (the tiny toy): the script the lead runs on an H200 works end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_eval_bench_runs_on_cpu_and_records_both_batch_sizes(tmp_path: Path) -> None:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    toy = write_toy_checkpoint(tmp_path / "toy", "tiny", seed=1)
    out = tmp_path / "eval_gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_gpu.py"), "--model-dir", str(toy), "--device",
                           "cpu",
                           "--samples", "6", "--batch-sizes", "3,1", "--batch1-samples", "2", "--max-new-tokens", "3",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {r["batch_size"]: r for r in result["runs"]}
    assert runs[3]["num_samples"] == 6 and runs[1]["num_samples"] == 2
    assert all(r["generated_tokens"] == r["num_samples"] * 3 for r in runs.values())  # random weights never stop
    assert set(runs[3]["metrics"]) == {"ted_accuracy", "field_f1"}
    assert result["speedup_samples_per_s"] > 0 and result["model"]["dir"] == str(toy)
