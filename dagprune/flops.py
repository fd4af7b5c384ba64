"""FLOPs of a DAG, counted per vertex by handlers registered per op.

What is counted: ``2 x multiply-adds`` of the ops that dominate compute: convolutions (incl.
transposed and grouped), linear layers, recurrent layers' projections, matrix products
(``matmul``, ``bmm``, ``@``, ``einsum``, ``addmm``) and scaled dot-product attention. Biases,
normalisation, activations, elementwise arithmetic, pooling and resampling count zero.

Leaf modules with no handler (timm modules kept whole, such as ``MobileVitBlock`` or
``LiteMLA``, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, modules passed as
``leaf_modules``) are black boxes: when they hold parameters, buffers or submodules, they are
run once more on the vertex's inputs under :class:`torch.utils.flop_counter.FlopCounterMode`,
which reports ``2 x multiply-adds`` of the same matmul- and convolution-like aten ops (``mm``,
``addmm``, ``bmm``, ``baddbmm``, ``convolution``, attention kernels) and nothing else. Modules
with no handler and nothing inside (activations, reshapes, dagprune's shape ops) count zero
without being run.

Compared with fvcore's ``FlopCountAnalysis`` (one multiply-add = one FLOP): on the ops above
``count_flops == 2 x fvcore``. fvcore's ``total()`` also holds rough estimates for a few
memory-bound ops (``batch_norm``, ``group_norm``, ``layer_norm``, ``instance_norm``,
``adaptive_avg_pool2d``, ``upsample_*``, ``grid_sampler``: 0.3 to 4.3 % of its total on timm's
resnet18, mobilenetv2_100, efficientnet_b0, convnext_atto and vit_tiny), left out here on
purpose. fvcore itself suggests dropping batch norm (folded into the convolution at inference),
calls its norm figure "just a rough estimate", and counts ``adaptive_avg_pool2d`` but not
``avg_pool2d``, activations or residual additions. Counting them would also put FLOPs on
vertices whose cost channel pruning does not scale, so the FLOPs of a slimmed model would no
longer be the share its gates predict. fvcore does not count the fused
``scaled_dot_product_attention`` op; models using it differ from fvcore by their attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.flop_counter import FlopCounterMode

from dagprune.dag_module import DagModule, InnerVertex
from dagprune.errors import UnsupportedOpError
from dagprune.ops.base import handler_for
from dagprune.ops.layers import FunctionalLayerOp
from dagprune.ops.linear_algebra import AttentionOp, EinsumOp, MatmulOp
from dagprune.ops.parameter import ModuleCallOp, ParameterOp
from dagprune.ops.templates import fill_template
from dagprune.shape_prop import example_inputs, propagate_values
from dagprune.training_mode import evaluation_mode

__all__ = ["register_flops", "count_flops", "FlopsReport", "vertex_flops"]

FlopsHandler = Callable[[nn.Module, list, Any], int]
_HANDLERS: dict[Any, FlopsHandler] = {}


def register_flops(*keys):
    """Registers ``handler(module, input_values, output_value) -> FLOPs`` for module types or
    function names (``"torch.matmul"``). Values are the tensors the vertex saw."""
    def decorator(handler: FlopsHandler) -> FlopsHandler:
        for key in keys:
            _HANDLERS[key] = handler
        return handler
    return decorator


@dataclasses.dataclass
class FlopsReport:
    """FLOPs of one forward pass: ``total`` and ``per_vertex`` (vertex name -> FLOPs)."""

    total: int
    per_vertex: dict[str, int]

    def top(self, count: int = 10) -> list[tuple[str, int]]:
        """The ``count`` vertices with the most FLOPs."""
        return sorted(self.per_vertex.items(), key=lambda item: -item[1])[:count]


def vertex_flops(vertex: InnerVertex, inputs: list, output: Any) -> int:
    """FLOPs of one vertex given the values it read and produced.

    Args:
        vertex: a vertex of a DAG; a nested :class:`DagModule` is counted vertex by vertex.
        inputs: the values of its predecessors (batch 1 keeps black-box measuring cheap).
        output: the value it produced.

    Returns:
        The registered handler's count; for a black box (no handler, but parameters, buffers
        or submodules) the count measured by running it once; 0 otherwise.

    Raises:
        UnsupportedOpError: counting failed (a handler raised, or a black box could not run
            again on ``inputs``); the message names the vertex and how to register a counter.
    """
    module = vertex.module
    if isinstance(module, DagModule):
        return count_flops(module, inputs=inputs).total
    try:
        return _module_flops(module, inputs, output)
    except Exception as error:
        where = f"vertex {vertex.name!r}" + (f" ({vertex.qualified_name})" if vertex.qualified_name else "")
        raise UnsupportedOpError(
            f"cannot count the FLOPs of {where}, a {type(module).__qualname__}: {error}. Register a "
            f"counter with @dagprune.register_flops({type(module).__qualname__})") from error


def count_flops(dag: DagModule, input_shape_without_batch: Sequence | None = None,
                inputs: Sequence[torch.Tensor] | None = None) -> FlopsReport:
    """Counts the FLOPs of one forward pass with batch size 1 (or of the given ``inputs``).

    >>> import dagprune
    >>> dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(4, 3)))
    >>> count_flops(dag, (4,)).total
    24

    A leaf module is measured inside (here the leaf ``"0"`` holds the linear layer):

    >>> model = nn.Sequential(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    >>> dag = dagprune.build_from_unstructured_module(model, leaf_modules=["0"])
    >>> count_flops(dag, (4,)).total
    24
    """
    if inputs is None:
        inputs = example_inputs(dag, input_shape_without_batch)
    values = propagate_values(dag, inputs)
    per_vertex = {}
    for vertex in dag.inner_vertices:
        inputs_of_vertex = [values[p] for p in vertex.predecessors]
        per_vertex[vertex.name] = vertex_flops(vertex, inputs_of_vertex, values[vertex])
    return FlopsReport(sum(per_vertex.values()), per_vertex)


# --------------------------------------------------------------------------------- dispatch
def _module_flops(module: nn.Module, inputs: list, output: Any) -> int:
    """The handler's count, the measured count of a black box, or 0 (nothing inside)."""
    handler = handler_for(_HANDLERS, module)
    if handler is not None:
        return int(handler(module, inputs, output))
    if _is_black_box(module):
        return _measured_flops(module, inputs, output)
    return 0


def _is_black_box(module: nn.Module) -> bool:
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


def _measured_flops(module: nn.Module, inputs: list, output: Any) -> int:
    """FLOPs of a black box: runs it once on ``inputs`` under FlopCounterMode.

    Counted are FlopCounterMode's matmul- and convolution-like ops, ``2 x multiply-adds`` as in
    this module's handlers; norms and elementwise ops inside count zero. The module runs in eval
    mode without gradients (batch-norm statistics are left alone); FLOPs that depend on the
    input values (routing) are those of ``inputs``.
    """
    with _unfused_transformer_kernels(), evaluation_mode(module), torch.no_grad(), \
            FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


@register_flops(EinsumOp, "torch.nn.functional.conv_transpose1d",
                "torch.nn.functional.conv_transpose2d")
def _measured_function_flops(module, inputs, output) -> int:
    """Functions whose count depends on an equation or layout: measured like a black box."""
    return _measured_flops(module, inputs, output)


@register_flops(ModuleCallOp)
def _module_call_flops(module: ModuleCallOp, inputs, output) -> int:
    """A leaf module called with constant arguments: its handler sees the positional arguments;
    without a handler the call (keywords included) is measured."""
    handler = handler_for(_HANDLERS, module.module)
    if handler is not None:
        return int(handler(module.module, list(fill_template(module.args, inputs)), output))
    return _measured_flops(module, inputs, output) if _is_black_box(module.module) else 0


# --------------------------------------------------------------------------------- layers
@register_flops(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
                nn.GroupNorm, nn.RMSNorm, nn.PReLU, nn.Embedding, nn.EmbeddingBag, ParameterOp)
def _no_flops(module: nn.Module, inputs, output) -> int:
    """Layers with parameters but no multiply-add-dominated op: zero, and never measured."""
    return 0


@register_flops(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_flops(module: nn.Conv2d, inputs, output) -> int:
    kernel = math.prod(module.kernel_size)
    return 2 * output.numel() * (module.in_channels // module.groups) * kernel


@register_flops(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose_flops(module: nn.ConvTranspose2d, inputs, output) -> int:
    kernel = math.prod(module.kernel_size)
    return 2 * inputs[0].numel() * (module.out_channels // module.groups) * kernel


@register_flops(nn.Linear)
def _linear_flops(module: nn.Linear, inputs, output) -> int:
    return 2 * output.numel() * module.in_features


@register_flops(nn.RNNBase, nn.RNNCellBase)
def _recurrent_flops(module: nn.RNNBase, inputs, output) -> int:
    """Every weight matrix (input, hidden, projection; all layers and directions) at every step.

    Counted by formula: on CPU torch runs LSTMs with a oneDNN kernel FlopCounterMode cannot see.
    """
    sequence = inputs[0].data if isinstance(inputs[0], PackedSequence) else inputs[0]
    steps = sequence.numel() // module.input_size  # batch x time
    matrices = sum(weight.numel() for name, weight in module.named_parameters()
                   if name.startswith("weight_"))
    return 2 * steps * matrices


# --------------------------------------------------------------------------------- functions
def _argument_value(module, inputs: list, position: int, keyword: str) -> Any:
    argument = module.argument(position, keyword)
    return inputs[argument.index] if hasattr(argument, "index") else argument


@register_flops(*MatmulOp.function_names)
def _matmul_flops(module: MatmulOp, inputs, output) -> int:
    first_value = _argument_value(module, inputs, 0, "input")
    if not isinstance(first_value, torch.Tensor) or not isinstance(output, torch.Tensor):
        return 0
    return 2 * output.numel() * first_value.shape[-1]


@register_flops(*AttentionOp.function_names)
def _attention_flops(module: AttentionOp, inputs, output) -> int:
    query, key = inputs[0], inputs[1]
    value_dim = output.shape[-1]
    scores = query.numel() // query.shape[-1] * key.shape[-2]  # (..., L, S)
    return 2 * scores * (query.shape[-1] + value_dim)


@register_flops("torch.nn.functional.linear")
def _functional_linear_flops(module, inputs, output) -> int:
    weight = _argument_value(module, inputs, 1, "weight")
    return 2 * output.numel() * weight.shape[-1]


@register_flops("torch.addmm")
def _addmm_flops(module: FunctionalLayerOp, inputs, output) -> int:
    """``addmm(bias, mat1, mat2)``: the product only, like :func:`_linear_flops`."""
    first = _argument_value(module, inputs, 1, "mat1")
    return 2 * output.numel() * first.shape[-1]


@register_flops("torch.nn.functional.conv1d", "torch.nn.functional.conv2d",
                "torch.nn.functional.conv3d", "torch.conv2d", "torch.conv1d")
def _functional_conv_flops(module, inputs, output) -> int:
    weight = _argument_value(module, inputs, 1, "weight")
    return 2 * output.numel() * math.prod(weight.shape[1:])
