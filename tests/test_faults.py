"""Faults (issue 17): signals and kill -9 during writes, leaving nothing behind; one line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "fault_support"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NVL_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from nvl_nemotron_vl.toy import write_toy_checkpoint

    return write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "hf", "tiny", seed=0)


def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def start_slow(*args: str, delay: float = 0.05) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SUPPORT / "slow_nvl.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "NVL_TEST_DELAY": str(delay)},
                            stdin=subprocess.DEVNULL)


def wait_for_temp(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.is_dir() and any(p.rglob("*")) for p in temps(out)):
            time.sleep(0.5)  # well inside the write
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no temporary output for {out} within {timeout} s")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_convert_import_removes_the_temp_output_and_says_one_line(toy, tmp_path, sig, code):
    out = tmp_path / "ckpt"
    proc = start_slow("convert", "import", "--hf-model", str(toy), "--megatron-path", str(out), "--no-progress")
    try:
        wait_for_temp(proc, out)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert stderr.strip().splitlines()[-1] == f"nvl: interrupted; nothing was written to {out}"
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and temps(out) == []


def test_kill_9_during_import_leaves_a_temp_that_the_next_run_removes_saying_so(toy, tmp_path):
    out = tmp_path / "ckpt"
    proc = start_slow("convert", "import", "--hf-model", str(toy), "--megatron-path", str(out), "--no-progress")
    try:
        wait_for_temp(proc, out)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = temps(out)
    assert len(left) == 1 and f"-{proc.pid}-" in left[0].name
    done = subprocess.run([sys.executable, "-m", "nvlcore", "convert", "import", "--hf-model", str(toy),
                           "--megatron-path", str(out), "--no-progress"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"removed {left[0]}, left by process {proc.pid} that no longer runs" in done.stderr
    assert temps(out) == [] and (out / "iter_0000000").is_dir()


def test_stale_temps_of_live_processes_and_other_hosts_are_kept(tmp_path):
    from nvlcore.checkpoint.atomic import remove_stale_temps, temp_sibling

    out = tmp_path / "out"
    mine = temp_sibling(out)
    mine.mkdir()  # this process: alive
    other_host = tmp_path / f".out.tmp-elsewhere-{2**22 + 7}-0123abcd"
    other_host.mkdir()
    legacy = tmp_path / ".out.tmp-0123abcd"  # no owner recorded: never guessed at
    legacy.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    stale.mkdir()
    assert remove_stale_temps(out, quiet=True) == [stale]
    assert mine.is_dir() and other_host.is_dir() and legacy.is_dir() and not stale.exists()
