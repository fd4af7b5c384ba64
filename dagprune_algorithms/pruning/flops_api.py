"""FLOPs in torch-dag's units: normalized FLOPs (kmapp) and absolute counts."""

from __future__ import annotations

import math
from typing import Sequence

from dagprune import DagModule, count_flops

__all__ = ["compute_flops", "compute_normalized_flops"]


def compute_flops(model: DagModule, input_shape_without_batch: Sequence[int]) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass with batch size 1."""
    return count_flops(model, input_shape_without_batch).total


def compute_normalized_flops(model: DagModule, input_shape_without_batch: Sequence[int]) -> float:
    """kmapp: FLOPs / (H * W * 1000) for an input ``(C, H, W)`` (or ``(..., L)``: FLOPs / (L * 1000)).

    >>> import dagprune
    >>> from torch import nn
    >>> dag = dagprune.build_from_unstructured_module(nn.Conv2d(3, 8, 1))
    >>> compute_normalized_flops(dag, (3, 10, 10))
    0.048
    """
    spatial = math.prod(input_shape_without_batch[1:]) if len(input_shape_without_batch) > 1 else 1
    return compute_flops(model, input_shape_without_batch) / (spatial * 1000)
