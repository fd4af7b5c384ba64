"""torch.fx -> DagModule conversion.

What tracing keeps whole, rewrites first or records as one call is registered in
:mod:`dagprune.leaf_modules`; its registration functions are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import traceback
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from dagprune.dag_module import _NO_DEFAULT, DagModule, InnerVertex, InputVertex, Vertex
from dagprune.errors import ConversionError
from dagprune.example_inputs import ExampleInputs, as_example_inputs
from dagprune.integrations import load_support_for_imported_libraries
from dagprune.leaf_modules import (LEAF_MODULE_TYPES, apply_module_rewrites, autowrap_functions,
                                   is_registered_leaf, is_traced_with_values, register_autowrap_function,
                                   register_leaf_module, register_module_rewrite)
from dagprune.module_copy import copy_module
from dagprune.ops.base import op_class_for_function
from dagprune.ops.functions import function_name, method_name, register_function
from dagprune.ops.parameter import ModuleCallOp, ParameterOp
from dagprune.ops.templates import InputRef, map_template
from dagprune.outputs import OutputRecord
from dagprune.specialization import (FIXED_META, OutputType, argument_values, default_arguments,
                                     fixed_arguments, remove_fixed_placeholders, required_extras,
                                     traced_signature)
from dagprune.training_branches import warn_on_training_branches, writes_in_place
from dagprune.training_mode import evaluation_mode
from dagprune.value_tracing import (TracedParameter, ValueProxy, ValueRecorder, holds_proxy,
                                   torch_functions_for_proxies)

__all__ = ["build_from_unstructured_module", "needs_example_inputs", "register_leaf_module",
           "register_module_rewrite", "register_autowrap_function", "LEAF_MODULE_TYPES"]

register_function(torch._assert, "torch._assert")
register_function(torch._assert_async, "torch._assert_async")  # value tracing records it (timm's Gemma 4 pooler)
register_function(nn.modules.transformer._detect_is_causal_mask)  # recorded by value tracing


# torch.nn blocks traced through when example values are at hand (their forwards branch on
# sizes, devices and flags); without them they stay whole, as black boxes
_TRACED_WITH_VALUES = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                       nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class _DagTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: set[str]):
        super().__init__(autowrap_functions=autowrap_functions(), param_shapes_constant=True)
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self.values: ValueRecorder | None = None
        self._computing_values = False
        self._attribute_names: dict[str, dict[int, str]] = {}

    def record_values(self, root: nn.Module, placeholder_values: dict[str, Any]) -> None:
        """From now on, runs every traced call on example values (see :mod:`dagprune.value_tracing`),
        and traces buffers as graph attributes."""
        self.values = ValueRecorder(root, placeholder_values)
        self.proxy_buffer_attributes = True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.values is not None and not self._computing_values and isinstance(proxy, fx.Proxy):
            self._computing_values = True  # module calls and attribute reads run eagerly meanwhile
            try:
                self.values.record(proxy.node, args, kwargs)
            finally:
                self._computing_values = False
        return proxy

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self._computing_values or not self._is_installed(m):
            return forward(*args, **kwargs)  # a module made on the fly is traced through
        return super().call_module(m, forward, args, kwargs)

    def _is_installed(self, module: nn.Module) -> bool:
        try:
            self.path_of_module(module)
        except NameError:
            return False
        return True

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        if self._computing_values:
            return attr_val
        if isinstance(attr_val, nn.Parameter):
            return self._attribute_proxy(attr_val, parameter_proxy_cache, self.root.named_parameters, TracedParameter)
        if self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor):
            return self._attribute_proxy(attr_val, parameter_proxy_cache, self.root.named_buffers)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _attribute_proxy(self, value: torch.Tensor, cache: dict, named_tensors, proxy_class=None):
        """The graph attribute of a parameter or buffer of the model (its name from
        ``named_tensors``), or the tensor itself if it is none of them."""
        names = self._attribute_names.get(named_tensors.__name__)
        if names is None:  # a tensor held under several names: the first, as torch.fx names it
            names = self._attribute_names[named_tensors.__name__] = {}
            for tensor_name, tensor in named_tensors(remove_duplicate=False):
                names.setdefault(id(tensor), tensor_name)
        name = names.get(id(value))
        if name is None:
            return value
        if name not in cache:
            factory = None if proxy_class is None else (lambda node: proxy_class(self, node, name, value))
            cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return cache[name]

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self._leaf_names or isinstance(module, self._leaf_types):
            return True
        if self.values is not None and (type(module) in _TRACED_WITH_VALUES or is_traced_with_values(module)):
            return False
        if isinstance(module, DagModule):
            return True
        if type(module) in LEAF_MODULE_TYPES:  # its condition decides, even for torch.nn types
            return is_registered_leaf(module)
        return super().is_leaf_module(module, qualified_name)


def build_from_unstructured_module(model: nn.Module, leaf_modules: Iterable = (),
                                   name: str | None = None, copy_model: bool = True,
                                   example_inputs: Any = None) -> DagModule:
    """Converts any traceable ``nn.Module`` into an equivalent :class:`DagModule`.

    Each leaf module (standard ``torch.nn`` layers, registered leaf types, ``leaf_modules``)
    becomes one vertex; every functional call becomes a small op module from
    :mod:`dagprune.ops`; parameters read directly (class tokens, position embeddings, layer
    scales) become :class:`~dagprune.ops.ParameterOp` vertices.

    Args:
        model: the model to convert. It is traced in eval mode; the DAG is returned in the
            model's mode. Python branches on ``self.training`` are fixed to their eval value,
            while dropout and batch-norm layers follow the DAG's mode; a module whose train
            branch runs other ops (not just other constants) gets a
            :class:`~dagprune.errors.TrainingBranchWarning` naming it (see
            :mod:`dagprune.training_branches`).
        leaf_modules: module types or qualified module names to keep whole.
        name: the DAG's name (defaults to the model's class name).
        copy_model: convert a deep copy (default) so the DAG never shares parameters with
            ``model``; pass False to share them.
        example_inputs: what the model is called with (a tensor, a tuple of positional values
            or a dict of keyword values). Arguments given as tensors become the DAG's inputs;
            arguments given as other values, and those left out that have defaults, are fixed
            to that value (branches on them follow the example; see
            :mod:`dagprune.specialization`). The DAG is then called like the model with the
            same tensors: ``dag(*args)`` / ``dag(**kwargs)``. Without them, the model is
            traced as called with its arguments that have no default (``model(x)``): those
            are the DAG's inputs, the others are fixed to their defaults.

    Returns:
        The DAG, checked with :meth:`DagModule.lint`.

    Raises:
        ConversionError: torch.fx cannot trace a part of the model; the message names the module
            path, the failing call and its source line, and suggests ``leaf_modules=[...]``.
            Also for what is not an eager ``nn.Module``: a ``DataParallel`` or
            ``DistributedDataParallel`` wrapper (pass ``model.module``), a ``torch.compile``d
            model (pass ``model._orig_mod``) or a TorchScript module (pass the eager module).

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    >>> _ = model(torch.zeros(1, 3, 5, 5))
    >>> dag = build_from_unstructured_module(model)
    >>> [v.name for v in dag.inner_vertices]
    ['_0', '_1', '_2', '_3']
    """
    _check_eager_module(model)
    load_support_for_imported_libraries()
    leaf_modules = list(leaf_modules)
    leaf_types = tuple(item for item in leaf_modules if isinstance(item, type))
    leaf_names = {item for item in leaf_modules if isinstance(item, str)}
    source = copy_module(model) if copy_model else model
    source = apply_module_rewrites(source, in_place=copy_model)
    was_training = source.training
    inputs = None if example_inputs is None else as_example_inputs(example_inputs)
    tracer = _DagTracer(leaf_types, leaf_names)
    output_type = OutputType()
    try:
        with evaluation_mode(source), _cached_values_restored():
            graph = _trace(tracer, source, inputs, output_type)
    except ConversionError:
        raise
    except Exception as error:  # torch.fx raises many types; all mean "cannot trace"
        raise _conversion_error(error, tracer) from error
    warn_on_training_branches(graph, source, functools.partial(
        _trace_in_train_mode, leaf_types=leaf_types, leaf_names=leaf_names, inputs=inputs))
    dag = _graph_to_dag(graph, source, name or type(model).__name__, output_type.value)
    dag.train(was_training)
    dag.lint()
    return dag


def _trace_in_train_mode(source: nn.Module, leaf_types, leaf_names, inputs) -> fx.Graph | None:
    """``source``'s graph traced as it is (in train mode, for :mod:`dagprune.training_branches`),
    or None when it cannot be traced so. With example values the trace runs the modules, whose
    train-mode forwards may update buffers (batch-norm statistics): their values are put back."""
    buffers = {} if inputs is None else {id(b): (b, b.clone()) for b in source.buffers()}
    try:
        with _cached_values_restored():
            return _trace(_DagTracer(leaf_types, leaf_names), source, inputs, OutputType())
    except Exception:  # noqa: BLE001 - the eval-mode graph stands; only the comparison is skipped
        return None
    finally:
        with torch.no_grad():
            for buffer, value in buffers.values():
                buffer.copy_(value)


def needs_example_inputs(model: nn.Module) -> bool:
    """Whether ``model`` holds blocks that tracing follows only with example inputs (registered
    with ``traced_with_values=True``, e.g. timm's MobileViT and TinyViT blocks): converted
    without them, each such block stays one vertex whose channels are not followed.

    >>> needs_example_inputs(nn.Sequential(nn.Conv2d(3, 4, 1)))
    False
    """
    load_support_for_imported_libraries()
    return any(is_traced_with_values(module) for module in model.modules())


def _trace(tracer: _DagTracer, source: nn.Module, inputs: ExampleInputs | None, output_type: OutputType) -> fx.Graph:
    """The graph of ``source``: traced symbolically (arguments with defaults fixed to them, see
    :func:`~dagprune.specialization.default_arguments`), or, with example inputs, with its forward
    specialised on them (see :mod:`dagprune.specialization`) and run on their values (see
    :mod:`dagprune.value_tracing`)."""
    if inputs is None:
        fixed = default_arguments(source)
        with torch_functions_for_proxies(tracer):  # torch.zeros(x.shape[0], n) records a call
            graph = tracer.trace(source, concrete_args=fixed or None)
        remove_fixed_placeholders(graph, source, fixed)
        return graph
    with traced_signature(source, inputs, output_type):
        fixed = fixed_arguments(source, inputs)
        tracer.record_values(source, {**argument_values(source, inputs), **fixed})
        with torch_functions_for_proxies(tracer):
            graph = tracer.trace(source, concrete_args=fixed or None)
        remove_fixed_placeholders(graph, source, fixed)
    required_extras(graph, source, inputs)
    return graph


_UNSET = object()


@contextlib.contextmanager
def _cached_values_restored():
    """While active, a forward may cache traced values on its module (``self.rel_indices =
    f(x)``); on exit each attribute or buffer so assigned a proxy (or a list, tuple or dict
    holding one) gets back the value it had before (or is removed), so the user's model keeps
    its tensors and the graph's reads of the attribute before the assignment resolve to that
    value. Assignments are recorded as they happen (``nn.Module.__setattr__``)."""
    assigned: list[tuple[nn.Module, str, bool, Any]] = []
    original = nn.Module.__setattr__

    def recording_setattr(module, name, value):
        if holds_proxy(value):
            was_buffer = name in module.__dict__.get("_buffers", {})
            before = module._buffers[name] if was_buffer else module.__dict__.get(name, _UNSET)
            assigned.append((module, name, was_buffer, before))
        original(module, name, value)

    nn.Module.__setattr__ = recording_setattr
    try:
        yield
    finally:
        nn.Module.__setattr__ = original
        for module, name, was_buffer, before in reversed(assigned):
            module.__dict__.pop(name, None)
            if was_buffer:
                module._buffers[name] = before
            else:
                module._buffers.pop(name, None)
                if before is not _UNSET:
                    module.__dict__[name] = before


def _check_eager_module(model) -> None:
    """Raises :class:`ConversionError` with the fix for what torch.fx cannot trace as a whole:
    wrappers around a module, compiled and scripted modules, and non-modules."""
    kind = type(model).__name__
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ConversionError(f"the model is wrapped in {kind}, which cannot be traced; unwrap with .module: "
                              "build_from_unstructured_module(model.module)")
    if isinstance(model, nn.Module) and kind == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise ConversionError("the model was compiled with torch.compile, whose OptimizedModule cannot be "
                              "traced; pass the original module: build_from_unstructured_module(model._orig_mod)")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConversionError(f"the model is a TorchScript module ({kind}), which cannot be traced: its Python "
                              "code is gone; pass the eager nn.Module it was scripted or traced from")
    if not isinstance(model, nn.Module):
        raise ConversionError(f"build_from_unstructured_module needs an nn.Module, got {kind}; wrap a function "
                              "in an nn.Module whose forward calls it")
    scripted = next(((name, module) for name, module in model.named_modules()
                     if isinstance(module, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise ConversionError(f"module '{scripted[0]}' is a TorchScript module ({type(scripted[1]).__name__}), which "
                              "cannot be traced or saved in a DAG: its Python code is gone; put the eager nn.Module "
                              "it was scripted or traced from in its place")
    _check_no_hook_reparametrization(model)


# the deprecated reparametrizations that recompute a weight in a forward pre-hook, by their
# function's name
_HOOK_REPARAMETRIZATIONS = {WeightNorm: "weight_norm", SpectralNorm: "spectral_norm"}


def _check_no_hook_reparametrization(model: nn.Module) -> None:
    """Raises :class:`ConversionError` for a layer under the deprecated ``torch.nn.utils.weight_norm``
    or ``spectral_norm``: its weight is a non-leaf tensor recomputed by a hook, which can be
    neither copied nor traced; their ``torch.nn.utils.parametrizations`` versions convert."""
    for path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            name = _HOOK_REPARAMETRIZATIONS.get(type(hook))
            if name is not None:
                raise ConversionError(
                    f"module {path or '<root>'!r} ({type(module).__name__}) uses the deprecated "
                    f"torch.nn.utils.{name}, whose weight is recomputed by a hook that cannot be copied or "
                    f"traced; use torch.nn.utils.parametrizations.{name} instead (call "
                    f"torch.nn.utils.remove_{name}(module), then torch.nn.utils.parametrizations."
                    f"{name}(module)), which dagprune converts, saves and prunes")


def _conversion_error(error: Exception, tracer: _DagTracer) -> ConversionError:
    stack = list(getattr(tracer, "module_stack", {}).values())
    path, module_type = (stack[-1] if stack else ("", None))
    module_path = path or "<root>"
    type_name = getattr(module_type, "__name__", module_type) if module_type else "model"
    own_dirs = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep, "<")
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith(own_dirs)]
    where = f"{frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "unknown"
    if not path:  # the model's own forward: nothing above it could hold it whole
        remedy = ("Move that code into a submodule and pass its type in leaf_modules=[...] to "
                  "build_from_unstructured_module (or dagprune.register_leaf_module), or make the "
                  "forward free of data-dependent Python control flow.")
    else:
        leaf_hint = (f"leaf_modules=[{type_name}]" if isinstance(type_name, str) and module_type
                     else f"leaf_modules=[{module_path!r}]")
        remedy = (f"Keep that module whole by passing {leaf_hint} to build_from_unstructured_module "
                  "(or dagprune.register_leaf_module), or make its forward free of data-dependent "
                  "Python control flow.")
    if tracer.values is None and "control flow" in str(error):
        remedy = ("If it branches on sizes (x.ndim, x.shape), convert with example inputs, "
                  "build_from_unstructured_module(model, example_inputs=(x,)): the branches then follow the "
                  "example. " + remedy)
    return ConversionError(
        f"torch.fx cannot trace module '{module_path}' ({type_name}) at {where}: "
        f"{type(error).__name__}: {error}. {remedy}")


def _graph_to_dag(graph: fx.Graph, root: nn.Module, name: str, output_type: type | None = None) -> DagModule:
    vertex_of: dict[fx.Node, Vertex] = {}
    inputs: list[InputVertex] = []
    inner: list[InnerVertex] = []
    attribute_vertices: dict[str, InnerVertex] = {}
    output_vertices: list[Vertex] = []
    output_structure = None
    names: set[str] = set()
    for node in graph.nodes:
        if FIXED_META in node.meta:  # a fixed argument keeps its name: it may be passed by keyword
            node.name = node.meta[FIXED_META][0]
        node.name = _unique_vertex_name(node.name, names)
        if node.op == "placeholder":
            vertex = _input_vertex(node)
            inputs.append(vertex)
        elif node.op == "get_attr":
            if node.target in attribute_vertices:
                vertex_of[node] = attribute_vertices[node.target]
                continue
            value = operator.attrgetter(node.target)(root)
            if not isinstance(value, torch.Tensor):
                raise ConversionError(f"attribute '{node.target}' read by the model is a "
                                      f"{type(value).__name__}, not a tensor; make its user a leaf")
            vertex = InnerVertex(node.name, ParameterOp(value), [], qualified_name=node.target)
            attribute_vertices[node.target] = vertex
            inner.append(vertex)
        elif node.op in ("call_module", "call_function", "call_method"):
            _refuse_parameter_write(node, root)
            predecessors: list[fx.Node] = []
            args = _nodes_to_holes(tuple(node.args), predecessors)
            kwargs = _nodes_to_holes(dict(node.kwargs), predecessors)
            module, qualified_name = _module_for(node, root, args, kwargs, predecessors)
            vertex = InnerVertex(node.name, module, [vertex_of[p] for p in predecessors],
                                 qualified_name=qualified_name)
            inner.append(vertex)
        elif node.op == "output":
            outputs: list[fx.Node] = []
            output_structure = _nodes_to_holes(node.args[0], outputs)
            output_vertices = [vertex_of[n] for n in outputs]
            continue
        else:  # pragma: no cover - fx has no other node kinds
            raise ConversionError(f"unexpected torch.fx node kind {node.op!r} at {node.name}")
        vertex_of[node] = vertex
    if output_type is not None and isinstance(output_structure, dict):
        output_structure = OutputRecord(output_type.__qualname__, output_structure, output_type)
    return DagModule(inputs, inner, output_vertices, output_structure, name=name)


def _input_vertex(node: fx.Node) -> InputVertex:
    """The DAG input of a placeholder: a fixed argument keeps its name and value."""
    if FIXED_META in node.meta:
        return InputVertex(node.name, node.meta[FIXED_META][1], fixed=True)
    return InputVertex(node.name, node.args[0] if node.args else _NO_DEFAULT)


def _nodes_to_holes(template, nodes: list) -> object:
    """Replaces each fx node in ``template`` by an :class:`InputRef` to its position in
    ``nodes``, appending nodes seen for the first time."""
    def hole(value):
        if isinstance(value, fx.Node):
            if value not in nodes:
                nodes.append(value)
            return InputRef(nodes.index(value))
        return value
    return map_template(template, hole)


def _unique_vertex_name(name: str, taken: set[str]) -> str:
    """``name``, changed if needed so it is unique and no attribute of ``nn.ModuleDict``."""
    candidate, suffix = name, 1
    while candidate in taken or hasattr(nn.ModuleDict, candidate):
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def _module_for(node: fx.Node, root: nn.Module, args, kwargs, predecessors: Sequence[fx.Node]):
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        plain_call = (not kwargs and len(args) == len(predecessors)
                      and all(isinstance(a, InputRef) and a.index == i for i, a in enumerate(args)))
        return (module if plain_call else ModuleCallOp(module, args, kwargs)), node.target
    try:
        name = method_name(node.target) if node.op == "call_method" else function_name(node.target)
    except ConversionError as error:
        raise ConversionError(f"at traced call '{node.name}' (from {_node_origin(node)}): {error}") from error
    name = _elementwise_extreme(name, args, kwargs)
    return op_class_for_function(name)(name, args, kwargs), None


_EXTREME_OF_TWO = {"max": "maximum", "min": "minimum"}


def _elementwise_extreme(name: str, args, kwargs) -> str:
    """``torch.max(a, b)`` / ``a.min(b)`` of two tensors are the elementwise ``torch.maximum`` /
    ``minimum`` (not a reduction along ``dim``): the name of the function they compute."""
    namespace, _, short_name = name.rpartition(".")
    if namespace not in ("torch", "Tensor") or short_name not in _EXTREME_OF_TWO:
        return name
    other = args[1] if len(args) > 1 else kwargs.get("other")
    return f"{namespace}.{_EXTREME_OF_TWO[short_name]}" if isinstance(other, InputRef) else name


def _refuse_parameter_write(node: fx.Node, root: nn.Module) -> None:
    """A model that writes into its own parameter while it runs (``weight.div_(2)``,
    ``weight[0] = 1``) would have the DAG repeat the write on every call: a clear error instead."""
    writes = writes_in_place(node) and node.target != "requires_grad_"  # a flag, not values
    target = node.args[0] if node.args else None
    if not (writes and isinstance(target, fx.Node) and target.op == "get_attr"):
        return
    if isinstance(operator.attrgetter(target.target)(root), nn.Parameter):
        operation = node.target if isinstance(node.target, str) else node.target.__name__
        raise ConversionError(
            f"the model writes into its parameter '{target.target}' while it runs ({operation} from "
            f"{_node_origin(node)}); a DAG would repeat the write on every call. If the model does it once "
            "(some models rescale their weights on their first call in eval mode), call the model once in the "
            "mode it will run in before converting it; otherwise keep the module that writes whole with "
            "leaf_modules=[...]")


def _node_origin(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return next(reversed(stack.values()))[0] if isinstance(next(reversed(stack.values())), tuple) \
            else str(next(reversed(stack)))
    return node.stack_trace.strip().splitlines()[-1] if node.stack_trace else "the model"

