#!/usr/bin/env python3
"""Start-up cost of ``nvl generate``, ``nvl convert import`` and ``nvl finetune`` on the tiny toy.

Usage: ``python bench/startup_tiny.py [--runs 5] [--out bench/results/startup_tiny.json]
[--code DIR --code-label NAME ...]``.

Each command runs as the user runs it (a fresh ``python -m nvlcore.cli`` process) on the 0.6 MB
tiny toy (``nvl toy-model DIR --size tiny``), and is timed whole against the work it reports
itself: ``nvl generate``'s prefill + decode seconds, ``nvl convert import``'s conversion seconds
(``time :``). ``nvl finetune`` (LoRA, 2 iterations, synthetic data) is timed to its first
iteration line. The target (issue 27) is a whole command <= 2x its work for generate and convert.

Wall time on a shared machine swings with other jobs, so each run also records the process's CPU
seconds (user + system, from ``wait4``; with ``OMP_NUM_THREADS=1`` unless set, so that no thread
spins), the checkouts take turns run by run, and the median of ``--runs`` runs is reported.
``--code DIR`` (repeatable) times another checkout of nvl (its root and plugins first on
PYTHONPATH) in the same session, e.g. the commit before a change, for a before/after comparison.
A breakdown times the heavy imports each in a fresh interpreter (CPU seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is in the picture?"
IMPORTS = {
    "python": "pass",
    "torch": "import torch",
    # a checkout from before nvlcore.megatron_import imports it plainly
    "megatron.core (as nvl imports it)": "try:\n from nvlcore.megatron_import import import_megatron_core\n"
                                         "except ImportError:\n import megatron.core\nelse:\n import_megatron_core()",
    "megatron.core (plain import)": "import megatron.core",
    "transformers tokenizer class": "from transformers import PreTrainedTokenizerFast",
    "nvl CLI built (plugins loaded)": "from nvlcore.cli import build_cli; build_cli()",
}


def code_env(code: Path) -> dict[str, str]:
    """The environment that runs nvl from checkout ``code`` (its root and plugins first on PYTHONPATH)."""
    env = dict(os.environ)
    paths = [str(code), *sorted(str(p) for p in (code / "plugins").iterdir() if p.is_dir())]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("NVL_LOAD_PLUGINS", None)
    # One intra-op thread: on a small shared machine OpenMP threads spin while they wait, which makes
    # CPU seconds (and the work's own timing) swing with the load; tiny-toy ops do not use a second one.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def timed(args: list[str], env: dict[str, str], first_line: str | None = None) -> tuple[float, float, str]:
    """Run ``args``; (wall seconds, CPU seconds of the process, its output). With ``first_line``, wall
    time stops when a line containing it appears (the process still runs to its end)."""
    start = time.perf_counter()
    # Not the checkout's root as working directory: `python -m`/`-c` put it first on sys.path.
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tempfile.gettempdir())
    lines, wall = [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if wall is None and first_line and first_line in line:
            wall = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = wall if wall is not None else time.perf_counter() - start
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, out


def nvl(*args: str) -> list[str]:
    return [sys.executable, "-m", "nvlcore.cli", *args]


def run_generate(work: Path, env: dict[str, str]) -> dict[str, float]:
    wall, cpu, out = timed(nvl("generate", "--hf-model-path", str(work / "toy"), "--image-path",
                               str(work / "a.png"), "--prompt", PROMPT), env)
    m = re.search(r"prefill: \d+ tokens in ([\d.]+) s.*decode: \d+ tokens in ([\d.]+) s", out)
    if not m:
        raise SystemExit(f"nvl generate printed no timing:\n{out[-2000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "work_s": float(m.group(1)) + float(m.group(2))}


def run_convert(work: Path, env: dict[str, str]) -> dict[str, float]:
    wall, cpu, out = timed(nvl("convert", "import", "--hf-model", str(work / "toy"), "--megatron-path",
                               str(work / "ckpt"), "--overwrite", "--no-progress"), env)
    m = re.search(r"time\s*:\s*([\d.]+) s", out)
    if not m:
        raise SystemExit(f"nvl convert import printed no time:\n{out[-2000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "work_s": float(m.group(1))}


FINETUNE = ("--lora-on-language-model", "train.train_iters=2", "checkpoint.save_interval=2",
            "dataset.maker_name=synthetic_shapes", "train.global_batch_size=4", "train.micro_batch_size=4",
            "model.seq_length=128", "dataset.seq_length=128", "dataset.num_workers=1", "validation.eval_iters=0",
            "scheduler.lr_warmup_iters=0", "logger.log_interval=1", "model.tensor_model_parallel_size=1")


def run_finetune(work: Path, env: dict[str, str]) -> dict[str, float]:
    save = tempfile.mkdtemp(dir=work, prefix="ft")
    wall, cpu, _ = timed(nvl("finetune", "--hf-model-path", str(work / "toy"), "--pretrained-checkpoint",
                             str(work / "ckpt"), f"checkpoint.save={save}/run", *FINETUNE), env, first_line="iter 1/")
    return {"to_first_iteration_s": wall, "cpu_whole_run_s": cpu}


def import_breakdown(env: dict[str, str], runs: int) -> dict[str, float]:
    """CPU seconds of each heavy import in a fresh interpreter (median), Python's own start included."""
    out = {}
    for label, code in IMPORTS.items():
        cpus = [timed([sys.executable, "-c", code], env)[1] for _ in range(runs)]
        out[label] = round(statistics.median(cpus), 3)
    return out


