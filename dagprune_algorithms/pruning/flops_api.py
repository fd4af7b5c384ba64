"""FLOPs in torch-dag's units: normalized FLOPs (kmapp) and absolute counts."""

from __future__ import annotations

from typing import Any, Sequence

from dagprune import DagModule, count_flops
from dagprune.example_inputs import positions_per_sample
from dagprune.shape_prop import resolve_inputs

__all__ = ["compute_flops", "compute_normalized_flops"]


def compute_flops(model: DagModule, input_shape_without_batch: Sequence | None = None,
                  example_inputs: Any = None) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass per sample: batch 1 of the input shape
    (one shape, or one per input), or ``example_inputs`` divided by their batch size."""
    inputs = resolve_inputs(model, input_shape_without_batch, example_inputs)
    return count_flops(model, example_inputs=inputs).total // inputs.first_tensor().shape[0]


def compute_normalized_flops(model: DagModule, input_shape_without_batch: Sequence | None = None,
                             example_inputs: Any = None) -> float:
    """kmapp: FLOPs per sample / (H * W * 1000) for a first input ``(C, H, W)``; for other
    first inputs the product of its sizes after the first (token IDs ``(L,)``: FLOPs / 1000).

    >>> import dagprune
    >>> from torch import nn
    >>> dag = dagprune.build_from_unstructured_module(nn.Conv2d(3, 8, 1))
    >>> compute_normalized_flops(dag, (3, 10, 10))
    0.048
    """
    inputs = resolve_inputs(model, input_shape_without_batch, example_inputs)
    return compute_flops(model, example_inputs=inputs) / (positions_per_sample(inputs) * 1000)
