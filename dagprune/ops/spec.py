"""One spec per op: everything dagprune knows about an op type, declared in one place.

An :class:`OpSpec` names the op types it describes (module classes, op families or function
names such as ``"torch.nn.functional.rms_norm"``) and holds one callable per *facet*:

``flops(module, inputs, output) -> int``
    FLOPs (``2 x multiply-adds``) of one call, given the values the op read and produced.
``coupling(ctx, vertex, module, layouts, values, output) -> layout``
    The op's channel map: for each input, ``layouts[i]`` maps the tensor axes that carry
    channels to the channel (atom) ids at each position; the facet returns the output's layout
    and records on ``ctx`` (a :class:`ChannelContext`) which channels are the same
    (``unify``), kept or removed together (``tie``), never removable (``barrier``), created
    here (``produce``) or mixed into other channels here (``consume``; of kind ``"inner"``
    for channels the op creates and reads back itself, a recurrent layer's hidden units or
    attention head dims: the site's positions follow the op's own convention and its masking
    facet applies the whole mask). ``opaque_coupling``
    declares an op whose channel behaviour is unknown: every channel reaching it is a barrier.
``removal(module, input_masks, output_mask, shapes) -> module``
    The op with channels removed: ``input_masks[i]`` / ``output_mask`` map axis -> boolean
    numpy array of kept positions (only axes that lose positions appear); ``shapes`` are the
    inputs' and then the output's shapes before removal.
``masking(module, inputs, mask, axis) -> output``  (optional)
    How a gate's mask applies where this op consumes channels on input 0 along ``axis``, when
    multiplying the input by the mask is not right (a normalisation whose statistics must skip
    removed channels) or not the fastest (scaling a convolution's weight instead). Without it
    the input is multiplied by the mask. With ``scales_output`` the facet also takes
    ``output_scale=``: a per-channel factor along ``axis`` of its output, folded into the op's
    own per-channel parameters, so a gate's mask on the op's consumers costs no full-size op.
``importance(module, vertex) -> ChannelWeight | None``  (ops with weights)
    The tensor that ranks the op's channels: a producer's filters (``kind="filter"``, scored by
    their L1 norm) or a normalisation's per-channel scale (``kind="scale"``).

Output shapes come from running the op on example values (like torch.fx's ``ShapeProp``), so
shape needs no facet. Registries are :class:`OpRegistry` objects; the default one is
:data:`dagprune.ops.OPS`, extended with :func:`dagprune.ops.register_op`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from dagprune.ops.functions import declare_function_names
from dagprune.ops.parameter import ModuleCallOp

__all__ = ["OpSpec", "OpRegistry", "ChannelWeight", "ChannelContext", "opaque_coupling",
           "FACETS", "REQUIRED_FACETS", "INNER_AXIS"]

FlopsFacet = Callable[[nn.Module, list, Any], int]
CouplingFacet = Callable[..., Any]
RemovalFacet = Callable[[nn.Module, list, dict, list], nn.Module]
MaskingFacet = Callable[[nn.Module, Sequence[Any], torch.Tensor, int], torch.Tensor]

FACETS = ("flops", "coupling", "removal", "masking", "importance")
REQUIRED_FACETS = ("flops", "coupling")
"""Facets every spec declares; ``removal`` is required unless the coupling is opaque (channels
never cross the op, so none are ever removed at it)."""
INNER_AXIS = -1
"""The producer axis (``ChannelContext.mark_producer``) of channels an op creates and reads
back inside itself, which lie on no axis of its output (attention head dims)."""


class ChannelContext(Protocol):
    """What a coupling facet may record about channels (implemented by the pruning layer)."""

    head_pruning: str
    users: dict

    def fresh(self, count: int) -> np.ndarray: ...
    def produce(self, count: int, axis: int) -> np.ndarray: ...
    def mark_producer(self, atoms: np.ndarray, axis: int) -> None: ...
    def unify(self, first: np.ndarray, second: np.ndarray) -> None: ...
    def tie(self, atoms: np.ndarray) -> None: ...
    def barrier(self, atoms: np.ndarray, reason: str = "") -> None: ...
    def barrier_layout(self, layout: Any, reason: str = "") -> None: ...
    def consume(self, vertex, input_index: int, axis: int, atoms: np.ndarray,
                kind: str = "mask") -> None: ...
    def count_flops(self, vertex, base_flops: int, factors: Sequence[np.ndarray]) -> None: ...
    def defer(self, rule: Callable[[Callable[[np.ndarray], np.ndarray]], None], stage: int = 1) -> None: ...


@dataclasses.dataclass(frozen=True)
class ChannelWeight:
    """The tensor ranking an op's channels along ``axis``; ``kind`` is ``"filter"`` (a
    producer's weights, one filter per channel) or ``"scale"`` (a per-channel scale)."""

    tensor: torch.Tensor
    axis: int
    kind: str = "filter"


def opaque_coupling(ctx: ChannelContext, vertex, module, layouts, values, output) -> None:
    """The coupling facet of an op whose channel behaviour is unknown: a barrier."""
    ctx.barrier_layout(layouts, f"{describe_op(module)} does not say how its channels flow "
                                "(describe it with dagprune.ops.register_op)")
    return None


