"""What the bounded samples of the coverage sweeps share: loading the sweep's script, and one
parameter per sample model with the known failures as strict xfails.

Used by ``tests/test_coverage_sample.py`` (timm), ``tests/test_transformers_coverage_sample.py``
and ``tests/test_coverage_fixes.py``; their one-thread fixture is ``one_torch_thread`` of
``tests/conftest.py``.
"""

import pytest

from script_modules import load_script


def sweep_script(script: str, *required: str):
    """The module of ``scripts/<script>``; skips the calling test module when a library of
    ``required`` is not installed."""
    for library in required:
        pytest.importorskip(library)
    return load_script(script)


def sample_params(models: dict, expected_failures: dict) -> list:
    """One ``coverage_sample`` parameter per model of ``models`` (what it stands for -> its
    name), with the id ``<role>-<name>``. A model in ``expected_failures`` (name -> reason) is a
    strict xfail, so a fix shows up as an unexpected pass (and must remove the entry)."""
    params = []
    for role, name in models.items():
        marks = [pytest.mark.coverage_sample]
        if name in expected_failures:
            marks.append(pytest.mark.xfail(reason=expected_failures[name], strict=True))
        params.append(pytest.param(name, id=f"{role}-{name}", marks=marks))
    return params
