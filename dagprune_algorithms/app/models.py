"""Creating timm models by name, with clear errors for unknown names; the DAG of a model."""

from __future__ import annotations

import difflib

import torch
from torch import nn

import dagprune
from dagprune.errors import ConversionError, DagpruneError
from dagprune.shape_prop import module_device, module_dtype
from dagprune.tracing import needs_example_inputs

__all__ = ["UnknownModelError", "check_timm_model_name", "create_timm_model", "timm_size_kwargs", "as_dag"]


class UnknownModelError(DagpruneError):
    """A model name that timm does not know; ``close_matches`` lists the nearest names."""

    def __init__(self, message: str, close_matches: list[str] | None = None):
        super().__init__(message)
        self.close_matches = close_matches or []


def timm_size_kwargs(name: str, input_size: tuple[int, ...] | None) -> dict:
    """``img_size`` for timm models built for one input size (ViTs) when another is asked."""
    import timm

    config = timm.models.get_pretrained_cfg(name)
    if input_size is None or config is None or not getattr(config, "fixed_input_size", False) \
            or len(input_size) != 3 or tuple(config.input_size[1:]) == tuple(input_size[1:]):
        return {}
    return {"img_size": tuple(input_size[1:])}


def check_timm_model_name(name: str) -> None:
    """Raises :class:`UnknownModelError`, listing the closest names, when timm has no model ``name``."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise UnknownModelError(f"{name!r} is not a timm model name{hint}", close)


def create_timm_model(name: str, input_size: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)`` sized for ``input_size``.

    Raises:
        UnknownModelError: timm has no such model; the message lists the closest names.
    """
    import timm

    check_timm_model_name(name)
    options = {**timm_size_kwargs(name, input_size), **kwargs}
    if input_size is not None and len(input_size) == 3:
        options.setdefault("in_chans", input_size[0])
    try:
        return timm.create_model(name, pretrained=False, **options)
    except TypeError as error:
        raise UnknownModelError(f"timm model {name} cannot be built with {options}: {error}") from error


def as_dag(model: nn.Module, input_shape: tuple[int, ...] | None = None,
           name: str | None = None) -> dagprune.DagModule:
    """``model`` converted to a DAG; a DAG (e.g. loaded from a saved directory) as it is.

    A model holding blocks that tracing follows only with example inputs
    (:func:`dagprune.tracing.needs_example_inputs`) is converted with a random batch of two
    ``input_shape`` inputs (drawn from a private generator: the global one is left alone), so
    that pruning reaches their channels; so is a model whose symbolic trace fails (a forward
    branching on its input's sizes). If that fails too, the symbolic trace's error is raised.
    """
    if isinstance(model, dagprune.DagModule):
        return model
    if input_shape is None:
        return dagprune.build_from_unstructured_module(model, name=name)
    if needs_example_inputs(model):
        return _converted_with_example_batch(model, input_shape, name)
    try:
        return dagprune.build_from_unstructured_module(model, name=name)
    except ConversionError as symbolic_error:
        try:  # a forward branching on its input's sizes follows the example's
            return _converted_with_example_batch(model, input_shape, name)
        except ConversionError:
            raise symbolic_error from None


def _converted_with_example_batch(model: nn.Module, input_shape: tuple[int, ...], name: str | None):
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    example = example.to(device=module_device(model), dtype=module_dtype(model))
    return dagprune.build_from_unstructured_module(model, name=name, example_inputs=(example,))
