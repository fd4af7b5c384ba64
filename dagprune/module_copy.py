"""A deep copy of a module tree, as ``copy.deepcopy`` makes it, in about half the time.

``copy.deepcopy`` takes every module and tensor through Python's generic object protocol
(``__reduce_ex__``, then rebuilding the object attribute by attribute); for a model of a few
hundred modules that is most of the time conversion spends copying. :func:`copy_module` rebuilds
plain modules from their ``__dict__`` and clones plain tensors directly; whatever is not plain
(a module or tensor type with its own copy or pickle protocol, a tensor subclass, a tensor with
a gradient or Python attributes, any other attribute value) goes through ``copy.deepcopy``
with the same memo, so objects shared inside the tree stay shared in the copy (tied weights
stay tied) and nothing in the copy is shared with the original.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import torch
from torch import nn

__all__ = ["copy_module"]

# a module type overriding one of these copies itself its own way; ``__setstate__`` is called
# with the copied state, as copy.deepcopy does
_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__copy__")
_MODULE_PROTOCOL = {name: getattr(nn.Module, name, None) for name in _PROTOCOL}
_TENSOR_DICTS = ("_parameters", "_buffers")


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (see the module docstring).

    >>> shared = nn.Linear(2, 2)
    >>> model = nn.Sequential(shared, nn.ReLU(), shared)
    >>> copied = copy_module(model)
    >>> copied[0] is copied[2], copied[0] is shared, torch.equal(copied[0].weight, shared.weight)
    (True, False, True)
    """
    return _copy_module(module, {})


def _has_plain_protocol(module: nn.Module) -> bool:
    return all(getattr(type(module), name, None) is method for name, method in _MODULE_PROTOCOL.items())


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    if not _has_plain_protocol(module):
        return copy.deepcopy(module, memo)
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = {}
    for name, value in module.__dict__.items():
        if name == "_modules":
            state[name] = type(value)((key, None if child is None else _copy_module(child, memo))
                                      for key, child in value.items())
        elif name in _TENSOR_DICTS:
            state[name] = type(value)((key, _copy_tensor(tensor, memo)) for key, tensor in value.items())
        else:
            state[name] = _copy_value(value, memo)
    new.__setstate__(state)
    return new


_ATOMS = (type(None), bool, int, float, str)
_EMPTY_CONTAINERS = (dict, collections.OrderedDict, set, list)


def _copy_value(value: Any, memo: dict) -> Any:
    """What ``copy.deepcopy`` gives, without its generic protocol for the values most module
    attributes hold: numbers, strings and None (shared, being immutable), tuples of those, and
    the empty hook dictionaries and sets every module carries (new empty ones)."""
    kind = type(value)
    if kind in _ATOMS or (kind is tuple and all(type(item) in _ATOMS for item in value)):
        return value
    if kind in _EMPTY_CONTAINERS and not value:
        return kind()
    return copy.deepcopy(value, memo)


def _copy_tensor(tensor: Any, memo: dict) -> Any:
    if tensor is None or id(tensor) in memo:
        return None if tensor is None else memo[id(tensor)]
    plain = (type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_leaf and tensor.grad is None
             and not tensor.__dict__ and tensor.layout == torch.strided)
    if not plain:
        return copy.deepcopy(tensor, memo)
    data = tensor.detach().clone(memory_format=torch.preserve_format)
    result = nn.Parameter(data, tensor.requires_grad) if type(tensor) is nn.Parameter else \
        data.requires_grad_(tensor.requires_grad)
    memo[id(tensor)] = result
    return result
