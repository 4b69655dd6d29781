"""Source layout rules, read from the AST of src/vegalm: no import cycle between modules (imports inside functions
and `importlib.import_module("literal")` count) and no source file over 600 lines.

The checker is tested on small synthetic packages too, so a green run means something.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at root/package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _base(module: str, is_package: bool, level: int) -> str:
    """The package a relative import of `level` dots in `module` starts from."""
    parts = module.split(".")
    if not is_package:
        parts.pop()
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The package modules that one AST node imports (the most specific module each name resolves to)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = _base(module, is_package, node.level)
            src = f"{base}.{node.module}" if node.module else base
        else:
            src = node.module or ""
        return [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module":
            return [node.args[0].value]
    return []


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (top level, functions, classes)."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(tree):
            for target in _imported(node, name, is_package, modules):
                while target and target not in modules:  # `import a.b.Name`-like leftovers: the nearest module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that ends where it starts) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graphs here are a few hundred modules, well within recursion limits
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the smallest-named module of a strongly connected component (breadth first)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(comp)}")


def long_files(root: Path, package: str, limit: int = MAX_LINES) -> list[str]:
    out = []
    for path in module_names(root, package).values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)}: {n} lines")
    return out


# ---------------------------------------------------------------------------------------------- the rules


def test_no_import_cycles():
    cycles = find_cycles(import_graph(SRC, "vegalm"))
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_no_source_file_over_600_lines():
    assert not long_files(SRC, "vegalm"), f"files over {MAX_LINES} lines: " + "; ".join(long_files(SRC, "vegalm"))


# ---------------------------------------------------------------------------------------------- the checker


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


ACYCLIC = {
    "pkg/__init__.py": "",
    "pkg/a.py": "import os\nfrom pkg import b\nfrom .sub import c\n",
    "pkg/b.py": "from pkg.sub.c import thing\n",
    "pkg/sub/__init__.py": "from . import c\n",
    "pkg/sub/c.py": "thing = 1\nimport json\n",
}


def test_checker_resolves_imports(tmp_path):
    _write(tmp_path, ACYCLIC)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.sub.c"}, "pkg.b": {"pkg.sub.c"},
                     "pkg.sub": {"pkg.sub.c"}, "pkg.sub.c": set()}
    assert find_cycles(graph) == []


@pytest.mark.parametrize("closing", [
    "def f():\n    from pkg import a\n",  # inside a function, absolute `from pkg import mod`
    "class K:\n    def m(self):\n        from .. import a\n",  # relative, two levels up from pkg/sub/c.py
    "import importlib\n\ndef f():\n    return importlib.import_module('pkg.a')\n",
    "from pkg.a import name\n",
])
def test_checker_finds_a_cycle_however_it_is_closed(tmp_path, closing):
    _write(tmp_path, {**ACYCLIC, "pkg/sub/c.py": "thing = 1\n" + closing})
    assert find_cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.sub.c", "pkg.a"]]


def test_checker_names_a_package_init_cycle(tmp_path):
    # The registry pattern: the package imports its plugin, the plugin imports the registry from the package.
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/reg/__init__.py": "from pkg.reg import base\nREGISTRY = {}\n",
                      "pkg/reg/base.py": "def sort():\n    from pkg.reg import REGISTRY\n"})
    assert find_cycles(import_graph(tmp_path, "pkg")) == [["pkg.reg", "pkg.reg.base", "pkg.reg"]]


def test_checker_counts_lines(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/short.py": "x = 1\n" * 600, "pkg/long.py": "x = 1\n" * 601})
    assert long_files(tmp_path, "pkg") == [f"{Path('pkg/long.py')}: 601 lines"]
