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
