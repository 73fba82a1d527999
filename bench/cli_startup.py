#!/usr/bin/env python3
"""Time ``nvl --help`` (and ``nvl plugins list``) with every installed plugin: median of N runs.

Usage: ``python bench/cli_startup.py [--runs 5] [--out bench/results/cli_startup.json]``. Prints the
timings and, with ``--out``, writes a JSON record with the machine and date. The test suite asserts a
loose bound on the same measurement (tests/test_cli_speed.py); the figure to report is this one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def nvl_command() -> list[str]:
    script = Path(sys.executable).with_name("nvl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nvlcore.cli"]


def time_runs(args: list[str], runs: int) -> list[float]:
    out = []
    env = {k: v for k, v in os.environ.items() if k not in ("NVL_LOAD_PLUGINS", "NVL_DISABLE_PLUGINS")}
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([*nvl_command(), *args], capture_output=True, text=True, env=env)
        out.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"nvl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return out


def measure(runs: int = 5) -> dict[str, object]:
    plugins = json.loads(subprocess.run([*nvl_command(), "plugins", "list", "--json"], capture_output=True, text=True,
                                        check=True).stdout)
    record: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "plugins": sorted(p["name"] for p in plugins),
        "runs": runs,
    }
    for label, args in (("help", ["--help"]), ("plugins_list", ["plugins", "list"])):
        times = time_runs(args, runs)
        record[f"{label}_median_s"] = round(statistics.median(times), 4)
        record[f"{label}_all_s"] = [round(t, 4) for t in times]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    ns = parser.parse_args()
    record = measure(ns.runs)
    print(f"nvl --help: median {record['help_median_s']} s over {ns.runs} runs {record['help_all_s']}")
    print(f"nvl plugins list: median {record['plugins_list_median_s']} s {record['plugins_list_all_s']}")
    print(f"plugins: {', '.join(record['plugins'])}")  # type: ignore[arg-type]
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
