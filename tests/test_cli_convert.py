"""``dagprune convert``: summary, FLOPs, parameters, exactness and round trip; clear errors."""

from __future__ import annotations

import configparser
import importlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.app.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_INPUT = ["--input-size", "3", "64", "64"]


def _flops_line_total(output: str) -> int:
    return int(re.search(r"^FLOPs: ([\d,]+)", output, re.MULTILINE).group(1).replace(",", ""))


def test_convert_timm_model_reports_exact_conversion(capsys):
    pytest.importorskip("timm")
    assert main(["convert", "resnet10t", *SMALL_INPUT]) == 0
    output = capsys.readouterr().out
    assert "model: timm resnet10t (pretrained=False), input 3x64x64" in output
    assert "conversion: exact (max relative difference 0," in output
    assert "save/load round trip: bit-exact" in output
    assert re.search(r"^\d+\s+conv1_0\s+Conv2d\(3, 24.*1x24x32x32", output, re.MULTILINE)

    import timm
    dag = dagprune.build_from_unstructured_module(timm.create_model("resnet10t").eval())
    total = dagprune.count_flops(dag, (3, 64, 64)).total
    assert _flops_line_total(output) == total
    assert f"({total / (64 * 64 * 1000):.2f} kmapp" in output
    assert f"parameters: {sum(p.numel() for p in dag.parameters()):,}" in output


def test_convert_fixed_size_vit_at_another_size(capsys):
    pytest.importorskip("timm")
    assert main(["convert", "vit_tiny_patch16_224", *SMALL_INPUT, "--no-summary"]) == 0
    output = capsys.readouterr().out
    assert "img_size=(64, 64)" in output and "conversion: exact" in output
    assert "inner vertices" not in output  # --no-summary leaves the table out


def test_unknown_model_lists_closest_timm_names(capsys):
    pytest.importorskip("timm")
    assert main(["convert", "resnet181", *SMALL_INPUT]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and "Traceback" not in captured.err
    assert "'resnet181' is neither a saved DAG directory nor a timm model name" in error_lines[0]
    closest = error_lines[0].split("closest timm names: ")[1].split(", ")
    assert "resnet18" in closest


def test_convert_saves_and_reads_back_a_saved_dag(tmp_path, capsys):
    pytest.importorskip("timm")
    target = tmp_path / "resnet10t"
    assert main(["convert", "resnet10t", *SMALL_INPUT, "--no-summary", "--save", str(target)]) == 0
    assert f"bit-exact (saved to {target})" in capsys.readouterr().out
    assert main(["convert", str(target), *SMALL_INPUT]) == 0
    output = capsys.readouterr().out
    assert f"model: saved DAG {target}" in output
    assert "conversion: not applicable" in output and "round trip: bit-exact" in output


def test_dagprune_errors_are_one_line_without_traceback(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "graph.json").write_text("{ not json")
    (broken / "tensors.safetensors").write_bytes(b"")
    assert main(["convert", str(broken), *SMALL_INPUT]) == 2
    captured = capsys.readouterr()
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and "Traceback" not in captured.err
    assert error_lines[0].startswith("dagprune convert: error: ")
    assert "graph.json is not valid JSON" in error_lines[0]


def test_input_size_the_model_cannot_take_is_a_usage_error(capsys):
    pytest.importorskip("timm")
    assert main(["convert", "resnet10t", "--input-size", "3", "64"]) == 2
    error = capsys.readouterr().err
    assert "cannot run on an input of shape 3x64" in error and "--input-size" in error


def test_console_script_points_at_main():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"].strip().splitlines()
    target = dict(line.replace(" ", "").split("=") for line in scripts)["dagprune"]
    module_name, function_name = target.split(":")
    assert getattr(importlib.import_module(module_name), function_name) is main


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_convert_a_saved_dag_of_another_dtype(tmp_path, dtype, capsys):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).to(dtype)
    dagprune.build_from_unstructured_module(model).save(tmp_path / "dag")
    assert main(["convert", str(tmp_path / "dag"), "--input-size", "3", "16", "16"]) == 0
    assert "save/load round trip: bit-exact" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_convert_checks_the_conversion_and_the_round_trip_on_the_chosen_device(device, capsys):
    pytest.importorskip("timm")
    command = ["convert", "test_resnet", "--input-size", "3", "16", "16", "--no-summary", "--device", device]
    if device == "cuda" and not torch.cuda.is_available():
        assert main(command) == 2
        assert "CUDA is not available; use --device cpu" in capsys.readouterr().err
        return
    assert main(command) == 0
    output = capsys.readouterr().out
    assert "conversion: exact" in output and "save/load round trip: bit-exact" in output
