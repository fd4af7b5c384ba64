"""`dagprune prune`: a tiny end-to-end run and its bad-input errors."""

import json

import pytest

import dagprune
from dagprune_algorithms.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--steps", "6", "--baseline-steps", "4", "--finetune-steps", "2", "--limit-train", "96",
        "--limit-val", "48", "--batch-size", "16", "--image-size", "16", "--no-progress",
        "--checkpoint-every", "3"]


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
