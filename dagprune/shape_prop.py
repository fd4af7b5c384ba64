"""Running a DAG on example inputs and recording what each vertex produced."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dagprune.dag_module import DagModule, Vertex
from dagprune.training_mode import evaluation_mode

__all__ = ["example_inputs", "propagate_values", "propagate_shapes", "value_shape"]


def example_inputs(dag: DagModule, input_shape_without_batch: Sequence, batch_size: int = 1,
                   device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Random inputs for ``dag``: one shape, or one shape per input (a sequence of shapes)."""
    shapes = ([tuple(input_shape_without_batch)] if isinstance(input_shape_without_batch[0], int)
              else [tuple(shape) for shape in input_shape_without_batch])
    if device is None:
        parameter = next(iter(dag.parameters()), None)
        device = parameter.device if parameter is not None else "cpu"
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, *shape, generator=generator).to(device) for shape in shapes]


def propagate_values(dag: DagModule, inputs: Sequence[torch.Tensor]) -> dict[Vertex, Any]:
    """The value of every vertex for ``inputs``, computed in eval mode without gradients."""
    with evaluation_mode(dag), torch.no_grad():
        return dag.forward_with_all_values(*inputs)


def value_shape(value: Any) -> Any:
    """``torch.Size`` for a tensor, the same structure of shapes for tuples/lists, else the value."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return type(value)(value_shape(item) for item in value)
    return value


def propagate_shapes(dag: DagModule, input_shape_without_batch: Sequence,
                     batch_size: int = 1) -> dict[Vertex, Any]:
    """The output shape of every vertex, for random inputs of the given shape.

    >>> import dagprune
    >>> from torch import nn
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> shapes = propagate_shapes(dag, (3, 10, 10))
    >>> shapes[dag.output_vertices[0]]
    torch.Size([1, 8, 8, 8])
    """
    inputs = example_inputs(dag, input_shape_without_batch, batch_size)
    return {vertex: value_shape(value) for vertex, value in propagate_values(dag, inputs).items()}
