"""bench/finetune_gpu.py's run hygiene (visit K): file names the GPU machine returns, the previous run's memory
kept out of the next run's peak (wait for idle GPUs; kill a timed-out run's whole process group), and the driver's
peak beside the caching allocator's reservation in each record (and bench/memory_gpu.py's rows)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "bench"
SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, BENCHES / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fg():
    return _load("finetune_gpu_hygiene", "finetune_gpu.py")


def test_file_names_keep_only_safe_characters(fg):
    variant = {"peft.base_dtype": "nf4", "train.memory_plan": "auto", "model.cuda_graph_scope": ["mamba", "mlp"],
               "dataset.maker_kwargs": '{"path": "/tmp/x y"}'}
    name = fg.run_name("cord", "lora", None, variant, "-qlora_24")
    assert SAFE.match(name), name
    # the same parts as before, each unsafe character one "_"
    assert name.startswith("cord-lora-base_dtype_nf4-memory_plan_auto-cuda_graph_scope_mamba_mlp-maker_kwargs_")
    assert name.endswith("-qlora_24") and "seq" not in name
    assert fg.run_name("text", "full", 8192, {}) == "text-full-seq8192"
    assert fg.safe_name("a.b_c-D9") == "a.b_c-D9" and fg.safe_name("a=b/c d") == "a_b_c_d"
    assert not SAFE.match("profile_cord-lora-base_dtype=nf4.txt")  # negative control: visit K's name
    for f in fg.profile_file_names(name):
        assert SAFE.match(f) and f.startswith("profile_") and f.endswith(".txt"), f


def _fake_child(cmd, env, log_file, timeout):
    """Stands in for `nvl finetune`: writes the metrics rows and, when asked, the profile files."""
    metrics = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("logger.jsonl_path=")))
    rows = [{"iteration": i, "loss": 2.0, "tokens_per_s": 1000.0, "step_time_s": 1.0, "tflops_per_gpu": 100.0,
             "mem_gb": 20.0 + i, "mem_reserved_gb": 24.0 + i, "consumed_samples": i} for i in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for key in ("NVL_BENCH_PROFILE_OUT", "NVL_BENCH_PROFILE_SYNCS_OUT"):
        if key in env:
            Path(env[key]).write_text("profile\n")
    log_file.write("done\n")
    return 0


class _FakeSampler:
    peak_mib = [30000, 1200]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_a_profiled_cuda_run_records_its_files_and_the_driver_beside_the_allocator(fg, tmp_path, monkeypatch):
    monkeypatch.setattr(fg, "run_child", _fake_child)
    monkeypatch.setattr(fg, "GpuMemorySampler", _FakeSampler)
    monkeypatch.setattr(fg, "query_gpu_used_mib", lambda: [500, 300])
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    args = fg.parse_args(["--device", "cuda", "--steps", "3", "--warmup", "0", "--gbs", "1", "--profile", "",
                          "--peer-seqs", "", "--out", str(out)])
    rec = fg.run_nvl(args, tmp_path, {}, "text", "lora", {"peft.base_dtype": "nf4"}, work, 4096,
                     name_suffix="-qlora_24", profile=True)
    assert rec["status"] == "ok", rec
    assert rec["profile_file"] == "profile_text-lora-base_dtype_nf4-qlora_24.txt"
    assert rec["profile_syncs_file"] == "profile_text-lora-base_dtype_nf4-qlora_24_syncs.txt"
    assert sorted(p.name for p in out.iterdir()) == sorted([rec["profile_file"], rec["profile_syncs_file"]])
    assert all(SAFE.match(p.name) for p in [*out.iterdir(), *work.iterdir()])
    assert rec["gpu_used_at_start_gb"] == 0.5  # 500 MiB, the fuller GPU
    assert rec["peak_gb_nvidia_smi"] == 31.5  # 30,000 MiB
    assert rec["peak_gb"] == 23.0 and rec["reserved_gb"] == 27.0
    assert rec["outside_allocator_gb"] == 4.5
    # an unprofiled run names no profile file; without a driver peak there is nothing outside to state
    assert fg.memory_outside_allocator([{"mem_gb": 1.0}], None) == {"reserved_gb": None, "outside_allocator_gb": None}
    assert fg.memory_outside_allocator([{"mem_reserved_gb": 2.04}], None)["reserved_gb"] == 2.0


def test_the_wait_for_idle_gpus_returns_once_idle_and_gives_up_at_its_limit(fg, monkeypatch):
    readings = iter([[5000, 200], [3000, 200], [800, 200], [100, 100]])
    monkeypatch.setattr(fg, "query_gpu_used_mib", lambda: next(readings))
    assert fg.wait_for_idle_gpus(threshold_mib=1000, limit_s=5, poll_s=0.01) == ([800, 200], True)
    assert next(readings) == [100, 100]  # it stopped polling at the first idle reading
    monkeypatch.setattr(fg, "query_gpu_used_mib", lambda: [5000])
    t0 = time.monotonic()
    assert fg.wait_for_idle_gpus(threshold_mib=1000, limit_s=0.3, poll_s=0.05) == ([5000], False)
    assert 0.3 <= time.monotonic() - t0 < 2
    monkeypatch.setattr(fg, "query_gpu_used_mib", lambda: None)  # no nvidia-smi: no wait
    assert fg.wait_for_idle_gpus(limit_s=5) == (None, False)
    monkeypatch.setattr(fg, "query_gpu_used_mib", lambda: pytest.fail("queried on CPU"))
    assert fg.start_gpu_run("cpu") is None


#: a child that starts a sleeping grandchild (in a session of its own with "session", as torchrun starts its
#: ranks), prints its pid, then sleeps (or exits at once with "exit")
_PARENT = ("import subprocess, sys, time\n"
           "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
           "                     start_new_session='session' in sys.argv)\n"
           "print(g.pid, flush=True)\n"
           "if 'exit' not in sys.argv:\n"
           "    time.sleep(60)\n")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and waiting for its reaper, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _grandchild(log: Path) -> int:
    return int(log.read_text().split()[0])


@pytest.mark.skipif(not Path("/proc").is_dir() or not hasattr(os, "killpg"), reason="needs POSIX with /proc")
def test_a_timed_out_run_is_killed_with_its_grandchildren(fg, tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        assert fg.run_child([sys.executable, "-c", _PARENT], dict(os.environ), f, timeout=1.5) is None
    assert _gone_within(_grandchild(log), 3)
    # a grandchild in a session of its own (a torchrun rank) too
    with log.open("w") as f:
        assert fg.run_child([sys.executable, "-c", _PARENT, "session"], dict(os.environ), f, timeout=1.5) is None
    assert _gone_within(_grandchild(log), 3)
    # a child that exits leaves nothing behind either (its DataLoader workers would hold GPU memory)
    with log.open("w") as f:
        assert fg.run_child([sys.executable, "-c", _PARENT, "exit"], dict(os.environ), f, timeout=30) == 0
    assert _gone_within(_grandchild(log), 3)
    # negative control: subprocess.run's timeout (what the bench did) kills only the child
    with log.open("w") as f:
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run([sys.executable, "-c", _PARENT], stdout=f, timeout=1.5)
    pid = _grandchild(log)
    try:
        assert not _gone_within(pid, 0.5)
    finally:
        os.kill(pid, 9)


#: a bench stand-in: loads finetune_gpu.py, arms (or, with "plain", does not arm) exit_on_sigterm, then runs the
#: _PARENT child under run_child with a long timeout
_BENCH = ("import importlib.util, os, sys\n"
          "spec = importlib.util.spec_from_file_location('fg_term', sys.argv[1])\n"
          "fg = importlib.util.module_from_spec(spec); spec.loader.exec_module(fg)\n"
          "if 'plain' not in sys.argv: fg.exit_on_sigterm()\n"
          "with open(sys.argv[2], 'w') as f:\n"
          "    fg.run_child([sys.executable, '-c', sys.argv[3]], dict(os.environ), f, timeout=60)\n")


def _terminated_bench_leaves(tmp_path: Path, *extra: str) -> int:
    """Start the bench stand-in, SIGTERM it (as ``timeout`` does) once its child's grandchild runs; the pid of
    that grandchild."""
    log = tmp_path / f"child{'-'.join(extra)}.txt"
    bench = subprocess.Popen([sys.executable, "-c", _BENCH, str(BENCHES / "finetune_gpu.py"), str(log), _PARENT,
                              *extra])
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().strip()):
        assert time.monotonic() < deadline, "the bench stand-in never started its child"
        time.sleep(0.05)
    bench.terminate()
    bench.wait(timeout=30)
    return _grandchild(log)


@pytest.mark.skipif(not Path("/proc").is_dir() or not hasattr(os, "killpg"), reason="needs POSIX with /proc")
def test_a_bench_stopped_by_timeout_kills_its_running_child(tmp_path):
    assert _gone_within(_terminated_bench_leaves(tmp_path), 5)
    # negative control: without the handler, SIGTERM ends the bench at once and its child's tree runs on
    pid = _terminated_bench_leaves(tmp_path, "plain")
    try:
        assert not _gone_within(pid, 0.5)
    finally:
        os.kill(pid, 9)


def test_memory_rows_carry_the_reservation_and_what_lies_outside_it(tmp_path, monkeypatch):
    mg = _load("memory_gpu_hygiene", "memory_gpu.py")
    made, caps = [], []

    def fake_run_nvl(args, model_dir, data, workload, method, variant, work, seq, extra_args=(), name_suffix="",
                     profile=False):
        capped = "NVL_BENCH_MEMORY_CAP_GB" in os.environ
        made.append(capped)
        caps.append((os.environ.get("NVL_BENCH_MEMORY_CAP_GB"), variant.get("train.memory_budget_gb")))
        return {"system": "nvl", "workload": workload, "method": method, "seq": seq, "gpus": 1, "tp": 1,
                "status": "ok", "tokens_per_s": 900.0 if capped else 1000.0, "peak_gb": 30.0,
                "peak_gb_nvidia_smi": 40.0 if capped else 50.0, "reserved_gb": 37.5 if capped else 46.0,
                "outside_allocator_gb": 2.5 if capped else 4.0, "_log": str(tmp_path / "none.txt")}

    monkeypatch.setattr(mg.fg, "run_nvl", fake_run_nvl)
    args = mg.fg.parse_args(["--device", "cuda", "--peer-seqs", "", "--profile", ""])
    args.seq_override, args.no_baseline, args.profile_rows, args.size, args.default_gbs = None, (), (), "tiny", 4
    base, row = mg.run_row(args, "cord_48", mg.ROWS["cord_48"], tmp_path, {}, tmp_path, 80.0, {})
    assert made == [False, True] and "NVL_BENCH_MEMORY_CAP_GB" not in os.environ
    # the 48 GB card is emulated; nvl holds the run to the 44 GB target itself (train.memory_budget_gb)
    assert caps == [(None, None), ("48", "44")] and row["cap_gb"] == 48
    assert (base["reserved_gb"], base["outside_allocator_gb"], base["peak_gb"]) == (46.0, 4.0, 50.0)
    assert (row["reserved_gb"], row["outside_allocator_gb"], row["peak_gb"], row["allocated_gb"]) == (
        37.5, 2.5, 40.0, 30.0)
    md = mg.markdown([base, row]).splitlines()
    cols = [c.strip() for c in md[0].strip("|").split("|")]
    assert cols[cols.index("peak GB") + 1] == "reserved GB" and md[1].count("---") == len(cols)
    cells = [c.strip() for c in md[3].strip("|").split("|")]
    assert len(cells) == len(cols) and cells[cols.index("reserved GB")] == "37.5"
