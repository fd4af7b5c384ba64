"""A 2-d convolution whose filters are standardised before use (weight standardisation).

timm's ``StdConv2d`` and ``ScaledStdConv2d`` (NFNets, BiT ResNetV2s, their ``Same`` variants)
are rewritten into this layer before tracing, so that a converted model holds one vertex per
convolution (instead of a ``batch_norm`` over a parameter feeding a functional conv) and saved
DAGs can rebuild it without timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.base import register_op_type

__all__ = ["StandardizedConv2d"]


@register_op_type
class StandardizedConv2d(nn.Conv2d):
    """``conv2d(x, standardized_weight())``: each output filter is normalised to zero mean and
    unit variance over its inputs and kernel window, then (when ``scale`` is given) multiplied
    by ``gain * scale`` (one learnable gain per output channel, as in NFNets).

    Removing input channels changes the statistics of every filter; channel removal therefore
    replaces such a layer by a plain ``nn.Conv2d`` holding the standardised weight of the
    kept channels, which computes exactly what the gated layer did.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in
            ``nn.Conv2d``.
        eps: added to each filter's variance.
        scale: constant factor of the gain (``gamma / sqrt(fan_in)`` in NFNets); None for plain
            weight standardisation without a gain.

    >>> conv = StandardizedConv2d(4, 2, 3, padding=1, scale=1.0)
    >>> w = conv.standardized_weight()
    >>> bool(w.reshape(2, -1).mean(1).abs().max() < 1e-6)
    True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, eps: float = 1e-6,
                 scale: float | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.eps = float(eps)
        self.scale = None if scale is None else float(scale)
        if scale is None:
            self.register_parameter("gain", None)
        else:
            self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses."""
        gain = None if self.gain is None else (self.gain * self.scale).view(-1)
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=gain,
                            training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)

    def forward(self, x):
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, scale={self.scale}"

    def get_config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                "bias": self.bias is not None, "eps": self.eps, "scale": self.scale}

    @classmethod
    def from_config(cls, config: dict) -> "StandardizedConv2d":
        config = dict(config)
        for key in ("kernel_size", "stride", "dilation"):
            config[key] = tuple(config[key])
        if isinstance(config["padding"], list):
            config["padding"] = tuple(config["padding"])
        return cls(**config)

    def to_plain_conv(self) -> nn.Conv2d:
        """A ``nn.Conv2d`` holding the current standardised weight (same output)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.standardized_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv
