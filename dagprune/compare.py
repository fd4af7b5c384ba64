"""Checking that two modules compute the same thing."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from dagprune.training_mode import evaluation_mode

__all__ = ["compare_module_outputs", "max_relative_difference"]


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
