"""The module import graphs of dagprune and dagprune_algorithms have no cycles, and the IR
never imports the algorithms.

The graph is read from the source with :mod:`ast` (nothing is imported), by these rules:

* Every import counts, wherever it is: at module level, inside a function or method, under
  ``if TYPE_CHECKING:``. An import moved into a function only postpones a cycle to call time;
  the modules still depend on each other. Calls ``importlib.import_module("a.b")`` and
  ``__import__("a.b")`` with a literal name count too, so a cycle cannot hide behind a string.
* ``import a.b.c`` is an edge to module ``a.b.c``. ``from a.b import name`` is an edge to
  ``a.b.name`` when that is a module of the repository (``a/b/name.py`` or
  ``a/b/name/__init__.py``), otherwise to ``a.b``, whose namespace the statement reads ``name``
  from. Relative imports are resolved against the importing module's package. Modules outside
  the repository (torch, timm, ...) are not nodes.
* A package is one node, its ``__init__.py``. ``from dagprune import DagModule`` in a submodule is
  an edge to ``dagprune``, and ``import dagprune`` inside a function is one too. Because
  ``dagprune/__init__.py`` imports most submodules, such an edge usually closes a cycle, and that
  cycle is real: while ``dagprune/__init__.py`` runs, a submodule it imports that reads a name from
  the half-initialised package fails with ``ImportError`` (or works only thanks to import order).
* Implicit imports of parent packages are not edges. Importing ``dagprune.io`` first runs
  ``dagprune/__init__.py`` if it has not run yet, but when ``dagprune/__init__.py`` itself is the
  importer the package is already in ``sys.modules`` and nothing is read from it, so this step
  can never fail. Counting it would make every package whose ``__init__`` re-exports its
  submodules cyclic by construction. ``from dagprune import ops`` with ``dagprune/ops/`` a package
  is therefore an edge to ``dagprune.ops`` only: Python finds a submodule there in ``sys.modules``
  even while ``dagprune`` is half-initialised.
* A module importing itself is a cycle of length one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
IR_PACKAGE = "dagprune"
ALGORITHMS_PACKAGE = "dagprune_algorithms"

# module -> {imported module: "file:line" of the first import statement making that edge}
ImportGraph = dict[str, dict[str, str]]


# --------------------------------------------------------------------------------- reading
def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Maps the dotted name of every ``.py`` file of ``packages`` under ``root`` to its path.

    A package's ``__init__.py`` is named like the package (``dagprune/ops/__init__.py`` is
    ``dagprune.ops``).
    """
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _absolute_module(name: str | None, level: int, importer: str, importer_is_package: bool) -> str:
    """The absolute module named by ``from <level dots><name> import ...`` in ``importer``."""
    if level == 0:
        return name or ""
    package = importer.split(".") if importer_is_package else importer.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal_dynamic_import(call: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")`` or ``__import__("x")``, else None."""
    function = call.func
    is_dynamic_import = (isinstance(function, ast.Attribute) and function.attr == "import_module") \
        or (isinstance(function, ast.Name) and function.id in ("import_module", "__import__"))
    if is_dynamic_import and call.args and isinstance(call.args[0], ast.Constant) \
            and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def imports_in(source: str, importer: str, importer_is_package: bool
               ) -> Iterator[tuple[str, tuple[str, ...], int]]:
    """Yields ``(module, names, line)`` for every import in ``source``, at any nesting level.

    ``names`` is empty for ``import module`` and dynamic imports, else the names of
    ``from module import names``.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = _absolute_module(node.module, node.level, importer, importer_is_package)
            yield module, tuple(alias.name for alias in node.names), node.lineno
        elif isinstance(node, ast.Call):
            module = _literal_dynamic_import(node)
            if module is not None:
                yield module, (), node.lineno


def imported_modules(module: str, names: tuple[str, ...], known: set[str]) -> set[str]:
    """The repository modules that ``import module`` / ``from module import names`` imports.

    Args:
        module: the absolute module named by the statement.
        names: the names after ``import`` in a ``from`` statement; empty for ``import module``.
        known: the dotted names of all repository modules.

    Returns:
        ``module.name`` for each name that is a repository module, ``module`` itself for the
        others (or for ``import module``); empty when ``module`` is outside the repository.

    >>> sorted(imported_modules("dagprune", ("ops", "DagModule"), {"dagprune", "dagprune.ops"}))
    ['dagprune', 'dagprune.ops']
    """
    if not names:
        return {module} & known
    targets = {f"{module}.{name}" for name in names if f"{module}.{name}" in known}
    if len(targets) < len(names) and module in known:
        targets.add(module)
    return targets


def build_import_graph(files: dict[str, Path], root: Path) -> tuple[ImportGraph, list[str]]:
    """The import graph of ``files`` (see the module docstring for the rules).

    Returns:
        The graph, and the imports of the repository's packages that name no existing module
        (as ``"file:line: module"``).
    """
    known = set(files)
    top_level = {name.split(".")[0] for name in known}
    graph: ImportGraph = {name: {} for name in files}
    unresolved = []
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        for module, names, line in imports_in(path.read_text(), importer, is_package):
            where = f"{path.relative_to(root)}:{line}"
            targets = imported_modules(module, names, known)
            if not targets and module.split(".")[0] in top_level:
                unresolved.append(f"{where}: {module}")
            for target in targets:
                graph[importer].setdefault(target, where)
    return graph, unresolved


# --------------------------------------------------------------------------------- cycles
def within_package(graph: ImportGraph, package: str) -> ImportGraph:
    """The subgraph of the modules of ``package`` (the package and its submodules)."""
    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")
    return {name: {target: where for target, where in edges.items() if inside(target)}
            for name, edges in graph.items() if inside(name)}


def strongly_connected_components(graph: ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm; every module is in exactly one component."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_cycle_through(graph: ImportGraph, start: str, members: set[str]) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside ``members`` (breadth-first)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(graph[node]):
            if target not in members:
                continue
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]
            if target not in previous:
                previous[target] = node
                queue.append(target)
    return []


def import_cycles(graph: ImportGraph) -> list[list[str]]:
    """One shortest cycle through each module that is on a cycle, without repeats.

    Each cycle is a path ``[a, b, ..., a]`` that starts at its alphabetically first module.
    """
    cycles = []
    for component in strongly_connected_components(graph):
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        for start in component:
            cycle = shortest_cycle_through(graph, start, set(component))
            first = cycle.index(min(cycle))
            canonical = cycle[first:-1] + cycle[:first] + [cycle[first]]
            if canonical not in cycles:
                cycles.append(canonical)
    return cycles


def describe_cycles(graph: ImportGraph, cycles: list[list[str]]) -> str:
    """The cycles as readable paths, each edge with the line that makes it."""
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        lines.extend(f"    {source} -> {target}  ({graph[source][target]})"
                     for source, target in zip(cycle, cycle[1:]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def repository_graph() -> tuple[ImportGraph, list[str]]:
    return build_import_graph(module_files(REPO_ROOT, (IR_PACKAGE, ALGORITHMS_PACKAGE)), REPO_ROOT)


@pytest.mark.parametrize("package", [IR_PACKAGE, ALGORITHMS_PACKAGE])
def test_package_has_no_import_cycle(repository_graph, package):
    graph = within_package(repository_graph[0], package)
    cycles = import_cycles(graph)
    assert not cycles, f"{package} has import cycles:\n{describe_cycles(graph, cycles)}"


def test_ir_never_imports_the_algorithms(repository_graph):
    graph, _ = repository_graph
    upward = [f"{importer} -> {target}  ({where})"
              for importer in within_package(graph, IR_PACKAGE)
              for target, where in graph[importer].items()
              if target.split(".")[0] == ALGORITHMS_PACKAGE]
    assert not upward, "dagprune (the IR) imports dagprune_algorithms:\n" + "\n".join(upward)


def test_every_import_of_the_packages_names_an_existing_module(repository_graph):
    _, unresolved = repository_graph
    assert not unresolved, "imports of missing modules:\n" + "\n".join(unresolved)


def test_importing_the_ir_does_not_import_timm():
    probe = "import sys, dagprune; print(sorted(m for m in sys.modules if m.split('.')[0] == 'timm'))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]", f"import dagprune imported {result.stdout.strip()}"


def test_timm_support_loads_when_a_converted_model_may_need_it():
    probe = "\n".join([
        "import sys, torch, dagprune",
        "dagprune.build_from_unstructured_module(torch.nn.Linear(2, 2))",
        "print('timm' in sys.modules, 'dagprune.timm_layers' in sys.modules)",
        "import timm",
        "dagprune.build_from_unstructured_module(torch.nn.Linear(2, 2))",
        "print('dagprune.timm_layers' in sys.modules)",
    ])
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["False", "False", "True"]


# --------------------------------------------------------------------------------- the reader
def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return module_files(root, ("pkg",))


def test_reader_finds_cycles_hidden_in_functions_and_package_imports(tmp_path):
    files = _write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.graph import Graph\nfrom pkg import io\n",
        "pkg/graph.py": "class Graph:\n    def save(self):\n        from pkg.io import save\n",
        "pkg/io.py": "from pkg import Graph\n",
        "pkg/sub/__init__.py": "from . import leaf\n",
        "pkg/sub/leaf.py": "import importlib\nimportlib.import_module('pkg.sub')\n",
    })
    graph, unresolved = build_import_graph(files, tmp_path)
    assert graph["pkg.graph"] == {"pkg.io": "pkg/graph.py:3"}
    assert set(graph["pkg"]) == {"pkg.graph", "pkg.io"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf": "pkg/sub/__init__.py:1"}
    assert sorted(import_cycles(graph)) == [["pkg", "pkg.graph", "pkg.io", "pkg"],
                                            ["pkg", "pkg.io", "pkg"],
                                            ["pkg.sub", "pkg.sub.leaf", "pkg.sub"]]
    assert unresolved == []


def test_reader_ignores_implicit_parent_imports_and_outside_modules(tmp_path):
    files = _write_package(tmp_path, {
        "pkg/__init__.py": "from pkg import ops\nimport torch\n",
        "pkg/ops/__init__.py": "from pkg.ops.base import Op\n",
        "pkg/ops/base.py": "import os\nfrom ..missing import thing\n",
    })
    graph, unresolved = build_import_graph(files, tmp_path)
    assert graph == {"pkg": {"pkg.ops": "pkg/__init__.py:1"},
                     "pkg.ops": {"pkg.ops.base": "pkg/ops/__init__.py:1"}, "pkg.ops.base": {}}
    assert import_cycles(graph) == []
    assert unresolved == ["pkg/ops/base.py:2: pkg.missing"]
