"""A conditionally parameterised convolution: each sample's kernel mixes a few expert kernels.

timm's ``CondConv2d`` (EfficientNet-CondConv) is rewritten into this layer before tracing (see
:mod:`dagprune.timm_layers`); traced, its forward would fix the batch size into its reshapes.
Kept whole, the layer's spec (:mod:`dagprune.ops.specs.cond_conv`) says what it does with
channels: like a convolution, it consumes its input's channels and produces new ones; the
routing weights (one per expert and sample) carry no channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.base import register_op_type
from dagprune.ops.padding import SamePad2d

__all__ = ["CondConv2d"]


@register_op_type
class CondConv2d(nn.Module):
    """``conv2d(x[b], sum_e routing[b, e] * kernel[e])`` for every sample ``b``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as
            ``nn.Conv2d`` (pairs for the sizes).
        num_experts: expert kernels mixed per sample.
        bias: one bias per expert, mixed like the kernels.
        same_padding: pad at run time as TensorFlow's ``SAME`` (``padding`` is then 0).

    The experts' kernels are stored flat, ``weight`` of shape ``(num_experts, out_channels *
    in_channels // groups * kh * kw)``, and ``bias`` ``(num_experts, out_channels)``.

    >>> layer = CondConv2d(4, 6, (3, 3), num_experts=2, padding=(1, 1))
    >>> layer(torch.randn(2, 4, 5, 5), torch.rand(2, 2)).shape
    torch.Size([2, 6, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(3, 3), stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1), groups: int = 1, num_experts: int = 4,
                 bias: bool = False, same_padding: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.num_experts = int(num_experts)
        self.same_padding = bool(same_padding)
        self.weight = nn.Parameter(torch.empty(self.num_experts, math.prod(self.kernel_shape)))
        self.bias = nn.Parameter(torch.zeros(self.num_experts, self.out_channels)) if bias else None
        nn.init.normal_(self.weight, std=(self.in_channels // self.groups * math.prod(self.kernel_size)) ** -0.5)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """One expert's kernel: ``(out_channels, in_channels // groups, kh, kw)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        kernels = torch.matmul(routing_weights, self.weight).view(batch * self.out_channels, *self.kernel_shape[1:])
        bias = None if self.bias is None else torch.matmul(routing_weights, self.bias).view(batch * self.out_channels)
        # the samples side by side as conv groups: one conv computes every sample with its kernel
        stacked = x.reshape(1, batch * x.shape[1], x.shape[2], x.shape[3])
        if self.same_padding:
            padding = SamePad2d(self.kernel_size, self.stride, self.dilation).padding_for(*stacked.shape[-2:])
            stacked = F.pad(stacked, padding)
        out = F.conv2d(stacked, kernels, bias, stride=self.stride, padding=0 if self.same_padding else self.padding,
                       dilation=self.dilation, groups=self.groups * batch)
        return out.permute([1, 0, 2, 3]).view(batch, self.out_channels, out.shape[-2], out.shape[-1])

    def expert_kernels(self) -> torch.Tensor:
        """The weight as ``(num_experts, out_channels, in_channels // groups, kh, kw)`` (a view)."""
        return self.weight.view(self.num_experts, *self.kernel_shape)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, num_experts={self.num_experts}, same_padding={self.same_padding}")
