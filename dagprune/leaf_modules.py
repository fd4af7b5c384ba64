"""What tracing keeps whole, rewrites first or records as one call: the tables and their registration.

Three tables, filled by :func:`register_leaf_module`, :func:`register_module_rewrite` and
:func:`register_autowrap_function` and read by :mod:`dagprune.tracing` (to convert models) and
:mod:`dagprune.module_serialization` (registered leaf types may be loaded by structure). Keeping
them here, below both, lets optional integrations such as :mod:`dagprune.timm_layers` register
their layers without depending on tracing.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from dagprune.ops.cond_conv import CondConv2d
from dagprune.ops.evo_norm import EvoNorm2d
from dagprune.ops.fourier_features import FourierPositionFeatures
from dagprune.ops.functions import register_function
from dagprune.ops.multihead_attention import PrunedMultiheadAttention
from dagprune.ops.padding import SamePad2d
from dagprune.ops.standardized_conv import StandardizedConv2d
from dagprune.ops.stochastic_depth import StochasticDepth

__all__ = ["LEAF_MODULE_TYPES", "register_leaf_module", "register_module_rewrite",
           "register_autowrap_function", "is_registered_leaf", "is_traced_with_values",
           "apply_module_rewrites", "autowrap_functions"]

LEAF_MODULE_TYPES: set[type] = set()
_LEAF_CONDITIONS: dict[type, Callable[[nn.Module], bool]] = {}
_TRACED_WITH_VALUES: set[type] = set()
_MODULE_REWRITES: dict[type, Callable[[nn.Module], nn.Module]] = {}
_PREDICATE_REWRITES: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = []
_AUTOWRAP_FUNCTIONS: list[Callable] = []


def register_leaf_module(cls: type, when: Callable[[nn.Module], bool] | None = None,
                         traced_with_values: bool = False) -> type:
    """Makes tracing keep modules of type ``cls`` whole (one vertex) instead of tracing inside.

    Use it for layers torch.fx cannot trace (data-dependent control flow) and that pruning or
    saving should treat as a unit. Registered types may also be loaded from a saved DAG by their
    structure.

    Args:
        cls: the module type.
        when: if given, only the instances for which ``when(module)`` returns True are kept
            whole (a block that is untraceable only in some configurations).
        traced_with_values: trace through the module anyway when the model is converted with
            ``example_inputs`` (a block whose forward branches on sizes: the branches then
            follow the example, see :mod:`dagprune.value_tracing`); kept whole otherwise.

    Returns:
        ``cls``, so that this can be used as a class decorator.

    >>> @register_leaf_module
    ... class Clamp(nn.Module):
    ...     def forward(self, x):
    ...         return x if x.min() >= 0 else x.clamp(min=0)
    >>> is_registered_leaf(Clamp())
    True
    """
    LEAF_MODULE_TYPES.add(cls)
    (_TRACED_WITH_VALUES.add if traced_with_values else _TRACED_WITH_VALUES.discard)(cls)
    if when is None:
        _LEAF_CONDITIONS.pop(cls, None)
    else:
        _LEAF_CONDITIONS[cls] = when
    return cls


def is_traced_with_values(module: nn.Module) -> bool:
    """Whether ``module``'s exact type was registered with ``traced_with_values=True``: traced
    through when example inputs are at hand, kept whole otherwise.

    >>> class Windowed(nn.Module):
    ...     def forward(self, x):
    ...         return x if x.shape[-1] % 2 == 0 else x[..., :-1]
    >>> _ = register_leaf_module(Windowed, traced_with_values=True)
    >>> is_traced_with_values(Windowed()), is_traced_with_values(nn.ReLU())
    (True, False)
    """
    return type(module) in _TRACED_WITH_VALUES


def register_module_rewrite(cls: type | Callable[[nn.Module], bool]) -> Callable[
        [Callable[[nn.Module], nn.Module]], Callable[[nn.Module], nn.Module]]:
    """Registers ``fn(module) -> equivalent module``, applied to every ``cls`` before tracing.

    Rewrites turn layers that torch.fx cannot trace faithfully (a fused norm + activation whose
    train/eval behaviour would be frozen at trace time, a padding computed in Python) into
    standard layers that share the original parameters. A rewrite may return the module itself
    to leave it (and then its children are visited).

    Args:
        cls: the module type to rewrite (exactly this type, not its subclasses), or a predicate
            ``cls(module) -> bool`` choosing modules of any type (tried after the types).

    Returns:
        A decorator that registers ``fn`` and returns it unchanged.

    >>> class CheckedIdentity(nn.Module):  # torch.fx cannot trace the data-dependent check
    ...     def forward(self, x):
    ...         if x.isnan().any():
    ...             raise ValueError("NaN input")
    ...         return x
    >>> @register_module_rewrite(CheckedIdentity)
    ... def _without_check(module):
    ...     return nn.Identity()
    >>> apply_module_rewrites(nn.Sequential(CheckedIdentity()))
    Sequential(
      (0): Identity()
    )
    """
    def decorator(fn: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        if isinstance(cls, type):
            _MODULE_REWRITES[cls] = fn
        else:
            _PREDICATE_REWRITES.append((cls, fn))
        return fn
    return decorator


def register_autowrap_function(function: Callable) -> Callable:
    """Makes tracing record calls to ``function`` as one op instead of tracing inside it.

    The function is also registered by name (:func:`dagprune.ops.register_function`), so that
    DAGs calling it can be saved.

    Returns:
        ``function``, so that this can be used as a decorator.
    """
    register_function(function)
    _AUTOWRAP_FUNCTIONS.append(function)
    return function


def is_registered_leaf(module: nn.Module) -> bool:
    """Whether ``module``'s exact type is a registered leaf and its condition, if any, holds.

    >>> is_registered_leaf(SamePad2d((3, 3), (1, 1))), is_registered_leaf(nn.Conv2d(1, 1, 1))
    (True, False)
    """
    if type(module) not in LEAF_MODULE_TYPES:
        return False
    condition = _LEAF_CONDITIONS.get(type(module))
    return condition is None or bool(condition(module))


def apply_module_rewrites(module: nn.Module, in_place: bool = False) -> nn.Module:
    """``module`` with every registered rewrite applied, outermost first.

    The modules given are left as they are: a module with a rewritten descendant is replaced by
    a shallow copy of itself (sharing its parameters, buffers and other attributes) holding the
    rewritten children, so the caller's model keeps its structure and state-dict keys. With
    ``in_place`` (for a private copy of a model) the children are set on the modules themselves.
    A module reached twice is rewritten once (tied modules stay tied).

    Returns:
        The rewritten module: ``module`` itself when nothing inside it has a rewrite.
    """
    return _rewritten(module, in_place, {})


def _rewritten(module: nn.Module, in_place: bool, memo: dict) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    rewrite = _rewrite_for(module)
    replacement = rewrite(module) if rewrite is not None else module
    if replacement is module:
        children = {name: _rewritten(child, in_place, memo) for name, child in module._modules.items()
                    if child is not None}
        changed = {name: child for name, child in children.items() if child is not module._modules[name]}
        if changed:
            replacement = module if in_place else shallow_copy(module)
            for name, child in changed.items():
                setattr(replacement, name, child)
    memo[id(module)] = replacement
    return replacement


def shallow_copy(module: nn.Module) -> nn.Module:
    """A module of the same type sharing every attribute of ``module`` but its children table."""
    copied = object.__new__(type(module))
    copied.__dict__.update(module.__dict__)
    copied.__dict__["_modules"] = type(module._modules)(module._modules)
    return copied


def _rewrite_for(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    rewrite = _MODULE_REWRITES.get(type(module))
    if rewrite is None:
        rewrite = next((fn for predicate, fn in _PREDICATE_REWRITES if predicate(module)), None)
    return rewrite


def autowrap_functions() -> tuple[Callable, ...]:
    """The functions registered with :func:`register_autowrap_function`, in registration order."""
    return tuple(_AUTOWRAP_FUNCTIONS)


register_leaf_module(SamePad2d)
register_leaf_module(StandardizedConv2d)
register_leaf_module(StochasticDepth)
register_leaf_module(EvoNorm2d)
register_leaf_module(CondConv2d)
register_leaf_module(FourierPositionFeatures)
register_leaf_module(PrunedMultiheadAttention)


class ChannelShuffle(nn.Module):
    """``nn.ChannelShuffle`` written out, so that tracing sees how it moves channels: the
    channel axis split into ``groups`` rows, transposed and flattened back (the same
    permutation as torch's kernel)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def extra_repr(self) -> str:
        return f"groups={self.groups}"

    def forward(self, x):
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)


