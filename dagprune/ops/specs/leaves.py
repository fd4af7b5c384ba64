"""Parameters read in the graph, leaf modules, and calls dagprune does not look inside.

A leaf module with no spec of its own (a block torch.fx cannot trace, a module passed as
``leaf_modules``) is a black box: its FLOPs are measured by running it, and it is a barrier for
channels. A function with no spec of its own counts zero FLOPs and is a barrier too. Layers
called with constant arguments are in :mod:`dagprune.ops.specs.calls`.
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.base import FunctionalOp
from dagprune.ops.flop_counting import measured_if_black_box, no_flops
from dagprune.ops.fourier_features import FourierPositionFeatures
from dagprune.ops.parameter import ParameterOp
from dagprune.ops.slicing import slice_tensor
from dagprune.ops.spec import OpSpec, opaque_coupling

__all__ = ["SPECS"]


BLACK_BOX_LAYERS = (
    nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.LocalResponseNorm,
    nn.CrossMapLRN2d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.ChannelShuffle,
    nn.CosineSimilarity, nn.PairwiseDistance, nn.Softmax2d, nn.AdaptiveLogSoftmaxWithLoss,
)


def parameter_coupling(ctx, vertex, module, layouts, values, output):
    """Every axis of a parameter longer than 1 holds its own channels (joined by its users)."""
    return {axis: ctx.fresh(size) for axis, size in enumerate(output.shape) if size > 1}


def remove_from_parameter(module, input_masks, output_mask, shapes):
    value = module.value
    for axis, mask in output_mask.items():
        value = slice_tensor(value, axis, mask)
    value = value.detach().clone()
    if module.trainable:
        value = nn.Parameter(value, requires_grad=module.value.requires_grad)
    return ParameterOp(value, trainable=module.trainable)


class _ClassToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.token, self.head = nn.Linear(4, 6), nn.Parameter(torch.randn(1, 1, 6)), nn.Linear(6, 2)

    def forward(self, x):
        tokens = self.embed(x)
        return self.head(torch.cat([self.token.expand(x.shape[0], -1, -1), tokens], dim=1))


class _XcitPositions(nn.Module):
    """Tokens plus projected Fourier position features, as XCiT adds them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 1)
        self.features = FourierPositionFeatures(4)
        self.projection = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        positions = self.projection(self.features(x.shape[2], x.shape[3])).repeat(x.shape[0], 1, 1, 1)
        return self.head(self.embed(x) + positions)


SPECS = (
    # fixed features of the grid's positions: no channel of the model flows through them
    OpSpec("fourier_position_features", (FourierPositionFeatures,), flops=no_flops, coupling=opaque_coupling,
           example=lambda: (_XcitPositions(), (torch.randn(2, 3, 4, 5),))),
    OpSpec("parameter", (ParameterOp,), flops=no_flops, coupling=parameter_coupling,
           removal=remove_from_parameter, example=lambda: (_ClassToken(), (torch.randn(2, 3, 4),))),
    # torch.nn layers kept whole: transformer blocks, layers whose channel maps
    # are not described yet (pixel shuffles, unpooling, bilinear forms, local response norms)
    OpSpec("black_box_layer", BLACK_BOX_LAYERS, flops=measured_if_black_box, coupling=opaque_coupling),
    OpSpec("function", (FunctionalOp,), flops=no_flops, coupling=opaque_coupling),
    OpSpec("leaf_module", (nn.Module,), flops=measured_if_black_box, coupling=opaque_coupling),
)
