"""The functions a DAG may call, by name.

A saved DAG names the functions its ops call (``"torch.cat"``, ``"Tensor.view"``,
``"operator.add"``). Loading resolves those names through this table only, so a file can never
make dagprune call something outside it (``torch.load``, ``os.system``, ...). The table holds the
public functions of ``torch``, ``torch.nn.functional``, ``torch.special``, ``torch.linalg``,
``torch.fft``, ``operator`` and ``math``, the public ``torch.Tensor`` methods (as ``Tensor.<name>``),
a few builtins, and whatever is registered with :func:`register_function` (timm's helper functions
that torch.fx must not trace into are registered that way).
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Callable

import torch
import torch.nn.functional as F

from dagprune.errors import ConversionError, SerializationError

__all__ = ["register_function", "function_name", "resolve_function", "call_method"]

# Names that touch files, processes, global state or the network; never callable from a DAG.
_FORBIDDEN = {
    "load", "save", "from_file", "hub", "set_default_dtype", "set_default_device",
    "set_default_tensor_type", "manual_seed", "seed", "set_rng_state", "use_deterministic_algorithms",
    "set_num_threads", "set_num_interop_threads", "compile", "jit", "classes", "ops", "library",
    "set_printoptions", "set_grad_enabled", "set_warn_always", "set_flush_denormal",
    "storage", "untyped_storage", "share_memory_", "tolist", "numpy", "pin_memory",
    "register_hook", "register_post_accumulate_grad_hook", "backward", "set_", "data_ptr",
    "import_ir_module", "import_ir_module_from_buffer", "get_file_path", "call", "cond", "vmap",
    "while_loop", "map", "func", "export", "onnx", "profiler", "utils", "distributed",
}
# Prefixes of names that change global state or touch files.
_FORBIDDEN_PREFIXES = ("set_", "_", "load", "save", "import_", "use_", "enable_", "disable_")
_BUILTINS = {"getattr": builtins.getattr, "len": builtins.len, "int": builtins.int,
             "float": builtins.float, "tuple": builtins.tuple, "list": builtins.list,
             "slice": builtins.slice, "max": builtins.max, "min": builtins.min}
# Attributes a DAG may read with getattr(value, name): shape metadata only.
_READABLE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "data", "real"}

_NAME_BY_ID: dict[int, str] = {}
_FUNCTION_BY_NAME: dict[str, Callable] = {}


def _register_namespace(prefix: str, namespace) -> None:
    for attribute in dir(namespace):
        if attribute.startswith(_FORBIDDEN_PREFIXES) or attribute in _FORBIDDEN:
            continue
        value = getattr(namespace, attribute, None)
        if callable(value) and not isinstance(value, type):
            name = f"{prefix}.{attribute}"
            _FUNCTION_BY_NAME.setdefault(name, value)
            _NAME_BY_ID.setdefault(id(value), name)


def register_function(function: Callable, name: str | None = None) -> Callable:
    """Allows ``function`` to be traced as a single op and called from a loaded DAG.

    Args:
        function: a function from an installed package (not from the model's own source).
        name: the name stored in saved files; defaults to ``module.qualname``.

    Returns:
        ``function`` unchanged, so this can be used as a decorator.
    """
    name = name or f"{function.__module__}.{function.__qualname__}"
    _FUNCTION_BY_NAME[name] = function
    _NAME_BY_ID[id(function)] = name
    return function


def function_name(function: Callable) -> str:
    """The registered name of ``function``; raises :class:`ConversionError` if it has none."""
    if isinstance(function, str):  # a Tensor method name from torch.fx's call_method
        return method_name(function)
    name = _NAME_BY_ID.get(id(function))
    if name is None:
        module = getattr(function, "__module__", "?")
        qualname = getattr(function, "__qualname__", repr(function))
        raise ConversionError(
            f"the function {module}.{qualname} is not one dagprune can store in a DAG. If it comes "
            "from an installed package, call dagprune.ops.register_function(fn) before converting; "
            "if it is your own code, make the module that calls it a leaf "
            "(build_from_unstructured_module(model, leaf_modules=[...])).")
    return name


def method_name(method: str) -> str:
    """The registered name of the Tensor method ``method``, e.g. ``"Tensor.view"``."""
    if method.startswith("_") and method not in ("__getitem__",) or method in _FORBIDDEN:
        raise ConversionError(f"the tensor method {method!r} cannot be stored in a DAG")
    return f"Tensor.{method}"


def call_method(method: str) -> Callable:
    """A function calling ``value.<method>(*args, **kwargs)``."""
    def call(value, *args, **kwargs):
        return getattr(value, method)(*args, **kwargs)
    call.__name__ = method
    return call


def _read_attribute(value, attribute):
    if attribute not in _READABLE_ATTRIBUTES:
        raise SerializationError(f"reading attribute {attribute!r} is not allowed in a DAG")
    return getattr(value, attribute)


def resolve_function(name: str) -> Callable:
    """The callable registered under ``name``; raises :class:`SerializationError` if unknown."""
    if name.startswith("Tensor."):
        method = name[len("Tensor."):]
        if (method.startswith("_") and method != "__getitem__") or method in _FORBIDDEN \
                or not hasattr(torch.Tensor, method):
            raise SerializationError(f"unknown or forbidden tensor method {name!r}")
        return call_method(method)
    if name == "getattr":
        return _read_attribute
    function = _FUNCTION_BY_NAME.get(name)
    if function is None:
        import difflib
        close = difflib.get_close_matches(name, _FUNCTION_BY_NAME, n=3)
        raise SerializationError(
            f"unknown function {name!r}" + (f" (closest: {', '.join(close)})" if close else "")
            + "; if it comes from an installed package, register it with "
              "dagprune.ops.register_function before loading")
    return function


for _prefix, _namespace in (("torch", torch), ("torch.nn.functional", F),
                            ("torch.special", torch.special), ("torch.linalg", torch.linalg),
                            ("torch.fft", torch.fft), ("operator", operator), ("math", math)):
    _register_namespace(_prefix, _namespace)
for _name, _builtin in _BUILTINS.items():
    _FUNCTION_BY_NAME[_name] = _builtin
    _NAME_BY_ID.setdefault(id(_builtin), _name)
_NAME_BY_ID[id(builtins.getattr)] = "getattr"
