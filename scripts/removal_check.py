"""The removal check shared by the coverage sweeps: random gate states, then slim vs gated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import dagprune
from dagprune.example_inputs import ExampleInputs, as_example_inputs


def removal_difference_at_random_gates(pruning, gated, input_size: Sequence[int] | None, batch_size: int,
                                       seed: int, example_inputs: Any = None
                                       ) -> tuple[float, dagprune.DagModule, torch.Tensor | ExampleInputs]:
    """Sets every gate's logits to standard normal draws (torch's global generator seeded with
    ``seed``), removes the closed channels and compares the slim model with the gated model in
    eval mode on a random input of ``batch_size`` drawn next, or on ``example_inputs`` (a
    tensor, a tuple of positional values or a dict of keyword values, e.g. token IDs and an
    attention mask) when given; ``input_size`` and ``batch_size`` are then unused.

    Returns:
        ``(max relative difference, slim model, input)``: the input is the random tensor, or the
        example inputs as :class:`~dagprune.example_inputs.ExampleInputs`.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for gate in pruning.gates:
            gate.logits.copy_(torch.randn_like(gate.logits))
    gated.eval()
    slim = pruning.remove_channels().eval()
    if example_inputs is None:
        inputs = torch.randn(batch_size, *input_size)
        call = lambda module: module(inputs)
    else:
        inputs = as_example_inputs(example_inputs)
        call = inputs.call
    with torch.no_grad():
        difference = float(dagprune.max_relative_difference(call(gated), call(slim)))
    return difference, slim, inputs
