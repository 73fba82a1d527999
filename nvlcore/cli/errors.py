"""How commands turn an exception into their one ``Error:`` line (docs/cli.md: never a traceback)."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """``exc`` as one line with no Python class name.

    An error re-raised from a DataLoader worker carries the worker's traceback in its message
    (``Caught X in DataLoader worker process 0. Original Traceback ...``): it becomes the original
    error's message. A ``KeyError``'s message is its key, not the key's repr.
    """
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = text.strip()
    if "Original Traceback (most recent call last):" in text:
        last = [x for x in text.splitlines() if x.strip()][-1].strip()
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.replace(".", "").replace("_", "").isalnum() else last
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return " ".join(lines) if lines else type(exc).__name__
