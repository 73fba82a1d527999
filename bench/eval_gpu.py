#!/usr/bin/env python
"""Throughput of ``nvl eval`` (batched, cached generation and scoring) at the Nemotron Nano V2 VL
12B shape on CORD-v2-like receipts: batch 32 beside batch 1.

On one H200 (the lead's run), in two commands so that each stays under 10 minutes::

    nvl toy-model /tmp/toy-12b --size 12b-shape --device cuda            # ~26 GB of random weights, once
    python bench/eval_gpu.py --model-dir /tmp/toy-12b --out bench/results/eval_gpu.json

(without ``--model-dir`` the script writes the toy itself, in a temporary directory it removes).
Estimated: batch 32 over 256 receipts about a minute; batch 1 about 0.8 s per receipt, so
``--batch1-samples 64`` keeps the second command short if needed (samples/s stay comparable).

On CPU with the tiny toy, to test the script (seconds)::

    python bench/eval_gpu.py --size tiny --device cpu --samples 8 --batch-sizes 4,1 --max-new-tokens 4 \\
        --out /tmp/eval_gpu.json

What it does:

1. ``nvl toy-model DIR --size 12b-shape --device cuda``: a complete HF-format checkpoint with random
   weights at the real dimensions (``--model-dir`` reuses one);
2. writes ``--samples`` receipts in cord-v2's real schema (parquet: ``image`` + ``ground_truth`` JSON
   string with ``gt_parse``), portrait images of receipt size with printed lines, so the processor
   tiles them as it tiles real receipts, and loads them with the ``make_cord_v2_dataset`` maker;
3. loads the model once (bf16, the CUDA-graph decode step) and, for each batch size, runs
   :func:`nvlcore.eval.evaluate_generator` (what ``nvl eval`` runs: prompts batched by length,
   greedy, the maker's Donut metrics) after one untimed warm-up batch; batch 1 answers the first
   ``--batch1-samples`` receipts (default all);
4. records samples/s and generated tokens/s (tokens / wall time, image processing included) per
   batch size and the speed-up, with the machine and the date.

Random weights never emit the end-of-turn token, so every answer is ``--max-new-tokens`` long and the
metrics are ~0: only the speeds mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def receipt(i: int, rng: random.Random) -> tuple[Any, dict[str, Any]]:
    """A receipt image and its parse (CORD's fields: menu items, sub-total, total)."""
    from PIL import Image, ImageDraw

    items = [{"nm": f"ITEM {rng.randint(1, 999)}", "cnt": str(rng.randint(1, 4)),
              "price": f"{rng.randint(1, 90)},{rng.randint(0, 9)}00"} for _ in range(rng.randint(1, 6))]
    parse = {"menu": items if len(items) > 1 else items[0],
             "sub_total": {"subtotal_price": f"{rng.randint(10, 300)},000"},
             "total": {"total_price": f"{rng.randint(10, 300)},000", "cashprice": f"{rng.randint(10, 400)},000"}}
    w, h = rng.choice([(576, 864), (648, 1152), (720, 1280), (864, 1296)])
    image = Image.new("RGB", (w, h), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    y = 20
    for it in items:
        draw.text((20, y), f"{it['nm']}  x{it['cnt']}  {it['price']}", fill=(20, 20, 20))
        y += 24
    draw.text((20, y + 20), f"TOTAL {parse['total']['total_price']}", fill=(0, 0, 0))
    return image, parse


def write_cord_like(root: Path, n: int, seed: int = 0) -> Path:
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    sys.path.insert(0, str(ROOT / "tests" / "support"))  # the tests' support modules (not installed)
    from nvl_data_testing import write_hub_dataset

    rng = random.Random(seed)
    images, truths = [], []
    for i in range(n):
        image, parse = receipt(i, rng)
        images.append(image)
        truths.append(json.dumps({"gt_parse": parse, "meta": {"version": "2.0.0", "split": "test", "image_id": i},
                                  "valid_line": []}))
    feats = Features({"image": HFImage(), "ground_truth": Value("string")})
    ds = Dataset.from_dict({"image": images, "ground_truth": truths}, features=feats)
    return write_hub_dataset(root, {"data/test-00000-of-00001.parquet": ds}, {"default": {"test": "data/test-*"}})


def machine(device: Any) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                             "cpus": os.cpu_count()}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="12b-shape", choices=["tiny", "small", "12b-shape"])
    ap.add_argument("--model-dir", type=Path, default=None, help="an existing toy checkpoint to reuse")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-sizes", default="32,1")
    ap.add_argument("--batch1-samples", type=int, default=None, help="receipts answered at batch 1 (default all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the toy and the data go, kept (default: a temporary directory, removed at the end)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_gpu.json")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    import torch

    from nvlcore.eval import evaluate_generator, metrics_for
    from nvlcore.plugins import get_registry

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nvl-eval-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = work / f"toy-{args.size}"
        if not (model_dir / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "nvlcore", "toy-model", str(model_dir), "--size", args.size,
                            "--device", device.type, "--overwrite"], check=True)
    write_s = time.perf_counter() - t0
    data = write_cord_like(work / "cord-like", args.samples)
    maker = get_registry("dataset_maker").get("cord_v2")
    made = maker(split="test", path=str(data), cache_dir=str(work / "hf-cache"))
    metrics = metrics_for(maker)

    from nvl_nemotron_vl import load_generator

    t1 = time.perf_counter()
    gen = load_generator(model_dir, device=device, dtype=dtype)
    load_s = time.perf_counter() - t1
    runs = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        limit = args.samples if bs != 1 or args.batch1_samples is None else min(args.batch1_samples, args.samples)
        evaluate_generator(gen, made, metrics, limit=bs, batch_size=bs, max_new_tokens=args.max_new_tokens)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        report = evaluate_generator(gen, made, metrics, limit=limit, batch_size=bs, max_new_tokens=args.max_new_tokens,
                                    progress=lambda m: print(m, file=sys.stderr, flush=True))
        row = {"batch_size": bs, **report.summary()}
        if device.type == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        runs.append(row)
        print(json.dumps(row), flush=True)
    by_bs = {r["batch_size"]: r for r in runs}
    result = {
        "what": "nvl eval throughput: CORD-v2-like receipts, greedy, cached batched generation + Donut metrics",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(device),
        "model": {"size": args.size if args.model_dir is None else "given (--model-dir)", "dir": str(model_dir),
                  "dtype": str(dtype).replace("torch.", ""),
                  "weights": "random (nvl toy-model)", "write_seconds": round(write_s, 1),
                  "load_seconds": round(load_s, 1)},
        "samples": args.samples, "max_new_tokens": args.max_new_tokens,
        "runs": runs,
    }
    if len(by_bs) >= 2 and 1 in by_bs:
        big = max(by_bs)
        result["speedup_samples_per_s"] = round(by_bs[big]["samples_per_s"] / max(by_bs[1]["samples_per_s"], 1e-9), 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.workdir is None:  # a temporary directory: the 12b-shape toy is ~25 GB
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
