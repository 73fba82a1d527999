"""FP8 training on a GPU of compute capability 8.9+ (skipped elsewhere; the CPU counterpart is test_fp8.py).

* the tiny toy under bf16 autocast, converted (its size rule off) against the same model unconverted:
  logits within the CPU test's tolerance, weight gradients aligned; the CUDA FP8 GEMMs and the autocast
  path of torchao's float8 linear are what run here;
* ``bench/fp8_loss_curve.py`` at a short length: ``nvl finetune`` on the quickstart's task, full
  fine-tuning and LoRA, bf16 against FP8, the smoothed losses within 5% after 20 iterations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao.float8")
pytest.importorskip("nvl_nemotron_vl.model")

fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a CUDA GPU of compute capability 8.9+ (FP8 GEMMs)")
ROOT = Path(__file__).resolve().parents[3]


@fp8_gpu
def test_tiny_toy_fp8_on_cuda_matches_bf16_within_tolerance(tiny_toy):
    from fp8_testing import TOLERANCE, deviation, toy_batch

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvlcore.training.fp8 import FP8_ATTR, FP8_RECIPES, apply_fp8

    bridge = NemotronVLBridge.from_hf_dir(tiny_toy)
    bridge.fp8_small_linear = None
    ref, fp8 = (bridge.build_model(dtype=torch.float32, device="cuda", load_weights=True) for _ in range(2))
    sel = apply_fp8(fp8, FP8_RECIPES["bf16_with_fp8_current_scaling_mixed"], bridge)
    assert len(sel.chosen) == 7 and all(hasattr(m, FP8_ATTR) for m in sel.chosen.values())
    batch = {k: v.cuda() for k, v in toy_batch(bridge.config.llm.vocab_size).items()}
    out = {}
    for name, model in (("ref", ref), ("fp8", fp8)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**batch).mean().backward()
            with torch.no_grad():
                out[name] = model(input_ids=batch["input_ids"]).float()
    dev = deviation(out["fp8"], out["ref"])
    assert 0 < dev < TOLERANCE, dev
    for name in sel.chosen:
        a = ref.get_submodule(name).weight.grad.flatten()
        b = fp8.get_submodule(name).weight.grad.flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98, name


@fp8_gpu
@pytest.mark.slow
def test_short_fp8_runs_follow_the_bf16_loss(tmp_path):
    out = tmp_path / "fp8.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fp8_loss_curve.py"), "--steps", "60",
                           "--tolerance", "0.05", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, env={**os.environ})
    record = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert [c["method"] for c in record["comparisons"]] == ["full", "lora"]
    assert all(c["within_tolerance"] for c in record["comparisons"]), record["comparisons"]
    for r in record["runs"]:  # each FP8 run printed which linears ran FP8, and there were some
        if r["mixed_precision"] != "bf16_mixed":
            assert " linear layer(s) in FP8" in r["fp8_linears"] and not r["fp8_linears"].startswith("0 ")
