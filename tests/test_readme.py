"""README.md stays true: its Python example runs, and CI runs its quick-start commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^```bash\n(.*?)\n```", quick_start, re.MULTILINE | re.DOTALL)
    install = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"'
    assert commands == [f"{install} && dagprune prune",
                        f"{install} && python -m pytest -q"]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "INSTALL='pip install -e \".[dev]\"'" in ci and "TEST='python -m pytest -q'" in ci


def test_python_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    examples = _code_blocks("python")
    pytest.importorskip("transformers")
    assert len(examples) == 3, "the workflow example, the token-input example and the Hugging Face example"
    monkeypatch.chdir(tmp_path)  # the first example saves to out/
    for example in examples:
        exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "out" / "resnet18" / "graph.json").is_file()
