"""The documentation index links every page, and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_index_links_every_page_and_resolves() -> None:
    index = (DOCS / "index.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", index)
    assert links
    for link in links:
        assert (DOCS / link).exists(), f"docs/index.md links to missing {link}"
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md")
    unlinked = [p for p in pages if p not in links]
    assert not unlinked, f"add these pages to docs/index.md: {unlinked}"


def test_readme_test_command_is_what_ci_runs() -> None:
    root = DOCS.parent
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    assert "make test" in readme and re.search(r"^make test\s*$", ci, re.M)


def test_architecture_layout_names_every_core_module_and_plugin() -> None:
    """docs/architecture.md stays true to the tree: each core module/package and plugin is in its layout."""
    root = DOCS.parent
    text = (DOCS / "architecture.md").read_text()
    layout = text[text.index("## 2. Layout") : text.index("## 3.")]
    core = [p.name + ("/" if p.is_dir() else "") for p in (root / "nvlcore").iterdir()
            if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")]  # fmt: skip
    plugins = [p.name + "/" for p in (root / "plugins").iterdir() if (p / "pyproject.toml").exists()]
    missing = [name for name in [*core, *plugins] if name not in layout]
    assert not missing, f"add to the layout of docs/architecture.md: {missing}"
