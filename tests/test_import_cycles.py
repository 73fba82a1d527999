"""No import cycle between the modules of nvlcore and of every plugin package.

The graph is read from the source with ``ast``, not by importing: an edge ``a -> b`` for every
``import b`` / ``from b import x`` / ``from . import b`` in module ``a``, at module level, inside
functions and under ``if TYPE_CHECKING:`` alike (a function-level import only hides a cycle until the
function runs). ``from package import name`` points at the submodule ``package.name`` when there is
one, else at the package's ``__init__``. The parent packages that Python imports on the way are not
edges (every submodule would otherwise "import" its own ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_roots() -> list[Path]:
    """nvlcore, and every package (or single-module plugin) of the plugins and documented examples."""
    roots = [ROOT / "nvlcore"]
    for parent in (ROOT / "plugins", ROOT / "docs" / "examples"):
        for dist in sorted(p for p in parent.iterdir() if p.is_dir()):
            for top in (dist, dist / "src"):
                if top.is_dir():
                    roots += sorted(p for p in top.iterdir() if p.name != "tests" and (
                        (p / "__init__.py").is_file()
                        or (p.suffix == ".py" and not p.name.startswith(("test_", "conftest", "setup")))))
    return roots


def modules_of(root: Path) -> dict[str, Path]:
    """Module name -> file for a package directory or a single-module plugin."""
    if root.is_file():
        return {root.stem: root}
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` names a.b.c; the longest known prefix is the module it reaches
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for root in package_roots():
        modules.update(modules_of(root))
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_graph_covers_the_core_and_every_plugin():
    graph = import_graph()
    assert "nvlcore.parallel" in graph and "nvl_nemotron_vl.model.mamba" in graph and "nvl_lora.layers" in graph
    assert "nvl_dataset_example" in graph and "nvl_data_raven" in graph
    assert "nvl_nemotron_vl.model.cache" in graph["nvl_nemotron_vl.model.mamba"]
    assert "nvlcore.parallel" in graph["nvl_nemotron_vl.model.parallel"]
    # a function-level import is an edge too
    assert "nvl_nemotron_vl.generate" in graph["nvl_nemotron_vl.bridge"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, None),
])
def test_find_cycle_names_the_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_relative_and_from_imports_resolve(tmp_path):
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .. import top\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import x\n    from . import other\n")
    (pkg / "sub" / "other.py").write_text("import pk.sub.leaf\n")
    (pkg / "top.py").write_text("from pk.sub import leaf\n")
    mods = modules_of(pkg)
    known = set(mods)
    graph = {n: imports_of(n, p, known) for n, p in mods.items()}
    assert graph["pk.sub"] == {"pk.top"}
    assert graph["pk.sub.leaf"] == {"pk.top", "pk.sub.other"}
    assert graph["pk.top"] == {"pk.sub.leaf"}
    assert find_cycle(graph) == ["pk.sub.leaf", "pk.sub.other", "pk.sub.leaf"]
