"""Named channel units (mmrazor's ``MutableChannelUnit``): the unit types, their choices and
masks, unit names and the compact channel runs of templates. :class:`~.mutator.ChannelMutator`
finds a model's units and manages them.

A *unit* is one prunable channel group (:class:`~.channel_groups.ChannelGroup`): channels that
are kept or removed together, one decision per channel. Its name follows mmrazor's scheme
``"{module}_({start}, {end})_{width}"``: ``module`` is the qualified name of the group's
producer that runs *last* (the one mmrazor's backward tracer meets first, walking back from the
output: for timm's resnet34 the residual unit of stage 1 is ``layer1.2.conv2_(0, 64)_64``),
``(start, end)`` the positions of that producer's output axis the unit covers and ``width`` the
number of channels (decisions) of the unit. Names depend only on the model's structure, so they
are the same in every run and process; a name that would repeat gets a ``_2``, ``_3`` suffix.

Groups that cannot be pruned (they reach the model output or an op without a coupling rule)
become units with ``mutable == False``: they appear in
:meth:`~.mutator.ChannelMutator.config_template` unless ``only_mutable_units=True``, with
``"mutable": false`` and the reason, and never in choices. The model's *inputs* are not units
(nothing in the graph produces their channels), so mmrazor's ``conv1_(0, 3)_3`` has no
counterpart here.

A unit's state is its ``mask`` buffer (1 = kept channel); the mutator's masked model multiplies
it into the places where the unit's channels are consumed.

Choices: with ``choice_mode="ratio"`` a choice is the fraction of channels kept, in (0, 1];
with ``"number"`` the number kept, in [1, width]. The kept count is ``round(ratio * width)``
(halves round up), rounded to the nearest multiple of ``divisor``, at least ``min_value``
(at least one channel) and at most ``width``. Reading a choice back gives what was achieved:
0.7 on 64 channels keeps 45 and reads back 0.703125. Which channels stay is decided by the
unit's importance criterion (see :mod:`.importance`: ``"l1"``, ``"bn_scale"``, or scores passed
to :meth:`~.mutator.ChannelMutator.set_choices`, e.g. from
:class:`~.importance.TaylorImportance`).

Channel lists are compact: ``[position, length, first_channel, step]`` runs, so a 64-channel
conv is ``[[0, 64, 0, 1]]``.

>>> unit = ChannelUnit("conv_(0, 64)_64", 64)
>>> unit.set_keep_mask(unit.keep_mask(unit.kept_count(0.7), np.arange(64)))
>>> unit.kept_channels, unit.current_choice
(45, 0.703125)
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dagprune import DagModule
from dagprune.errors import PruningError

from dagprune_algorithms.pruning.channel_groups import ChannelAnalysis, ChannelGroup
from dagprune_algorithms.pruning.importance import IMPORTANCE_CRITERIA, channel_importance

__all__ = ["ChannelUnit", "SequentialChannelUnit", "ChannelUnitError", "register_channel_unit",
           "CHANNEL_UNIT_TYPES", "unit_names", "encode_channel_runs", "decode_channel_runs"]

CHOICE_MODES = ("ratio", "number")


class ChannelUnitError(PruningError):
    """A unit name, choice or template entry that does not fit the model's channel units."""


def _closest(name: str, candidates: Sequence[str], what: str) -> str:
    """``"unknown <what> 'x'; closest: ..."`` with a hint for mmrazor's ``backbone.`` prefix."""
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    message = f"unknown {what} {name!r}"
    if close:
        message += f"; closest: {', '.join(repr(c) for c in close)}"
    elif candidates:
        message += f"; valid: {', '.join(repr(c) for c in list(candidates)[:8])}" + \
                   (", ..." if len(candidates) > 8 else "")
    if name.startswith("backbone.") and name[len("backbone."):] in candidates:
        message += " (dagprune names have no mmrazor 'backbone.' prefix)"
    return message


