"""`dagprune prune` on several processes (torchrun, gloo on CPU) and with gradient accumulation.

The two-process runs go through ``tests/ddp_prune_worker.py``, which runs the command as it is
and dumps what each rank trained and wrote. They check that the ranks end with identical gate
logits and weights, that rank 0 alone writes, and that a run killed after a checkpoint resumes to
the results of an uninterrupted run, bit for bit. Gradient accumulation is checked in one
process: K micro-batches of B images step like one batch of K x B.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.app.cli import main
from dagprune_algorithms.app.training import batch_indices, load_checkpoint, train_steps
from prune_runs import TINY, assert_same_results, run_results

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_prune_worker.py"
TWO_PROCESSES = [*TINY, "--batch-size", "8", "--device", "cpu"]
"""TINY on two processes: 8 images per process, the 16 of TINY per step."""
PHASES = {"baseline_training", "pruning", "finetune", "reference"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(out: Path, dump: Path, *extra: str, kill_after: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` of the worker: ``dagprune prune`` with TWO_PROCESSES."""
    dump.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DDP_TEST_DUMP": str(dump),
           "DDP_TEST_KILL_AFTER": kill_after or ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(WORKER), "prune", *TWO_PROCESSES, *extra, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def _outside_torchrun(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _rank_states(dump: Path) -> list[dict]:
    return [torch.load(dump / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """``(output directory, dump directory, completed process)`` of an uninterrupted run."""
    base = tmp_path_factory.mktemp("two_processes")
    completed = _torchrun(base / "run", base / "dump")
    assert completed.returncode == 0, completed.stderr[-3000:]
    return base / "run", base / "dump", completed


@pytest.mark.distributed
def test_two_processes_end_with_identical_gates_and_weights(two_process_run):
    _, dump, _ = two_process_run
    rank0, rank1 = _rank_states(dump)
    assert set(rank0) == set(rank1) == PHASES
    for phase in PHASES:
        assert rank0[phase].keys() == rank1[phase].keys()
        for name, value in rank0[phase].items():
            assert torch.equal(value, rank1[phase][name]), f"{phase}: {name} differs between the ranks"
    logits = torch.cat([value for name, value in rank0["pruning"].items() if name.endswith(".logits")])
    assert logits.numel() > 0 and logits.std() > 0.1  # the gates trained (and apart from each other)


@pytest.mark.distributed
def test_only_rank_0_writes(two_process_run):
    out, dump, completed = two_process_run
    rank0_writes, rank1_writes = (json.loads((dump / f"rank{rank}_writes.json").read_text()) for rank in (0, 1))
    assert rank1_writes == []
    written = " ".join(rank0_writes)
    for name in ("run.json", "baseline_training.ckpt", "baseline.pt", "pruning.ckpt", "finetune.ckpt",
                 "reference.ckpt", "pruned", "report.json", "pruning.png"):
        assert f"{out}{os.sep}{name}" in written, name
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    assert completed.stdout.count("(pruned, fine-tuned)") == 1  # one table, printed by rank 0
    assert dagprune.load_dag(out / "pruned") is not None


@pytest.mark.distributed
def test_a_rerun_on_another_number_of_processes_is_refused(two_process_run, capsys, monkeypatch):
    _outside_torchrun(monkeypatch)
    assert main(["prune", *TWO_PROCESSES, "--out", str(two_process_run[0])]) == 2
    assert "the number of processes (torchrun --nproc_per_node x --nnodes) 2 there, 1 now" in capsys.readouterr().err


@pytest.mark.distributed
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_results(tmp_path, two_process_run):
    out = tmp_path / "run"
    killed = _torchrun(out, tmp_path / "killed", kill_after="pruning.ckpt:3")
    assert killed.returncode != 0
    assert load_checkpoint(out / "pruning.ckpt")["step"] == 3
    assert not (out / "finetune.ckpt").exists()
    resumed = _torchrun(out, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(run_results(out), run_results(two_process_run[0]))
    rank0, rank1 = _rank_states(tmp_path / "resumed")
    for name, value in rank0["finetune"].items():
        assert torch.equal(value, rank1["finetune"][name]), name


@pytest.mark.distributed
def test_taylor_importance_prunes_alike_on_every_rank(tmp_path):
    # each rank's hooks see the gradients of its own images: the score sums are averaged, or the
    # ranks would keep different channels. The prune at step 2 follows a step that neither logs
    # nor checkpoints (both copy rank 0's buffers, score sums included, to every rank).
    completed = _torchrun(tmp_path / "run", tmp_path / "dump", "--method", "l1", "--importance", "taylor",
                          "--prune-times", "2", "--step-epoch", "2", "--baseline-steps", "0", "--no-reference")
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, rank1 = _rank_states(tmp_path / "dump")
    assert set(rank0) == {"l1_pruning", "finetune", "prune_at_step_1", "prune_at_step_2"}
    for phase, state in rank0.items():
        assert state.keys() == rank1[phase].keys()
        for name, value in state.items():
            assert torch.equal(value, rank1[phase][name]), f"{phase}: {name} differs between the ranks"


def test_the_parts_of_a_batch_are_the_batch():
    for step in range(5):  # 3 steps an epoch: the second epoch reshuffles
        batch = batch_indices(40, 12, seed=3, step=step)
        parts = [batch_indices(40, 12, seed=3, step=step, part=part, parts=4) for part in range(4)]
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
        assert all(len(part) == 3 for part in parts)
    assert batch_indices(40, 12, 3, 0).tolist() != batch_indices(40, 12, 3, 3).tolist()


def _train_mlp(batch_size: int, grad_accum: int, steps: int = 12, checkpoint: Path | None = None,
               stop_at: int | None = None) -> dict:
    """An MLP (no batch norm) trained with SGD on 64 random samples; its final state dict."""
    data = (torch.randn(64, 10, generator=torch.Generator().manual_seed(1)),
            torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(model, optimizer, data, batch_size, seed=0, total_steps=stop_at or steps, grad_accum=grad_accum,
                checkpoint_path=checkpoint, checkpoint_every=4)
    return model.state_dict()


def test_two_micro_batches_step_like_one_batch_of_twice_the_size():
    accumulated, large_batch = _train_mlp(8, grad_accum=2), _train_mlp(16, grad_accum=1)
    for name, value in accumulated.items():
        torch.testing.assert_close(value, large_batch[name], rtol=1e-5, atol=1e-6)
    small_batch = _train_mlp(8, grad_accum=1)
    assert not torch.allclose(small_batch["0.weight"], large_batch["0.weight"], atol=1e-4)


def test_an_accumulating_run_resumes_exactly(tmp_path):
    straight = _train_mlp(8, grad_accum=2)
    _train_mlp(8, grad_accum=2, checkpoint=tmp_path / "run.ckpt", stop_at=6)
    assert load_checkpoint(tmp_path / "run.ckpt")["step"] == 6
    resumed = _train_mlp(8, grad_accum=2, checkpoint=tmp_path / "run.ckpt")
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.parametrize("extra, message", [
    (["--grad-accum", "0"], "--grad-accum must be positive"),
    (["--distributed"], "not started by torchrun"),
    (["--grad-accum", "4", "--limit-train", "40"], "more than the 40 training images"),
])
def test_usage_errors(tmp_path, capsys, monkeypatch, extra, message):
    _outside_torchrun(monkeypatch)
    assert main(["prune", *TINY, "--device", "cpu", "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err
