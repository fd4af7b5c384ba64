"""The library installs and imports without the app: layering and dependencies stay honest.

* Importing the library (``dagprune``, ``dagprune_algorithms``, ``dagprune_algorithms.pruning``)
  in a fresh interpreter loads neither the app nor the packages of the ``app`` and ``dev``
  extras (``setup.cfg``): they are not installed with the library alone.
* Read from the source with :mod:`ast` (nothing imported): no module of the library imports
  the app, and the IR never imports the algorithms. Imports inside functions count, and so do
  ``importlib.import_module("...")`` / ``__import__("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGE = "dagprune_algorithms.app"

LIBRARY_IMPORTS = ("dagprune", "dagprune_algorithms", "dagprune_algorithms.pruning")
"""What a user of the library imports."""

NOT_LOADED_BY_THE_LIBRARY = ("matplotlib", "sklearn", "fvcore", "timm", "hypothesis", "pytest", APP_PACKAGE)
"""Top-level packages of the extras (app: timm, scikit-learn, matplotlib; dev: fvcore and the
test tools) and the app itself. tqdm is not listed: torch itself imports it when present."""


# --------------------------------------------------------------------------------- importing
def test_importing_the_library_loads_no_app_and_no_extra():
    script = (f"import json, sys\n"
              f"for name in {LIBRARY_IMPORTS!r}:\n"
              f"    __import__(name)\n"
              f"print(json.dumps(sorted(sys.modules)))\n")
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    unwanted = sorted(name for name in loaded for package in NOT_LOADED_BY_THE_LIBRARY
                      if name == package or name.startswith(package + "."))
    assert not unwanted, f"importing the library loaded {unwanted}"


# --------------------------------------------------------------------------------- the source
def library_files() -> Iterator[tuple[str, Path]]:
    """``(dotted module name, path)`` of every module of dagprune and dagprune_algorithms but the app."""
    app_directory = REPO_ROOT / Path(*APP_PACKAGE.split("."))
    for package in ("dagprune", "dagprune_algorithms"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if app_directory in path.parents:
                continue
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported_modules(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """``(imported name, line)`` of every import of the file, relative imports resolved.

    ``from a import b`` yields ``a.b`` (``b`` may be a module), so that ``from
    dagprune_algorithms import app`` is seen as importing the app.
    """
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package_parts = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package_parts[:len(package_parts) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield node.args[0].value, node.lineno


def _is_dynamic_import(function: ast.expr) -> bool:
    if isinstance(function, ast.Name):
        return function.id in ("__import__", "import_module")
    return isinstance(function, ast.Attribute) and function.attr == "import_module"


def _imports_of(package: str) -> list[str]:
    """``"file:line imports name"`` for every import of ``package`` (or its modules) by the library."""
    found = []
    for module, path in library_files():
        for name, line in imported_modules(module, path):
            if name == package or name.startswith(package + "."):
                found.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {name}")
    return found


def test_the_library_never_imports_the_app():
    assert not _imports_of(APP_PACKAGE)


def test_the_ir_never_imports_the_algorithms():
    found = [entry for entry in _imports_of("dagprune_algorithms") if entry.startswith("dagprune/")]
    assert not found


def test_the_import_reader_sees_every_form_of_import(tmp_path):
    package = tmp_path / "dagprune_algorithms" / "pruning"
    package.mkdir(parents=True)
    source = package / "example.py"
    source.write_text("import dagprune_algorithms.app.cli\n"
                      "from dagprune_algorithms import app\n"
                      "from .. import app as application\n"
                      "def later():\n"
                      "    import importlib\n"
                      "    return importlib.import_module('dagprune_algorithms.app.data')\n")
    names = {name for name, _ in imported_modules("dagprune_algorithms.pruning.example", source)}
    assert {"dagprune_algorithms.app.cli", "dagprune_algorithms.app",
            "dagprune_algorithms.app.data"} <= names
    assert [line for name, line in imported_modules("dagprune_algorithms.pruning.example", source)
            if name == "dagprune_algorithms.app"] == [2, 3]