def describe_op(module: nn.Module) -> str:
    """The torch op a module stands for: a function name, or the class name of the layer
    (of the called layer, for a layer called with constant arguments).

    >>> describe_op(nn.Conv2d(1, 1, 1))
    'Conv2d'
    """
    name = getattr(module, "function_name", None)
    if isinstance(name, str):
        return name
    if isinstance(module, ModuleCallOp):
        module = module.module
    return type(module).__qualname__


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything dagprune knows about one op type (see the module docstring for each facet).

    Args:
        name: a short, unique name (``"conv"``, ``"rms_norm"``).
        targets: module classes, op-family classes and function names this spec describes.
        flops, coupling, removal, masking, importance: the facets.
        reads_sizes: the coupling facet understands sizes read at run time from channel axes
            (``x.view(B, C, -1)`` with ``C = y.shape[1]``); for other facets such sizes are
            made barriers before the facet runs.
        full_masks: the removal facet receives a mask for every channel-carrying axis of its
            inputs, also for axes that keep every channel (a reshape's sizes read at run time
            from other tensors may need rewriting there).
        wraps: ``(module, inputs) -> (inner_module, positional_inputs)`` for an op that calls
            another (a leaf module called with constant arguments): FLOPs are the inner op's,
            unless the inner op's FLOPs are measured, in which case the whole call is.
        example: ``() -> (module, example_inputs)``, a tiny model using the op; the spec test
            converts it, counts its FLOPs, finds its channel groups and removes channels.
        inner_masks: the removal facet also receives ``inner_mask=``, the kept positions of
            the op's consumer site of kind ``"inner"`` (channels the op creates and reads back
            inside itself, such as attention head dims, which no tensor shows), or None.
        scales_output: the masking facet takes ``output_scale=`` (see the module docstring);
            only for ops whose output rows are computed independently along ``axis``'s other
            axes and whose output keeps the input's channel positions (a norm over the last axis).
        accepts_calls: every facet also takes a :class:`~dagprune.ops.ModuleCallOp` calling the
            layer (a layer called with constant arguments, ``lstm(x, None)``) as its
            ``module``, reading the layer's arguments with
            :func:`dagprune.ops.specs.calls.layer_call`: such calls then have this spec.
            Without it they are barriers.

    >>> spec = OpSpec("relu", (nn.ReLU,), flops=lambda m, i, o: 0, coupling=opaque_coupling)
    >>> spec.missing_facets()
    []
    """

    name: str
    targets: tuple
    flops: FlopsFacet
    coupling: CouplingFacet
    removal: RemovalFacet | None = None
    masking: MaskingFacet | None = None
    importance: Callable[[nn.Module, Any], ChannelWeight | None] | None = None
    reads_sizes: bool = False
    full_masks: bool = False
    wraps: Callable[[nn.Module, list], tuple[nn.Module, list]] | None = None
    example: Callable[[], tuple[nn.Module, tuple]] | None = None
    inner_masks: bool = False
    scales_output: bool = False
    accepts_calls: bool = False

    @property
    def is_opaque(self) -> bool:
        """Whether channels never cross this op (its coupling is :func:`opaque_coupling`)."""
        return self.coupling is opaque_coupling

    def missing_facets(self) -> list[str]:
        """The facets this spec must declare and does not."""
        missing = [facet for facet in REQUIRED_FACETS if getattr(self, facet) is None]
        if self.removal is None and not self.is_opaque:
            missing.append("removal")
        return missing


class OpRegistry:
    """Specs by target: a function name, or a module class (the most derived one wins).

    >>> registry = OpRegistry([OpSpec("relu", (nn.ReLU,), lambda m, i, o: 0, opaque_coupling)])
    >>> registry.lookup(nn.ReLU()).name
    'relu'
    >>> registry.lookup(nn.Tanh()) is None
    True
    """

    def __init__(self, specs: Iterable[OpSpec] = ()):
        self._specs: dict[str, OpSpec] = {}
        self._by_target: dict[Any, OpSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: OpSpec, replace: bool = False) -> OpSpec:
        """Adds ``spec``; with ``replace``, its targets move to it from earlier specs.

        Raises:
            ValueError: ``spec`` misses a facet, or its name or a target is taken (and not
                ``replace``).
        """
        missing = spec.missing_facets()
        if missing:
            raise ValueError(f"op spec {spec.name!r} lacks the facets {missing}; see "
                             "dagprune.ops.OpSpec")
        if not replace:
            taken = [t for t in spec.targets if t in self._by_target] + (
                [spec.name] if spec.name in self._specs else [])
            if taken:
                raise ValueError(f"op spec {spec.name!r}: {taken} already have a spec; pass "
                                 "replace=True to override it")
        self._specs[spec.name] = spec
        declare_function_names([t for t in spec.targets if isinstance(t, str)])
        for target in spec.targets:
            self._by_target[target] = spec
        return spec

    def lookup(self, module: nn.Module) -> OpSpec | None:
        """The spec of ``module``: by its function name, then by its type (most derived first).

        A layer called with constant arguments (a :class:`ModuleCallOp`) has the layer's spec
        when that spec ``accepts_calls``, else the spec of such calls.
        """
        name = getattr(module, "function_name", None)
        if isinstance(name, str) and name in self._by_target:
            return self._by_target[name]
        if isinstance(module, ModuleCallOp):
            layer_spec = self.lookup(module.module)
            if layer_spec is not None and layer_spec.accepts_calls:
                return layer_spec
        return self.lookup_type(type(module))

    def lookup_type(self, cls: type) -> OpSpec | None:
        """The spec of module class ``cls`` (the most derived registered base)."""
        for base in cls.__mro__:
            if base in self._by_target:
                return self._by_target[base]
        return None

    def lookup_function(self, function_name: str) -> OpSpec | None:
        """The spec registered for ``function_name`` itself (not for its family)."""
        return self._by_target.get(function_name)

    def __getitem__(self, name: str) -> OpSpec:
        if name not in self._specs:
            close = difflib.get_close_matches(name, self._specs, n=3)
            raise KeyError(f"no op spec named {name!r}" + (f" (closest: {close})" if close else ""))
        return self._specs[name]

    def __iter__(self) -> Iterator[OpSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def targets(self) -> list:
        """Every registered target (classes and function names)."""
        return list(self._by_target)
