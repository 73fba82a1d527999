"""Full fine-tuning throughput and memory of nvl's trainer on Nemotron Nano V2 VL shapes.

Runs nvl's own training step (``nvlcore.training.trainer.Trainer.train_step``: bf16 autocast over fp32
master weights, fp32 gradient accumulation and reduction, global-norm clipping, fused AdamW) on a
**randomly initialised** model built directly on the device (no checkpoint files: ``--size 12b-shape``
has the real dimensions, ~13.2B parameters with the untied embedding and output layer), with synthetic image+text samples of exactly
``--seq`` tokens: each sample holds ``--tiles`` 512x512 image tiles (256 context tokens each) and
text, and the last ``--supervised`` tokens carry the loss.

It runs each activation-recomputation variant of ``--recompute`` (an out-of-memory one is recorded and
the next runs); with ``--compiled-scan`` (default on CUDA) the fastest one runs again with the Mamba
scan compiled by ``torch.compile`` (the model's ``set_scan("compiled")``). It records, per GPU and
variant: tokens/s (real tokens), TFLOP/s counting the LM *and* the vision encoder and projector (the bridge's ``train_flops``), the same LM-only "nominal" figure Megatron-Bridge would
print, MFU against the measured 790 TFLOP/s bf16 ceiling of an H200, step time, and peak memory
(allocated and reserved), and writes ``finetune_gpu.json`` and ``finetune_gpu.md`` under ``--out``.

Correctness checks (fail the run): the first loss is finite and near ln(vocab) for a random model,
every logged loss and gradient norm is finite, no update is skipped, parameters change.

Memory plan (see docs/finetune.md, "Precision and memory"): fp32 master parameters + fp32 gradients
+ fp32 Adam moments = 16 bytes per trainable parameter; at TP=2 the ~13.2B model is ~6.6B parameters
per GPU = ~105 GB, plus the bf16 weight copies autocast caches during a step (~13 GB) and the
activations of one micro-batch. ``--print-memory-plan`` prints the estimate and exits.

Usage (two H200s, the lead's command)::

    python bench/finetune_gpu.py --size 12b-shape --tp 2 --nproc 2 --seq 4096 --steps 4 --out /tmp/out
    # CPU smoke test at toy size (what the test suite runs):
    python bench/finetune_gpu.py --size tiny --device cpu --tp 1 --seq 256 --steps 2 --out /tmp/out

``--nproc N`` starts N processes itself (torch.distributed.run); under ``torchrun`` leave it out.
Needs (besides torch and megatron-core): attrs, pluggy, pyyaml, tokenizers (pure Python except
tokenizers, which transformers brings); ``pip install --no-index --find-links .whl attrs pluggy pyyaml``
if the machine lacks them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "plugins" / "nvl-nemotron-vl"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

H200_BF16_TFLOPS = 790.0  # measured dense bf16 matmul ceiling (shared/reference/performance-anchors.md)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="12b-shape", help="toy size of nvl_nemotron_vl.toy: tiny, small, 12b-shape")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    ap.add_argument("--nproc", type=int, default=None, help="start this many processes (torch.distributed.run)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sample (context tokens included)")
    ap.add_argument("--tiles", type=int, default=4, help="512x512 image tiles per sample")
    ap.add_argument("--supervised", type=int, default=None, help="supervised tokens per sample (default seq/4)")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches (of 1 sample) per step per DP rank")
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, required=True, help="directory for finetune_gpu.json and finetune_gpu.md")
    ap.add_argument("--recompute", default="ssm,none",
                    help="comma list of activation-recomputation variants to run in turn: none, ssm, layers "
                         "(an out-of-memory variant is recorded and the next one runs)")
    ap.add_argument("--compiled-scan", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the fastest variant with torch.compile(ssd_scan) installed (default: on for cuda)")
    ap.add_argument("--print-memory-plan", action="store_true", help="print the memory estimate and exit")
    return ap.parse_args(argv)


def model_config(size: str):
    """The bridge config of a toy size (the real schema); ``12b-shape`` has the released model's dimensions."""
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        token_ids = write_toy_tokenizer(Path(tmp))
        raw = toy_config(size, token_ids)
    cfg = NemotronVLConfig.from_dict(raw, source=f"toy:{size}", num_prefix_tokens=num_prefix_tokens(size))
    return cfg, raw, token_ids


