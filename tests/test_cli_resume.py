"""`dagprune prune` never loses work: a run killed at any point and started again with the same
command finishes with bit-identical results; a finished run reruns without training; a rerun
with arguments that change the results is refused, naming them.

A kill is simulated by raising :class:`Killed` (a BaseException nothing in the job catches)
right after, or in the middle of, a chosen write.
"""

from pathlib import Path

import pytest
import torch

from dagprune_algorithms.app import prune_job, report, training
from dagprune_algorithms.app.cli import main
from prune_runs import TINY, assert_same_results, fast_latency, run_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L1 = ["--method", "l1", "--prune-times", "2", "--step-epoch", "4"]


class Killed(BaseException):
    """Stands for the process being killed: no ``except Exception`` stops it."""


def prune(out: Path, *extra: str) -> int:
    return main(["prune", *TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``{method: (output directory, results)}`` of runs that were not interrupted."""
    runs = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast_latency(monkeypatch)
        for name, extra in (("dag", []), ("l1", L1)):
            out = tmp_path_factory.mktemp(f"uninterrupted_{name}")
            assert prune(out, *extra) == 0
            runs[name] = out, run_results(out)
    return runs


def prune_until_killed(monkeypatch, out: Path, file_name: str, step: int | None, *extra: str) -> None:
    """Runs ``prune(out, *extra)`` and kills it right after it writes ``file_name`` at ``step``."""
    with monkeypatch.context() as killing:
        kill_after_writing(killing, file_name, step)
        with pytest.raises(Killed):
            prune(out, *extra)


def kill_after_writing(monkeypatch, file_name: str, step: int | None = None) -> None:
    """Kills the run right after it writes ``file_name`` (at ``step``, for training checkpoints)."""
    write = training.save_checkpoint

    def write_then_die(path, state):
        write(path, state)
        if Path(path).name == file_name and step in (None, state.get("step")):
            raise Killed(f"after {file_name} at step {step}")

    monkeypatch.setattr(training, "save_checkpoint", write_then_die)
    monkeypatch.setattr(prune_job, "save_checkpoint", write_then_die)


@pytest.mark.parametrize("file_name, step", [
    ("baseline_training.ckpt", 3),   # in the middle of the baseline
    ("baseline_training.ckpt", 4),   # the baseline's last checkpoint, before baseline.pt
    ("baseline.pt", None),
    ("pruning.ckpt", 3),             # in the middle of pruning
    ("pruning.ckpt", 6),             # pruning done, nothing removed or fine-tuned yet
    ("finetune.ckpt", 2),            # fine-tuned, the pruned DAG not saved yet
    ("reference.ckpt", 3),
])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_results(tmp_path, monkeypatch, uninterrupted,
                                                                    file_name, step):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    prune_until_killed(monkeypatch, out, file_name, step)
    assert not (out / "report.json").exists()
    assert prune(out) == 0
    assert_same_results(run_results(out), uninterrupted["dag"][1])


def test_a_run_killed_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, uninterrupted):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    write = training.save_checkpoint

    def die_while_writing(path, state):
        if Path(path).name != "pruning.ckpt" or state["step"] != 6:
            return write(path, state)

        def write_half(obj, file):
            file.write(b"PK\x03\x04 half a zip archive")
            raise Killed("while writing pruning.ckpt")

        with monkeypatch.context() as saving:
            saving.setattr(torch, "save", write_half)
            write(path, state)

    with monkeypatch.context() as killing:
        killing.setattr(training, "save_checkpoint", die_while_writing)
        with pytest.raises(Killed):
            prune(out)
    assert torch.load(out / "pruning.ckpt", weights_only=True)["step"] == 3
    assert not list(out.glob(".pruning.ckpt.*"))
    left_by_a_kill = out / ".pruning.ckpt.x1y2z3.tmp"  # what SIGKILL leaves: no cleanup ran
    left_by_a_kill.write_bytes(b"PK\x03\x04 half")
    assert prune(out) == 0
    assert not left_by_a_kill.exists()
    assert_same_results(run_results(out), uninterrupted["dag"][1])


def test_a_run_killed_while_writing_its_report_resumes(tmp_path, monkeypatch, uninterrupted):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    with monkeypatch.context() as killing:
        killing.setattr(report, "write_json_report", lambda *args: (_ for _ in ()).throw(Killed("report")))
        with pytest.raises(Killed):
            prune(out)
    assert prune(out) == 0
    assert_same_results(run_results(out), uninterrupted["dag"][1])


def test_an_l1_run_killed_between_prunes_resumes_to_the_same_results(tmp_path, monkeypatch, uninterrupted):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    prune_until_killed(monkeypatch, out, "l1_pruning.ckpt", 3, *L1)
    assert prune(out, *L1) == 0
    assert_same_results(run_results(out), uninterrupted["l1"][1])


def test_checkpoints_hold_only_tensors_and_plain_values(uninterrupted):
    out = uninterrupted["dag"][0]
    written = sorted(path.name for path in out.glob("*.ckpt")) + ["baseline.pt"]
    assert written == ["baseline_training.ckpt", "finetune.ckpt", "pruning.ckpt", "reference.ckpt", "baseline.pt"]
    for name in written:
        torch.load(out / name, weights_only=True)
    history = torch.load(out / "pruning.ckpt", weights_only=True)["history"]
    assert all(type(value) in (int, float) for entry in history for value in entry.values())
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]


def test_save_checkpoint_refuses_numpy_values_and_writes_nothing(tmp_path):
    import numpy as np

    with pytest.raises(training.TrainingError, match=r"history'\]\[0\]\['proportion'\] is a numpy.float64"):
        training.save_checkpoint(tmp_path / "x.ckpt", {"history": [{"proportion": np.float64(0.5)}]})
    assert not list(tmp_path.iterdir())


def test_rerunning_a_finished_run_trains_nothing_and_reports_the_same(tmp_path, monkeypatch, uninterrupted):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    assert prune(out) == 0
    checkpoints = {path.name: path.stat().st_mtime_ns for path in out.glob("*.ckpt")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(torch.optim.Adam, "step", no_training)
    assert prune(out) == 0
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.ckpt")} == checkpoints
    assert_same_results(run_results(out), uninterrupted["dag"][1])


@pytest.mark.parametrize("changed, named", [
    (["--seed", "1"], "--seed 0 there, 1 now"),
    (["--baseline-steps", "5"], "--baseline-steps 4 there, 5 now"),
    (["--target", "0.4", "--lr", "0.001"], "--lr 0.002 there, 0.001 now; --target 0.5 there, 0.4 now"),
    (["--data-dir", "elsewhere"], "--data-dir (not given) there, elsewhere now"),
])
def test_a_rerun_with_other_results_arguments_is_refused_naming_them(tmp_path, monkeypatch, capsys, uninterrupted,
                                                                      changed, named):
    out = uninterrupted["dag"][0]
    before = (out / "report.json").read_text()
    assert prune(out, *changed) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and len(error.splitlines()) == 1 and "another --out" in error
    assert (out / "report.json").read_text() == before


def test_a_rerun_with_a_changed_baseline_file_is_refused(tmp_path, monkeypatch, capsys):
    fast_latency(monkeypatch)
    baseline = tmp_path / "baseline.pt"
    training.save_checkpoint(baseline, {"model": {}})
    out = tmp_path / "run"
    arguments = ["--baseline-checkpoint", str(baseline)]
    monkeypatch.setattr(prune_job, "_prepare_baseline", lambda *args: 10.0)
    assert prune(out, *arguments) == 0
    training.save_checkpoint(baseline, {"model": {}, "other": 1})
    assert prune(out, *arguments) == 2
    assert f"the content of --baseline-checkpoint {baseline} changed" in capsys.readouterr().err


def test_options_that_change_no_result_may_change_on_a_rerun(tmp_path, monkeypatch, uninterrupted):
    fast_latency(monkeypatch)
    out = tmp_path / "run"
    prune_until_killed(monkeypatch, out, "pruning.ckpt", 3)
    assert prune(out, "--checkpoint-every", "2", "--no-progress") == 0
    assert_same_results(run_results(out), uninterrupted["dag"][1])


def test_an_output_directory_with_results_but_no_run_file_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pruning.ckpt").write_bytes(b"from an older version")
    assert prune(out) == 2
    assert "pruning.ckpt but no run.json" in capsys.readouterr().err


def test_a_run_refused_before_training_leaves_no_run_file(tmp_path):
    out = tmp_path / "run"
    assert prune(out, "--model", "resnet181") == 2
    assert not (out / "run.json").exists()
