"""How a leaf module is described in a saved DAG: by constructor arguments, else by structure.

Standard ``torch.nn`` layers are described generically: the constructor's parameters are read
back from the module's attributes of the same name (``Conv2d.in_channels``, ``.kernel_size``,
...). Other types register a describer with :func:`register_module_serializer`.

A module without such a description (timm's untraceable blocks, ``nn.LSTM``,
``nn.TransformerEncoderLayer``) is described by its *structure* instead: its plain attributes,
its submodules (each described the same way, recursively) and the names, shapes and dtypes of
its parameters and buffers. Loading creates it without running its constructor
(``cls.__new__(cls)`` plus ``nn.Module.__init__``) and sets those back; the tensor values come
from the tensor file. Only allowed types are ever instantiated: ``torch.nn`` classes that an op
spec declares (every ``torch.nn`` layer has one; the containers too; not the losses),
dagprune's own classes, classes of ``timm`` (allowed as a package by its integration: its
blocks hold timm layers), and types registered with :func:`dagprune.register_leaf_module` or
:func:`register_module_serializer`.

Either description is checked when it is made: the module rebuilt from it must have the same
``repr`` and the same parameter and buffer shapes, otherwise saving fails with a clear error
instead of writing a file that would load into something else.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import types
import weakref
from typing import Any, Callable

import torch
from torch import nn

from dagprune.errors import ConversionError, SerializationError
from dagprune.leaf_modules import LEAF_MODULE_TYPES
from dagprune.ops.functions import function_name, resolve_function
from dagprune.ops.registry import OPS
from dagprune.ops.templates import decode_template, encode_template
from dagprune.parametrized import TORCH_PARAMETRIZATIONS, build_parametrized, describe_parametrized, is_parametrized

__all__ = ["register_module_serializer", "describe_module", "build_module", "module_type_name",
           "tensors_with_recorded_dtype", "check_config_reads_back"]

_SERIALIZERS: dict[str, tuple[type, Callable[[nn.Module], dict], Callable[[dict], nn.Module]]] = {}
_SKIPPED_PARAMETERS = {"self", "device", "dtype", "factory_kwargs"}
# Packages whose classes a file may name by module path; anything else must be registered.
_ALLOWED_PACKAGES = ("torch.nn.", "timm.", "dagprune.")
# What nn.Module.__init__ puts in __dict__: rebuilt by calling it, never stored.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# Hooks change what a module computes and hold arbitrary code: such modules cannot be described.
_BEHAVIOUR_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                    "_backward_pre_hooks")
# Caches of values computed from the module's own tensors, saved empty (refilled on use): timm's
# attention modules keep their eval-mode attention biases in ``attention_bias_cache`` and clear
# it themselves whenever they switch to train mode.
_TRANSIENT_ATTRIBUTES = {"attention_bias_cache": {}}
_PLAIN_TYPES = (type(None), bool, int, float, str)
_TEMPLATE_TYPES = (torch.dtype, torch.Size, torch.device, torch.memory_format, torch.layout, slice,
                   type(Ellipsis))
_REGISTER_HINT = ("register a serializer with dagprune.register_module_serializer(cls, to_config, "
                  "from_config)")


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


def describe_module(module: nn.Module, where: str = "") -> dict:
    """A JSON-compatible description of a leaf module, checked by rebuilding it.

    ``{"type": ..., "config": ...}`` (constructor arguments) when the type has a constructor
    serializer that reproduces the module, else ``{"type": ..., "structure": ...}``.

    Args:
        module: the module to describe.
        where: the module's path in the model, used in error messages.

    Raises:
        SerializationError: neither description is possible (the type may not be loaded, or an
            attribute holds an object that cannot be stored); the message names the module
            path, the attribute and what to register.

    >>> description = describe_module(nn.LSTM(2, 3, batch_first=True))
    >>> description["type"], sorted(description["structure"])
    ('torch.nn.LSTM', ['attributes', 'buffers', 'modules', 'parameters'])
    >>> build_module(description)
    LSTM(2, 3, batch_first=True)
    """
    _refuse_hooks(module, where or "<leaf>")
    if is_parametrized(module):
        return {"type": "parametrized", **describe_parametrized(module, where or "<leaf>", describe_module)}
    type_name = module_type_name(type(module))
    try:
        return _describe_by_constructor(module, type_name)
    except SerializationError as constructor_error:
        if _allowed_module_class(type_name) is not type(module):
            raise SerializationError(
                f"cannot save module {where or '<leaf>'!r} of type {type_name}: "
                f"{constructor_error}, and it cannot be saved by its structure either because "
                "loading may only instantiate torch.nn, timm and dagprune classes and types "
                f"registered with dagprune.register_leaf_module; {_REGISTER_HINT}"
            ) from constructor_error
    description = {"type": type_name, "structure": _describe_structure(module, where or "<leaf>")}
    _check_rebuilds_same(module, description, where)
    return description


def build_module(description: dict, where: str = "") -> nn.Module:
    """Rebuilds a module from :func:`describe_module`'s output.

    No code named by the file runs beyond creating allowed classes: a structural description
    is instantiated with ``cls.__new__(cls)`` and ``nn.Module.__init__``, never ``__init__``.
    A constructor description is read back from the module it built, and every argument must
    read back as the file gives it (so ``bias: "no"`` does not pass for ``bias=True``).

    Tensors are created on the default device: under ``with torch.device("meta")`` nothing is
    allocated, which is how :func:`dagprune.load_dag` checks sizes before building for real.

    Raises:
        SerializationError: the description names a type that is not allowed, or is malformed;
            the message names the module path and the field.
    """
    if not isinstance(description, dict):
        raise SerializationError(f"module {where or '<leaf>'!r} has a malformed description "
                                 f"{_short_repr(description)}")
    if description.get("type") == "parametrized":
        return build_parametrized(description, where or "<leaf>", build_module)
    if "structure" in description:
        return _build_structure(description, where or "<leaf>")
    return _build_by_constructor(description)


def _refuse_hooks(module: nn.Module, where: str) -> None:
    hooked = [hook for hook in _BEHAVIOUR_HOOKS if getattr(module, hook, None)]
    if hooked:
        raise SerializationError(f"module {where!r} ({module_type_name(type(module))}) has "
                                 f"{', '.join(hooked)} registered, which a saved DAG cannot hold; "
                                 "remove the hooks before saving")


# --------------------------------------------------------------------------------- constructors
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
        if isinstance(cls, type) and issubclass(cls, nn.Module) and _declared_by_a_spec(cls):
            return cls, _generic_config, lambda config: cls(**config)
    return None


def _describe_by_constructor(module: nn.Module, type_name: str) -> dict:
    entry = _resolve_type(type_name)
    if entry is None:
        raise SerializationError(f"{type_name} has no constructor serializer")
    _, to_config, from_config = entry
    try:
        config = to_config(module)
        encoded = encode_template(config)
        rebuilt = _rebuild_for_check(from_config, decode_template(encoded))
    except Exception as error:
        raise SerializationError(f"its constructor arguments cannot be described "
                                 f"({type(error).__name__}: {error})") from error
    if rebuilt.extra_repr() != module.extra_repr() or _shapes(rebuilt) != _shapes(module):
        raise SerializationError(
            f"{type_name} cannot be rebuilt from its constructor arguments ({rebuilt.extra_repr()} "
            f"vs {module.extra_repr()})")
    return {"type": type_name, "config": encoded}


def _rebuild_for_check(from_config: Callable[[dict], nn.Module], config: dict) -> nn.Module:
    """The module ``config`` describes, for comparing shapes and ``extra_repr`` only: built on
    the meta device (no memory, no weight initialisation: saving a 300M-parameter model would
    otherwise initialise 300M weights to throw them away), or normally where a constructor
    cannot run there."""
    try:
        with torch.device("meta"):
            return from_config(config)
    except Exception:  # noqa: BLE001 - e.g. a constructor that computes with real tensors
        return from_config(config)


def _build_by_constructor(description: dict) -> nn.Module:
    type_name = description.get("type")
    entry = _resolve_type(type_name) if isinstance(type_name, str) else None
    if entry is None:
        raise SerializationError(
            f"the file names a module type {type_name!r} that is not allowed or not registered; "
            "register it with dagprune.register_module_serializer before loading")
    _, to_config, from_config = entry
    encoded = description.get("config")
    if not isinstance(encoded, dict) or not isinstance(encoded.get("dict"), dict):
        raise SerializationError(f"{type_name}: its config must be a dict of constructor "
                                 f"arguments, got {_short_repr(encoded)}")
    try:
        module = _construct(from_config, decode_template(encoded),
                            registered=type_name in _SERIALIZERS)
        read_back = encode_template(to_config(module))
    except SerializationError as error:
        raise SerializationError(f"cannot rebuild {type_name}: {error}") from error
    except Exception as error:  # noqa: BLE001 - any failure of a constructor on file data
        raise SerializationError(f"cannot rebuild {type_name} from {_short_repr(encoded)}: "
                                 f"{type(error).__name__}: {error}") from error
    check_config_reads_back(type_name, encoded["dict"],
                            read_back.get("dict", {}) if isinstance(read_back, dict) else {})
    return module


def _construct(from_config: Callable[[dict], nn.Module], config: dict,
               registered: bool) -> nn.Module:
    """``from_config(config)``; a registered type that cannot be built on the meta device (its
    constructor computes with real tensors) is built on the CPU there instead."""
    try:
        return from_config(config)
    except Exception:  # noqa: BLE001 - retried below, or raised again
        if not registered or torch.get_default_device().type != "meta":
            raise
    with torch.device("cpu"):
        return from_config(config)


def check_config_reads_back(type_name: str, given: dict, read_back: dict) -> None:
    """Every argument a file gives must read back the same from the module built with it.

    Args:
        type_name: the module or op type, for the message.
        given: the encoded arguments the file gives, by name.
        read_back: the encoded arguments read back from the module built with them.

    Arguments that do not read back are not compared, so files written by other versions of a
    layer (with fewer or other arguments) still load.

    Raises:
        SerializationError: an argument reads back with another type or value.

    >>> check_config_reads_back("torch.nn.Linear", {"bias": "no"}, {"bias": True})
    Traceback (most recent call last):
    ...
    dagprune.errors.SerializationError: cannot rebuild torch.nn.Linear: its argument 'bias' is \
