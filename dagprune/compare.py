"""Checking that two modules compute the same thing."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from dagprune.training_mode import evaluation_mode

__all__ = ["compare_module_outputs", "max_relative_difference", "make_weights_informative",
           "randomize_normalization_layers"]


def _flatten_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in _flatten_outputs(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flatten_outputs(item)]
    return []


def max_relative_difference(first: Any, second: Any) -> float:
    """Largest ``|a - b|`` over all output tensors, relative to the largest ``|a|`` (at least 1e-12)."""
    first_tensors, second_tensors = _flatten_outputs(first), _flatten_outputs(second)
    if len(first_tensors) != len(second_tensors):
        return float("inf")
    worst = 0.0
    for a, b in zip(first_tensors, second_tensors):
        if a.shape != b.shape:
            return float("inf")
        a, b = a.detach().double(), b.detach().double()
        scale = max(a.abs().max().item() if a.numel() else 0.0, 1e-12)
        worst = max(worst, (a - b).abs().max().item() / scale if a.numel() else 0.0)
    return worst


def compare_module_outputs(first_module: nn.Module, second_module: nn.Module,
                           input_shape: Sequence[int] | Sequence[Sequence[int]],
                           atol: float = 1e-5, seed: int = 0, raise_error: bool = True,
                           device: str | torch.device | None = None) -> float:
    """Runs both modules in eval mode on the same random input and compares their outputs.

    Args:
        first_module, second_module: the modules to compare (e.g. a model and its DAG).
        input_shape: the input shape with batch, e.g. ``(8, 3, 224, 224)``; a sequence of
            shapes for models with several inputs.
        atol: the largest allowed difference relative to the output scale.
        seed: seed of the random input.
        raise_error: raise ``AssertionError`` when the difference exceeds ``atol``.
        device: where to run (defaults to the first module's parameters' device).

    Returns:
        The largest difference relative to the output scale.

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.GELU())
    >>> import dagprune
    >>> compare_module_outputs(model, dagprune.build_from_unstructured_module(model), (2, 4))
    0.0
    """
    shapes = [input_shape] if isinstance(input_shape[0], int) else list(input_shape)
    if device is None:
        parameter = next(iter(first_module.parameters()), None)
        device = parameter.device if parameter is not None else "cpu"
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*shape, generator=generator).to(device) for shape in shapes]
    with evaluation_mode(first_module, second_module), torch.no_grad():
        difference = max_relative_difference(first_module(*inputs), second_module(*inputs))
    if raise_error and not difference <= atol:
        raise AssertionError(f"outputs differ: max relative difference {difference:.3g} > {atol:g}")
    return difference


@torch.no_grad()
def randomize_normalization_layers(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Gives every norm layer non-trivial statistics and affine parameters.

    BatchNorm running means and variances and the weights and biases of BatchNorm, GroupNorm
    and LayerNorm are drawn at random, so that folding or slicing them wrongly changes the
    model's output. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats \
                and module.running_mean is not None:
            module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.empty(module.running_var.shape).uniform_(0.5, 2.0, generator=generator))
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.empty(module.weight.shape).uniform_(0.5, 1.5, generator=generator))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


@torch.no_grad()
def make_weights_informative(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replaces constant-initialised parameters and norm statistics by random values, so that
    an equivalence check can see every branch.

    timm initialises layer scales to 1e-6 or 1e-5, the last batch-norm weight of residual
    branches and GRN parameters to zero, NFNets' last gains to zero; a branch scaled that way
    hides conversion and removal errors below any tolerance. Norm statistics and affine
    parameters become random (:func:`randomize_normalization_layers`), other constant tensors
    uniform in [0.5, 1.5], constant biases small random values. Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_normalization_layers(model, generator)
    for name, parameter in model.named_parameters():
        flat = parameter.detach().flatten()
        if flat.numel() < 2 or not bool((flat == flat[0]).all()):
            continue
        if name.endswith("bias") or name.endswith("beta"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        else:
            parameter.copy_(torch.empty(parameter.shape).uniform_(0.5, 1.5, generator=generator))
    return model
