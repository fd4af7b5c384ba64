"""Support for Hugging Face transformers layers that dagprune rewrites before tracing.

Loaded by :mod:`dagprune.integrations` when a model is converted while ``transformers`` is
imported. Like :mod:`dagprune.timm_layers`, it depends only on the registries of
:mod:`dagprune.leaf_modules`. It registers a rewrite of GPT-2's ``Conv1D`` (a linear layer whose
weight is stored transposed, applied with ``addmm`` to a flattened input) into ``nn.Linear`` with
the transposed weight: a layer whose input and output channels dagprune follows and prunes, and
which is saved without naming transformers. The result is the same product, summed by the
same kernel family; it may differ from ``Conv1D``'s in the last bits.

Everything else in the supported models (attention, rotary embeddings, masks, activations,
``ModelOutput`` results) is traced into torch functions; see :mod:`dagprune.value_tracing`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from dagprune.leaf_modules import register_module_rewrite

__all__: list[str] = []

_pytorch_utils = importlib.import_module("transformers.pytorch_utils")


@register_module_rewrite(_pytorch_utils.Conv1D)
def _rewrite_conv1d(module) -> nn.Linear:
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                       device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(module.weight.requires_grad)
    return linear.train(module.training)
