"""Side-by-side forward+backward timings of the Mamba ops' implementations at the 12B shapes (one H200).

Shapes per GPU at TP=1 (Nemotron-Nano-12B-v2): 128 heads x 80, 8 groups, state 128, sequence 4096;
the conv runs over ``d_inner + 2 groups state = 12,288`` channels, the gated norm over 10,240 in groups
of 1,280; the loss over a 131,072-entry vocabulary from hidden 5,120. Each candidate is timed with CUDA
events (median of ``--reps`` after warm-up), forward+backward, bf16 inputs as under autocast, and its
peak extra memory recorded. Candidates that cannot be imported are recorded as missing.

    python bench/kernels_gpu.py --out bench/results          # writes kernels_gpu.json / .md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "plugins" / "nvl-nemotron-vl"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def time_fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor], reps: int) -> dict[str, float]:
    def step() -> None:
        out = fn()
        torch.autograd.grad(out.float().sum(), inputs)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return {"ms": round(times[len(times) // 2], 3),
            "peak_extra_gb": round((torch.cuda.max_memory_allocated() - base) / 1e9, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--no-compiled", action="store_true",
                    help="leave out the torch.compile reference (slow to compile)")
    args = ap.parse_args(argv)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    from nvl_nemotron_vl.model import kernels as K
    from nvl_nemotron_vl.model.ssd import compiled_ssd_scan, ssd_scan_reference

    dev = "cuda"
    L, h, p, g, n = args.seq, 128, 80, 8, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(1, L, h, p, device=dev, generator=gen).to(bf).requires_grad_()
    dt = (torch.randn(1, L, h, device=dev, generator=gen) - 2).to(bf).requires_grad_()
    A_log = torch.log(torch.rand(h, device=dev, generator=gen) * 8 + 1).requires_grad_()
    B = (torch.randn(1, L, g, n, device=dev, generator=gen) / n**0.5).to(bf).requires_grad_()
    C = (torch.randn(1, L, g, n, device=dev, generator=gen) / n**0.5).to(bf).requires_grad_()
    D = torch.randn(h, device=dev, generator=gen).requires_grad_()
    dt_bias = torch.zeros(h, device=dev).requires_grad_()
    scan_in = [x, dt, A_log, B, C, D, dt_bias]
    results: dict[str, Any] = {"date": _dt.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
                               "torch": torch.__version__, "shapes": {"seq": L, "heads": h, "head_dim": p,
                                                                      "groups": g, "state": n}, "ops": {}}
    cands: dict[str, Callable[..., Any]] = {
        "reference (eager fp32)": K._fp32_scan(ssd_scan_reference),
    }
    if not args.no_compiled:
        cands["reference (torch.compile)"] = K._fp32_scan(compiled_ssd_scan())
    mamba = K._try(K._mamba_triton)
    fla = K._try(K._fla)
    if mamba:
        cands["mamba-ssm mamba_chunk_scan_combined"] = K._mamba_scan(mamba["scan"])
    else:
        results["ops"]["scan: mamba-ssm"] = {"status": "missing"}
    if fla:
        cands["fla chunk_simple_gla"] = K._fla_scan(fla["simple_gla"])
    else:
        results["ops"]["scan: fla"] = {"status": "missing"}
    def flush() -> None:
        (outdir / "kernels_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
        lines = [f"# Mamba ops at the 12B shape, forward+backward ({results['date']}, {results['gpu']}, torch "
                 f"{results['torch']})",
                 "", f"seq {L}, {h} heads x {p}, {g} groups, state {n}; bf16 inputs; median of {args.reps}.", "",
                 "| op / implementation | fwd+bwd ms | peak extra GB | rel. error vs reference | status |",
                 "|---|---|---|---|---|"]
        for k, v in results["ops"].items():
            lines.append(f"| {k} | {v.get('ms', '-')} | {v.get('peak_extra_gb', '-')} | "
                         f"{v.get('rel_err_vs_reference', '-')} | {v['status']} |")
        (outdir / "kernels_gpu.md").write_text("\n".join(lines) + "\n")

    ref_out = None
    for chunk in (128, 256):
        for name, fn in cands.items():
            key = f"scan: {name}, chunk {chunk}"
            try:
                out = fn(x, dt, A_log, B, C, chunk, D, dt_bias).float()
                if ref_out is None:
                    ref_out = out.detach()
                err = float((out.detach() - ref_out).norm() / ref_out.norm())
                r = time_fwd_bwd(lambda fn=fn, chunk=chunk: fn(x, dt, A_log, B, C, chunk, D, dt_bias), scan_in,
                                 args.reps)
                results["ops"][key] = {"status": "ok", "rel_err_vs_reference": round(err, 6), **r}
            except Exception as exc:
                results["ops"][key] = {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
            print(key, results["ops"][key], flush=True)
            flush()
            torch.cuda.empty_cache()
    def time_candidates(op: str, candidates: dict[str, Callable[[], torch.Tensor]], inputs: list[torch.Tensor]) -> None:
        """Forward+backward of each implementation of ``op``; a failing one is recorded with its error."""
        for name, fn in candidates.items():
            key = f"{op}: {name}"
            try:
                results["ops"][key] = {"status": "ok", **time_fwd_bwd(fn, inputs, args.reps)}
            except Exception as exc:
                results["ops"][key] = {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
            print(key, results["ops"][key], flush=True)
            flush()

    # conv
    conv_dim = h * p + 2 * g * n
    xc = torch.randn(1, L, conv_dim, device=dev, generator=gen).to(bf).requires_grad_()
    wc = (torch.randn(conv_dim, 1, 4, device=dev, generator=gen) * 0.5).requires_grad_()
    bc = torch.randn(conv_dim, device=dev, generator=gen).requires_grad_()
    conv_c = {"reference F.conv1d (autocast bf16)": lambda: _autocast(K.conv_reference, xc, wc, bc)}
    if fla:
        conv_c["fla causal_conv1d"] = lambda: K._fla_conv(fla["conv"])(xc, wc, bc)
    time_candidates("conv", conv_c, [xc, wc, bc])
    # gated norm
    y = torch.randn(1, L, h * p, device=dev, generator=gen).to(bf).requires_grad_()
    z = torch.randn(1, L, h * p, device=dev, generator=gen).to(bf).requires_grad_()
    wn = torch.ones(h * p, device=dev).requires_grad_()
    norm_c = {"reference (fp32 PyTorch)": lambda: K.gated_norm_reference(y, z, wn, 1e-5, h * p // g)}
    if mamba:
        norm_c["mamba-ssm rmsnorm_fn"] = lambda: K._triton_gated_norm(mamba["rmsnorm"])(y, z, wn, 1e-5, h * p // g)
    if fla:
        norm_c["fla rmsnorm_fn"] = lambda: K._triton_gated_norm(fla["rmsnorm"])(y, z, wn, 1e-5, h * p // g)
    time_candidates("gated_norm", norm_c, [y, z, wn])
    # the folded RMSNorm (hidden 5120, bf16 activations, bf16 frozen weight as in a LoRA run)
    from nvl_nemotron_vl.model.mlp import squared_relu
    from nvl_nemotron_vl.model.parallel import rms_norm

    xr = torch.randn(1, L, 5120, device=dev, generator=gen).to(bf).requires_grad_()
    wr = torch.ones(5120, device=dev, dtype=bf)
    rms_c = {"reference (fp32 PyTorch)": lambda: rms_norm(xr, wr, 1e-5)}
    if mamba:
        rms_c["mamba-ssm layer_norm_fn"] = lambda: K._triton_norms(mamba["layer_norm"])["rms"](xr, wr, None, 1e-5)
    # the squared ReLU over the MLP's 20480 channels
    xa = torch.randn(1, L, 20480, device=dev, generator=gen).to(bf).requires_grad_()
    act_c = {"reference (PyTorch)": lambda: squared_relu(xa), "torch.compile": lambda: K._compiled_squared_relu()(xa)}
    time_candidates("norm", rms_c, [xr])
    time_candidates("relu2", act_c, [xa])
    # loss
    from nvlcore.parallel import init_parallel

    init_parallel(1)
    hid = torch.randn(1, L, 5120, device=dev, generator=gen).to(bf).requires_grad_()
    W = (torch.randn(131072, 5120, device=dev, generator=gen) * 0.01).to(bf)
    labels = torch.randint(0, 131072, (1, L), device=dev, generator=gen)

    def logits_fn(t: torch.Tensor) -> torch.Tensor:
        return t @ W.t()

    def full() -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits_fn(hid).float(), labels)

    for name, fn in {"full logits (fp32 copy)": full,
                     "chunked (2048 tokens)": lambda: K.chunked_vocab_parallel_loss(hid, labels, logits_fn)}.items():
        try:
            results["ops"][f"loss: {name}"] = {"status": "ok", **time_fwd_bwd(fn, [hid], args.reps)}
        except Exception as exc:
            results["ops"][f"loss: {name}"] = {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
        print(name, results["ops"][f"loss: {name}"], flush=True)
        flush()
    flush()
    return 0


def _autocast(fn: Callable[..., torch.Tensor], *a: Any) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return fn(*a)


if __name__ == "__main__":
    sys.exit(main())
