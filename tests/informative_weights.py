"""Weights that make an equivalence check see every branch of a model.

Randomly initialised timm models hide errors: layer scales start at 1e-6, the last norm of a
residual branch at zero, norm statistics at 0 and 1. The helpers here replace such constants by
random values, so that a conversion or removal error shows in the output. Used by the tests and
by ``scripts/coverage.py``; pure PyTorch, independent of dagprune.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_weights_informative", "randomize_normalization_layers"]


@torch.no_grad()
def randomize_normalization_layers(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Gives every norm layer non-trivial statistics and affine parameters.

    BatchNorm running means and variances and the weights and biases of BatchNorm, GroupNorm
    and LayerNorm are drawn at random, so that folding or slicing them wrongly changes the
    model's output.

    Args:
        model: the model, changed in place.
        generator: the source of the random values.

    Returns:
        ``model``.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats \
                and module.running_mean is not None:
            module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.empty(module.running_var.shape).uniform_(0.5, 2.0, generator=generator))
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.empty(module.weight.shape).uniform_(0.5, 1.5, generator=generator))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


@torch.no_grad()
def make_weights_informative(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replaces constant-initialised parameters and norm statistics by random values, so that
    an equivalence check can see every branch.

    timm initialises layer scales to 1e-6 or 1e-5, the last batch-norm weight of residual
    branches and GRN parameters to zero, NFNets' last gains to zero; a branch scaled that way
    hides conversion and removal errors below any tolerance. Norm statistics and affine
    parameters become random (:func:`randomize_normalization_layers`), other constant tensors
    uniform in [0.5, 1.5], constant biases small random values.

    Args:
        model: the model, changed in place.
        seed: seed of the random values.

    Returns:
        ``model``.

    >>> layer = make_weights_informative(nn.LayerNorm(4))
    >>> bool((layer.weight != 1).all() and (layer.bias != 0).all())
    True
    """
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_normalization_layers(model, generator)
    for name, parameter in model.named_parameters():
        flat = parameter.detach().flatten()
        if flat.numel() < 2 or not bool((flat == flat[0]).all()):
            continue
        if name.endswith("bias") or name.endswith("beta"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        else:
            parameter.copy_(torch.empty(parameter.shape).uniform_(0.5, 1.5, generator=generator))
    return model
