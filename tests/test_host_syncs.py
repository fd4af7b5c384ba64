"""The pruning training step never waits for the device: no value is read back to the host.

Host synchronisations are counted on CPU by patching the tensor methods that read a value
back (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/``float``/``index``
conversions) during training steps that are not checking steps (step 0, every
``finite_check_interval`` steps and the last step read the non-finite checks on purpose).
The optimizer is SGD: torch's Adam reads its CPU step counters with ``item()``.
"""

from __future__ import annotations

import collections
import traceback

import numpy as np
import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning, LatencyTable
from dagprune_algorithms.pruning.budgets import KNOTS
from zoo import ZOO, input_shapes, make_example_inputs

READ_BACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
STEPS = range(3, 9)  # after the step-0 check, far from the interval and the last step


class _SyncCounter:
    """Counts read-backs, with the line that asked for each."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self._originals = {}

    def __enter__(self):
        for name in READ_BACKS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            self.calls[f"Tensor.{name} at {caller.filename}:{caller.lineno}"] += 1
            return original(tensor, *args, **kwargs)
        return counted


def _train_step(config, gated, optimizer, inputs, step) -> None:
    loss = gated(*inputs).float().square().mean()
    proportion, flops_loss, entropy_loss, bkd_loss = \
        config.compute_current_proportion_and_pruning_losses(global_step=step)
    (loss + flops_loss + entropy_loss + bkd_loss).backward()
    optimizer.step()
    optimizer.zero_grad()


def _rising_latency_table(dag) -> LatencyTable:
    """A latency table without timing: every vertex's curve rises from 0.1 to 1 second."""
    curve = np.linspace(0.1, 1.0, KNOTS).tolist()
    return LatencyTable({vertex.name: curve for vertex in dag.inner_vertices}, 0.0, [1.0], [1.0], [1.0], {})


@pytest.mark.parametrize("name, head_pruning, budget", [
    ("resnet_basic_blocks", "dims", "flops"), ("resnet_basic_blocks", "heads", "flops"),
    ("tiny_vit", "dims", "flops"), ("tiny_vit", "heads", "flops"),
    ("resnet_basic_blocks", "dims", "params"), ("tiny_vit", "dims", "latency")])
def test_training_steps_read_nothing_back_to_the_host(name, head_pruning, budget):
    entry = ZOO[name]
    (shape,) = input_shapes(entry)
    dag = dagprune.build_from_unstructured_module(entry.factory(seed=0))
    table = _rising_latency_table(dag) if budget == "latency" else None
    config = ChannelPruning(dag, shape, pruning_proportion=0.5, num_training_steps=1000,
                            head_pruning=head_pruning, budget=budget, latency_table=table)
    gated = config.prepare_for_pruning().train()
    optimizer = torch.optim.SGD([{"params": config.weight_parameters()},
                                 {"params": config.gate_parameters()}], lr=1e-3)
    inputs = make_example_inputs(entry, batch_size=2)
    for step in range(STEPS.start):  # the step-0 check and warm-up
        _train_step(config, gated, optimizer, inputs, step)
    with _SyncCounter() as counter:
        for step in STEPS:
            _train_step(config, gated, optimizer, inputs, step)
    assert not counter.calls, f"host syncs during {len(STEPS)} steps: {dict(counter.calls)}"
