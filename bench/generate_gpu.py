#!/usr/bin/env python
"""Batch-1 decode speed of nvl's cached generation at the Nemotron Nano V2 VL 12B shape, beside
transformers' ``NemotronHForCausalLM.generate`` (the peer) and the memory-bandwidth limit.

Runs on one GPU (H200 in mind; < 8 minutes), or on CPU at a tiny size to test the script::

    python bench/generate_gpu.py --out bench/results/generate_h200            # 12b-shape, cuda
    python bench/generate_gpu.py --size tiny --device cpu --dtype float32 --prompt-len 32 \\
        --new-tokens 8 --out /tmp/gen_bench                                  # the CPU path

What it does:

1. builds the training model (random bf16 weights, made on the GPU) at ``--size``;
2. for each decode variant (``eager``: plain PyTorch step; ``cudagraph``: the step replayed as a
   CUDA graph; ``compile``: ``torch.compile`` + CUDA graph) generates ``--new-tokens`` greedy
   tokens after a ``--prompt-len`` random-token prompt through ``nvlcore.generation.generate_tokens``
   (the loop ``nvl generate`` uses, host synchronisation per token included) and reports prefill and
   decode tokens/s (best of ``--repeats``);
3. checks correctness: the eager cached step logits against the full no-cache forward over the
   prompt + generated tokens (teacher forced), and each variant's tokens against eager's;
4. the peer: transformers' ``NemotronHForCausalLM`` at the same LM shape with the **same weights**
   (converted through nvl's weight mapping), ``generate`` greedy for the same prompt and token
   count, timed end to end (and its prefill alone), with token agreement against ours;
5. the limit: measured device-to-device copy bandwidth (read + write) and the LM's weight bytes:
   ``limit tokens/s = bandwidth / bytes read per token`` (all LM weights, as the performance
   anchors count them; also without the embedding table, of which a step reads one row).

Writes ``<out>.json`` and ``<out>.md`` (``--out`` is a path prefix; a directory gets
``generate_gpu.{json,md}`` inside) and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "plugins" / "nvl-nemotron-vl"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_config(size: str):
    from nvl_nemotron_vl.config import NemotronVLConfig
    from nvl_nemotron_vl.toy import num_prefix_tokens, toy_config
    from nvl_nemotron_vl.toy_tokenizer import write_toy_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        token_ids = write_toy_tokenizer(Path(tmp))
    raw = toy_config(size, token_ids)
    return raw, NemotronVLConfig.from_dict(raw, source=f"<toy {size}>", num_prefix_tokens=num_prefix_tokens(size))


def lm_param_bytes(model) -> tuple[int, int]:
    """(all LM parameter bytes, embedding-table bytes)."""
    lm = model.language_model
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    emb = lm.embedding.word_embeddings.weight
    return total, emb.numel() * emb.element_size()


def copy_bandwidth(device, gib: float = 4.0, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n * 2 / best


def make_prompt(cfg, length: int, seed: int, device):
    import torch

    # Ordinary text ids: skip the control tokens at the bottom and the multimodal ones at the top.
    g = torch.Generator().manual_seed(seed)
    lo, hi = 32, min(cfg.img_context_token_id, cfg.llm.vocab_size)
    return torch.randint(lo, hi, (1, length), generator=g).to(device)


def run_variant(model, name: str, ids, new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    from nvl_nemotron_vl.model.decode import NemotronVLDecoder
    from nvlcore.generation import generate_tokens

    cuda = ids.device.type == "cuda"
    dec = NemotronVLDecoder(model, cuda_graph=cuda and name in ("cudagraph", "compile"), compile=name == "compile")
    t0 = time.perf_counter()
    # Warm-up at the timed shape: allocates the cache, captures the graph, compiles.
    warm = generate_tokens(dec, ids, max_new_tokens=new_tokens)
    setup_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        out = generate_tokens(dec, ids, max_new_tokens=new_tokens)
        runs.append(out)
    best = max(runs, key=lambda o: o.decode_tokens_per_s)
    same = all(o.token_ids == warm.token_ids for o in runs)
    mem = torch.cuda.max_memory_allocated(ids.device) / 2**30 if cuda else None
    return {
        "variant": name,
        "setup_s": round(setup_s, 3),
        "prefill_tokens_per_s": best.prefill_tokens_per_s,
        "prefill_s": best.prefill_seconds,
        "decode_tokens_per_s": best.decode_tokens_per_s,
        "decode_ms_per_token": 1000 * best.decode_seconds / max(best.decode_tokens, 1),
        "decode_tokens_per_s_all_runs": [o.decode_tokens_per_s for o in runs],
        "end_to_end_tokens_per_s": best.generated_tokens / (best.prefill_seconds + best.decode_seconds),
        "tokens": best.token_ids[0],
        "repeatable": same,
        "max_memory_gib": mem,
        "_decoder": dec,
    }


def teacher_forced_check(model, dec, ids, tokens: list[int], steps: int) -> dict[str, Any]:
    """Cached prefill + decode-step logits vs one full forward over prompt + tokens."""
    import torch

    tokens = tokens[:steps]
    vocab = model.config.llm.vocab_size
    with torch.inference_mode():
        cache = dec.allocate_cache(1, ids.shape[1] + len(tokens) + 1, dtype=_dtype(model), device=ids.device)
        got = [dec.prefill(ids, attention_mask=torch.ones_like(ids), cache=cache)]
        for t in tokens[:-1]:
            got.append(dec.decode_step(torch.tensor([t], device=ids.device), cache))
        cached = torch.cat(got).float()
        full_ids = torch.cat([ids, torch.tensor([tokens[:-1]], device=ids.device, dtype=ids.dtype)], 1)
        full = model(full_ids)[0, ids.shape[1] - 1 :, :vocab].float()
        full[:, dec.suppressed_token_ids] = float("-inf")
    finite = torch.isfinite(full)
    diff = (cached - full).abs()[finite].max().item()
    scale = full[finite].abs().max().item()
    return {
        "steps": len(tokens),
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "relative": diff / scale,
        "top1_agreement": (cached.argmax(-1) == full.argmax(-1)).float().mean().item(),
    }


def _dtype(model):
    return next(p.dtype for p in model.language_model.parameters())


def build_peer(raw: dict, model, device, dtype):
    """transformers' NemotronHForCausalLM with our LM's weights (converted through the mapping table)."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from nvl_nemotron_vl.mapping import mapping_table

    llm = {k: v for k, v in raw["llm_config"].items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = NemotronHConfig(**llm)
    with torch.device(device):
        try:
            peer = NemotronHForCausalLM._from_config(config, dtype=dtype)
        except TypeError:
            peer = NemotronHForCausalLM._from_config(config, torch_dtype=dtype)
    peer.eval()
    for module in peer.modules():
        # transformers' PyTorch prefill scan clamps dt at time_step_min (its decode step does not);
        # the released model's kernels and nvl do not clamp.
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, float("inf"))
    params = dict(model.named_parameters())
    target = dict(peer.named_parameters())
    loaded = set()
    with torch.no_grad():
        for m in mapping_table(model.config):
            if not m.megatron.startswith("language_model."):
                continue
            for hf_name, t in m.components_to_hf(m.local_to_components([params[m.megatron]])).items():
                name = hf_name.replace("language_model.backbone.",
                                       "model.").replace("language_model.lm_head.", "lm_head.")
                target[name].copy_(t)
                loaded.add(name)
    missing = set(target) - loaded
    if missing:
        raise RuntimeError(f"peer parameters not filled from our weights: {sorted(missing)[:5]}")
    return peer


