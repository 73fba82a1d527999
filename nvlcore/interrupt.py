"""Ctrl-C and SIGTERM for the ``nvl`` commands: clean up, one line, exit 130 / 143.

:func:`install` (called by the ``nvl`` group around every command) turns SIGINT and SIGTERM into
:class:`Interrupted`, a ``KeyboardInterrupt``, so that every ``with``/``finally`` runs: atomic writers
remove their temporary output (:func:`nvlcore.checkpoint.atomic_output_dir` records it here with
:func:`note_discarded`). The group then prints one line, ``nvl: interrupted; nothing was written to
OUT``, and exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), never a traceback.

``nvl finetune`` installs its own handlers while it trains (it saves a checkpoint at the next
iteration boundary and exits with :data:`EXIT_STOPPED_EARLY`).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

#: Exit status of ``nvl finetune`` that stopped early on SIGTERM/SIGINT after saving a checkpoint
#: (``EX_TEMPFAIL``: "try again", i.e. resume), in a single process and from the multi-process launcher.
EXIT_STOPPED_EARLY = 75

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None
_discarded: list[Path] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handle(signum: int, frame: Any) -> None:
    global _received
    _received = signum
    raise Interrupted(signum)


def install() -> dict[int, Any]:
    """Route SIGINT/SIGTERM to :class:`Interrupted` (main thread only); returns the previous handlers."""
    global _received
    _received = None
    _discarded.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _handle) for sig in _SIGNALS}


def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def note_discarded(path: str | Path) -> None:
    """An output that was being written and has been removed (its temporary directory) because of an error."""
    _discarded.append(Path(path))


def received() -> int | None:
    """The signal that interrupted this command, if any."""
    return _received


def exit_status(exc: BaseException) -> int | None:
    """``128 + signal`` when ``exc`` ends a command interrupted by a signal (or Ctrl-C), else ``None``.

    A signal can surface as another exception (torch's writer raises ``RuntimeError: ... unexpected
    pos`` when a write is cut short), so any exception after a recorded signal counts, except an exit
    the command chose itself.
    """
    if isinstance(exc, SystemExit):
        return None
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if _received is not None:
        return 128 + _received
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return None


def message() -> str:
    """The one line printed for an interrupted command."""
    # a write nested inside another's temporary directory (a checkpoint saved into an import's) is not
    # an output of its own
    outer = [p for p in dict.fromkeys(_discarded) if not any(a.name.startswith(".") and ".tmp-" in a.name
                                                             for a in p.parents)]
    if outer:
        return "nvl: interrupted; nothing was written to " + ", ".join(str(p) for p in outer)
    return "nvl: interrupted"
