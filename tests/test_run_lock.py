"""One writer per run directory (issue 27 item 2): a second process is refused naming the holder's pid
and host; a dead holder's lock is taken over and reported; nothing is left behind after release."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HOLDER = """
import sys, time
from nvlcore.checkpoint import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def start_holder(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.strip() == "locked", f"the holder did not take the lock: {line!r}"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    from nvlcore.checkpoint import RunDirectoryLocked, RunLock
    from nvlcore.checkpoint.lock import LOCK_NAME, holds_run_lock

    root = tmp_path / "run"
    holder = start_holder(root)
    try:
        with pytest.raises(RunDirectoryLocked) as info:
            RunLock(root, what=f"checkpoint.save={root}").acquire()
        message = str(info.value)
        assert f"checkpoint.save={root} is in use by another run: process {holder.pid} on {socket.gethostname()}" \
            in message and "\n" not in message
        assert json.loads((root / LOCK_NAME).read_text())["pid"] == holder.pid  # the refusal erased nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(root).acquire()  # the kernel dropped the dead holder's flock: taken over, and it says whose
    try:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
        assert holds_run_lock(root) and json.loads((root / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (root / LOCK_NAME).exists() and not holds_run_lock(root)
    again = RunLock(root).acquire()  # a clean release leaves no record to report
    assert again.took_over is None
    again.release()


def test_release_removes_a_run_directory_the_lock_created_if_nothing_else_was_written(tmp_path):
    from nvlcore.checkpoint import RunLock

    empty, used = tmp_path / "empty", tmp_path / "used"
    RunLock(empty).acquire().release()
    lock = RunLock(used).acquire()
    (used / "iter_0000001").mkdir()
    lock.release()
    assert not empty.exists() and sorted(p.name for p in used.iterdir()) == ["iter_0000001"]
