"""Padding computed from the input size (TensorFlow's ``SAME`` padding)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from dagprune.ops.base import register_op_type

__all__ = ["SamePad2d"]


@register_op_type
class SamePad2d(nn.Module):
    """Pads the last two axes so that a following conv/pool behaves as TensorFlow's ``SAME``.

    Args:
        kernel_size, stride, dilation: the (height, width) pairs of the following layer.
        value: the padding value (``-inf`` before max pooling).

    >>> import torch
    >>> SamePad2d((3, 3), (2, 2), (1, 1))(torch.zeros(1, 1, 5, 5)).shape
    torch.Size([1, 1, 7, 7])
    """

    def __init__(self, kernel_size, stride, dilation=(1, 1), value: float = 0.0):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.value = float(value)

    def padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding for an input of this size."""
        pads = []
        for size, kernel, stride, dilation in zip((height, width), self.kernel_size, self.stride,
                                                  self.dilation):
            pads.append(max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1
                            - size, 0))
        pad_h, pad_w = pads
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2

    def forward(self, x):
        return F.pad(x, self.padding_for(x.shape[-2], x.shape[-1]), value=self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"

    def get_config(self) -> dict:
        value = self.value if math.isfinite(self.value) else repr(self.value)
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "dilation": list(self.dilation), "value": value}

    @classmethod
    def from_config(cls, config: dict) -> "SamePad2d":
        return cls(config["kernel_size"], config["stride"], config["dilation"],
                   float(config["value"]))
