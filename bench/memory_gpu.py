"""Issue 22's record: does each recipe fit the card it is meant for, through `nvl finetune` itself?

Each row of ``ROWS`` names a workload (bench/finetune_gpu.py's generated data), a method, a sequence length,
the card it must fit (``budget_gb``), the issue's peak target on that card (``target_gb``, passed to the run
as ``train.memory_budget_gb``: the plan sizes the run for it) and the options that make it fit. For every row
the same workload runs twice in the same invocation, each a fresh ``nvl finetune`` process timed from its own
metrics.jsonl:

* the **baseline**: unconstrained (the whole card, the row's ``baseline`` options: the best this workload runs
  at without the memory options), giving ``baseline_tokens_per_s``;
* the **row**: the fitting options with ``train.memory_budget_gb`` = the target, which nvl holds its caching
  allocator to (the target less the plan's 3.0 GB runtime allowance), on the card the row is for
  (``budget_gb``, e.g. 48 GB) emulated when the device is larger (``emulated: true``): the child process
  measures the CUDA context it holds and gives the caching allocator ``torch.cuda.set_per_process_memory_fraction``
  of the rest of that card (nvl keeps the lower of the two caps). A run that needs more fails as an
  out-of-memory, as on the real card. Until visit L the emulated card was the target itself and nvl set no cap
  of its own: the allocator filled the cap and the driver's peak passed the target by what grew outside it.

``peak_gb`` is the driver's view (nvidia-smi, sampled every second: the caching allocator's reservation plus
the CUDA context), ``reserved_gb`` the trainer's ``mem_reserved_gb`` (``torch.cuda.max_memory_reserved``),
``outside_allocator_gb`` the driver's peak less ``reserved_gb`` (CUDA context, kernel modules, cuBLAS and NCCL
memory the caching allocator does not count), ``allocated_gb`` the trainer's ``mem_gb``
(``torch.cuda.max_memory_allocated``), ``plan_gb`` the memory plan's estimate printed by the run before any
weights load, ``gpu_used_at_start_gb`` what nvidia-smi showed when the run started (after waiting for idle
GPUs: finetune_gpu.py's docstring). A run that fails with an out-of-memory is an ``"status": "oom"`` row.

Usage (one H200 or H100; the 12b shape needs no weights on disk with --random-init)::

    python bench/memory_gpu.py --rows medpix_packed_80,cord_48,qlora_24 --out bench/results
    python bench/memory_gpu.py --list                       # the rows and their commands' options
    # the video row: clips made beforehand where PyAV can encode (finetune_gpu.py --make-videos), then carried
    python bench/memory_gpu.py --rows video_8192_80 --videos .whl/videos --out bench/results --tag video
    # CPU smoke test at toy size (the test suite runs it): no budget is emulated on CPU
    python bench/memory_gpu.py --size tiny --device cpu --seq 256 --steps 2 --warmup 0 --rows cord_48

Records: ``memory_gpu.json`` (a list of rows in finetune_gpu.json's format plus ``budget_gb``, ``emulated``,
``target_gb``, ``device``, ``plan_gb``, ``allocated_gb``, ``reserved_gb``, ``outside_allocator_gb``,
``baseline_tokens_per_s``; a profiled row's ``profile_file``) and ``memory_gpu.md``. ``nvl finetune`` runs
with PyTorch's expandable segments (``PYTORCH_CUDA_ALLOC_CONF``, nvl's default), as a user's run does.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_gpu as fg  # noqa: E402  (the bench's own workloads and its nvl runner)

#: name -> the row: what it runs, the card it must fit, the options that make it fit and its baseline's options.
ROWS: dict[str, dict[str, Any]] = {
    "medpix_packed_80": dict(workload="medpix", method="lora", seq=4096, budget_gb=80, target_gb=72,
                             baseline={"dataset.packing": "best_fit"},
                             fit={"dataset.packing": "best_fit", "train.memory_plan": "auto"}),
    # CORD at the recipe's global batch (32, micro-batch 1): the host-offloaded optimizer step is paid once per 32
    "cord_48": dict(workload="cord", method="lora", seq=4096, budget_gb=48, target_gb=44, baseline={}, gbs=32,
                    fit={"train.memory_plan": "auto"}),
    # the same fitted with full recomputation instead of activation offloading (auto prefers offloading)
    "cord_48_full": dict(workload="cord", method="lora", seq=4096, budget_gb=48, target_gb=44, baseline={}, gbs=32,
                         fit={"model.recompute_granularity": "full", "optimizer.use_precision_aware_optimizer": "true",
                              "optimizer.optimizer_cpu_offload": "true", "optimizer.optimizer_offload_fraction": "1.0",
                              "train.memory_plan": "auto"}),
    # the same with the optimizer offloaded as before 2026-12-08 (fp32 weights on the GPU; auto's offload is now the
    # precision-aware one, bf16 linear weights with fp32 main grads): what the new layout buys, in the same run
    "cord_48_fp32_offload": dict(workload="cord", method="lora", seq=4096, budget_gb=48, target_gb=44, baseline={},
                                 gbs=32, fit={"optimizer.optimizer_cpu_offload": "true",
                                              "optimizer.optimizer_offload_fraction": "1.0",
                                              "train.memory_plan": "auto"}),
    # the same with the trained vision tower's weights and gradients bf16 on the GPU, fp32 masters on the host
    "cord_48_bf16": dict(workload="cord", method="lora", seq=4096, budget_gb=48, target_gb=44, baseline={}, gbs=32,
                         fit={"optimizer.use_precision_aware_optimizer": "true",
                              "optimizer.main_grads_dtype": "torch.bfloat16",
                              "optimizer.optimizer_cpu_offload": "true",
                              "optimizer.optimizer_offload_fraction": "1.0", "train.memory_plan": "auto"}),
    "qlora_24": dict(workload="cord", method="qlora", seq=4096, budget_gb=24, target_gb=22, baseline={},
                     vision_adapters=True,
                     fit={"peft.base_dtype": "nf4", "train.memory_plan": "auto"}),
    # the same with full recomputation of the language model asked for (the plan's next rung), not left to auto
    "qlora_24_full": dict(workload="cord", method="qlora", seq=4096, budget_gb=24, target_gb=22, baseline={},
                          vision_adapters=True,
                          fit={"peft.base_dtype": "nf4", "model.recompute_granularity": "full",
                               "train.memory_plan": "auto"}),
    # the NF4 base alone on a roomy cap (72 GB: nothing offloaded or recomputed), against the same baseline: what
    # the 4-bit decode costs by itself, to tell it from what qlora_24's recomputation and host copies cost
    "qlora_nf4_only": dict(workload="cord", method="qlora", seq=4096, budget_gb=80, target_gb=72, baseline={},
                           vision_adapters=True, fit={"peft.base_dtype": "nf4"}),
    # QLoRA as many 4-bit VLM recipes run it: adapters on the LM only, both towers frozen (and stored in NF4), beside
    # the same freezing in bf16
    "qlora_lm_24": dict(workload="cord", method="qlora", seq=4096, budget_gb=24, target_gb=22,
                        baseline={"model.freeze_vision_model": "True", "model.freeze_vision_projection": "True"},
                        fit={"model.freeze_vision_model": "True", "model.freeze_vision_projection": "True",
                             "peft.base_dtype": "nf4", "train.memory_plan": "auto"}),
    "qlora_text_24": dict(workload="text", method="qlora", seq=4096, budget_gb=24, target_gb=22, baseline={},
                          vision_adapters=True,
                          fit={"peft.base_dtype": "nf4", "train.memory_plan": "auto"}),
    "full_tp2_80": dict(workload="text", method="full", seq=4096, budget_gb=80, target_gb=76, tp=2, baseline={},
                        fit={"train.memory_plan": "auto"}),
    # the same with bf16 weights and gradients on the GPU and the fp32 masters and moments on the host
    # (optimizer.main_grads_dtype=torch.bfloat16: megatron-core's HybridDeviceOptimizer layout; auto never picks it)
    "full_tp2_bf16_80": dict(workload="text", method="full", seq=4096, budget_gb=80, target_gb=76, tp=2, baseline={},
                             fit={"optimizer.use_precision_aware_optimizer": "true",
                                  "optimizer.main_grads_dtype": "torch.bfloat16",
                                  "optimizer.optimizer_cpu_offload": "true",
                                  "optimizer.optimizer_offload_fraction": "1.0", "train.memory_plan": "auto"}),
    # the LLaVA-Video recipe (its YAML: seq 8192, 10 frames a clip; Megatron-Bridge runs it at TP=8) on one card;
    # needs --videos DIR (clips made by `finetune_gpu.py --make-videos DIR`)
    "video_8192_80": dict(workload="video", method="lora", seq=8192, budget_gb=80, target_gb=72, baseline={},
                          fit={"train.memory_plan": "auto"}),
}


def parse_plan_gb(log_text: str) -> float | None:
    """The plan's per-GPU estimate from a run's log: the last ``memory plan: ~N GB per GPU`` line's N."""
    found = None
    for line in log_text.splitlines():
        m = re.search(r"memory plan: ~([0-9]+(?:\.[0-9]+)?) GB per GPU", line)
        if m:
            found = float(m.group(1))
    return found


