"""How a leaf module is described in a saved DAG: its type name and constructor arguments.

Standard ``torch.nn`` layers are described generically: the constructor's parameters are read
back from the module's attributes of the same name (``Conv2d.in_channels``, ``.kernel_size``,
...). A description is checked when it is made: the module rebuilt from it must have the same
``extra_repr`` and the same parameter and buffer shapes, otherwise saving fails with a clear
error instead of writing a file that would load into something else. Other types register a
describer with :func:`register_module_serializer`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from dagprune.errors import SerializationError
from dagprune.ops.templates import decode_template, encode_template

__all__ = ["register_module_serializer", "describe_module", "build_module", "module_type_name"]

_SERIALIZERS: dict[str, tuple[type, Callable[[nn.Module], dict], Callable[[dict], nn.Module]]] = {}
_SKIPPED_PARAMETERS = {"self", "device", "dtype", "factory_kwargs"}


def module_type_name(cls: type) -> str:
    """The name a module type is stored under, e.g. ``"torch.nn.Conv2d"``."""
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def register_module_serializer(cls: type, to_config: Callable[[nn.Module], dict] | None = None,
                               from_config: Callable[[dict], nn.Module] | None = None) -> None:
    """Lets DAGs holding modules of type ``cls`` be saved and loaded.

    Args:
        cls: the module type.
        to_config: module -> JSON-compatible dict of constructor arguments; defaults to reading
            the constructor's parameter names from the module's attributes.
        from_config: dict -> module; defaults to ``cls(**config)``.
    """
    _SERIALIZERS[module_type_name(cls)] = (cls, to_config or _generic_config,
                                           from_config or (lambda config: cls(**config)))


def _generic_config(module: nn.Module) -> dict:
    config = {}
    signature = inspect.signature(type(module).__init__)
    for name, parameter in signature.parameters.items():
        if name in _SKIPPED_PARAMETERS or parameter.kind in (parameter.VAR_POSITIONAL,
                                                             parameter.VAR_KEYWORD):
            continue
        if not hasattr(module, name):
            if parameter.default is inspect.Parameter.empty:
                raise SerializationError(
                    f"cannot describe {type(module).__name__}: its constructor argument {name!r} "
                    "is not stored on the module; register a serializer with "
                    "dagprune.register_module_serializer")
            continue
        value = getattr(module, name)
        if isinstance(value, torch.Tensor) or value is None and name == "bias":
            value = value is not None  # e.g. Conv2d(bias=True) stores the bias tensor as .bias
        config[name] = value
    return config


def _resolve_type(type_name: str):
    if type_name in _SERIALIZERS:
        return _SERIALIZERS[type_name]
    if type_name.startswith("torch.nn."):
        cls = getattr(nn, type_name[len("torch.nn."):], None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls, _generic_config, lambda config: cls(**config)
    return None


def describe_module(module: nn.Module) -> dict:
    """``{"type": ..., "config": ...}`` for a leaf module; checked by rebuilding it.

    Raises:
        SerializationError: the type is not registered, or its description does not rebuild
            the same module.
    """
    type_name = module_type_name(type(module))
    entry = _resolve_type(type_name)
    if entry is None:
        raise SerializationError(
            f"cannot save a module of type {type_name}: only torch.nn layers, dagprune ops and "
            "types registered with dagprune.register_module_serializer can be saved")
    _, to_config, from_config = entry
    config = to_config(module)
    try:
        encoded = encode_template(config)
        rebuilt = from_config(decode_template(encoded))
    except SerializationError:
        raise
    except Exception as error:
        raise SerializationError(f"cannot describe {type_name} for saving: {error}") from error
    if rebuilt.extra_repr() != module.extra_repr() or _shapes(rebuilt) != _shapes(module):
        raise SerializationError(
            f"{type_name} cannot be rebuilt from its constructor arguments ({rebuilt.extra_repr()} "
            f"vs {module.extra_repr()}); register a serializer with "
            "dagprune.register_module_serializer")
    return {"type": type_name, "config": encoded}


def build_module(description: dict) -> nn.Module:
    """Rebuilds a module from :func:`describe_module`'s output (no code from the file runs)."""
    type_name = description.get("type")
    entry = _resolve_type(type_name) if isinstance(type_name, str) else None
    if entry is None:
        raise SerializationError(
            f"the file names a module type {type_name!r} that is not allowed or not registered; "
            "register it with dagprune.register_module_serializer before loading")
    try:
        return entry[2](decode_template(description["config"]))
    except SerializationError:
        raise
    except Exception as error:
        raise SerializationError(f"cannot rebuild {type_name} from {description.get('config')!r}: "
                                 f"{error}") from error


def _shapes(module: nn.Module) -> dict:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}
