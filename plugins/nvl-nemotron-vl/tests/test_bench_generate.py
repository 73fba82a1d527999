"""The CPU path of bench/generate_gpu.py at the tiny size: runs, checks itself, writes its records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench" / "generate_gpu.py"


def test_generate_bench_cpu_path(tmp_path, own_process_group) -> None:
    # own_process_group (nvlcore.testing): the bench sets up a one-rank process group; it is taken down after.
    spec = importlib.util.spec_from_file_location("generate_gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rec"
    rc = bench.main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-len", "24",
                     "--new-tokens", "6", "--repeats", "1", "--check-steps", "6", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert not rec["errors"], rec["errors"]
    [eager] = rec["variants"]
    assert eager["variant"] == "eager" and eager["decode_tokens_per_s"] > 0 and len(eager["tokens"]) == 6
    tf = eager["teacher_forced"]
    assert tf["top1_agreement"] == 1.0 and tf["relative"] < 1e-5
    peer = rec["peer"]
    assert peer["prefill_logit_cosine_vs_ours"] > 0.99999 and peer["agrees_with_our_tokens"] == 6
    md = out.with_suffix(".md").read_text()
    assert "transformers generate (peer)" in md and "nvl eager" in md