@register_module_rewrite(nn.ChannelShuffle)
def _written_out_channel_shuffle(module: nn.ChannelShuffle) -> nn.Module:
    return ChannelShuffle(module.groups)


# what a subclass may define without changing what its torch.nn base computes
_HARMLESS_OVERRIDES = frozenset({"__init__", "__module__", "__qualname__", "__doc__", "__annotations__",
                                 "__dict__", "__weakref__", "__firstlineno__", "__static_attributes__",
                                 "extra_repr", "reset_parameters", "__constants__"})


def plain_layer_base(module: nn.Module) -> type | None:
    """The ``torch.nn`` layer class ``module``'s class extends without changing what it computes
    (torchvision's ``Conv3DSimple(nn.Conv3d)``, only a constructor of its own), or None.

    Its class, and every class between it and that base, may add methods and constants but may
    not redefine anything the base defines (``forward``, ``_conv_forward``, ...) but the
    constructor, ``extra_repr`` and ``reset_parameters``.

    >>> class Conv3x3(nn.Conv2d):
    ...     def __init__(self, channels):
    ...         super().__init__(channels, channels, 3, padding=1)
    >>> Conv3x3.__module__ = "my_project.layers"  # dagprune's and torch's own classes are left alone
    >>> plain_layer_base(Conv3x3(4)) is nn.Conv2d, plain_layer_base(nn.Conv2d(4, 4, 3))
    (True, None)
    """
    return _plain_layer_base_of(type(module))


@functools.lru_cache(maxsize=None)
def _plain_layer_base_of(cls: type) -> type | None:
    if cls.__module__.startswith(("torch.", "dagprune.")):
        return None
    chain = cls.__mro__
    base = next((klass for klass in chain[1:] if klass.__module__.startswith("torch.nn.modules.")), None)
    if base is None or base is nn.Module or base.__module__ == "torch.nn.modules.container":
        return None
    inherited = set(dir(base))
    for klass in chain[:chain.index(base)]:
        if any(name in inherited and name not in _HARMLESS_OVERRIDES for name in vars(klass)):
            return None
    return base


@register_module_rewrite(lambda module: plain_layer_base(module) is not None)
def _as_plain_layer(module: nn.Module) -> nn.Module:
    """The module as an instance of its ``torch.nn`` base class, sharing all its state: it then
    converts, prunes and saves as that layer."""
    base = plain_layer_base(module)
    plain = base.__new__(base)
    plain.__dict__.update(module.__dict__)
    return plain
