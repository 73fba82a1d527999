"""Assemble bench/results/memory_gpu.json: visit J's QLoRA rows, then visits H and I (current rows for the other
recipes), then visit G's (run from the repository root).

Visit J (2026-12-07, one H100 80 GB, torch 2.11.0+cu130) ran the QLoRA row with the compiled NF4 decode, the
bf16 output layer and the cap at the row's target as the driver counts it (CALLS.md beside this file). Its
unconstrained baseline ran in the same bench run. The other recipes' rows are visits H and I's (code of
133af2a, cards emulated with a fraction giving the allocator the whole card); see visit I's assemble.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW = HERE.parent


def _module(visit: str):
    spec = importlib.util.spec_from_file_location(f"assemble_{visit}", RAW / visit / "assemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def rows_j() -> list[dict]:
    base, qlora = json.loads((HERE / "memory_gpu_pA.json").read_text())
    base.update(note="the unconstrained run (whole H100) of the QLoRA row's workload: bf16 base, LoRA on the LM "
                "and both towers, CORD-like, global batch 4; plan 60.3 GB for the card, 56.0 allocated")
    qlora.update(note="cap 22 GB (allocator 21.45 GB beside a 0.55 GB context at start); auto chose selective "
                 "recomputation of the Mamba mixers and the vision tower and 16 layers' activations on the host "
                 "(plan 21.1); out of memory in the first forward at the loss: a 1,024 MiB allocation = one "
                 "2,048-token chunk's fp32 logits, which that plan did not count (it does now). The driver saw "
                 "24.0 GB: 2.5 GB outside the allocator by then (compiled kernels, cuBLAS), over the plan's 1.5 GB")
    retry = {k: qlora.get(k) for k in ("system", "workload", "method", "seq", "gpus", "tp", "budget_gb",
                                       "target_gb", "cap_gb", "emulated", "global_batch_size", "variant")}
    retry.update(row="qlora_24 (second try, the plan counting the loss chunk)", status="timeout",
                 tokens_per_s=None, peak_gb=None, allocated_gb=None, plan_gb=None,
                 baseline_tokens_per_s=base["tokens_per_s"], date="2026-12-07",
                 note="2 iterations did not finish inside 200 s, and the bench of that call dropped the child's "
                      "output on a timeout (fixed since): which options auto chose and where the time went are "
                      "unknown (pB_bench.log); the session's device time ran out")
    out = [base, qlora, retry]
    for r in out:
        r["visit"] = "J"
        r.setdefault("device", "NVIDIA H100 80GB HBM3")
    return out


def rows_before_j() -> tuple[list[dict], object]:
    """Visits H and I's rows of the other recipes, then visit G's; and visit G's assemble module (its ``write``)."""
    i = _module("visit_i_2026-12-07")
    g = i._visit_g()
    older = g.rows()
    for r in older:
        r["visit"] = "G"
    hi = [r for r in i.rows_h_i() if r.get("method") != "qlora" and not str(r.get("row", "")).startswith("qlora")]
    return hi + older, g


def main() -> None:
    older, g = rows_before_j()
    g.write(rows_j() + older, "visit J (QLoRA), visits H and I (the other recipes), then G; 2026-12-07, "
            "one H100 80 GB", __doc__)


if __name__ == "__main__":
    main()
