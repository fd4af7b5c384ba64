"""FLOPs helpers shared by the flops facets of the op specs.

FLOPs are ``2 x multiply-adds`` of the ops that dominate compute. Ops that only normalise,
activate, move or resample data count zero (:func:`no_flops`); black boxes (leaf modules whose
inside dagprune does not see) are run once under
:class:`torch.utils.flop_counter.FlopCounterMode` (:func:`measured_flops`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from dagprune.training_mode import evaluation_mode

__all__ = ["no_flops", "measured_flops", "measured_if_black_box", "is_black_box"]


def no_flops(module: nn.Module, inputs: list, output: Any) -> int:
    """The flops facet of ops that count zero (norms, activations, data movement)."""
    return 0


def is_black_box(module: nn.Module) -> bool:
    """True when ``module`` holds parameters, buffers or submodules, so it may compute inside."""
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)) or any(True for _ in module.children())


@contextlib.contextmanager
def _unfused_transformer_kernels():
    """Turns off torch's fused transformer fast path for the ``with`` block.

    In eval mode without gradients, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
    run one fused kernel that FlopCounterMode does not count; the unfused path runs the same
    projections and attention as separate, counted ops.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
    """``q @ k^T`` and ``scores @ v`` of torch's CPU flash-attention kernel (shapes (B, H, L, E),
    (B, H, S, E), (B, H, S, Ev)), which some torch versions' FlopCounterMode does not count."""
    *batch, length, dim = query_shape
    scores = math.prod(batch) * length * key_shape[-2]
    return 2 * scores * (dim + value_shape[-1])


def _uncounted_attention_kernels() -> dict:
    """Attention kernels this torch runs but FlopCounterMode does not count, with formulas."""
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None or kernel in flop_registry:
        return {}
    return {kernel: _cpu_flash_attention_flops}


def measured_flops(module: nn.Module, inputs: list, output: Any) -> int:
    """FLOPs of a black box: runs it once on ``inputs`` under FlopCounterMode.

    Counted are FlopCounterMode's matmul- and convolution-like ops (``mm``, ``addmm``, ``bmm``,
    ``baddbmm``, ``convolution``, attention kernels), ``2 x multiply-adds``; norms and
    elementwise ops inside count zero. The module runs in eval mode without gradients
    (batch-norm statistics are left alone); FLOPs that depend on the input values (routing)
    are those of ``inputs``.
    """
    with _unfused_transformer_kernels(), evaluation_mode(module), torch.no_grad(), \
            FlopCounterMode(display=False, custom_mapping=_uncounted_attention_kernels()) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def measured_if_black_box(module: nn.Module, inputs: list, output: Any) -> int:
    """Measured FLOPs for a module holding anything; 0 for one holding nothing."""
    return measured_flops(module, inputs, output) if is_black_box(module) else 0
