"""FLOPs of a DAG, counted per vertex by the flops facet of each op's spec.

What is counted: ``2 x multiply-adds`` of the ops that dominate compute: convolutions (incl.
transposed and grouped), linear layers, recurrent layers' projections, matrix products
(``matmul``, ``bmm``, ``@``, ``einsum``, ``addmm``) and scaled dot-product attention. Biases,
normalisation, activations, elementwise arithmetic, pooling and resampling count zero.

Leaf modules with no spec of their own (timm modules kept whole, such as ``MobileVitBlock`` or
``LiteMLA``, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, modules passed as
``leaf_modules``) are black boxes: when they hold parameters, buffers or submodules, they are
run once more on the vertex's inputs under :class:`torch.utils.flop_counter.FlopCounterMode`,
which reports ``2 x multiply-adds`` of the same matmul- and convolution-like aten ops (``mm``,
``addmm``, ``bmm``, ``baddbmm``, ``convolution``, attention kernels) and nothing else. Modules
with no spec and nothing inside (activations, reshapes, dagprune's shape ops) count zero
without being run.

Compared with fvcore's ``FlopCountAnalysis`` (one multiply-add = one FLOP): on the ops above
``count_flops == 2 x fvcore``. fvcore's ``total()`` also holds rough estimates for a few
memory-bound ops (``batch_norm``, ``group_norm``, ``layer_norm``, ``instance_norm``,
``adaptive_avg_pool2d``, ``upsample_*``, ``grid_sampler``: 0.3 to 4.3 % of its total on timm's
resnet18, mobilenetv2_100, efficientnet_b0, convnext_atto and vit_tiny), left out here on
purpose. fvcore itself suggests dropping batch norm (folded into the convolution at inference),
calls its norm figure "just a rough estimate", and counts ``adaptive_avg_pool2d`` but not
``avg_pool2d``, activations or residual additions. Counting them would also put FLOPs on
vertices whose cost channel pruning does not scale, so the FLOPs of a slimmed model would no
longer be the share its gates predict. fvcore does not count the fused
``scaled_dot_product_attention`` op; models using it differ from fvcore by their attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn  # noqa: F401  (used by the examples)

from dagprune.dag_module import DagModule, InnerVertex
from dagprune.errors import UnsupportedOpError
from dagprune.ops.registry import op_flops
from dagprune.ops.spec import describe_op
from dagprune.shape_prop import analysis_mode, resolve_inputs, stream_values

__all__ = ["count_flops", "FlopsReport", "vertex_flops"]


@dataclasses.dataclass
class FlopsReport:
    """FLOPs of one forward pass: ``total`` and ``per_vertex`` (vertex name -> FLOPs)."""

    total: int
    per_vertex: dict[str, int]

    def top(self, count: int = 10) -> list[tuple[str, int]]:
        """The ``count`` vertices with the most FLOPs."""
        return sorted(self.per_vertex.items(), key=lambda item: -item[1])[:count]


def vertex_flops(vertex: InnerVertex, inputs: list, output: Any) -> int:
    """FLOPs of one vertex given the values it read and produced.

    Args:
        vertex: a vertex of a DAG; a nested :class:`DagModule` is counted vertex by vertex.
        inputs: the values of its predecessors (batch 1 keeps black-box measuring cheap).
        output: the value it produced.

    Returns:
        The count of the flops facet of the vertex's op spec (see :mod:`dagprune.ops.spec`).

    Raises:
        UnsupportedOpError: counting failed (the facet raised, or a black box could not run
            again on ``inputs``); the message names the vertex and how to register a spec.
    """
    module = vertex.module
    if isinstance(module, DagModule):
        return count_flops(module, inputs=inputs).total
    try:
        return op_flops(module, inputs, output)
    except Exception as error:
        where = f"vertex {vertex.name!r}" + (f" ({vertex.qualified_name})" if vertex.qualified_name else "")
        raise UnsupportedOpError(
            f"cannot count the FLOPs of {where}, which calls {describe_op(module)}: {error}. "
            "Describe the op with dagprune.ops.register_op(dagprune.ops.OpSpec(...)) and its "
            "flops facet") from error


def count_flops(dag: DagModule, input_shape_without_batch: Sequence | None = None,
                inputs: Sequence[torch.Tensor] | None = None, example_inputs: Any = None) -> FlopsReport:
    """Counts the FLOPs of one forward pass with batch size 1 (or of the given inputs).

    Args:
        dag: the DAG to count.
        input_shape_without_batch: shape of the random input (see
            :func:`~dagprune.shape_prop.example_inputs_for_shape`: it takes the DAG's dtype and
            device, so float16, bfloat16 and float64 models are counted as they are).
        inputs: positional tensors to run instead, with their batch axis.
        example_inputs: a tensor, a tuple of positional values or a dict of keyword values
            (token IDs, masks...), with their batch axis; FLOPs are those of this batch.

    Returns:
        The total and the FLOPs of every vertex.

    Raises:
        UnsupportedOpError: a vertex's FLOPs cannot be counted (see :func:`vertex_flops`).

    >>> import dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(4, 3)))
    >>> count_flops(dag, (4,)).total
    24
    >>> count_flops(dagprune.build_from_unstructured_module(nn.Linear(4, 3).to(torch.bfloat16)), (4,)).total
    24
    >>> embed = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    >>> count_flops(dagprune.build_from_unstructured_module(embed),
    ...             example_inputs=(torch.tensor([[1, 2, 3]]),)).total
    48

    A leaf module is measured inside (here the leaf ``"0"`` holds the linear layer):

    >>> model = nn.Sequential(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    >>> dag = dagprune.build_from_unstructured_module(model, leaf_modules=["0"])
    >>> count_flops(dag, (4,)).total
    24
    """
    if inputs is None:
        inputs = resolve_inputs(dag, input_shape_without_batch, example_inputs)
    per_vertex = {}
    with analysis_mode(dag):
        for vertex, inputs_of_vertex, value in stream_values(dag, inputs):
            if isinstance(vertex, InnerVertex):
                per_vertex[vertex.name] = vertex_flops(vertex, inputs_of_vertex, value)
    return FlopsReport(sum(per_vertex.values()), per_vertex)
