"""Hardware-aware widths: which multiple of channels the device at hand runs fast.

Kernels process channels in blocks (vector registers of 8 or 16 floats on x86 CPUs, tiles of
8 or 16 on GPU tensor cores), so a layer with a channel count just above a block boundary often
costs as much as, or more than, the next multiple of the block. Rounding the kept channel
counts up to that multiple then keeps more channels at no cost in latency.

:func:`measure_width_table` times three probe layers (a 3x3 convolution, a 1x1 convolution and
a linear layer, each mapping ``w`` channels to ``w``) for every width ``w`` in a range, in
interleaved rounds (the fastest round counts, as the least disturbed by other processes).
:meth:`WidthTable.rounding_cost` is then, for a candidate multiple ``m``, the geometric mean of
``time(ceil_m(w)) / time(w)`` over the widths and probes: what rounding every width up to a
multiple of ``m`` costs (below 1 where the rounded widths run faster). :meth:`WidthTable.best_multiple`
is the largest candidate whose cost is within ``tolerance`` (1% by default) of the lowest cost:
the coarsest rounding that is as fast as the best. On a device that does not care about
alignment the cost of ``m`` grows like ``m / (2 w)`` and a small multiple is chosen; on one
that works in blocks, the block size (or a multiple of it that runs faster still).

The table is cached on disk like the latency tables (:func:`~.latency_table.default_cache_dir`),
keyed by the device's name, the torch version, the number of CPU threads, the dtype and the
probe shapes. ``ChannelPruning(round_to="auto")`` and the CLI's ``--round-to auto`` (its
default) use it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from dagprune.errors import PruningError
from dagprune_algorithms.pruning.table_files import CachedTable, cache_key
from dagprune_algorithms.pruning.latency_table import default_cache_dir, device_name, seconds_per_call

__all__ = ["WidthTable", "measure_width_table", "CANDIDATE_MULTIPLES"]

LOG = logging.getLogger(__name__)


CANDIDATE_MULTIPLES = (1, 2, 4, 8, 16, 32)
"""The multiples ``best_multiple`` chooses from."""

PROBES = ("conv3x3", "conv1x1", "linear")
"""The probe layers, each ``w`` channels to ``w``."""


@dataclasses.dataclass
class WidthTable(CachedTable):
    """Seconds per call of each probe layer at each width on one device.

    Attributes:
        widths: the channel counts timed, consecutive.
        seconds: probe name -> seconds per call at each of ``widths``.
        description: what was measured: device, torch version, threads, dtype, probe shapes.
        tolerance: the rounding cost :meth:`best_multiple` accepts by default.
        path: the file the table was read from or written to.
        from_cache: whether it was read from a file rather than measured.
    """

    KIND: ClassVar[str] = "width table"

    widths: list[int]
    seconds: dict[str, list[float]]
    description: dict
    tolerance: float = 0.01
    path: Path | None = None
    from_cache: bool = False

    def rounding_cost(self, multiple: int) -> float:
        """Geometric mean over the probes and the widths ``w`` (those whose rounded width was
        timed too) of ``time(ceil_multiple(w)) / time(w)``; 1.0 for ``multiple`` 1."""
        index = {width: i for i, width in enumerate(self.widths)}
        logs = []
        for times in self.seconds.values():
            for width in self.widths:
                rounded = -(-width // multiple) * multiple
                if rounded in index:
                    logs.append(math.log(times[index[rounded]] / times[index[width]]))
        return math.exp(sum(logs) / len(logs)) if logs else math.inf

    def best_multiple(self, tolerance: float | None = None) -> int:
        """The largest of :data:`CANDIDATE_MULTIPLES` whose :meth:`rounding_cost` is at most
        ``1 + tolerance`` (default :attr:`tolerance`) times the lowest cost of any of them."""
        costs = {m: self.rounding_cost(m) for m in CANDIDATE_MULTIPLES}
        limit = min(costs.values()) * (1.0 + (self.tolerance if tolerance is None else tolerance))
        return max(m for m, cost in costs.items() if cost <= limit)

    def summary(self) -> str:
        """One line: the chosen multiple and the cost of each candidate."""
        costs = ", ".join(f"{m}: {self.rounding_cost(m):.3f}" for m in CANDIDATE_MULTIPLES[1:])
        return (f"channel multiple {self.best_multiple()} on {self.description.get('device')} "
                f"(latency of rounding every width up, per multiple: {costs})")

    def check_contents(self) -> None:
        if any(len(times) != len(self.widths) or min(times) <= 0 for times in self.seconds.values()):
            raise ValueError("every probe needs one positive time per width")


def measure_width_table(device=None, dtype: torch.dtype = torch.float32, *, widths: range = range(40, 97),
                        batch_size: int = 8, spatial: int = 8, rounds: int = 5,
                        cache_dir: str | os.PathLike | None = None, tolerance: float = 0.01) -> WidthTable:
    """The width table of ``device`` for ``dtype``, read from ``cache_dir`` when it holds one
    for this device, torch version, thread count and probe shapes, else measured and written there.

    Args:
        device: where to time (default: the CPU).
        dtype: the dtype of the probe layers and inputs (the model's).
        widths: consecutive channel counts to time; rounding is judged where the rounded count
            lies inside the range too.
        batch_size, spatial: the probes' inputs are ``(batch_size, w, spatial, spatial)`` for
            the convolutions and ``(batch_size * spatial**2, w)`` for the linear layer.
        rounds: sweeps over all widths; each time is the fastest of its rounds.
        cache_dir: where tables are kept (default: :func:`~.latency_table.default_cache_dir`).
        tolerance: the rounding cost :meth:`WidthTable.best_multiple` accepts by default.

    Returns:
        The table (``from_cache`` says whether it was read from the cache).

    Raises:
        PruningError: an argument is out of range, or a cached file is not a table.

    Takes a few seconds on a CPU thread with the defaults.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as cache:
    ...     table = measure_width_table(widths=range(6, 11), rounds=1, spatial=2, cache_dir=cache)
    ...     again = measure_width_table(widths=range(6, 11), rounds=1, spatial=2, cache_dir=cache)
    >>> again.from_cache, again.widths, table.best_multiple() in CANDIDATE_MULTIPLES
    (True, [6, 7, 8, 9, 10], True)
    """
    widths = list(widths)
    if len(widths) < 2 or widths[0] < 1 or widths != list(range(widths[0], widths[0] + len(widths))):
        raise PruningError(f"widths must be at least two consecutive positive ints, got {widths[:3]}...")
    for name, value in (("batch_size", batch_size), ("spatial", spatial), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PruningError(f"{name} must be a positive int, got {value!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise PruningError(f"tolerance must be a number >= 0, got {tolerance!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    description = {"device": device_name(device), "torch": torch.__version__,
                   "threads": torch.get_num_threads() if device.type == "cpu" else None,
                   "dtype": str(dtype), "batch_size": batch_size, "spatial": spatial, "probes": list(PROBES),
                   "widths": [widths[0], widths[-1]]}
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"widths-{cache_key(description)}.json"
    cached = WidthTable.read_cached(path)
    if cached is not None:
        cached.tolerance = tolerance
        return cached
    seconds = _time_probes(widths, device, dtype, batch_size, spatial, rounds)
    table = WidthTable(widths, seconds, description, tolerance)
    table.save(path)
    LOG.info("width table: %s; saved to %s", table.summary(), path)
    return table


def _time_probes(widths: list[int], device: torch.device, dtype: torch.dtype, batch_size: int,
                 spatial: int, rounds: int) -> dict[str, list[float]]:
    """Fastest seconds per call of every probe at every width over ``rounds`` sweeps."""
    best = {probe: [math.inf] * len(widths) for probe in PROBES}
    calls = [_probe_calls(width, device, dtype, batch_size, spatial) for width in widths]  # built once
    with torch.inference_mode():
        for _ in range(rounds):
            for i, width_calls in enumerate(calls):
                for probe, call in width_calls.items():
                    best[probe][i] = min(best[probe][i], seconds_per_call(call, device, 0.001, rounds=1))
    return best


def _probe_calls(width: int, device: torch.device, dtype: torch.dtype, batch_size: int, spatial: int) -> dict:
    generator = torch.Generator().manual_seed(width)
    image = torch.randn(batch_size, width, spatial, spatial, generator=generator).to(device, dtype)
    tokens = image.permute(0, 2, 3, 1).reshape(-1, width).contiguous()
    layers = {"conv3x3": nn.Conv2d(width, width, 3, padding=1), "conv1x1": nn.Conv2d(width, width, 1),
              "linear": nn.Linear(width, width)}
    inputs = {"conv3x3": image, "conv1x1": image, "linear": tokens}
    return {probe: functools.partial(layers[probe].to(device, dtype).eval(), inputs[probe]) for probe in PROBES}
