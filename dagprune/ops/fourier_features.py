"""Sine-cosine features of the positions of a 2-D grid (XCiT's Fourier position encoding).

timm's ``PositionalEncodingFourier`` computes these features from the grid's size and projects
them with a 1x1 convolution. torch.fx cannot trace it (it is called with Python ints), so it was
kept whole and the channels it adds to the token stream were barred. It is rewritten (see
:mod:`dagprune.timm_layers`) into this layer, which computes the fixed features only, followed
by the projection, which is traced like any convolution: its output channels join the token
stream and are pruned with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dagprune.ops.base import register_op_type

__all__ = ["FourierPositionFeatures"]


@register_op_type
class FourierPositionFeatures(nn.Module):
    """The ``(1, 2 * hidden_dim, height, width)`` features of each grid position: for the row
    and then the column, its coordinate (1-based, divided by the grid's extent and scaled to
    ``2 pi``) divided by ``temperature ** (2 * (i // 2) / hidden_dim)`` for feature ``i``, whose
    sine is taken at even ``i`` and cosine at odd ``i``.

    The features are computed in float32 and returned in the dtype (and on the device) of the
    layer's ``reference`` buffer, which follows the model's ``.to()``.

    >>> FourierPositionFeatures(8)(3, 4).shape
    torch.Size([1, 16, 3, 4])
    """

    def __init__(self, hidden_dim: int, temperature: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.eps = eps
        self.register_buffer("reference", torch.empty(0), persistent=False)

    def forward(self, height: int, width: int) -> torch.Tensor:
        device = self.reference.device
        rows = self._scaled_coordinates(height, device).view(1, height, 1).expand(1, height, width)
        columns = self._scaled_coordinates(width, device).view(1, 1, width).expand(1, height, width)
        index = torch.arange(self.hidden_dim, device=device).to(torch.float32)
        frequencies = self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / self.hidden_dim)
        features = torch.cat([self._sines_and_cosines(rows, frequencies),
                              self._sines_and_cosines(columns, frequencies)], dim=3)
        return features.permute(0, 3, 1, 2).to(self.reference.dtype)

    def _scaled_coordinates(self, extent: int, device) -> torch.Tensor:
        coordinates = torch.arange(1, extent + 1, device=device).to(torch.float32)
        return coordinates / (coordinates[-1:] + self.eps) * (2 * math.pi)

    @staticmethod
    def _sines_and_cosines(coordinates: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
        """``(1, H, W, hidden_dim)``: sines of the even features, cosines of the odd ones,
        interleaved."""
        angles = coordinates.unsqueeze(-1) / frequencies
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=4).flatten(3)

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, temperature={self.temperature}, eps={self.eps}"
