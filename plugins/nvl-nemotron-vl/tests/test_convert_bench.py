"""bench/convert_gpu_machine.py: its independent key/shape inventory, and its whole CPU path at tiny size."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "convert_gpu_machine.py"


def _bench():
    spec = importlib.util.spec_from_file_location("convert_gpu_machine", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inventory_matches_the_toy_writer(tiny_toy, tiny_cfg):
    from nvlcore.convert.safetensors_io import SafetensorsReader

    inv = _bench().hf_inventory(tiny_cfg)
    got = {k: (tuple(t.shape), str(t.dtype)[6:]) for k, t in SafetensorsReader(tiny_toy).tensors.items()}
    assert {k: (tuple(s), d) for k, (s, d) in inv.items()} == got


@pytest.mark.slow
def test_bench_cpu_path_at_tiny_size(tmp_path):
    out = tmp_path / "rec.md"
    r = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--toy", "fast", "--low-disk",
                        "--disk-test-gb", "0.07", "--workdir", str(tmp_path / "w"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["verify"]["ok"] and rec["verify"]["key_set_shapes_dtypes_equal"]
    assert rec["import"]["hf_tensors"] == rec["toy"]["tensors"] and rec["disk"]["read_GBps"] > 0
    assert "| `nvl convert import` (cold source) |" in out.read_text()
    assert not (tmp_path / "w").exists()  # cleaned up
