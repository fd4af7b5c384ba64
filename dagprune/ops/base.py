"""The base of every op module: a registered function called with an argument template."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dagprune.errors import SerializationError
from dagprune.ops.functions import declare_function_names, resolve_function
from dagprune.ops.templates import (InputRef, decode_template, encode_template, fill_template,
                                    map_template)

__all__ = ["FunctionalOp", "OP_TYPES", "register_op_type", "op_class_for_function"]

OP_TYPES: dict[str, type[nn.Module]] = {}
_OP_CLASS_BY_FUNCTION: dict[str, type["FunctionalOp"]] = {}


def register_op_type(cls):
    """Registers an op module class so that saved DAGs may instantiate it.

    The class's ``function_names`` (if any) are the functions this family of ops stands for:
    tracing turns a call to one of them into an instance of ``cls``.
    """
    OP_TYPES[cls.__name__] = cls
    declare_function_names(getattr(cls, "function_names", ()))
    for name in getattr(cls, "function_names", ()):
        _OP_CLASS_BY_FUNCTION[name] = cls
    return cls


def op_class_for_function(name: str) -> type["FunctionalOp"]:
    """The op family a function belongs to; :class:`FunctionalOp` for functions of no family."""
    return _OP_CLASS_BY_FUNCTION.get(name, FunctionalOp)


@register_op_type
class FunctionalOp(nn.Module):
    """A call of a registered function, with constant arguments held in a template.

    Args:
        function_name: a name known to :func:`dagprune.ops.resolve_function`.
        args: positional-argument template; :class:`InputRef` holes take the op's inputs.
        kwargs: keyword-argument template.

    >>> op = FunctionalOp("torch.cat", ([InputRef(0), InputRef(1)],), {"dim": 1})
    >>> op(torch.ones(1, 2), torch.zeros(1, 1)).shape
    torch.Size([1, 3])
    """

    function_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, function_name: str, args: tuple = (), kwargs: dict | None = None):
        super().__init__()
        self.function_name = function_name
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self._function = resolve_function(function_name)

    def forward(self, *inputs):
        args, kwargs = self.argument_templates()
        return self._function(*fill_template(args, inputs), **fill_template(kwargs, inputs))

    def argument_templates(self) -> tuple[tuple, dict]:
        """The templates used for the next call (ops that depend on the mode override this)."""
        return self.args, self.kwargs

    @property
    def short_name(self) -> str:
        """The function's name without its namespace, e.g. ``"cat"``."""
        return self.function_name.rsplit(".", 1)[-1]

    def argument(self, position: int | None, keyword: str | None, default: Any = None) -> Any:
        """The constant (or :class:`InputRef`) passed at ``position`` or as ``keyword``."""
        if keyword is not None and keyword in self.kwargs:
            return self.kwargs[keyword]
        if position is not None and position < len(self.args):
            return self.args[position]
        return default

    def set_argument(self, position: int | None, keyword: str | None, value: Any) -> None:
        """Replaces the argument at ``position`` or ``keyword`` (where it is given) by ``value``."""
        if keyword is not None and (keyword in self.kwargs or position is None
                                    or position >= len(self.args)):
            self.kwargs[keyword] = value
        else:
            args = list(self.args)
            args[position] = value
            self.args = tuple(args)

    def replace_constants(self, fn) -> None:
        """Applies ``fn`` to every constant leaf of the templates (holes are left alone)."""
        keep = lambda leaf: leaf if isinstance(leaf, InputRef) else fn(leaf)  # noqa: E731
        self.args = map_template(self.args, keep)
        self.kwargs = map_template(self.kwargs, keep)

    def extra_repr(self) -> str:
        shown = [repr(arg) for arg in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.function_name}({', '.join(shown)})"

    def get_config(self) -> dict:
        """JSON-compatible constructor arguments (see :meth:`from_config`)."""
        return {"function_name": self.function_name, "args": encode_template(self.args),
                "kwargs": encode_template(self.kwargs)}

    @classmethod
    def from_config(cls, config: dict) -> "FunctionalOp":
        """Rebuilds an op from :meth:`get_config`'s output."""
        try:
            args = decode_template(config["args"])
            kwargs = decode_template(config["kwargs"])
            return cls(config["function_name"], args, kwargs)
        except KeyError as error:
            raise SerializationError(f"op config {config!r} lacks {error}") from error
