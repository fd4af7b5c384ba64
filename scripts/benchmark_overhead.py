"""Training-step overhead of the gated model over the plain model, and gate parameter counts.

For each model, the plain DAG and the gated DAG take alternating training steps (forward,
backward, Adam step; the gated step also computes the pruning losses) on the same batch, so
machine noise hits both alike; the ratio of the medians is reported. Writes
``resources/training_overhead.md`` (and prints it).

    python scripts/benchmark_overhead.py --models test_resnet resnet18 --image-size 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dagprune
from dagprune_algorithms.models import create_timm_model
from dagprune_algorithms.pruning import ChannelPruning

DEFAULT_MODELS = ["test_resnet", "resnet18", "mobilenetv2_100", "convnext_atto", "vit_tiny_patch16_224"]


def _step(model, optimizer, x, y, pruning=None, step=0):
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    if pruning is not None:
        _, flops, entropy, bkd = pruning.compute_current_proportion_and_pruning_losses(step)
        loss = loss + flops + entropy + bkd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def measure(name: str, image_size: int, batch_size: int, repeats: int) -> dict:
    input_shape = (3, image_size, image_size)
    torch.manual_seed(0)
    plain = dagprune.build_from_unstructured_module(create_timm_model(name, input_shape, num_classes=10))
    torch.manual_seed(0)
    source = dagprune.build_from_unstructured_module(create_timm_model(name, input_shape, num_classes=10))
    pruning = ChannelPruning(source, input_shape, 0.5, 10_000)
    gated = pruning.prepare_for_pruning()
    plain.train(), gated.train()
    plain_optimizer = torch.optim.Adam(plain.parameters(), 1e-4)
    gated_optimizer = torch.optim.Adam(gated.parameters(), 1e-4)
    x, y = torch.randn(batch_size, *input_shape), torch.randint(0, 10, (batch_size,))
    plain_times, gated_times = [], []
    for index in range(repeats + 2):
        plain_time = _step(plain, plain_optimizer, x, y)
        gated_time = _step(gated, gated_optimizer, x, y, pruning, step=1000 + index)
        if index >= 2:  # warm-up
            plain_times.append(plain_time)
            gated_times.append(gated_time)
    gate_parameters = sum(p.numel() for p in pruning.gate_parameters())
    return {"model": name, "plain_ms": 1000 * statistics.median(plain_times),
            "gated_ms": 1000 * statistics.median(gated_times),
            "ratio": statistics.median(gated_times) / statistics.median(plain_times),
            "groups": len(pruning.prunable_groups), "gate_parameters": gate_parameters,
            "model_parameters": sum(p.numel() for p in source.parameters())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="resources/training_overhead.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name, args.image_size, args.batch_size, args.repeats) for name in args.models]
    lines = [
        "# Training-step overhead of the gated model",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, input {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"median of {args.repeats} alternating steps (forward + backward + Adam; the gated step also "
        "computes the FLOPs, entropy and distillation losses).",
        "",
        "| model | plain step ms | gated step ms | ratio | prunable groups | gate params | model params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['plain_ms']:.1f} | {row['gated_ms']:.1f} | "
                     f"{row['ratio']:.3f} | {row['groups']} | {row['gate_parameters']:,} | "
                     f"{row['model_parameters']:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
