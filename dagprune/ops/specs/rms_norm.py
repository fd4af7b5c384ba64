"""RMSNorm (``nn.RMSNorm``, ``F.rms_norm``): the norm of LLaMA-style residual streams.

``y = x / sqrt(mean(x^2 over the last axes) + eps) * weight``. Over one channel axis the
mean mixes channels, so the norm *consumes* them: in the gated model the mean runs over the
kept channels only, and removing channels slices the weight and shrinks ``normalized_shape``.
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.channel_map import argument_input, argument_value, tensor_layout
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.spec import OpSpec, opaque_coupling
from dagprune.ops.specs.normalization import (couple_normalized_shape, layer_norm_coupling,
                                             norm_over_last_axes, norm_scale,
                                             remove_from_layer_norm, scaled_affine,
                                             shrink_normalized_shape)

__all__ = ["SPECS", "masked_rms_norm"]


def functional_rms_norm_coupling(ctx, vertex, module, layouts, values, output):
    x_index = argument_input(module, 0, "input")
    shape = argument_value(module, values, 1, "normalized_shape")
    if x_index is None or shape is None:
        return opaque_coupling(ctx, vertex, module, layouts, values, output)
    params = [argument_input(module, 2, "weight")]
    couple_normalized_shape(ctx, module, layouts, tensor_layout(layouts[x_index]), values[x_index].ndim)
    return norm_over_last_axes(ctx, vertex, x_index, len(shape), layouts, values, params)


def masked_rms_norm(x: torch.Tensor, mask: torch.Tensor, weight, eps, output_scale=None) -> torch.Tensor:
    """RMSNorm over the last axis with the mean of squares taken over kept channels only, its
    output multiplied by ``output_scale`` (per channel) when given.

    With a 0/1 mask this equals ``F.rms_norm`` of ``x`` with the removed channels cut out.

    >>> x, mask = torch.randn(2, 4), torch.tensor([1.0, 0.0, 1.0, 1.0])
    >>> kept = torch.nn.functional.rms_norm(x[:, [0, 2, 3]], (3,), eps=1e-6)
    >>> torch.allclose(masked_rms_norm(x, mask, None, 1e-6)[:, [0, 2, 3]], kept)
    True
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    weight, _ = scaled_affine(weight, None, output_scale)
    weights = mask / mask.sum()
    if _fused_path(x, weights, weight):
        return _MaskedRMSNorm.apply(x.contiguous(), weights, weight, eps)
    mean_square = (x * x) @ weights
    y = x * torch.rsqrt(mean_square + eps).unsqueeze(-1)
    return y * weight if weight is not None else y


def _fused_path(x, weights, weight) -> bool:
    """Whether :class:`_MaskedRMSNorm` computes the norm: float32/64 inputs with a weight,
    outside autocast (elsewhere the composed ops run, in the dtypes autocast picks)."""
    return (x.dtype in (torch.float32, torch.float64) and weight is not None
            and all(t.dtype == x.dtype and t.device == x.device for t in (weights, weight))
            and not torch.is_autocast_enabled(x.device.type))


class _MaskedRMSNorm(torch.autograd.Function):
    """The masked RMS norm with its gradient written out (fewer full-size ops per step than
    the composed ops' autograd graph).

    With ``w`` the normalised mask, ``r = (sum(w * x^2) + eps) ** -0.5``, ``y = x * r``,
    ``g = grad_out * weight`` and ``s = sum(g * y)`` over the channels:
    ``grad_x = r * (g - w * y * s)`` and ``grad_w = -sum over rows of (s * y^2) / 2``.
    """

    @staticmethod
    def forward(ctx, x, weights, weight, eps):
        rstd = torch.rsqrt((x * x) @ weights + eps)
        y = x * rstd.unsqueeze(-1)
        ctx.save_for_backward(y, rstd, weights, weight)
        return y * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, rstd, weights, weight = ctx.saved_tensors
        channels = y.shape[-1]
        rows_out, rows_y = grad_out.contiguous().view(-1, channels), y.view(-1, channels)
        products = rows_out * rows_y
        grad_weight = products.sum(0) if ctx.needs_input_grad[2] else None
        s = (products @ weight).unsqueeze(-1)
        grad_weights = -0.5 * (s.reshape(-1) @ (rows_y * rows_y)) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(rows_out * weight, rows_y * s, weights, value=-1.0)
            grad_x = grad_x.mul_(rstd.reshape(-1, 1)).view_as(y)
        return grad_x, grad_weights, grad_weight, None


def mask_rms_norm(norm, inputs, mask, axis, output_scale=None):
    return masked_rms_norm(inputs[0], mask, norm.weight, norm.eps, output_scale)


def mask_functional_rms_norm(op, inputs, mask, axis, output_scale=None):
    return masked_rms_norm(argument_value(op, inputs, 0, "input"), mask, argument_value(op, inputs, 2, "weight"),
                           argument_value(op, inputs, 3, "eps"), output_scale)


class _FunctionalRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.weight, self.down = nn.Linear(5, 8), nn.Parameter(torch.rand(8)), nn.Linear(8, 3)

    def forward(self, x):
        return self.down(torch.nn.functional.rms_norm(self.up(x), (8,), self.weight, 1e-6))


def _example():
    return nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), nn.Linear(8, 3)), (torch.randn(2, 4, 5),)


SPECS = (
    # the module: coupled and sliced like LayerNorm (a weight over normalized_shape)
    OpSpec("rms_norm", (nn.RMSNorm,), flops=no_flops, coupling=layer_norm_coupling,
           removal=remove_from_layer_norm, masking=mask_rms_norm, scales_output=True,
           importance=norm_scale, example=_example),
    OpSpec("functional_rms_norm", ("torch.nn.functional.rms_norm", "torch.rms_norm"),
           flops=no_flops, coupling=functional_rms_norm_coupling,
           removal=shrink_normalized_shape, masking=mask_functional_rms_norm, scales_output=True,
           reads_sizes=True,
           example=lambda: (_FunctionalRMSNorm(), (torch.randn(2, 5),))),
)
