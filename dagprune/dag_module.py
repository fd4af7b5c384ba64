"""DagModule: a model as an explicit DAG of vertices, executed in topological order."""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from dagprune.errors import DagLintError, DagpruneError, ExecutionError, SerializationError
from dagprune.ops.base import FunctionalOp
from dagprune.ops.parameter import ModuleCallOp
from dagprune.ops.templates import InputRef, fill_output, template_inputs

__all__ = ["DagModule", "Vertex", "InputVertex", "InnerVertex"]

class _NoDefault:
    """Marks an input without a default value; one instance, kept by copy and deepcopy."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_NoDefault, ())

    def __repr__(self) -> str:
        return "<no default>"


_NO_DEFAULT = _NoDefault()


class Vertex:
    """A node of a :class:`DagModule`; identified by its unique ``name``."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class InputVertex(Vertex):
    """An input of the DAG: the value passed to ``forward`` at its position (or its default).

    A *fixed* input is an argument the model was converted with a constant value for (a flag,
    a scale, ``attention_mask=None``; see ``example_inputs`` of
    :func:`~dagprune.build_from_unstructured_module`): the DAG computes what the model computes
    for ``default`` and refuses any other value.
    """

    def __init__(self, name: str, default: Any = _NO_DEFAULT, fixed: bool = False):
        super().__init__(name)
        self.default = default
        self.fixed = fixed

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT

    def check_fixed(self, value: Any, dag_name: str) -> None:
        """Raises ``TypeError`` when a fixed input is given another value than its own."""
        same = value is self.default or (not isinstance(value, torch.Tensor) and type(value) is type(self.default)
                                         and value == self.default)
        if self.fixed and not same:
            raise TypeError(f"{dag_name} was converted with {self.name}={self.default!r} fixed, got "
                            f"{_short_repr(value)}; convert the model again with that value in example_inputs")


