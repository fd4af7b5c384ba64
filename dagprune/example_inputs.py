"""Example inputs: what a model is called with, as given by the user.

Every pass that runs a model (conversion checks, FLOPs, shapes, channel groups) takes either
an input shape without batch (random float inputs of the model's dtype, batch 1) or
``example_inputs``: a tensor, a tuple of positional values, or a dict of keyword values, of any
dtype (integer token IDs, boolean masks, float16 images). Their shapes, dtypes and batch size
are used as given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from dagprune.errors import DagpruneError

__all__ = ["ExampleInputs", "as_example_inputs", "describe_inputs", "positions_per_sample"]


@dataclasses.dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword values a model is called with: ``model(*args, **kwargs)``."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def call(self, module) -> Any:
        """``module(*args, **kwargs)``."""
        return module(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors among the values, positional first."""
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor)]

    def to(self, device: torch.device | str) -> "ExampleInputs":
        """The same values with every tensor moved to ``device``."""
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return ExampleInputs(tuple(move(v) for v in self.args),
                             {k: move(v) for k, v in self.kwargs.items()})

    def first_tensor(self) -> torch.Tensor:
        """The first tensor (positional first): the one per-sample sizes are read from."""
        tensors = self.tensors()
        if not tensors:
            raise DagpruneError("example_inputs hold no tensor; pass the tensors the model is called with")
        return tensors[0]


def as_example_inputs(example_inputs: Any) -> ExampleInputs:
    """``example_inputs`` as :class:`ExampleInputs`: a tensor, a tuple or list of positional
    values, a dict of keyword values, or an :class:`ExampleInputs`.

    >>> inputs = as_example_inputs({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    >>> describe_inputs(inputs)
    'input_ids=int64[1, 4]'

    Raises:
        DagpruneError: ``example_inputs`` is of another kind, a dict key is not a string, or no
            value is a tensor.
    """
    if isinstance(example_inputs, ExampleInputs):
        inputs = example_inputs
    elif isinstance(example_inputs, torch.Tensor):
        inputs = ExampleInputs((example_inputs,))
    elif isinstance(example_inputs, (tuple, list)):
        inputs = ExampleInputs(tuple(example_inputs))
    elif isinstance(example_inputs, Mapping):
        if not all(isinstance(key, str) for key in example_inputs):
            raise DagpruneError("example_inputs: the keys of a dict are the model's argument names "
                                f"(strings), got {sorted(map(repr, example_inputs))}")
        inputs = ExampleInputs((), dict(example_inputs))
    else:
        raise DagpruneError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
            f"inputs, got {type(example_inputs).__name__}")
    _check_no_nested_tensors(inputs)
    inputs.first_tensor()
    return inputs


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensors(item) for item in value)
    if isinstance(value, Mapping):
        return any(_holds_tensors(item) for item in value.values())
    return False


def _check_no_nested_tensors(inputs: ExampleInputs) -> None:
    """Tensors inside lists or dicts cannot be DAG inputs (a detector's list of images)."""
    named = [*(f"positional value {i}" for i in range(len(inputs.args))), *(repr(k) for k in inputs.kwargs)]
    for name, value in zip(named, (*inputs.args, *inputs.kwargs.values())):
        if not isinstance(value, torch.Tensor) and _holds_tensors(value):
            raise DagpruneError(
                f"example_inputs: {name} is a {type(value).__name__} holding tensors; a DAG takes each "
                "tensor as an argument of its own. Pass them separately, or convert the part of the model "
                "that takes one batch tensor (a detector's model.backbone) and put the DAG back in its place")


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"
    return repr(value)


def describe_inputs(inputs: ExampleInputs) -> str:
    """A short description of the inputs: dtypes and shapes, e.g. ``float32[1, 3, 8, 8]``."""
    parts = [_describe_value(v) for v in inputs.args]
    parts += [f"{key}={_describe_value(v)}" for key, v in inputs.kwargs.items()]
    return ", ".join(parts)


def positions_per_sample(inputs: ExampleInputs) -> int:
    """The product of the first input's sizes after its batch and first axes: ``H * W`` of an
    image ``(B, C, H, W)``, 1 for token IDs ``(B, L)`` (torch-dag's kmapp divides by it)."""
    size = 1
    for dim in inputs.first_tensor().shape[2:]:
        size *= dim
    return size
