"""Wall-clock inference latency of a model, reported as median and interquartile range."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from dagprune.training_mode import evaluation_mode
from torch import nn

__all__ = ["LatencyResult", "measure_latency"]


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
    first_param = next(iter(model.parameters()), None)
    original_device = first_param.device if first_param is not None else None
    previous_threads = torch.get_num_threads()
    times_ms = []
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        model.to(device)
        x = torch.randn(batch_size, *input_shape, device=device)
        with evaluation_mode(model), torch.inference_mode():
            for _ in range(warmup):
                model(x)
            _synchronize(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                _synchronize(device)
                times_ms.append((time.perf_counter() - start) * 1000.0)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        if original_device is not None:
            model.to(original_device)

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
