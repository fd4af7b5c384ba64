"""Tensor slicing shared by the removal facets of the op specs.

Masks are boolean numpy arrays over the positions of one axis (True = kept); ``None`` means
the axis keeps every position.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["slice_tensor", "replace_tensor", "kept_count", "slice_per_channel_state",
           "unchanged_removal", "kept_shape"]


def _kept_index(mask: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(mask), device=device)


def slice_tensor(tensor: torch.Tensor, axis: int, mask: np.ndarray | None) -> torch.Tensor:
    """The kept positions of ``tensor`` along ``axis``.

    >>> slice_tensor(torch.arange(4), 0, np.array([True, False, True, False]))
    tensor([0, 2])
    """
    if mask is None:
        return tensor
    return tensor.index_select(axis, _kept_index(mask, tensor.device))


def replace_tensor(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Sets ``module.<name>`` to a copy of ``tensor``, a parameter where the old one was."""
    if tensor is None:
        return
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, tensor.detach().clone())


def kept_count(mask: np.ndarray | None, size: int) -> int:
    """How many of ``size`` positions ``mask`` keeps."""
    return size if mask is None else int(mask.sum())


def kept_shape(shape, output_mask: dict) -> list[int]:
    """``shape`` with each masked axis shrunk to its kept count."""
    return [kept_count(output_mask.get(axis), size) for axis, size in enumerate(shape)]


def slice_per_channel_state(module: nn.Module, mask: np.ndarray | None) -> nn.Module:
    """A copy of ``module`` whose 1-d tensors of the mask's length are sliced (norm weights,
    biases, running statistics)."""
    module = copy.deepcopy(module)
    named = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    for name, tensor in named:
        if tensor is not None and tensor.ndim == 1 and mask is not None and tensor.shape[0] == len(mask):
            replace_tensor(module, name, slice_tensor(tensor, 0, mask))
    return module


def unchanged_removal(module, input_masks, output_mask, shapes) -> nn.Module:
    """The removal facet of ops holding nothing per channel: the same op works on fewer."""
    return copy.deepcopy(module)
