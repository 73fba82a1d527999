"""The global options of ``nvl`` (``--debug``, ``--quiet``, ``--no-progress``) as any module reads them.

They live on the bottom floor so that what sits under the CLI (the progress bars, a converter's error
path) can ask for them without importing :mod:`nvlcore.cli`; the ``nvl`` group sets them.
"""

from __future__ import annotations

import os

#: Global options of the ``nvl`` group and the environment variables that carry them to worker
#: processes (``nvl --debug finetune --nproc-per-node 2`` sets ``NVL_DEBUG=1`` for its workers).
GLOBAL_FLAGS: dict[str, str] = {"debug": "NVL_DEBUG", "quiet": "NVL_QUIET", "no_progress": "NVL_NO_PROGRESS"}


def global_flag(name: str) -> bool:
    """Whether the global option ``name`` (``debug``, ``quiet``, ``no_progress``) is on: given to the
    ``nvl`` group (``nvl --quiet generate ...``) or set in its environment variable (``NVL_QUIET=1``).
    ``quiet`` implies ``no_progress``. Commands OR this with their own option of the same meaning."""
    import click

    if name == "no_progress" and global_flag("quiet"):
        return True
    env = os.environ.get(GLOBAL_FLAGS[name], "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().meta.get(f"nvl.{name}"))
