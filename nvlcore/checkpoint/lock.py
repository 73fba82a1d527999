"""One writer per run directory: an exclusive ``fcntl.flock`` on ``<checkpoint.save>/.nvl-run.lock``.

A training run holds the lock for its whole life on the rank that writes the checkpoint root's
small files (global rank 0); a second run that wants the same directory is refused with the
holder's pid and host. The kernel drops a ``flock`` when its holder dies (even by ``kill -9`` or a
lost machine, for NFS once the server notices), so a crashed run never blocks a resume: the next
run takes the lock and, finding the dead holder's record still in the file, says it took it over.

``fcntl`` is used directly rather than a lock library: the holder's record must be readable by a
process that fails to get the lock, while ``filelock`` truncates the file when it opens it, before
it tries to lock, which would erase the record of a live holder. The lock file is removed when the
lock is released; a process that locked a file some other process removed meanwhile retries on the
new file (the inode check in :meth:`RunLock.acquire`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".nvl-run.lock"

_HELD: dict[Path, RunLock] = {}


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def holds_run_lock(root: str | os.PathLike[str]) -> bool:
    """Whether this process holds the run lock of ``root`` (then nobody else writes there)."""
    return Path(root).expanduser().absolute() in _HELD


def _read_record(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        rec = json.loads(raw.decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def describe_holder(rec: dict[str, Any]) -> str:
    """``process 1234 on host-a (since 2026-12-07T03:00:00Z)`` from a lock record."""
    since = f" (since {rec['started']})" if rec.get("started") else ""
    return f"process {rec.get('pid', '?')} on {rec.get('host', '?')}{since}"


class RunLock:
    """The exclusive lock of one run directory (see the module docstring).

    :param root: the run directory (``checkpoint.save``); created if missing.
    :param what: how messages name the directory (``checkpoint.save=runs/x``).
    """

    def __init__(self, root: str | os.PathLike[str], *, what: str | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.path = self.root / LOCK_NAME
        self.what = what or str(self.root)
        self.fd: int | None = None
        self.created_root = False
        #: the record of a dead holder whose lock this process took over (None: the lock was free)
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirectoryLocked` naming the live holder's pid and host."""
        import fcntl

        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.created_root = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rec = _read_record(fd)
                os.close(fd)
                raise RunDirectoryLocked(
                    f"{self.what} is in use by another run: {describe_holder(rec)} holds {self.path}; wait for it "
                    "to finish, stop it, or choose another checkpoint.save directory"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder before us may have removed the file we locked: lock the current one instead
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        rec = _read_record(fd)
        self.took_over = rec if rec.get("pid") else None
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(mine) + "\n").encode("utf-8"))
        os.fsync(fd)
        self.fd = fd
        _HELD[self.root] = self
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the run directory, if this lock made it and it is empty)."""
        if self.fd is None:
            return
        _HELD.pop(self.root, None)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing the last descriptor of the file drops the flock
        self.fd = None
        if self.created_root:
            try:
                self.root.rmdir()
            except OSError:
                pass  # not empty: the run wrote something

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
