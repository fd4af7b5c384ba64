"""What the benchmark sections share: the model list, timing and comparison helpers."""

from __future__ import annotations

import json
import os
import sys
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

MODELS = ["resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0",
          "convnext_tiny", "regnety_004", "densenet121", "deit_tiny_patch16_224",
          "vit_small_patch16_224", "fbnetv3_g", "repvit_m1"]
"""The twelve models of the comparison (timm names, ``pretrained=False``)."""

EXACT_TOLERANCE = 1e-4
"""Max relative difference under which two outputs count as equal."""


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def seconds(function: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``function``."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved_medians(functions: list[Callable[[], object]], repeats: int,
                        warmup: int = 1) -> list[float]:
    """Median seconds of each function, timed in alternation so machine noise hits all alike."""
    times: list[list[float]] = [[] for _ in functions]
    for round_index in range(warmup + repeats):
        for index, function in enumerate(functions):
            elapsed = seconds(function)
            if round_index >= warmup:
                times[index].append(elapsed)
    return [statistics.median(series) for series in times]


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``max|a - b| / max|a|``; ``inf`` when the shapes differ."""
    if reference.shape != other.shape:
        return float("inf")
    scale = reference.abs().max().clamp_min(1e-12)
    return float((reference - other).abs().max() / scale)


def fixed_input(input_shape, batch_size: int = 2) -> torch.Tensor:
    """The same random batch on every call."""
    return torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(0))


def error_text(stage: str, error: BaseException) -> str:
    """``"stage: Type: first line"`` for a report cell."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{stage}: {type(error).__name__}: {first_line[:200]}"


def write_json(path: Path, data) -> None:
    """Writes ``data`` as JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(descriptor, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)
