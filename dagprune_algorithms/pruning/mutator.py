"""The channel mutator (mmrazor's ``ChannelMutator``): finds a model's channel units
(:mod:`.units`), builds its masked model, sets choices, writes config and choice templates and
exports the slim model, over the same channel groups as :class:`ChannelPruning`.

The masked model (:attr:`ChannelMutator.masked_model`) multiplies each unit's mask into the
places where its channels are consumed, exactly like the gated model of :class:`ChannelPruning`,
so :meth:`ChannelMutator.remove_channels` returns a slim model computing what the masked model
computes (eval mode), and a state dict of the masked model holds the masks (exact resume).

Parse modes (``parse_cfg["type"]``): ``"ChannelAnalysis"`` (mmrazor's tracer names are accepted
as aliases) runs :func:`~.channel_groups.find_channel_groups` on a random input;
``"Config"`` rebuilds the units from a template made with ``with_channels=True``, without
running the model or the coupling analysis: the template's channel lists say, per unit, which
positions of which producer outputs (``output_related``) and of which consumer inputs
(``input_related``) hold its channels, which is enough to build the masked model and to rank
channels. Export (:meth:`~ChannelMutator.remove_channels`) and FLOPs need the channel layout of
every tensor, which a template does not hold: they run the analysis once and check that it
gives the template's units, raising :class:`~.units.ChannelUnitError` if the model changed.
``parse_cfg["head_pruning"]`` (``"dims"``, the default, or ``"heads"``) says whether attention
units hold head dimensions or whole heads (see :data:`~.channel_groups.HEAD_PRUNING_MODES`).
``parse_cfg["exclude"]`` (module paths or fnmatch patterns) leaves modules alone: the units
whose channels flow into or out of them are not mutable (see :mod:`.exclusion`; in parse mode
``"Config"`` a unit counts as touched when its channel lists name an excluded module).

Channel lists are compact runs (see :func:`~.units.encode_channel_runs`).

>>> import dagprune
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
...                       nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
>>> mutator = ChannelMutator(parse_cfg={"type": "ChannelAnalysis", "input_shape": [3, 12, 12]})
>>> mutator.prepare_from_supernet(dagprune.build_from_unstructured_module(model))
>>> mutator.choice_template()
{'0_(0, 8)_8': 1.0, '3_(0, 16)_16': 1.0}
>>> mutator.set_choices({"0_(0, 8)_8": 0.3})
>>> mutator.current_choices
{'0_(0, 8)_8': 0.25, '3_(0, 16)_16': 1.0}
>>> slim = mutator.remove_channels()
>>> slim.vertex("_0").module
Conv2d(3, 2, kernel_size=(3, 3), stride=(1, 1))
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dagprune import DagModule, build_from_unstructured_module
from dagprune.ops import INNER_AXIS

from dagprune_algorithms.pruning.channel_groups import (HEAD_PRUNING_MODES, ChannelAnalysis, ChannelGroup,
                                                        ConsumerSite, find_channel_groups, iter_layout_atoms)
from dagprune_algorithms.pruning.exclusion import check_exclude_patterns, exclude_modules, excluded_vertices
from dagprune_algorithms.pruning.gated_model import build_gated_dag
from dagprune_algorithms.pruning.channel_removal import remove_channels_from_dag
from dagprune_algorithms.pruning.units import (CHANNEL_UNIT_TYPES, ChannelUnit, ChannelUnitError, _closest,
                                               _vertex_order, decode_channel_runs, encode_channel_runs,
                                               unit_names)

__all__ = ["ChannelMutator", "PARSE_TYPES"]

DEFAULT_INPUT_SHAPE = (3, 224, 224)
"""Input shape of the analysis when ``parse_cfg`` names none (mmrazor's pseudo image size)."""

TRACED, FROM_CONFIG = "ChannelAnalysis", "Config"
PARSE_TYPES: dict[str, str] = {
    TRACED: TRACED, FROM_CONFIG: FROM_CONFIG,
    # mmrazor's tracers: the same job (find the units); their loss_calculator has no use here.
    "BackwardTracer": TRACED, "ChannelAnalyzer": TRACED, "FxTracer": TRACED, "PruneTracer": TRACED,
}
"""``parse_cfg["type"]`` -> parse mode."""

MUTATOR_TYPES = ("ChannelMutator", "BaseChannelMutator")


# ------------------------------------------------------------------------------ channel lists
def _unit_channels(analysis: ChannelAnalysis, group: ChannelGroup) -> tuple[list[dict], list[dict]]:
    """``(output_related, input_related)`` channel lists of ``group`` (JSON-ready)."""
    channel_of_class = np.full(len(analysis.atom_class), -1, dtype=np.int64)
    channel_of_class[group.classes] = np.arange(group.size)
    outputs = []
    for vertex, axis in group.producers:
        classes = analysis.producer_classes(vertex, axis)
        if classes is None:
            continue
        outputs.append({"name": vertex.qualified_name or vertex.name, "vertex": vertex.name,
                        "axis": int(axis), "size": int(len(classes)),
                        "channels": encode_channel_runs(channel_of_class[classes])})
    inputs = []
    for site in analysis.consumer_sites:
        channels = channel_of_class[site.atoms]
        if (channels >= 0).any():
            inputs.append({"name": site.vertex.qualified_name or site.vertex.name,
                           "vertex": site.vertex.name, "input_index": int(site.input_index),
                           "axis": int(site.axis), "size": int(len(site.atoms)), "kind": site.kind,
                           "channels": encode_channel_runs(channels)})
    return outputs, inputs


def _analysis_from_units(dag: DagModule, input_shape: tuple, head_pruning: str,
                         units: list[ChannelUnit]) -> ChannelAnalysis:
    """An analysis holding only what the masked model and importance need, from channel lists.

    Classes are numbered unit by unit; one extra class stands for positions of no unit. It has
    no FLOPs terms and no layout besides the producers' (export runs the real analysis).
    """
    def vertex(entry: dict, unit: ChannelUnit):
        try:
            return dag.vertex(entry["vertex"])
        except KeyError as error:
            raise ChannelUnitError(f"unit {unit.name!r} refers to {error.args[0]}; the template "
                                   "was made for another model") from None

    mutable = [unit for unit in units if unit.mutable]
    offsets = np.cumsum([0] + [unit.num_channels for unit in mutable])
    no_unit = int(offsets[-1])
    groups, layouts, sites = [], {}, {}
    for index, (unit, offset) in enumerate(zip(mutable, offsets)):
        producers = []
        for entry in unit.output_related:
            producer, axis = vertex(entry, unit), entry["axis"]
            channels = decode_channel_runs(entry["channels"], entry["size"], unit.num_channels)
            layout = layouts.setdefault(producer, {})
            classes = layout.setdefault(axis, np.full(entry["size"], no_unit, dtype=np.int64))
            classes[channels >= 0] = offset + channels[channels >= 0]
            producers.append((producer, axis))
        if not producers:  # channels shown by no output (head dims): made where read back
            producers = [(vertex(entry, unit), INNER_AXIS) for entry in unit.input_related
                         if entry["kind"] == "inner"]
        if not producers:
            raise ChannelUnitError(f"unit {unit.name!r} lists no output_related channels")
        for entry in unit.input_related:
            consumer = vertex(entry, unit)
            key = (consumer, entry["input_index"], entry["axis"], entry["kind"])
            channels = decode_channel_runs(entry["channels"], entry["size"], unit.num_channels)
            site = sites.setdefault(key, ConsumerSite(consumer, key[1], key[2],
                                                      np.full(entry["size"], no_unit, dtype=np.int64), key[3]))
            if len(site.atoms) != entry["size"]:
                raise ChannelUnitError(f"unit {unit.name!r}: {entry['vertex']} input {key[1]} axis {key[2]} "
                                       f"has {entry['size']} positions here, {len(site.atoms)} in another unit")
            site.atoms[channels >= 0] = offset + channels[channels >= 0]
        classes = np.arange(offset, offset + unit.num_channels)
        groups.append(ChannelGroup(index, classes, producers, prunable=True))
    order = _vertex_order(dag)
    ordered_sites = sorted(sites.values(), key=lambda site: (order[site.vertex], site.input_index, site.axis))
    return ChannelAnalysis(dag, input_shape, head_pruning, groups, layouts, np.arange(no_unit + 1), ordered_sites,
                           [], 0, {})


# ------------------------------------------------------------------------------ the mutator
class ChannelMutator:
    """Finds a model's channel units and manages their choices, masks and export.

    Args:
        channel_unit_cfg: ``{"type": unit type (default "L1ChannelUnit"; see
            CHANNEL_UNIT_TYPES), "default_args": init args for every unit, "units": {unit name:
            {"init_args": ..., "channels": ..., "choice": ...}}}`` (every part optional; a
            template from :meth:`config_template` is accepted as it is).
        parse_cfg: ``{"type": "ChannelAnalysis" or "Config", "input_shape": [C, H, W]}``
            (default: ChannelAnalysis on a 3x224x224 input; see PARSE_TYPES), optionally with
            ``"head_pruning"`` and ``"exclude"`` (module paths or patterns to leave alone).

    Raises:
        ChannelUnitError: an unknown key, unit type or parse type (listing the closest names).
    """

    def __init__(self, channel_unit_cfg: Mapping | None = None, parse_cfg: Mapping | None = None):
        unit_cfg = dict(channel_unit_cfg or {})
        _check_keys(unit_cfg, ("type", "default_args", "units"), "channel_unit_cfg key")
        self.unit_type = unit_cfg.get("type", "L1ChannelUnit")
        if self.unit_type not in CHANNEL_UNIT_TYPES:
            raise ChannelUnitError(_closest(str(self.unit_type), sorted(CHANNEL_UNIT_TYPES), "unit type"))
        self.default_args = dict(unit_cfg.get("default_args") or {})
        self.units_cfg = copy.deepcopy(dict(unit_cfg.get("units") or {}))
        parse = dict(parse_cfg or {"type": TRACED})
        parse_type = parse.get("type", TRACED)
        if parse_type not in PARSE_TYPES:
            raise ChannelUnitError(_closest(str(parse_type), sorted(PARSE_TYPES), "parse_cfg type"))
        allowed = ("type", "input_shape", "head_pruning", "exclude") + (
            ("loss_calculator",) if parse_type not in (TRACED, FROM_CONFIG) else ())
        _check_keys(parse, allowed, "parse_cfg key")
        self.parse_mode = PARSE_TYPES[parse_type]
        self.input_shape = _shape_tuple(parse.get("input_shape") or DEFAULT_INPUT_SHAPE)
        self.head_pruning = parse.get("head_pruning", "dims")
        if self.head_pruning not in HEAD_PRUNING_MODES:
            raise ChannelUnitError(_closest(str(self.head_pruning), list(HEAD_PRUNING_MODES),
                                            "parse_cfg head_pruning"))
        self.exclude = check_exclude_patterns(parse.get("exclude"))
        _unit_class_args(self.unit_type, self.default_args, "default_args")
        self.units: list[ChannelUnit] = []
        self.masked_model: DagModule | None = None
        self.dag: DagModule | None = None
        self.example_inputs: Any = None
        self._analysis: ChannelAnalysis | None = None  # the analysis the units were built from
        self._traced: ChannelAnalysis | None = None  # the full analysis (export, FLOPs)
        self._traced_groups: dict[str, ChannelGroup] = {}

    @classmethod
    def from_config(cls, config: Mapping) -> "ChannelMutator":
        """A mutator from a :meth:`config_template` result (e.g. loaded from JSON)."""
        config = dict(config)
        kind = config.pop("type", "ChannelMutator")
        if kind not in MUTATOR_TYPES:
            raise ChannelUnitError(_closest(str(kind), MUTATOR_TYPES, "mutator type"))
        _check_keys(config, ("channel_unit_cfg", "parse_cfg"), "mutator config key")
        return cls(config.get("channel_unit_cfg"), config.get("parse_cfg"))

    # -- parsing ---------------------------------------------------------------------------------
    def prepare_from_supernet(self, model: nn.Module, example_inputs: Any = None) -> None:
        """Builds the units of ``model`` and its masked model (:attr:`masked_model`).

        ``model`` is a :class:`DagModule` (an ``nn.Module`` is converted first); the masked
        model shares its weights. Unit settings and choices of ``channel_unit_cfg["units"]`` are
        applied (choices rank channels by the current weights). ``example_inputs`` (a tensor, a
        tuple of positional values or a dict of keyword values: token IDs, masks...) replace
        ``parse_cfg["input_shape"]`` for the conversion and the analysis.

        Raises:
            ChannelUnitError: a configured unit does not exist, or its channels or width do
                not match the model.
        """
        if not isinstance(model, DagModule):
            model = build_from_unstructured_module(model, example_inputs=example_inputs)
        self.dag = model
        self.example_inputs = example_inputs
        if self.parse_mode == FROM_CONFIG:
            self.units = [self._unit_from_config(name, entry) for name, entry in self.units_cfg.items()]
            _exclude_configured_units(model, self.units, self.exclude)
            self._analysis = _analysis_from_units(model, self.input_shape, self.head_pruning, self.units)
            self._traced = None
        else:
            self._analysis = find_channel_groups(model, self.input_shape, self.head_pruning,
                                                 self.example_inputs)
            exclude_modules(self._analysis, self.exclude)
            self.units = self._units_from_analysis(self._analysis)
            self._set_traced(self._analysis)
        self._groups = dict(zip([unit.name for unit in self.mutable_units], self._analysis.prunable_groups))
        device = next(iter(model.parameters()), torch.zeros(0)).device
        self.masked_model = build_gated_dag(self._analysis, self.mutable_units).to(device)
        choices = {name: entry["choice"] for name, entry in self.units_cfg.items()
                   if isinstance(entry, Mapping) and "choice" in entry}
        self.set_choices({name: value for name, value in choices.items()
                          if self.unit(name).mutable or value != self.unit(name).full_choice})

    def _make_unit(self, name: str, num_channels: int, overrides: Mapping, mutable: bool,
                   reason: str) -> ChannelUnit:
        args = {**self.default_args, **dict(overrides)}
        cls = _unit_class_args(self.unit_type, args, f"unit {name!r} init_args")
        if args.pop("num_channels", num_channels) != num_channels:
            raise ChannelUnitError(f"unit {name!r} has {num_channels} channels in this model, the "
                                   f"config says {overrides.get('num_channels')}")
        return cls(name, num_channels, mutable=mutable, reason=reason, **args)

    def _units_from_analysis(self, analysis: ChannelAnalysis) -> list[ChannelUnit]:
        names = unit_names(analysis)
        unknown = [name for name in self.units_cfg if name not in names]
        if unknown:
            raise ChannelUnitError("channel_unit_cfg units: " + _closest(unknown[0], names, "unit"))
        units = []
        for name, group in zip(names, analysis.groups):
            entry = self.units_cfg.get(name) or {}
            _check_keys(entry, ("init_args", "channels", "choice", "mutable", "reason"), f"unit {name!r} key")
            unit = self._make_unit(name, group.size, entry.get("init_args") or {}, group.prunable,
                                   group.reason)
            unit.output_related, unit.input_related = _unit_channels(analysis, group)
            if "channels" in entry and entry["channels"] != unit.config_template(with_channels=True)["channels"]:
                raise ChannelUnitError(f"unit {name!r}: the config's channels differ from this model's; "
                                       "the template was made for another model")
            units.append(unit)
        return units

    def _unit_from_config(self, name: str, entry: Any) -> ChannelUnit:
        if not isinstance(entry, Mapping) or "channels" not in entry:
            raise ChannelUnitError(
                f"unit {name!r} has no 'channels': parse_cfg type 'Config' rebuilds units from a "
                "template made with config_template(with_channels=True) (dagprune units -c); or use "
                "parse_cfg type 'ChannelAnalysis'")
        _check_keys(entry, ("init_args", "channels", "choice", "mutable", "reason"), f"unit {name!r} key")
        channels = entry["channels"]
        init_args = dict(entry.get("init_args") or {})
        width = init_args.get("num_channels", _width_from_name(name))
        unit = self._make_unit(name, width, init_args, bool(entry.get("mutable", True)),
                               str(entry.get("reason", "")))
        try:
            unit.output_related = [dict(e) for e in channels["output_related"]]
            unit.input_related = [dict(e) for e in channels["input_related"]]
            for e in unit.output_related + unit.input_related:
                decode_channel_runs(e["channels"], e["size"], unit.num_channels)
        except (KeyError, TypeError, ValueError) as error:
            raise ChannelUnitError(f"unit {name!r}: malformed channels ({error})") from error
        return unit

    # -- units -------------------------------------------------------------------------------------
    def _require_prepared(self) -> None:
        if self.masked_model is None:
            raise ChannelUnitError("call prepare_from_supernet(model) first")

    @property
    def mutable_units(self) -> list[ChannelUnit]:
        return [unit for unit in self.units if unit.mutable]

    def unit(self, name: str) -> ChannelUnit:
        """The unit called ``name``.

        Raises:
            ChannelUnitError: no such unit; the message lists the closest names.
        """
        for unit in self.units:
            if unit.name == name:
                return unit
        self._require_prepared()
        raise ChannelUnitError(_closest(str(name), [unit.name for unit in self.units], "unit"))

    # -- templates ---------------------------------------------------------------------------------
    def config_template(self, only_mutable_units: bool = False, with_unit_init_args: bool = False,
                        with_channels: bool = False) -> dict:
        """The mutator's config (spec: mmrazor's ``ChannelMutator.config_template``).

        Args:
            only_mutable_units: leave out the units that cannot be pruned.
            with_unit_init_args: add each unit's ``init_args``.
            with_channels: add each unit's channel lists; ``parse_cfg`` then says ``"Config"``,
                so the template rebuilds the units without analysing the model again.
        """
        self._require_prepared()
        units = {unit.name: unit.config_template(with_unit_init_args, with_channels)
                 for unit in self.units if unit.mutable or not only_mutable_units}
        parse = {"type": FROM_CONFIG if with_channels else TRACED, "input_shape": _shape_list(self.input_shape)}
        if self.head_pruning != "dims":
            parse["head_pruning"] = self.head_pruning
        if self.exclude:
            parse["exclude"] = list(self.exclude)
        return {"type": "ChannelMutator",
                "channel_unit_cfg": {"type": self.unit_type, "default_args": dict(self.default_args),
                                     "units": units},
                "parse_cfg": parse}

    def choice_template(self) -> dict:
        """``{unit name: current choice}`` for every mutable unit (the shape of
        ``target_pruning_ratio``)."""
        self._require_prepared()
        return {unit.name: unit.current_choice for unit in self.mutable_units}

    @property
    def current_choices(self) -> dict:
        """What the masks keep now, per mutable unit, in each unit's choice mode."""
        return self.choice_template()

    def sample_choices(self, seed: int | None = None) -> dict:
        """A random achievable choice per mutable unit (uniform over the allowed kept counts)."""
        self._require_prepared()
        generator = np.random.default_rng(seed)
        choices = {}
        for unit in self.mutable_units:
            count = int(generator.choice(unit.allowed_counts()))
            choices[unit.name] = count / unit.num_channels if unit.choice_mode == "ratio" else count
        return choices

    def _keep_masks(self, choices: Mapping, scores: Mapping | None) -> dict[str, np.ndarray]:
        self._require_prepared()
        if not isinstance(choices, Mapping):
            raise ChannelUnitError(f"choices must be a dict of unit name -> choice, got {type(choices).__name__}")
        counts = {name: self.unit(name).kept_count(value) for name, value in choices.items()}
        for name in scores or {}:
            self.unit(name)
        masks = {}
        for name, count in counts.items():
            unit = self.unit(name)
            if not unit.mutable:
                continue
            if count == unit.num_channels:
                masks[name] = np.ones(count, dtype=bool)
                continue
            unit_scores = (scores or {}).get(name)
            if unit_scores is None:
                unit_scores = unit.channel_scores(self._analysis, self._groups[name])
            masks[name] = unit.keep_mask(count, unit_scores)
        return masks

    def channel_scores(self) -> dict[str, np.ndarray]:
        """``{unit name: importance of each channel}`` by each mutable unit's criterion, now."""
        self._require_prepared()
        return {unit.name: unit.channel_scores(self._analysis, self._groups[unit.name])
                for unit in self.mutable_units}

    def set_choices(self, choices: Mapping, scores: Mapping | None = None) -> None:
        """Sets the choices of some units (others keep theirs) and recomputes their masks.

        Args:
            choices: ``{unit name: choice}``; every name and value is checked before any unit
                changes.
            scores: optional ``{unit name: importance per channel}`` used instead of the unit's
                criterion (e.g. :meth:`TaylorImportance.importance` of the unit's group).

        Raises:
            ChannelUnitError: an unknown unit (the closest names are listed) or a choice out of
                range.
        """
        for name, keep in self._keep_masks(choices, scores).items():
            self.unit(name).set_keep_mask(keep)

    # -- export and FLOPs --------------------------------------------------------------------------
    def group_of(self, name: str) -> ChannelGroup:
        """The channel group of a mutable unit in :attr:`analysis` (e.g. for
        ``TaylorImportance(mutator.analysis).importance(group)``)."""
        unit = self.unit(name)
        if not unit.mutable:
            raise ChannelUnitError(f"unit {name!r} is not mutable ({unit.reason})")
        self.analysis  # noqa: B018 - runs (and checks) the analysis in parse mode 'Config'
        return self._traced_groups[name]

    @property
    def analysis(self) -> ChannelAnalysis:
        """The full channel analysis of the model (run once in parse mode 'Config', and
        checked against the units)."""
        self._require_prepared()
        if self._traced is None:
            traced = find_channel_groups(self.dag, self.input_shape, self.head_pruning, self.example_inputs)
            exclude_modules(traced, self.exclude)
            expected = {unit.name: unit for unit in self.mutable_units}
            for name, group in zip(unit_names(traced), traced.groups):
                unit = expected.pop(name, None)
                if unit is None:
                    continue
                outputs, inputs = _unit_channels(traced, group)
                if not group.prunable or group.size != unit.num_channels or \
                        (outputs, inputs) != (unit.output_related, unit.input_related):
                    raise ChannelUnitError(f"unit {name!r} of the config differs from the model's "
                                           "(channels, width or prunability); the template was made "
                                           "for another model")
            if expected:
                raise ChannelUnitError(f"the model has no unit {next(iter(expected))!r} of the "
                                       "config; the template was made for another model")
            self._set_traced(traced)
        return self._traced

    def _set_traced(self, traced: ChannelAnalysis) -> None:
        self._traced = traced
        self._traced_groups = dict(zip(unit_names(traced), traced.groups))

    def kept_classes(self, masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Boolean array over the analysis' channel classes: True where kept."""
        analysis = self.analysis
        keep = np.ones(len(analysis.atom_class), dtype=bool)
        for unit in self.mutable_units:
            mask = masks.get(unit.name) if masks is not None else None
            keep[self._traced_groups[unit.name].classes] = (unit.mask.cpu().numpy() > 0.5) if mask is None else mask
        return keep

    def flops_proportion(self, choices: Mapping | None = None, scores: Mapping | None = None) -> float:
        """FLOPs of the pruned model over the original's, now or for hypothetical ``choices``
        (ranked by ``scores`` or the current importance; the masks do not change)."""
        masks = None if choices is None else self._keep_masks(choices, scores)
        analysis = self.analysis
        return float(analysis.predicted_flops(self.kept_classes(masks)) / analysis.total_flops)

    def remove_channels(self) -> DagModule:
        """A slim DAG computing what :attr:`masked_model` computes in eval mode.

        Raises:
            ChannelUnitError: the masks would leave some tensor without any channel (a unit
                spread over several tensors, e.g. the halves of a channel split, kept channels
                of only one); choose another choice for that unit.
        """
        keep = self.kept_classes()
        analysis = self.analysis
        for vertex in analysis.dag.inner_vertices:
            for classes in iter_layout_atoms(analysis.layouts[vertex]):
                if len(classes) and not keep[classes].any():
                    names = [u.name for u in self.mutable_units
                             if np.isin(self._traced_groups[u.name].classes, classes).any()]
                    raise ChannelUnitError(
                        f"the masks leave {vertex.name!r} ({vertex.qualified_name}) without channels; "
                        f"units {names} keep channels only in other tensors; raise their choices")
        slim = remove_channels_from_dag(analysis, keep)
        slim.train(self.masked_model.training)
        device = next(iter(self.dag.parameters()), torch.zeros(0)).device
        return slim.to(device)


def _exclude_configured_units(dag: DagModule, units: list[ChannelUnit], exclude: Sequence[str]) -> None:
    """Makes the units whose channel lists name a module of ``exclude`` not mutable."""
    excluded = {vertex.name: pattern for vertex, pattern in excluded_vertices(dag, exclude).items()}
    for unit in units:
        entry = next((e for e in unit.output_related + unit.input_related if e.get("vertex") in excluded), None)
        if unit.mutable and entry is not None:
            unit.mutable = False
            unit.reason = f"excluded: {entry['name']} matches exclude pattern {excluded[entry['vertex']]!r}"


def _shape_tuple(shape: Sequence) -> tuple:
    """``(C, H, W)``, or one such tuple per input, from lists (JSON) or tuples."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) else _shape_tuple(d) for d in shape)


def _shape_list(shape: Sequence) -> list:
    return [int(d) if isinstance(d, (int, np.integer)) else _shape_list(d) for d in shape]


def _width_from_name(name: str) -> int:
    try:
        return int(name.rsplit(")_", 1)[1].split("_")[0])
    except (IndexError, ValueError):
        raise ChannelUnitError(f"unit {name!r}: give init_args num_channels (the name does not end "
                               "in a width)") from None


def _check_keys(mapping: Any, allowed: Sequence[str], what: str) -> None:
    if not isinstance(mapping, Mapping):
        raise ChannelUnitError(f"expected a dict for {what.rsplit(' key', 1)[0]}, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise ChannelUnitError(_closest(str(key), list(allowed), what))


def _unit_class_args(unit_type: str, args: Mapping, where: str) -> type[ChannelUnit]:
    """The unit class of ``unit_type``; checks that ``args`` are among its init args."""
    cls = CHANNEL_UNIT_TYPES[unit_type]
    accepted = [name for name in inspect.signature(cls.__init__).parameters
                if name not in ("self", "name", "mutable", "reason")]
    for key in args:
        if key not in accepted:
            raise ChannelUnitError(f"{where}: " + _closest(str(key), accepted, f"{unit_type} argument"))
    return cls