def summarise(samples: list[dict[str, float]]) -> dict[str, object]:
    keys = samples[0].keys()
    summary: dict[str, object] = {f"median_{k}": round(statistics.median(s[k] for s in samples), 3) for k in keys}
    if "work_s" in keys:
        summary["median_wall_over_work"] = round(statistics.median(s["wall_s"] / s["work_s"] for s in samples), 2)
        summary["median_cpu_over_work"] = round(statistics.median(s["cpu_s"] / s["work_s"] for s in samples), 2)
        summary["target_wall_over_work"] = 2.0
    summary["runs"] = [{k: round(v, 3) for k, v in s.items()} for s in samples]
    return summary


COMMANDS = (("convert_import", run_convert), ("generate", run_generate), ("finetune", run_finetune))


def measure(codes: dict[str, Path], work: Path, runs: int) -> dict[str, dict[str, object]]:
    """Every command of every checkout, ``runs`` rounds interleaved (so each checkout meets the same
    load), then the import breakdown of each."""
    envs = {label: code_env(code) for label, code in codes.items()}
    first = next(iter(envs.values()))
    timed(nvl("toy-model", str(work / "toy"), "--size", "tiny"), first)
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(work / "a.png")
    samples: dict[str, dict[str, list]] = {label: {name: [] for name, _ in COMMANDS} for label in codes}
    for i in range(runs):
        for label, env in envs.items():
            for name, fn in COMMANDS:
                samples[label][name].append(fn(work, env))
        print(f"round {i + 1}/{runs} done (load average {load_average()})", flush=True)
    record: dict[str, dict[str, object]] = {}
    for label, code in codes.items():
        record[label] = {"code": str(code), **{name: summarise(samples[label][name]) for name, _ in COMMANDS}}
        record[label]["import_cpu_s"] = import_breakdown(envs[label], runs)
        for name in [*(n for n, _ in COMMANDS), "import_cpu_s"]:
            shown = {k: v for k, v in record[label][name].items() if k != "runs"}  # type: ignore[union-attr]
            print(f"{label}: {name}: {json.dumps(shown)}", flush=True)
    return record


def load_average() -> list[float]:
    return [round(x, 1) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--code", type=Path, action="append", default=[], help="another nvl checkout to time too")
    parser.add_argument("--code-label", action="append", default=[], help="a name for each --code")
    parser.add_argument("--note", default="", help="free text stored in the record (machine load, ...)")
    ns = parser.parse_args()
    record: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "note": ns.note, "runs": ns.runs, "load_average_before": load_average(), "checkouts": {},
    }
    labels = ["this checkout", *ns.code_label, *[str(c) for c in ns.code[len(ns.code_label):]]]
    codes = dict(zip(labels, [ROOT, *(c.resolve() for c in ns.code)], strict=True))
    with tempfile.TemporaryDirectory(prefix="nvl-startup-") as tmp:
        record["checkouts"] = measure(codes, Path(tmp), ns.runs)
    record["load_average_after"] = load_average()
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
