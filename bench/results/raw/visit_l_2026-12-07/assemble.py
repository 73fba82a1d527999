"""Assemble bench/results/memory_gpu.json: visit L's QLoRA rows, then visit K's, visit J's, visits H and I (the other
recipes) and visit G's (run from the repository root).

Visit L (2026-12-07, sixth session, one H100 80 GB, torch 2.11.0+cu130, code of 19e8252; CALLS.md beside this
file) ran the QLoRA row on a 22 GB cap with the plan's 3.0 GB runtime allowance, beside full recomputation of the
language model asked for (qlora_24_full), both against their unconstrained baseline in the same bench run, and
profiled the QLoRA row's last iteration (profile_qlora_24.txt: the NF4 decode kernel took 37% of the step's GPU
time; fixed after the visit, not yet re-measured).
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW = HERE.parent


def rows_l() -> list[dict]:
    base, qlora, full = json.loads((HERE / "memory_gpu_lA.json").read_text())
    base.update(note="the unconstrained run (whole H100) of the QLoRA rows' workload: bf16 base, LoRA on the LM and "
                     "both towers, CORD-like, global batch 4; iterations 2-5 averaged (4,835 / 5,228 / 5,587 / "
                     "5,872: still warming up)")
    qlora.update(profile_file="profile_qlora_24.txt",
                 note="cap 22 GB; auto chose selective recomputation of the Mamba mixers and the vision tower and 32 "
                      "layers' activations on the host (plan 21.7; allocated 18.0, reserved 21.4, driver 22.8: 0.8 GB "
                      "over the 22 GB target, 1.4 GB outside the allocator). 2,238 tokens/s (iterations 2-3; 4 and 5 "
                      "are left out, 5 was profiled) = 42% of the baseline (target 50%: missed; ~44% against the "
                      "baseline's own iterations 2-3). The profile: the compiled NF4 decode kernel took 1.52 s of "
                      "4.10 s of GPU time a step (1.64 ms for a 105M-weight matrix), host copies of activations 0.92 s")
    full.update(note="cap 22 GB, model.recompute_granularity=full asked for; auto added nothing (plan 18.9; "
                     "allocated 13.7, reserved 14.1, driver 15.5: fits a 16 GB card). 2,032 tokens/s (iterations "
                     "2-5) = 38% of the baseline: full recomputation decodes every NF4 weight once more. The plan is "
                     "22% over the driver's peak here: not within the 10% the issue asks")
    out = [base, qlora, full]
    for r in out:
        r["visit"] = "L"
    return out


def main() -> None:
    k = runpy.run_path(str(RAW / "visit_k_2026-12-07" / "assemble.py"))  # its loader finds visit J's
    j = k["_module"]("visit_j_2026-12-07")
    older, g = j.rows_before_j()
    g.write(rows_l() + k["rows_k"]() + j.rows_j() + older, "visit L (QLoRA, profiled), visit K (QLoRA, CORD at global "
            "batch 32), visit J (QLoRA), visits H and I (the other recipes), then G; 2026-12-07, one H100 80 GB",
            __doc__)


if __name__ == "__main__":
    main()
