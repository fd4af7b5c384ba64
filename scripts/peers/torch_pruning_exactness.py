"""The exactness section of the Torch-Pruning benchmark: channels removed by each group's
``prune()`` against the masked model (see the module docstring of ``torch_pruning_bench.py``).

Imported by ``torch_pruning_bench.py``, which puts the repository and ``scripts/`` on
``sys.path`` first (the peer environment sees the main environment's site-packages, but
not its editable install).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from benchmarks.common import StageError, record_removal_exactness, stage, unit_layer_scales
from torch_pruning_models import ROOT_MODULE_TYPES, classifier_layers, create_model

CLOSED_FRACTION = 0.1
"""Share of each group's channels removed in the exactness section."""


@dataclasses.dataclass(frozen=True)
class ChannelAxis:
    """One prunable axis of a layer or parameter of the model, by qualified name.

    ``side`` is ``"out"`` or ``"in"``; layers whose pruner uses one function for both (batch
    and layer norms, depthwise convs, parameters) have only ``"out"``. ``dim`` is the pruned
    dimension of an unwrapped parameter.
    """

    name: str
    pruner: type
    side: str
    dim: int | None = None


class RemovedChannels:
    """Which original channels Torch-Pruning removes, axis by axis.

    A pruning function is given positions among the channels left at that moment; each axis
    keeps the original numbers of its surviving channels to translate them back.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.original_sizes: dict[ChannelAxis, int] = {}
        self.survivors: dict[ChannelAxis, list[int]] = {}
        self._module_names = {id(module): name for name, module in model.named_modules()}
        self._parameter_names: dict[int, str] = {}

    def record(self, group) -> None:
        """Notes the channels every dependency of ``group`` is about to remove."""
        for dependency, positions in group:
            axis = self._axis(dependency)
            if axis is None:
                continue
            if axis not in self.survivors:
                self.original_sizes[axis] = self._current_size(dependency)
                self.survivors[axis] = list(range(self.original_sizes[axis]))
            alive = self.survivors[axis]
            removed = {int(position) for position in positions}
            if removed and not 0 <= min(removed) <= max(removed) < len(alive):
                raise IndexError(f"{axis.name} ({axis.side} channels): positions "
                                 f"{min(removed)}..{max(removed)} of {len(alive)} channels")
            self.survivors[axis] = [channel for position, channel in enumerate(alive)
                                    if position not in removed]

    def removed(self) -> dict[ChannelAxis, list[int]]:
        """The original channels removed from each axis that lost any."""
        return {axis: sorted(set(range(self.original_sizes[axis])) - set(alive))
                for axis, alive in self.survivors.items()
                if len(alive) < self.original_sizes[axis]}

    def _axis(self, dependency) -> ChannelAxis | None:
        handler = dependency.handler
        pruner = handler.__self__
        if isinstance(pruner, tp.ops.DummyPruner):  # concat, split, reshape... bookkeeping
            return None
        target = dependency.target.module
        if isinstance(target, nn.Parameter):
            return ChannelAxis(self._parameter_name(target), type(pruner), "out",
                               dependency.target.pruning_dim % target.dim())
        side = "out" if handler == pruner.prune_out_channels else "in"
        return ChannelAxis(self._module_names[id(target)], type(pruner), side)

    def _parameter_name(self, parameter: nn.Parameter) -> str:
        if id(parameter) not in self._parameter_names:
            # pruning replaces a parameter by a new object
            self._parameter_names = {id(p): name for name, p in self.model.named_parameters()}
        return self._parameter_names[id(parameter)]

    @staticmethod
    def _current_size(dependency) -> int:
        target = dependency.target.module
        if isinstance(target, nn.Parameter):
            return target.shape[dependency.target.pruning_dim]
        pruner = dependency.handler.__self__
        if dependency.handler == pruner.prune_out_channels:
            return pruner.get_out_channels(target)
        return pruner.get_in_channels(target)


Masker = Callable[[nn.Module, torch.Tensor, ChannelAxis], "nn.Module | None"]
_MASKERS: dict[type, Masker] = {}


def register_masker(*pruner_types: type) -> Callable[[Masker], Masker]:
    """Registers how the masked model masks channels removed by these Torch-Pruning pruners.

    A masker edits the layer (or parameter) of the masked model in place, or returns a module
    that replaces the layer.
    """
    def register(masker: Masker) -> Masker:
        for pruner_type in pruner_types:
            _MASKERS[pruner_type] = masker
        return masker
    return register


def masker_for(pruner_type: type) -> Masker:
    """The masker registered for ``pruner_type`` or its nearest base class."""
    for base in pruner_type.__mro__:
        if base in _MASKERS:
            return _MASKERS[base]
    raise NotImplementedError(f"removal by {pruner_type.__name__} has no masked equivalent here")


def _zero_output_channels(layer: nn.Module, channels: torch.Tensor) -> None:
    layer.weight[channels] = 0
    if layer.bias is not None:
        layer.bias[channels] = 0


@register_masker(tp.pruner.function.ConvPruner)
def _mask_conv(conv: nn.Module, channels: torch.Tensor, axis: ChannelAxis) -> None:
    if conv.transposed:
        raise NotImplementedError(f"{axis.name}: transposed convolutions are not masked")
    if axis.side == "out":
        _zero_output_channels(conv, channels)
        return
    inputs_per_group = conv.in_channels // conv.groups
    outputs_per_group = conv.out_channels // conv.groups
    for channel in channels.tolist():
        group = channel // inputs_per_group
        conv.weight[group * outputs_per_group:(group + 1) * outputs_per_group,
                    channel % inputs_per_group] = 0


@register_masker(tp.pruner.function.DepthwiseConvPruner)
def _mask_depthwise_conv(conv: nn.Module, channels: torch.Tensor, axis: ChannelAxis) -> None:
    _zero_output_channels(conv, channels)


@register_masker(tp.pruner.function.LinearPruner)
def _mask_linear(linear: nn.Linear, channels: torch.Tensor, axis: ChannelAxis) -> None:
    if axis.side == "out":
        _zero_output_channels(linear, channels)
    else:
        linear.weight[:, channels] = 0


@register_masker(tp.pruner.function.BatchnormPruner)
def _mask_batch_norm(norm: nn.Module, channels: torch.Tensor, axis: ChannelAxis) -> None:
    if norm.affine:
        _zero_output_channels(norm, channels)


@register_masker(tp.pruner.function.PReLUPruner)
def _mask_channelwise(layer: nn.Module, channels: torch.Tensor, axis: ChannelAxis) -> None:
    """Channel-wise layers need nothing: their removed channels are masked downstream."""


@register_masker(tp.pruner.function.ParameterPruner)
def _mask_parameter(parameter: nn.Parameter, channels: torch.Tensor, axis: ChannelAxis) -> None:
    parameter.index_fill_(axis.dim, channels, 0)


class KeptChannelLayerNorm(nn.Module):
    """A layer norm whose statistics cover the kept channels only; removed channels give zero.

    This is what the norm computes once the other channels are removed.
    """

    def __init__(self, norm: nn.LayerNorm, kept: torch.Tensor, channel_axis: int):
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise NotImplementedError(f"layer norm over {len(norm.normalized_shape)} axes")
        self.norm = norm
        self.channel_axis = channel_axis
        self.register_buffer("kept", kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(self.channel_axis, -1)
        weight = None if self.norm.weight is None else self.norm.weight[self.kept]
        bias = None if self.norm.bias is None else self.norm.bias[self.kept]
        output = x.new_zeros(x.shape)
        output[..., self.kept] = F.layer_norm(x[..., self.kept], (len(self.kept),), weight, bias,
                                              self.norm.eps)
        return output.movedim(-1, self.channel_axis)


def _layer_norm_channel_axis(norm: nn.LayerNorm) -> int:
    if isinstance(norm, timm.layers.LayerNorm2d):
        return 1
    if type(norm).forward in (nn.LayerNorm.forward, timm.layers.LayerNorm.forward):
        return -1
    raise NotImplementedError(f"{type(norm).__name__}: unknown channel axis of this layer norm")


@register_masker(tp.pruner.function.LayernormPruner)
def _mask_layer_norm(norm: nn.LayerNorm, channels: torch.Tensor, axis: ChannelAxis) -> nn.Module:
    kept = torch.as_tensor(sorted(set(range(norm.normalized_shape[0])) - set(channels.tolist())))
    return KeptChannelLayerNorm(norm, kept, _layer_norm_channel_axis(norm))


@torch.no_grad()
def build_masked_model(model: nn.Module, removed: dict[ChannelAxis, list[int]]) -> nn.Module:
    """The reference of the exactness check: ``model`` with the removed channels masked.

    A copy of the original model in which, for every layer or parameter of every pruned group,
    at the channels Torch-Pruning removes there (numbered as in the original model):

    - conv / linear output channels (depthwise convs included): weight rows and biases are 0;
    - conv / linear input channels: the weights reading them are 0 (a grouped conv reads input
      channel ``i`` in group ``i // (in / groups)``, weight column ``i % (in / groups)``, for
      that group's output channels only);
    - batch norm channels: affine weight and bias are 0, so the channel outputs 0;
    - layer norm channels: the norm becomes a :class:`KeptChannelLayerNorm`, whose mean and
      variance run over the kept channels only (removed channels output 0);
    - unwrapped parameters (position embeddings, class tokens, layer scales): the slice along
      the pruned dimension is 0;
    - PReLU and the concat / split / reshape / element-wise nodes of the graph: nothing.

    Every producer of a removed channel emits 0, every linear reader ignores it and every
    normalisation leaves it out of its statistics, so a correct removal computes exactly this
    model (up to float rounding). Removal by other pruners (group norm, embedding,
    ``nn.MultiheadAttention``, LSTM, transposed conv) raises ``NotImplementedError``.

    Args:
        model: the original model (left unchanged).
        removed: :meth:`RemovedChannels.removed` of the pruned copy.

    Returns:
        The masked copy.
    """
    masked = copy.deepcopy(model)
    for axis, channels in removed.items():
        masker = masker_for(axis.pruner)
        index = torch.as_tensor(channels, dtype=torch.long)
        if axis.dim is not None:
            masker(masked.get_parameter(axis.name), index, axis)
            continue
        replacement = masker(masked.get_submodule(axis.name), index, axis)
        if replacement is not None:
            parent_name, _, child_name = axis.name.rpartition(".")
            setattr(masked.get_submodule(parent_name), child_name, replacement)
    return masked


@dataclasses.dataclass
class GroupRemoval:
    """Progress of :func:`remove_channels_of_every_group`, kept when it fails part way."""

    removed: RemovedChannels
    groups: int = 0
    skipped_groups: int = 0
    closed_channels: int = 0


def remove_channels_of_every_group(model: nn.Module, input_shape: tuple[int, ...],
                                   removal: GroupRemoval, seed: int = 0) -> None:
    """Removes ``CLOSED_FRACTION`` of the channels of every group of ``model``, in place.

    The groups are those of ``get_all_groups`` (classifier ignored), handled in their order; in
    each, ``max(1, int(size * CLOSED_FRACTION))`` root channels are drawn without replacement
    from one NumPy generator seeded with ``seed``. The group is fetched again for these channels
    with ``get_pruning_group``, checked with ``check_pruning_group`` (a group that would empty
    a layer is skipped) and removed with its ``prune()``. ``removal`` records what was done.

    Raises:
        StageError: naming the group (by its root layer) whose removal failed.
    """
    dtype = next(model.parameters()).dtype
    with stage("dependency graph"):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.randn(1, *input_shape, dtype=dtype))
    generator = np.random.default_rng(seed)
    layer_names = {module: name for name, module in model.named_modules()}
    groups = graph.get_all_groups(ignored_layers=classifier_layers(model),
                                  root_module_types=ROOT_MODULE_TYPES)
    with stage("pruning"):
        for position, group in enumerate(groups):
            root = group[0].dep
            with stage(f"pruning group {position} (root {layer_names.get(root.target.module)})"):
                size = len(group[0].idxs)
                channels = np.sort(generator.choice(size, replace=False,
                                                    size=max(1, int(size * CLOSED_FRACTION))))
                pruning_group = graph.get_pruning_group(root.target.module, root.handler,
                                                        channels.tolist())
                if not graph.check_pruning_group(pruning_group):
                    removal.skipped_groups += 1
                    continue
                removal.removed.record(pruning_group)
                pruning_group.prune()
                removal.groups += 1
                removal.closed_channels += len(channels)


def compare_removal_with_masking(model: nn.Module, input_shape: tuple[int, ...], row: dict) -> None:
    """Fills ``row`` with the exactness of removing channels from a copy of ``model``.

    ``model`` (eval mode) is left unchanged; the pruned copy's output on a fixed batch of 2
    (``torch.Generator`` seed 0, in the model's dtype) is compared with
    :func:`build_masked_model`'s.

    Raises:
        StageError: a stage failed; the fields filled so far stay in ``row``.
    """
    dtype = next(model.parameters()).dtype
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0)).to(dtype)
    example_inputs = torch.zeros(1, *input_shape, dtype=dtype)
    with stage("original forward"), torch.no_grad():
        original_output = model(x)
    with stage("flops"):
        original_flops = tp.utils.count_ops_and_params(model, example_inputs)[0]
    pruned = copy.deepcopy(model)
    removal = GroupRemoval(RemovedChannels(pruned))
    try:
        remove_channels_of_every_group(pruned, input_shape, removal)
    finally:
        row.update(groups=removal.groups, skipped_groups=removal.skipped_groups,
                   closed_channels=removal.closed_channels)
    with stage("masked model"):
        masked = build_masked_model(model, removal.removed.removed())
        with torch.no_grad():
            masked_output = masked(x)
    with stage("pruned forward"), torch.no_grad():
        pruned_output = pruned(x)
    with stage("compare"):
        record_removal_exactness(row, original_output, masked_output, pruned_output)
    with stage("flops"):
        row["flops_proportion"] = (tp.utils.count_ops_and_params(pruned, example_inputs)[0]
                                   / original_flops)


def measure_exactness(name: str, randomize: bool = False,
                      dtype: torch.dtype = torch.float32) -> dict:
    """Exactness of removal for one timm model; see :func:`compare_removal_with_masking`.

    Layer scales are set to 1 first (:func:`unit_layer_scales`, as for the other tools);
    ``exact`` needs ``masks_took_effect`` as well, so a no-op removal cannot pass.
    """
    row = {"model": name, "weights": "randomized" if randomize else "timm",
           "dtype": str(dtype).removeprefix("torch."), "input_size": None, "groups": None,
           "skipped_groups": None, "closed_channels": None, "max_rel_diff": None, "exact": False,
           "masks_took_effect": None, "mask_effect_rel_diff": None,
           "flops_proportion": None, "error": None}
    try:
        model, input_shape = create_model(name, randomize)
        unit_layer_scales(model)
        model.to(dtype)
        row["input_size"] = list(input_shape)
        compare_removal_with_masking(model, input_shape, row)
    except StageError as error:
        row["error"] = str(error)
    return row

