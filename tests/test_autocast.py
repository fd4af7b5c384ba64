"""Mixed precision: pruning trains under torch.autocast, and removal stays exact in float32."""

from __future__ import annotations

import pytest
import torch

import dagprune
from dagprune_algorithms.pruning import ChannelPruning
from zoo import ZOO, input_shapes, make_example_inputs

STEPS = 12


def _train_under_autocast(name: str, dtype: torch.dtype, scaler=None):
    entry = ZOO[name]
    (shape,) = input_shapes(entry)
    dag = dagprune.build_from_unstructured_module(entry.factory(seed=0))
    config = ChannelPruning(dag, shape, pruning_proportion=0.5, num_training_steps=STEPS)
    gated = config.prepare_for_pruning().train()
    optimizer = torch.optim.Adam([{"params": config.weight_parameters()},
                                  {"params": config.gate_parameters(), "lr": 0.1}], lr=1e-3)
    inputs = make_example_inputs(entry, batch_size=4)
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=dtype):
            task_loss = gated(*inputs).float().square().mean()
            losses = config.compute_current_proportion_and_pruning_losses(global_step=step)
        assert all(loss.dtype == torch.float32 for loss in losses), "pruning losses left float32"
        total = task_loss + sum(losses[1:])
        if scaler is None:
            total.backward()
            optimizer.step()
        else:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
    return config, gated.eval(), inputs


@pytest.mark.parametrize("name", ["resnet_basic_blocks", "tiny_vit"])
def test_bfloat16_autocast_training_then_exact_removal(name):
    config, gated, inputs = _train_under_autocast(name, torch.bfloat16)
    assert config.current_hard_proportion() < 0.9, "the gates did not move under autocast"
    slim = config.remove_channels().eval()
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(*inputs), slim(*inputs)) <= 1e-4
    assert all(p.dtype == torch.float32 for p in slim.parameters())


def test_float16_autocast_with_a_grad_scaler():
    scaler_class = getattr(torch.amp, "GradScaler", None)
    if scaler_class is None:
        pytest.skip("this torch has no torch.amp.GradScaler")
    config, gated, inputs = _train_under_autocast("resnet_basic_blocks", torch.float16,
                                                  scaler_class("cpu"))
    slim = config.remove_channels().eval()
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(*inputs), slim(*inputs)) <= 1e-4
