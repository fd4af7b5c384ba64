"""`dagprune prune` on several processes (torchrun, gloo on CPU) and with gradient accumulation.

The two-process runs go through ``tests/ddp_prune_worker.py``, which runs the command as it is
and dumps what each rank trained and wrote. They check that the ranks end with identical gate
logits and weights, that rank 0 alone writes, and that a run killed after a checkpoint resumes to
the results of an uninterrupted run, bit for bit. Gradient accumulation is checked in one
process: K micro-batches of B images step like one batch of K x B.

``--fsdp`` runs shard the gated model (FSDP2 on gloo): the ranks keep identical gates, train
what DistributedDataParallel trains (to float rounding), remove the channels from the gathered
model, and write checkpoints that load without FSDP and resume bit for bit; the library reads a
sharded model's weights shard by shard. Two guards are checked too: a NaN distillation loss on
one rank stops every rank, and a parameter that gets no gradient does not stop
DistributedDataParallel (in a one-process group, where DDP fails alike).
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
from dagprune.errors import PruningError
from dagprune_algorithms.app.cli import main
from dagprune_algorithms.app.distributed import Ranks, shard_gated_model
from dagprune_algorithms.app.models import as_dag, create_timm_model
from dagprune_algorithms.app.training import batch_indices, load_checkpoint, train_steps
from dagprune_algorithms.pruning import ChannelPruning
from prune_runs import TINY, assert_same_results, run_results

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_prune_worker.py"
TWO_PROCESSES = [*TINY, "--batch-size", "8", "--device", "cpu"]
"""TINY on two processes: 8 images per process, the 16 of TINY per step."""
PHASES = {"baseline_training", "pruning", "finetune", "reference"}
FSDP = ["--fsdp", "--no-reference"]
"""A sharded run; the reference phase (DistributedDataParallel, as without --fsdp) is left out."""


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
    (["--distributed"], "--distributed: this process was not started by torchrun"),
    (["--fsdp"], "--fsdp: this process was not started by torchrun"),
    (["--fsdp", "--method", "l1"], "--fsdp shards the gated model of --method dag"),
    (["--fsdp", "--amp", "fp16"], "use --amp bf16 (no scaler) or --amp none"),
    (["--grad-accum", "4", "--limit-train", "40"], "more than the 40 training images"),
])
def test_usage_errors(tmp_path, capsys, monkeypatch, extra, message):
    _outside_torchrun(monkeypatch)
    assert main(["prune", *TINY, "--device", "cpu", "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """``(output directory, dump directory)`` of an uninterrupted ``--fsdp`` run."""
    base = tmp_path_factory.mktemp("fsdp")
    completed = _torchrun(base / "run", base / "dump", *FSDP)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return base / "run", base / "dump"


@pytest.mark.distributed
def test_fsdp_ranks_keep_identical_gates_and_train_what_ddp_trains(fsdp_run, two_process_run):
    rank0, rank1 = _rank_states(fsdp_run[1])
    gates = [name for name in rank0["pruning"] if name.endswith((".logits", ".frozen_mask"))]
    assert gates and all(torch.equal(rank0["pruning"][name], rank1["pruning"][name]) for name in gates)
    logits = torch.cat([rank0["pruning"][name] for name in gates if name.endswith(".logits")])
    assert logits.std() > 0.1  # the gates trained
    ddp, _ = _rank_states(two_process_run[1])
    for phase in ("pruning", "finetune"):  # same batches, same averaged gradients: rounding apart
        assert rank0[phase].keys() == ddp[phase].keys()
        for name, value in rank0[phase].items():
            torch.testing.assert_close(value, ddp[phase][name], rtol=0, atol=1e-5, msg=f"{phase}: {name}")


@pytest.mark.distributed
def test_fsdp_removes_from_the_gathered_model_and_its_checkpoint_loads_without_fsdp(fsdp_run):
    out, _ = fsdp_run
    report = json.loads((out / "report.json").read_text())
    assert report["removal_max_relative_difference"] <= 1e-4
    checkpoint = load_checkpoint(out / "pruning.ckpt")
    assert all(type(value) is torch.Tensor for value in checkpoint["model"].values())  # gathered, no DTensor
    dag = as_dag(create_timm_model("test_resnet", (3, 16, 16), num_classes=10))
    pruning = ChannelPruning(dag, (3, 16, 16), 0.5, 6)
    gated = pruning.prepare_for_pruning()
    gated.load_state_dict(checkpoint["model"])  # strict: every tensor whole, the names unchanged
    optimizer = torch.optim.Adam([{"params": pruning.weight_parameters()}, {"params": pruning.gate_parameters()}])
    optimizer.load_state_dict(checkpoint["optimizer"])
    moments = [state["exp_avg"] for state in optimizer.state.values()]
    assert [m.shape for m in moments] == [p.shape for group in optimizer.param_groups for p in group["params"]]
    assert dagprune.load_dag(out / "pruned") is not None


@pytest.mark.distributed
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_results(tmp_path, fsdp_run):
    out = tmp_path / "run"
    killed = _torchrun(out, tmp_path / "killed", *FSDP, kill_after="pruning.ckpt:3")
    assert killed.returncode != 0
    assert load_checkpoint(out / "pruning.ckpt")["step"] == 3
    resumed = _torchrun(out, tmp_path / "resumed", *FSDP)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(run_results(out), run_results(fsdp_run[0]))


@pytest.mark.distributed
def test_a_nan_distillation_loss_on_one_rank_stops_every_rank(tmp_path):
    # without distributed_checks rank 1 stops alone and rank 0 fails in its next all-reduce
    out = tmp_path / "result"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(REPO / "tests" / "ddp_worker.py"), "--out", str(out), "--bkd-nan-on-rank", "1"],
        capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rank0, rank1 = (json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["step"] == rank1["step"] == 2
    assert rank1["error"].startswith("PruningError") and "pruning losses were NaN or Inf at step 2" in rank1["error"]
    assert rank0["error"].startswith("PruningError") and "process(es) 1 found NaN or Inf" in rank0["error"]


@pytest.fixture
def one_process_group(tmp_path):
    """The :class:`Ranks` of a one-process gloo group (DistributedDataParallel behaves there as
    with several: it fails on a parameter without gradient at the second step)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Ranks(0, 1, 0, torch.device("cpu"), distributed=True)
    dist.destroy_process_group()


