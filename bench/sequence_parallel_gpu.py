"""Sequence parallelism (``model.sequence_parallel``) at TP=2 on two GPUs (NCCL): correctness, then speed.

Run with ``torchrun --nproc-per-node 2 bench/sequence_parallel_gpu.py --out DIR``. In order:

1. **Parity, fp32** (the ``small`` toy shape, random init, TF32 off): per-token loss and every gradient
   with sequence parallelism against the same model without it, on a 2-row batch with an image and on
   packed rows (3 samples), max abs differences; the negative control skips one reduce-scatter.
2. **Parity, bf16 autocast** (fp32 parameters as ``nvl finetune`` trains them, the model's GPU kernels).
3. **Step** at ``--size`` (default ``12b-shape``), bf16 parameters, batch 1, ``--seq`` text tokens: forward
   + backward of the loss with and without sequence parallelism, step time, tokens/s per GPU and peak
   memory (no optimizer: what sequence parallelism changes is the step's activations and collectives).

Writes ``sequence_parallel_<size>_<date>.json`` to ``--out`` (rank 0). ``--device cpu`` (gloo) runs the
fp32 parity and the step at a toy size as a smoke test of the script itself:
``torchrun --nproc-per-node 2 bench/sequence_parallel_gpu.py --device cpu --size tiny --seq 64 --out /tmp/sp``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "plugins" / "nvl-nemotron-vl"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _config(size: str):
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import BASE_VOCAB_SIZE, MULTIMODAL_TOKENS

    ids = {t: BASE_VOCAB_SIZE + i for i, t in enumerate(MULTIMODAL_TOKENS)}  # as bench/model_step_gpu.py
    ids.update(vocab_size=BASE_VOCAB_SIZE + len(MULTIMODAL_TOKENS), bos=1, eos=12, pad=0)
    return NemotronVLConfig.from_dict(toy_config(size, ids), source=f"toy:{size}",
                                      num_prefix_tokens=num_prefix_tokens(size))


def _batches(cfg, device) -> dict[str, dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    tok, img = cfg.num_image_token, cfg.img_context_token_id

    def text(n: int) -> list[int]:
        return torch.randint(30, 500, (n,), generator=g).tolist()

    def labelled(ids, **extra):
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        return {"input_ids": ids.to(device), "labels": labels.to(device), **extra}

    row0 = text(40) + [img] * tok + text(300)
    row1 = text(100) + [img] * tok + text(240)
    n = max(len(row0), len(row1))
    ids = torch.tensor([row0 + text(n - len(row0)), row1 + text(n - len(row1))])
    pixels = torch.randn(2, 3, cfg.force_image_size, cfg.force_image_size, generator=g).to(device)
    seq_idx = torch.tensor([[0] * 300 + [1] * 500 + [2] * 224]).to(device)
    return {"image": labelled(ids, pixel_values=pixels),
            "packed": labelled(torch.tensor([text(1024)]), seq_idx=seq_idx)}


def _loss_and_grads(model, batch, autocast: bool):
    import torch

    model.zero_grad(set_to_none=True)
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, torch.bfloat16, enabled=autocast):
        loss = model(**batch)
    loss.float().sum().backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


def _diff(a, b) -> dict[str, float]:
    (la, ga), (lb, gb) = a, b
    loss = (la - lb).abs().max().item()
    grad = max((ga[n] - gb[n]).abs().max().item() / max(ga[n].abs().max().item(), 1e-30) for n in ga)
    return {"loss_max_abs": loss, "grad_max_rel_to_max": grad}


def _skip_first_reduction():
    """A stand-in for the row-parallel reduce-scatter whose first call keeps this rank's own partial sum."""
    import torch

    from nvl_nemotron_vl.model import parallel

    class Skip(torch.autograd.Function):
        calls = 0

        @staticmethod
        def forward(ctx, x, tp):
            ctx.tp = tp
            Skip.calls += 1
            return parallel._seq_split(x, tp) if Skip.calls == 1 else parallel._seq_reduce_scatter(x, tp)

        @staticmethod
        def backward(ctx, grad):
            return parallel._seq_gather(grad, ctx.tp), None

    return Skip


def parity(cfg, device, *, autocast: bool, kernels: str) -> dict[str, Any]:
    import torch

    from nvl_nemotron_vl.model import build_model, parallel

    model = build_model(cfg, dtype=torch.float32, device=device, init="random", seed=0)
    model.set_kernels(kernels)
    out: dict[str, Any] = {}
    for name, batch in _batches(cfg, device).items():
        model.set_sequence_parallel(False)
        off = _loss_and_grads(model, batch, autocast)
        model.set_sequence_parallel(True)
        on = _loss_and_grads(model, batch, autocast)
        out[name] = _diff(off, on)
        if name == "image" and not autocast:  # negative control: one reduce-scatter skipped
            real = parallel._ReduceScatterToSequence
            parallel._ReduceScatterToSequence = _skip_first_reduction()
            try:
                out["negative_control_one_reduce_scatter_skipped"] = _diff(off, _loss_and_grads(model, batch, autocast))
            finally:
                parallel._ReduceScatterToSequence = real
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def step(cfg, device, seq: int, iters: int, warmup: int) -> dict[str, Any]:
    import torch

    from nvl_nemotron_vl.model import build_model

    model = build_model(cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
                        init="random", seed=0)
    model.set_kernels("auto")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(30, 500, (1, seq), generator=g).to(device)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    out: dict[str, Any] = {}
    for sp in (False, True, False, True):  # twice each, interleaved: the second pair is reported
        model.set_sequence_parallel(sp)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def one() -> float:
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=labels)
            (loss.float().sum() / seq).backward()
            return loss.detach()

        for _ in range(warmup):
            one()
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(iters):
            loss = one()
        if cuda:
            torch.cuda.synchronize(device)
        sec = (time.perf_counter() - t) / iters
        out["sequence_parallel" if sp else "plain"] = {
            "step_ms": round(sec * 1e3, 1), "tokens_per_s_per_gpu": round(seq / sec / 2, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
            "mean_loss": float(loss.float().mean()),
        }
    out["speedup"] = round(out["plain"]["step_ms"] / out["sequence_parallel"]["step_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", default="12b-shape")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args()

    import torch

    from nvlcore.parallel import init_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_parallel(2, device_type=args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__,
                              "args": {k: str(v) for k, v in vars(args).items()}}
    small = _config("small")
    record["parity_fp32"] = parity(small, device, autocast=False, kernels="reference")
    if rank == 0:
        print("parity fp32:", json.dumps(record["parity_fp32"]), flush=True)
    if device.type == "cuda":
        record["parity_bf16_autocast"] = parity(small, device, autocast=True, kernels="auto")
        if rank == 0:
            print("parity bf16 autocast:", json.dumps(record["parity_bf16_autocast"]), flush=True)
    if not args.skip_step:
        record["step"] = step(_config(args.size), device, args.seq, args.iters, args.warmup)
        if rank == 0:
            print("step:", json.dumps(record["step"]), flush=True)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"sequence_parallel_{args.size}_{dt.date.today().isoformat()}.json").write_text(
            json.dumps(record, indent=2) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
