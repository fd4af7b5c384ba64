"""Time the pruning losses of one training step (forward and backward of
``compute_current_proportion_and_pruning_losses``), without the model's own step.

One thread, 64 px, batch 32, median of 30 calls after a forward pass of the gated model in
train mode. Run it from two checkouts to compare them::

    OMP_NUM_THREADS=1 PYTHONPATH=OLD python scripts/profile_losses.py --models efficientnet_b0
    OMP_NUM_THREADS=1 PYTHONPATH=NEW python scripts/profile_losses.py --models efficientnet_b0
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import dagprune
from dagprune_algorithms.app.models import create_timm_model
from dagprune_algorithms.pruning import ChannelPruning


def loss_milliseconds(name: str, size: int, batch: int, calls: int) -> float:
    """Median milliseconds of the losses' forward and backward for ``name``'s gated model."""
    shape = (3, size, size)
    torch.manual_seed(0)
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(
        create_timm_model(name, shape, num_classes=10)), shape, 0.5, 10_000)
    gated = pruning.prepare_for_pruning().train()
    gated(torch.randn(batch, *shape))  # the distillation loss reads this pass's activations
    steps = itertools.count(1)

    def losses():
        _, flops, entropy, bkd = pruning.compute_current_proportion_and_pruning_losses(next(steps))
        (flops + entropy + bkd).backward(retain_graph=True)

    for _ in range(3):
        losses()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        losses()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "deit_tiny_patch16_224"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=30)
    options = parser.parse_args()
    torch.set_num_threads(1)
    for name in options.models:
        print(f"{name}: losses {loss_milliseconds(name, options.size, options.batch, options.calls):.2f} ms per step")


if __name__ == "__main__":
    main()
