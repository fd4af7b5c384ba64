"""Support for Hugging Face transformers layers that dagprune rewrites before tracing.

Loaded by :mod:`dagprune.integrations` when a model is converted while ``transformers`` is
imported. Like :mod:`dagprune.timm_layers`, it depends only on the registries of
:mod:`dagprune.leaf_modules`. It registers rewrites into standard layers, which dagprune prunes
and saves without naming transformers:

* GPT-2's ``Conv1D`` (a linear layer whose weight is stored transposed, applied with ``addmm``
  to a flattened input) into ``nn.Linear`` with the transposed weight. The result is the same
  product; it may differ from ``Conv1D``'s in the last bits;
* subclasses of ``nn.Linear`` with a forward of their own (Falcon's ``x @ W.T + b``) into
  ``nn.Linear`` sharing the weight and bias, if the two agree on a random input (as below);
* subclasses of ``nn.Embedding`` with a forward of their own (Gemma's scaled word embedding)
  into ``nn.Embedding`` (times the ``embed_scale`` buffer where there is one), if bit-equal on
  random token IDs;
* the RMS norms each model family defines (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``T5LayerNorm``,
  ...: a module of transformers with one 1-D ``weight`` and an epsilon) into ``nn.RMSNorm``
  sharing the weight, *if* the two agree on a random input (to 1e-6, relative; they are
  bit-equal for the LLaMA form); Gemma's form, which scales by ``1 + weight``, becomes an
  ``nn.RMSNorm`` whose weight is that sum (a parameter of its own). A norm that agrees in
  neither form is traced as it is. Traced, an RMS norm's mean over channels stops the residual stream's
  channels from being pruned; as ``nn.RMSNorm`` they are (its mean counts only kept channels).

A DAG holds no key/value cache: a model whose example leaves ``use_cache`` out is traced as called
with ``use_cache=False`` (its config's default would build a cache object), so the converted
decoder returns ``past_key_values=None``; see
:func:`dagprune.specialization.register_traced_default`.

Everything else in the supported models (attention, rotary embeddings, masks, activations,
``ModelOutput`` results) is traced into torch functions; see :mod:`dagprune.value_tracing`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from dagprune.leaf_modules import register_module_rewrite
from dagprune.specialization import register_traced_default

__all__ = ["ScaledEmbedding"]

_pytorch_utils = importlib.import_module("transformers.pytorch_utils")

register_traced_default(importlib.import_module("transformers.modeling_utils").PreTrainedModel, "use_cache", False)


_EPSILON_NAMES = ("variance_epsilon", "eps", "epsilon")
_AGREEMENT = 1e-6


def _epsilon(module: nn.Module) -> float | None:
    values = [getattr(module, name) for name in _EPSILON_NAMES if isinstance(getattr(module, name, None), float)]
    return values[0] if values else None


def _looks_like_rms_norm(module: nn.Module) -> bool:
    """A transformers module with only a 1-D ``weight`` parameter and an epsilon."""
    if not type(module).__module__.startswith("transformers.") or next(module.children(), None) is not None:
        return False
    names = [name for name, _ in module.named_parameters()]
    return names == ["weight"] and module.weight.ndim == 1 and _epsilon(module) is not None


def _agrees(module: nn.Module, candidate: nn.Module, features: int) -> bool:
    """Whether ``candidate`` computes what ``module`` computes on a seeded random input."""
    weight = next(module.parameters())
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, 3, features, generator=generator, device=weight.device).to(weight.dtype) * 3
    try:
        with torch.no_grad():
            expected, got = module(x), candidate(x)
    except Exception:  # noqa: BLE001 - a forward that takes other inputs: not this layer's form
        return False
    with torch.no_grad():
        if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
            return False
        scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
        return bool(((expected - got).abs().max() / scale) <= max(_AGREEMENT, torch.finfo(weight.dtype).eps))


@register_module_rewrite(_looks_like_rms_norm)
def _rewrite_rms_norm(module: nn.Module) -> nn.Module:
    weight = module.weight
    candidate = nn.RMSNorm(weight.shape[0], eps=_epsilon(module), device=weight.device, dtype=weight.dtype)
    candidate.weight = weight  # shared, as the model's other users of it expect
    if _agrees(module, candidate, weight.shape[0]):
        return candidate.train(module.training)
    with torch.no_grad():  # Gemma's form scales by 1 + weight: the norm's own weight is that sum
        candidate.weight = nn.Parameter(weight.detach() + 1, requires_grad=weight.requires_grad)
    return candidate.train(module.training) if _agrees(module, candidate, weight.shape[0]) else module


def _is_linear_subclass(module: nn.Module) -> bool:
    """A transformers subclass of ``nn.Linear`` with its own forward (Falcon's ``x @ W.T + b``)."""
    return isinstance(module, nn.Linear) and type(module) is not nn.Linear \
        and type(module).__module__.startswith("transformers.")


@register_module_rewrite(_is_linear_subclass)
def _rewrite_linear_subclass(module: nn.Linear) -> nn.Module:
    candidate = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
    candidate.weight, candidate.bias = module.weight, module.bias  # shared
    return candidate.train(module.training) if _agrees(module, candidate, module.in_features) else module


class ScaledEmbedding(nn.Module):
    """``embedding(ids) * scale``: Gemma's scaled word embedding as a standard embedding and a
    multiplication by a buffer, traced through (the embedding stays the layer that is pruned)."""

    def __init__(self, embedding: nn.Embedding, scale: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, input_ids):
        return self.embedding(input_ids) * self.scale.to(self.embedding.weight.dtype)


def _is_embedding_subclass(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and type(module) is not nn.Embedding \
        and type(module).__module__.startswith("transformers.")


@register_module_rewrite(_is_embedding_subclass)
def _rewrite_embedding_subclass(module: nn.Embedding) -> nn.Module:
    """A transformers embedding with a forward of its own: the standard embedding, times its
    ``embed_scale`` if it has one, if that computes the same on random token IDs."""
    embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                             device=module.weight.device, dtype=module.weight.dtype)
    embedding.weight = module.weight  # shared (tied output heads read it too)
    scale = getattr(module, "embed_scale", None)
    candidate = ScaledEmbedding(embedding, scale) if isinstance(scale, torch.Tensor) and scale.numel() == 1 \
        else embedding
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, module.num_embeddings, (2, 5), generator=generator).to(module.weight.device)
    try:
        with torch.no_grad():
            same = torch.equal(module(ids), candidate(ids))
    except Exception:  # noqa: BLE001 - a forward of another kind (OPT's positions with an offset)
        same = False
    return candidate.train(module.training) if same else module


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
