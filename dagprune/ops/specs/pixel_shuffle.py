"""Sub-pixel shuffles: ``nn.PixelShuffle`` / ``F.pixel_shuffle`` and their inverses.

``PixelShuffle(r)`` turns input channel ``c * r * r + k`` (``k < r * r``) into sub-pixel ``k``
of output channel ``c``, the upsampling of super-resolution networks (ESPCN, EDSR) and of many
decoders: the ``r * r`` input channels of one output channel are kept or removed together (one
class), and the output's channels are those classes. ``PixelUnshuffle(r)`` spreads input channel
``c`` over output channels ``c * r * r`` to ``c * r * r + r * r - 1``, all of one class with it.
Channels on any other axis are barriers (the shuffle moves their positions into the spatial
axes). The ops hold nothing per channel, so removal keeps them as they are and FLOPs are zero.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dagprune.ops.channel_map import argument_input, axis_atoms, barrier_all, constant_argument, operand_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec

__all__ = ["SPECS"]

_SHUFFLES = ("pixel_shuffle", "pixel_unshuffle")


def _factor_and_input(module, values) -> tuple[object, int | None, bool]:
    """(the factor, the input's index, whether it is an unshuffle) of a shuffle layer or call."""
    if isinstance(module, nn.PixelShuffle):
        return module.upscale_factor, 0, False
    if isinstance(module, nn.PixelUnshuffle):
        return module.downscale_factor, 0, True
    unshuffle = module.function_name.endswith("pixel_unshuffle")
    keyword = "downscale_factor" if unshuffle else "upscale_factor"
    return constant_argument(module, 1, keyword), argument_input(module, 0, "input"), unshuffle


def shuffle_coupling(ctx, vertex, module, layouts, values, output):
    """See the module docstring: the channel axis (third from last) maps block to channel."""
    factor, x_index, unshuffle = _factor_and_input(module, values)
    if x_index is None or not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        return barrier_all(ctx, layouts, "a shuffle factor that is not a constant integer")
    channel_axis = values[x_index].ndim - 3
    atoms = axis_atoms(ctx, operand_layout(ctx, vertex, layouts, x_index), channel_axis,
                       "moves axis {axis} into the spatial axes")
    if atoms is None:
        return None
    atoms, block = np.asarray(atoms), factor * factor
    if unshuffle:
        return {channel_axis: np.repeat(atoms, block)}
    rows = atoms.reshape(-1, block)
    ctx.unify(rows[:, 1:], np.repeat(rows[:, :1], block - 1, axis=1))
    return {channel_axis: rows[:, 0].copy()}


class _FunctionalShuffles(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        upsampled = torch.nn.functional.pixel_shuffle(self.first(x), 2)
        return self.last(torch.nn.functional.pixel_unshuffle(torch.relu(upsampled), 2))


def _example():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(), nn.Conv2d(4, 8, 1),
                          nn.PixelUnshuffle(2), nn.Conv2d(32, 4, 1))
    return model, (torch.randn(1, 3, 6, 6),)


def _functional_example():
    return _FunctionalShuffles(), (torch.randn(1, 3, 6, 6),)


SPECS = (
    OpSpec("pixel_shuffle", (nn.PixelShuffle, nn.PixelUnshuffle), flops=no_flops, coupling=shuffle_coupling,
           removal=unchanged_removal, example=_example),
    OpSpec("functional_pixel_shuffle", tuple(f"{prefix}.{name}" for name in _SHUFFLES
                                             for prefix in ("torch", "torch.nn.functional")),
           flops=no_flops, coupling=shuffle_coupling, removal=unchanged_removal, example=_functional_example),
)
