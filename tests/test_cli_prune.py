"""`dagprune prune`: tiny end-to-end runs (the gated method, and ``--method l1`` with its
ItePruneAlgorithm flags) and the bad-input errors."""

import json
import logging

import pytest

import dagprune
from dagprune_algorithms.app.cli import main
from prune_runs import TINY, fast_latency

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_run_writes_pruned_dag_report_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(pruned, fine-tuned)" in printed and "(baseline, same total steps)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["removal_max_relative_difference"] <= 1e-4
    pruned = dagprune.load_dag(out / "pruned")
    flops = dagprune.count_flops(pruned, (3, 16, 16)).total
    assert flops == report["rows"][-1]["flops"]
    assert abs(report["final_proportion"] - flops / report["rows"][0]["flops"]) < 1e-9
    assert (out / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arguments, message", [
    (["--model", "resnet181"], "closest timm names: resnet18"),
    (["--target", "1.5"], "--target must be in (0, 1)"),
    (["--target", "0"], "--target must be in (0, 1)"),
    (["--steps", "0"], "--steps must be positive"),
    (["--target", "0.001"], "cannot be reached"),
    (["--prune-times", "2"], "--prune-times applies to --method l1 only"),
    (["--importance", "taylor", "--target-pruning-ratio", "0.5"],
     "--target-pruning-ratio, --importance apply to --method l1 only"),
    (["--method", "l1", "--prune-times", "0"], "--prune-times must be an int >= 1"),
    (["--method", "l1", "--step-epoch", "0"], "--step-epoch must be an int >= 1"),
    (["--method", "l1", "--prune-times", "3", "--step-epoch", "4"],
     "puts the last prune at step 8, but the run has --steps 6"),
    (["--method", "l1", "--prune-times", "7"], "puts the last prune at step 6"),
    (["--method", "l1", "--importance", "taylor", "--steps", "1"], "needs --steps >= 2"),
    (["--method", "l1", "--target-pruning-ratio", "1.5"], "--target-pruning-ratio must be in (0, 1]"),
    (["--method", "l1", "--target-pruning-ratio", "no_such_file.json"], "is neither a number nor a JSON file"),
    (["--method", "l1", "--target", "0.4", "--target-pruning-ratio", "0.5"], "give one"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, capsys, arguments, message):
    assert main(["prune", *TINY, "--no-reference", "--out", str(tmp_path / "run"), *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error


def test_empty_data_dir_is_reported(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prune", *TINY, "--data-dir", str(empty), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert str(empty) in error and "empty" in error.lower()
    assert not (tmp_path / "run" / "report.json").exists()


# ------------------------------------------------------------------------------- --method l1
def unit_ratios_file(tmp_path, capsys, ratio_of_every_other_unit: float):
    """``dagprune units test_resnet --choice -o FILE``, then every other unit set to the ratio."""
    path = tmp_path / "ratios.json"
    assert main(["units", "test_resnet", "--choice", "--input-size", "3", "16", "16", "-o", str(path)]) == 0
    capsys.readouterr()
    template = json.loads(path.read_text())
    ratios = {name: ratio_of_every_other_unit if index % 2 else full for index, (name, full)
              in enumerate(template.items())}
    path.write_text(json.dumps(ratios))
    return path, ratios


def test_l1_flags_reach_the_algorithm_and_unit_ratios_are_applied(tmp_path, capsys, caplog, monkeypatch):
    fast_latency(monkeypatch)
    ratios_path, ratios = unit_ratios_file(tmp_path, capsys, 0.3)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="dagprune.prune")
    assert main(["prune", *TINY, "--no-reference", "--out", str(out), "--method", "l1", "--prune-times", "2",
                 "--step-epoch", "4", "--target-pruning-ratio", str(ratios_path), "--importance", "taylor",
                 "--block-size", "4"]) == 0
    assert "importance 'taylor'" in caplog.text and "2 prunes every 4 steps" in caplog.text
    report = json.loads((out / "report.json").read_text())
    # taylor's prune due at step 0 waits for step 1 (it needs gradients); both are done by step 5
    assert [(entry["step"], entry["prunes_done"]) for entry in report["history"]] == [(0, 0), (5, 2)]
    assert report["target"] is None
    pruned = dagprune.load_dag(out / "pruned")
    out_channels = {vertex.qualified_name: getattr(vertex.module, "out_channels", None)
                    for vertex in pruned.inner_vertices}
    for name, ratio in ratios.items():
        module, width = name.rsplit("_(", 1)[0], int(name.rsplit("_", 1)[1])
        kept = out_channels[module]
        if ratio == 1.0:
            assert kept == width, name
        else:  # round(ratio * width), then to the nearest multiple of --block-size 4
            assert kept % 4 == 0 and abs(kept - ratio * width) <= 2.5, (name, kept, ratio * width)
            assert kept < width, name


@pytest.mark.parametrize("content, message", [
    ({"conv1.3_(0, 16)_15": 0.5}, r"unknown unit 'conv1.3_(0, 16)_15'; closest: 'conv1.3_(0, 16)_16'"),
    ({"backbone.conv1.3_(0, 16)_16": 0.5}, "no mmrazor 'backbone.' prefix"),
    ({"conv1.3_(0, 16)_16": 1.5}, "is out of range"),
    ([0.5], "expected a non-empty JSON object"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_ratio_file_is_refused_before_the_baseline_trains(tmp_path, capsys, content, message):
    path = tmp_path / "ratios.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "run"
    assert main(["prune", *TINY, "--out", str(out), "--method", "l1", "--target-pruning-ratio", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and str(path) in error and len(error.splitlines()) == 1
    assert not (out / "baseline.pt").exists()


def test_prune_under_bf16_autocast_finishes_with_exact_removal(tmp_path):
    out = tmp_path / "run"
    code = main(["prune", "--model", "test_resnet", "--steps", "6", "--baseline-steps", "4",
                 "--finetune-steps", "2", "--limit-train", "64", "--limit-val", "32", "--batch-size", "16",
                 "--amp", "bf16", "--device", "cpu", "--no-progress", "--no-reference", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1), report  # 1: a missed FLOPs target in so few steps is a failed check
    assert report["removal_max_relative_difference"] <= 1e-4
