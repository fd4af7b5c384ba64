"""`dagprune prune` on a trained model: ``--checkpoint`` (torch file or saved DAG), ``--exclude``
and ``--distill``, end to end on the tiny default data; ``dagprune units --exclude``; and the
errors of these options, each one line before any training."""

import json

import pytest
import timm
import torch

import dagprune
from dagprune_algorithms.app.cli import main
from dagprune_algorithms.app.data import load_dataset
from dagprune_algorithms.app.training import evaluate_accuracy, materialize

from prune_runs import TINY, fast_latency

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16
TINY_TRAINED = [*TINY, "--no-reference", "--target", "0.8"]
"""A FLOPs target that the groups left after ``--exclude`` can reach in the tiny run's steps."""


def _trained_test_resnet(seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=3).eval()


def _val_accuracy(model) -> float:
    split = load_dataset(None, image_size=SIZE, seed=0, limit_train=96, limit_val=48)
    return evaluate_accuracy(model, *materialize(split.val))


def _out_channels(dag, prefix: str) -> dict:
    return {v.qualified_name: tuple(v.module.weight.shape) for v in dag.inner_vertices
            if (v.qualified_name or "").startswith(prefix) and hasattr(v.module, "weight")}


def test_checkpoint_exclude_and_distillation_end_to_end(tmp_path, monkeypatch, capsys):
    fast_latency(monkeypatch)
    model = _trained_test_resnet()
    checkpoint = tmp_path / "trained.pth"  # as DDP training scripts save it
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    out = tmp_path / "run"
    code = main(["prune", *TINY_TRAINED, "--out", str(out), "--checkpoint", str(checkpoint),
                 "--exclude", "conv1*", "--exclude", "fc"])
    assert code in (0, 1), capsys.readouterr().err  # 1: the tiny run missed its FLOPs target
    report = json.loads((out / "report.json").read_text())
    assert not (out / "baseline.pt").exists()  # the checkpoint is the baseline
    assert report["rows"][0]["accuracy"] == pytest.approx(_val_accuracy(model) / 100)
    assert all("distill_loss" in entry for entry in report["history"])  # auto: on with --checkpoint
    assert report["removal_max_relative_difference"] <= 1e-4
    pruned = dagprune.load_dag(out / "pruned")
    original = dagprune.build_from_unstructured_module(model)
    for prefix in ("conv1", "fc"):
        assert _out_channels(pruned, prefix) == _out_channels(original, prefix)
    assert report["final_proportion"] < 1.0


def test_a_saved_dag_checkpoint_is_pruned_as_it_is_with_l1_and_distillation(tmp_path, monkeypatch):
    fast_latency(monkeypatch)
    dag = dagprune.build_from_unstructured_module(_trained_test_resnet())
    saved = dag.save(tmp_path / "dag")
    out = tmp_path / "run"
    code = main(["prune", *TINY_TRAINED, "--out", str(out), "--checkpoint", str(saved), "--method", "l1",
                 "--prune-times", "2", "--exclude", "layer4*", "--distill-weight", "0.5"])
    assert code in (0, 1)
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["accuracy"] == pytest.approx(_val_accuracy(dag) / 100)
    assert "distill_loss" in report["history"][-1]
    pruned = dagprune.load_dag(out / "pruned")
    assert _out_channels(pruned, "layer4") == _out_channels(dag, "layer4")


def test_distill_off_adds_no_distillation_and_new_weights_are_a_new_run(tmp_path, monkeypatch, capsys):
    fast_latency(monkeypatch)
    checkpoint = tmp_path / "w.pt"
    torch.save(_trained_test_resnet().state_dict(), checkpoint)
    out = tmp_path / "run"
    command = ["prune", *TINY_TRAINED, "--out", str(out), "--checkpoint", str(checkpoint), "--distill", "off",
               "--finetune-steps", "0"]
    assert main(command) in (0, 1)
    report = json.loads((out / "report.json").read_text())
    assert not any("distill_loss" in entry for entry in report["history"])
    capsys.readouterr()
    torch.save(_trained_test_resnet(seed=8).state_dict(), checkpoint)
    assert main(command) == 2
    assert f"the content of --checkpoint {checkpoint} changed" in capsys.readouterr().err


def test_round_to_and_min_channels_shape_the_pruned_model(tmp_path, monkeypatch, capsys):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    code = main(["prune", *TINY_TRAINED, "--out", str(out), "--round-to", "4", "--min-channels", "4"])
    assert code in (0, 1), capsys.readouterr().err
    pruned = dagprune.load_dag(out / "pruned")
    widths = [v.module.out_channels for v in pruned.inner_vertices if isinstance(v.module, torch.nn.Conv2d)]
    assert widths and all(width % 4 == 0 for width in widths), widths
    assert json.loads((out / "report.json").read_text())["removal_max_relative_difference"] <= 1e-4


def _wrong_classes(tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "imagenet.pt"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=1000).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("arguments, message", [
    (lambda tmp: ["--checkpoint", str(tmp / "missing.pt")], "missing.pt: no such file or directory"),
    (lambda tmp: ["--checkpoint", _wrong_classes(tmp)],
     "shape mismatches fc.weight: model (10, 96), checkpoint (1000, 96)"),
    (lambda tmp: ["--checkpoint", _wrong_classes(tmp), "--baseline-checkpoint", _wrong_classes(tmp)],
     "--checkpoint and --baseline-checkpoint both give"),
    (lambda tmp: ["--exclude", "stem*"], "exclude pattern 'stem*' matches no module"),
    (lambda tmp: ["--method", "l1", "--exclude", "head.fc"], "exclude pattern 'head.fc' matches no module"),
    (lambda tmp: ["--distill-temperature", "0"], "--distill-temperature must be a number > 0"),
    (lambda tmp: ["--distill-weight", "-1"], "--distill-weight must be a number >= 0"),
    (lambda tmp: ["--round-to", "0"], "--round-to must be positive"),
    (lambda tmp: ["--round-to", "4", "--block-size", "8"], "--round-to 4 and --block-size 8 both set"),
])
def test_bad_trained_model_options_give_one_line_before_training(tmp_path, capsys, arguments, message):
    out = tmp_path / "run"
    assert main(["prune", *TINY_TRAINED, "--out", str(out), *arguments(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert not (out / "baseline.pt").exists() and not (out / "pruning.ckpt").exists()


def test_units_command_leaves_excluded_units_alone(capsys):
    shape = ["--input-size", "3", str(SIZE), str(SIZE)]
    assert main(["units", "test_resnet", "--choice", *shape]) == 0
    every = json.loads(capsys.readouterr().out)
    assert main(["units", "test_resnet", "--choice", *shape, "--exclude", "conv1.*"]) == 0
    choices = json.loads(capsys.readouterr().out)
    assert set(choices) < set(every) and not any(name.startswith("conv1.") for name in choices)
    assert main(["units", "test_resnet", *shape, "--exclude", "conv1.*"]) == 0
    template = json.loads(capsys.readouterr().out)
    assert template["parse_cfg"]["exclude"] == ["conv1.*"]
    reasons = [unit["reason"] for unit in template["channel_unit_cfg"]["units"].values() if "reason" in unit]
    assert any(reason.startswith("excluded: conv1.") for reason in reasons)
    assert main(["units", "test_resnet", *shape, "--exclude", "nothing"]) == 2
    assert "exclude pattern 'nothing' matches no module" in capsys.readouterr().err
