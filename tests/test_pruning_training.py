"""The differentiable pruning procedure: losses, schedule, DDP, resume, NaN handling."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning
from dagprune_algorithms.pruning.losses import anneal, scheduled_target
from dagprune_algorithms.app.training import StepResult, TrainingError, load_checkpoint, train_steps

REPO = Path(__file__).resolve().parents[1]


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def _synthetic_task(count: int = 256, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 8, 8, generator=generator)
    y = (x[:, 0].mean((1, 2)) > 0).long() * 2 + (x[:, 1].mean((1, 2)) > 0).long()
    return x, y


def _pruning(steps: int, target: float = 0.5):
    dag = dagprune.build_from_unstructured_module(_cnn())
    pruning = ChannelPruning(dag, (3, 8, 8), target, steps)
    gated = pruning.prepare_for_pruning()
    optimizer = torch.optim.Adam([{"params": pruning.weight_parameters(), "lr": 2e-3},
                                  {"params": pruning.gate_parameters(), "lr": 5e-2}])
    return pruning, gated, optimizer


def _step_fn(pruning, gated):
    def step(global_step, x, y):
        task = F.cross_entropy(gated(x), y)
        proportion, flops, entropy, bkd = pruning.compute_current_proportion_and_pruning_losses(global_step)
        return StepResult(task + flops + entropy + bkd, {"proportion": proportion.item()})
    return step


def test_schedule_values():
    assert anneal(0, 100) == 0.0
    assert math.isclose(anneal(100, 100), 0.9)
    assert math.isclose(anneal(50, 100), 1 - 0.1 ** 0.5)
    assert scheduled_target(0, 100, 0.4, 0.5) == 1.0
    assert math.isclose(scheduled_target(25, 100, 0.4, 0.5), 0.7)
    assert math.isclose(scheduled_target(80, 100, 0.4, 0.5), 0.4)


def test_flops_loss_reaches_every_logit():
    pruning, gated, _ = _pruning(100)
    _, flops, _, _ = pruning.compute_current_proportion_and_pruning_losses(global_step=60)
    assert flops.item() > 0
    flops.backward()
    for gate in pruning.gates:
        assert gate.logits.grad is not None and (gate.logits.grad != 0).all()


def test_expected_proportion_matches_hard_proportion_for_decided_gates():
    pruning, gated, _ = _pruning(100)
    for gate in pruning.gates:
        decided = torch.where(torch.rand_like(gate.logits) > 0.5, 30.0, -30.0)
        gate.logits.data.copy_(decided)
    assert math.isclose(pruning.expected_proportion().item(), pruning.current_hard_proportion(),
                        rel_tol=1e-5)


def test_training_reaches_target_and_removal_lands_on_it():
    steps, target = 160, 0.5
    pruning, gated, optimizer = _pruning(steps, target)
    train_steps(gated, optimizer, _synthetic_task(), 32, 0, steps, step_fn=_step_fn(pruning, gated))
    hard = pruning.current_hard_proportion()
    assert abs(hard - target) <= 0.02, hard
    gated.eval()
    slim = pruning.remove_channels()
    original = dagprune.count_flops(pruning.model, (3, 8, 8)).total
    assert math.isclose(dagprune.count_flops(slim, (3, 8, 8)).total / original, hard, rel_tol=1e-9)
    x = torch.randn(4, 3, 8, 8)
    assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-4


def test_gates_freeze_at_the_end_of_the_schedule():
    pruning, gated, optimizer = _pruning(20)
    train_steps(gated, optimizer, _synthetic_task(), 32, 0, 20, step_fn=_step_fn(pruning, gated))
    assert all(gate.frozen for gate in pruning.gates)
    mask_before = [gate.hard_mask() for gate in pruning.gates]
    for gate in pruning.gates:  # logits moving after the freeze no longer change the decision
        gate.logits.data.neg_()
    assert all(torch.equal(a, gate.hard_mask()) for a, gate in zip(mask_before, pruning.gates))


def test_resume_continues_exactly(tmp_path):
    data, steps = _synthetic_task(), 24

    def run(checkpoint, stop_at):
        pruning, gated, optimizer = _pruning(steps)
        train_steps(gated, optimizer, data, 32, 0, stop_at, step_fn=_step_fn(pruning, gated),
                    checkpoint_path=checkpoint, checkpoint_every=8)
        return pruning, gated

    torch.manual_seed(5)
    _, straight = run(tmp_path / "straight.ckpt", steps)
    torch.manual_seed(5)
    run(tmp_path / "resumed.ckpt", 16)  # stops after step 16, as if interrupted
    torch.manual_seed(123)  # a different RNG state in the new process must not matter
    _, resumed = run(tmp_path / "resumed.ckpt", steps)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = (torch.randn(64, 4), torch.randint(0, 2, (64,)))

    def step_fn(step, x, y):
        loss = F.cross_entropy(model(x), y)
        return StepResult(loss * float("nan") if step == 7 else loss, {})

    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(TrainingError, match="step 7.*last good checkpoint"):
        train_steps(model, optimizer, data, 8, 0, 20, step_fn=step_fn, checkpoint_path=checkpoint,
                    checkpoint_every=5)
    assert load_checkpoint(checkpoint)["step"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.distributed
def test_distributed_data_parallel_keeps_gates_identical(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port, so concurrent runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         str(REPO / "tests" / "ddp_worker.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["logit_difference"] == 0.0
    assert result["loss_difference"] == 0.0
    assert result["logits_moved"] > 0.1
