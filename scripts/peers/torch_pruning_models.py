"""The models of the Torch-Pruning benchmark and the layers its pruning groups start from or
leave alone, shared by the prepare and exactness sections.

Imported by ``torch_pruning_bench.py``, which puts the repository and ``scripts/`` on
``sys.path`` first (the peer environment sees the main environment's site-packages, but
not its editable install).
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import stage
from dagprune_algorithms.app.models import create_timm_model

ROOT_MODULE_TYPES = [nn.Conv2d, nn.Linear]
"""Layers whose output channels root a pruning group (``get_all_groups``)."""


def create_model(name: str, randomize: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """The timm model in eval mode (seed 0) and its default input shape without batch.

    With ``randomize``, :func:`randomize_constant_weights` is applied.
    """
    with stage("model"):
        torch.manual_seed(0)
        model = create_timm_model(name).eval()
        if randomize:
            randomize_constant_weights(model)
        return model, tuple(model.pretrained_cfg["input_size"])


@torch.no_grad()
def randomize_constant_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Draws random values for every constant-initialised tensor of ``model``, in place.

    timm zero-initialises the last norm of residual branches and starts layer scales at 1e-6,
    which hides a wrong removal inside a branch below any tolerance. Batch-norm statistics are
    drawn too; every parameter whose entries are all equal becomes random (biases around 0,
    other tensors in [0.5, 1.5]).
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.normal_(0.0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    for name, parameter in model.named_parameters():
        values = parameter.flatten()
        if values.numel() < 2 or not bool((values == values[0]).all()):
            continue
        if name.endswith("bias"):
            parameter.normal_(0.0, 0.1, generator=generator)
        else:
            parameter.uniform_(0.5, 1.5, generator=generator)
    return model


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier and all its submodules, the layers that pruning leaves alone.

    ``get_all_groups`` compares layers, not containers, so a classifier block is expanded the
    way ``BasePruner`` expands its ``ignored_layers``.
    """
    return list(model.get_classifier().modules())