def _short_repr(value: Any) -> str:
    """``value``'s repr, a tensor described by its shape and dtype (its values could fill pages)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class InnerVertex(Vertex):
    """A module applied to the outputs of its ordered ``predecessors``.

    Attributes:
        module: the ``nn.Module`` called as ``module(*predecessor_outputs)``.
        predecessors: the vertices whose outputs feed the module, in argument order.
        qualified_name: where the computation came from in the original model (a module path
            such as ``"layer1.0.conv1"`` or an attribute path such as ``"cls_token"``), if known.
    """

    def __init__(self, name: str, module: nn.Module, predecessors: Sequence[Vertex],
                 qualified_name: str | None = None):
        super().__init__(name)
        self.module = module
        self.predecessors = list(predecessors)
        self.qualified_name = qualified_name


class DagModule(nn.Module):
    """A model expressed as a DAG: inputs, inner vertices in topological order, outputs.

    Args:
        inputs: the input vertices, in ``forward`` argument order.
        inner_vertices: the inner vertices in a topological order.
        output_vertices: the vertices whose values form the output.
        output_structure: how the output is arranged (a template over ``output_vertices``:
            ``InputRef(0)`` for a single tensor, a tuple of refs for several outputs). By
            default the single output's value, or a tuple of all outputs in order.
        name: a name for summaries.

    >>> x = InputVertex("x")
    >>> relu = InnerVertex("relu", nn.ReLU(), [x])
    >>> dag = DagModule([x], [relu], [relu])
    >>> dag(torch.tensor([-1.0, 2.0]))
    tensor([0., 2.])
    """

    def __init__(self, inputs: Sequence[InputVertex], inner_vertices: Sequence[InnerVertex],
                 output_vertices: Sequence[Vertex], output_structure: Any = None,
                 name: str = "dag"):
        super().__init__()
        self.name = name
        self.inputs = list(inputs)
        self.inner_vertices = list(inner_vertices)
        self.output_vertices = list(output_vertices)
        if output_structure is None:  # one output: the value; several: a tuple, in order
            output_structure = InputRef(0) if len(self.output_vertices) == 1 else \
                tuple(InputRef(i) for i in range(len(self.output_vertices)))
        self.output_structure = output_structure
        self.vertex_modules = nn.ModuleDict()
        self.refresh()

    # ----------------------------------------------------------------------------- structure
    def refresh(self) -> None:
        """Re-registers vertex modules and execution bookkeeping after the vertex lists changed."""
        self.vertex_modules = nn.ModuleDict({v.name: v.module for v in self.inner_vertices})
        position = {v: i for i, v in enumerate(self.inner_vertices)}
        last_use: dict[Vertex, int] = {}
        for index, vertex in enumerate(self.inner_vertices):
            for predecessor in vertex.predecessors:
                last_use[predecessor] = index
        keep = set(self.output_vertices)
        release: list[list[Vertex]] = [[] for _ in self.inner_vertices]
        for vertex, index in last_use.items():
            if vertex not in keep and (vertex in position or vertex in self.inputs):
                release[index].append(vertex)
        self._release_after = release

    @property
    def vertices(self) -> list[Vertex]:
        """All vertices: inputs first, then inner vertices in topological order."""
        return [*self.inputs, *self.inner_vertices]

    def vertex(self, name: str) -> Vertex:
        """The vertex called ``name``; raises ``KeyError`` listing close names otherwise."""
        for vertex in self.vertices:
            if vertex.name == name:
                return vertex
        close = difflib.get_close_matches(name, [v.name for v in self.vertices], n=5)
        raise KeyError(f"no vertex {name!r} in {self.name}; closest: {close}")

    def users(self) -> dict[Vertex, list[InnerVertex]]:
        """Maps every vertex to the inner vertices that read it (derived, never stored)."""
        result: dict[Vertex, list[InnerVertex]] = {v: [] for v in self.vertices}
        for vertex in self.inner_vertices:
            for predecessor in dict.fromkeys(vertex.predecessors):
                result[predecessor].append(vertex)
        return result

    def replace_module(self, vertex: InnerVertex, module: nn.Module) -> None:
        """Makes ``vertex`` compute with ``module`` from now on."""
        vertex.module = module
        self.vertex_modules[vertex.name] = module

    # ----------------------------------------------------------------------------- execution
    def forward(self, *args, **kwargs):
        values = self._bind_inputs(args, kwargs)
        for vertex, released in zip(self.inner_vertices, self._release_after):
            values[vertex] = vertex.module(*[values[p] for p in vertex.predecessors])
            for dead in released:
                del values[dead]
        return fill_output(self.output_structure, [values[v] for v in self.output_vertices])

    def _bind_inputs(self, args: tuple, kwargs: dict) -> dict[Vertex, Any]:
        if len(args) > len(self.inputs):
            raise TypeError(f"{self.name} takes {len(self.inputs)} inputs "
                            f"({', '.join(v.name for v in self.inputs)}), got {len(args)}")
        values: dict[Vertex, Any] = {}
        for index, vertex in enumerate(self.inputs):
            if index < len(args):
                values[vertex] = args[index]
            elif vertex.name in kwargs:
                values[vertex] = kwargs.pop(vertex.name)
            elif vertex.has_default:
                values[vertex] = vertex.default
            else:
                raise TypeError(f"{self.name} is missing its input {vertex.name!r}")
        if kwargs:
            raise TypeError(f"{self.name} got unexpected inputs {sorted(kwargs)}")
        for vertex in self.inputs:
            if vertex.fixed:
                vertex.check_fixed(values[vertex], self.name)
        return values

    def forward_with_all_values(self, *args, **kwargs) -> dict[Vertex, Any]:
        """Runs the DAG like ``forward`` and returns the value of every vertex (for analysis
        passes that need them together; :meth:`iter_vertex_values` holds fewer at a time).

        Raises:
            ExecutionError: a vertex failed on the values it received (the message names the
                vertex, its module path and the shapes it got).
        """
        values = self._bind_inputs_or_raise(args, kwargs)
        for vertex in self.inner_vertices:
            values[vertex] = self._run_vertex(vertex, [values[p] for p in vertex.predecessors])
        return values

    def iter_vertex_values(self, *args, **kwargs) -> Iterator[tuple[Vertex, list, Any]]:
        """Runs the DAG like ``forward``, yielding ``(vertex, input values, value)`` for every
        vertex in :attr:`vertices` order (an input with no input values first). Like ``forward``,
        a value is dropped once the last vertex reading it has been yielded, so a pass over the
        values holds about the memory of one forward, not every activation at once.

        Raises:
            ExecutionError: as :meth:`forward_with_all_values`.
        """
        values = self._bind_inputs_or_raise(args, kwargs)
        for vertex in self.inputs:
            yield vertex, [], values[vertex]
        for vertex, released in zip(self.inner_vertices, self._release_after):
            inputs = [values[p] for p in vertex.predecessors]
            values[vertex] = self._run_vertex(vertex, inputs)
            yield vertex, inputs, values[vertex]
            del inputs
            for dead in released:
                del values[dead]

    def _bind_inputs_or_raise(self, args: tuple, kwargs: dict) -> dict[Vertex, Any]:
        try:
            return self._bind_inputs(args, dict(kwargs))
        except TypeError as error:
            raise ExecutionError(f"{self.name}: {error}") from error

    def _run_vertex(self, vertex: InnerVertex, inputs: list) -> Any:
        try:
            return vertex.module(*inputs)
        except DagpruneError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the op raised, named by vertex
            raise ExecutionError(_failed_vertex_message(self, vertex, inputs, error)) from error

    # ----------------------------------------------------------------------------- checking
    def lint(self) -> None:
        """Checks the invariants; raises :class:`~dagprune.errors.DagLintError` listing problems.

        Checked: unique vertex names, inputs are :class:`InputVertex` and inner vertices
        :class:`InnerVertex`, every predecessor is defined earlier in this DAG (topological
        order, no cycles, no foreign vertices), registered modules match the vertices, outputs
        belong to the DAG, and op templates refer only to existing inputs. Nested DAGs are
        checked too.
        """
        problems: list[str] = []
        seen: set[Vertex] = set()
        names: set[str] = set()
        for vertex in self.inputs:
            if not isinstance(vertex, InputVertex):
                problems.append(f"input {vertex!r} is not an InputVertex")
        for vertex in self.vertices:
            if vertex.name in names:
                problems.append(f"duplicate vertex name {vertex.name!r}")
            names.add(vertex.name)
            if isinstance(vertex, InnerVertex):
                for predecessor in vertex.predecessors:
                    if predecessor not in seen:
                        problems.append(f"vertex {vertex.name!r} reads {predecessor!r}, which is not "
                                        "an earlier vertex of this DAG (order or membership broken)")
                problems.extend(self._lint_module(vertex))
            elif not isinstance(vertex, InputVertex):
                problems.append(f"inner vertex {vertex!r} is not an InnerVertex")
            seen.add(vertex)
        for vertex in self.output_vertices:
            if vertex not in seen:
                problems.append(f"output {vertex!r} is not a vertex of this DAG")
        used = template_inputs(self.output_structure)
        if any(index >= len(self.output_vertices) for index in used):
            problems.append(f"output structure {self.output_structure!r} refers past "
                            f"{len(self.output_vertices)} output vertices")
        unused = sorted(set(range(len(self.output_vertices))) - set(used))
        if unused:
            problems.append(f"output vertices {[self.output_vertices[i].name for i in unused]} are "
                            f"not in the output structure {self.output_structure!r}")
        registered = dict(self.vertex_modules.items())
        if set(registered) != {v.name for v in self.inner_vertices} or any(
                registered[v.name] is not v.module for v in self.inner_vertices):
            problems.append("registered modules do not match the vertices; call refresh()")
        if problems:
            raise DagLintError(f"{self.name} is malformed:\n  - " + "\n  - ".join(problems))

    @staticmethod
    def _lint_module(vertex: InnerVertex) -> list[str]:
        module = vertex.module
        if not isinstance(module, nn.Module):
            return [f"vertex {vertex.name!r} holds {type(module).__name__}, not an nn.Module"]
        if isinstance(module, (FunctionalOp, ModuleCallOp)):
            refs = template_inputs((module.args, module.kwargs))
            if refs and max(refs) >= len(vertex.predecessors):
                return [f"vertex {vertex.name!r} uses input #{max(refs)} but has "
                        f"{len(vertex.predecessors)} predecessors"]
        if isinstance(module, DagModule):
            try:
                module.lint()
            except DagLintError as error:
                return [f"nested DAG at {vertex.name!r}: {error}"]
        return []

    # ----------------------------------------------------------------------------- display
    def summary(self, shapes: dict[Vertex, Any] | None = None) -> str:
        """A readable table of the vertices: index, name, op, predecessors, output shape, params.

        Args:
            shapes: optional vertex -> shape mapping (see :func:`dagprune.propagate_shapes`).
        """
        rows = [("#", "vertex", "op", "inputs", "output", "params")]
        for index, vertex in enumerate(self.vertices):
            if isinstance(vertex, InputVertex):
                op, inputs, params = "input", "", 0
            else:
                op = _describe_module(vertex.module)
                inputs = ", ".join(p.name for p in vertex.predecessors)
                params = sum(p.numel() for p in vertex.module.parameters())
            shape = _format_shape(shapes.get(vertex)) if shapes else ""
            rows.append((str(index), vertex.name, op, inputs, shape, f"{params:,}"))
        widths = [min(max(len(row[i]) for row in rows), 48) for i in range(len(rows[0]))]
        lines = ["  ".join(cell[:48].ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in rows]
        total = sum(p.numel() for p in self.parameters())
        outputs = ", ".join(v.name for v in self.output_vertices)
        lines.append(f"{len(self.inner_vertices)} inner vertices, {total:,} parameters, "
                     f"outputs: {outputs}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, inputs={[v.name for v in self.inputs]}, "
                f"vertices={len(self.inner_vertices)}")

    def __repr__(self) -> str:  # the default nn.Module repr of hundreds of vertices is useless
        return f"DagModule({self.extra_repr()})"

    # ----------------------------------------------------------------------------- saving
    def save(self, path: str | os.PathLike) -> str:
        """Saves the DAG without pickle to the directory ``path``; returns the path.

        A previous save at ``path`` is replaced atomically, and the directory's other files are
        kept. This calls :func:`dagprune.io.save_dag`, which is registered with
        :func:`register_dag_saver` when dagprune is imported.

        Raises:
            SerializationError: a module or constant of the DAG cannot be described, or ``path``
                is a file or a directory holding other files but no saved DAG.

        >>> import tempfile
        >>> x = InputVertex("x")
        >>> relu = InnerVertex("relu", nn.ReLU(), [x])
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     sorted(os.listdir(DagModule([x], [relu], [relu]).save(f"{directory}/relu")))
        ['graph.json', 'tensors.safetensors']
        """
        if _dag_saver is None:  # only while dagprune/__init__.py runs, before it imports io
            raise SerializationError("DagModule.save needs dagprune.io, which registers the saver; "
                                     "import dagprune before saving")
        return _dag_saver(self, path)


# The saving format lives in dagprune.io, which depends on this module; io registers its save
# function here when imported, and importing any part of dagprune imports it (through
# dagprune/__init__.py). So DagModule.save works while the dependency points one way.
_dag_saver: Callable[[DagModule, str | os.PathLike], str] | None = None


def register_dag_saver(saver: Callable[[DagModule, str | os.PathLike], str]
                       ) -> Callable[[DagModule, str | os.PathLike], str]:
    """Makes :meth:`DagModule.save` call ``saver(dag, path)``.

    :mod:`dagprune.io` registers :func:`~dagprune.io.save_dag` this way.

    Args:
        saver: saves a DAG to a path and returns the path it saved to.

    Returns:
        ``saver``, so that this can be used as a decorator.
    """
    global _dag_saver
    _dag_saver = saver
    return saver


def _describe_module(module: nn.Module) -> str:
    if isinstance(module, FunctionalOp):
        return module.short_name
    if isinstance(module, DagModule):
        return f"DagModule[{len(module.inner_vertices)}]"
    extra = module.extra_repr()
    return f"{type(module).__name__}({extra})" if extra else type(module).__name__


def _format_shape(value: Any) -> str:
    if isinstance(value, torch.Size) or (isinstance(value, tuple) and all(isinstance(v, int) for v in value)):
        return "x".join(str(d) for d in value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_format_shape(v) for v in value) + ")"
    return "" if value is None else type(value).__name__ if not isinstance(value, (int, float)) else str(value)


def iter_nested(dag: DagModule) -> Iterable[tuple[str, DagModule]]:
    """Yields ``(path, dag)`` for ``dag`` and every DAG nested inside it."""
    yield "", dag
    for vertex in dag.inner_vertices:
        if isinstance(vertex.module, DagModule):
            for path, inner in iter_nested(vertex.module):
                yield f"{vertex.name}.{path}".rstrip("."), inner


def _failed_vertex_message(dag: "DagModule", vertex: "InnerVertex", inputs: list, error: Exception) -> str:
    shapes = ", ".join(f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}" if isinstance(v, torch.Tensor)
                       else type(v).__name__ for v in inputs)
    where = f"vertex {vertex.name!r}" + (f" ({vertex.qualified_name})" if vertex.qualified_name else "")
    return (f"{dag.name} cannot run on these inputs: {where} failed on ({shapes}): "
            f"{type(error).__name__}: {error}. Check the input shape (without the batch axis) or "
            "the example inputs")
