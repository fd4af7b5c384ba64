"""Run by test_pruning_training and test_cli_distributed under torchrun: gated training with
DistributedDataParallel, as a library user writes it.

Each rank trains on different data; at the end rank 0 writes, for every gate, the largest
difference of its logits across ranks, and the same for the gate-only losses.

With ``--bkd-nan-on-rank R --bkd-nan-at-step S`` the distillation loss of rank R alone is NaN at
step S (and the library checks every step, with ``distributed_checks=True``): every rank then
writes ``{"step": the step it stopped at, "error": the exception's type and message}`` to
``<out>.rank<R>.json`` instead.
"""

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dagprune
from dagprune.errors import PruningError
from dagprune_algorithms.pruning import ChannelPruning, channel_pruning


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--bkd-nan-on-rank", type=int, default=None)
    parser.add_argument("--bkd-nan-at-step", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.bkd_nan_on_rank is not None:
        _stop_where_one_rank_fails(args, rank)
    else:
        _train_and_compare(args, rank, world)
    dist.destroy_process_group()


def _train_step(model, pruning, optimizer, step: int):
    """One step on a random batch of this rank (task loss plus the pruning losses); the
    pruning losses ``(proportion, flops, entropy, bkd)``."""
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    task = F.cross_entropy(model(x), y)
    losses = pruning.compute_current_proportion_and_pruning_losses(step)
    (task + losses[1] + losses[2] + losses[3]).backward()
    optimizer.step()
    optimizer.zero_grad()
    return losses


def _train_and_compare(args, rank: int, world: int) -> None:
    dag = dagprune.build_from_unstructured_module(_model())
    pruning = ChannelPruning(dag, (3, 8, 8), 0.5, args.steps)
    model = DistributedDataParallel(pruning.prepare_for_pruning())
    optimizer = torch.optim.Adam([{"params": pruning.weight_parameters(), "lr": 1e-3},
                                  {"params": pruning.gate_parameters(), "lr": 5e-2}])
    torch.manual_seed(100 + rank)  # different data and gate noise on every rank
    losses = None
    for step in range(args.steps):
        proportion, flops, entropy, _ = _train_step(model, pruning, optimizer, step)
        losses = torch.stack([proportion.detach(), flops.detach(), entropy.detach()])
    logits = torch.cat([p.detach() for p in pruning.gate_parameters()])
    gathered_logits = [torch.zeros_like(logits) for _ in range(world)]
    gathered_losses = [torch.zeros_like(losses) for _ in range(world)]
    dist.all_gather(gathered_logits, logits)
    dist.all_gather(gathered_losses, losses)
    if rank == 0:
        result = {"world": world,
                  "logit_difference": max((g - logits).abs().max().item() for g in gathered_logits),
                  "loss_difference": max((g - losses).abs().max().item() for g in gathered_losses),
                  "logits_moved": (logits - pruning.initial_logit).abs().max().item()}
        with open(args.out, "w") as handle:
            json.dump(result, handle)


def _stop_where_one_rank_fails(args, rank: int) -> None:
    """Trains until an error; writes the step and the error of this rank."""
    removed_energy_share = channel_pruning.removed_energy_share
    step = 0

    def nan_on_one_rank(sites):
        share = removed_energy_share(sites)
        return share * float("nan") if rank == args.bkd_nan_on_rank and step == args.bkd_nan_at_step else share

    channel_pruning.removed_energy_share = nan_on_one_rank
    dag = dagprune.build_from_unstructured_module(_model())
    pruning = ChannelPruning(dag, (3, 8, 8), 0.5, args.steps, finite_check_interval=1, distributed_checks=True)
    model = DistributedDataParallel(pruning.prepare_for_pruning())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(100 + rank)
    error = None
    try:
        for step in range(args.steps):
            _train_step(model, pruning, optimizer, step)
    except (PruningError, RuntimeError) as caught:  # the library's check, or a collective left waiting
        error = f"{type(caught).__name__}: {caught}"
    with open(f"{args.out}.rank{rank}.json", "w") as handle:
        json.dump({"step": step, "error": error}, handle)


if __name__ == "__main__":
    main()
