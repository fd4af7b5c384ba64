"""``scripts/benchmark.py --short``: every section runs and its figures mean what they say."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.benchmark_short


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("benchmarks")
    out = work / "report" / "benchmarks.md"
    finished = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--short",
                               "--work-dir", str(work), "--out", str(out)],
                              capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = {path.stem: json.loads(path.read_text()) for path in work.glob("*.json")}
    return results, out.read_text(), out.parent


def test_every_section_reports(short_run):
    results, report, folder = short_run
    assert set(results) == {"prepare", "overhead", "latency", "accuracy", "exactness"}
    for heading in ("## 1. Time to a pruning-ready model", "## 2. Training overhead",
                    "## 3. Latency of pruned models", "## 4. Accuracy against FLOPs", "## 5. Exactness stress"):
        assert heading in report
    assert (folder / "benchmarks_plots" / "benchmark_latency.png").stat().st_size > 0
    assert (folder / "benchmarks_plots" / "benchmark_accuracy.png").stat().st_size > 0


def test_prepare_and_overhead_figures(short_run):
    results, _, _ = short_run
    (prepared,) = results["prepare"]["dagprune"]["results"]
    assert prepared["error"] is None and prepared["total_s"] > 0
    assert prepared["prunable_proportion"] == pytest.approx(1.0)
    (step,) = results["overhead"]["dagprune"]["results"]
    assert step["error"] is None and step["ratio"] == pytest.approx(step["gated_ms"] / step["plain_ms"])
    assert step["gate_parameters"] == prepared["gate_parameters"]  # one logit per channel class


def test_latency_rows_are_at_their_targets(short_run):
    results, _, _ = short_run
    rows = results["latency"]["dagprune"]["results"]
    assert rows and all(row["error"] is None for row in rows)
    for row in rows:
        assert abs(row["flops_proportion"] - row["target"]) <= 0.02
        assert row["speedup"] == pytest.approx(row["original_ms"] / row["pruned_ms"])


def test_accuracy_and_exactness(short_run):
    results, _, _ = short_run
    rows = results["accuracy"]["results"]
    assert {row["method"] for row in rows} == {"dagprune (differentiable)", "dagprune (L1 iterative)"}
    assert all(row["error"] is None and 0 <= row["accuracy"] <= 100 for row in rows)
    l1 = next(row for row in rows if row["method"] == "dagprune (L1 iterative)")
    assert abs(l1["flops_proportion"] - l1["target"]) <= 0.02
    (exact,) = results["exactness"]["dagprune"]["results"]
    assert exact["exact"] and exact["masks_took_effect"] and exact["max_rel_diff"] <= 1e-4


def test_unknown_peer_is_a_clear_error():
    environments = load_script("peers/environments.py")
    with pytest.raises(environments.PeerEnvironmentError, match=r"unknown peer 'torch-dagg'; known: \['torch-dag', 'torch-pruning'\]"):
        environments.ensure_peer_environment("torch-dagg")


def test_stage_names_the_innermost_failing_stage():
    common = load_script("benchmarks/common.py")
    with pytest.raises(common.StageError, match=r"^removal: ValueError: bad shape$"):
        with common.stage("model"), common.stage("removal"):
            raise ValueError("bad shape\nsecond line")
