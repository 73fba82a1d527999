"""The memory plan's tables for docs/memory.md and docs/which-gpus.md, from the 12b-shape config (no
weights, CPU, a few seconds after imports): plan vs the peaks measured on GPUs, and what ``auto`` picks
for each recipe on each card size. Every figure printed here is the plan's estimate; the measured
column comes from the records the test of the plan reads.

Usage: ``python bench/memory_plan_table.py`` (markdown on stdout).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARDS_GB = (24, 48, 80, 141)


def bridge_12b():
    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    ids = write_toy_tokenizer(Path(tempfile.mkdtemp()))
    cfg = NemotronVLConfig.from_dict(toy_config("12b-shape", ids), num_prefix_tokens=num_prefix_tokens("12b-shape"))
    return NemotronVLBridge(cfg)


class _AllKeys:
    """A config with every key the plan can offer (4-bit base, optimizer and activation offload)."""

    class peft:
        base_dtype = None

    class optimizer:
        optimizer_cpu_offload = False
        use_precision_aware_optimizer = False

    class model:
        cpu_offloading = False


def main() -> None:

    sys.path.insert(0, str(ROOT / "plugins/nvl-nemotron-vl/tests"))
    import test_memory_plan as t

    from nvlcore.training.memory import GB, NF4_BYTES_PER_PARAM, MemoryPlanError, PlanInputs, estimate, fit

    b = bridge_12b()
    print("| run | tokens, tiles per micro-batch | measured peak GB | plan GB (allocated) | plan - measured |"
          " plan for the card GB |\n|---|---|---|---|---|---|")
    for label, inp, peak in t.recorded_rows() + t.ISSUE_ROWS:
        e = estimate(b, inp)
        print(f"| {label} | {e.workload[0]:,}, {e.workload[1]} | {peak} | {e.allocated / GB:.1f} | "
              f"{(e.allocated / GB - peak) / peak:+.1%} | {e.card / GB:.1f} |")
    lora = dict(global_batch_size=32, **t.LORA_LM)
    recipes = {
        "LoRA, text, seq 4096": PlanInputs(workload=(4096, 0), **lora),
        "LoRA, CORD-like receipts (7 tiles)": PlanInputs(workload=(2521, 7), **lora),
        "LoRA, MedPix-like packed, seq 4096": PlanInputs(packed=True, workload=(4096, 12), **lora),
        "LoRA, video seq 8192 (10 frames)": PlanInputs(seq_length=8192, workload=(8192, 10), **lora),
        "QLoRA (NF4 base, adapters on the LM and both towers), text, seq 4096": PlanInputs(
            workload=(4096, 0), base_bytes=NF4_BYTES_PER_PARAM, host_build=True, global_batch_size=32, peft=True,
            freeze_other=True,
            target_modules=t.LM_TARGETS + ("*vision_model*.linear_qkv", "*vision_model*.linear_proj",
                                           "*vision_model*.linear_fc1", "*vision_model*.linear_fc2"),
            frozen_groups={"language_model": True, "vision_model": True, "vision_projection": True}),
        "full FT, TP=2, text, seq 4096": PlanInputs(tp=2, global_batch_size=32, workload=(4096, 0)),
    }
    print("\nThe model built in its storage dtypes (frozen weights in bf16; an NF4 base built in host memory and "
          "quantized onto the GPU one weight at a time):\n")
    print("| recipe | " + " | ".join(f"{c} GB card" for c in CARDS_GB) + " |\n|---|" + "---|" * len(CARDS_GB))
    for name, inp in recipes.items():
        cells = []
        for card in CARDS_GB:
            try:  # the card's free memory: ~98% of its size once the context is up
                d = fit(b, _AllKeys, inp, card * GB * 0.98, mode="auto")
                host = f" (host ~{d.estimate.host / GB:.0f})" if d.estimate.host >= GB else ""
                cells.append(f"~{d.estimate.card / GB:.0f}{host}: "
                             + (" ".join(d.chosen.overrides) if d.chosen else "as is"))
            except MemoryPlanError as exc:
                closest = str(exc).split("fit: " if "Options that fit" in str(exc) else "is: ")[-1]
                cells.append("no; " + closest.split(" (or train")[0].split("; train.memory_plan")[0])
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
