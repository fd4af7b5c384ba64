"""The functions a DAG may call, by name.

A saved DAG names the functions its ops call (``"torch.cat"``, ``"Tensor.view"``,
``"operator.add"``). Conversion and loading resolve those names through an allowlist only, so a
file can never make dagprune call something outside it (``torch.load``, ``os.system``, ...).
The allowlist holds:

* the tensor computations of ``torch``, ``torch.nn.functional``, ``torch.special``,
  ``torch.linalg`` and ``torch.fft``, and the ``torch.Tensor`` methods (as ``Tensor.<name>``),
  as torch itself defines them: the functions ``torch.overrides.get_overridable_functions``
  lists (those that dispatch on their tensor arguments), their in-place variants, and a named
  list of tensor factories (``torch.zeros``, ``torch.arange``, ``Tensor.new_zeros``, ...);
  functions that change global state or touch files, processes or memory are not among them,
  and the few tensor methods that do (hooks, storage, conversion to Python) are refused by name;
* ``torch._grouped_mm``, a private computation that libraries call directly;
* the pure functions of ``operator`` and ``math`` named below (and ``operator.setitem``,
  which writes into its first argument, like the in-place tensor methods), and a few builtins;
* every function name an op family or an op spec declares (see :mod:`dagprune.ops.spec`);
* whatever is registered with :func:`register_function` (timm's helper functions that torch.fx
  must not trace into are registered that way).
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Callable

import torch
import torch.nn.functional as F

from dagprune.errors import ConversionError, SerializationError

__all__ = ["register_function", "function_name", "resolve_function", "call_method",
           "declare_function_names"]

# Tensor methods that dispatch on tensors but register code, expose memory or leave torch.
_FORBIDDEN_METHODS = {
    "storage", "untyped_storage", "share_memory_", "tolist", "numpy", "pin_memory", "item",
    "register_hook", "register_post_accumulate_grad_hook", "backward", "set_", "data_ptr",
    "map_", "apply_", "map2_", "record_stream", "retain_grad", "requires_grad_", "resize_",
    "resize_as_", "storage_offset", "untyped_storage", "dim_order", "__reduce_ex__",
    "__setstate__", "__deepcopy__", "__torch_function__", "__torch_dispatch__",
}
# Tensor factories: they read no tensor, so torch.overrides does not list them.
_FACTORIES = ("zeros", "ones", "full", "empty", "arange", "range", "linspace", "logspace", "eye",
              "tensor", "as_tensor", "scalar_tensor", "rand", "randn", "randint", "randperm",
              "tril_indices", "triu_indices", "rand_like", "randn_like", "randint_like", "normal",
              "bernoulli", "poisson", "multinomial")
_TENSOR_FACTORIES = ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos",
              "abs", "invert", "inv", "and_", "or_", "xor", "lshift", "rshift", "lt", "le", "eq",
              "ne", "ge", "gt", "not_", "truth", "getitem", "setitem", "index", "iadd", "isub", "imul",
              "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor", "contains")
_MATH = ("sqrt", "isqrt", "ceil", "floor", "trunc", "prod", "log", "log2", "log10", "exp",
         "sin", "cos", "tan", "atan", "atan2", "tanh", "erf", "fabs", "gcd", "lcm", "pow",
         "hypot", "copysign", "isfinite", "isinf", "isnan", "radians", "degrees", "fsum")
# Private torch computations that libraries call directly (transformers' mixture-of-experts
# layers run their experts with torch._grouped_mm); pure functions of their tensor arguments.
_PRIVATE_COMPUTATIONS = ("_grouped_mm",)
_NAMESPACES = (("torch", torch), ("torch.nn.functional", F), ("torch.special", torch.special),
               ("torch.linalg", torch.linalg), ("torch.fft", torch.fft))
_BUILTINS = {"getattr": builtins.getattr, "len": builtins.len, "int": builtins.int,
             "float": builtins.float, "tuple": builtins.tuple, "list": builtins.list,
             "slice": builtins.slice, "max": builtins.max, "min": builtins.min}
# Attributes a DAG may read with getattr(value, name): shape metadata, views of a tensor, and the
# fields of the named tuples torch's reductions return (``x.max(1).values``, ``topk(...).indices``)
_READABLE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "data", "real", "imag", "layout",
                        "type", "requires_grad", "is_nested", "is_mkldnn", "is_sparse", "is_sparse_csr", "is_cpu",
                        "is_quantized", "is_meta", "values", "indices"}

_NAME_BY_ID: dict[int, str] = {}
_FUNCTION_BY_NAME: dict[str, Callable] = {}


def _tensor_computations() -> tuple[set[int], set[str]]:
    """The ids of torch's overridable functions and the names of its overridable Tensor methods."""
    overridable = torch.overrides.get_overridable_functions()
    functions = {id(f) for namespace, found in overridable.items() if namespace is not torch.Tensor
                 for f in found}
    methods = {getattr(f, "__name__", None) for f in overridable.get(torch.Tensor, ())}
    return functions, {m for m in methods if m} | set(_TENSOR_FACTORIES)


