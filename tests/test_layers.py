"""nvlcore's floors (``[tool.importlinter]`` in pyproject.toml, docs/architecture.md#floors) hold.

``lint-imports`` (import-linter, on grimp's graph) sees imports inside functions and under
``TYPE_CHECKING`` as well as module-level ones: the negative control plants an upward import inside a
function of a copy of the tree and expects the contract to break there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the ``nvlcore`` package found in ``tree`` (its pyproject.toml's contracts)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_tree_keeps_its_floors() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout, result.stdout


def test_an_upward_import_inside_a_function_breaks_the_floors(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "nvlcore", tmp_path / "nvlcore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    registry = tmp_path / "nvlcore" / "registry.py"  # the bottom floor reaching for the CLI on the top one
    registry.write_text(registry.read_text() + "\n\ndef _planted() -> None:\n    from nvlcore.cli import build_cli\n\n"
                        "    build_cli()\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "nvlcore.registry -> nvlcore.cli" in result.stdout, result.stdout
