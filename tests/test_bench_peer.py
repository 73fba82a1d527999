"""bench/finetune_gpu.py's transformers + PEFT peer: the Mamba-1 stand-in only where mamba-ssm's import fails on that
extension alone, its fused op falling through, an out-of-memory try as a row, and (slow) every variant's try at
toy size on CPU, whose records say what really ran."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "finetune_gpu.py"
FAKE_SSD = '''
def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    CALLS.append("scan")
    return "scanned"


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    CALLS.append("fused")
    if zxbcdt == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    causal_conv1d_fwd_function = None  # as in mamba-ssm without causal-conv1d
    return causal_conv1d_fwd_function(zxbcdt)

CALLS = []
'''


def fake_mamba_ssm(root: Path, init_import: str) -> Path:
    """A package laid out like mamba-ssm 2.3 whose ``__init__`` runs ``init_import`` (its Mamba-1 import, or another
    failing one); its SSD functions record their calls."""
    pkg = root / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'__version__ = "0.0-fake"\n{init_import}\n')
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "selective_scan_interface.py").write_text(
        "import selective_scan_cuda\n\n\ndef selective_scan_fn(*args):\n    return selective_scan_cuda.fwd(*args)\n")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text(textwrap.dedent(FAKE_SSD))
    return root


MAMBA1 = "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn"


@pytest.fixture()
def bench(monkeypatch):
    """The bench module, with sys.modules restored afterwards for what a peer try sets up (mamba_ssm and its stand-in,
    transformers' NemotronH module, imported afresh)."""
    spec = importlib.util.spec_from_file_location("finetune_gpu_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("mamba_ssm", "causal_conv1d", mod.MAMBA1_EXTENSION, mod.NEMOTRON_H_MODELING):
        monkeypatch.setitem(sys.modules, name, None)  # records the entry as it was, for the undo
        monkeypatch.delitem(sys.modules, name)
    yield mod
    for name in [m for m in sys.modules if m.startswith("mamba_ssm.")]:
        del sys.modules[name]


def test_stand_in_only_where_the_mamba1_extension_alone_is_missing(bench, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_mamba_ssm(tmp_path / "a", MAMBA1)))
    ok, note = bench.ensure_mamba_ssm()
    assert ok and "stand-in for selective_scan_cuda" in note, note
    stand_in = sys.modules["selective_scan_cuda"]
    assert stand_in.NVL_STAND_IN
    with pytest.raises(AttributeError, match="stand-in"):
        stand_in.fwd  # noqa: B018  # any use fails loudly
    import mamba_ssm

    assert mamba_ssm.__version__ == "0.0-fake"


def test_no_stand_in_where_mamba_ssm_fails_for_another_reason(bench, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_mamba_ssm(tmp_path / "b", "import nvl_no_such_triton_dependency")))
    ok, note = bench.ensure_mamba_ssm()
    assert not ok and "nvl_no_such_triton_dependency" in note and "stand-in" not in note, note
    assert "selective_scan_cuda" not in sys.modules


def test_no_stand_in_where_mamba_ssm_is_absent(bench):
    ok, note = bench.ensure_mamba_ssm()
    assert not ok and "No module named 'mamba_ssm'" in note, note
    assert "selective_scan_cuda" not in sys.modules


def test_stand_in_import_is_retried_cleanly_with_a_counting_importer(bench, tmp_path, monkeypatch):
    """The stand-in goes in after exactly one failed import, and the retry is the second."""
    monkeypatch.syspath_prepend(str(fake_mamba_ssm(tmp_path / "c", MAMBA1)))
    seen = []

    def importer(name):
        seen.append((name, "selective_scan_cuda" in sys.modules))
        return importlib.import_module(name)

    assert bench.ensure_mamba_ssm(importer)[0]
    assert seen == [("mamba_ssm", False), ("mamba_ssm", True)]


