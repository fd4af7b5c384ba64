"""The latency budget: a per-vertex latency table measured on the device, and its cost model.

:func:`measure_latency_table` builds the model slimmed uniformly to ``1/8, 2/8, ..., 8/8`` of
every prunable group's channels (rounded to whole channels, at least one), runs it once on the
example inputs to get every vertex's inputs, and times every vertex's op alone on them (and the
whole slim model). Each vertex's time is recorded against its *work fraction* at that width:
its FLOPs share (the kept fractions of its FLOPs terms' factors, as in the FLOPs budget), or,
for an op that counts no FLOPs (a norm, an activation, an add), the kept share of its output.
The points become a piecewise-linear curve over the work fraction (made non-decreasing, then
given a slope of ``MIN_SLOPE`` of the full-width time so its gradient never vanishes; flat
below the smallest width measured). The expected latency of a gated model is then
``overhead + sum over vertices of curve_v(expected work fraction of v)``, differentiable in
the keep probabilities (see :class:`.budgets.ExpectedCost`).

How approximate this is, plainly:

* A vertex's latency is assumed to depend on its work fraction only: a conv keeping 30% of its
  inputs and 90% of its outputs is charged what it cost at the uniform width of the same FLOPs
  share. Kernels are faster at some widths than others (vector lengths, tiles of 8, 16 or 32
  channels): on a 2-core x86 CPU resnet18 at 3/8 width (24, 48, 96, 192 channels) ran slower
  than at 4/8 (32, 64, 128, 256). The non-decreasing curve smooths such steps away, so a model
  with odd channel counts can be slower than predicted; ``round_to="auto"`` (``--round-to
  auto``, see :mod:`.width_table`) keeps the counts at the multiple the device runs fast.
* Ops are timed alone, repeatedly, on warm caches; in the model they run one after another.
  The ops' times are scaled by one factor, and a constant ``overhead`` added (the DAG's own
  Python loop, mostly), so that their sum fits the whole slim model's measured time at the timed
  widths (least squares). :meth:`LatencyTable.fit_error` says how far the table's sum is from
  the measured model at those widths (it includes the timing noise of both).
* Timings vary from run to run (other processes, clocks, thermal state): on a shared CPU by a
  few percent to tens of percent. The table is cached on disk and reused, so one run's noise is
  at least used consistently.

The cache key holds a hash of the DAG's structure (vertices, ops, predecessors, parameter
shapes), the input shapes and dtypes, the device's name, the torch version, the number of CPU
threads, the head pruning mode and the widths.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from dagprune import DagModule
from dagprune.errors import PruningError
from dagprune.shape_prop import module_device, resolve_inputs
from dagprune.training_mode import evaluation_mode

from dagprune_algorithms.pruning.budgets import KNOTS, BudgetCost, CostTerm, vertex_work_fractions
from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis, find_channel_groups
from dagprune_algorithms.pruning.channel_removal import remove_channels_from_dag
from dagprune_algorithms.pruning.table_files import CachedTable, cache_key

__all__ = ["LatencyTable", "measure_latency_table", "latency_terms", "default_cache_dir"]

LOG = logging.getLogger(__name__)


MIN_SLOPE = 1e-3
"""Smallest slope of a curve, as a share of the vertex's full-width time per unit of work."""


def default_cache_dir() -> Path:
    """``$DAGPRUNE_CACHE/latency``, else ``$XDG_CACHE_HOME/dagprune/latency``, else
    ``~/.cache/dagprune/latency``."""
    if os.environ.get("DAGPRUNE_CACHE"):
        return Path(os.environ["DAGPRUNE_CACHE"]) / "latency"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dagprune" / "latency"


