"""Means over groups of channels that count only the kept (mask-weighted) channels.

Group normalisations whose channels are gated (``GroupNorm``, EvoNorm's S kinds) take their
statistics over each group's kept channels only: with a 0/1 mask this equals the statistic of
the tensor with the removed channels cut out, which is what removal leaves.
"""

from __future__ import annotations

import torch

__all__ = ["masked_group_mean"]


def masked_group_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of ``values`` over each group's channels and positions, in the
    dtype of ``values``.

    Args:
        values: ``(batch, groups, channels per group, positions)``.
        weights: one weight per channel, ``(1, groups, channels per group, 1)``.

    Returns:
        ``(batch, groups, 1, 1)``.

    >>> values = torch.arange(8.0).view(1, 2, 2, 2)
    >>> masked_group_mean(values, torch.tensor([1.0, 0.0, 1.0, 1.0]).view(1, 2, 2, 1)).flatten().tolist()
    [0.5, 5.5]
    """
    count = weights.sum(dim=2, keepdim=True) * values.shape[-1]
    # a group with every channel masked out (removed whole) has mean 0, not 0 / 0
    return (values * weights).sum(dim=(2, 3), keepdim=True) / count.clamp_min(torch.finfo(count.dtype).tiny)
