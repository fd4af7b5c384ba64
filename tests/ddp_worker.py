"""Run by test_pruning_training under torchrun: gated training with DistributedDataParallel.

Each rank trains on different data; at the end rank 0 writes, for every gate, the largest
difference of its logits across ranks, and the same for the gate-only losses.
"""

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dagprune
from dagprune_algorithms.pruning import ChannelPruning


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dag = dagprune.build_from_unstructured_module(_model())
    pruning = ChannelPruning(dag, (3, 8, 8), 0.5, args.steps)
    model = DistributedDataParallel(pruning.prepare_for_pruning())
    optimizer = torch.optim.Adam([{"params": pruning.weight_parameters(), "lr": 1e-3},
                                  {"params": pruning.gate_parameters(), "lr": 5e-2}])
    torch.manual_seed(100 + rank)  # different data and gate noise on every rank
    losses = None
    for step in range(args.steps):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
        task = F.cross_entropy(model(x), y)
        proportion, flops, entropy, bkd = pruning.compute_current_proportion_and_pruning_losses(step)
        (task + flops + entropy + bkd).backward()
        optimizer.step()
        optimizer.zero_grad()
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
