"""Functions stay short and files stay one concept: the size limits of STYLE.md, checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dagprune", "dagprune_algorithms")
MAX_FUNCTION_LINES = 80  # from `def` to its last line, docstring included
MAX_FILE_LINES = 600


def _sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_file_and_its_functions_are_short(path):
    source = path.read_text()
    assert source.count("\n") < MAX_FILE_LINES, f"{path.name} has {source.count(chr(10))} lines: split it by concept"
    long_functions = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
                      for node in ast.walk(ast.parse(source))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 >= MAX_FUNCTION_LINES]
    assert not long_functions, f"{path.name}: split into named steps: {long_functions}"