def synthetic_batch(cfg, raw, token_ids, *, seq: int, tiles: int, supervised: int, image_size: int, seed: int, device):
    """One sample of exactly ``seq`` tokens: text, ``tiles`` x (<img> 256 x <image> </img>), text; the last
    ``supervised`` positions carry the loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = cfg.num_image_token
    img, start, end = token_ids["<image>"], token_ids["<img>"], token_ids["</img>"]
    vocab = int(raw["llm_config"]["vocab_size"])
    special = {img, start, end, token_ids.get("<video>", -1)}
    block = tiles * (n_img + 2)
    if block + supervised + 2 > seq:
        raise ValueError(f"--seq {seq} cannot hold {tiles} tiles ({block} tokens) and {supervised} supervised tokens")
    ids = torch.randint(300, vocab, (seq,), generator=g)
    for s in special:  # random text must not contain image tokens
        ids[ids == s] = 301
    pos = 16
    for _ in range(tiles):
        ids[pos] = start
        ids[pos + 1: pos + 1 + n_img] = img
        ids[pos + 1 + n_img] = end
        pos += n_img + 2
    labels = torch.cat([ids[1:], torch.tensor([-100])])
    loss_mask = torch.zeros(seq)
    loss_mask[seq - supervised - 1: seq - 1] = 1.0
    pixel = torch.randn(tiles, 3, image_size, image_size, generator=g).clamp_(-2, 2)
    return {
        "input_ids": ids.unsqueeze(0), "labels": labels.unsqueeze(0), "loss_mask": loss_mask.unsqueeze(0),
        "attention_mask": torch.ones(1, seq, dtype=torch.long), "pixel_values": pixel,
    }


def memory_plan(n_params_rank: int, seq: int, autocast: bool) -> dict[str, float]:
    gb = 1e9
    plan = {
        "fp32 parameters (master weights)": 4 * n_params_rank / gb,
        "fp32 gradients": 4 * n_params_rank / gb,
        "fp32 Adam moments": 8 * n_params_rank / gb,
    }
    if autocast:
        plan["bf16 weight copies cached by autocast during a step"] = 2 * n_params_rank / gb
    plan["total before activations"] = sum(plan.values())
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nvlcore.parallel import build_launch_args, launch, launched_by_torchrun

    if args.nproc and not launched_by_torchrun():
        child = [a for a in (argv if argv is not None else sys.argv[1:])]
        # drop --nproc N from the children's arguments
        out: list[str] = []
        skip = False
        for a in child:
            if skip:
                skip = False
                continue
            if a == "--nproc":
                skip = True
                continue
            if a.startswith("--nproc="):
                continue
            out.append(a)
        launch_args = build_launch_args(nproc_per_node=args.nproc, module="bench_finetune_gpu_worker", module_args=out)
        # run this file as a script, not a module: replace "-m module" by the path
        i = launch_args.index("-m")
        launch_args = launch_args[:i] + [str(Path(__file__).resolve())] + launch_args[i + 2:]
        return launch(launch_args)
    return run(args)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from nvlcore.parallel import destroy_parallel, init_parallel
    from nvlcore.training import optim
    from nvlcore.training.schedules import LRSchedule, WeightDecaySchedule
    from nvlcore.training.trainer import LoopSettings, Trainer

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.compiled_scan is None:
        args.compiled_scan = device_type == "cuda"
    ctx = init_parallel(args.tp, device_type=device_type, seed=args.seed)
    say = print if ctx.is_main else (lambda *_a, **_k: None)
    cuda = device_type == "cuda"
    result: dict = {"status": "started", "size": args.size, "tp": args.tp}
    try:
        cfg, raw, token_ids = model_config(args.size)
        from nvl_nemotron_vl.bridge import NemotronVLBridge
        from nvl_nemotron_vl.flops import lm_forward_flops

        bridge = NemotronVLBridge(cfg)
        t0 = time.perf_counter()
        model = bridge.build_model(dtype=torch.float32, device=ctx.device, init="random", seed=args.seed)
        if cuda:
            torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        named = optim.trainable_named_parameters(model)
        n_rank = sum(p.numel() for _, p in named)
        n_logical = sum(p.numel() * (ctx.tp_size if getattr(p, "tensor_model_parallel", False) else 1) for _, p in named)
        autocast = torch.bfloat16 if cuda else None
        plan = memory_plan(n_rank, args.seq, autocast is not None)
        say(f"model: {n_logical / 1e9:.3f}B parameters, {n_rank / 1e9:.3f}B on this rank (TP={ctx.tp_size}); "
            f"built in {build_s:.1f} s")
        for k, v in plan.items():
            say(f"  memory plan: {k}: {v:.2f} GB")
        if args.print_memory_plan:
            return 0
        opt = optim.build_optimizer(named, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.033,
                                    device_type=device_type)
        gbs = args.micro_batches * ctx.dp_size
        supervised = args.supervised or args.seq // 4
        image_size = int(raw["force_image_size"])
        micro = [synthetic_batch(cfg, raw, token_ids, seq=args.seq, tiles=args.tiles, supervised=supervised,
                                 image_size=image_size, seed=args.seed + 1000 * ctx.dp_rank + i, device=ctx.device)
                 for i in range(args.micro_batches)]
        flops_step = sum(bridge.train_flops(b) for b in micro) * ctx.dp_size
        lm_nominal_step = 3.0 * lm_forward_flops(cfg, [args.seq] * len(micro)) * ctx.dp_size
        tokens_step = args.seq * args.micro_batches * ctx.dp_size
        world = ctx.world_size
        vocab = int(raw["llm_config"]["vocab_size"])
        variants: dict[str, dict] = {}

        def run_variant(variant: str, label: str) -> dict:
            """Train --warmup + --steps steps with one recomputation setting; the record of that variant."""
            model.set_recompute(variant)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(
                model=model, ctx=ctx, optimizer=opt, named_params=named,
                lr_schedule=LRSchedule(max_lr=args.lr, min_lr=args.lr, decay_style="constant"),
                wd_schedule=WeightDecaySchedule(start=0.033, end=0.033),
                settings=LoopSettings(train_iters=args.warmup + args.steps, global_batch_size=gbs,
                                      num_microbatches=args.micro_batches, clip_grad=1.0, autocast_dtype=autocast),
            )
            before = {n: p.detach().flatten()[:64].clone() for n, p in named[:8]}
            steps: list[dict] = []
            res: dict = {}
            try:
                for i in range(args.warmup + args.steps):
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    r = trainer.train_step(micro)
                    if cuda:
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t
                    steps.append({"step": i + 1, "time_s": dt, "loss": r.loss, "grad_norm": r.grad_norm,
                                  "skipped": r.skipped, "timed": i >= args.warmup})
                    say(f"[{label}] step {i + 1}/{args.warmup + args.steps} "
                        f"{'(warm-up) ' if i < args.warmup else ''}{dt:.2f} s loss {r.loss:.4f} grad {r.grad_norm:.3f}"
                        + (f" peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if cuda else ""))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                for p in model.parameters():
                    p.grad = None
                res = {"status": "out of memory", "error": str(exc).splitlines()[0][:500]}
                say(f"[{label}] OUT OF MEMORY: {res['error']}")
            if not res:
                timed = [x for x in steps if x["timed"]]
                step_s = sum(x["time_s"] for x in timed) / len(timed)
                checks = {
                    "first loss finite and within 25% of ln(vocab)": math.isfinite(steps[0]["loss"])
                    and abs(steps[0]["loss"] - math.log(vocab)) < 0.25 * math.log(vocab),
                    "all losses and gradient norms finite": all(
                        math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in steps),
                    "no update skipped": not any(x["skipped"] for x in steps),
                    "parameters changed": any(
                        not torch.equal(before[n], p.detach().flatten()[:64]) for n, p in named[:8]),
                }
                tflops_gpu = flops_step / step_s / world / 1e12
                res = {
                    "status": "ok" if all(checks.values()) else "failed checks",
                    "step_time_s": step_s,
                    "tokens_per_s_per_gpu": tokens_step / step_s / world,
                    "tflops_per_gpu": tflops_gpu,
                    "tflops_per_gpu_lm_nominal": lm_nominal_step / step_s / world / 1e12,
                    "mfu_vs_790": tflops_gpu / H200_BF16_TFLOPS if cuda else None,
                    "checks": checks, "steps": steps,
                }
            if cuda:
                peak = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()],
                                    dtype=torch.float64, device=ctx.device)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                res.update(peak_allocated_gb=float(peak[0]) / 1e9, peak_reserved_gb=float(peak[1]) / 1e9)
            return res

        for variant in [v.strip() for v in args.recompute.split(",") if v.strip()]:
            variants[variant] = run_variant(variant, variant)
        ok = [v for v, r in variants.items() if r["status"] == "ok"]
        if ok and args.compiled_scan:
            # The fastest variant that fit, again with the Mamba scan compiled by torch.compile (Inductor).
            fastest = min(ok, key=lambda v: variants[v]["step_time_s"])
            label = f"{fastest}+compiled-scan"
            try:
                model.set_scan("compiled")
                variants[label] = run_variant(fastest, label)
            except Exception as exc:  # a compiler failure is a result too
                variants[label] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:1000]}
            finally:
                model.set_scan("reference")
            ok = [v for v, r in variants.items() if r["status"] == "ok"]
        best = min(ok, key=lambda v: variants[v]["step_time_s"]) if ok else None
        result = {
            "status": "ok" if best else "no variant ran cleanly",
            "what": "nvl trainer, full fine-tuning, random init, synthetic image+text samples",
            "size": args.size, "parameters": n_logical, "parameters_per_rank": n_rank,
            "tp": ctx.tp_size, "dp": ctx.dp_size, "world_size": world, "device": device_type,
            "gpu": torch.cuda.get_device_name(ctx.device) if cuda else platform.machine(),
            "device_total_gb": torch.cuda.get_device_properties(ctx.device).total_memory / 1e9 if cuda else None,
            "seq_length": args.seq, "tiles_per_sample": args.tiles, "supervised_per_sample": supervised,
            "micro_batches_per_rank": args.micro_batches, "global_batch": gbs,
            "precision": "fp32 master weights/grads/Adam, bf16 autocast compute" if autocast else "fp32",
            "flops_per_step": flops_step, "vision_share_of_flops": 1 - lm_nominal_step / flops_step,
            "memory_plan_gb": plan, "best_variant": best, "variants": variants,
            **({k: variants[best][k] for k in ("step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu",
                                                "tflops_per_gpu_lm_nominal", "mfu_vs_790")} if best else {}),
            "model_build_s": build_s,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "python": platform.python_version(),
        }
    except Exception as exc:
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "size": args.size, "tp": args.tp}
        raise
    finally:
        if ctx.is_main and not args.print_memory_plan:
            write_results(args.out, result)
        destroy_parallel(ctx)
    return 0 if result.get("status") == "ok" else 1


def write_results(out: Path, r: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_gpu.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    lines = [f"# nvl finetune throughput: {r.get('size')} ({r.get('status')})", ""]
    if "variants" in r:
        lines += [
            f"{r['date']}, {r['world_size']} x {r['gpu']}, TP={r['tp']} DP={r['dp']}, torch {r['torch']}.",
            f"{r['what']}; {r['parameters'] / 1e9:.2f}B parameters; seq {r['seq_length']} with "
            f"{r['tiles_per_sample']} tiles/sample ({r['vision_share_of_flops'] * 100:.1f}% of the FLOPs in the ViT and "
            f"projector); {r['micro_batches_per_rank']} micro-batches/step/rank; {r['precision']}.",
            "",
            "| variant (recompute[+scan]) | status | step s | tokens/s/GPU | TFLOP/s/GPU (LM+ViT) | TFLOP/s/GPU (LM nominal) | MFU vs 790 | peak alloc / reserved GB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v, x in r["variants"].items():
            mem = (f"{x['peak_allocated_gb']:.1f} / {x['peak_reserved_gb']:.1f}" if "peak_allocated_gb" in x else "-")
            if x["status"] in ("ok", "failed checks"):
                mfu = f"{x['mfu_vs_790'] * 100:.1f}%" if x.get("mfu_vs_790") is not None else "n/a (CPU)"
                lines.append(f"| {v} | {x['status']} | {x['step_time_s']:.2f} | {x['tokens_per_s_per_gpu']:,.0f} | "
                             f"{x['tflops_per_gpu']:.1f} | {x['tflops_per_gpu_lm_nominal']:.1f} | {mfu} | {mem} |")
            else:
                lines.append(f"| {v} | {x['status']} | - | - | - | - | - | {mem} |")
        lines += ["", "Memory plan per GPU: " + "; ".join(f"{k} {v:.1f} GB" for k, v in r["memory_plan_gb"].items())]
        for v, x in r["variants"].items():
            if "checks" in x:
                lines.append(f"Checks ({v}): " + "; ".join(f"{k}: {'ok' if ok else 'FAILED'}" for k, ok in x["checks"].items()))
    else:
        lines += [f"```\n{json.dumps(r, indent=1, default=str)}\n```"]
    (out / "finetune_gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
