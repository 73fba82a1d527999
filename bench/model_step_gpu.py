"""One training step of the Nemotron Nano V2 VL model at the real (12B) shape on one GPU.

What it does, in order:

1. **Correctness on the device** (fp32, tiny toy checkpoint written to a temporary directory):
   the chunked SSD scan against the token-by-token recurrence; the LM against transformers'
   ``NemotronHForCausalLM`` and the whole VLM against the transformers-composed reference
   (``plugins/nvl-nemotron-vl/tests/support/nemotron_vl_testing.py``), max abs logit differences; bf16 vs fp32 on the
   same toy.
2. **Build** the ``--size`` model (default ``12b-shape``) in bf16 directly on the device, random
   init (or ``--hf-dir`` weights).
3. **Step**: batch 1, ``--seq`` LM tokens (default 4096) holding one image of ``--tiles`` tiles
   (default 13 = 12 + thumbnail, 13 x 256 = 3328 context tokens); forward + backward of the masked
   per-token loss, for each activation-recomputation variant in ``--recompute`` (``none``: store
   everything; ``ssm``: recompute the Mamba conv + scan + gated norm; ``layers``: recompute every
   layer). Reports step time, tokens/s, TFLOP/s (``nvl_nemotron_vl.flops``: LM over real tokens +
   ViT + projector) and peak memory; an out-of-memory variant is recorded as such.
4. **Split**: the ViT + projector forward+backward alone, one Mamba mixer, one attention layer and
   one MLP layer forward+backward, and the SSD scan alone, each at the step's shapes, scaled by
   the layer counts, to show where the step's time goes (whether the plain-PyTorch scan dominates).

Writes ``model_step_<size>_<device>_<date>.json`` and ``.md`` to ``--out``.

    python bench/model_step_gpu.py --out bench/results                 # on an H200
    python bench/model_step_gpu.py --size tiny --device cpu --seq 128 --tiles 3 --out /tmp/b   # CPU path
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# run from a checkout without installing; the reference models are the tests' support modules
for p in (ROOT, ROOT / "plugins" / "nvl-nemotron-vl", ROOT / "plugins" / "nvl-nemotron-vl" / "tests" / "support"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

H200_BF16_CEILING = 790e12  # measured dense bf16 matmul, performance-anchors.md


# ------------------------------------------------------------------------------------ helpers
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device, iters: int, warmup: int) -> float:
    """Mean seconds of ``fn`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def peak_memory_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (RSS, whole process)


def reset_peak(device) -> None:
    import gc

    import torch

    gc.collect()  # drop what a failed (out-of-memory) variant left behind before measuring the next
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def machine(device) -> dict[str, Any]:
    import torch

    info = {"host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except Exception:  # pragma: no cover - informational
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def toy_token_ids() -> dict[str, int]:
    from nvl_nemotron_vl.toy_tokenizer import BASE_VOCAB_SIZE, MULTIMODAL_TOKENS

    ids = {t: BASE_VOCAB_SIZE + i for i, t in enumerate(MULTIMODAL_TOKENS)}
    ids.update(vocab_size=BASE_VOCAB_SIZE + len(MULTIMODAL_TOKENS), bos=1, eos=12, pad=0)
    return ids


# --------------------------------------------------------------------------------- correctness
def correctness_checks(device) -> dict[str, Any]:
    """Device-side parity of the tiny toy against transformers (fp32), the scan against the recurrence."""
    import torch
    from nemotron_vl_testing import HFReferenceVLM, random_sequences

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.model.ssd import ssd_scan_reference, ssd_scan_sequential
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    out: dict[str, Any] = {}
    # TF32 would blur an fp32 comparison; the real run below is bf16 anyway.
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        b, L, h, p, gr, n = 1, 300, 8, 16, 2, 16
        x = torch.randn(b, L, h, p, generator=g, dtype=torch.float64)
        dtv = torch.nn.functional.softplus(torch.randn(b, L, h, generator=g, dtype=torch.float64) - 1)
        A = -torch.exp(torch.rand(h, generator=g, dtype=torch.float64) * 2)
        B = torch.randn(b, L, gr, n, generator=g, dtype=torch.float64)
        C = torch.randn(b, L, gr, n, generator=g, dtype=torch.float64)
        want, _ = ssd_scan_sequential(x, dtv, A, B, C)
        got, _ = ssd_scan_reference(*(t.float().to(device) for t in (x, dtv, A, B, C)), 64)
        out["ssd_scan_max_rel_diff"] = float((got.double().cpu() - want).abs().max() / want.abs().max())

        with tempfile.TemporaryDirectory(prefix="nvl-bench-toy-") as tmp:
            toy = write_toy_checkpoint(Path(tmp) / "tiny", "tiny", seed=3)
            bridge = NemotronVLBridge.from_hf_dir(toy)
            cfg = bridge.config
            ours = bridge.build_model(dtype=torch.float32, device=device, load_weights=True)
            ref = HFReferenceVLM(toy, cfg).to(device)
            worst = 0.0
            for ids in random_sequences(cfg.llm.vocab_size):
                ids = ids.to(device)
                with torch.no_grad():
                    worst = max(worst, float((ours.forward_inference(ids) - ref.lm(ids).logits).abs().max()))
            out["lm_vs_transformers_max_abs_logit_diff"] = worst
            tok = cfg.num_image_token
            ids = torch.tensor([[40, 41] + [cfg.img_context_token_id] * (2 * tok)
                                + list(range(50, 80))], device=device)
            pix = torch.randn(2, 3, cfg.force_image_size, cfg.force_image_size, generator=g).to(device)
            with torch.no_grad():
                vlm_diff = float((ours.forward_inference(ids, pixel_values=pix) - ref(ids, pix)).abs().max())
            out["vlm_vs_transformers_max_abs_logit_diff"] = vlm_diff
            bf16 = bridge.build_model(dtype=torch.bfloat16, device=device, load_weights=True)
            with torch.no_grad():
                a = ours.forward_inference(ids, pixel_values=pix)
                c = bf16.forward_inference(ids, pixel_values=pix.bfloat16()).float()
            out["bf16_vs_fp32_max_abs_logit_diff"] = float((a - c).abs().max())
            out["logit_abs_max"] = float(a.abs().max())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    tol = 1e-4 if device.type == "cpu" else 1e-3
    out["tolerance"] = tol
    out["passed"] = (out["ssd_scan_max_rel_diff"] < 1e-5 and out["lm_vs_transformers_max_abs_logit_diff"] <= tol
                     and out["vlm_vs_transformers_max_abs_logit_diff"] <= tol)
    return out


# ----------------------------------------------------------------------------------------- step
def make_batch(cfg, seq: int, tiles: int, device, dtype, seed: int = 0) -> dict[str, Any]:
    import torch

    tok = cfg.num_image_token
    n_ctx = tiles * tok
    if n_ctx + 4 > seq:
        raise SystemExit(f"--tiles {tiles} x {tok} context tokens do not fit in --seq {seq}")
    ids = toy_token_ids()
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(30, 500, (seq,), generator=g)
    row = torch.cat([text[:2], torch.tensor([ids["<img>"]]), torch.full((n_ctx,), cfg.img_context_token_id),
                     torch.tensor([ids["</img>"]]), text[: seq - n_ctx - 5], torch.tensor([12])])
    input_ids = row[None].to(device)
    labels = torch.roll(input_ids, -1, 1)
    labels[:, -1] = -100
    loss_mask = torch.zeros(1, seq, device=device)
    loss_mask[:, n_ctx + 4:] = 1.0
    pixel_values = torch.randn(tiles, 3, cfg.force_image_size, cfg.force_image_size, generator=g).to(device, dtype)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def step_fn(model, batch) -> Callable[[], float]:
    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**batch)
        total = (loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        total.backward()
        return float(total.detach())

    return step


def run_variant(model, batch, device, flops: float, args) -> dict[str, Any]:
    """Time forward + backward; an exception (out of memory or other) is the result instead."""
    import torch

    reset_peak(device)
    try:
        step = step_fn(model, batch)
        loss = step()
        sec = timed(step, device, args.iters, args.warmup)
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        res = {"status": "ok", "step_s": sec, "tokens_per_s": batch["input_ids"].numel() / sec,
               "tflops_per_s": flops / sec / 1e12, "loss": loss, "grads_finite": grads_finite,
               "peak_memory_gib": round(peak_memory_gib(device), 2)}
        if device.type == "cuda":
            res["mfu_vs_790"] = flops / sec / H200_BF16_CEILING
    except Exception as exc:
        res = {"status": "oom" if is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
               "peak_memory_gib": round(peak_memory_gib(device), 2)}
        if not is_oom(exc):
            res["traceback"] = traceback.format_exc()[-4000:]
    model.zero_grad(set_to_none=True)
    return res


def compiled_scan_variant(model, cfg, batch, device, dtype, flops: float, mode: str, args) -> dict[str, Any]:
    """The step and the scan alone with ``torch.compile(ssd_scan_reference)``: the model's
    ``set_kernels("compiled")`` for the step (the previous choice is restored afterwards)."""
    import torch

    from nvl_nemotron_vl.model.ssd import ssd_scan_reference

    out: dict[str, Any] = {"recompute": mode}
    previous = model.kernels_choice
    try:
        compiled = torch.compile(ssd_scan_reference, dynamic=False)
        g = torch.Generator(device="cpu").manual_seed(1)
        probe = [torch.randn(1, 256, 8, 16, generator=g), torch.rand(1, 256, 8, generator=g) * 0.1,
                 -torch.rand(8, generator=g) - 0.5, torch.randn(1, 256, 2, 16, generator=g),
                 torch.randn(1, 256, 2, 16, generator=g)]
        probe = [t.to(device) for t in probe]
        a, _ = ssd_scan_reference(*probe, 64)
        b, _ = compiled(*probe, 64)
        out["max_rel_diff_vs_reference"] = float((a - b).abs().max() / a.abs().max())
        model.set_kernels("compiled")
        model.set_recompute(mode)
        out["step"] = run_variant(model, batch, device, flops, args)
        mixer = next(layer.mixer for layer in model.language_model.decoder.layers if hasattr(layer, "mixer"))
        seq = batch["input_ids"].shape[1]
        xs = torch.randn(1, seq, mixer.nheads, mixer.head_dim, device=device, dtype=dtype, requires_grad=True)
        dts = (torch.rand(1, seq, mixer.nheads, device=device) * 0.1).requires_grad_()
        A = -torch.rand(mixer.nheads, device=device) - 0.5
        Bs = torch.randn(1, seq, mixer.ngroups, mixer.state, device=device, dtype=dtype, requires_grad=True)
        Cs = torch.randn(1, seq, mixer.ngroups, mixer.state, device=device, dtype=dtype, requires_grad=True)

        def run() -> None:
            compiled(xs, dts, A, Bs, Cs, mixer.chunk_size)[0].square().mean().backward()

        out["ssd_scan_s"] = timed(run, device, max(1, args.iters), 1)
    except Exception as exc:
        out.update(status="oom" if is_oom(exc) else "error", error=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        model.set_kernels(previous)
    return out


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def component_split(model, cfg, batch, device, dtype, iters: int) -> dict[str, Any]:
    """Forward+backward seconds of the step's parts at the step's shapes, scaled by layer counts."""
    import torch

    from nvl_nemotron_vl.model.ssd import ssd_scan

    lm = model.language_model
    types = cfg.llm.layer_types
    seq = batch["input_ids"].shape[1]
    H = cfg.llm.hidden_size
    res: dict[str, Any] = {}

    def fb(module_fn, *inputs) -> Callable[[], None]:
        def run() -> None:
            out = module_fn(*inputs)
            out.float().square().mean().backward()
        return run

    res["vit_projector_s"] = timed(fb(model.vision_embeddings, batch["pixel_values"]), device, iters, 1)
    x = torch.randn(1, seq, H, device=device, dtype=dtype, requires_grad=True)
    for kind in ("mamba", "attention", "mlp"):
        if kind in types:
            layer = lm.decoder.layers[types.index(kind)]
            per = timed(fb(layer, x), device, iters, 1)
            res[f"{kind}_layer_s"] = per
            res[f"{kind}_layers_total_s"] = per * types.count(kind)
    if "mamba" in types:
        mixer = lm.decoder.layers[types.index("mamba")].mixer
        g = torch.Generator(device=device).manual_seed(0)
        xs = torch.randn(1, seq, mixer.nheads, mixer.head_dim, device=device, generator=g, requires_grad=True)
        dts = torch.nn.functional.softplus(torch.randn(1, seq, mixer.nheads, device=device,
                                                       generator=g) - 2).requires_grad_()
        A = -torch.exp(torch.rand(mixer.nheads, device=device, generator=g) * 2)
        Bs = torch.randn(1, seq, mixer.ngroups, mixer.state, device=device, generator=g, requires_grad=True)
        Cs = torch.randn(1, seq, mixer.ngroups, mixer.state, device=device, generator=g, requires_grad=True)
        per = timed(fb(lambda *a: ssd_scan(*a, mixer.chunk_size)[0], xs.to(dtype), dts, A, Bs.to(dtype), Cs.to(dtype)),
                    device, iters, 1)
        res["ssd_scan_s"] = per
        res["ssd_scan_total_s"] = per * types.count("mamba")
    res["output_layer_and_loss_s"] = timed(
        fb(lambda h: model.per_token_loss(lm.logits(h), batch["labels"]), x), device, iters, 1)
    return res


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small", "12b-shape"], default="12b-shape")
    ap.add_argument("--hf-dir", type=Path, help="load config and weights from this HF directory instead")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--seq", type=int, default=4096, help="LM tokens in the sample (default 4096)")
    ap.add_argument("--tiles", type=int, default=13, help="image tiles in the sample (default 13 = 12 + thumbnail)")
    ap.add_argument("--recompute", default="none,ssm,layers", help="comma list of variants (none, ssm, layers)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-checks", action="store_true", help="skip the tiny-toy parity checks")
    ap.add_argument("--compiled-scan", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the step with torch.compile(ssd_scan) (default: on for cuda)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown record")
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.compiled_scan is None:
        args.compiled_scan = device.type == "cuda"
    variants = [v.strip() for v in args.recompute.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("none", "ssm", "layers")]
    if bad:
        raise SystemExit(f"--recompute: unknown variant(s) {bad}; use none, ssm, layers")
    args.out.mkdir(parents=True, exist_ok=True)

    from nvl_nemotron_vl.bridge import NemotronVLBridge
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.flops import batch_train_flops
    from nvl_nemotron_vl.model import build_model
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvlcore.parallel import init_parallel

    init_parallel(1)
    stem = f"model_step_{args.size if not args.hf_dir else 'hf'}_{device.type}_{dt.date.today().isoformat()}"

    def save() -> None:
        """Write the record so far (each phase saves, so a run cut short still leaves its numbers)."""
        (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(render_markdown(record))

    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()},
        "dtype": str(dtype).replace("torch.", ""),
    }
    print(f"model_step: {record['machine'].get('gpu', 'cpu')} | torch {torch.__version__} | {record['dtype']}",
          flush=True)

    if not args.skip_checks:
        t = time.perf_counter()
        record["checks"] = correctness_checks(device)
        record["checks"]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"checks: {json.dumps(record['checks'])}", flush=True)
        save()

    # -- build --------------------------------------------------------------------------------
    t = time.perf_counter()
    if args.hf_dir:
        bridge = NemotronVLBridge.from_hf_dir(args.hf_dir)
        cfg = bridge.config
        model = bridge.build_model(dtype=dtype, device=device, load_weights=True)
    else:
        cfg = NemotronVLConfig.from_dict(toy_config(args.size, toy_token_ids()), source=f"toy:{args.size}",
                                         num_prefix_tokens=num_prefix_tokens(args.size))
        model = build_model(cfg, dtype=dtype, device=device, init="random", seed=0)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    record["build"] = {"seconds": round(time.perf_counter() - t, 1), "parameters": n_params,
                       "weights_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2),
                       "memory_after_build_gib": round(peak_memory_gib(device), 2)}
    print(f"build: {record['build']}", flush=True)

    batch = make_batch(cfg, args.seq, args.tiles, device, dtype)
    flops = batch_train_flops(cfg, batch)
    record["sample"] = {"seq": args.seq, "tiles": args.tiles, "context_tokens": args.tiles * cfg.num_image_token,
                        "train_flops": flops}
    save()

    # -- step variants ------------------------------------------------------------------------
    record["variants"] = {}
    for v in variants:
        model.set_recompute(v)
        record["variants"][v] = run_variant(model, batch, device, flops, args)
        print(f"step[{v}]: {json.dumps({k: w for k, w in record['variants'][v].items() if k != 'traceback'})}",
              flush=True)
        save()

    ok = [v for v in variants if record["variants"][v]["status"] == "ok"]
    if ok:
        model.set_recompute(ok[0] if "none" not in ok else "none")
        reset_peak(device)
        try:
            record["split"] = component_split(model, cfg, batch, device, dtype, max(1, args.iters))
        except Exception as exc:
            record["split"] = {"status": "oom" if is_oom(exc) else "error",
                               "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"split: {json.dumps(record['split'])}", flush=True)
        save()

    if ok and args.compiled_scan:
        # The same step with the scan compiled by torch.compile (Inductor), on the fastest variant that fit.
        best = max(ok, key=lambda v: record["variants"][v]["tokens_per_s"])
        record["compiled_scan"] = compiled_scan_variant(model, cfg, batch, device, dtype, flops, best, args)
        print(f"compiled scan: {json.dumps(record['compiled_scan'])}", flush=True)

    save()
    print(f"wrote {args.out / stem}.json and .md", flush=True)
    checks_ok = record.get("checks", {}).get("passed", True)
    return 0 if checks_ok and ok else 1


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# Model step: {r['args']['size']} on {m.get('gpu', 'CPU')} ({r['date']})", "",
        f"Machine: {m.get('gpu', 'cpu')} ({m.get('gpu_memory_gib', '-')} GiB), host {m['host']}, torch {m['torch']}, "
        f"CUDA {m.get('cuda', '-')}, megatron-core {m.get('megatron_core', '-')}, dtype {r['dtype']}.", "",
    ]
    if "sample" in r:
        lines += [f"Sample: batch 1, {r['sample']['seq']} LM tokens with one image of {r['sample']['tiles']} tiles "
                  f"({r['sample']['context_tokens']} context tokens); {r['sample']['train_flops'] / 1e12:.1f} TFLOP "
                  "per step (LM over real tokens + ViT + projector, 3x forward).", ""]
    if "build" in r:
        lines += [f"Build: {r['build']['parameters'] / 1e6:,.1f} M parameters, {r['build']['weights_gib']} GiB of "
                  f"weights, {r['build']['seconds']} s.", ""]
    if "checks" in r:
        c = r["checks"]
        lines += ["## Correctness (tiny toy, fp32, on this device)", "",
                  "| check | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3e} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in c.items()]
        lines.append("")
    if not r.get("variants"):
        return "\n".join(lines) + "\n"
    lines += ["## Forward + backward", "",
              "| recompute | status | step s | tokens/s | TFLOP/s | MFU (790) | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for v, res in r["variants"].items():
        if res["status"] == "ok":
            mfu = f"{res['mfu_vs_790']:.1%}" if "mfu_vs_790" in res else "-"
            lines.append(f"| {v} | ok | {res['step_s']:.3f} | {res['tokens_per_s']:.0f} | {res['tflops_per_s']:.1f} | "
                         f"{mfu} | {res['peak_memory_gib']} |")
        else:
            lines.append(f"| {v} | {res['status']} | - | - | - | - | {res['peak_memory_gib']} |")
    lines.append("")
    cs = r.get("compiled_scan")
    if cs:
        step = cs.get("step", {})
        if step.get("status") == "ok":
            lines += [f"With `torch.compile(ssd_scan)` (recompute {cs['recompute']}): step {step['step_s']:.3f} s, "
                      f"{step['tokens_per_s']:.0f} tokens/s, peak {step['peak_memory_gib']} GiB; the scan alone "
                      f"{cs.get('ssd_scan_s', float('nan')):.4f} s per layer; max relative difference to the "
                      f"reference scan {cs.get('max_rel_diff_vs_reference', float('nan')):.1e}.", ""]
        else:
            lines += [f"With `torch.compile(ssd_scan)`: {cs.get('status', step.get('status'))}: "
                      f"{cs.get('error', step.get('error', ''))[:300]}", ""]
    s = r.get("split")
    if s and "error" not in s:
        lines += ["## Where the time goes (forward + backward of each part alone, at the step's shapes)", "",
                  "| part | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in s.items()]
        if "ssd_scan_total_s" in s and "mamba_layers_total_s" in s:
            parts = sum(s.get(k, 0.0) for k in ("vit_projector_s", "mamba_layers_total_s", "attention_layers_total_s",
                                                "mlp_layers_total_s", "output_layer_and_loss_s"))
            lines += ["", f"Sum of parts {parts:.3f} s; the SSD scan alone is {s['ssd_scan_total_s']:.3f} s "
                      f"({s['ssd_scan_total_s'] / parts:.0%} of it), all Mamba mixers {s['mamba_layers_total_s']:.3f} "
                      f"s ({s['mamba_layers_total_s'] / parts:.0%}), the ViT + projector {s['vit_projector_s']:.3f} s "
                      f"({s['vit_projector_s'] / parts:.0%})."]
    elif s:
        lines += [f"Split: {s['status']}: {s['error']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
