"""Stochastic depth: in training, a residual branch is dropped for whole samples at random.

timm's ``DropPath`` (set by ``drop_path_rate``) branches on ``self.training`` in Python; traced,
it would keep its eval behaviour (the identity) for good. It is rewritten into this layer, kept
whole as a vertex, so that a converted model still drops paths while it trains (drawing the
same random numbers as the original) and is the identity in eval.
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.base import register_op_type

__all__ = ["StochasticDepth"]


@register_op_type
class StochasticDepth(nn.Module):
    """In training, zeroes each sample of the input with probability ``drop_prob`` (one draw
    per sample, the same for all its elements) and, with ``scale_by_keep``, divides the kept
    samples by ``1 - drop_prob`` so that the expected output equals the input. The identity in
    eval mode or with ``drop_prob == 0``.

    >>> layer = StochasticDepth(0.5).train()
    >>> _ = torch.manual_seed(0)
    >>> layer(torch.ones(4, 2)).tolist()
    [[0.0, 0.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    >>> torch.equal(layer.eval()(torch.ones(4, 2)), torch.ones(4, 2))
    True
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = bool(scale_by_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        per_sample = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            per_sample.div_(keep_prob)
        return x * per_sample

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, scale_by_keep={self.scale_by_keep}"

    def get_config(self) -> dict:
        return {"drop_prob": self.drop_prob, "scale_by_keep": self.scale_by_keep}

    @classmethod
    def from_config(cls, config: dict) -> "StochasticDepth":
        return cls(float(config["drop_prob"]), bool(config["scale_by_keep"]))
