"""Time (or profile) conversion and ``prepare_for_pruning`` of timm models on one thread.

Best of ``--repeats`` runs after a warm-up, per model and input size; a small input separates
per-vertex overhead from per-pixel compute. Run with ``OMP_NUM_THREADS=1``::

    OMP_NUM_THREADS=1 python scripts/profile_prepare.py --models mobilenetv2_100 efficientnet_b0 \\
        --sizes 224 64
    OMP_NUM_THREADS=1 python scripts/profile_prepare.py --models efficientnet_b0 --sizes 64 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import dagprune
from dagprune_algorithms.app.models import create_timm_model
from dagprune_algorithms.pruning import ChannelPruning


def convert_and_prepare(name: str, size: int) -> tuple[float, float]:
    """Seconds to convert a fresh ``name`` and to prepare it for pruning at ``size`` x ``size``."""
    torch.manual_seed(0)
    model = create_timm_model(name).eval()
    start = time.perf_counter()
    dag = dagprune.build_from_unstructured_module(model)
    converted = time.perf_counter()
    ChannelPruning(dag, (3, size, size), 0.5, 100).prepare_for_pruning()
    return converted - start, time.perf_counter() - converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2_100", "efficientnet_b0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    options = parser.parse_args()
    torch.set_num_threads(1)
    for name in options.models:
        for size in options.sizes:
            convert_and_prepare(name, size)  # warm-up: imports, allocator, caches
            if options.profile:
                profiler = cProfile.Profile()
                profiler.runcall(convert_and_prepare, name, size)
                print(f"== {name} {size}x{size}")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats("dagprune", 40)
                continue
            runs = [convert_and_prepare(name, size) for _ in range(options.repeats)]
            convert, prepare = min(run[0] for run in runs), min(run[1] for run in runs)
            print(f"{name} {size}x{size}: convert {convert:.3f} s, prepare {prepare:.3f} s, "
                  f"total {convert + prepare:.3f} s")


if __name__ == "__main__":
    main()
