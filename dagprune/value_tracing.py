"""Tracing with example values: Python control flow on shapes follows the example.

torch.fx traces with proxies that hold no value, so ``if x.ndim < 4:``, ``if seq_len > 1:`` or
``a, b = sizes`` stop the trace. When the user gives example inputs, the tracer also runs every
recorded call on real values (one forward pass), and a proxy answers such questions from its
value:

- ``bool()`` of a value computed only from shapes, dtypes, devices and fixed arguments takes the
  branch the example takes (the graph is specialised on it); ``bool()`` of anything read from a
  tensor's *data* (``x.sum() > 0``, ``x.item()``) is refused, since a branch on data would be
  silently wrong for other inputs.
- ``len()`` and iteration unpack tuples, sizes and lists by their example length.
- Item assignment (``table[:, :, 0] = index``) is recorded as an ``operator.setitem`` call that
  writes into the tensor in trace order, as the model writes into it.
- ``int()``, ``float()`` and ``operator.index()`` of such a value (``int(math.ceil(h / p))``,
  ``range(n)``, ``len(x)`` of a tensor) take the example's number, and the graph checks at run
  time that the value is still that number: other sizes get a clear error, never a silently
  wrong result.
- The graph itself stays symbolic: ``x.view(x.shape[0], -1)`` reads the shape at run time, so
  the DAG accepts other batch sizes and sequence lengths wherever the model's arithmetic does.

Buffers are traced as graph attributes (torch.fx ``proxy_buffer_attributes``), so a causal mask
sliced by the traced sequence length (``self.bias[:, :, :T, :T]``) stays symbolic too.

Some torch functions do not see proxies through ``__torch_function__``, and are patched while
tracing (:func:`torch_functions_for_proxies`): ``torch.tensor`` / ``torch.as_tensor`` of a traced
value (``torch.tensor(q.size(-1))``) and functions given traced sizes (``torch.ones(batch, n)``,
``torch.eye(n)``, ``torch.arange(n)``, ``torch.reshape(x, [batch, -1, width])``: torch's argument
parser reads such sizes as Python numbers, which would specialise the graph on the example's) are
recorded as calls, as are tensor methods given traced sizes on a tensor that is no proxy (a
constant made in the forward: ``torch.eye(2, 3).expand(x.shape[0], -1, -1)``), and ``torch.finfo`` /
``torch.iinfo`` of a traced dtype (``torch.finfo(x.dtype).min``) take the example's dtype: the
DAG keeps that constant (convert the model in the dtype it will run in); so do
``torch.is_autocast_enabled`` / ``torch.get_autocast_dtype`` of a traced device type
(``x.device.type``), answered as at conversion. Two helpers of torch's
own transformer blocks are patched too: ``F._none_or_dtype`` (an ``isinstance`` check that
reads a mask's dtype) answers from the proxy, and ``_detect_is_causal_mask`` (which compares a
given mask with the causal one by value) is recorded as a call, run on the DAG's mask. The
recording patches (``torch.tensor``, the sized factories) also apply to symbolic tracing.
``torch.autocast(device_type=x.device.type, enabled=False)`` (timm's EfficientViT keeps its
attention in float32 so) takes its arguments from the example: a context manager is not recorded
in the graph, only the ops run inside it (their explicit casts included), so under a caller's
autocast those ops follow the caller's autocast.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import operator
import sys
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

__all__ = ["ValueRecorder", "ValueProxy", "TracedParameter", "torch_functions_for_proxies", "holds_proxy"]

_UNKNOWN = object()
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_nested",
                               "is_mkldnn", "is_sparse_csr", "is_cpu", "is_mps", "is_xpu",
                               "is_sparse", "is_quantized", "is_meta"})
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "is_floating_point",
                            "is_complex", "is_contiguous", "get_device", "element_size"})
# functions whose sizes torch's argument parser reads as Python numbers before it looks for a
# proxy (see the module's docstring): factories taking sizes as separate arguments
# (``torch.ones(batch, n)``), one size (``torch.eye(n)``, ``torch.arange(n)``), or a size list
# led by a traced size (``torch.reshape(x, [batch, -1, width])``)
_SIZED_FUNCTIONS = ("zeros", "ones", "empty", "rand", "randn", "full", "eye", "arange", "randint",
                    "reshape", "broadcast_to", "tile", "narrow", "tensor_split")
# tensor methods taking sizes, called on a tensor that is no proxy (a constant the forward makes:
# ``torch.eye(2, 3).expand(x.shape[0], -1, -1)``) with traced sizes: recorded as calls
_SIZED_METHODS = ("expand", "view", "reshape", "repeat", "tile", "narrow", "unflatten", "new_zeros", "new_ones",
                  "new_empty", "new_full")
_SHAPE_FUNCTIONS = frozenset({torch.is_floating_point, torch.is_complex, torch.is_tensor, torch.numel})


class ValueRecorder:
    """The example value of each traced node, and whether it depends only on shapes."""

    def __init__(self, root: torch.nn.Module, placeholder_values: dict[str, Any]):
        self._root = root
        self._placeholder_values = placeholder_values
        self._values: dict[fx.Node, Any] = {}
        self._static: dict[fx.Node, bool] = {}

    def record(self, node: fx.Node, args, kwargs) -> None:
        """Runs ``node``'s call on the values of ``args`` / ``kwargs`` (proxies or nodes)."""
        input_nodes: list[fx.Node] = []
        arg_values = map_aggregate(args, lambda a: self._value_of(a, input_nodes))
        kwarg_values = map_aggregate(kwargs, lambda a: self._value_of(a, input_nodes))
        value = self._run(node, arg_values, kwarg_values, input_nodes)
        self._values[node] = value
        self._static[node] = self._is_static(node, value, input_nodes)

    def value(self, node: fx.Node) -> Any:
        return self._values.get(node, _UNKNOWN)

    def is_static(self, node: fx.Node) -> bool:
        """Whether ``node``'s value is a known non-tensor computed from shapes and constants."""
        return self._static.get(node, False)

    def _value_of(self, argument, input_nodes: list) -> Any:
        node = argument.node if isinstance(argument, fx.Proxy) else argument
        if isinstance(node, fx.Node):
            input_nodes.append(node)
            return self._values.get(node, _UNKNOWN)
        return argument

    def _run(self, node: fx.Node, args, kwargs, input_nodes) -> Any:
        if node.op == "placeholder":
            return self._placeholder_values.get(node.target, _UNKNOWN)
        if node.op == "get_attr":
            try:
                return operator.attrgetter(node.target)(self._root)
            except AttributeError:
                return _UNKNOWN
        if any(self._values.get(n, _UNKNOWN) is _UNKNOWN for n in input_nodes):
            return _UNKNOWN
        try:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self._root.get_submodule(node.target)(*args, **kwargs)
        except Exception:  # the value stays unknown; the symbolic trace goes on without it
            return _UNKNOWN
        return _UNKNOWN

    def _is_static(self, node: fx.Node, value, input_nodes) -> bool:
        if value is _UNKNOWN or isinstance(value, torch.Tensor):
            return False
        if node.op == "placeholder":
            return True
        reads_shape = ((node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES)
                       or (node.op == "call_function" and node.target in _SHAPE_FUNCTIONS)
                       or (node.op == "call_method" and node.target in _SHAPE_METHODS))
        return reads_shape or all(self._static.get(n, False) for n in input_nodes)


