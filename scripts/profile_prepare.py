"""Time (or profile) conversion and ``prepare_for_pruning`` of timm models on one thread.

Best of ``--repeats`` runs after a warm-up, per model and input size; a small input separates
per-vertex overhead from per-pixel compute. Run with ``OMP_NUM_THREADS=1``::

    OMP_NUM_THREADS=1 python scripts/profile_prepare.py --models mobilenetv2_100 efficientnet_b0 \\
        --sizes 224 64
    OMP_NUM_THREADS=1 python scripts/profile_prepare.py --models efficientnet_b0 --sizes 64 --profile
    OMP_NUM_THREADS=1 python scripts/profile_prepare.py --models resnet18 regnety_004 --sizes 224 --parts

``--parts`` times the pieces one by one (median of the repeats): the model's own forward pass
at batch 1 (what a tool that runs the model once cannot avoid), the deep copy conversion makes,
conversion without the copy, the finite check of the weights, the channel-group search (which
runs the forward pass once), and the whole ``prepare_for_pruning`` on a converted DAG.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

import dagprune
from dagprune_algorithms.app.models import create_timm_model
from dagprune.compare import non_finite_tensors
from dagprune.module_copy import copy_module
from dagprune_algorithms.pruning import ChannelPruning
from dagprune_algorithms.pruning.channel_groups import find_channel_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.common import interleaved_medians  # noqa: E402


def convert_and_prepare(name: str, size: int) -> tuple[float, float]:
    """Seconds to convert a fresh ``name`` and to prepare it for pruning at ``size`` x ``size``."""
    torch.manual_seed(0)
    model = create_timm_model(name).eval()
    start = time.perf_counter()
    dag = dagprune.build_from_unstructured_module(model)
    converted = time.perf_counter()
    ChannelPruning(dag, (3, size, size), 0.5, 100).prepare_for_pruning()
    return converted - start, time.perf_counter() - converted


def part_times(name: str, size: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each piece of conversion and preparation (see the module docstring)."""
    torch.manual_seed(0)
    model = create_timm_model(name).eval()
    x, shape = torch.randn(1, 3, size, size), (3, size, size)

    def forward():
        with torch.no_grad():
            model(x)
    dag = dagprune.build_from_unstructured_module(model, copy_model=False)
    pieces = {"model forward": forward, "deep copy": lambda: copy_module(model),
              "convert without copy": lambda: dagprune.build_from_unstructured_module(model, copy_model=False),
              "finite check": lambda: non_finite_tensors(dag),
              "channel groups": lambda: find_channel_groups(dag, shape),
              "prepare_for_pruning": lambda: ChannelPruning(dag, shape, 0.5, 100).prepare_for_pruning()}
    medians = interleaved_medians(list(pieces.values()), repeats, warmup=1)
    return {label: 1000 * seconds for label, seconds in zip(pieces, medians)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2_100", "efficientnet_b0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--parts", action="store_true", help="time the pieces one by one")
    options = parser.parse_args()
    torch.set_num_threads(1)
    for name in options.models:
        for size in options.sizes:
            if options.parts:
                parts = part_times(name, size, options.repeats)
                print(f"{name} {size}x{size}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
                continue
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
