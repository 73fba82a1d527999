"""Assemble bench/results/memory_gpu.json from visit G's raw parts (run from the repository root).

Visit G had one H100 80 GB (not an H200): the 80 GB rows ran on the real card; 48 and 24 GB cards were
emulated with a memory fraction of the H100. Parts: memory_gpu_p1/p2/p6.json (bench/memory_gpu.py:
each row beside its baseline), finetune_gpu_p5*/p7*/p8.json (bench/finetune_gpu.py with the variant shown
and NVL_BENCH_MEMORY_FRACTION for an emulated card; command lines in CALLS.md). ``peak_gb`` is the
driver's view (nvidia-smi, sampled each second); ``allocated_gb`` the trainer's max_memory_allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

RAW = Path(__file__).resolve().parent
OUT = RAW.parents[1]
H100 = "NVIDIA H100 80GB HBM3"
#: the unconstrained packed MedPix run cannot be held by an 80 GB card (plan ~99 GB, refused): its
#: baseline is the H200 record of visit F (2026-11-30, bench/results/finetune_gpu.json), another card and run
MEDPIX_H200 = 6262.1


def load(name: str) -> list[dict]:
    return json.loads((RAW / name).read_text())


def fg_row(name: str, *, row: str, budget: int, emulated: bool, plan_gb: float | None, base: float | None,
           method: str = "lora", note: str = "") -> dict:
    """A finetune_gpu part's record as a memory_gpu row."""
    r = dict(load(name)[0])
    r.pop("machine", None)
    allocated = r.get("peak_gb")
    r.update(row=row, method=method, budget_gb=budget, emulated=emulated, device=H100, plan_gb=plan_gb,
             baseline_tokens_per_s=base, allocated_gb=allocated, peak_gb=r.get("peak_gb_nvidia_smi"))
    if note:
        r["note"] = note
    return r


def main() -> None:
    """Visit G's rows alone (bench/results/memory_gpu.json now comes from visit I's assemble.py)."""
    write(rows(), "visit G 2026-12-07, one H100 80 GB", __doc__)


def rows() -> list[dict]:
    """Visit G's rows, as recorded."""
    p1, p2, p6 = load("memory_gpu_p1.json"), load("memory_gpu_p2.json"), load("memory_gpu_p6.json")
    medpix_auto = dict(p1[1], baseline_tokens_per_s=MEDPIX_H200,
                       note="baseline: H200, visit F (an H100 cannot hold the unconstrained packed run: plan "
                            "~99 GB, refused in one line, p1_bench.log)")
    cord_base, cord_48, lora2_base, qlora_24 = p2
    cord_base["row"] = "cord (baseline, unconstrained)"
    lora2_base["note"] = ("the plan this run printed (48.0 GB) left out the ViT activations its vision adapters "
                          "keep; fixed after the visit, the plan now gives 60.2 GB (test_memory_plan.py)")
    qlora_24.update(status="refused by the plan", note="plan ~34.9 GB: the NF4 base is quantized after a bf16 "
                    "build (~25 GB); with train.memory_plan=off the run dies in one line at the build "
                    "(finetune_gpu_p5c.json, the row below)")
    rows = [
        medpix_auto,
        fg_row("finetune_gpu_p8.json", row="medpix_packed_80: selective + 32 layers' activations on the host",
               budget=80, emulated=False, plan_gb=72.5, base=MEDPIX_H200,
               note="plan_gb from the plan's estimate of these settings (the run had train.memory_plan=off); "
                    "allocated 71.3 GB, reserved 81.9 GB: the caching allocator kept what the card had free"),
        fg_row("finetune_gpu_p7a.json", row="medpix_packed_80: selective + 20 layers' activations on the host",
               budget=80, emulated=False, plan_gb=76.8, base=MEDPIX_H200),
        fg_row("finetune_gpu_p5b.json", row="medpix_packed_80: selective only", budget=80, emulated=False,
               plan_gb=None, base=MEDPIX_H200, note="the plan refuses it (check mode); run with the plan off"),
        cord_base, cord_48,
        fg_row("finetune_gpu_p5a.json", row="cord_48: selective + optimizer state on the host", budget=48,
               emulated=True, plan_gb=60.3, base=cord_base["tokens_per_s"],
               note="the plan refuses it (~60.3 GB, finetune_gpu_p3.json); run with the plan off"),
        lora2_base, qlora_24,
        fg_row("finetune_gpu_p5c.json", row="qlora_24: full recompute, plan off", budget=24, emulated=True,
               plan_gb=34.9, base=lora2_base["tokens_per_s"], method="qlora"),
        fg_row("finetune_gpu_p7b.json", row="qlora, adapters on the LM, vision trains fully: auto on 48 GB",
               budget=48, emulated=True, plan_gb=36.7, base=cord_base["tokens_per_s"], method="qlora",
               note="plan 20% under the driver's peak: reserved ~11 GB above allocated (NF4 dequantized copies)"),
        *p6,
        {"system": "nvl", "row": "full_tp2_80", "workload": "text", "method": "full", "seq": 4096, "gpus": 2,
         "tp": 2, "budget_gb": 80, "status": "not run", "date": "2026-12-07", "device": None,
         "note": "no two-GPU machine this session; the plan's estimate (docs/which-gpus.md) is ~76-77 GB per GPU "
                 "with full recompute and the optimizer state on the host"},
    ]
    for r in rows:
        for key in ("tokens_per_s", "peak_gb", "plan_gb", "baseline_tokens_per_s", "budget_gb", "emulated"):
            r.setdefault(key, None)
    return rows


def write(rows: list[dict], title: str, doc: str) -> None:
    """bench/results/memory_gpu.json and .md from ``rows``."""
    (OUT / "memory_gpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| visit | row | method | workload | seq | budget GB | emulated | peak GB (driver) | allocated GB | "
             "plan GB | tokens/s | baseline tokens/s | ratio | status |", "|---" * 14 + "|"]
    for r in rows:
        tps, base = r.get("tokens_per_s"), r.get("baseline_tokens_per_s")
        ratio = f"{tps / base:.0%}" if tps and base else ""
        lines.append(f"| {r.get('visit', 'G')} | {r['row']} "
                     f"| {r['method']} | {r['workload']} | {r['seq']} | {r.get('budget_gb') or ''} | "
                     f"{r.get('emulated')} | {r.get('peak_gb') or ''} | {r.get('allocated_gb') or ''} | "
                     f"{r.get('plan_gb') or ''} | {f'{tps:,.0f}' if tps else ''} | {f'{base:,.0f}' if base else ''} | "
                     f"{ratio} | {r['status'][:60]} |")
    (OUT / "memory_gpu.md").write_text(
        f"# Memory record (issue 22), {title}\n\n" + doc.split("\n\n", 1)[1] + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
