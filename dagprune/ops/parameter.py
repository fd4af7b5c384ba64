"""Ops without inputs: a parameter or buffer read directly (class tokens, position embeddings)."""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.base import register_op_type
from dagprune.ops.templates import decode_template, fill_template

__all__ = ["ParameterOp", "ModuleCallOp"]


@register_op_type
class ParameterOp(nn.Module):
    """Returns a tensor it owns: an ``nn.Parameter`` (trainable) or a buffer.

    >>> op = ParameterOp(torch.zeros(1, 1, 4))
    >>> op().shape
    torch.Size([1, 1, 4])
    """

    def __init__(self, value: torch.Tensor, trainable: bool | None = None):
        super().__init__()
        if isinstance(value, nn.Parameter):
            self.value = value
        elif trainable:
            self.value = nn.Parameter(value)
        else:
            self.register_buffer("value", value)

    @property
    def trainable(self) -> bool:
        return isinstance(self.value, nn.Parameter)

    def forward(self):
        return self.value

    def extra_repr(self) -> str:
        kind = "parameter" if self.trainable else "buffer"
        return f"{kind} {tuple(self.value.shape)}"

    def get_config(self) -> dict:
        return {"trainable": self.trainable, "shape": list(self.value.shape),
                "dtype": str(self.value.dtype)}

    @classmethod
    def from_config(cls, config: dict) -> "ParameterOp":
        dtype = decode_template({"dtype": config["dtype"]})
        return cls(torch.zeros(config["shape"], dtype=dtype), trainable=config["trainable"])


@register_op_type
class ModuleCallOp(nn.Module):
    """Calls a leaf module with constant arguments besides its tensor inputs.

    Used when a traced model calls a leaf module as ``self.block(x, scale=2)``: the inner
    ``module`` is called with the template's holes filled by this op's inputs.
    """

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict | None = None):
        super().__init__()
        self.module = module
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})

    def forward(self, *inputs):
        return self.module(*fill_template(self.args, inputs), **fill_template(self.kwargs, inputs))
