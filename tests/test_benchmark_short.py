"""``scripts/benchmark.py --short``: every section runs and its figures mean what they say."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    low, high = step["pair_ratio_quartiles"]
    assert 0 < low <= step["pair_ratio"] <= high


def test_latency_rows_are_at_their_targets(short_run):
    results, _, _ = short_run
    rows = results["latency"]["dagprune"]["results"]
    assert rows and all(row["error"] is None for row in rows)
    for row in rows:
        assert abs(row["flops_proportion"] - row["target"]) <= 0.02
        assert row["speedup_of_medians"] == pytest.approx(row["original_ms"] / row["pruned_ms"])
        low, high = row["speedup_quartiles"]  # the per-round ratios, the efficiency judged on their median
        assert 0 < low <= row["speedup"] <= high
        assert row["efficiency"] == pytest.approx(row["speedup"] * row["flops_proportion"])


def test_accuracy_and_exactness(short_run):
    results, report, _ = short_run
    section = results["accuracy"]
    rows = section["results"]
    assert {row["method"] for row in rows} == {"dagprune differentiable + distillation", "dagprune differentiable",
                                               "dagprune L1 iterative"}
    assert all(row["error"] is None and 0 <= row["accuracy"] <= 100 for row in rows)
    l1 = next(row for row in rows if row["method"] == "dagprune L1 iterative")
    assert abs(l1["flops_proportion"] - l1["target"]) <= 0.02
    for row in rows:  # every saved model measured again, against its baseline, in every setting
        assert not row["accuracy_mismatch"] and row["accuracy"] == pytest.approx(row["job_accuracy"])
        assert set(row["latency_share"]) == set(section["measurements"]["settings"]) >= {"1t_b1", "1t_b32"}
    (baseline,) = section["baselines"]
    assert baseline["steps"] == sum(phase["steps"] for phase in baseline["phases"]) == baseline["curve"][-1]["total_step"]
    assert "### Target check" in report and "at 0.5 of the FLOPs within 1 point" in report
    (exact,) = results["exactness"]["dagprune"]["results"]
    assert exact["exact"] and exact["masks_took_effect"] and exact["max_rel_diff"] <= 1e-4


def _benchmarks_module(name: str):
    """``scripts/benchmarks/<name>.py`` imported as part of its package (it uses relative imports)."""
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
    return importlib.import_module(f"benchmarks.{name}")


def test_baseline_stops_at_plateau_and_resumes(tmp_path):
    training = _benchmarks_module("baseline_training")
    torch.manual_seed(0)
    inputs, labels = torch.randn(96, 4), torch.randint(0, 2, (96,))
    train, selection = training.split_selection((inputs, labels), 32, seed=0)
    assert len(train[0]) == 64 and len(selection[0]) == 32
    rule = training.PlateauRule(eval_every=2, patience=2, min_delta=100.0)  # no step can improve by 100 points

    def fit():
        torch.manual_seed(0)
        return training.train_converged_baseline(torch.nn.Linear(4, 2), train, selection, selection, lr=1e-2,
                                                 batch_size=8, seed=0, phase_max_steps=[20, 20], rule=rule,
                                                 folder=tmp_path)
    first = fit()
    # each phase: a first evaluation (compared with the phases before), then `patience` without improvement
    assert [p["steps"] for p in first["phases"]] == [6, 4] and all(p["plateaued"] for p in first["phases"])
    assert first["steps"] == 10 and [r["total_step"] for r in first["curve"]] == [2, 4, 6, 8, 10]
    best = max(first["curve"], key=lambda r: r["selection_accuracy"])
    assert first["best_step"] == best["total_step"] and first["selection_accuracy"] == best["selection_accuracy"]
    again = fit()  # read back, nothing trained
    assert {k: again[k] for k in ("steps", "best_step", "accuracy", "curve")} == \
        {k: first[k] for k in ("steps", "best_step", "accuracy", "curve")}


def _synthetic_accuracy_section(ours: list, other: list, baseline: list) -> dict:
    rows = []
    for key, label, accuracies in (("dag_distill", "dagprune differentiable + distillation", ours),
                                   ("tp_magnitude", "Torch-Pruning magnitude (L1), iterative", other)):
        rows += [{"method": label, "method_key": key, "budget": "flops", "target": 0.5, "seed": seed,
                  "error": None, "accuracy": accuracy, "flops_proportion": 0.5, "accuracy_before_finetune": 50.0,
                  "params": 1e6, "seconds": 1.0, "latency_ms": {"1t_b32": 5.0}, "latency_share": {"1t_b32": 0.5}}
                 for seed, accuracy in enumerate(accuracies)]
    baselines = [{"seed": seed, "accuracy": accuracy, "selection_accuracy": accuracy, "steps": 10, "best_step": 8,
                  "data": "idx:fashion-mnist", "train_images": 100, "val_images": 50, "seconds_per_step": 0.1,
                  "latency_ms": {"1t_b32": 10.0}, "phases": [{"lr": 1e-3, "steps": 10, "plateaued": True}],
                  "curve": [{"total_step": 10, "selection_accuracy": accuracy}]}
                 for seed, accuracy in enumerate(baseline)]
    setup = {"model": "resnet18", "input_shape": [3, 32, 32], "seeds": [0, 1, 2], "threads": 1, "steps": 10,
             "finetune_steps": 5, "lr": 1e-3, "lr_decay": 10.0, "batch_size": 8, "prune_times": 5, "step_epoch": 2,
             "ours": "dagprune differentiable + distillation", "latency_budget_methods": [], "notes": [],
             "methods": {"dag_distill": "dagprune differentiable + distillation",
                         "tp_magnitude": "Torch-Pruning magnitude (L1), iterative"},
             "baseline_rule": {"eval_every": 2, "patience": 2, "min_delta": 0.2, "max_steps": 10,
                               "decay_max_steps": 0, "selection_images": 10}}
    return {"format": 2, "setup": setup, "baselines": baselines, "results": rows, "seconds": 60.0,
            "training_seconds": 50.0, "measurements": {"settings": ["1t_b32"]}}


@pytest.mark.parametrize("ours, other, verdicts", [
    ([91.5, 91.7, 91.6], [90.0, 90.2, 90.1], ["met", "met"]),  # 0.5 below the baseline, 1.5 ahead (spread 0.1)
    # paired by seed: ahead by 0.2 on every seed; unpaired, the seed spread 1.0 would hide it
    ([90.5, 91.5, 92.5], [90.3, 91.3, 92.3], ["met", "met"]),
    ([90.5, 91.5, 92.5], [90.9, 91.0, 92.4], ["met", "MISSED"]),  # margins -0.4, +0.5, +0.1: not separable
    ([89.0, 89.1, 89.2], [89.5, 89.6, 89.7], ["MISSED", "MISSED"]),  # 3 below the baseline, behind
])
def test_target_check_is_computed_from_the_numbers(tmp_path, ours, other, verdicts):
    report = _benchmarks_module("accuracy_report")
    lines, found = [], []
    report.accuracy_section(_synthetic_accuracy_section(ours, other, [92.0, 92.2, 92.1]), tmp_path, lines, found)
    assert [text.split(": ")[1].split(" ")[0] for text in found] == verdicts
    assert (tmp_path / "benchmark_accuracy_latency.png").stat().st_size > 0


@pytest.mark.parametrize("plateaued, word", [(True, "converged"), (False, "step-capped (not converged)")])
def test_report_calls_baselines_converged_only_when_they_plateaued(tmp_path, plateaued, word):
    report = _benchmarks_module("accuracy_report")
    section = _synthetic_accuracy_section([91.5, 91.7, 91.6], [90.0, 90.2, 90.1], [92.0, 92.2, 92.1])
    section["baselines"][1]["phases"][0]["plateaued"] = plateaued
    lines, found = [], []
    report.accuracy_section(section, tmp_path, lines, found)
    text = "\n".join(lines)
    assert f"starts from its seed's {word} baseline" in text
    assert found[0].startswith(f"dagprune differentiable + distillation at 0.5 of the FLOPs within 1 point of the {word} "
                               "baseline: ")


@pytest.mark.parametrize("shares, verdict", [
    ([0.51, 0.49, 0.52], "met (3 of 3 runs)"),
    ([0.51, 0.55, 0.52], "MISSED (2 of 3 runs)"),  # 0.55 is 10% above 0.5
])
def test_latency_budget_check_reads_the_tables_setting(tmp_path, shares, verdict):
    report = _benchmarks_module("accuracy_report")
    section = _synthetic_accuracy_section([91.5, 91.7, 91.6], [90.0, 90.2, 90.1], [92.0, 92.2, 92.1])
    section["setup"]["threads"] = 2
    section["setup"]["methods"]["dag_latency"] = "latency budget"
    section["results"] += [{"method": "latency budget", "method_key": "dag_latency", "budget": "latency",
                            "target": 0.5, "seed": seed, "error": None, "accuracy": 90.0, "flops_proportion": 0.6,
                            "params": 1e6, "seconds": 1.0, "latency_ms": {"1t_b32": 5.0, "2t_b32": 3.0},
                            "latency_share": {"1t_b32": 0.3, "2t_b32": share}, "budget_reached": 0.5}
                           for seed, share in enumerate(shares)]
    lines, found = [], []
    report.accuracy_section(section, tmp_path, lines, found)
    assert found[-1] == f"latency budget within 5% of its target as measured at 2t b32: {verdict}"


def test_unknown_peer_is_a_clear_error():
    environments = load_script("peers/environments.py")
    with pytest.raises(environments.PeerEnvironmentError, match=r"unknown peer 'torch-dagg'; known: \['torch-dag', 'torch-pruning'\]"):
        environments.ensure_peer_environment("torch-dagg")


def test_stage_names_the_innermost_failing_stage():
    common = load_script("benchmarks/common.py")
    with pytest.raises(common.StageError, match=r"^removal: ValueError: bad shape$"):
        with common.stage("model"), common.stage("removal"):
            raise ValueError("bad shape\nsecond line")


def test_prepare_section_counts_where_we_are_at_or_under_torch_pruning(tmp_path):
    report = _benchmarks_module("report")
    ours = [{"model": "a", "total_s": 0.10, "groups": 3, "prunable_proportion": 1.0},
            {"model": "b", "total_s": 0.30, "groups": 3, "prunable_proportion": 1.0}]
    theirs = [{"model": "a", "total_s": 0.20, "pruner_flops_s": 0.40, "error": None},
              {"model": "b", "total_s": 0.20, "pruner_flops_s": 0.35, "error": None}]
    section = {"dagprune": {"tool": "dagprune", "results": ours},
               "torch-pruning": {"tool": "Torch-Pruning", "version": "1.6.1", "timm": "1.0", "results": theirs}}
    lines, verdicts = [], []
    report.prepare_section(section, tmp_path, lines, verdicts)
    assert "| a | 0.100 | - | 0.200 | - | 2.0x | 3 | 1.0000 | 0.400 | 4.0x |" in lines
    assert "| b | 0.300 | - | 0.200 | - | 0.7x | 3 | 1.0000 | 0.350 | 1.2x |" in lines
    assert verdicts == ["Time to pruning-ready at or under Torch-Pruning's (graph and groups): on 1 of 2; "
                        "under its pruner + FLOPs count: on 2 of 2"]


def test_overhead_profile_finds_the_masked_layer_norm_among_the_grown_ops(capsys):
    """The per-op profile of the gated step against the plain one (scripts/profile_overhead.py)
    on a tiny ViT: the masked layer norm exists only in the gated step, so it grew; an op both
    steps run as often at the same cost did not."""
    profile_overhead = load_script("profile_overhead.py")
    plain = {("aten::mm", ""): (5.0, 10), ("aten::relu", ""): (1.0, 2)}
    gated = {("aten::mm", ""): (6.0, 12), ("aten::relu", ""): (1.0, 2), ("MaskedOp", ""): (3.0, 4)}
    assert profile_overhead.grown_ops(plain, gated, 2) == [(3.0, "MaskedOp"), (1.0, "aten::mm")]
    profile_overhead.report("test_vit", 32, 2, steps=1, top=40)
    grown_table = capsys.readouterr().out.split("Gated step")[0]
    rows = {line.split(" | ")[0].lstrip("| "): float(line.split(" | ")[1]) for line in grown_table.splitlines()
            if line.startswith("| ") and not line.startswith("| op ")}
    assert rows.get("_MaskedLayerNorm", 0.0) > 0.0


def test_subnormal_count_sees_values_an_op_reads_or_writes():
    profile_overhead = load_script("profile_overhead.py")
    tiny = torch.finfo(torch.float32).tiny
    holds_one, holds_none = torch.tensor([tiny / 4, 1.0]), torch.tensor([tiny * 4, 1.0])
    with profile_overhead.SubnormalCount() as counter:
        holds_one * 0.5  # reads one subnormal, writes one (tiny / 8)
        holds_none * 0.125  # reads none, writes one (tiny / 2)
        holds_none + 1.0  # neither
        torch.empty(1000)  # uninitialised memory holds no values to count
    assert counter.counts == {"aten.mul.Tensor": 3, "aten.add.Tensor": 0, "aten.empty.memory_format": 0}
