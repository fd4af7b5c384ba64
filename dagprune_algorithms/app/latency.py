"""Wall-clock inference latency of a model, reported as median and interquartile range."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from dagprune.training_mode import evaluation_mode
from torch import nn

__all__ = ["LatencyResult", "LatencyShare", "measure_latency", "measure_latency_share", "paired_ratio_quartiles"]


@dataclass(frozen=True)
class LatencyResult:
    """Latency statistics of one forward pass, in milliseconds.

    Attributes:
        median_ms: Median time of a forward pass.
        iqr_ms: Interquartile range (75th minus 25th percentile) of the times.
        p25_ms: 25th percentile.
        p75_ms: 75th percentile.
        batch_size: Batch size of the measured input.
        num_threads: Intra-op CPU threads used during the measurement.
        device: Device the model ran on.
        repeats: Number of timed forward passes.
    """

    median_ms: float
    iqr_ms: float
    p25_ms: float
    p75_ms: float
    batch_size: int
    num_threads: int
    device: str
    repeats: int


@dataclass(frozen=True)
class LatencyShare:
    """One model's latency as a share of another's, from passes timed in alternation.

    Attributes:
        median: Median over rounds of the ratio model / reference of the round's two passes.
        p25: 25th percentile of those ratios.
        p75: 75th percentile.
        rounds: Number of rounds (pairs of timed passes).
    """

    median: float
    p25: float
    p75: float
    rounds: int


@contextlib.contextmanager
def _timing_setup(models: Sequence[nn.Module], device: torch.device, num_threads: Optional[int]):
    """Moves ``models`` to ``device`` and sets the CPU threads for the block; restores every
    model's device and the process-wide thread count after."""
    devices = [next((param.device for param in model.parameters()), None) for model in models]
    previous_threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        for model in models:
            model.to(device)
        yield
    finally:
        torch.set_num_threads(previous_threads)
        for model, original_device in zip(models, devices):
            if original_device is not None:
                model.to(original_device)


def _timed_pass_ms(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Milliseconds of one forward pass of ``model`` on ``x``, the device synchronised after it."""
    start = time.perf_counter()
    model(x)
    _synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def _synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` to finish (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    num_threads: Optional[int] = None,
    warmup: int = 3,
    repeats: int = 10,
    device: Union[str, torch.device] = "cpu",
) -> LatencyResult:
    """Time forward passes of ``model`` on a random input.

    The model runs in eval mode under ``torch.inference_mode``. If it lives on another
    device it is moved to ``device`` for the measurement. Afterwards its device, its
    train/eval mode and the process-wide ``torch.get_num_threads()`` are restored. On CUDA
    (and MPS) the device is synchronised around every timed pass so that the times cover
    the actual computation.

    Args:
        model: The model to time.
        input_shape: Shape ``(C, H, W)`` of one input sample.
        batch_size: Samples per forward pass.
        num_threads: Intra-op CPU threads to use; None keeps the current setting.
        warmup: Untimed forward passes run first.
        repeats: Timed forward passes.
        device: Device to run on, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
        A :class:`LatencyResult`.

    Raises:
        ValueError: If ``batch_size``, ``repeats`` or ``num_threads`` is below 1, or
            ``warmup`` is negative.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"need batch_size >= 1, repeats >= 1 and warmup >= 0, got batch_size={batch_size}, "
            f"repeats={repeats}, warmup={warmup}"
        )
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be at least 1, got {num_threads}")
    device = torch.device(device)
    times_ms = []
    with _timing_setup([model], device, num_threads):
        x = torch.randn(batch_size, *input_shape, device=device)
        with evaluation_mode(model), torch.inference_mode():
            for _ in range(warmup):
                model(x)
            _synchronize(device)
            for _ in range(repeats):
                times_ms.append(_timed_pass_ms(model, x, device))
        used_threads = torch.get_num_threads()

    p25, median, p75 = (float(v) for v in np.percentile(times_ms, [25, 50, 75]))
    return LatencyResult(
        median_ms=median,
        iqr_ms=p75 - p25,
        p25_ms=p25,
        p75_ms=p75,
        batch_size=batch_size,
        num_threads=used_threads,
        device=str(device),
        repeats=repeats,
    )


def measure_latency_share(
    model: nn.Module,
    reference: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    device: Union[str, torch.device] = "cpu",
    warmup: int = 2,
    rounds: int = 40,
) -> LatencyShare:
    """The latency of ``model`` as a share of ``reference``'s: both run on the same random
    input, one pass of each per round, and the share is the median over rounds of the ratio of
    a round's two passes.

    Timing the two back to back, pass by pass, makes the share robust on a shared machine: a
    slow spell (another process on a core, a lower clock) lasts longer than a round and slows
    both of its passes, so it moves the ratio far less than it moves either model's own times,
    and the median sets aside the rounds it splits. Eval mode, ``torch.inference_mode``, the
    models' devices restored after, as :func:`measure_latency`.

    Args:
        model: The model whose share is measured (e.g. the pruned one).
        reference: The model it is compared with (e.g. the original).
        input_shape: Shape of one input sample.
        batch_size: Samples per forward pass.
        device: Device to run on.
        warmup: Untimed rounds first.
        rounds: Timed rounds.

    Raises:
        ValueError: If ``batch_size`` or ``rounds`` is below 1, or ``warmup`` is negative.
    """
    if batch_size < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, rounds >= 1 and warmup >= 0, got batch_size={batch_size}, "
                         f"rounds={rounds}, warmup={warmup}")
    device = torch.device(device)
    model_times, reference_times = [], []
    with _timing_setup([model, reference], device, None):
        x = torch.randn(batch_size, *input_shape, device=device)
        with evaluation_mode(model, reference), torch.inference_mode():
            for index in range(warmup + rounds):
                reference_ms = _timed_pass_ms(reference, x, device)
                model_ms = _timed_pass_ms(model, x, device)
                if index >= warmup:
                    model_times.append(model_ms)
                    reference_times.append(reference_ms)
    median, p25, p75 = paired_ratio_quartiles(model_times, reference_times)
    return LatencyShare(median=median, p25=p25, p75=p75, rounds=rounds)


def paired_ratio_quartiles(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile of the per-round ratios ``numerators[i] / denominators[i]``
    of two series timed in alternation (linear interpolation between ratios).

    >>> paired_ratio_quartiles([2.0, 4.0, 2.2, 6.0], [2.0, 4.0, 2.0, 5.0])
    (1.05, 1.0, 1.125)
    """
    ratios = [n / d for n, d in zip(numerators, denominators)]
    if not ratios:
        raise ValueError("no rounds to take a ratio of")
    p25, median, p75 = (round(float(v), 12) for v in np.percentile(ratios, [25, 50, 75]))
    return median, p25, p75