# ------------------------------------------------------------------------------ channel runs
def encode_channel_runs(channel_of_position: np.ndarray) -> list[list[int]]:
    """Compact ``[position, length, first_channel, step]`` runs for positions with a channel.

    ``channel_of_position[p]`` is the unit channel at position ``p`` of a tensor axis, or -1.

    >>> encode_channel_runs(np.array([0, 1, 2, 3]))
    [[0, 4, 0, 1]]
    >>> encode_channel_runs(np.array([-1, 0, 0, 1, 1, 0, 1]))
    [[1, 2, 0, 0], [3, 2, 1, 0], [5, 2, 0, 1]]
    """
    channels = np.asarray(channel_of_position)
    runs: list[list[int]] = []
    for position in np.flatnonzero(channels >= 0).tolist():
        channel = int(channels[position])
        if runs:
            start, length, first, step = runs[-1]
            if position == start + length:
                step = step if length > 1 else channel - first
                if first + step * length == channel:
                    runs[-1][1:] = [length + 1, first, step]
                    continue
        runs.append([position, 1, channel, 1])
    return runs


def decode_channel_runs(runs: Sequence[Sequence[int]], size: int, width: int) -> np.ndarray:
    """The inverse of :func:`encode_channel_runs` for an axis of ``size`` positions and a unit
    of ``width`` channels (-1 where the unit has no channel).

    Raises:
        ValueError: a run is malformed or leaves the axis or the unit.
    """
    channels = np.full(size, -1, dtype=np.int64)
    for run in runs:
        if len(run) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                    for v in run):
            raise ValueError(f"a run is [position, length, first_channel, step] ints, got {run!r}")
        start, length, first, step = (int(v) for v in run)
        values = first + step * np.arange(length)
        if length < 1 or start < 0 or start + length > size or values.min() < 0 or values.max() >= width:
            raise ValueError(f"run {list(run)} does not fit an axis of {size} positions and a unit "
                             f"of {width} channels")
        channels[start:start + length] = values
    return channels


# ------------------------------------------------------------------------------ unit types
CHANNEL_UNIT_TYPES: dict[str, type["ChannelUnit"]] = {}
"""Unit type name (``channel_unit_cfg["type"]``) -> unit class."""


def register_channel_unit(*names: str):
    """Registers a :class:`ChannelUnit` subclass under one or more type names."""
    def decorator(cls):
        for name in names:
            CHANNEL_UNIT_TYPES[name] = cls
        return cls
    return decorator