def latency_terms(analysis: ChannelAnalysis) -> list[CostTerm]:
    """The terms whose kept shares give each vertex's work fraction: its FLOPs terms, or one
    term over its output's channel axes (none for an output without channel axes)."""
    flops: dict = {}
    for term in analysis.flops_terms:
        flops.setdefault(term.vertex, []).append(CostTerm(term.vertex, float(term.base_flops), term.factors))
    terms = []
    for vertex in analysis.dag.inner_vertices:
        layout = analysis.layouts[vertex]
        terms += flops.get(vertex) or [CostTerm(vertex, 1.0, list(layout.values()) if isinstance(layout, dict) else [])]
    return terms


@dataclasses.dataclass
class LatencyTable(CachedTable):
    """Per-vertex latency curves of one model on one device (see the module docstring).

    Attributes:
        curves: vertex name -> seconds at :data:`~.budgets.KNOTS` evenly spaced work fractions.
        overhead_seconds: time of the whole model beyond the sum of its ops' times.
        widths: the kept shares of every group at which the model was timed.
        model_seconds, predicted_seconds: the whole slim model's time at each width, measured
            and as the table predicts it.
        description: what was measured: device, torch version, threads, inputs.
        path: the file the table was read from or written to.
        from_cache: whether it was read from a file rather than measured.
    """

    KIND: ClassVar[str] = "latency table"

    curves: dict[str, list[float]]
    overhead_seconds: float
    widths: list[float]
    model_seconds: list[float]
    predicted_seconds: list[float]
    description: dict
    path: Path | None = None
    from_cache: bool = False

    def fit_error(self) -> float:
        """Largest ``|predicted - measured| / measured`` over the measured widths."""
        return max((abs(predicted - measured) / measured for predicted, measured
                    in zip(self.predicted_seconds, self.model_seconds) if measured > 0), default=0.0)

    def cost(self, analysis: ChannelAnalysis) -> BudgetCost:
        """The latency budget of ``analysis``'s DAG (analysed with any exclusions).

        Raises:
            PruningError: the table has no curve for some vertex of the DAG (it was measured on
                another model).
        """
        missing = [v.name for v in analysis.dag.inner_vertices if v.name not in self.curves]
        if missing:
            raise PruningError(f"the latency table {self.path or ''} has no curve for {len(missing)} vertices of "
                               f"{analysis.dag.name} ({', '.join(missing[:5])}); it was measured on another model: "
                               "measure one for this model with measure_latency_table(model, ...)")
        curves = {v: np.asarray(self.curves[v.name], dtype=np.float64) for v in analysis.dag.inner_vertices}
        return BudgetCost("latency", latency_terms(analysis), len(analysis.atom_class), curves=curves,
                          constant=self.overhead_seconds)

    def check_contents(self) -> None:
        if any(len(curve) != KNOTS for curve in self.curves.values()):
            raise ValueError(f"curves must have {KNOTS} points")


