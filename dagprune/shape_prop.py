"""Running a DAG on example inputs and recording what each vertex produced."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from dagprune.dag_module import DagModule, Vertex
from dagprune.errors import DagpruneError
from dagprune.example_inputs import ExampleInputs, as_example_inputs
from dagprune.training_mode import evaluation_mode

__all__ = ["example_inputs_for_shape", "resolve_inputs", "module_device", "module_dtype", "propagate_values",
           "propagate_shapes", "analysis_mode", "stream_values", "random_inputs", "value_shape"]


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of ``module``'s weights: the one holding most of its floating
    parameter and buffer elements (a few float32 gate logits in a bfloat16 model do not
    change it); the default dtype when it has none.

    >>> module_dtype(nn.Linear(2, 2).to(torch.bfloat16))
    torch.bfloat16
    >>> module_dtype(nn.ReLU())
    torch.float32
    """
    elements: dict[torch.dtype, int] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
    if not elements:
        return torch.get_default_dtype()
    return max(elements, key=elements.get)  # the first one seen wins a tie


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU when it has none)."""
    parameter = next(iter(module.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def random_inputs(shapes: Sequence[Sequence[int]], device: torch.device | str,
                  dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Standard normal tensors of the given full shapes, on ``device`` as ``dtype``.

    The values are drawn in float32 from a generator seeded with ``seed`` and then cast, so
    models of different dtypes see the same inputs (up to rounding).

    >>> [tuple(x.shape) for x in random_inputs([(1, 2), (3,)], "cpu", torch.float64)]
    [(1, 2), (3,)]
    """
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
            for shape in shapes]


def example_inputs_for_shape(dag: DagModule, input_shape_without_batch: Sequence, batch_size: int = 1,
                   device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Random inputs for ``dag``: one shape, or one shape per input (a sequence of shapes).

    Args:
        dag: the model the inputs are for.
        input_shape_without_batch: e.g. ``(3, 224, 224)``, or one such shape per input.
        batch_size: the leading axis added to every shape.
        device: where the inputs live (default: the device of the DAG's first parameter).
        dtype: their dtype (default: the DAG's, see :func:`module_dtype`).

    Returns:
        One tensor per shape, the same values on every call.

    >>> import dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(4, 3)).double())
    >>> [(tuple(x.shape), x.dtype) for x in example_inputs_for_shape(dag, (4,), batch_size=2)]
    [((2, 4), torch.float64)]
    """
    shapes = _input_shapes(input_shape_without_batch)
    return random_inputs([(batch_size, *shape) for shape in shapes],
                         module_device(dag) if device is None else device,
                         module_dtype(dag) if dtype is None else dtype)


def _input_shapes(input_shape_without_batch) -> list[tuple[int, ...]]:
    """One shape, or one shape per input, as tuples of positive ints."""
    try:
        single = isinstance(input_shape_without_batch[0], int)
        shapes = [tuple(input_shape_without_batch)] if single else [tuple(s) for s in input_shape_without_batch]
    except (TypeError, IndexError):
        shapes = []
    if not shapes or not all(s and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
                             for s in shapes):
        raise DagpruneError(f"input_shape_without_batch must be positive ints, e.g. (3, 224, 224), or one "
                            f"such shape per input; got {input_shape_without_batch!r}")
    return shapes


def propagate_values(dag: DagModule, inputs: Sequence[torch.Tensor] | ExampleInputs) -> dict[Vertex, Any]:
    """The value of every vertex for ``inputs`` (positional tensors, or
    :class:`~dagprune.example_inputs.ExampleInputs`), computed in eval mode without gradients.

    Every activation is held at once; a pass that looks at one vertex at a time uses
    :func:`stream_values` instead."""
    inputs = _as_inputs(inputs)
    with analysis_mode(dag):
        return dag.forward_with_all_values(*inputs.args, **inputs.kwargs)


@contextlib.contextmanager
def analysis_mode(dag: DagModule):
    """Eval mode and no gradients for the ``with`` block: how analysis passes run a DAG."""
    with evaluation_mode(dag), torch.no_grad():
        yield


def stream_values(dag: DagModule, inputs: Sequence[torch.Tensor] | ExampleInputs) -> Iterator[tuple[Vertex, list, Any]]:
    """``(vertex, input values, value)`` for every vertex of ``dag`` run on ``inputs``, in
    order, each value dropped once its last reader has been yielded
    (:meth:`~dagprune.DagModule.iter_vertex_values`). Iterate it inside
    ``with analysis_mode(dag):`` for the values :func:`propagate_values` gives.

    >>> import dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> with analysis_mode(dag):
    ...     [(vertex.name, tuple(value.shape)) for vertex, _, value in stream_values(dag, (torch.zeros(1, 3, 5, 5),))]
    [('input_1', (1, 3, 5, 5)), ('_0', (1, 8, 3, 3)), ('_1', (1, 8, 3, 3))]
    """
    inputs = _as_inputs(inputs)
    return dag.iter_vertex_values(*inputs.args, **inputs.kwargs)


def _as_inputs(inputs: Sequence[torch.Tensor] | ExampleInputs) -> ExampleInputs:
    return inputs if isinstance(inputs, ExampleInputs) else ExampleInputs(tuple(inputs))


def resolve_inputs(dag: DagModule, input_shape_without_batch: Sequence | None = None,
                   example_inputs: Any = None, batch_size: int = 1) -> ExampleInputs:
    """The inputs a pass runs ``dag`` on: ``example_inputs`` as given, or random inputs of
    ``input_shape_without_batch`` (the DAG's dtype and device, ``batch_size``).

    Args:
        dag: the model.
        input_shape_without_batch: e.g. ``(3, 224, 224)``, or one shape per input.
        example_inputs: a tensor, a tuple of positional values or a dict of keyword values
            (see :func:`~dagprune.example_inputs.as_example_inputs`); wins over the shape.
        batch_size: the batch of random inputs.

    Raises:
        DagpruneError: neither is given.
    """
    if example_inputs is not None:
        return as_example_inputs(example_inputs)
    if input_shape_without_batch is None:
        raise DagpruneError(f"{dag.name}: give input_shape_without_batch (float inputs) or "
                            "example_inputs (a tuple or dict of the tensors the model takes)")
    return ExampleInputs(tuple(example_inputs_for_shape(dag, input_shape_without_batch, batch_size)))


def value_shape(value: Any) -> Any:
    """``torch.Size`` for a tensor, the same structure of shapes for tuples/lists, else the value."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return type(value)(value_shape(item) for item in value)
    return value


def propagate_shapes(dag: DagModule, input_shape_without_batch: Sequence | None = None,
                     batch_size: int = 1, example_inputs: Any = None) -> dict[Vertex, Any]:
    """The output shape of every vertex, for random inputs of the given shape (or for
    ``example_inputs``, see :func:`resolve_inputs`).

    >>> import dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    >>> shapes = propagate_shapes(dag, (3, 10, 10))
    >>> shapes[dag.output_vertices[0]]
    torch.Size([1, 8, 8, 8])
    """
    inputs = resolve_inputs(dag, input_shape_without_batch, example_inputs, batch_size)
    with analysis_mode(dag):
        return {vertex: value_shape(value) for vertex, _, value in stream_values(dag, inputs)}
