"""Atomic file and directory writes: nothing that looks complete appears before it is.

Files are written to a temporary sibling and moved into place with :func:`os.replace`; directories are
built under a hidden temporary sibling (``.<name>.tmp-<host>-<pid>-<id>``) and renamed into place when
complete. A temp sibling is on the same file system as its target, so the rename is atomic.

An error, Ctrl-C or SIGTERM removes the temporary directory. A process killed with SIGKILL cannot, so
the next write to the same output removes the temporary siblings of processes of this host that are no
longer running (:func:`remove_stale_temps`) and says so on stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nvlcore.checkpoint.layout import OLD_MARK, TMP_MARK


class OutputExistsError(FileExistsError):
    """The output exists and ``overwrite`` was not given."""


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None], *, mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temporary sibling of ``path``, fsync it, then ``os.replace`` it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` to ``path`` atomically, after checking ``obj`` reloads with ``weights_only=True``.

    The check happens at save time so that an object a resume could not read (a numpy array, a custom
    class) fails the save that wrote it, with its path, instead of the resume months later.
    """
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TypeError(
            f"cannot save {path}: its content does not load back with torch.load(weights_only=True) ({exc}). "
            "Keep checkpoint states to tensors, numbers, strings, lists, tuples and dicts."
        ) from exc
    return atomic_write(path, lambda f: f.write(buf.getbuffer()))


def remove_tree(path: Path) -> None:
    """Remove a directory tree, tolerating concurrent disappearance."""
    shutil.rmtree(path, ignore_errors=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname() or "host")


def temp_sibling(final: Path, mark: str = TMP_MARK) -> Path:
    """``.<name><mark><host>-<pid>-<random>`` next to ``final``: the owner can be told dead or alive."""
    return final.with_name(f".{final.name}{mark}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


_OWNER_RE = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def temp_owner(name: str, mark: str) -> tuple[str, int] | None:
    """``(host, pid)`` recorded in a :func:`temp_sibling` name (after ``mark``), or None for a name without one."""
    _, sep, rest = name.partition(mark)
    m = _OWNER_RE.match(rest) if sep else None
    return None if m is None else (m["host"], int(m["pid"]))


def this_host() -> str:
    """This machine's name as :func:`temp_sibling` records it."""
    return _host()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(final: str | os.PathLike[str], *, quiet: bool = False) -> list[Path]:
    """Remove temporary siblings of ``final`` left by processes of this host that no longer run (kill -9).

    Only names that record their owner (host and pid, see :func:`temp_sibling`) are touched; a sibling of
    a live process, or of another host, is left alone. Each removal is reported on stderr.
    """
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    host = _host()
    for mark in (TMP_MARK, OLD_MARK):
        prefix = f".{final.name}{mark}"
        for child in final.parent.iterdir():
            if not child.name.startswith(prefix):
                continue
            m = _OWNER_RE.match(child.name[len(prefix):])
            if m is None or m["host"] != host:
                continue
            pid = int(m["pid"])
            if pid == os.getpid() or pid_alive(pid):
                continue
            if child.is_dir() and not child.is_symlink():
                remove_tree(child)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
            removed.append(child)
            if not quiet:
                print(f"nvl: removed {child}, left by process {pid} that no longer runs (killed while writing {final})",
                      file=sys.stderr)
    return removed


def check_can_write(final: str | os.PathLike[str], *, overwrite: bool, what: str = "output") -> None:
    """Raise :class:`OutputExistsError` when ``final`` exists (a non-empty dir or a file) without ``overwrite``."""
    final = Path(final)
    if final.is_file() or final.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{what} {final} exists (a file); remove it or pass --overwrite")
    elif final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OutputExistsError(f"{what} {final} exists and is not empty; choose another path or pass --overwrite")


def publish_dir(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Rename the complete directory ``tmp`` to ``final``; an existing ``final`` is replaced only with ``overwrite``.

    The old directory is first renamed aside (so at every instant either the old or the new complete
    directory is at ``final``) and removed after the new one is in place.
    """
    old: Path | None = None
    if final.exists() or final.is_symlink():
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()
        elif not overwrite:
            raise OutputExistsError(f"{final} exists; pass --overwrite (overwrite=True) to replace it")
        else:
            old = temp_sibling(final, OLD_MARK)
            os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            remove_tree(old)
        else:
            old.unlink()


@contextlib.contextmanager
def scratch_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A work directory next to ``final`` (same file system), removed when the block exits.

    Named like :func:`temp_sibling`, so a ``kill -9`` leftover is removed by the next write to ``final``.
    """
    final = Path(final).expanduser().absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    work = temp_sibling(final)
    work.mkdir()
    try:
        yield work
    finally:
        remove_tree(work)


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike[str], *, overwrite: bool = False,
                      what: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block completes.

    Checks for an existing ``final`` before any work starts and removes temporary siblings that killed
    processes left (:func:`remove_stale_temps`); on any exception (Ctrl-C and SIGTERM included) the
    temporary directory is removed and ``final`` is left exactly as it was.
    """
    from nvlcore import interrupt

    final = Path(final).expanduser().absolute()
    check_can_write(final, overwrite=overwrite, what=what)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final, overwrite=overwrite)
    except BaseException:
        remove_tree(tmp)
        interrupt.note_discarded(final)
        raise