def write_data(args: argparse.Namespace, workloads: set[str], work: Path) -> dict[str, Path]:
    """The generated datasets the chosen rows read (the text workload needs none)."""
    data: dict[str, Path] = {}
    if "cord" in workloads:
        data["cord"] = fg.write_cord(work / "cord-v2", args.samples)
    if "medpix" in workloads:
        data["medpix"] = fg.write_medpix(work / "MedPix-VQA", args.samples)
    if "video" in workloads:
        if not args.videos:
            raise SystemExit("--rows: a video row needs --videos DIR, a folder of clips made by "
                             "`python bench/finetune_gpu.py --make-videos DIR`")
        data["video"] = fg.write_llava_video(work / "LLaVA-Video-178K", args.samples, Path(args.videos))
    return data


def device_info(device: str) -> tuple[str, float | None]:
    """(the device's name, its total memory in GB) or ("cpu", None)."""
    if device != "cuda":
        return "cpu", None
    import torch

    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / 1e9


def run_row(args: argparse.Namespace, name: str, row: dict[str, Any], model_dir: Path, data: dict[str, Path],
            work: Path, total_gb: float | None, baselines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The row's baseline (run once per workload and options: ``baselines`` keeps them) and the row itself,
    as finetune_gpu records with this bench's fields added; a baseline already run is not repeated."""
    method = "lora" if row["method"] == "qlora" else row["method"]
    extra = ("--lora-on-vision-model",) if row["method"] == "qlora" and row.get("vision_adapters") else ()
    args.tp = row.get("tp", 1)
    args.nproc = row.get("tp", 1) if row.get("tp", 1) > 1 else None
    seq = args.seq_override or row["seq"]
    # a row may run at its recipe's global batch (what a user runs): the optimizer step is amortised over it;
    # the tiny CPU smoke run keeps the command line's
    args.gbs = row.get("gbs", args.default_gbs) if args.size != "tiny" else args.default_gbs
    key = json.dumps([row["workload"], method, seq, args.tp, row["baseline"], extra, args.gbs])
    if name in getattr(args, "no_baseline", ()):  # a row whose target has no speed floor: its baseline is not run
        baselines.setdefault(key, {})
    fresh = key not in baselines
    if fresh:
        baselines[key] = fg.run_nvl(args, model_dir, data, row["workload"], method, row["baseline"], work, seq,
                                    extra_args=extra, name_suffix=f"-{name}-baseline")
    base = baselines[key]
    emulated = bool(total_gb and total_gb > row["budget_gb"])
    # the plan sizes the run for the target on that card (e.g. 72 GB on an 80 GB card: room to spare)
    fit_options = {**row["fit"], "train.memory_budget_gb": str(row.get("target_gb", row["budget_gb"]))}
    if emulated:  # the card; nvl itself holds the run to the target (train.memory_budget_gb) within it
        os.environ["NVL_BENCH_MEMORY_CAP_GB"] = str(row["budget_gb"])
    try:
        rec = fg.run_nvl(args, model_dir, data, row["workload"], method, fit_options, work, seq,
                         extra_args=extra, name_suffix=f"-{name}", profile=name in args.profile_rows)
    finally:
        os.environ.pop("NVL_BENCH_MEMORY_CAP_GB", None)
    out = []
    for kind, r in ((("baseline", base),) if fresh else ()) + (("row", rec),):
        r["method"] = row["method"] if kind == "row" else method
        r["row"] = name if kind == "row" else f"{name} (baseline)"
        r["allocated_gb"] = r.get("peak_gb")
        r["peak_gb"] = r.get("peak_gb_nvidia_smi", r.get("peak_gb"))
        r["reserved_gb"] = r.get("reserved_gb")  # the allocator's reservation beside the driver's peak
        r["outside_allocator_gb"] = r.get("outside_allocator_gb")
        log_path = Path(r.pop("_log", "") or "/nonexistent")
        r["plan_gb"] = parse_plan_gb(log_path.read_text()) if log_path.is_file() else None
        r["budget_gb"] = row["budget_gb"] if kind == "row" else None
        r["target_gb"] = row.get("target_gb") if kind == "row" else None
        r["emulated"] = emulated if kind == "row" else False
        r["baseline_tokens_per_s"] = base.get("tokens_per_s")
        r["baseline_peak_gb"] = base.get("peak_gb_nvidia_smi", base.get("peak_gb"))
        r["global_batch_size"] = args.gbs
        r["cap_gb"] = row["budget_gb"] if kind == "row" and emulated else None  # the emulated card
        out.append(r)
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    cols = ["row", "method", "workload", "seq", "GPUs", "budget GB", "emulated", "peak GB", "reserved GB", "plan GB",
            "tokens/s", "baseline tokens/s", "ratio", "status"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    lines = []
    for r in records:
        tps, base = r.get("tokens_per_s"), r.get("baseline_tokens_per_s")
        ratio = f"{tps / base:.0%}" if tps and base else ""
        lines.append(f"| {r.get('row')} | {r['method']} | {r['workload']} | {r['seq']} | {r['gpus']} | "
                     f"{r.get('budget_gb') or ''} | {r.get('emulated')} | {r.get('peak_gb')} | "
                     f"{r.get('reserved_gb')} | {r.get('plan_gb')} | "
                     f"{tps or ''} | {base or ''} | {ratio} | {r['status']} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return fg.child_main(argv[1:])
    if argv and argv[0] == "--list":
        for name, row in ROWS.items():
            print(f"{name}: {row}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="medpix_packed_80,cord_48,qlora_24")
    ap.add_argument("--seq", dest="seq_override", type=int, default=None, help="override every row's length")
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-baseline", default="", help="rows (comma-separated) run without their baseline")
    ap.add_argument("--profile-rows", default="", help="rows (comma-separated) whose last iteration is profiled "
                    "(torch.profiler's per-op table, profile_<run>.txt in --out: the row's profile_file); it and the "
                    "one before it are left out of the averages, so give --steps >= --warmup + 3")
    ns, rest = ap.parse_known_args(argv)
    fg.exit_on_sigterm()
    args = fg.parse_args(rest + ["--peer-seqs", "", "--profile", ""])
    args.seq_override = ns.seq_override
    args.no_baseline = tuple(n for n in ns.no_baseline.split(",") if n)
    args.profile_rows = tuple(n for n in ns.profile_rows.split(",") if n)
    args.default_gbs = args.gbs  # --gbs, for the rows that name no global batch of their own
    fg.__file__ = __file__  # run_nvl starts `python <this file> --child ...`: this bench's child entry
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="nvl-membench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in ns.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {sorted(ROWS)}")
    model_dir = fg.write_model_dir(work / f"model-{args.size}", args.size)
    data = write_data(args, {ROWS[n]["workload"] for n in names}, work)
    device, total_gb = device_info(args.device)
    records: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, Any]] = {}
    stem = fg.safe_name("memory_gpu" + (f"_{ns.tag}" if ns.tag else ""))
    for name in names:
        for r in run_row(args, name, ROWS[name], model_dir, data, work, total_gb, baselines):
            r.update(device=device, date=_dt.date.today().isoformat())
            records.append(r)
        (out / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n")
        (out / f"{stem}.md").write_text(markdown(records))
    fg.log(f"wrote {out / (stem + '.json')} and .md")
    return 0 if all(r["status"] in ("ok", "oom") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
