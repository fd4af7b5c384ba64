"""EvoNorm: normalisation and activation in one layer (Liu et al., 2020), as timm computes it.

timm's ``EvoNorm2d*`` layers are rewritten into this layer before tracing (see
:mod:`dagprune.timm_layers`). Traced, their B variants would keep their eval branch for good
(``if self.training``), and the S variants' group statistics would become reshapes over sizes
read from the channel axis, where channels are not followed. Kept whole, the layer's spec
(:mod:`dagprune.ops.specs.evo_norm`) says what it does with channels: the B variants act on each
channel alone; the S variants take statistics over groups of channels, like ``GroupNorm``.
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.errors import DagpruneError
from dagprune.ops.base import register_op_type
from dagprune.ops.group_moments import masked_group_mean

__all__ = ["EvoNorm2d", "group_statistic"]

BATCH_KINDS = ("B0", "B1", "B2")
GROUP_KINDS = ("S0", "S1", "S2")
KINDS = ("affine",) + BATCH_KINDS + GROUP_KINDS


def group_statistic(x: torch.Tensor, groups: int, eps: float, rms: bool = False,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample and group of channels (axis 1), ``sqrt(var + eps)`` (or ``sqrt(mean(x^2) +
    eps)`` with ``rms``) over the group's channels and positions, broadcast back to x's shape.
    With ``mask`` (one weight per channel), over the kept (mask-weighted) channels only: with a
    0/1 mask this equals the statistic of x with the removed channels cut out.

    >>> x = torch.randn(2, 4, 3, 3)
    >>> kept = group_statistic(x[:, [0, 2]], 2, 1e-5)
    >>> masked = group_statistic(x, 2, 1e-5, mask=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    >>> torch.allclose(kept, masked[:, [0, 2]])
    True
    """
    batch, channels, height, width = x.shape
    if mask is None:  # as timm computes it
        grouped = x.float().reshape(batch, groups, channels // groups, height, width)
        square = grouped.square().mean(dim=(2, 3, 4), keepdim=True) if rms else \
            grouped.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
    else:
        grouped = x.float().reshape(batch, groups, channels // groups, height * width)
        weights = mask.float().view(1, groups, channels // groups, 1)
        if not rms:
            grouped = grouped - masked_group_mean(grouped, weights)
        square = masked_group_mean(grouped.square(), weights)
    statistic = square.add(eps).sqrt().to(x.dtype)
    return statistic.expand(grouped.shape).reshape(x.shape)


def _instance_statistic(x: torch.Tensor, eps: float, rms: bool) -> torch.Tensor:
    """Per sample and channel, ``sqrt(var + eps)`` (or the RMS) over the spatial positions."""
    x32 = x.float()
    square = x32.square().mean(dim=(2, 3), keepdim=True) if rms else x32.var(dim=(2, 3), unbiased=False, keepdim=True)
    return square.add(eps).sqrt().to(x.dtype).expand(x.shape)


@register_op_type
class EvoNorm2d(nn.Module):
    """One of timm's EvoNorm layers, then ``x * weight + bias`` per channel (NCHW input).

    ``kind`` says what comes before the affine part:

    * ``"affine"``: nothing (a layer built without its activation);
    * ``"B0"``: ``x / max(sqrt(var + eps), x * v + instance_std(x))``, ``"B1"``: ``x / max(sqrt(var
      + eps), (x + 1) * instance_rms(x))``, ``"B2"``: ``x / max(sqrt(var + eps), instance_rms(x) -
      x)``; ``var`` is each channel's variance over the batch in training (tracked in
      ``running_var``, as batch norm does) and ``running_var`` in eval;
    * ``"S0"``: ``x * sigmoid(x * v) / group_std(x)``, ``"S1"``: ``act(x) / group_std(x)``,
      ``"S2"``: ``act(x) / group_rms(x)``, with statistics per sample over ``groups`` groups
      of channels (see :func:`group_statistic`).

    Args:
        num_features: the number of channels.
        kind: one of the above.
        groups: the number of channel groups of the S kinds.
        eps: added to the variances.
        momentum: of ``running_var`` (B kinds).
        act: the activation of ``"S1"`` and ``"S2"`` (elementwise; default: identity).

    >>> norm = EvoNorm2d(8, "S0", groups=2)
    >>> norm(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(self, num_features: int, kind: str = "S0", groups: int = 32, eps: float = 1e-5,
                 momentum: float = 0.1, act: nn.Module | None = None):
        super().__init__()
        if kind not in KINDS:
            raise DagpruneError(f"EvoNorm2d(kind={kind!r}): kind must be one of {KINDS}")
        self.num_features, self.kind, self.groups = int(num_features), kind, int(groups)
        self.eps, self.momentum = float(eps), float(momentum)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if kind in ("B0", "S0") else None
        if kind in BATCH_KINDS:
            self.register_buffer("running_var", torch.ones(num_features))
        self.act = (act or nn.Identity()) if kind in ("S1", "S2") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalized(x)

    def normalized(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output; with ``mask`` (one weight per channel), the group statistics of
        the S kinds count the kept channels only (the B kinds act on each channel alone)."""
        if self.kind in BATCH_KINDS:
            x = x / self._batch_denominator(x)
        elif self.kind in GROUP_KINDS:
            numerator = x * (x * self._per_channel(self.v, x)).sigmoid() if self.kind == "S0" else self.act(x)
            x = numerator / group_statistic(x, self.groups, self.eps, self.kind == "S2", mask)
        return x * self._per_channel(self.weight, x) + self._per_channel(self.bias, x)

    @staticmethod
    def _per_channel(tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return tensor.to(x.dtype).view(1, -1, 1, 1)

    def _batch_denominator(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.float().var(dim=(0, 2, 3), unbiased=False)
            n = x.numel() / x.shape[1]
            self.running_var.copy_(self.running_var * (1 - self.momentum)
                                   + var.detach().to(self.running_var.dtype) * self.momentum * (n / (n - 1)))
        else:
            var = self.running_var
        left = var.add(self.eps).sqrt().to(x.dtype).view(1, -1, 1, 1)
        if self.kind == "B0":
            right = x * self._per_channel(self.v, x) + _instance_statistic(x, self.eps, rms=False)
        elif self.kind == "B1":
            right = (x + 1) * _instance_statistic(x, self.eps, rms=True)
        else:
            right = _instance_statistic(x, self.eps, rms=True) - x
        return left.expand_as(x).max(right)

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.kind in GROUP_KINDS else ""
        return f"{self.num_features}, kind={self.kind!r}{groups}, eps={self.eps}"
