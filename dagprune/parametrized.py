"""Modules reparametrized with ``torch.nn.utils.parametrize``, in a saved DAG.

``torch.nn.utils.parametrizations.weight_norm`` (Hugging Face's wav2vec2, HuBERT and WavLM
position convolutions, most vocoders), ``spectral_norm``, ``orthogonal`` and the user's own
``register_parametrization`` turn a layer into an instance of a class torch creates on the fly
(``ParametrizedConv1d``, a subclass of ``Conv1d``) whose ``weight`` is computed on every read from
the tensors stored under ``parametrizations.weight.original*``. Such a class cannot be named in a
file, so a saved DAG describes the module as its base layer (described as any layer is) plus, for
each reparametrized tensor, its parametrizations in order (each a module, described as any module
is) and whether they were registered ``unsafe``. Loading builds the base layer, registers the
parametrizations again in that order, and the DAG's tensor file then fills the originals and the
parametrizations' own buffers (spectral norm's power-iteration vectors), so the loaded module
computes bit for bit what the saved one did.

Only torch's parametrizations and types registered with :func:`dagprune.register_leaf_module` or
:func:`dagprune.register_module_serializer` are instantiated on loading, as for any module.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from dagprune.errors import SerializationError
from dagprune.module_copy import copy_module

__all__ = ["TORCH_PARAMETRIZATIONS", "REFITTED_PARAMETRIZATIONS", "is_parametrized", "describe_parametrized",
           "build_parametrized", "materialized", "reparametrized"]

TORCH_PARAMETRIZATIONS: tuple[type, ...] = tuple(
    cls for cls in (getattr(parametrizations, name, None) for name in ("_WeightNorm", "_SpectralNorm", "_Orthogonal"))
    if isinstance(cls, type))
"""The parametrization modules of ``torch.nn.utils.parametrizations`` a saved DAG may hold."""

REFITTED_PARAMETRIZATIONS: tuple[type, ...] = tuple(
    cls for cls in (getattr(parametrizations, "_WeightNorm", None),) if isinstance(cls, type))
"""Parametrizations that fit any tensor exactly again (``right_inverse``): weight norm's
magnitude and direction. A layer whose channels are removed keeps these, refitted to its
remaining weight (see :func:`reparametrized`)."""

Describe = Callable[[nn.Module, str], dict]
Build = Callable[[dict, str], nn.Module]


def is_parametrized(module: nn.Module) -> bool:
    """Whether ``module`` has tensors computed by ``torch.nn.utils.parametrize``."""
    return parametrize.is_parametrized(module)


def describe_parametrized(module: nn.Module, where: str, describe: Describe) -> dict:
    """``{"base": ..., "parametrizations": [[tensor name, {"unsafe", "modules"}], ...]}``:
    the base layer described by ``describe`` with its tensors' current values as plain
    parameters, then each tensor's parametrizations in order."""
    return {
        "base": describe(_base_layer(module), where),
        "parametrizations": [
            [name, {"unsafe": bool(chain.unsafe),
                    "modules": [describe(step, f"{where}.parametrizations.{name}.{index}")
                                for index, step in enumerate(chain)]}]
            for name, chain in module.parametrizations.items()],
    }


def build_parametrized(description: dict, where: str, build: Build) -> nn.Module:
    """The module :func:`describe_parametrized` described, its originals still to be loaded.

    Registering a parametrization computes its originals from the base tensor
    (``right_inverse``); one that cannot compute on the meta device (orthogonal's) is built on
    the CPU when loading checks sizes there."""
    try:
        return _build_parametrized(description, where, build)
    except SerializationError:
        raise
    except Exception as error:  # noqa: BLE001 - a parametrization refusing meta tensors
        if torch.get_default_device().type != "meta":
            raise SerializationError(f"module {where!r}: its parametrizations cannot be registered again "
                                     f"({type(error).__name__}: {error})") from error
    with torch.device("cpu"):
        return _build_parametrized(description, where, build)


def _build_parametrized(description: dict, where: str, build: Build) -> nn.Module:
    module = build(description.get("base"), where)
    entries = description.get("parametrizations")
    if not isinstance(entries, list) or not entries:
        raise SerializationError(f"module {where!r}: its parametrizations must be a non-empty list "
                                 "of [tensor name, {unsafe, modules}] pairs")
    for entry in entries:
        name, chain = _parametrization_entry(entry, where)
        for index, step_description in enumerate(chain["modules"]):
            step = build(step_description, f"{where}.parametrizations.{name}.{index}")
            parametrize.register_parametrization(module, name, step, unsafe=chain["unsafe"])
    return module


def materialized(module: nn.Module) -> nn.Module:
    """A plain layer of ``module``'s own type computing what it computes: each reparametrized
    tensor becomes a parameter holding its current value (the layer a removal facet slices)."""
    return copy_module(_base_layer(module))


def reparametrized(slim: nn.Module, original: nn.Module) -> nn.Module:
    """``slim`` (a :func:`materialized` layer with channels removed) with ``original``'s
    parametrizations registered again where they fit the remaining weight exactly (every step of
    the tensor's chain a :data:`REFITTED_PARAMETRIZATIONS` type: weight norm, refitted to the
    slim weight). Others (spectral norm, orthogonal, the user's own) leave the tensor plain:
    the value the original computed for the kept channels, which is what the gated model
    computed; such a constraint would give other values for the smaller tensor."""
    for name, chain in original.parametrizations.items():
        if all(isinstance(step, REFITTED_PARAMETRIZATIONS) for step in chain):
            for step in chain:
                parametrize.register_parametrization(slim, name, copy.deepcopy(step), unsafe=chain.unsafe)
    return slim


def _base_layer(module: nn.Module) -> nn.Module:
    """An instance of ``module``'s own layer type sharing its attributes, with each
    reparametrized tensor as a plain parameter holding its current value (what the layer's
    constructor arguments and shapes are read from)."""
    base_type = type(module).__base__
    base = base_type.__new__(base_type)
    state = dict(vars(module))
    state["_modules"] = {key: child for key, child in module._modules.items() if key != "parametrizations"}
    state["_parameters"] = {**module._parameters,
                            **{name: nn.Parameter(getattr(module, name).detach(), _trained(chain))
                               for name, chain in module.parametrizations.items()}}
    base.__dict__.update(state)
    return base


def _trained(chain: nn.Module) -> bool:
    """Whether the originals of a tensor's parametrization chain require gradients."""
    return any(original.requires_grad for original in chain.parameters(recurse=False))


def _parametrization_entry(entry: Any, where: str) -> tuple[str, dict]:
    valid = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
             and isinstance(entry[1], dict) and isinstance(entry[1].get("unsafe"), bool)
             and isinstance(entry[1].get("modules"), list) and entry[1]["modules"])
    if not valid:
        raise SerializationError(f"module {where!r}: malformed parametrization entry {str(entry)[:120]}; "
                                 "expected [tensor name, {\"unsafe\": bool, \"modules\": [...]}]")
    return entry[0], entry[1]