'no' in the file but builds a module with bias=True (wrong type or value)
    """
    for name, value in given.items():
        if name in read_back and not _same_json(value, read_back[name]):
            raise SerializationError(
                f"cannot rebuild {type_name}: its argument {name!r} is {_short_repr(value)} in "
                f"the file but builds a module with {name}={_short_repr(read_back[name])} (wrong "
                "type or value)")


def _same_json(first: Any, second: Any) -> bool:
    """Equality of JSON data that tells ``true`` from ``1`` (numbers compare by value)."""
    if isinstance(first, bool) or isinstance(second, bool):
        return type(first) is type(second) and first == second
    if isinstance(first, (int, float)) and isinstance(second, (int, float)):
        return first == second
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(map(_same_json, first, second))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(_same_json(first[k], second[k]) for k in first)
    return type(first) is type(second) and first == second


def _shapes(module: nn.Module) -> dict:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


# --------------------------------------------------------------------------------- allowed types
def _allowed_module_class(type_name: str) -> type | None:
    """The module class stored as ``type_name``, if loading may instantiate it; else None."""
    registered = _registered_class(type_name)
    cls = registered or _class_by_path(type_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and module_type_name(cls) == type_name):
        return None
    if registered is None and type_name.startswith(_DECLARED_PACKAGES) and not _declared_by_a_spec(cls):
        return None
    return cls


_DECLARED_PACKAGES = ("torch.nn.",)  # dagprune's and timm's classes are allowed as packages
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _declared_by_a_spec(cls: type) -> bool:
    """Whether an op spec describes the ``torch.nn`` class ``cls`` (or it is a container)."""
    return cls in _CONTAINERS or OPS.lookup_type(cls).name not in ("leaf_module", "function")


def _registered_class(type_name: str) -> type | None:
    if type_name in _SERIALIZERS:
        return _SERIALIZERS[type_name][0]
    return next((cls for cls in (*LEAF_MODULE_TYPES, *TORCH_PARAMETRIZATIONS)
                 if module_type_name(cls) == type_name), None)


def _class_by_path(type_name: str) -> type | None:
    """Finds ``package.module.Class`` under the allowed packages only (imports that module)."""
    if not type_name.startswith(_ALLOWED_PACKAGES):
        return None
    if type_name.startswith("torch.nn.") and isinstance(getattr(nn, type_name[9:], None), type):
        return getattr(nn, type_name[9:])
    parts = type_name.split(".")
    for split in range(len(parts) - 1, 1, -1):
        module_name = ".".join(parts[:split])
        try:
            value: Any = importlib.import_module(module_name)
        except (ImportError, ValueError):
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute, None)
        return value if isinstance(value, type) else None
    return None


def _allowed_enum_class(type_name: str) -> type | None:
    cls = _class_by_path(type_name)
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and \
            f"{cls.__module__}.{cls.__qualname__}" == type_name:
        return cls
    return None


# --------------------------------------------------------------------------------- attributes
def _encode_attribute(value: Any, own_tensors: dict[int, str], where: str) -> Any:
    """JSON data for one attribute value: the template encoding, plus references by name."""
    if type(value) in _PLAIN_TYPES or isinstance(value, _TEMPLATE_TYPES):
        return encode_template(value)
    if type(value) is tuple:  # not a namedtuple, which would load as a plain tuple
        return {"tuple": [_encode_attribute(item, own_tensors, where) for item in value]}
    if type(value) is list:
        return [_encode_attribute(item, own_tensors, where) for item in value]
    if type(value) is dict and all(isinstance(key, str) for key in value):
        return {"dict": {key: _encode_attribute(item, own_tensors, where)
                         for key, item in value.items()}}
    reference = _encode_reference(value, own_tensors)
    if reference is not None:
        return reference
    raise SerializationError(
        f"{where} holds {type(value).__module__}.{type(value).__qualname__} "
        f"({_short_repr(value)}), which a saved DAG cannot store (it stores numbers, strings, "
        "containers, dtypes, torch / timm enums, registered functions, allowed module classes "
        f"and the module's own tensors); {_REGISTER_HINT}")


def _encode_reference(value: Any, own_tensors: dict[int, str]) -> dict | None:
    """``{tag: name}`` for a value stored by name, or None if ``value`` is not one.

    Such values are the module's own parameters and buffers (and weak references to them, as
    ``nn.LSTM._flat_weights`` holds), members of allowed enums, allowed module classes and
    functions known to :func:`dagprune.ops.resolve_function`.
    """
    if isinstance(value, torch.Tensor):
        return {"own_tensor": own_tensors[id(value)]} if id(value) in own_tensors else None
    if isinstance(value, weakref.ReferenceType):
        target = id(value())
        return {"own_tensor_weakref": own_tensors[target]} if target in own_tensors else None
    if isinstance(value, enum.Enum):
        type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        return {"enum": [type_name, value.name]} \
            if _allowed_enum_class(type_name) is type(value) else None
    if isinstance(value, type):
        type_name = module_type_name(value)
        return {"class": type_name} if _allowed_module_class(type_name) is value else None
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        try:
            return {"function": function_name(value)}
        except ConversionError:
            return None
    return None


def _decode_attribute(data: Any, own_tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [_decode_attribute(item, own_tensors) for item in data]
    if not isinstance(data, dict) or len(data) != 1:
        return decode_template(data)
    (tag, value), = data.items()
    if tag == "tuple" and isinstance(value, list):
        return tuple(_decode_attribute(item, own_tensors) for item in value)
    if tag == "dict" and isinstance(value, dict):
        return {str(key): _decode_attribute(item, own_tensors) for key, item in value.items()}
    if tag in ("own_tensor", "own_tensor_weakref"):
        if value not in own_tensors:
            raise SerializationError(f"the tensor reference {value!r} is not one of the "
                                     "module's parameters or buffers")
        tensor = own_tensors[value]
        return weakref.ref(tensor) if tag == "own_tensor_weakref" else tensor
    if tag == "enum":
        cls = _allowed_enum_class(value[0]) if isinstance(value, list) and len(value) == 2 \
            and all(isinstance(part, str) for part in value) else None
        if cls is None or value[1] not in cls.__members__:
            raise SerializationError(f"the enum member {value!r} is not allowed (only torch, "
                                     "timm and dagprune enums)")
        return cls[value[1]]
    if tag == "class":
        cls = _allowed_module_class(value) if isinstance(value, str) else None
        if cls is None:
            raise SerializationError(f"the class {value!r} is not allowed or not registered")
        return cls
    if tag == "function":
        return resolve_function(str(value))
    return decode_template(data)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------- structure
def _describe_structure(module: nn.Module, where: str) -> dict:
    own_tensors = {id(t): name for name, t in [*module._parameters.items(),
                                               *module._buffers.items()] if t is not None}
    attributes = {name: _encode_attribute(_TRANSIENT_ATTRIBUTES.get(name, value), own_tensors,
                                          f"attribute {name!r} of module {where!r} "
                                          f"({module_type_name(type(module))})")
                  for name, value in vars(module).items() if name not in _MODULE_INTERNALS}
    return {
        "attributes": attributes,
        "modules": [[name, None if child is None else describe_module(child, f"{where}.{name}")]
                    for name, child in module._modules.items()],
        "parameters": [[name, None if p is None else {**_tensor_spec(p), "requires_grad":
                                                      p.requires_grad}]
                       for name, p in module._parameters.items()],
        "buffers": [[name, None if b is None else {
            **_tensor_spec(b), "persistent": name not in module._non_persistent_buffers_set}]
                    for name, b in module._buffers.items()],
    }


def _tensor_spec(tensor: torch.Tensor) -> dict:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype)}


def _build_structure(description: dict, where: str) -> nn.Module:
    type_name = description.get("type")
    cls = _allowed_module_class(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise SerializationError(
            f"module {where!r}: the file names a module type {type_name!r} that is not allowed or "
            "not registered; only torch.nn, timm and dagprune classes and types registered with "
            "dagprune.register_leaf_module or dagprune.register_module_serializer can be loaded")
    try:
        module = _instantiate(cls, description["structure"], where)
        module.extra_repr()  # reads the attributes the type needs; saving checked it works
        return module
    except SerializationError as error:
        raise SerializationError(f"module {where!r} ({type_name}): {error}") from error
    except Exception as error:  # noqa: BLE001 - building from file data; nothing else runs
        raise SerializationError(f"module {where!r} ({type_name}) has a malformed structure: "
                                 f"{type(error).__name__}: {error}") from error


def _instantiate(cls: type, structure: dict, where: str) -> nn.Module:
    if not isinstance(structure, dict):
        raise SerializationError(f"its structure must be a JSON object, got "
                                 f"{_short_repr(structure)}")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, spec in _named_entries(structure, "parameters"):
        module._parameters[name] = None if spec is None else nn.Parameter(
            _empty_tensor(spec, f"parameter {name!r}"),
            requires_grad=_flag(spec, "requires_grad", f"parameter {name!r}"))
    for name, spec in _named_entries(structure, "buffers"):
        module._buffers[name] = None if spec is None else _empty_tensor(spec, f"buffer {name!r}")
        if spec is not None and not _flag(spec, "persistent", f"buffer {name!r}"):
            module._non_persistent_buffers_set.add(name)
    for name, child in _named_entries(structure, "modules"):
        module._modules[name] = None if child is None else build_module(child, f"{where}.{name}")
    own_tensors = {name: t for name, t in [*module._parameters.items(), *module._buffers.items()]
                   if t is not None}
    attributes = structure["attributes"]
    if not isinstance(attributes, dict):
        raise SerializationError("its attributes are not a JSON object")
    for name, data in attributes.items():
        if name in _MODULE_INTERNALS or name in module._modules or name in own_tensors:
            raise SerializationError(f"attribute {name!r} clashes with nn.Module state")
        try:
            module.__dict__[name] = _decode_attribute(data, own_tensors)
        except SerializationError as error:
            raise SerializationError(f"attribute {name!r}: {error}") from error
    return module


def _named_entries(structure: dict, key: str) -> list[tuple[str, Any]]:
    entries = structure.get(key)
    if not isinstance(entries, list):
        raise SerializationError(f"its {key} must be a list of [name, description] pairs, got "
                                 f"{_short_repr(entries)}")
    names = [entry[0] if isinstance(entry, list) and len(entry) == 2 else None for entry in entries]
    if not all(isinstance(name, str) and name and "." not in name for name in names) or \
            len(set(names)) != len(names):
        raise SerializationError(f"its {key} must be [name, description] pairs with unique "
                                 f"names, got {names}")
    return [(name, entry[1]) for name, entry in zip(names, entries)]


def _empty_tensor(spec: Any, what: str) -> torch.Tensor:
    """A zero tensor of the described shape and dtype, on the default device."""
    shape = spec.get("shape") if isinstance(spec, dict) else None
    dtype = spec.get("dtype") if isinstance(spec, dict) else None
    if not isinstance(shape, list) or not isinstance(dtype, str) or \
            not all(type(size) is int and size >= 0 for size in shape):
        raise SerializationError(f"{what} has a malformed tensor description {_short_repr(spec)} "
                                 "(a shape of sizes >= 0 and a dtype name are needed)")
    return torch.zeros(shape, dtype=decode_template({"dtype": dtype}))


def _flag(spec: dict, key: str, what: str) -> bool:
    value = spec.get(key)
    if not isinstance(value, bool):
        raise SerializationError(f"{what}: {key!r} must be true or false, got {_short_repr(value)}")
    return value


def tensors_with_recorded_dtype(description: dict) -> set[str]:
    """Names (``"weight"``, ``"child.bias"``) of the tensors whose dtype ``description`` records.

    A structural description records each tensor's dtype, and the tensor file must hold exactly
    that dtype; a constructor description records none (the tensor file decides).

    >>> sorted(tensors_with_recorded_dtype(describe_module(nn.LSTM(2, 3))))[:2]
    ['bias_hh_l0', 'bias_ih_l0']
    >>> tensors_with_recorded_dtype(describe_module(nn.Linear(2, 3)))
    set()
    """
    if "structure" not in description:
        return set()
    structure = description["structure"]
    names = {name for key in ("parameters", "buffers") for name, spec in structure[key]
             if spec is not None}
    for child_name, child in structure["modules"]:
        if child is not None:
            names |= {f"{child_name}.{name}" for name in tensors_with_recorded_dtype(child)}
    return names


def _check_rebuilds_same(module: nn.Module, description: dict, where: str) -> None:
    rebuilt = build_module(description, where)
    if repr(rebuilt) != repr(module) or _shapes(rebuilt) != _shapes(module) or \
            _buffer_shapes(rebuilt) != _buffer_shapes(module):
        raise SerializationError(
            f"module {where or '<leaf>'!r} ({description['type']}) does not rebuild the same from "
            f"its structure (repr or tensor shapes differ); {_REGISTER_HINT}")


def _buffer_shapes(module: nn.Module) -> dict:
    return {name: tuple(b.shape) for name, b in module.named_buffers()}
