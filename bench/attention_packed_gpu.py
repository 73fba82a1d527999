#!/usr/bin/env python
"""Packed causal attention at the 12B LM shape (40 query heads, 8 KV groups, head dim 128), forward +
backward, bf16: the block-diagonal causal mask through SDPA (what runs without a packed-attention
kernel) against the kernel ``model.kernels=auto`` picks (``Kernels.packed_attention``: PyTorch's varlen
flash attention), each with its largest relative error against the block mask in fp32 (math kernel).
Used to choose the packed attention kernel (issue 14); prints one markdown table.

    python bench/attention_packed_gpu.py --seq 4096 --sample 300 --rows 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--sample", type=int, default=300, help="tokens per packed sample")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "plugins" / "nvl-nemotron-vl"))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nvl_nemotron_vl.model.attention import packed_attention_mask
    from nvl_nemotron_vl.model.kernels import PackedSequences, select_kernels

    dev = torch.device("cuda")
    H, KV, D, L, b = 40, 8, 128, args.seq, args.rows
    torch.manual_seed(0)
    q = torch.randn(b * L, H, D, device=dev).to(torch.bfloat16).requires_grad_()
    k = torch.randn(b * L, KV, D, device=dev).to(torch.bfloat16).requires_grad_()
    v = torch.randn(b * L, KV, D, device=dev).to(torch.bfloat16).requires_grad_()
    seq_idx = (torch.arange(L, device=dev) // args.sample).to(torch.int32).expand(b, L).contiguous()
    packed = PackedSequences.of(seq_idx)
    go = torch.randn(b * L, H, D, device=dev)

    def masked(q, k, v):
        qb, kb, vb = (t.view(b, L, -1, D).transpose(1, 2) for t in (q, k, v))
        kb, vb = kb.repeat_interleave(H // KV, dim=1), vb.repeat_interleave(H // KV, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=packed_attention_mask(seq_idx, True))
        return o.transpose(1, 2).reshape(b * L, H, D)

    def run(fn, *ins):
        out = fn(*ins)
        return [out.detach(), *torch.autograd.grad(out.float(), ins, go)]

    def rel(a, r):
        return float((a.double() - r.double()).norm() / r.double().norm())

    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        ref = run(masked, *f32)
    kern = select_kernels("auto", "cuda")
    cands = {"SDPA block mask, bf16 (no kernel)": masked}
    if kern.packed_attention is not None:
        cands[kern.names["packed_attention"]] = lambda q, k, v: kern.packed_attention(q, k, v, packed)
    rows = []
    for name, fn in cands.items():
        try:
            got = run(fn, q, k, v)
            errs = ", ".join(f"{n} {rel(a, r):.1e}" for n, a,
                             r in zip(["out", "dq", "dk", "dv"], got, ref, strict=True))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                run(fn, q, k, v)
            torch.cuda.synchronize()
            rows.append((name, f"{(time.perf_counter() - t0) / args.reps * 1e3:.2f}", errs))
        except Exception as exc:  # reported in the table
            rows.append((name, f"failed: {exc!r}"[:200], ""))
    print(f"\npacked causal attention, {b} row(s) x {L} tokens of {args.sample}-token samples, "
          f"{H} heads / {KV} KV groups / dim {D}, bf16, fwd+bwd, torch {torch.__version__}\n")
    print("| kernel | ms fwd+bwd | relative error vs fp32 block mask (math) |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