@register_channel_unit("L1ChannelUnit", "ChannelUnit", "L1MutableChannelUnit")
class ChannelUnit(nn.Module):
    """One prunable group of channels: its name, choice settings, channel lists and mask.

    Args:
        name: the unit name (see the module docstring).
        num_channels: channels (decisions) in the unit.
        choice_mode: ``"ratio"`` (a choice is the fraction kept) or ``"number"`` (the count kept).
        divisor: kept counts are rounded to a multiple of this (the full width is always allowed).
        min_value: fewest channels kept (at least 1).
        importance: criterion ranking the channels (a name registered in
            :data:`~.importance.IMPORTANCE_CRITERIA`).
        mutable: False for a group that cannot be pruned (its choice stays full).
        reason: why the unit is not mutable.

    The module's forward returns the mask (used as a gate in the masked model).

    >>> unit = ChannelUnit("conv_(0, 64)_64", 64, divisor=8)
    >>> unit.kept_count(0.7), unit.kept_count(0.01), ChannelUnit("u", 64).kept_count(0.7)
    (48, 8, 45)
    """

    def __init__(self, name: str, num_channels: int, choice_mode: str = "ratio", divisor: int = 1,
                 min_value: int = 1, importance: str = "l1", mutable: bool = True, reason: str = ""):
        super().__init__()
        for arg, value in (("num_channels", num_channels), ("divisor", divisor), ("min_value", min_value)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ChannelUnitError(f"unit {name!r}: {arg} must be a positive int, got {value!r}")
        if choice_mode not in CHOICE_MODES:
            raise ChannelUnitError(f"unit {name!r}: " + _closest(str(choice_mode), CHOICE_MODES, "choice_mode"))
        self._check_importance(name, importance)
        self.name = name
        self.num_channels = int(num_channels)
        self.choice_mode = choice_mode
        self.divisor = int(divisor)
        self.min_value = int(min_value)
        self.importance = importance
        self.mutable = mutable
        self.reason = reason
        self.output_related: list[dict] = []
        self.input_related: list[dict] = []
        self.register_buffer("mask", torch.ones(self.num_channels))

    @staticmethod
    def _check_importance(name: str, importance: str) -> None:
        if importance not in IMPORTANCE_CRITERIA:
            raise ChannelUnitError(f"unit {name!r}: " + _closest(str(importance), sorted(IMPORTANCE_CRITERIA),
                                                                 "importance criterion"))

    def forward(self) -> torch.Tensor:
        return self.mask

    def init_args(self) -> dict:
        """The arguments that rebuild this unit (besides its name), for templates."""
        return {"num_channels": self.num_channels, "choice_mode": self.choice_mode,
                "divisor": self.divisor, "min_value": self.min_value, "importance": self.importance}

    # -- choices -------------------------------------------------------------------------------
    @property
    def kept_channels(self) -> int:
        return int((self.mask > 0.5).sum().item())

    @property
    def current_choice(self) -> float | int:
        """What the mask keeps, in the unit's choice mode."""
        kept = self.kept_channels
        return kept / self.num_channels if self.choice_mode == "ratio" else kept

    @property
    def full_choice(self) -> float | int:
        return 1.0 if self.choice_mode == "ratio" else self.num_channels

    def allowed_counts(self) -> list[int]:
        """Every kept count a choice can reach, ascending."""
        lowest = self._round_count(self.min_value)
        counts = range(lowest, self.num_channels + 1)
        return [c for c in counts if c % self.divisor == 0 or c == self.num_channels or c == lowest]

    def _round_count(self, count: float) -> int:
        count = math.floor(count + 0.5)
        if self.divisor > 1:
            count = math.floor(count / self.divisor + 0.5) * self.divisor
        lowest = min(self.num_channels, math.ceil(max(self.min_value, 1) / self.divisor) * self.divisor)
        return int(min(self.num_channels, max(lowest, count)))

    def kept_count(self, choice: Any) -> int:
        """The channels ``choice`` keeps.

        Raises:
            ChannelUnitError: the choice is not a number, out of range for the choice mode, or
                below full on a unit that is not mutable.
        """
        if isinstance(choice, bool) or not isinstance(choice, (int, float, np.integer, np.floating)) \
                or not math.isfinite(choice):
            raise ChannelUnitError(f"choice {choice!r} for unit {self.name!r} is not a number")
        if self.choice_mode == "ratio":
            if not 0 < choice <= 1:
                raise ChannelUnitError(
                    f"choice {choice!r} for unit {self.name!r} is out of range: choice_mode 'ratio' "
                    f"takes the fraction of its {self.num_channels} channels kept, in (0, 1]")
            count = choice * self.num_channels
        else:
            if float(choice) != int(choice) or not 1 <= choice <= self.num_channels:
                raise ChannelUnitError(
                    f"choice {choice!r} for unit {self.name!r} is out of range: choice_mode 'number' "
                    f"takes the number of channels kept, an int in [1, {self.num_channels}]")
            count = int(choice)
        kept = self._round_count(count)
        if not self.mutable and kept < self.num_channels:
            raise ChannelUnitError(f"unit {self.name!r} cannot be pruned ({self.reason}); its only "
                                   f"choice is {self.full_choice!r}")
        return kept

    def channel_scores(self, analysis: ChannelAnalysis, group: ChannelGroup) -> np.ndarray:
        """Importance of each channel (higher is kept first)."""
        return channel_importance(analysis, group, self.importance)

    def keep_mask(self, count: int, scores: np.ndarray) -> np.ndarray:
        """Boolean mask keeping the ``count`` best-scored channels (ties: lower index first)."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (self.num_channels,):
            raise ChannelUnitError(f"unit {self.name!r} has {self.num_channels} channels, got "
                                   f"{scores.shape} importance scores")
        keep = np.zeros(self.num_channels, dtype=bool)
        keep[np.argsort(-scores, kind="stable")[:count]] = True
        return keep

    def set_keep_mask(self, keep: np.ndarray) -> None:
        with torch.no_grad():
            self.mask.copy_(torch.as_tensor(keep, dtype=self.mask.dtype))

    # -- templates -----------------------------------------------------------------------------
    def config_template(self, with_init_args: bool = False, with_channels: bool = False) -> dict:
        """This unit's entry in :meth:`~.mutator.ChannelMutator.config_template`."""
        entry: dict[str, Any] = {}
        if with_init_args:
            entry["init_args"] = self.init_args()
        if with_channels:
            entry["channels"] = {"output_related": copy.deepcopy(self.output_related),
                                 "input_related": copy.deepcopy(self.input_related)}
        if not self.mutable:
            entry["mutable"] = False
            entry["reason"] = self.reason
        entry["choice"] = self.current_choice
        return entry

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, channels={self.num_channels}, kept={self.kept_channels}, "
                f"choice_mode={self.choice_mode!r}")


