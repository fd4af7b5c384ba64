"""scripts/gpu_check.py runs its CPU fallback: every check passes and the report says so."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_cpu_fallback_passes_and_says_no_gpu_was_measured():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    report, passed = gpu_check.run("cpu", models=("resnet_basic_blocks",))
    assert passed, report
    assert "No GPU figures have been measured yet" in report
    assert "| resnet_basic_blocks | none |" in report