def measure_latency_table(model: DagModule, input_shape_without_batch: Sequence | None = None, *,
                          example_inputs: Any = None, batch_size: int = 1, device=None,
                          cache_dir: str | os.PathLike | None = None, head_pruning: str = "dims",
                          widths: int = 8, seconds_per_timing: float = 0.002,
                          progress: bool = True) -> LatencyTable:
    """The latency table of ``model`` on ``device``, read from ``cache_dir`` when it holds one
    for this model, inputs, device and torch version, else measured and written there.

    Args:
        model: the DAG to time (its weights do not matter, only its ops and shapes).
        input_shape_without_batch: e.g. ``(3, 64, 64)``; random inputs of ``batch_size``.
        example_inputs: instead of a shape, the inputs to time the model on (as they are).
        batch_size: the batch of the random inputs: time at the batch you will deploy at.
        device: where to time (default: the model's device).
        cache_dir: where tables are kept (default: :func:`default_cache_dir`).
        head_pruning: as for :class:`~.channel_pruning.ChannelPruning`.
        widths: number of uniform widths timed (``1/widths`` steps).
        seconds_per_timing: each op is called in rounds of about this long (3 rounds, median).
        progress: show a tqdm progress bar when tqdm is installed.

    Returns:
        The table (``from_cache`` says whether it was read from the cache).

    Raises:
        PruningError: an argument is out of range, or a cached file is not a table.

    Takes about ``widths x (3 x (ops x max(seconds_per_timing, op time) + model time))``: a few
    seconds for resnet18 at 64 px on a CPU.

    >>> import tempfile, dagprune
    >>> dag = dagprune.build_from_unstructured_module(torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)))
    >>> with tempfile.TemporaryDirectory() as cache:
    ...     table = measure_latency_table(dag, (3, 16, 16), cache_dir=cache, widths=2, progress=False)
    ...     again = measure_latency_table(dag, (3, 16, 16), cache_dir=cache, widths=2, progress=False)
    >>> table.from_cache, again.from_cache, sorted(again.curves) == sorted(v.name for v in dag.inner_vertices)
    (False, True, True)
    """
    if not isinstance(widths, int) or widths < 2 or not isinstance(batch_size, int) or batch_size < 1:
        raise PruningError(f"widths must be an int >= 2 and batch_size an int >= 1, got {widths!r}, {batch_size!r}")
    device = torch.device(device) if device is not None else module_device(model)
    inputs = resolve_inputs(model, input_shape_without_batch, example_inputs, batch_size).to(device)
    description = _describe(model, inputs, device, head_pruning, widths)
    path = (Path(cache_dir if cache_dir is not None else default_cache_dir())
            / f"{_safe(model.name)}-{cache_key(description)}.json")
    cached = LatencyTable.read_cached(path)
    if cached is not None:
        return cached
    analysis = find_channel_groups(model, input_shape_without_batch, head_pruning, example_inputs)
    table = _measure(analysis, inputs, device, widths, seconds_per_timing, progress)
    table.description = {k: v for k, v in description.items() if k != "structure"}
    table.save(path)
    LOG.info("latency table of %s on %s: %d widths, fit error %.1f%%, saved to %s", model.name,
             description["device"], widths, 100 * table.fit_error(), path)
    return table


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "model"


def device_name(device: torch.device) -> str:
    """The name timings on ``device`` are filed under: the GPU's model, or the CPU's kind and count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.machine()}:{platform.processor()}:{os.cpu_count()} cpus"


def _describe(model: DagModule, inputs, device: torch.device, head_pruning: str, widths: int) -> dict:
    """What decides a table: the cache key's contents."""
    structure = hashlib.sha256()
    for vertex in model.inner_vertices:
        structure.update(repr((vertex.name, type(vertex.module).__qualname__, repr(vertex.module),
                               [p.name for p in vertex.predecessors])).encode())
    for name, tensor in model.state_dict().items():
        structure.update(repr((name, tuple(tensor.shape), str(tensor.dtype))).encode())
    return {"structure": structure.hexdigest(), "device": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "inputs": [(list(t.shape), str(t.dtype)) for t in inputs.tensors()],
            "head_pruning": head_pruning, "widths": widths}


def _uniform_keep(analysis: ChannelAnalysis, share: float) -> np.ndarray:
    """Every prunable group keeps its first ``round(share x size)`` classes (at least one)."""
    keep = np.ones(len(analysis.atom_class), dtype=bool)
    for group in analysis.prunable_groups:
        keep[group.classes[max(1, round(share * group.size)):]] = False
    return keep