def test_fused_op_falls_through_once_it_cannot_run_and_the_scan_is_counted(bench, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_mamba_ssm(tmp_path / "d", MAMBA1)))
    assert bench.ensure_mamba_ssm()[0]
    import collections

    calls, notes = collections.Counter(), {}
    bench._instrument_mamba_ssm(calls, notes)
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    args = ("w", None, "dt_bias", "A", "D", 128)
    assert ssd.mamba_split_conv1d_scan_combined("zxbcdt", *args) is None
    assert "TypeError" in notes["fused_split"] and calls["fused_split:package"] == 0
    assert ssd.mamba_split_conv1d_scan_combined("zxbcdt", *args) is None
    assert ssd.CALLS == ["fused"]  # not tried again
    assert ssd.mamba_chunk_scan_combined("x", "dt", "A", "B", "C", 128) == "scanned"
    assert calls["scan:package"] == 1
    # transformers reads the wrapped function's signature to filter its keyword arguments: it must be the kernel's
    import inspect

    assert "return_varlen_states" in inspect.signature(ssd.mamba_chunk_scan_combined).parameters


def test_an_out_of_memory_in_the_fused_op_is_not_swallowed(bench, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_mamba_ssm(tmp_path / "e", MAMBA1)))
    assert bench.ensure_mamba_ssm()[0]
    import collections

    notes = {}
    bench._instrument_mamba_ssm(collections.Counter(), notes)
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    with pytest.raises(RuntimeError, match="out of memory"):
        ssd.mamba_split_conv1d_scan_combined("oom", "w", None, "dt_bias", "A", "D", 128)
    assert "fused_split" not in notes


def _raising_model(exc):
    import torch

    class Raising(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)
            self.checkpointing = None

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.checkpointing = gradient_checkpointing_kwargs

        def forward(self, input_ids=None, labels=None, use_cache=None):
            raise exc

    return lambda cfg, device, dtype: Raising()


@pytest.mark.parametrize("raised, status", [
    ("oom", "oom"), ("value", "error: ValueError: not a memory problem")])
def test_an_out_of_memory_try_is_an_oom_row_with_its_batch_and_variant(bench, raised, status):
    import torch

    exc = (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB") if raised == "oom"
           else ValueError("not a memory problem"))
    spec = {"size": "tiny", "device": "cpu", "seq": 64, "micro_batch_size": 2, "mamba": "torch",
            "gradient_checkpointing": True, "warmup": 0, "steps": 1}
    rec = bench.peer_try(spec, build=_raising_model(exc))
    assert rec["status"] == status
    assert rec["variant"] == {"mamba": "torch", "gradient_checkpointing": "on", "micro_batch_size": 2}
    assert rec["system"] == "transformers+peft" and rec["seq"] == 64 and "tokens_per_s" not in rec
    assert "--peer-child" in rec["command"] and '"micro_batch_size": 2' in rec["command"]


def test_peer_keys_are_checked_in_one_line(bench):
    with pytest.raises(SystemExit, match="--peer-variants: unknown"):
        bench.peer_plan(bench.parse_args(["--peer-variants", "torch,cuda"]))
    with pytest.raises(SystemExit, match="--peer-checkpointing: 'auto' stands alone"):
        bench.peer_plan(bench.parse_args(["--peer-checkpointing", "auto,on"]))
    with pytest.raises(SystemExit, match="--peer-batches"):
        bench.peer_plan(bench.parse_args(["--peer-batches", "0"]))
    assert bench.peer_plan(bench.parse_args([])) == ([2048, 4096], ["torch", "mamba-ssm triton"], [1, 2], ["auto"])