@register_channel_unit("SequentialChannelUnit", "SequentialMutableChannelUnit")
class SequentialChannelUnit(ChannelUnit):
    """A unit that keeps its first channels (mmrazor's ``SequentialMutableChannelUnit``).

    >>> unit = SequentialChannelUnit("u", 4)
    >>> unit.keep_mask(2, unit.channel_scores(None, None))
    array([ True,  True, False, False])
    """

    def __init__(self, name: str, num_channels: int, choice_mode: str = "ratio", divisor: int = 1,
                 min_value: int = 1, mutable: bool = True, reason: str = ""):
        super().__init__(name, num_channels, choice_mode, divisor, min_value, "l1", mutable, reason)
        self.importance = "sequential"

    def init_args(self) -> dict:
        args = super().init_args()
        del args["importance"]
        return args

    def channel_scores(self, analysis, group) -> np.ndarray:
        return -np.arange(self.num_channels, dtype=np.float64)


# ------------------------------------------------------------------------------ unit names
def _vertex_order(dag: DagModule) -> dict:
    return {vertex: index for index, vertex in enumerate(dag.inner_vertices)}


def _group_positions(analysis: ChannelAnalysis, vertex, axis: int, group: ChannelGroup) -> np.ndarray | None:
    layout = analysis.layouts.get(vertex)
    classes = layout.get(axis) if isinstance(layout, dict) else None
    return None if classes is None else np.flatnonzero(np.isin(classes, group.classes))


def unit_names(analysis: ChannelAnalysis) -> list[str]:
    """The unit name of every group of ``analysis`` (see the module docstring), in group order.

    >>> import dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)))
    >>> from dagprune_algorithms.pruning import find_channel_groups
    >>> unit_names(find_channel_groups(dag, (3, 4, 4)))
    ['0_(0, 8)_8', '1_(0, 4)_4']
    """
    order = _vertex_order(analysis.dag)
    names, seen = [], {}
    for group in analysis.groups:
        vertex, axis = max(group.producers, key=lambda producer: (order[producer[0]], producer[1]))
        positions = _group_positions(analysis, vertex, axis, group)
        start, end = (int(positions[0]), int(positions[-1]) + 1) if positions is not None and len(positions) \
            else (0, group.size)
        name = f"{vertex.qualified_name or vertex.name}_({start}, {end})_{group.size}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names
