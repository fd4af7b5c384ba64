"""Argument templates: the constant part of a functional call, with holes for its inputs.

A traced call such as ``torch.cat([a, b], dim=1)`` is stored as the template
``([InputRef(0), InputRef(1)], {"dim": 1})`` plus the ordered inputs ``(a, b)``. Templates hold
only plain data (numbers, strings, tuples, lists, dicts, slices, dtypes, ...) so that they can be
written to JSON and read back without executing code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from dagprune.errors import SerializationError
from dagprune.outputs import OutputRecord

__all__ = ["InputRef", "fill_template", "fill_output", "map_template", "template_inputs", "encode_template",
           "decode_template"]


@dataclasses.dataclass(frozen=True)
class InputRef:
    """A hole in a template, filled with the op's ``index``-th input at run time."""

    index: int

    def __repr__(self) -> str:
        return f"#{self.index}"


def map_template(template: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuilds ``template`` with every leaf replaced by ``fn(leaf)``, keeping containers."""
    if isinstance(template, OutputRecord):
        return dataclasses.replace(template, fields=map_template(template.fields, fn))
    if isinstance(template, tuple) and not hasattr(template, "_fields"):
        return tuple(map_template(item, fn) for item in template)
    if isinstance(template, list):
        return [map_template(item, fn) for item in template]
    if isinstance(template, dict):
        return {key: map_template(value, fn) for key, value in template.items()}
    if isinstance(template, slice):
        return slice(map_template(template.start, fn), map_template(template.stop, fn),
                     map_template(template.step, fn))
    return fn(template)


def fill_template(template: Any, inputs: Sequence[Any]) -> Any:
    """Replaces each :class:`InputRef` in ``template`` by the matching entry of ``inputs``."""
    return map_template(template, lambda leaf: inputs[leaf.index] if isinstance(leaf, InputRef) else leaf)


def fill_output(template: Any, inputs: Sequence[Any]) -> Any:
    """:func:`fill_template`, with a top-level :class:`~dagprune.outputs.OutputRecord` built
    into its output object."""
    if isinstance(template, OutputRecord):
        return template.build(fill_template(template.fields, inputs))
    return fill_template(template, inputs)


def template_inputs(template: Any) -> list[int]:
    """Indices of the inputs a template refers to, in order of first appearance."""
    found: list[int] = []

    def visit(leaf):
        if isinstance(leaf, InputRef) and leaf.index not in found:
            found.append(leaf.index)
        return leaf

    map_template(template, visit)
    return found


_DTYPES = {str(dtype): dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)}
_MEMORY_FORMATS = {str(fmt): fmt for fmt in vars(torch).values() if isinstance(fmt, torch.memory_format)}
_LAYOUTS = {str(layout): layout for layout in vars(torch).values() if isinstance(layout, torch.layout)}


def encode_template(template: Any) -> Any:
    """Encodes a template as JSON-compatible data (tagged dicts for non-JSON values).

    >>> encode_template((InputRef(0), slice(None, 2), torch.float16))
    {'tuple': [{'input': 0}, {'slice': [None, 2, None]}, {'dtype': 'torch.float16'}]}
    """
    if isinstance(template, InputRef):
        return {"input": template.index}
    if isinstance(template, OutputRecord):
        return {"record": {"type": template.type_name, "fields": encode_template(template.fields)}}
    if isinstance(template, bool) or template is None or isinstance(template, str):
        return template
    if isinstance(template, int):
        return template
    if isinstance(template, float):
        if template != template or template in (float("inf"), float("-inf")):
            return {"float": repr(template)}
        return template
    if isinstance(template, torch.Size):
        return {"size": list(template)}
    if isinstance(template, tuple):
        return {"tuple": [encode_template(item) for item in template]}
    if isinstance(template, list):
        return [encode_template(item) for item in template]
    if isinstance(template, dict):
        if not all(isinstance(key, str) for key in template):
            raise SerializationError(f"template dict keys must be strings, got {list(template)}")
        return {"dict": {key: encode_template(value) for key, value in template.items()}}
    if isinstance(template, slice):
        return {"slice": [encode_template(template.start), encode_template(template.stop),
                          encode_template(template.step)]}
    if template is Ellipsis:
        return {"ellipsis": True}
    if isinstance(template, torch.dtype):
        return {"dtype": str(template)}
    if isinstance(template, torch.memory_format):
        return {"memory_format": str(template)}
    if isinstance(template, torch.layout):
        return {"layout": str(template)}
    if isinstance(template, torch.device):
        return {"device": str(template)}
    raise SerializationError(
        f"cannot store a constant of type {type(template).__name__} ({template!r}) in a saved DAG; "
        "only numbers, strings, containers, slices, dtypes and devices are supported")


def decode_template(data: Any) -> Any:
    """Inverse of :func:`encode_template`; raises :class:`SerializationError` on foreign data."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_template(item) for item in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise SerializationError(f"malformed template entry {data!r}")
    (tag, value), = data.items()
    try:
        if tag == "input":
            return InputRef(int(value))
        if tag == "record":
            fields = decode_template(value["fields"])
            if not isinstance(fields, dict) or not isinstance(value["type"], str):
                raise TypeError("a record holds a type name and a dict of fields")
            return OutputRecord(value["type"], fields)
        if tag == "tuple":
            return tuple(decode_template(item) for item in value)
        if tag == "size":
            return torch.Size(int(v) for v in value)
        if tag == "dict":
            return {str(key): decode_template(item) for key, item in value.items()}
        if tag == "slice":
            return slice(*(decode_template(item) for item in value))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "float":
            return float(value)
        if tag == "dtype":
            return _DTYPES[value]
        if tag == "memory_format":
            return _MEMORY_FORMATS[value]
        if tag == "layout":
            return _LAYOUTS[value]
        if tag == "device":
            return torch.device(value)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SerializationError(f"malformed template entry {data!r}: {error}") from error
    raise SerializationError(f"unknown template tag {tag!r} in {data!r}")
