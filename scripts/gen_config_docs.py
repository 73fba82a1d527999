#!/usr/bin/env python3
"""Regenerate the "Every key" tables of docs/config.md from the config schema.

Usage: ``python scripts/gen_config_docs.py`` (rewrites the file) or ``--check`` (exit 1 if stale; the
test suite runs that).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
BEGIN = "<!-- BEGIN GENERATED KEYS (scripts/gen_config_docs.py) -->"
END = "<!-- END GENERATED KEYS -->"


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    return repr(value)


def tables() -> str:
    from nvlcore.config import schema_rows

    lines: list[str] = []
    section: str | None = "-"
    for key, tp, default, help_text in schema_rows():
        sec = key.split(".")[0] if "." in key else "top level"
        if sec != section:
            section = sec
            lines += ["", f"### `{sec}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        bar = "\\|"
        lines.append(f"| `{key}` | {tp.replace('|', bar)} | `{_fmt(default)}` | {help_text.replace('|', bar)} |")
    return "\n".join(lines).lstrip("\n")


def render(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{tables()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC}: markers {BEGIN!r} / {END!r} not found", file=sys.stderr)
        return 2
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
