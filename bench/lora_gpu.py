#!/usr/bin/env python
"""LoRA throughput on one GPU: nvl's LoRA on the ``12b-shape`` model beside transformers + PEFT.

What it runs (batch 1, text only, random weights, nothing downloaded):

1. **nvl**: the Nemotron VL training model at the real 12B shape built directly on the GPU in bf16
   (``nvl_nemotron_vl`` toy config ``12b-shape``, random init on the device), LoRA r=16 alpha=32 on the
   language model's ``linear_qkv``/``linear_proj``/``linear_fc1``/``linear_fc2`` with every base weight
   frozen, loss over all tokens, AdamW on the adapters; ``--seq`` (4096) tokens per step.
   Correctness checks first: with fresh adapters (B = 0) the loss equals the un-adapted model's, and
   after the timed steps merging the adapters into the base reproduces the adapted loss.
2. **peer**: transformers ``NemotronHForCausalLM`` at the same LM shape, random bf16 weights, PEFT
   LoRA r=16 alpha=32 on q/k/v/o/up/down projections (what a user would pick instead;
   ../shared/reference/performance-anchors.md measured 386 tokens/s at seq 1024 and OOM at 4096),
   at ``--peer-seqs`` (1024 and 4096), an out-of-memory recorded as such.

MFU convention: LoRA with a frozen base does no weight-gradient GEMMs, so its model FLOPs are 2/3 of
full training's (forward 1x + input-gradient 1x, against 1x + 2x). We use Megatron-Bridge's hybrid
LM formula for full training (``bridge.flops_per_token``, 3x forward; ~7.14e10 FLOP/token at 4096),
times 2/3, plus the adapters' own FLOPs; MFU is that over the measured dense bf16 peak (``--peak-tflops``,
790). We also print "nominal" TFLOP/s with the full-training 3x formula, which is how the anchor's
27.5 TFLOP/s for the peer was computed.

Writes ``lora_gpu.json`` and ``lora_gpu.md`` under ``--out``. ``--size tiny --device cpu`` runs the
same code in seconds (used by the tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in [ROOT, *sorted((ROOT / "plugins").glob("*/"))]:
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

_missing = [m for m in ("pluggy", "attrs", "click", "yaml", "megatron.core", "safetensors")
            if __import__("importlib").util.find_spec(m.split(".")[0]) is None]
if _missing:
    sys.exit(f"lora_gpu.py needs {', '.join(_missing)} (nvlcore's dependencies); pip install them, or "
             "`pip install -e . -e plugins/nvl-lora -e plugins/nvl-nemotron-vl` from the repository root")

LM_TARGETS = ["*language_model*.linear_qkv", "*language_model*.linear_proj", "*language_model*.linear_fc1",
              "*language_model*.linear_fc2"]
PEER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------ nvl
def nvl_config(size: str) -> Any:
    import tempfile

    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        ids = write_toy_tokenizer(Path(tmp))
    raw = toy_config(size, ids)
    return NemotronVLConfig.from_dict(raw, source=f"toy:{size}", num_prefix_tokens=num_prefix_tokens(size))


def text_tokens(cfg: Any, n: int) -> torch.Tensor:
    """``[1, n]`` random token ids without image/video context tokens (a text-only batch)."""
    ids = torch.randint(0, cfg.llm.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    specials = torch.tensor([t for t in (cfg.img_context_token_id, cfg.video_context_token_id) if t is not None])
    ids[torch.isin(ids, specials)] = 1
    return ids


def lora_flops_per_token(cfg: Any, seq: int, rank: int, adapter_io: list[tuple[int, int]]) -> tuple[float, float]:
    """(LoRA model FLOPs per token, full-training nominal FLOPs per token) at ``seq``."""
    from nvl_nemotron_vl.flops import lm_forward_flops
    from nvlcore.bridge import FROZEN_BASE_FLOPS_SHARE

    full = 3.0 * lm_forward_flops(cfg, [seq]) / seq
    # adapters: forward 2*r*(in+out) per token, backward input grads 1x + adapter weight grads 1x
    adapters = sum(3 * 2 * rank * (i + o) for i, o in adapter_io)
    return full * FROZEN_BASE_FLOPS_SHARE + adapters, full


def run_nvl(args: argparse.Namespace, device: torch.device, deadline: float) -> dict[str, Any]:
    from nvl_lora.config import LoRAConfig
    from nvl_lora.method import adapters, apply_lora, count_parameters, merge_lora
    from nvl_nemotron_vl.model import build_model

    res: dict[str, Any] = {"name": "nvl LoRA", "seq": args.seq, "size": args.size}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = nvl_config(args.size)
    t0 = time.perf_counter()
    model = build_model(cfg, dtype=dtype, device=device, init="random", seed=1)
    sync(device)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    log(f"nvl: built {args.size} in {res['build_s']} s")
    ids = text_tokens(cfg, args.seq + 1).to(device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def loss_fn() -> torch.Tensor:
        # (ruff sees the `del` at the end of run_nvl and calls these undefined; they are set above)
        return model(**batch).float().mean()  # noqa: F821

    with torch.no_grad():
        base_loss = float(loss_fn())
    lcfg = LoRAConfig(target_modules=LM_TARGETS, dim=16, alpha=32, freeze_language_model=True,
                      freeze_vision_model=True, freeze_vision_projection=True)
    from nvl_nemotron_vl.bridge import NemotronVLBridge

    report = apply_lora(model, lcfg, bridge=NemotronVLBridge(cfg))
    count = count_parameters(model)
    res["adapted_modules"] = len(report.adapted)
    res["trainable_params"] = count.trainable
    res["total_params"] = count.total
    with torch.no_grad():
        fresh_loss = float(loss_fn())
    res["check_fresh_adapter_loss_equals_base"] = {"base": base_loss, "with_adapters": fresh_loss,
                                                  "ok": abs(fresh_loss - base_loss) <= 1e-6 * max(1.0, abs(base_loss))}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ad_io = [(a.in_features, a.out_features) for a in adapters(model).values()]
    lora_fpt, full_fpt = lora_flops_per_token(cfg, args.seq, 16, ad_io)
    reset_peak(device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if time.time() > deadline:
            res["note"] = f"stopped after {step} steps: time budget"
            break
        sync(device)
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(dt)
        log(f"nvl: step {step} loss {losses[-1]:.4f} {dt:.3f} s")
    res["losses"] = losses
    res["peak_memory_gb"] = peak_gb(device)
    if times:
        s = sum(times) / len(times)
        res.update(step_s=s, tokens_per_s=args.seq / s, lora_flops_per_token=lora_fpt,
                   full_flops_per_token=full_fpt, tflops_lora=lora_fpt * args.seq / s / 1e12,
                   tflops_nominal_full=full_fpt * args.seq / s / 1e12)
        res["mfu_lora"] = res["tflops_lora"] / args.peak_tflops
    with torch.no_grad():
        adapted = float(loss_fn())
        merge_lora(model)
        merged = float(loss_fn())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    res["check_merge_reproduces_adapted_loss"] = {"adapted": adapted, "merged": merged,
                                                 "ok": abs(adapted - merged) <= tol * max(1.0, abs(adapted))}
    del model, opt, params, batch
    gc.collect()
    reset_peak(device)
    return res


# ----------------------------------------------------------------------------------------- peer
def peer_model(cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers' NemotronHForCausalLM with the toy's own ``llm_config`` (same shape as nvl's LM)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    fields = {k: v for k,
              v in dict(cfg.raw["llm_config"]).items() if k not in ("architectures", "model_type", "torch_dtype")}
    # No use_mamba_kernels: transformers 5.x ignores it and picks each Mamba op's implementation when its NemotronH
    # module is imported (mamba-ssm's if importable, else PyTorch); bench/finetune_gpu.py's peer sets that up.
    hcfg = NemotronHConfig(**fields)
    hcfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = NemotronHForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(old)
    return model


def run_peer(args: argparse.Namespace, device: torch.device, deadline: float) -> list[dict[str, Any]]:
    from peft import LoraConfig, get_peft_model

    from nvlcore.bridge import FROZEN_BASE_FLOPS_SHARE

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = nvl_config(args.size)
    t0 = time.perf_counter()
    model = peer_model(cfg, device, dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PEER_TARGETS))
    model.train()
    build_s = time.perf_counter() - t0
    log(f"peer: built in {build_s:.1f} s")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    out = []
    for seq in args.peer_seqs:
        res: dict[str, Any] = {"name": "transformers+PEFT LoRA", "seq": seq, "build_s": round(build_s, 1),
                               "trainable_params": sum(p.numel() for p in params)}
        if time.time() > deadline:
            res["result"] = "skipped: time budget"
            out.append(res)
            continue
        ids = text_tokens(cfg, seq).to(device)
        reset_peak(device)
        times = []
        try:
            for step in range(args.warmup + args.peer_steps):
                if time.time() > deadline:
                    break
                sync(device)
                t = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                dt = time.perf_counter() - t
                if step >= args.warmup:
                    times.append(dt)
                log(f"peer seq {seq}: step {step} loss {loss.item():.4f} {dt:.3f} s")
            res["result"] = "ok" if times else "no timed step (time budget)"
        except Exception as exc:  # an OOM is a result here, not a failure of the benchmark
            if not is_oom(exc):
                raise
            res["result"] = "out of memory"
            log(f"peer seq {seq}: out of memory")
        finally:
            loss = None
            opt.zero_grad(set_to_none=True)
            gc.collect()
        res["peak_memory_gb"] = peak_gb(device)
        if times:
            s = sum(times) / len(times)
            _, full_fpt = lora_flops_per_token(cfg, seq, 16, [])
            res.update(step_s=s, tokens_per_s=seq / s, tflops_lora=full_fpt * FROZEN_BASE_FLOPS_SHARE * seq / s / 1e12,
                       tflops_nominal_full=full_fpt * seq / s / 1e12)
            res["mfu_lora"] = res["tflops_lora"] / args.peak_tflops
        out.append(res)
    del model, opt, params
    gc.collect()
    reset_peak(device)
    return out


# ---------------------------------------------------------------------------------------- report
def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# LoRA throughput, {record['machine']['device']} ({record['date']})",
        "",
        f"Model shape `{record['args']['size']}`, batch 1, random weights, {record['dtype']}; LoRA r=16 alpha=32 "
        "on the LM's qkv/proj/fc1/fc2 (peer: q/k/v/o/up/down); base frozen; AdamW on the adapters.",
        "MFU = LoRA model FLOPs (2/3 of Megatron-Bridge's full-training hybrid formula + adapters) / "
        f"{record['args']['peak_tflops']:g} TFLOP/s. 'nominal' = full-training 3x formula (the anchor's convention).",
        "",
        "| run | seq | tokens/s | s/step | LoRA TFLOP/s | MFU | nominal TFLOP/s | peak GB | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(
            f"| {r['name']} | {r['seq']} | {fmt(r.get('tokens_per_s'))} | {fmt(r.get('step_s'), '.3f')} | "
            f"{fmt(r.get('tflops_lora'))} | {fmt(r.get('mfu_lora'), '.1%')} | {fmt(r.get('tflops_nominal_full'))} | "
            f"{fmt(r.get('peak_memory_gb'))} | {r.get('result', 'ok')} |"
        )
    nvl = record["runs"][0] if record["runs"] and record["runs"][0]["name"].startswith("nvl") else None
    if nvl:
        lines += ["", f"nvl: {nvl.get('adapted_modules')} adapted modules, {fmt(nvl.get('trainable_params'), ',')} "
                  f"trainable of {fmt(nvl.get('total_params'), ',')} parameters; checks: fresh adapters leave the loss "
                  f"unchanged = {nvl['check_fresh_adapter_loss_equals_base']['ok']}, merged = adapted "
                  f"= {nvl.get('check_merge_reproduces_adapted_loss', {}).get('ok')}"]
    peers = [r for r in record["runs"] if r["name"].startswith("transformers") and r.get("tokens_per_s")]
    if nvl and nvl.get("tokens_per_s") and peers:
        lines.append("")
        for p in peers:
            lines.append(f"nvl at seq {nvl['seq']} vs peer at seq {p['seq']}: "
                         f"{nvl['tokens_per_s'] / p['tokens_per_s']:.1f}x tokens/s")
    if record.get("errors"):
        lines += ["", "Errors:", *[f"- {e}" for e in record["errors"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for lora_gpu.json and lora_gpu.md")
    ap.add_argument("--size", default="12b-shape", choices=["tiny", "small", "12b-shape"])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peer-seqs", type=lambda s: [int(x) for x in s.split(",") if x], default=[1024, 4096])
    ap.add_argument("--peer-steps", type=int, default=2)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="measured dense bf16 peak of the GPU")
    ap.add_argument("--budget-s", type=float, default=500.0, help="stop starting new work after this many seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    start = time.time()
    deadline = start + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index; "cuda" means this process's first GPU
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or "cpu",
                    "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
        "errors": [],
        "dtype": "bf16" if device.type == "cuda" else "fp32",
    }
    try:
        import peft
        import transformers  # noqa: E401

        record["machine"].update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    try:
        record["runs"].append(run_nvl(args, device, deadline))
    except Exception as exc:
        record["errors"].append(f"nvl: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        if is_oom(exc):
            record["runs"].append({"name": "nvl LoRA", "seq": args.seq, "result": "out of memory",
                                   "peak_memory_gb": peak_gb(device)})
        gc.collect()
        reset_peak(device)
    if not args.skip_peer:
        try:
            record["runs"].extend(run_peer(args, device, deadline))
        except Exception as exc:
            record["errors"].append(f"peer: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    record["seconds"] = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_gpu.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    md = markdown(record)
    (args.out / "lora_gpu.md").write_text(md)
    print(md)
    ok = not record["errors"] and all(
        r.get("check_fresh_adapter_loss_equals_base", {}).get("ok", True)
        and r.get("check_merge_reproduces_adapted_loss", {}).get("ok", True)
        for r in record["runs"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
