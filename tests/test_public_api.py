"""Plugins import only nvlcore's public modules (:data:`nvlcore.PUBLIC_MODULES`).

Every import of an nvlcore module in a plugin package under ``plugins/`` and ``docs/examples/`` (their
``tests/`` excepted: tests may reach further) is read from the source with ``ast``, at module level,
inside functions and under ``TYPE_CHECKING`` alike. ``from nvlcore.pkg import name`` names the submodule
``nvlcore.pkg.name`` when there is one, else ``nvlcore.pkg``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import nvlcore

ROOT = Path(__file__).resolve().parents[1]


def plugin_sources() -> list[Path]:
    """The source files of every plugin package (not their tests) of plugins/ and docs/examples/."""
    out: list[Path] = []
    for parent in (ROOT / "plugins", ROOT / "docs" / "examples"):
        for path in sorted(parent.rglob("*.py")):
            rel = path.relative_to(parent).parts
            if "tests" not in rel and not path.name.startswith(("test_", "conftest")):
                out.append(path)
    return out


def nvlcore_imports(source: str) -> set[str]:
    """The nvlcore modules ``source`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nvlcore"}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] != "nvlcore":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).is_dir() or (ROOT / rel).with_suffix(".py").is_file()


def private_imports(path: Path) -> list[str]:
    return sorted(m for m in nvlcore_imports(path.read_text()) if m not in nvlcore.PUBLIC_MODULES)


def test_plugins_import_only_public_modules() -> None:
    sources = plugin_sources()
    assert len(sources) > 20, sources
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in sources for m in private_imports(p)]
    assert not bad, "import these through a public module (nvlcore.PUBLIC_MODULES) or declare it public:\n" + (
        "\n".join(bad))


def test_a_private_import_inside_a_function_is_found(tmp_path: Path) -> None:
    """Negative control: the check sees a private import planted inside a function."""
    planted = tmp_path / "plugin.py"
    planted.write_text("from nvlcore.bridge import ModelBridge\n\n\ndef load():\n"
                       "    from nvlcore.convert.engine import import_hf_checkpoint\n\n"
                       "    from nvlcore.checkpoint import atomic\n")
    assert private_imports(planted) == ["nvlcore.checkpoint.atomic", "nvlcore.convert.engine"]


@pytest.mark.parametrize("name", nvlcore.PUBLIC_MODULES)
def test_every_public_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_the_guide_lists_every_public_module() -> None:
    guide = (ROOT / "docs" / "plugin-authors.md").read_text()
    section = guide[guide.index("## The public API"):guide.index("## Testing a plugin")]
    missing = [m for m in nvlcore.PUBLIC_MODULES if f"`{m}`" not in section]
    assert not missing, f"add to docs/plugin-authors.md#the-public-api: {missing}"
