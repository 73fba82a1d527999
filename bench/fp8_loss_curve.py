"""FP8 against bf16 over N steps of a model that learns: the loss record of issue 23.

Each run is the user's command, ``nvl finetune``, started in a fresh process, on the quickstart's task
(``synthetic_shapes`` colour questions, its settings: ``nvl_nemotron_vl.quickstart.FINETUNE_OVERRIDES``)
from the same toy weights (``--size``, ``small`` by default: hidden 1024, 16 layers) and the same data
order, once under ``mixed_precision=bf16_mixed`` and once under ``bf16_with_fp8_current_scaling_mixed``,
for each method (``full``: every weight trained, FP8 casts of the fp32 masters; ``lora``: the quickstart's
LoRA, FP8 in the frozen base). The losses are read from each run's metrics.jsonl.

The tolerance (stated in the record): after ``--skip`` iterations, the FP8 run's loss smoothed over
``--smooth`` iterations stays within ``--tolerance`` (relative) of the bf16 run's at every iteration,
and both learn (the bf16 loss falls by at least half). The record says for each method whether it held.

Output: one JSON file (``--out``): ``date``, ``device``, the settings and tolerance, ``runs`` (method,
mixed_precision, command, losses per iteration, step time, the run's line naming its FP8 linears) and
``comparisons`` (per method: the largest relative gap of the smoothed losses and where, the first and
final smoothed losses, ``within_tolerance``).

Usage (one GPU of compute capability 8.9+, a few minutes)::

    python bench/fp8_loss_curve.py --steps 300 --out bench/results/fp8_loss_curve.json
    # quick look:
    python bench/fp8_loss_curve.py --steps 60 --methods full --out /tmp/fp8.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FP8 = "bf16_with_fp8_current_scaling_mixed"
BF16 = "bf16_mixed"


def log(msg: str) -> None:
    print(msg, flush=True)


def overrides(method: str, precision: str, args: argparse.Namespace, metrics: Path) -> list[str]:
    """The quickstart's settings (its LoRA targets only for LoRA), this run's precision, length and log."""
    from nvl_nemotron_vl.quickstart import FINETUNE_OVERRIDES

    out = [o for o in FINETUNE_OVERRIDES if method == "lora" or not o.startswith("peft.")]
    if method == "full":  # every weight trains: the quickstart's adapter learning rate is too large for that
        out = [o for o in out if not o.startswith(("optimizer.lr=", "optimizer.min_lr="))]
        out += [f"optimizer.lr={args.full_lr}", f"optimizer.min_lr={args.full_lr / 10}"]
    return out + [f"mixed_precision={precision}", f"train.train_iters={args.steps}", "logger.log_interval=1",
                  f"logger.jsonl_path={metrics}", "checkpoint.save=null", "validation.eval_iters=0",
                  f"rng.seed={args.seed}"]


def run(method: str, precision: str, toy: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    metrics = work / f"metrics-{method}-{precision}.jsonl"
    metrics.unlink(missing_ok=True)
    cli = ["finetune", "--hf-model-path", str(toy), "--pretrained-checkpoint", str(toy)]
    cli += ["--lora-on-language-model"] if method == "lora" else []
    cli += overrides(method, precision, args, metrics)
    shown = "nvl " + " ".join(shlex.quote(a) for a in cli)
    log(f"run: {shown}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nvlcore", *cli], capture_output=True, text=True,
                          timeout=args.run_timeout, env={**os.environ, "NVL_PROGRESS": "0"})
    rec: dict[str, Any] = {"method": method, "mixed_precision": precision, "command": shown,
                           "wall_s": round(time.perf_counter() - t0, 1)}
    out = proc.stdout + proc.stderr
    (work / f"log-{method}-{precision}.txt").write_text(out)
    for line in out.splitlines():
        if " linear layer(s) in FP8" in line:
            rec["fp8_linears"] = line.split(": ", 2)[-1]
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    rows = [r for r in rows if "loss" in r]
    if proc.returncode != 0 or not rows:
        rec["status"] = f"error (exit {proc.returncode}): {(out.strip().splitlines() or ['?'])[-1][:300]}"
        log(f"  -> {rec['status']}")
        return rec
    timed = rows[args.skip:] or rows
    rec.update(status="ok", losses=[round(r["loss"], 5) for r in rows],
               step_time_s=round(sum(r["step_time_s"] for r in timed) / len(timed), 4))
    log(f"  -> loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, {rec['step_time_s']} s/step")
    return rec


def smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def compare(bf16: dict[str, Any], fp8: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The largest relative gap of the smoothed curves after ``--skip`` iterations, and whether it is in tolerance."""
    if bf16.get("status") != "ok" or fp8.get("status") != "ok":
        return {"method": bf16["method"], "within_tolerance": False,
                "why": f"bf16: {bf16.get('status')}; fp8: {fp8.get('status')}"}
    a, b = smooth(bf16["losses"], args.smooth), smooth(fp8["losses"], args.smooth)
    n = min(len(a), len(b))
    gaps = [(abs(b[i] - a[i]) / a[i], i + 1) for i in range(args.skip, n)]
    gap, at = max(gaps) if gaps else (float("nan"), None)
    learned = a[n - 1] < 0.5 * a[0]
    return {"method": bf16["method"], "max_relative_gap": round(gap, 5), "at_iteration": at,
            "bf16_smoothed_first_last": [round(a[0], 4), round(a[n - 1], 4)],
            "fp8_smoothed_first_last": [round(b[0], 4), round(b[n - 1], 4)],
            "bf16_learned": learned,
            "step_time_ratio_fp8_over_bf16": round(fp8["step_time_s"] / bf16["step_time_s"], 3),
            "within_tolerance": bool(gap < args.tolerance and learned)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", help="toy size (nvl_nemotron_vl.toy.SIZES)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--full-lr", type=float, default=3e-4, help="optimizer.lr of the full fine-tuning runs")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window of the compared losses")
    ap.add_argument("--skip", type=int, default=20, help="first iterations left out of the comparison")
    ap.add_argument("--tolerance", type=float, default=0.03, help="largest relative gap of the smoothed losses")
    ap.add_argument("--work", default="/tmp/nvl_fp8_loss_curve")
    ap.add_argument("--out", default="bench/results/fp8_loss_curve.json")
    ap.add_argument("--run-timeout", type=int, default=1800)
    args = ap.parse_args(argv)

    import torch

    from nvl_nemotron_vl.toy import write_toy_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    toy = work / f"toy-{args.size}"
    if not (toy / "config.json").exists():
        write_toy_checkpoint(toy, args.size, seed=0, overwrite=True)
    runs, comparisons = [], []
    for method in [m for m in args.methods.split(",") if m]:
        pair = {p: run(method, p, toy, args, work) for p in (BF16, FP8)}
        runs += list(pair.values())
        comparisons.append(compare(pair[BF16], pair[FP8], args))
        log(f"{method}: {json.dumps(comparisons[-1])}")
    record = {
        "date": _dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "size": args.size, "steps": args.steps, "seed": args.seed, "smooth": args.smooth, "skip": args.skip,
        "tolerance": (f"after {args.skip} iterations the FP8 loss smoothed over {args.smooth} iterations stays "
                      f"within {args.tolerance:.0%} of the bf16 one, and the bf16 loss falls by at least half"),
        "runs": runs, "comparisons": comparisons,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0 if all(c["within_tolerance"] for c in comparisons) else 1


if __name__ == "__main__":
    sys.exit(main())
