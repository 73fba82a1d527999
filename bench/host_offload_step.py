#!/usr/bin/env python3
"""Seconds per ``step()`` of the host-offloaded AdamW (``nvlcore/training/host_offload.py``).

Usage: ``python bench/host_offload_step.py [--values 32e6] [--tensors 16] [--steps 5] [--bf16]
[--before REV] [--variants fused,pipelined] [--chunk-mb 64] [--device cuda|cpu]``.

``--values`` trainable fp32 values in ``--tensors`` equal tensors, all offloaded (``offload_fraction=1``),
on the GPU when there is one (else on the CPU: no copies to overlap, only the host kernels differ). Each
variant is built afresh, stepped twice to warm up (state allocated, pinned buffers made), then timed over
``--steps`` steps, each ended by a device synchronisation; the variants take turns over ``--rounds``
rounds and the median is reported (a shared machine's load swings):

- ``foreach``: one chunk, torch's foreach CPU AdamW (the kernel before the fused one);
- ``fused``: one chunk, torch's fused CPU AdamW (copies and update in sequence);
- ``pipelined``: fused, chunks of ``--chunk-mb`` MB (default 64): the copies of one chunk overlap the
  update of another;
- ``before``: with ``--before REV``, the module as it was at that git revision (e.g. ``main``) or in
  that file, same load.

``--bf16`` stores the parameters in bf16 on the device (``store_params_in``: fp32 masters on the host).
Prints one line per variant and, last, a JSON object of them all.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _module_at(rev: str) -> types.ModuleType:
    """``nvlcore/training/host_offload.py`` as of git revision ``rev`` (or the file ``rev``, for a machine
    without the repository's history), as a module of its own."""
    if Path(rev).is_file():
        src = Path(rev).read_text()
    else:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:nvlcore/training/host_offload.py"],
                             check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType(f"host_offload_{rev}")
    exec(compile(src, f"host_offload@{rev}", "exec"), mod.__dict__)  # noqa: S102 - our own file at a revision
    return mod


def _time(make, args, device: str) -> float:
    import torch

    n = int(float(args.values)) // args.tensors
    torch.manual_seed(0)  # drawn on the device: filling GBs on the CPU would take longer than the timing
    params = [torch.nn.Parameter(torch.randn(n // 1024, 1024, device=device)) for _ in range(args.tensors)]
    opt = make([{"params": params, "weight_decay": 0.1}])
    if args.bf16:
        opt.store_params_in(torch.bfloat16)
    for p in params:
        p.grad = torch.randn(p.shape, device=device).to(p.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        opt.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    del opt, params
    gc.collect()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", default="32e6", help="trainable fp32 values in all (default 32e6)")
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-mb", type=float, default=64)
    ap.add_argument("--bf16", action="store_true", help="bf16 device parameters, fp32 masters on the host")
    ap.add_argument("--before", metavar="REV", help="also time the module at this git revision")
    ap.add_argument("--variants", help="comma-separated subset of foreach,fused,pipelined,before")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    args = ap.parse_args()
    import torch

    from nvlcore.training.host_offload import HostOffloadAdamW

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = {"lr": 1e-3, "offload_fraction": 1.0}
    chunk = int(args.chunk_mb * (1 << 20))
    variants = {
        "foreach": lambda g: HostOffloadAdamW(g, chunk_bytes=None, host_fused=False, **kw),
        "fused": lambda g: HostOffloadAdamW(g, chunk_bytes=None, host_fused=True, **kw),
        "pipelined": lambda g: HostOffloadAdamW(g, chunk_bytes=chunk, host_fused=True, **kw),
    }
    if args.before:
        old = _module_at(args.before).HostOffloadAdamW
        variants["before"] = lambda g: old(g, **kw)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "values": int(float(args.values)), "tensors": args.tensors,
           "bf16": args.bf16, "chunk_mb": args.chunk_mb, "steps": args.steps, "rounds": args.rounds,
           "before": args.before}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, make in variants.items():
            runs[name].append(_time(make, args, device))
    out = {name: statistics.median(t) for name, t in runs.items()}
    for name, t in runs.items():
        print(f"{name:10s} {out[name]:.4f} s/step (median of {', '.join(f'{x:.4f}' for x in t)})", flush=True)
    print(json.dumps({**env, "seconds_per_step": out}))


if __name__ == "__main__":
    main()
