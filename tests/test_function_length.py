"""No function or method in nvlcore is over 120 lines (the developers' guide; issue 26's must-show).

Lines are counted from the ``def`` (decorators excluded) to the last line of the body, docstring and
comments included, as a reader scrolls them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 120


def long_functions(source: str, name: str, limit: int = LIMIT) -> list[str]:
    """``name:line function (n lines)`` for every function of ``source`` longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_in_nvlcore_is_over_120_lines() -> None:
    files = sorted((ROOT / "nvlcore").rglob("*.py"))
    assert len(files) > 50, files
    found = [hit for p in files for hit in long_functions(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not found, "split these into short steps:\n" + "\n".join(found)


def test_a_long_method_is_found() -> None:
    """Negative control: a 121-line method nested in a class is reported, a 120-line one is not."""
    body = "".join(f"        x{i} = {i}\n" for i in range(118))
    assert long_functions(f"class A:\n    def f(self):\n{body}        return 1\n", "a.py") == []
    src = f"class A:\n    def f(self):\n{body}        y = 0\n        return 1\n"
    assert long_functions(src, "a.py") == ["a.py:2 f (121 lines)"]
