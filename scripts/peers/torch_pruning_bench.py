"""Torch-Pruning's side of the benchmark: preparation time, exactness of removal, accuracy.

Runs only in Torch-Pruning's own environment (see ``environments.py``)::

    build/peers/torch-pruning/bin/python scripts/peers/torch_pruning_bench.py --section prepare \\
        --models resnet18 resnet50 --repeats 5 --out prepare.json
    build/peers/torch-pruning/bin/python scripts/peers/torch_pruning_bench.py --section exactness \\
        --out exactness.json
    build/peers/torch-pruning/bin/python scripts/peers/torch_pruning_bench.py --section accuracy \\
        --baseline-checkpoint out/prune/baseline.pt --targets 0.7 0.5 0.3 --seed 0 \\
        --methods magnitude group_norm taylor --work-dir out/tp --out accuracy.json

Sections:

``prepare``
    One thread; per model the median seconds of ``DependencyGraph().build_dependency`` (build)
    and of listing its pruning groups with ``get_all_groups`` (groups), classifier ignored, with
    Conv2d and Linear layers as group roots.
``exactness``
    In every group 10% of the channels (rounded down, at least one, seeded) are removed with the
    group's own ``prune()``; the output is compared with the masked model (see
    :func:`build_masked_model`).
``accuracy``
    The protocol of ``dagprune prune --method l1`` with Torch-Pruning's pruners: load a
    baseline; for each method (:data:`ACCURACY_METHODS`: L1 magnitude, group L2 norm, Taylor)
    and FLOPs target, train ``--steps`` steps at ``--lr`` while the pruner removes channels
    ``--prune-times`` times (its ``iterative_steps``, local pruning), every ``--step-epoch``
    steps, to the channel ratio that reaches the target (found by bisection with one-shot
    pruning, cached in ``--ratio-cache``); then ``--finetune-steps`` steps at ``--lr / 10``
    (same batches as ``dagprune prune``), evaluate, and save the pruned model as a dagprune DAG
    under ``--work-dir``.

Every model (or target) is measured on its own: a failure is recorded as
``"stage: Type: message"`` in its row's ``error`` and the next one runs. The JSON file
``{"tool", "version", "module_version", "timm", "torch", "section", "threads", "arguments",
"results"}`` is rewritten (atomically) after every row; ``version`` is the installed
distribution's (``torch_pruning.__version__``, kept as ``module_version``, can lag behind it).
Rows hold:

- prepare: ``model, input_size, build_s, groups_s, total_s`` (medians), ``first_total_s``,
  ``groups``, ``error``;
- exactness: ``model, weights, dtype, input_size, groups, skipped_groups, closed_channels,
  max_rel_diff, exact, masks_took_effect, mask_effect_rel_diff, flops_proportion,
  error``;
- accuracy: see :func:`empty_accuracy_row`.

FLOPs proportions are ``tp.utils.count_ops_and_params`` of the pruned over the original model
(``dagprune_flops_proportion``: the same ratio by ``dagprune.count_flops``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
# the peer environment sees the main environment's site-packages, but not its editable install
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dagprune_algorithms.app.models import create_timm_model  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "scripts"))  # the shared helpers
from benchmarks.common import (StageError, record_removal_exactness, stage,  # noqa: E402
                               unit_layer_scales, write_json)

MODELS = ["resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0",
          "convnext_tiny", "regnety_004", "densenet121", "deit_tiny_patch16_224",
          "vit_small_patch16_224", "fbnetv3_g", "repvit_m1"]
"""The twelve models of the comparison (timm names, ``pretrained=False``)."""

ROOT_MODULE_TYPES = [nn.Conv2d, nn.Linear]
"""Layers whose output channels root a pruning group (``get_all_groups``)."""

CLOSED_FRACTION = 0.1
"""Share of each group's channels removed in the exactness section."""

FLOPS_TOLERANCE = 0.01
"""The ratio search stops once the FLOPs proportion is in ``[target - this, target]``."""

