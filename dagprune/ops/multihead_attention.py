"""Multi-head attention with independent widths: what ``nn.MultiheadAttention`` becomes when
channels are removed from it.

``nn.MultiheadAttention`` ties its widths together: the query's features, the output's
features and the inner width ``num_heads x head_dim`` are all ``embed_dim``, and the scale is
``1 / sqrt(embed_dim / num_heads)``. Removing heads, head dims or input and output features
breaks these ties, so channel removal replaces the layer by :class:`PrunedMultiheadAttention`,
which is called the same way (same arguments, same ``(output, weights)`` result) and keeps
its scale as a number. :func:`multihead_attention` is the computation both share.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dagprune.ops.base import register_op_type

__all__ = ["PrunedMultiheadAttention", "AttentionWeights", "multihead_attention",
           "attention_weights_of", "original_scale"]


@dataclasses.dataclass
class AttentionWeights:
    """The projections of a multi-head attention (``F.linear`` weights and biases)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    out: torch.Tensor
    query_bias: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    value_bias: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None


def attention_weights_of(layer: nn.Module) -> AttentionWeights:
    """The projections of an ``nn.MultiheadAttention`` or a :class:`PrunedMultiheadAttention`."""
    if isinstance(layer, PrunedMultiheadAttention):
        projections = (layer.q_proj, layer.k_proj, layer.v_proj)
        return AttentionWeights(*(p.weight for p in projections), layer.out_proj.weight,
                                *(p.bias for p in projections), layer.out_proj.bias)
    if layer._qkv_same_embed_dim:
        query, key, value = layer.in_proj_weight.chunk(3)
    else:
        query, key, value = layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight
    biases = layer.in_proj_bias.chunk(3) if layer.in_proj_bias is not None else (None,) * 3
    return AttentionWeights(query, key, value, layer.out_proj.weight, *biases, layer.out_proj.bias)


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not attended) as an additive float mask (``-inf`` there)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _score_mask(attn_mask, key_padding_mask, batch: int, num_heads: int, dtype) -> torch.Tensor | None:
    """``attn_mask`` ((L, S) or (batch x heads, L, S)) plus ``key_padding_mask`` ((batch, S)),
    additive and broadcastable to the scores (batch, heads, L, S)."""
    mask = _additive_mask(attn_mask, dtype)
    if mask is not None and mask.ndim == 3:
        mask = mask.view(batch, num_heads, *mask.shape[1:])
    padding = _additive_mask(key_padding_mask, dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, padding.shape[-1])
        mask = padding if mask is None else mask + padding
    return mask


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, tokens, heads x dim) -> (batch, heads, tokens, dim)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def multihead_attention(query, key, value, weights: AttentionWeights, num_heads: int, scale: float,
                        batch_first: bool = False, dropout: float = 0.0, key_padding_mask=None,
                        need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                        is_causal: bool = False):
    """``nn.MultiheadAttention``'s computation (batched inputs, no ``bias_k``/``bias_v`` and no
    zero attention) with any projection widths and a given ``scale``.

    Returns:
        ``(output, attention weights or None)`` as ``nn.MultiheadAttention`` returns them.
    """
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, length = query.shape[0], query.shape[1]
    q = _split_heads(F.linear(query, weights.query, weights.query_bias), num_heads)
    k = _split_heads(F.linear(key, weights.key, weights.key_bias), num_heads)
    v = _split_heads(F.linear(value, weights.value, weights.value_bias), num_heads)
    mask = _score_mask(attn_mask, key_padding_mask, batch, num_heads, q.dtype)
    if is_causal and mask is None:  # with a mask, is_causal is only a hint about it
        mask = _additive_mask(torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).triu(1), q.dtype)
    attention = None
    if need_weights:
        scores = (q * scale) @ k.transpose(-2, -1)
        attention = (scores if mask is None else scores + mask).softmax(-1)
        if dropout > 0.0:
            attention = F.dropout(attention, dropout)
        mixed = attention @ v
    else:
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    output = F.linear(mixed.transpose(1, 2).flatten(2), weights.out, weights.out_bias)
    if not batch_first:
        output = output.transpose(0, 1)
    if attention is not None and average_attn_weights:
        attention = attention.mean(1)
    return output, attention


@register_op_type
class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose query, key, value and output widths, number of heads and head
    dims are independent, with a fixed scale; called like ``nn.MultiheadAttention``.

    Args:
        query_features, key_features, value_features: the inputs' feature counts.
        out_features: the output's feature count.
        num_heads: attention heads.
        head_dim: query and key dims per head.
        value_head_dim: value dims per head.
        scale: the factor of the query-key products (``1 / sqrt(original head_dim)``).
        bias: whether the projections have biases.
        batch_first: inputs and output are (batch, tokens, features), else (tokens, batch,
            features).
        dropout: dropout probability on the attention weights in train mode.

    >>> layer = PrunedMultiheadAttention(8, 8, 8, 8, num_heads=2, head_dim=3, value_head_dim=2,
    ...                                  scale=0.5, batch_first=True)
    >>> x = torch.randn(1, 5, 8)
    >>> [tuple(t.shape) for t in layer(x, x, x)]
    [(1, 5, 8), (1, 5, 5)]
    """

    def __init__(self, query_features: int, key_features: int, value_features: int,
                 out_features: int, num_heads: int, head_dim: int, value_head_dim: int,
                 scale: float, bias: bool = True, batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.value_head_dim = num_heads, head_dim, value_head_dim
        self.scale, self.batch_first, self.dropout = float(scale), bool(batch_first), float(dropout)
        self.q_proj = nn.Linear(query_features, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(key_features, num_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(value_features, num_heads * value_head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * value_head_dim, out_features, bias=bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        return multihead_attention(
            query, key, value, attention_weights_of(self), self.num_heads, self.scale,
            batch_first=self.batch_first, dropout=self.dropout if self.training else 0.0,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, value_head_dim="
                f"{self.value_head_dim}, scale={self.scale:.6g}, batch_first={self.batch_first}")

    def get_config(self) -> dict:
        return {"query_features": self.q_proj.in_features, "key_features": self.k_proj.in_features,
                "value_features": self.v_proj.in_features, "out_features": self.out_proj.out_features,
                "num_heads": self.num_heads, "head_dim": self.head_dim,
                "value_head_dim": self.value_head_dim, "scale": self.scale,
                "bias": self.q_proj.bias is not None, "batch_first": self.batch_first,
                "dropout": self.dropout}

    @classmethod
    def from_config(cls, config: dict) -> "PrunedMultiheadAttention":
        return cls(**config)


def original_scale(layer: nn.MultiheadAttention) -> float:
    """The scale ``nn.MultiheadAttention`` applies: ``1 / sqrt(embed_dim // num_heads)``."""
    return math.sqrt(1.0 / float(layer.head_dim))