class _ValueBehaviour:
    """What a proxy answers from its example value (see the module)."""

    def _recorder(self) -> ValueRecorder | None:
        return getattr(self.tracer, "values", None)

    def __bool__(self) -> bool:
        recorder = self._recorder()
        if recorder is not None and recorder.is_static(self.node):
            return bool(recorder.value(self.node))
        if recorder is not None and recorder.value(self.node) is not _UNKNOWN:
            raise fx.proxy.TraceError(
                "the model branches on the values inside a tensor (data-dependent control flow), "
                "which a traced graph cannot follow for other inputs")
        return self.tracer.to_bool(self)

    def __len__(self) -> int:
        value = self._known_value()
        if isinstance(value, torch.Tensor):
            return _guarded(self.size(0), value.shape[0], "len()")
        if hasattr(value, "__len__"):
            return len(value)
        if value is _UNKNOWN:
            raise RuntimeError("'len' is not supported on this traced value; its example value is unknown")
        raise TypeError(f"object of type '{type(value).__name__}' has no len()")

    def __iter__(self):
        value = self._known_value()
        if isinstance(value, (tuple, list, torch.Size, torch.Tensor)):
            return iter([self[i] for i in range(len(value))])
        unpacked = _unpacked_length(inspect.currentframe().f_back)
        if unpacked is not None:
            return iter([self[i] for i in range(unpacked)])
        return self.tracer.iter(self)

    def __setitem__(self, key, value) -> None:
        # recorded as a call: it writes into the example value now and into the tensor at run
        # time, in trace order, before anything traced after it reads the tensor
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __int__(self) -> int:
        return self._specialised(int)

    def __index__(self) -> int:
        return self._specialised(operator.index)

    def __float__(self) -> float:
        return self._specialised(float)

    def _specialised(self, convert):
        recorder = self._recorder()
        if recorder is None or not recorder.is_static(self.node):
            raise fx.proxy.TraceError(f"{convert.__name__}() of a traced value computed from tensor data "
                                      "(or not known), which a traced graph cannot follow for other inputs")
        return _guarded(self, convert(recorder.value(self.node)), f"{convert.__name__}()")

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = self._known_value()
        if value is not _UNKNOWN and not hasattr(value, name):  # hasattr(x, "SCB") as on the example
            raise AttributeError(f"the traced value (a {type(value).__name__}) has no attribute {name!r}")
        return ValueAttribute(self, name)

    def _known_value(self) -> Any:
        recorder = self._recorder()
        return _UNKNOWN if recorder is None else recorder.value(self.node)


