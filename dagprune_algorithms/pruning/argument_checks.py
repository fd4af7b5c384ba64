"""Checks of :class:`~.channel_pruning.ChannelPruning`'s arguments: what is wrong and what to pass."""

from __future__ import annotations

import math
import numbers

from dagprune.errors import PruningError
from dagprune_algorithms.pruning.latency_table import LatencyTable
from dagprune_algorithms.pruning.width_table import WidthTable


def check_finite_numbers(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise PruningError(f"{name} must be a finite number, got {value!r}")


def check_latency_table(budget: str, latency_table) -> None:
    if latency_table is not None and not isinstance(latency_table, LatencyTable):
        raise PruningError(f"latency_table must be a LatencyTable (from measure_latency_table(...)), got "
                           f"{type(latency_table).__name__}")
    if latency_table is not None and budget != "latency":
        raise PruningError(f"a latency_table is used by budget='latency' only, got budget={budget!r}; "
                           "pass budget='latency' or drop the table")


def check_channel_limits(block_size, min_channels, round_to, width_table) -> None:
    for name, value in (("min_channels", min_channels), ("round_to", 1 if round_to == "auto" else round_to)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PruningError(f"{name} must be a positive int, got {value!r}" +
                               ("" if name == "min_channels" else ' (or "auto")'))
    if width_table is not None and (round_to != "auto" or not isinstance(width_table, WidthTable)):
        raise PruningError(f"width_table is used by round_to='auto' only and must be a WidthTable, got "
                           f"round_to={round_to!r}, {type(width_table).__name__}")
    if (round_to == "auto" or round_to > 1) and block_size > 1:
        raise PruningError(f"block_size={block_size} and round_to={round_to} both round the kept counts; "
                           "give one (round_to leaves groups smaller than it unrounded)")


def check_global_step(global_step) -> None:
    if isinstance(global_step, bool) or not isinstance(global_step, numbers.Integral) or global_step < 0:
        raise PruningError(
            f"global_step must be an int >= 0 (the index of the training step), got {global_step!r}; "
            "pass the loop's step counter (a Python int, not a tensor or a float)")