def _measure(analysis: ChannelAnalysis, inputs, device, widths: int, seconds_per_timing: float,
             progress: bool) -> LatencyTable:
    """Times the uniformly slimmed models; fits the curves."""
    terms = latency_terms(analysis)
    points: dict[str, list] = {v.name: [] for v in analysis.dag.inner_vertices}
    shares = [index / widths for index in range(1, widths + 1)]
    model_seconds, op_sums = [], []
    for share in _progress_bar(shares, progress, f"latency table of {analysis.dag.name}"):
        keep = _uniform_keep(analysis, share)
        slim = remove_channels_from_dag(analysis, keep).to(device)
        seconds, whole = time_vertices(slim, inputs, device, seconds_per_timing)
        work = vertex_work_fractions(terms, keep)
        for vertex in analysis.dag.inner_vertices:
            points[vertex.name].append((work[vertex], seconds[vertex.name]))
        model_seconds.append(whole)
        op_sums.append(sum(seconds.values()))
    scale, overhead = _calibration(op_sums, model_seconds)
    curves = {name: scale * _curve(vertex_points) for name, vertex_points in points.items()}
    knots = np.linspace(0.0, 1.0, KNOTS)
    predicted = [overhead + sum(float(np.interp(vertex_points[index][0], knots, curves[name]))
                                for name, vertex_points in points.items()) for index in range(widths)]
    return LatencyTable({k: [float(x) for x in c] for k, c in curves.items()}, overhead, shares,
                        model_seconds, predicted, {})


def _calibration(op_sums: list[float], model_seconds: list[float]) -> tuple[float, float]:
    """``(scale, overhead)`` with ``model ~ scale x sum of the ops + overhead`` at the timed
    widths (least squares; the overhead at least 0, the scale above 0)."""
    sums, models = np.asarray(op_sums), np.asarray(model_seconds)
    scale, overhead = np.polyfit(sums, models, 1)
    if overhead < 0 or scale <= 0:
        scale, overhead = float(models.sum() / sums.sum()), 0.0
    return float(scale), float(overhead)


def _curve(points: list[tuple[float, float]]) -> np.ndarray:
    """Seconds at the knots: the points' piecewise-linear interpolation (equal work fractions
    averaged, made non-decreasing by pooling adjacent violators), with a slope of at least
    :data:`MIN_SLOPE` of the full-width time."""
    by_work: dict[float, list[float]] = {}
    for work, seconds in points:
        by_work.setdefault(round(work, 9), []).append(seconds)
    works = np.array(sorted(by_work))
    seconds = _non_decreasing([float(np.mean(by_work[w])) for w in works], [len(by_work[w]) for w in works])
    knots = np.linspace(0.0, 1.0, KNOTS)
    curve = np.interp(knots, works, seconds) if len(works) > 1 else np.full(KNOTS, seconds[0])
    return curve + MIN_SLOPE * max(curve[-1], 1e-9) * knots


def _non_decreasing(values: list[float], weights: list[int]) -> np.ndarray:
    """The weighted least-squares non-decreasing fit of ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights):
        blocks.append([value, float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (a, wa, na), (b, wb, nb) = blocks.pop(-2), blocks.pop()
            blocks.append([(a * wa + b * wb) / (wa + wb), wa + wb, na + nb])
    return np.concatenate([np.full(count, mean) for mean, _, count in blocks])


def time_vertices(dag: DagModule, inputs, device: torch.device,
                  seconds_per_timing: float) -> tuple[dict[str, float], float]:
    """(seconds per call of every vertex's op alone on its inputs, seconds per call of the
    whole DAG), in eval mode without autograd."""
    with evaluation_mode(dag), torch.inference_mode():
        values = dag.forward_with_all_values(*inputs.args, **inputs.kwargs)
        seconds = {}
        for vertex in dag.inner_vertices:
            call = functools.partial(vertex.module, *[values[p] for p in vertex.predecessors])
            seconds[vertex.name] = seconds_per_call(call, device, seconds_per_timing)
        whole = seconds_per_call(functools.partial(inputs.call, dag), device, seconds_per_timing)
    return seconds, whole


def seconds_per_call(call: Callable[[], Any], device: torch.device, seconds_per_round: float,
                     rounds: int = 3) -> float:
    """The fastest over ``rounds`` of the mean time of ``call()`` in rounds of about
    ``seconds_per_round`` (at least one call each), after one warm-up call: the least
    disturbed by other processes."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    call()
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    single = time.perf_counter() - start
    calls = max(1, min(200, int(seconds_per_round / max(single, 1e-7))))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def _progress_bar(items: list, enabled: bool, description: str):
    """``items`` wrapped in a tqdm bar when enabled and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, leave=False)
