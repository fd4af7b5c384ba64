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


def prepare_at_target_or_reachable(dag: dagprune.DagModule, input_size: Sequence[int] | None, target: float,
                                   steps: int, example_inputs: Any = None):
    """``ChannelPruning(dag, input_size, target, steps).prepare_for_pruning()``; when ``target``
    cannot be reached, the model is still checked: at the share halfway between what removing
    every prunable channel leaves and 1 (the checks do not train, so any reachable target works).

    Returns:
        ``(pruning, gated model, target used)``.
    """
    from dagprune_algorithms.pruning import ChannelPruning

    pruning = ChannelPruning(dag, input_size, target, steps, example_inputs=example_inputs)
    try:
        return pruning, pruning.prepare_for_pruning(), target
    except dagprune.errors.PruningError as error:
        if "cannot be reached" not in str(error):
            raise
    reachable = 1.0 - pruning.max_removable_proportion
    target = reachable + pruning.max_removable_proportion / 2
    pruning = ChannelPruning(dag, input_size, target, steps, example_inputs=example_inputs)
    return pruning, pruning.prepare_for_pruning(), target


FLOAT64_REMOVAL_TOLERANCE = 1e-9
"""Max relative difference of slim against gated model when both are recomputed in float64."""


def float64_removal_difference(gated: dagprune.DagModule, slim: dagprune.DagModule, inputs: torch.Tensor) -> float:
    """The slim model against the gated one again, on float64 copies of both and the input.

    Removal changes only the order of sums (a reduction over fewer channels instead of zeroed
    ones), so the two agree to about one float32 unit; random-init models can amplify that past
    any fixed tolerance (squeeze-excitation logits in the thousands make the sigmoid multiply a
    relative error by hundreds). In float64 a correct removal lands near 1e-12 while a channel
    removed on one side of a coupling but not the other stays at 1e-2 or more, so this tells
    rounding from a wrong removal.
    """
    import copy

    gated64, slim64 = copy.deepcopy(gated).double().eval(), copy.deepcopy(slim).double().eval()
    with torch.no_grad():
        return float(dagprune.max_relative_difference(gated64(inputs.double()), slim64(inputs.double())))
