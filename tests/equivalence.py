"""Assertions that two models compute the same thing, written independently of dagprune."""

from __future__ import annotations

from typing import Any, List

import torch

RELATIVE_TOLERANCE = 1e-5
"""Conversion is exact when max |a - b| <= RELATIVE_TOLERANCE * max |a| for every output."""


def flatten_outputs(value: Any) -> List[torch.Tensor]:
    """The tensors of a (nested tuple / list / dict) model output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in flatten_outputs(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten_outputs(item)]
    raise AssertionError(f"unexpected output type {type(value).__name__}")


def output_structure(value: Any) -> Any:
    """The container structure of an output with tensors replaced by their shapes."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return {key: output_structure(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [output_structure(item) for item in value]
    return value


def assert_outputs_close(expected: Any, actual: Any, tolerance: float = RELATIVE_TOLERANCE) -> None:
    """Same structure and shapes, and every tensor within ``tolerance`` of the output scale."""
    assert output_structure(actual) == output_structure(expected)
    for index, (a, b) in enumerate(zip(flatten_outputs(expected), flatten_outputs(actual))):
        assert torch.isfinite(a).all(), f"output {index} of the reference is not finite"
        if not a.numel():
            continue
        scale = a.detach().double().abs().max().item()
        difference = (a.detach().double() - b.detach().double()).abs().max().item()
        assert difference <= tolerance * max(scale, 1e-12), (
            f"output {index}: max |difference| {difference:.3g} > {tolerance:g} x scale "
            f"{scale:.3g}")


def assert_outputs_equal(expected: Any, actual: Any) -> None:
    """Same structure, dtypes and bit-identical tensors."""
    assert output_structure(actual) == output_structure(expected)
    for index, (a, b) in enumerate(zip(flatten_outputs(expected), flatten_outputs(actual))):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {index} differs"
