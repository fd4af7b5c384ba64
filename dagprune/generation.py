"""Text generation with a causal language model DAG (a converted, pruned or loaded one).

A DAG holds no key/value cache (it is traced with ``use_cache=False``), so :func:`generate`
runs it on the whole sequence at every new token: each step costs a forward over the prompt and
what was generated so far. That is what a slim model needs for sampling outputs and checking
them against the original's; for serving, put the slim widths back into a model with a cache.

Rows may have different prompt lengths when they are padded on the left with
``attention_mask`` zeros (as Hugging Face generates). A DAG that takes ``position_ids`` gets
each row's positions counted from its first real token; one that does not computes its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dagprune.errors import ExecutionError

__all__ = ["generate"]


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
             pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The prompt ``input_ids`` followed by up to ``max_new_tokens`` generated tokens per row.

    Args:
        model: called as ``model(input_ids=..., attention_mask=...)`` (``position_ids=`` too when
            a DAG takes it); it returns the logits, or an output holding them under ``"logits"``
            or first (a ``ModelOutput``, a :class:`~dagprune.outputs.DagOutput`, a tuple).
        input_ids: ``(batch, length)`` integer token IDs.
        max_new_tokens: how many tokens to add at most.
        attention_mask: ``(batch, length)`` 1 for tokens, 0 for left padding; all ones if None.
        eos_token_id: a row that produces it stops; its later positions hold ``pad_token_id``
            (``eos_token_id`` if None). Generation ends when every row has stopped.
        do_sample: draw from the softmax of ``logits / temperature`` (within the ``top_k`` most
            likely tokens if given) instead of taking the most likely token.
        generator: the random generator of the draws.

    Raises:
        ExecutionError: an argument is out of range, or the model's output holds no logits of
            shape ``(batch, length, vocabulary)``.
    """
    _check_arguments(input_ids, max_new_tokens, attention_mask, temperature, top_k)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    filler = eos_token_id if pad_token_id is None else pad_token_id
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = _last_logits(model(**_model_inputs(model, input_ids, mask)), input_ids)
            token = _pick(logits, do_sample, temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, filler), token)
                finished |= token == eos_token_id
            input_ids = torch.cat([input_ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if eos_token_id is not None and bool(finished.all()):
                break
    return input_ids


def _check_arguments(input_ids, max_new_tokens, attention_mask, temperature, top_k) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise ExecutionError("generate needs input_ids as a (batch, length) tensor of integer token IDs, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ExecutionError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ExecutionError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must match "
                             f"input_ids' {tuple(input_ids.shape)}")
    if not temperature > 0:
        raise ExecutionError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ExecutionError(f"top_k must be an int >= 1 or None, got {top_k!r}")


def _model_inputs(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> dict:
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    names = [vertex.name for vertex in getattr(model, "inputs", []) if not getattr(vertex, "fixed", False)]
    if "position_ids" in names:  # counted from each row's first real token, as for left padding
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
    if names:
        inputs = {name: value for name, value in inputs.items() if name in names}
    return inputs


def _last_logits(output: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of the last position, ``(batch, vocabulary)``."""
    logits = output
    if isinstance(output, dict) and "logits" in output:
        logits = output["logits"]
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ExecutionError("the model's output holds no logits of shape (batch, length, vocabulary) "
                             f"for input_ids of shape {tuple(input_ids.shape)}")
    return logits[:, -1].float()


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