class _WithUnusedBranch(nn.Module):
    """A model whose forward pass never uses one of its layers, as models with an unused head have."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(10, 3)
        self.unused_branch = nn.Linear(10, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.distributed
def test_parameters_without_gradient_do_not_stop_distributed_training(one_process_group, caplog):
    torch.manual_seed(0)
    model = _WithUnusedBranch()
    unused_before = model.unused_branch.weight.detach().clone()
    data = (torch.randn(32, 10), torch.randint(0, 3, (32,)))
    with caplog.at_level("INFO", logger="dagprune.distributed"):
        train_steps(model, torch.optim.Adam(model.parameters()), data, 8, seed=0, total_steps=3,
                    ranks=one_process_group)
    assert "2 trainable parameter(s) get no gradient (unused_branch.weight, unused_branch.bias)" in caplog.text
    assert torch.equal(model.unused_branch.weight, unused_before)
    used_only = nn.Sequential(nn.Linear(10, 3))  # nothing unused: no search every step
    assert not one_process_group.wrap(used_only, data[0][:2]).find_unused_parameters


@pytest.mark.distributed
def test_a_nan_in_this_process_s_shard_of_a_sharded_model_is_found(one_process_group):
    from torch.distributed.tensor import DTensor

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 6, 6), 0.5, 10,
                             distributed_checks=True)
    gated = shard_gated_model(pruning.prepare_for_pruning(), pruning.gate_parameters(), one_process_group)
    pruning.check_finite()  # the sharded weights are read shard by shard
    name, weight = next((name, p) for name, p in gated.named_parameters() if isinstance(p, DTensor))
    with torch.no_grad():
        weight.to_local().view(-1)[0] = float("nan")
    with pytest.raises(PruningError, match=f"{name}: NaN or Inf in this process's shard"):
        pruning.check_finite()
