"""Assemble bench/results/memory_gpu.json from visits H and I, then visit G's rows (run from the repository root).

Visits H and I (2026-12-07, one H100 80 GB each, torch 2.11.0+cu130) ran nvl at commit 133af2a's code for the
model and plan (after visit G's fixes: the host-built NF4 base, selective recomputation of the vision tower,
the plan's new order). Cards smaller than the H100 were emulated with a memory fraction of it
(``emulated: true``; the 80 GB rows too, at 80/85 of the H100's 85.0 GB). ``peak_gb`` is the driver's view
(nvidia-smi, sampled each second); ``allocated_gb`` the trainer's max_memory_allocated; ``plan_gb`` the
plan's estimate printed by the run. Visit G's rows (earlier code) follow, marked ``"visit": "G"``.
Command lines: visit_h_2026-12-07/command.sh, visit_i_2026-12-07/command.sh and CALLS.md beside this file.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW = HERE.parent
H100 = "NVIDIA H100 80GB HBM3"
#: the unconstrained packed MedPix run cannot be held by an 80 GB card (plan ~99 GB, refused in one line in
#: both visits): its baseline is the H200 record of visit F (2026-11-30, bench/results/finetune_gpu.json)
MEDPIX_H200 = 6262.1
#: visit G's unconstrained video run (H100, same card type, earlier code): the video row has no speed floor
VIDEO_G = 5938.1


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _visit_g() -> object:
    spec = importlib.util.spec_from_file_location("visit_g_assemble", RAW / "visit_g_2026-12-07" / "assemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def rows_h_i() -> list[dict]:
    """The current-code rows, one per table line of issue 22 (the full fine-tuning row: not run)."""
    pa = _load(RAW / "visit_h_2026-12-07" / "memory_gpu_pA.json")
    pb = _load(RAW / "visit_h_2026-12-07" / "memory_gpu_pB.json")
    pc = _load(HERE / "memory_gpu_pC.json")
    medpix_base, medpix, cord_base, cord = pa
    qlora_base, qlora, video_no_decord = pb
    video = pc[-1]
    medpix_base.update(status="refused by the plan", note="the plan refuses it in one line (~99 GB on an 84.5 GB "
                       "card, pA_bench.log); the row's baseline is the H200 record of visit F")
    medpix.update(baseline_tokens_per_s=MEDPIX_H200, note="baseline: H200, visit F (another card and run); auto "
                  "chose selective recomputation of the Mamba mixers and the vision tower")
    cord.update(note="auto chose selective recomputation of every module, 24 layers' activations and the "
                "optimizer state on the host (log in pA_logs.tgz); driver peak 47.9 GB is over the 44 GB target "
                "though under the 48 GB card, the plan (42.2) matched the allocated peak (42.4), not the driver's")
    qlora.update(note="out of memory in the forward (a 2.50 GiB allocation, = the 671M-parameter output layer's "
                 "NF4 weight dequantized in fp32); since fixed: the output layer stays bf16 "
                 "(quantize_module_filter) and the plan counts a dequantized weight; not re-measured")
    video_no_decord.update(status="error: decord not carried", note="the clips need decord on the device; "
                           "rerun in visit I with its wheel carried (the row below)")
    video.update(baseline_tokens_per_s=VIDEO_G, note="baseline: visit G's unconstrained run (H100, earlier "
                 "code); Megatron-Bridge runs this recipe at TP=8; here one GPU")
    qlora_full = {**qlora, "row": "qlora_24: full recomputation asked for (qlora_24_full)", "status": "timeout",
                  "tokens_per_s": None, "peak_gb": None, "allocated_gb": None, "plan_gb": None,
                  "variant": {**(qlora.get("variant") or {}), "model.recompute_granularity": "full"},
                  "note": "4 iterations did not finish inside the 160 s limit of the visit's last device "
                          "seconds (pD_bench.log); no figure"}
    rows = [medpix_base, medpix, cord_base, cord, qlora_base, qlora, qlora_full, video_no_decord, video,
            {"system": "nvl", "row": "full_tp2_80", "workload": "text", "method": "full", "seq": 4096, "gpus": 2,
             "tp": 2, "budget_gb": 80, "status": "not run", "date": "2026-12-07", "device": None,
             "note": "no two-GPU machine lent this session"}]
    for r in rows:
        r["visit"] = "I" if r is video or r is qlora_full else "H"
        r.setdefault("device", H100)
        for key in ("tokens_per_s", "peak_gb", "plan_gb", "baseline_tokens_per_s", "budget_gb", "emulated"):
            r.setdefault(key, None)
    return rows


def main() -> None:
    g = _visit_g()
    older = g.rows()
    for r in older:
        r["visit"] = "G"
    g.write(rows_h_i() + older, "visits H and I (current code) then G, 2026-12-07, one H100 80 GB", __doc__)


if __name__ == "__main__":
    main()
