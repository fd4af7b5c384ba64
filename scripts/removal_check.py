"""The removal check shared by the coverage sweeps: random gate states, then slim vs gated."""

from __future__ import annotations

from typing import Sequence

import torch

import dagprune


def removal_difference_at_random_gates(pruning, gated, input_size: Sequence[int], batch_size: int,
                                       seed: int) -> tuple[float, dagprune.DagModule, torch.Tensor]:
    """Sets every gate's logits to standard normal draws (torch's global generator seeded with
    ``seed``), removes the closed channels and compares the slim model with the gated model in
    eval mode on a random input of ``batch_size`` drawn next.

    Returns:
        ``(max relative difference, slim model, input)``.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for gate in pruning.gates:
            gate.logits.copy_(torch.randn_like(gate.logits))
    gated.eval()
    slim = pruning.remove_channels().eval()
    x = torch.randn(batch_size, *input_size)
    with torch.no_grad():
        difference = float(dagprune.max_relative_difference(gated(x), slim(x)))
    return difference, slim, x
