"""Time from an ``nn.Module`` to a pruning-ready (gated) model, one thread, median of runs.

dagprune: ``build_from_unstructured_module`` then ``ChannelPruning.prepare_for_pruning``
(group search and gates); torch-dag: the same two calls of its API; Torch-Pruning: building
its ``DependencyGraph`` and listing the pruning groups. Every model at timm's default input size.
"""

from __future__ import annotations

import statistics

import torch

import dagprune
from dagprune_algorithms.app.models import create_timm_model
from dagprune_algorithms.pruning import ChannelPruning

from .common import log, error_text, seconds
from .peers import run_peer


def measure(name: str, repeats: int) -> dict:
    log(f"prepare {name}")
    torch.manual_seed(0)
    model = create_timm_model(name).eval()
    input_shape = tuple(model.pretrained_cfg["input_size"])
    row = {"model": name, "input_size": list(input_shape), "error": None}
    state = {}

    def convert():
        state["dag"] = dagprune.build_from_unstructured_module(model)

    def prepare():
        state["pruning"] = ChannelPruning(state["dag"], input_shape, 0.5, 1000)
        state["pruning"].prepare_for_pruning()

    conversions, preparations = [], []
    try:
        for _ in range(repeats):
            conversions.append(seconds(convert))
            preparations.append(seconds(prepare))
    except Exception as error:  # a failing model is a result, not a crash
        row["error"] = error_text("prepare", error)
        return row
    pruning = state["pruning"]
    row.update(convert_s=statistics.median(conversions), prepare_s=statistics.median(preparations),
               first_total_s=conversions[0] + preparations[0], groups=len(pruning.prunable_groups),
               gate_parameters=sum(p.numel() for p in pruning.gate_parameters()),
               prunable_proportion=pruning.prunable_proportion,
               max_removable_proportion=pruning.max_removable_proportion)
    row["total_s"] = row["convert_s"] + row["prepare_s"]
    return row


def run(options) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {"dagprune": {"tool": "dagprune", "results": [measure(name, options.repeats)
                                                               for name in options.models]}}
    finally:
        torch.set_num_threads(threads)
    for peer in options.peers:
        results[peer] = run_peer(peer, "prepare", ["--models", *options.models, "--repeats",
                                                   str(options.repeats)], options.peer_timeout)
    return results