def test_markdown_compares_at_each_sides_best_and_at_equal_micro_batch(bench):
    def nvl(mb, tps):
        return {"system": "nvl", "workload": "text", "method": "lora", "seq": 2048, "gpus": 1, "tp": 1,
                "variant": {"train.micro_batch_size": str(mb)} if mb != 1 else {}, "tokens_per_s": tps,
                "mfu": 0.3, "peak_gb": 60.0, "status": "ok", "command": "nvl finetune", "date": "d"}

    def peer(mamba, mb, ckpt, tps):
        return {"system": "transformers+peft", "workload": "text", "method": "lora", "seq": 2048, "gpus": 1,
                "tp": 1, "variant": {"mamba": mamba, "gradient_checkpointing": ckpt, "micro_batch_size": mb},
                "tokens_per_s": tps, "mfu": 0.1 if tps else None, "peak_gb": 70.0, "status": "ok" if tps else "oom",
                "mamba_ops_ran": "Mamba ops in PyTorch" if mamba == "torch" else "mamba-ssm's Triton chunk scan, "
                "conv1d and gated norm in PyTorch", "command": "peer", "date": "d"}

    records = [nvl(1, 6000.0), nvl(2, 8000.0), peer("torch", 1, "off", 3000.0), peer("mamba-ssm triton", 1, "off",
               4000.0), peer("torch", 2, "off", None), peer("mamba-ssm triton", 2, "on", 5000.0)]
    md = bench.markdown(records, {"date": "d", "machine": "m", "warmup": 2})
    best = md.split("At each side's best")[1].split("\n\n")[1]
    assert "nvl 8,000 (train.micro_batch_size=2) vs transformers+PEFT 5,000 (micro-batch 2, mamba-ssm's " in best
    assert "gradient checkpointing) tokens/s = 1.60x" in best
    equal = md.split("At equal micro-batch")[1]
    assert "micro-batch 1: nvl 6,000 (default) vs transformers+PEFT 4,000 (micro-batch 1, mamba-ssm's" in equal
    assert "= 1.50x" in equal and "micro-batch 2: nvl 8,000" in equal
    assert "- seq 2048, micro-batch 2, Mamba ops in PyTorch: oom" in md  # every try, its OOM too
    table = bench.readme_table(records)
    assert "| transformers + PEFT LoRA, text, 2048, 1, micro-batch 1, mamba-ssm's Triton chunk scan" in table
    assert "| 4,000 | 4,000 | 10.0% |" in table
    # no peer try fit at a micro-batch: the README says so
    table = bench.readme_table([nvl(1, 6000.0), peer("torch", 2, "off", None), peer("torch", 2, "on", None)])
    assert "| transformers + PEFT LoRA, text, 2048, 1, micro-batch 2: 2 tries (oom) | - |" in table


@pytest.mark.slow
def test_peer_tries_on_cpu_record_what_ran(tmp_path):
    """--peer-only at toy size on CPU, mamba-ssm importable only through the stand-in (a fake package laid out like
    mamba-ssm): transformers resolves the scan to mamba-ssm's kernel but runs PyTorch on CPU inputs, and the record
    says so; gradient checkpointing recomputes every Mamba mixer in backward (twice the calls)."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations import hub_kernels

    if not hasattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES"):
        pytest.skip(f"transformers {transformers.__version__} sends CPU inputs to mamba-ssm's kernels too")
    fake = fake_mamba_ssm(tmp_path / "fake", MAMBA1)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(BENCH), "--peer-only", "--size", "tiny", "--device", "cpu", "--peer-seqs", "64",
           "--peer-batches", "2", "--peer-checkpointing", "off,on", "--warmup", "0", "--peer-steps", "1",
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "finetune_gpu.json").read_text())
    assert [(r["system"], r["variant"]) for r in records] == [
        ("transformers+peft", {"mamba": m, "gradient_checkpointing": c, "micro_batch_size": 2})
        for m in ("torch", "mamba-ssm triton") for c in ("off", "on")]
    for r in records:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["mamba_ops_ran"] == "Mamba ops in PyTorch", r
        assert "0 in mamba-ssm's Triton kernel" in r["kernels"]["scan"], r["kernels"]
    torch_off, torch_on, triton_off, triton_on = records
    assert "blocked" in torch_off["setup"]["mamba_ssm"]
    assert "-> transformers' own PyTorch code" in torch_off["kernels"]["scan"]
    assert "stand-in for selective_scan_cuda" in triton_off["setup"]["mamba_ssm"]
    assert "-> mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined" in triton_off["kernels"]["scan"]
    assert triton_off["versions"]["mamba_ssm"] == "0.0-fake"

    def calls(r):
        return int(r["kernels"]["scan"].split("; ")[1].split(" calls")[0])

    assert calls(torch_on) == 2 * calls(torch_off) > 0 and calls(triton_on) == 2 * calls(triton_off)
    md = (tmp_path / "out" / "finetune_gpu.md").read_text()
    assert "every try" in md and "micro-batch 2, Mamba ops in PyTorch, gradient checkpointing" in md
