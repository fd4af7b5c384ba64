"""EvoNorm (:class:`~dagprune.ops.EvoNorm2d`, timm's ``EvoNorm2d*`` layers rewritten).

The B kinds (and a layer without activation) act on each channel alone: channels pass through
and removal slices the per-channel parameters and statistics. The S kinds divide by statistics
over groups of channels: like ``GroupNorm`` they consume the channels, every group keeping the
same positions (so that the number of groups stays) unless the model keeps or removes whole
groups (then the number of groups shrinks), and in the gated model the statistics count the
kept channels only.
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.channel_map import channel_atoms, tensor_layout
from dagprune.ops.evo_norm import GROUP_KINDS, EvoNorm2d
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.slicing import kept_count, slice_per_channel_state
from dagprune.ops.spec import OpSpec
from dagprune.ops.specs.normalization import group_norm_over_channels, kept_groups, norm_scale

__all__ = ["SPECS"]


def evo_norm_coupling(ctx, vertex, module, layouts, values, output):
    if module.kind in GROUP_KINDS:
        return group_norm_over_channels(ctx, vertex, 0, module.groups, layouts, [])
    atoms = channel_atoms(ctx, tensor_layout(layouts[0]), "EvoNorm statistics over a tracked spatial axis")
    return None if atoms is None else {1: atoms}


def remove_from_evo_norm(module, input_masks, output_mask, shapes):
    """Weight, bias, ``v`` and ``running_var`` lose the removed channels; the groups stay (each
    keeps the same number of channels), or whole groups go (see ``group_norm_over_channels``)."""
    mask = output_mask.get(1)
    groups = kept_groups(mask, module.groups) if module.kind in GROUP_KINDS else module.groups
    module = slice_per_channel_state(module, mask)
    module.groups = groups
    module.num_features = kept_count(mask, module.num_features)
    return module


def mask_evo_norm(norm, inputs, mask, axis):
    return norm.normalized(inputs[0], mask)


def _example():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), EvoNorm2d(8, "S0", groups=2), nn.Conv2d(8, 8, 1),
                          EvoNorm2d(8, "B0"), nn.Conv2d(8, 8, 1), EvoNorm2d(8, "S2", groups=4, act=nn.SiLU()),
                          nn.Conv2d(8, 3, 1))
    for norm in (model[1], model[3], model[5]):
        with torch.no_grad():  # away from the identity, so that every parameter matters
            for tensor in (norm.weight, norm.bias, norm.v, getattr(norm, "running_var", None)):
                if tensor is not None:
                    tensor.uniform_(0.5, 1.5)
    return model, (torch.randn(2, 3, 5, 5),)


SPECS = (
    OpSpec("evo_norm", (EvoNorm2d,), flops=no_flops, coupling=evo_norm_coupling,
           removal=remove_from_evo_norm, masking=mask_evo_norm, importance=norm_scale,
           example=_example),
)
