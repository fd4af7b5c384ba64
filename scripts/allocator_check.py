"""How much of an eager CPU forward is spent faulting in fresh memory for large activations.

glibc's malloc serves blocks over its mmap threshold (at most 32 MB) with fresh pages from the
kernel and returns them when freed, so every such activation is page-faulted in again on each
call: time that follows the activation's size, not its FLOPs. This script times a ReLU and an
eval batch norm on a large activation, once into a fresh output and once into a reused one,
and a timm model's forward; run it twice to compare allocator settings, e.g.::

    OMP_NUM_THREADS=1 python scripts/allocator_check.py --model resnet18 --batch 32
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 OMP_NUM_THREADS=1 \\
        python scripts/allocator_check.py --model resnet18 --batch 32

(the second keeps freed memory in the heap for reuse, as caching allocators such as jemalloc
or tcmalloc do; the process keeps its peak memory).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

from dagprune_algorithms.app.models import create_timm_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.common import interleaved_medians  # noqa: E402


def median_ms(function, repeats: int) -> float:
    return 1000 * interleaved_medians([function], repeats)[0]


def op_times(shape: tuple, repeats: int) -> dict:
    """ReLU and eval batch norm on a tensor of ``shape``: fresh output against a reused one."""
    x, out = torch.randn(shape), torch.empty(shape)
    norm = nn.BatchNorm2d(shape[1]).eval()
    with torch.inference_mode():
        return {"batch norm, fresh output": median_ms(lambda: norm(x), repeats),
                "relu, fresh output": median_ms(lambda: torch.relu(x), repeats),
                "relu, reused output": median_ms(lambda: torch.clamp_min(x, 0, out=out), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 112, 112],
                        help="channels, height, width of the activation timed alone (resnet18's stem output)")
    parser.add_argument("--repeats", type=int, default=7)
    options = parser.parse_args()
    settings = {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")}
    print(f"allocator settings: {settings or 'glibc defaults'}; {torch.get_num_threads()} thread(s)")
    shape = (options.batch, *options.shape)
    for label, ms in op_times(shape, options.repeats).items():
        print(f"{label} {shape} ({4 * torch.Size(shape).numel() / 2 ** 20:.0f} MB): {ms:.1f} ms")
    torch.manual_seed(0)
    model = create_timm_model(options.model).eval()
    x = torch.randn(options.batch, *model.pretrained_cfg["input_size"])
    with torch.inference_mode():
        print(f"{options.model} forward, batch {options.batch}: {median_ms(lambda: model(x), options.repeats):.1f} ms")


if __name__ == "__main__":
    main()
