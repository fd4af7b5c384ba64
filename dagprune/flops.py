"""FLOPs of a DAG, counted per vertex by handlers registered per op.

FLOPs here are ``2 x multiply-adds`` of the ops that dominate compute: convolutions (incl.
transposed and grouped), linear layers, matrix products (``matmul``, ``bmm``, ``@``) and
scaled dot-product attention. Normalisation, activations, elementwise arithmetic and pooling
count zero. fvcore's ``FlopCountAnalysis`` counts one multiply-add as one FLOP for the same ops,
so on these ops ``count_flops == 2 x fvcore``; fvcore does not count the fused
``scaled_dot_product_attention`` op, so models using it differ by their attention part.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dagprune.dag_module import DagModule, InnerVertex
from dagprune.ops.base import handler_for
from dagprune.ops.linear_algebra import AttentionOp, MatmulOp
from dagprune.shape_prop import example_inputs, propagate_values

__all__ = ["register_flops", "count_flops", "FlopsReport", "vertex_flops"]

FlopsHandler = Callable[[nn.Module, list, Any], int]
_HANDLERS: dict[Any, FlopsHandler] = {}


def register_flops(*keys):
    """Registers ``handler(module, input_values, output_value) -> FLOPs`` for module types or
    function names (``"torch.matmul"``). Values are the tensors the vertex saw."""
    def decorator(handler: FlopsHandler) -> FlopsHandler:
        for key in keys:
            _HANDLERS[key] = handler
        return handler
    return decorator


@dataclasses.dataclass
class FlopsReport:
    """FLOPs of one forward pass: ``total`` and ``per_vertex`` (vertex name -> FLOPs)."""

    total: int
    per_vertex: dict[str, int]

    def top(self, count: int = 10) -> list[tuple[str, int]]:
        """The ``count`` vertices with the most FLOPs."""
        return sorted(self.per_vertex.items(), key=lambda item: -item[1])[:count]


def vertex_flops(vertex: InnerVertex, inputs: list, output: Any) -> int:
    """FLOPs of one vertex given the values it read and produced."""
    module = vertex.module
    if isinstance(module, DagModule):
        return count_flops(module, inputs=inputs).total
    handler = handler_for(_HANDLERS, module)
    return int(handler(module, inputs, output)) if handler else 0


def count_flops(dag: DagModule, input_shape_without_batch: Sequence | None = None,
                inputs: Sequence[torch.Tensor] | None = None) -> FlopsReport:
    """Counts the FLOPs of one forward pass with batch size 1 (or of the given ``inputs``).

    >>> import dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(4, 3)))
    >>> count_flops(dag, (4,)).total
    24
    """
    if inputs is None:
        inputs = example_inputs(dag, input_shape_without_batch)
    values = propagate_values(dag, inputs)
    per_vertex = {}
    for vertex in dag.inner_vertices:
        inputs_of_vertex = [values[p] for p in vertex.predecessors]
        per_vertex[vertex.name] = vertex_flops(vertex, inputs_of_vertex, values[vertex])
    return FlopsReport(sum(per_vertex.values()), per_vertex)


@register_flops(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_flops(module: nn.Conv2d, inputs, output) -> int:
    kernel = math.prod(module.kernel_size)
    return 2 * output.numel() * (module.in_channels // module.groups) * kernel


@register_flops(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose_flops(module: nn.ConvTranspose2d, inputs, output) -> int:
    kernel = math.prod(module.kernel_size)
    return 2 * inputs[0].numel() * (module.out_channels // module.groups) * kernel


@register_flops(nn.Linear)
def _linear_flops(module: nn.Linear, inputs, output) -> int:
    return 2 * output.numel() * module.in_features


@register_flops(*MatmulOp.function_names)
def _matmul_flops(module: MatmulOp, inputs, output) -> int:
    first = module.argument(0, "input")
    first_value = inputs[first.index] if hasattr(first, "index") else first
    if not isinstance(first_value, torch.Tensor) or not isinstance(output, torch.Tensor):
        return 0
    return 2 * output.numel() * first_value.shape[-1]


@register_flops(*AttentionOp.function_names)
def _attention_flops(module: AttentionOp, inputs, output) -> int:
    query, key = inputs[0], inputs[1]
    value_dim = output.shape[-1]
    scores = query.numel() // query.shape[-1] * key.shape[-2]  # (..., L, S)
    return 2 * scores * (query.shape[-1] + value_dim)


@register_flops("torch.nn.functional.linear")
def _functional_linear_flops(module, inputs, output) -> int:
    weight = module.argument(1, "weight")
    weight = inputs[weight.index] if hasattr(weight, "index") else weight
    return 2 * output.numel() * weight.shape[-1]


@register_flops("torch.nn.functional.conv1d", "torch.nn.functional.conv2d",
                "torch.nn.functional.conv3d", "torch.conv2d", "torch.conv1d")
def _functional_conv_flops(module, inputs, output) -> int:
    weight = module.argument(1, "weight")
    weight = inputs[weight.index] if hasattr(weight, "index") else weight
    return 2 * output.numel() * math.prod(weight.shape[1:])