_COMPUTATIONS, _TENSOR_METHODS = _tensor_computations()


def _allowed_in_namespace(namespace, attribute: str) -> bool:
    value = getattr(namespace, attribute, None)
    if not callable(value) or isinstance(value, type) or attribute.startswith("_"):
        return False
    if id(value) in _COMPUTATIONS or (namespace is torch and attribute in _FACTORIES):
        return True
    base = getattr(namespace, attribute[:-1], None) if attribute.endswith("_") else None
    return base is not None and id(base) in _COMPUTATIONS  # in-place variant (relu_)


def _allow(name: str, function: Callable) -> None:
    _FUNCTION_BY_NAME.setdefault(name, function)
    _NAME_BY_ID.setdefault(id(function), name)


def _allow_namespaces() -> None:
    for prefix, namespace in _NAMESPACES:
        for attribute in dir(namespace):
            if _allowed_in_namespace(namespace, attribute):
                _allow(f"{prefix}.{attribute}", getattr(namespace, attribute))
    for attribute in _PRIVATE_COMPUTATIONS:
        if hasattr(torch, attribute):
            _allow(f"torch.{attribute}", getattr(torch, attribute))
    for names, prefix, namespace in ((_OPERATORS, "operator", operator), (_MATH, "math", math)):
        for attribute in names:
            if hasattr(namespace, attribute):
                _allow(f"{prefix}.{attribute}", getattr(namespace, attribute))
    for name, builtin in _BUILTINS.items():
        _FUNCTION_BY_NAME[name] = builtin
        _NAME_BY_ID.setdefault(id(builtin), name)
    _NAME_BY_ID[id(builtins.getattr)] = "getattr"


def declare_function_names(names) -> None:
    """Allows the functions an op family or op spec declares it stands for (``"torch.cat"``).

    Names outside ``torch``, ``operator`` and ``math``, ``Tensor.`` methods and names that
    resolve to nothing are skipped: a declaration never imports anything.
    """
    roots = {"torch": torch, "operator": operator, "math": math}
    for name in names:
        if name.startswith("Tensor."):
            _DECLARED_METHODS.add(name)
            continue
        root, _, path = name.partition(".")
        value = roots.get(root)
        for part in path.split(".") if value is not None and path else ():
            value = getattr(value, part, None)
        if callable(value) and not isinstance(value, type) and value is not torch:
            _allow(name, value)


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
        raise ConversionError(
            f"the function {_public_name(function)} is not one dagprune can store in a DAG. If it comes "
            "from an installed package, call dagprune.ops.register_function(fn) before converting; "
            "if it is your own code, make the module that calls it a leaf "
            "(build_from_unstructured_module(model, leaf_modules=[...])).")
    return name


def _public_name(function: Callable) -> str:
    """How the user calls ``function``: ``torch.<name>`` for torch's own functions (whose
    ``__module__`` names an internal class), else ``module.qualname``."""
    short = getattr(function, "__name__", None)
    if short and getattr(torch, short, None) is function:
        return f"torch.{short}"
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def method_name(method: str) -> str:
    """The registered name of the Tensor method ``method``, e.g. ``"Tensor.view"``."""
    if not _tensor_method_allowed(method):
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
        if not _tensor_method_allowed(method) or not hasattr(torch.Tensor, method):
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


def _tensor_method_allowed(method: str) -> bool:
    """Whether ``Tensor.<method>`` may be stored in and called from a DAG."""
    if method in _FORBIDDEN_METHODS:
        return False
    if f"Tensor.{method}" in _DECLARED_METHODS or method == "__getitem__":
        return True
    return not method.startswith("_") and (method in _TENSOR_METHODS or method.rstrip("_") in _TENSOR_METHODS)


_DECLARED_METHODS: set[str] = set()
_allow_namespaces()