def run_peer(peer, ids, new_tokens: int, repeats: int, eos_free: bool = True) -> dict[str, Any]:
    import torch

    device = ids.device
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        peer.generate(ids, attention_mask=mask, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        best_total, out = float("inf"), None
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = peer.generate(ids, attention_mask=mask, **kw)
            _sync(device)
            best_total = min(best_total, time.perf_counter() - t0)
        best_prefill = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            logits = peer(ids, attention_mask=mask, use_cache=True).logits[:, -1]
            _sync(device)
            best_prefill = min(best_prefill, time.perf_counter() - t0)
    tokens = out[0, ids.shape[1] :].tolist()
    decode_s = max(best_total - best_prefill, 1e-9)
    return {
        "total_s": best_total,
        "end_to_end_tokens_per_s": len(tokens) / best_total,
        "prefill_s": best_prefill,
        "prefill_tokens_per_s": ids.shape[1] / best_prefill,
        "decode_tokens_per_s_est": (len(tokens) - 1) / decode_s,
        "tokens": tokens,
        "_prefill_logits": logits.float(),
    }


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output path prefix (or a directory)")
    ap.add_argument("--size", default="12b-shape", help="toy size from nvl_nemotron_vl.toy.SIZES")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="eager,cudagraph,compile",
                    help="comma-separated subset of eager,cudagraph,compile (the CUDA ones are skipped on CPU)")
    ap.add_argument("--skip-peer", action="store_true", help="do not run transformers' generate")
    ap.add_argument("--time-budget", type=float, default=450.0,
                    help="seconds; the compile variant (run last) is skipped when less than 200 s are left for it")
    ap.add_argument("--check-steps", type=int, default=32, help="teacher-forced correctness check length")
    args = ap.parse_args(argv)

    import torch

    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available (use --device cpu at a small --size)")
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    if out.is_dir() or args.out.endswith("/"):
        out = out / "generate_gpu"
    out.parent.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)  # noqa: E731

    from nvl_nemotron_vl.model import build_model

    raw, cfg = build_config(args.size)
    say(f"building the {args.size} model ({args.dtype}, {device})")
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index; "cuda" means the first GPU
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    model = build_model(cfg, dtype=dtype, device=device, init="random", seed=0).eval()
    lm_bytes, emb_bytes = lm_param_bytes(model)
    say(f"LM weights {lm_bytes / 1e9:.2f} GB (embedding table {emb_bytes / 1e9:.2f} GB)")
    ids = make_prompt(cfg, args.prompt_len, 0, device)

    result: dict[str, Any] = {
        "benchmark": "generate_gpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {"size": args.size, "dtype": args.dtype, "batch": 1, "prompt_tokens": args.prompt_len,
                     "new_tokens": args.new_tokens, "repeats": args.repeats},
        "lm_weight_bytes": lm_bytes,
        "embedding_bytes": emb_bytes,
        "variants": [],
        "errors": {},
    }

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"eager", "cudagraph", "compile"}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    if device.type != "cuda":
        variants = [v for v in variants if v == "eager"] or ["eager"]

    def record(final: bool = False) -> None:
        """Write the records after every stage, so a run stopped by a time limit still leaves its numbers."""
        result["wall_s"] = time.perf_counter() - start
        result["complete"] = final
        md = render_markdown(result)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        out.with_suffix(".md").write_text(md)
        if final:
            print(md)
            say(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")

    eager = None

    def variant(name: str) -> None:
        nonlocal eager
        say(f"variant {name}: warm-up + {args.repeats} timed runs")
        try:
            r = run_variant(model, name, ids, args.new_tokens, args.repeats)
        except Exception as exc:  # a variant failing must not lose the others' numbers
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            gc.collect()
            return
        dec = r.pop("_decoder")
        if name == "eager":
            eager = r
            try:
                r["teacher_forced"] = teacher_forced_check(model, dec, ids, r["tokens"], args.check_steps)
            except Exception as exc:
                result["errors"]["teacher_forced"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        if eager is not None:
            r["agrees_with_eager_tokens"] = leading_agreement(r["tokens"], eager["tokens"])
        say(f"{name}: prefill {r['prefill_tokens_per_s']:.0f} tok/s, decode {r['decode_tokens_per_s']:.1f} tok/s "
            f"({r['decode_ms_per_token']:.2f} ms/token), setup {r['setup_s']:.1f} s")
        result["variants"].append(r)
        del dec
        gc.collect()
        record()

    # Cheap and essential first; compiling (minutes) last, so a time limit costs only that.
    for name in [v for v in variants if v != "compile"]:
        variant(name)

    if device.type == "cuda":
        bw = copy_bandwidth(device)
        result["copy_bandwidth_bytes_per_s"] = bw
        result["limit_tokens_per_s"] = bw / lm_bytes
        result["limit_tokens_per_s_without_embedding"] = bw / (lm_bytes - emb_bytes)
        say(f"copy bandwidth {bw / 1e12:.2f} TB/s -> limit {bw / lm_bytes:.1f} tokens/s")
        record()

    if not args.skip_peer:
        say("peer: transformers NemotronHForCausalLM with the same weights")
        peer = None
        try:
            peer = build_peer(raw, model, device, dtype)
            p = run_peer(peer, ids, args.new_tokens, max(1, args.repeats - 1))
            from nvl_nemotron_vl.model.decode import NemotronVLDecoder

            with torch.inference_mode():
                cache_dec = NemotronVLDecoder(model)
                cache = cache_dec.allocate_cache(1, ids.shape[1] + 1, dtype=dtype, device=device)
                ours = cache_dec.prefill(ids, attention_mask=torch.ones_like(ids), cache=cache)
                theirs = p.pop("_prefill_logits")[:, : ours.shape[-1]].clone()
                theirs[:, cache_dec.suppressed_token_ids] = float("-inf")
                fin = torch.isfinite(theirs)
                p["prefill_logit_max_abs_diff_vs_ours"] = (ours - theirs).abs()[fin].max().item()
                p["prefill_logit_cosine_vs_ours"] = torch.nn.functional.cosine_similarity(
                    ours[fin][None], theirs[fin][None]).item()
            if eager is not None:
                p["agrees_with_our_tokens"] = leading_agreement(p["tokens"], eager["tokens"])
            result["peer"] = p
            say(f"peer: {p['end_to_end_tokens_per_s']:.2f} tok/s end to end, prefill {p['prefill_tokens_per_s']:.0f} "
                f"tok/s, decode ~{p['decode_tokens_per_s_est']:.1f} tok/s")
        except Exception as exc:
            result["errors"]["peer"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        del peer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record()

    if "compile" in variants:
        if time.perf_counter() - start > args.time_budget - 200:
            result["errors"]["compile"] = "skipped: less than 200 s of --time-budget left to compile"
            say("compile: skipped (time budget)")
        else:
            variant("compile")

    record(final=True)
    return 0 if result["variants"] else 1


def render_markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"# Batch-1 generation, {s['size']} ({s['dtype']}), {r['machine']['device']}",
        "",
        f"{r['date']}, torch {r['machine']['torch']}; prompt {s['prompt_tokens']} random tokens, "
        f"{s['new_tokens']} new tokens, greedy, best of {s['repeats']}; LM weights "
        f"{r['lm_weight_bytes'] / 1e9:.2f} GB.",
        "",
        "| run | prefill tokens/s | decode tokens/s | ms/token | end-to-end tokens/s | setup s | tokens = eager's |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in r["variants"]:
        lines.append(
            f"| nvl {v['variant']} | {v['prefill_tokens_per_s']:.0f} | {v['decode_tokens_per_s']:.1f} | "
            f"{v['decode_ms_per_token']:.2f} | {v['end_to_end_tokens_per_s']:.1f} | {v['setup_s']:.1f} | "
            f"{v.get('agrees_with_eager_tokens', '-')}/{len(v['tokens'])} |"
        )
    p = r.get("peer")
    if p:
        lines.append(
            f"| transformers generate (peer) | {p['prefill_tokens_per_s']:.0f} | ~{p['decode_tokens_per_s_est']:.1f} | "
            f"{1000 / max(p['decode_tokens_per_s_est'], 1e-9):.2f} | {p['end_to_end_tokens_per_s']:.2f} | - | "
            f"{p.get('agrees_with_our_tokens', '-')}/{len(p['tokens'])} |"
        )
    if "limit_tokens_per_s" in r:
        lines.append(
            f"| bandwidth limit ({r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s copy) | - | "
            f"{r['limit_tokens_per_s']:.1f} ({r['limit_tokens_per_s_without_embedding']:.1f} without the embedding "
            f"table) | {1000 / r['limit_tokens_per_s']:.2f} | - | - | - |"
        )
    lines.append("")
    best = max(r["variants"], key=lambda v: v["decode_tokens_per_s"], default=None)
    if best and p:
        lines.append(
            f"Best nvl decode ({best['variant']}): {best['decode_tokens_per_s']:.1f} tokens/s = "
            f"{best['decode_tokens_per_s'] / max(p['decode_tokens_per_s_est'], 1e-9):.1f}x the peer's decode, "
            f"{best['end_to_end_tokens_per_s'] / p['end_to_end_tokens_per_s']:.1f}x end to end."
        )
    if best and "limit_tokens_per_s" in r:
        lines.append(f"That is {100 * best['decode_tokens_per_s'] / r['limit_tokens_per_s']:.0f}% of the bandwidth "
                     "limit.")
    for v in r["variants"]:
        tf = v.get("teacher_forced")
        if tf:
            lines.append(
                f"Correctness ({v['variant']}): cached logits vs the full no-cache forward over {tf['steps']} steps: "
                f"max |diff| {tf['max_abs_logit_diff']:.3g} (logits up to {tf['max_abs_logit']:.3g}), top-1 agreement "
                f"{100 * tf['top1_agreement']:.0f}%."
            )
    if p:
        lines.append(
            f"Peer vs nvl prefill logits (same weights): cosine {p['prefill_logit_cosine_vs_ours']:.5f}, max |diff| "
            f"{p['prefill_logit_max_abs_diff_vs_ours']:.3g}; greedy tokens agree for the first "
            f"{p.get('agrees_with_our_tokens', '-')} of {len(p['tokens'])} (random weights give near-ties, so "
            "bf16 rounding differences between implementations eventually flip one)."
        )
    for k, e in r["errors"].items():
        lines.append(f"- {k}: {e}")
    lines.append(f"\nWall time {r['wall_s']:.0f} s" + ("." if r.get("complete")
                                                       else " (incomplete: stopped early).") + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
