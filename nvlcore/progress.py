"""The one progress bar of nvl: tqdm on stderr, on a terminal only.

Used by convert, finetune's data preparation, toy-model, merge and generate's model load. A bar is
shown when all of these hold:

- the caller's ``enabled`` is not ``False`` (a command's own ``--no-progress``), and neither the global
  ``nvl --no-progress`` nor ``nvl --quiet`` is given (nor ``NVL_NO_PROGRESS`` / ``NVL_QUIET`` set);
- ``NVL_PROGRESS`` is not ``0`` (``1`` forces bars on, even when stderr is not a terminal);
- stderr is a terminal (logs and pipes get no carriage-return noise);
- this process is rank 0 of a launch (``RANK`` unset or ``0``).

tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "NVL_PROGRESS"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def progress_enabled(enabled: bool | None = None, stream: Any = None) -> bool:
    """Whether a bar should be drawn (see the module docstring for the rules)."""
    if enabled is False:
        return False
    from nvlcore.flags import global_flag

    if global_flag("no_progress"):  # nvl --no-progress / --quiet (or NVL_NO_PROGRESS / NVL_QUIET)
        return False
    if os.environ.get("RANK", "0") not in ("", "0"):
        return False
    env = os.environ.get(ENV, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A bar of ``total`` units (``unit="B"``: bytes, shown scaled); does nothing when disabled.

    :param enabled: ``False`` turns it off; ``None``/``True`` leave the decision to :func:`progress_enabled`.
    """

    def __init__(self, total: int | None, desc: str, *, enabled: bool | None = None, unit: str = "it") -> None:
        self.bar: Any = None
        self.total, self.desc = total, desc
        if progress_enabled(enabled):
            from tqdm import tqdm

            scaled = unit == "B"
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1000 if scaled else 1,
                            file=sys.stderr, mininterval=0.2, dynamic_ncols=True, leave=True)

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def update(self, n: int = 1, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix[-48:], refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_iter(iterable: Iterable[T], desc: str, *, total: int | None = None, enabled: bool | None = None,
                  unit: str = "it") -> Iterator[T]:
    """Iterate with a bar (one update per item)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, enabled=enabled, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)
