"""What the benchmark sections and the peers' scripts share: the model list, timing, comparison,
error and JSON helpers. It imports only torch, so the peers' environments can use it too."""

from __future__ import annotations

import contextlib
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
    return [statistics.median(series) for series in interleaved_times(functions, repeats, warmup)]


def interleaved_times(functions: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[list[float]]:
    """Seconds of each call of each function, timed in alternation (round ``i`` of every
    function is ``series[k][i]``), after ``warmup`` untimed rounds."""
    times: list[list[float]] = [[] for _ in functions]
    for round_index in range(warmup + repeats):
        for index, function in enumerate(functions):
            elapsed = seconds(function)
            if round_index >= warmup:
                times[index].append(elapsed)
    return times


def paired_ratio(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``numerators[i] / denominators[i]`` of two
    series timed in alternation (:func:`dagprune_algorithms.app.latency.paired_ratio_quartiles`,
    rounded): a slow stretch of the machine hits both calls of a round, so these ratios scatter
    less than the ratio of the two medians does.

    >>> paired_ratio([2.0, 4.0, 2.2, 6.0], [2.0, 4.0, 2.0, 5.0])
    (1.05, 1.0, 1.125)
    """
    # imported here: the peers' scripts import this module in environments without dagprune
    from dagprune_algorithms.app.latency import paired_ratio_quartiles
    return tuple(round(value, 6) for value in paired_ratio_quartiles(numerators, denominators))


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``max|a - b| / max|a|``, computed in float64; ``inf`` when the shapes differ."""
    if reference.shape != other.shape:
        return float("inf")
    reference, other = reference.detach().double(), other.detach().double()
    scale = reference.abs().max().clamp_min(1e-12)
    return float((reference - other).abs().max() / scale)


def record_removal_exactness(row: dict, unpruned: torch.Tensor, masked: torch.Tensor,
                             removed: torch.Tensor) -> None:
    """Records in ``row`` whether a tool's removed model reproduces its masked model:
    ``mask_effect_rel_diff`` (unpruned vs masked), ``masks_took_effect`` (it exceeds
    :data:`EXACT_TOLERANCE`: a no-op removal cannot pass), ``max_rel_diff`` (masked vs removed)
    and ``exact``. The same verdict for every tool of the exactness section.

    Raises:
        ValueError: the removed model's output has another shape than the masked model's.
    """
    if removed.shape != masked.shape:
        raise ValueError(f"output shape after removal {tuple(removed.shape)} != masked output "
                         f"shape {tuple(masked.shape)}")
    row["mask_effect_rel_diff"] = relative_difference(unpruned, masked)
    row["masks_took_effect"] = row["mask_effect_rel_diff"] > EXACT_TOLERANCE
    row["max_rel_diff"] = relative_difference(masked, removed)
    row["exact"] = row["max_rel_diff"] <= EXACT_TOLERANCE and row["masks_took_effect"]


def fixed_input(input_shape, batch_size: int = 2) -> torch.Tensor:
    """The same random batch on every call."""
    return torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(0))


def error_text(stage: str, error: BaseException) -> str:
    """``"stage: Type: first line"`` for a report cell."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{stage}: {type(error).__name__}: {first_line[:300]}"


class StageError(Exception):
    """A measurement stage failed; ``str()`` is the row's ``"stage: Type: message"`` text."""


@contextlib.contextmanager
def stage(name: str):
    """Re-raises any exception of the block as a :class:`StageError` naming the (innermost) stage."""
    try:
        yield
    except StageError:
        raise
    except Exception as error:  # a failing model is a result, not a crash
        raise StageError(error_text(name, error)) from error


def unit_layer_scales(model: torch.nn.Module) -> None:
    """Sets layer-scale parameters (named ``gamma``) to 1, as every tool's exactness stress does:
    timm starts ConvNeXt's at 1e-6, which hides the effect of any closed channel on the output."""
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.rsplit(".", 1)[-1] == "gamma":
                parameter.fill_(1.0)


def write_json(path: Path, data) -> None:
    """Writes ``data`` as JSON atomically (temporary file, then rename; removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