def _guarded(proxy, value, how: str):
    """``value``, the example's value of ``proxy``, made a constant of the graph, which then
    checks at run time that ``proxy`` still has it (a clear error, never a silently wrong
    result, when the DAG is called with sizes the model specialised on)."""
    message = (f"the model turned a size into a Python number ({how}) while it was converted: the DAG "
               f"runs only where it is {value!r}, as in the example inputs; convert with example inputs "
               "of the sizes it will run with")
    proxy.tracer.create_proxy("call_function", torch._assert, (proxy == value, message), {})
    return value


def _unpacked_length(frame) -> int | None:
    """The length ``a, b = proxy`` unpacks to in ``frame``, or None if it is no unpacking."""
    instructions = list(dis.get_instructions(frame.f_code))
    if sys.version_info >= (3, 11):
        index = next((i for i, inst in enumerate(instructions) if inst.offset >= frame.f_lasti), 0)
    else:
        index = frame.f_lasti // 2
    instruction = instructions[index]
    return instruction.argval if instruction.opname == "UNPACK_SEQUENCE" else None


class ValueProxy(_ValueBehaviour, fx.Proxy):
    """A torch.fx proxy that knows its example value."""


class TracedParameter(fx.proxy.ParameterProxy):
    """A parameter's proxy (its shape a constant, as in torch.fx) with only the attributes the
    parameter has: ``hasattr(weight, "SCB")`` (a quantised layer's statistics) answers as for the
    parameter itself, rather than recording an attribute read that fails at run time."""

    def size(self, dim: int | None = None):
        """The parameter's size, or one of its sizes (torch.fx's ``size()`` takes no ``dim``)."""
        return self.param.size() if dim is None else self.param.size(dim)

    def __getattr__(self, name: str):
        param = self.__dict__.get("param")
        if param is not None and not (name.startswith("__") and name.endswith("__")) and not hasattr(param, name):
            raise AttributeError(f"parameter {self.__dict__.get('name')!r} has no attribute {name!r}")
        return super().__getattr__(name)


