"""Assemble bench/results/memory_gpu.json: visit K's rows, then visit J's QLoRA rows, visits H and I (the other
recipes) and visit G's (run from the repository root).

Visit K (2026-12-07, fifth session, one H100 80 GB, torch 2.11.0+cu130, code of bee2352 with this directory's
command.sh; CALLS.md beside this file) ran the QLoRA row to the end for the first time, with its unconstrained
baseline in the same bench run, and the CORD row at the recipe's global batch 32 with the pipelined host optimizer.
This H100 ran the same unconstrained QLoRA baseline at 3,874 tokens/s where visit J's H100 ran it at 5,621: the
ratios below are within one run and one machine, the absolute speeds of visit K are low.
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


def _reserved(log_name: str) -> float:
    """The largest ``mem_reserved_gb`` (torch.cuda.max_memory_reserved) of a run's metrics.jsonl in kB_logs.tgz."""
    import tarfile

    with tarfile.open(HERE / "kB_logs.tgz") as tar:
        text = tar.extractfile(f"metrics-{log_name}.jsonl").read().decode()  # type: ignore[union-attr]
    return round(max(json.loads(x)["mem_reserved_gb"] for x in text.splitlines() if x.strip()), 2)


def rows_k() -> list[dict]:
    qbase, qlora = json.loads((HERE / "memory_gpu_kA.json").read_text())
    cbase, cord = json.loads((HERE / "memory_gpu_kB.json").read_text())
    qbase.update(reserved_gb=_reserved("cord-lora-qlora_24-baseline"),
                 note="the unconstrained run (whole H100) of the QLoRA row's workload: bf16 base, LoRA on the LM and "
                      "both towers, CORD-like, global batch 4; iterations 2-4 averaged (3,904 / 3,736 / 3,990)")
    qlora.update(reserved_gb=_reserved("cord-lora-base_dtype=nf4-memory_plan=auto-memory_budget_gb=22-qlora_24"),
                 note="cap 22 GB (allocator 21.45 GB beside a 0.55 GB context at start); auto chose selective "
                      "recomputation of the Mamba mixers and the vision tower and 24 layers' activations on the host "
                      "(plan 21.4). Ran: 1,869 tokens/s (iteration 2; iteration 3 logged 1,970, iteration 4 was "
                      "profiled and the profile was lost: its file name had '=' signs, which the device's file return "
                      "refuses) = 48% of the baseline (target 50%: missed). The allocator's reservation reached its "
                      "cap (21.43 GB) and the driver saw 23.8 GB: 2.4 GB outside the allocator, over the plan's 1.5 GB "
                      "allowance, so the 22 GB target is missed on the driver's count (it fits a 24 GB card)")
    cbase.update(note="the unconstrained run (whole H100), global batch 32: killed at the 230 s limit the visit gave "
                      "each run, after its first iteration (193 s: the first full-vision-tower run on a fresh "
                      "machine compiles and autotunes its kernels); no speed. Its driver peak 74.2 GB is real")
    cord.update(peak_gb_sampled=cord.get("peak_gb"), peak_gb=None,
                reserved_gb=_reserved("cord-lora-memory_plan=auto-memory_budget_gb=44-cord_48"),
                note="cap 44 GB; auto chose selective recomputation of the Mamba mixers and the vision tower, 48 "
                     "layers' activations and the optimizer state on the host (plan 42.9, allocated 37.8, reserved "
                     "38.9). 2,508 tokens/s (iteration 2 of 2; no baseline finished in this run, so no ratio). The "
                     "driver peak is not known: the sampler (whole GPU, every second) started while the killed "
                     "baseline's 74.2 GB was still being released and recorded that (peak_gb_sampled); the bench now "
                     "waits for an idle GPU and kills a timed-out run's whole process group")
    out = [qbase, qlora, cbase, cord]
    for r in out:
        r["visit"] = "K"
    return out


def main() -> None:
    j = _module("visit_j_2026-12-07")
    older, g = j.rows_before_j()
    g.write(rows_k() + j.rows_j() + older, "visit K (QLoRA, CORD at global batch 32), visit J (QLoRA), visits "
            "H and I (the other recipes), then G; 2026-12-07, one H100 80 GB", __doc__)


if __name__ == "__main__":
    main()