MAX_PRUNING_RATIO = 0.95
"""Upper end of the ratio search: at higher ratios local pruning empties small layers."""

RATIO_SEARCH_STEPS = 20
"""Most pruning trials per FLOPs target."""

RATIO_RESOLUTION = 1e-4
"""The search also stops when the ratio is known to this precision (channel counts are whole)."""


def create_model(name: str, randomize: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """The timm model in eval mode (seed 0) and its default input shape without batch.

    With ``randomize``, :func:`randomize_constant_weights` is applied.
    """
    with stage("model"):
        torch.manual_seed(0)
        model = create_timm_model(name).eval()
        if randomize:
            randomize_constant_weights(model)
        return model, tuple(model.pretrained_cfg["input_size"])


@torch.no_grad()
def randomize_constant_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Draws random values for every constant-initialised tensor of ``model``, in place.

    timm zero-initialises the last norm of residual branches and starts layer scales at 1e-6,
    which hides a wrong removal inside a branch below any tolerance. Batch-norm statistics are
    drawn too; every parameter whose entries are all equal becomes random (biases around 0,
    other tensors in [0.5, 1.5]).
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.normal_(0.0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    for name, parameter in model.named_parameters():
        values = parameter.flatten()
        if values.numel() < 2 or not bool((values == values[0]).all()):
            continue
        if name.endswith("bias"):
            parameter.normal_(0.0, 0.1, generator=generator)
        else:
            parameter.uniform_(0.5, 1.5, generator=generator)
    return model


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier and all its submodules, the layers that pruning leaves alone.

    ``get_all_groups`` compares layers, not containers, so a classifier block is expanded the
    way ``BasePruner`` expands its ``ignored_layers``.
    """
    return list(model.get_classifier().modules())


# ----------------------------------------------------------------------------------- prepare
def measure_prepare(name: str, repeats: int) -> dict:
    """Dependency-graph and group-listing times of one model; see the module docstring."""
    row = {"model": name, "input_size": None, "build_s": None, "groups_s": None, "total_s": None,
           "first_total_s": None, "groups": None, "error": None}
    try:
        model, input_shape = create_model(name)
        row["input_size"] = list(input_shape)
        ignored = classifier_layers(model)
        example_inputs = torch.randn(1, *input_shape)
        builds, listings = [], []
        for _ in range(repeats):
            with stage("dependency graph"):
                started = time.perf_counter()
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
                builds.append(time.perf_counter() - started)
            with stage("groups"):
                started = time.perf_counter()
                groups = list(graph.get_all_groups(ignored_layers=ignored,
                                                   root_module_types=ROOT_MODULE_TYPES))
                listings.append(time.perf_counter() - started)
    except StageError as error:
        row["error"] = str(error)
        return row
    totals = [build + listing for build, listing in zip(builds, listings)]
    row.update(build_s=statistics.median(builds), groups_s=statistics.median(listings),
               total_s=statistics.median(totals), first_total_s=totals[0], groups=len(groups))
    return row


# --------------------------------------------------------------------------------- exactness
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


# ---------------------------------------------------------------------------------- accuracy
@dataclasses.dataclass(frozen=True)
class IterativeMethod:
    """A Torch-Pruning method of the accuracy section: its importance and pruner, as Torch-Pruning's
    own benchmark (``benchmarks/main.py``) pairs them; ``needs_gradients``: the importance reads
    the weights' ``.grad``."""

    importance: Callable[[], object]
    pruner: type
    needs_gradients: bool = False


ACCURACY_METHODS = {
    "magnitude": IterativeMethod(lambda: tp.importance.MagnitudeImportance(p=1), tp.pruner.BasePruner),
    "group_norm": IterativeMethod(lambda: tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GroupNormPruner),
    "taylor": IterativeMethod(lambda: tp.importance.TaylorImportance(), tp.pruner.BasePruner,
                              needs_gradients=True),
}
"""The accuracy section's methods: L1 magnitude, group L2 norm, first-order Taylor."""


def prune_by_magnitude(model: nn.Module, ratio: float, example_inputs: torch.Tensor) -> nn.Module:
    """One-shot local L1 magnitude pruning of ``model`` (in place) at channel ratio ``ratio``."""
    pruner = tp.pruner.BasePruner(model, example_inputs,
                                  importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, global_pruning=False, iterative_steps=1,
                                  ignored_layers=[model.get_classifier()])
    pruner.step()
    return model


@dataclasses.dataclass
class RatioSearch:
    """The pruned model closest to a FLOPs target from below, and how it was found."""

    ratio: float
    model: nn.Module
    flops_proportion: float
    trials: int


def search_pruning_ratio(baseline: nn.Module, target: float, example_inputs: torch.Tensor,
                         count_flops: Callable[[nn.Module], float] | None = None) -> RatioSearch:
    """Bisects the pruning ratio until the FLOPs proportion is in ``[target - 0.01, target]``.

    FLOPs are ``count_flops`` (default: ``tp.utils.count_ops_and_params``) of the pruned copy
    over the baseline's. The
    first trial is ``MAX_PRUNING_RATIO``, then the bisection of ``[0, MAX_PRUNING_RATIO]``; every
    trial prunes a fresh copy of ``baseline`` and a ratio whose pruning fails counts as too
    high. Without a hit within ``RATIO_SEARCH_STEPS`` trials (or once the ratio is bracketed to
    ``RATIO_RESOLUTION``) the closest proportion below the target is kept.

    Raises:
        ValueError: no trial reached the target.
    """
    if count_flops is None:
        count_flops = lambda model: tp.utils.count_ops_and_params(model, example_inputs)[0]  # noqa: E731
    original_flops = count_flops(baseline)
    low, high, ratio = 0.0, MAX_PRUNING_RATIO, MAX_PRUNING_RATIO
    best, failures, trials = None, [], 0
    for trials in range(1, RATIO_SEARCH_STEPS + 1):
        try:
            model = prune_by_magnitude(copy.deepcopy(baseline), ratio, example_inputs)
            proportion = count_flops(model) / original_flops
        except Exception as error:  # a ratio that breaks the model is beyond the usable range
            failures.append(f"ratio {ratio:.4f}: {type(error).__name__}: {error}")
            high = ratio
        else:
            if proportion > target:
                low = ratio
            else:
                best = RatioSearch(ratio, model, proportion, trials)
                high = ratio
                if target - proportion <= FLOPS_TOLERANCE:
                    break
        if best is not None and high - low < RATIO_RESOLUTION:
            break
        ratio = (low + high) / 2
    if best is None:
        raise ValueError(f"no pruning ratio up to {MAX_PRUNING_RATIO} reaches {target} of the "
                         f"FLOPs in {trials} trials" + (f"; {failures[0]}" if failures else ""))
    best.trials = trials
    return best


def cached_pruning_ratio(baseline: nn.Module, target: float, args, data: dict) -> dict:
    """``{"ratio", "flops_proportion", "trials"}`` of :func:`search_pruning_ratio`, read from
    ``--ratio-cache`` when it holds this model, input size and target.

    FLOPs are counted by ``dagprune.count_flops``, the counter the benchmark compares all tools
    with. Local pruning keeps ``int(channels * (1 - ratio))`` channels of every group whatever the
    importance or the number of iterative steps, so one ratio serves every method and seed.
    """
    key = f"{args.model}|{'x'.join(map(str, data['input_shape']))}|{target}|dagprune.count_flops"
    cache = {}
    if args.ratio_cache and Path(args.ratio_cache).exists():
        cache = json.loads(Path(args.ratio_cache).read_text())
    if key not in cache:
        search = search_pruning_ratio(baseline, target, data["example_inputs"],
                                      lambda model: _dagprune_flops(model, data["input_shape"]))
        cache[key] = {"ratio": search.ratio, "flops_proportion": search.flops_proportion,
                      "trials": search.trials}
        if args.ratio_cache:
            write_json(Path(args.ratio_cache), cache)
    return cache[key]


def _dagprune_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    import dagprune

    return dagprune.count_flops(dagprune.build_from_unstructured_module(model), input_shape).total


def empty_accuracy_row(method: str, target: float, seed: int) -> dict:
    """The fields of an accuracy row; accuracies are in percent, proportions are fractions,
    ``*_s_per_step`` are seconds per training step of the pruning and fine-tuning phases."""
    return {"method": method, "target": target, "seed": seed, "ratio": None, "prune_times": None,
            "step_epoch": None, "flops_proportion": None, "dagprune_flops_proportion": None, "params": None,
            "accuracy_before_finetune": None, "accuracy": None, "baseline_accuracy": None,
            "search_trials": None, "pruning_s_per_step": None, "finetune_s_per_step": None,
            "conversion_difference": None, "pruned_path": None, "seconds": None, "error": None}


def _train_step(model: nn.Module, optimizer, train: tuple, batch_size: int, seed: int, step: int,
                gradient_sums: dict | None = None) -> None:
    """One Adam step on cross-entropy over the batch ``dagprune prune`` uses at ``step``
    (``batch_indices``); with ``gradient_sums``, each parameter's gradient is added to its sum."""
    from dagprune_algorithms.app.training import batch_indices

    index = batch_indices(len(train[0]), batch_size, seed, step)
    model.train()
    loss = F.cross_entropy(model(train[0][index]), train[1][index])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if gradient_sums is not None:
        for parameter in model.parameters():
            if parameter.grad is not None:
                total = gradient_sums.get(parameter)
                gradient_sums[parameter] = parameter.grad.clone() if total is None else total + parameter.grad
    optimizer.step()


def prune_iteratively(baseline: nn.Module, method_name: str, ratio: float, args, data: dict,
                      row: dict) -> nn.Module:
    """A copy of ``baseline`` trained ``--steps`` steps at ``--lr`` while Torch-Pruning prunes it
    ``--prune-times`` times, every ``--step-epoch`` steps from step 0 (after that step's update;
    the schedule of ``dagprune prune --method l1``), to channel ratio ``ratio``; then
    ``--finetune-steps`` steps at ``--lr / 10``. Adam starts afresh after every prune (the pruned
    parameters are new tensors). The Taylor importance reads the gradients summed over the steps
    since the previous prune (step 0: its own batch)."""
    method = ACCURACY_METHODS[method_name]
    model = copy.deepcopy(baseline)
    with stage("pruner"):
        pruner = method.pruner(model, data["example_inputs"], importance=method.importance(),
                               pruning_ratio=ratio, global_pruning=False, iterative_steps=args.prune_times,
                               ignored_layers=[model.get_classifier()])
    gradient_sums = {} if method.needs_gradients else None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    started = time.perf_counter()
    with stage("pruning"):
        for step in range(args.steps):
            _train_step(model, optimizer, data["train"], args.batch_size, args.seed + 1, step, gradient_sums)
            if step % args.step_epoch == 0 and pruner.current_step < args.prune_times:
                if gradient_sums is not None:
                    for parameter in model.parameters():
                        parameter.grad = gradient_sums.get(parameter)
                    gradient_sums.clear()
                pruner.step()
                optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        if pruner.current_step < args.prune_times:
            raise ValueError(f"{pruner.current_step} of {args.prune_times} prunes done in {args.steps} steps")
    row["pruning_s_per_step"] = (time.perf_counter() - started) / max(args.steps, 1)
    with stage("evaluation"):
        from dagprune_algorithms.app.training import evaluate_accuracy

        row["accuracy_before_finetune"] = evaluate_accuracy(model, *data["val"])
    started = time.perf_counter()
    with stage("fine-tuning"):
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr / 10)
        for step in range(args.finetune_steps):
            _train_step(model, optimizer, data["train"], args.batch_size, args.seed + 2, step)
    row["finetune_s_per_step"] = (time.perf_counter() - started) / max(args.finetune_steps, 1)
    return model.eval()


def save_as_dag(model: nn.Module, input_shape: tuple[int, ...], folder: Path) -> float:
    """Saves ``model`` as a dagprune DAG in ``folder`` (loadable with ``dagprune.load_dag``, so
    every tool's pruned model is timed and evaluated alike); returns the largest relative
    difference between the DAG and the model."""
    import dagprune

    dag = dagprune.build_from_unstructured_module(model)
    difference = dagprune.compare_module_outputs(model, dag, (2, *input_shape), raise_error=False)
    dag.save(folder)
    return float(difference)


def accuracy_row(baseline: nn.Module, method: str, target: float, args, data: dict) -> dict:
    """One method at one target: ratio (cached search), iterative pruning with training,
    fine-tuning, evaluation; the pruned model is saved as a DAG under ``--work-dir``."""
    from dagprune_algorithms.app.training import evaluate_accuracy

    started = time.perf_counter()
    row = empty_accuracy_row(method, target, args.seed)
    row.update(baseline_accuracy=data["baseline_accuracy"], prune_times=args.prune_times,
               step_epoch=args.step_epoch)
    folder = Path(args.work_dir) / f"tp_{method}_{target}"
    try:
        with stage("ratio search"):
            found = cached_pruning_ratio(baseline, target, args, data)
        row.update(ratio=found["ratio"], search_trials=found["trials"])
        model = prune_iteratively(baseline, method, found["ratio"], args, data, row)
        with stage("flops"):
            row["flops_proportion"] = (tp.utils.count_ops_and_params(model, data["example_inputs"])[0]
                                       / data["tp_flops"])
            row["dagprune_flops_proportion"] = _dagprune_flops(model, data["input_shape"]) / data["dagprune_flops"]
            row["params"] = sum(p.numel() for p in model.parameters())
        with stage("evaluation"):
            row["accuracy"] = evaluate_accuracy(model, *data["val"])
        with stage("save"):
            row["conversion_difference"] = save_as_dag(model, data["input_shape"], folder / "pruned")
            row["pruned_path"] = str(folder / "pruned")
    except StageError as error:
        row["error"] = str(error)
    row["seconds"] = time.perf_counter() - started
    return row


def load_baseline(args) -> tuple[nn.Module, dict]:
    """The baseline model and what every target shares: data, example input, accuracy, FLOPs."""
    from dagprune_algorithms.app.data import load_dataset
    from dagprune_algorithms.app.training import evaluate_accuracy, load_checkpoint, materialize

    with stage("data"):
        split = load_dataset(args.data_dir, image_size=args.image_size, seed=args.seed,
                             limit_val=args.limit_val)
        train, val = materialize(split.train), materialize(split.val)
        input_shape = tuple(split.input_shape)
    with stage("baseline"):
        torch.manual_seed(args.seed)
        model = create_timm_model(args.model, input_shape, num_classes=split.num_classes)
        state = load_checkpoint(args.baseline_checkpoint)
        model.load_state_dict(state.get("model", state))
        model.eval()
        baseline_accuracy = evaluate_accuracy(model, *val)
    example_inputs = torch.zeros(1, *input_shape)
    with stage("flops"):
        tp_flops = tp.utils.count_ops_and_params(model, example_inputs)[0]
        dagprune_flops = _dagprune_flops(model, input_shape)
    return model, {"train": train, "val": val, "input_shape": input_shape, "example_inputs": example_inputs,
                   "baseline_accuracy": baseline_accuracy, "tp_flops": tp_flops,
                   "dagprune_flops": dagprune_flops}


ROW_ARGUMENTS = ("model", "image_size", "data_dir", "baseline_checkpoint", "seed", "steps", "finetune_steps",
                 "batch_size", "lr", "prune_times", "step_epoch", "limit_val")
"""The arguments a saved row depends on: a row saved with others is computed again."""


def accuracy_rows(args):
    """Yields the accuracy section's rows, one per method and target; a row already saved in
    ``--work-dir`` by a run with the same arguments is read back instead of computed again."""
    settings = {name: getattr(args, name) for name in ROW_ARGUMENTS}
    pending = []
    for method in args.methods:
        for target in args.targets:
            saved = Path(args.work_dir) / f"tp_{method}_{target}" / "row.json"
            if saved.exists():
                stored = json.loads(saved.read_text())
                if stored.get("settings") == settings and not stored["row"].get("error"):
                    yield stored["row"]
                    continue
            pending.append((method, target, saved))
    if not pending:
        return
    try:
        baseline, data = load_baseline(args)
    except StageError as error:
        for method, target, _ in pending:
            yield {**empty_accuracy_row(method, target, args.seed), "error": str(error)}
        return
    for method, target, saved in pending:
        row = accuracy_row(baseline, method, target, args, data)
        write_json(saved, {"settings": settings, "row": row})
        yield row


# ------------------------------------------------------------------------------------ output
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", required=True, choices=["prepare", "exactness", "accuracy"])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="MODEL",
                        help="timm models (prepare, exactness)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (prepare)")
    parser.add_argument("--randomize-constant-weights", action="store_true",
                        help="exactness: random values for timm's constant-initialised tensors "
                             "(zero-initialised branch norms, layer scales), see "
                             "randomize_constant_weights")
    parser.add_argument("--float64", action="store_true",
                        help="exactness: compute in float64; random weights can make a model so "
                             "ill-conditioned that float32 rounding alone exceeds the tolerance")
    parser.add_argument("--model", default="test_resnet", help="timm model (accuracy)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--data-dir", default=None,
                        help="accuracy data as `dagprune prune --data-dir` reads it (default: digits)")
    parser.add_argument("--baseline-checkpoint", help="baseline.pt of a `dagprune prune` run")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3],
                        help="FLOPs targets as fractions of the baseline's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200, help="training steps at --lr")
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps at --lr / 10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit-val", type=int, default=None,
                        help="accuracy: evaluate on this many validation images (as `dagprune prune`)")
    parser.add_argument("--methods", nargs="+", choices=sorted(ACCURACY_METHODS),
                        default=sorted(ACCURACY_METHODS), help="accuracy: Torch-Pruning importances")
    parser.add_argument("--prune-times", type=int, default=None,
                        help="accuracy: prunes during --steps (default: as `dagprune prune --method l1`)")
    parser.add_argument("--step-epoch", type=int, default=None,
                        help="accuracy: steps between prunes (default: as `dagprune prune --method l1`)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="accuracy: where each method and target keeps its row and pruned model "
                             "(a row saved there with the same arguments is reused)")
    parser.add_argument("--ratio-cache", type=Path, default=None,
                        help="accuracy: JSON file of the pruning ratio found for each FLOPs target")
    args = parser.parse_args(argv)
    if args.section == "accuracy":
        if not args.baseline_checkpoint or not args.work_dir:
            parser.error("--section accuracy needs --baseline-checkpoint and --work-dir")
        from dagprune_algorithms.app.iterative_job import iterative_schedule

        args.prune_times, args.step_epoch = iterative_schedule(args.steps, args.prune_times, args.step_epoch)

    if args.section == "prepare":
        torch.set_num_threads(1)
        rows = (measure_prepare(name, args.repeats) for name in args.models)
    elif args.section == "exactness":
        dtype = torch.float64 if args.float64 else torch.float32
        rows = (measure_exactness(name, args.randomize_constant_weights, dtype)
                for name in args.models)
    else:
        rows = accuracy_rows(args)
    report = {"tool": "Torch-Pruning", "version": version("torch-pruning"),
              "module_version": tp.__version__, "timm": timm.__version__,
              "torch": torch.__version__, "section": args.section,
              "threads": torch.get_num_threads(),
              "arguments": {key: str(value) if isinstance(value, Path) else value
                            for key, value in vars(args).items()},
              "results": []}
    write_json(args.out, report)
    for row in rows:
        report["results"].append(row)
        write_json(args.out, report)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
