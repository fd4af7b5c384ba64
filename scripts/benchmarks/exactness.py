"""Exactness stress: remove 10% of the channels of every prunable group, compare with the mask.

For every tool the reference is the tool's own masked model: dagprune's and torch-dag's gated
models in eval mode with those channels' gates closed; for Torch-Pruning, the original model
with the consumers' input weights of those channels zeroed (see its script). A model counts as
exact when the slim model's output equals the reference's (relative difference <= 1e-4) and
closing the channels did change the output (a removal that changed nothing cannot pass).
"""

from __future__ import annotations

import numpy as np
import torch

import dagprune
from dagprune_algorithms.app.models import create_timm_model
from dagprune_algorithms.pruning import ChannelPruning

from .common import error_text, fixed_input, log, record_removal_exactness, unit_layer_scales
from .peers import run_peer

CLOSED_SHARE = 0.1


def close_share_of_every_group(pruning: ChannelPruning, share: float, seed: int = 0) -> int:
    """Closes ``share`` of the channels (at least one, never all) of every gate; returns the count."""
    generator = np.random.default_rng(seed)
    closed = 0
    with torch.no_grad():
        for gate in pruning.gates:
            size = gate.logits.numel()
            count = min(max(1, round(share * size)), size - 1)
            logits = torch.full_like(gate.logits, 3.0)
            logits[torch.as_tensor(generator.choice(size, count, replace=False))] = -3.0
            gate.logits.copy_(logits)
            closed += count
    return closed


def measure(name: str) -> dict:
    log(f"exactness {name}")
    row = {"model": name, "error": None, "exact": False}
    stage = "conversion"
    try:
        torch.manual_seed(0)
        model = create_timm_model(name).eval()
        unit_layer_scales(model)
        input_shape = tuple(model.pretrained_cfg["input_size"])
        x = fixed_input(input_shape)
        dag = dagprune.build_from_unstructured_module(model).eval()
        stage = "prepare"
        pruning = ChannelPruning(dag, input_shape, 0.999, 1000)
        gated = pruning.prepare_for_pruning().eval()
        with torch.no_grad():
            all_open = gated(x)
            closed = close_share_of_every_group(pruning, CLOSED_SHARE)
            masked = gated(x)
            stage = "removal"
            slim = pruning.remove_channels().eval()
            removed = slim(x)
        original_flops = dagprune.count_flops(dag, input_shape).total
        stage = "comparison"
        record_removal_exactness(row, all_open, masked, removed)
    except Exception as error:
        row["error"] = error_text(stage, error)
        return row
    row.update(groups=len(pruning.gates), closed_channels=closed,
               flops_proportion=dagprune.count_flops(slim, input_shape).total / original_flops)
    return row


def run(options) -> dict:
    results = {"dagprune": {"tool": "dagprune", "results": [measure(name) for name in options.models]}}
    for peer in options.peers:
        results[peer] = run_peer(peer, "exactness", ["--models", *options.models], options.peer_timeout)
    return results