class ValueAttribute(_ValueBehaviour, fx.proxy.Attribute):
    """An attribute read (``x.shape``, ``x.ndim``) of a :class:`ValueProxy`."""


def holds_proxy(value) -> bool:
    """Whether ``value`` is a proxy or a (nested) tuple, list or dict holding one."""
    found = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return bool(found)


def _recorded(tracer, original):
    def call(*args, **kwargs):
        if holds_proxy((args, kwargs)):
            return tracer.create_proxy("call_function", original, args, kwargs)
        return original(*args, **kwargs)
    return call


def _recorded_method(tracer, original):
    def call(self, *args, **kwargs):
        if not isinstance(self, fx.Proxy) and holds_proxy((args, kwargs)):
            return tracer.create_proxy("call_method", original.__name__, (self, *args), kwargs)
        return original(self, *args, **kwargs)
    return call


def _with_example_values(tracer, original, static_only: bool):
    """``original`` called with each proxy among its arguments replaced by the example's value.
    With ``static_only``, a value not computed from shapes, dtypes and fixed arguments stops the
    trace; otherwise, traced symbolically (no values), the proxy is passed on."""
    def concrete(argument):
        if not isinstance(argument, fx.Proxy):
            return argument
        recorder = tracer.values
        if static_only and (recorder is None or not recorder.is_static(argument.node)):
            raise fx.proxy.TraceError(f"torch.{original.__name__} of a traced value that is not a known "
                                      "dtype or device")
        return argument if recorder is None else recorder.value(argument.node)

    def call(*args, **kwargs):
        return original(*map_aggregate(args, concrete), **map_aggregate(kwargs, concrete))
    return call


def _specialised(tracer, original):
    """``torch.finfo`` / ``torch.iinfo`` of a traced dtype, ``torch.is_autocast_enabled`` /
    ``torch.get_autocast_dtype`` of a traced device type: the example's answer (a constant)."""
    return _with_example_values(tracer, original, static_only=True)


def _context_arguments(tracer, original):
    """A context manager (``torch.autocast``) built from the example's values: it shapes how the
    ops inside run while tracing, and is not itself part of the graph."""
    return _with_example_values(tracer, original, static_only=False)


def _dtype_of_proxy(tracer, original):
    def call(input):
        return input.dtype if isinstance(input, fx.Proxy) else original(input)
    return call


_TRANSFORMER = torch.nn.modules.transformer
# (namespace, name, wrapper): torch's own transformer blocks, traced through with values, check
# ``isinstance(mask, Tensor)`` to read a mask's dtype, and compare a given mask with the causal
# one (``_detect_is_causal_mask`` reads its values: recorded as a call, run on the DAG's mask)
_PATCHES = ((torch, "tensor", _recorded), (torch, "as_tensor", _recorded), (torch, "finfo", _specialised),
            (torch, "iinfo", _specialised), (torch, "is_autocast_enabled", _specialised),
            (torch, "get_autocast_dtype", _specialised), *((torch, name, _recorded) for name in _SIZED_FUNCTIONS),
            (torch.nn.functional, "_none_or_dtype", _dtype_of_proxy), (torch, "autocast", _context_arguments),
            (_TRANSFORMER, "_detect_is_causal_mask", _recorded),
            *((torch.Tensor, name, _recorded_method) for name in _SIZED_METHODS))


@contextlib.contextmanager
def torch_functions_for_proxies(tracer):
    """While active, the torch functions named in the module's docstring accept proxies."""
    originals = [(namespace, name, wrap, getattr(namespace, name)) for namespace, name, wrap in _PATCHES
                 if hasattr(namespace, name)]  # private torch names may move between versions
    try:
        for namespace, name, wrap, original in originals:
            setattr(namespace, name, wrap(tracer, original))
        yield
    finally:
        for namespace, name, _, original in originals:
            setattr(namespace, name, original)
