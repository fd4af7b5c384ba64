"""Grouped matrix products: ``torch._grouped_mm`` / ``F.grouped_mm`` of mixture-of-experts layers.

``grouped_mm(a, b, offs=offs)`` with ``a`` of shape ``(S, K)`` (token rows sorted by expert),
``b`` of shape ``(E, K, N)`` (one matrix per expert) and ``offs`` the end row of each expert's
rows: row ``s`` of the output is ``a[s] @ b[e]`` for the expert ``e`` whose rows hold ``s``.
The ``K`` channels of ``a`` and of every expert's matrix are contracted together (one class
each), the output's ``N`` channels are those of ``b``'s last axis; the experts (``b``'s first
axis) and the rows are indexed by ``offs``, so their channels are barriers. Removal keeps the op
but stores it as :func:`grouped_matmul`, which calls torch's kernel where it accepts the slim
shapes and computes each expert's rows in turn where it does not (torch's CPU kernel needs row
strides of a multiple of 16 bytes: ``K`` and ``N`` of 4 float32 channels at a time).
"""

from __future__ import annotations

import torch
from torch import nn

from dagprune.ops.base import FunctionalOp
from dagprune.ops.channel_map import argument_input, barrier_all, tensor_layout
from dagprune.ops.functions import register_function
from dagprune.ops.spec import OpSpec
from dagprune.ops.specs.products import contraction_flops, unify_contraction

__all__ = ["SPECS", "grouped_matmul"]

_KERNEL_ALIGNMENT = 16  # bytes


def grouped_matmul(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(mat_a, mat_b, offs=offs)`` for a 2-D ``mat_a`` and a 3-D ``mat_b``,
    also for shapes, dtypes or devices the kernel refuses (each expert's rows multiplied in turn;
    reads ``offs`` on the host)."""
    if _kernel_accepts(mat_a, mat_b):
        try:
            return torch._grouped_mm(mat_a, mat_b, offs=offs)
        except RuntimeError:  # e.g. float32 on a GPU whose kernel takes bfloat16 only
            pass
    output = mat_a.new_zeros(mat_a.shape[0], mat_b.shape[-1])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        output[start:end] = mat_a[start:end] @ mat_b[expert]
        start = end
    return output


_STORED_NAME = "dagprune.ops.specs.grouped_mm.grouped_matmul"
register_function(grouped_matmul, _STORED_NAME)


def _kernel_accepts(mat_a: torch.Tensor, mat_b: torch.Tensor) -> bool:
    def aligned(tensor):
        return all(stride * tensor.element_size() % _KERNEL_ALIGNMENT == 0
                   for stride, size in zip(tensor.stride(), tensor.shape) if stride != 1 and size > 1)
    return aligned(mat_a) and aligned(mat_b) and mat_a.shape[-1] * mat_a.element_size() % _KERNEL_ALIGNMENT == 0


def _operands(module) -> tuple[int | None, int | None, int | None]:
    return argument_input(module, 0, "mat_a"), argument_input(module, 1, "mat_b"), argument_input(module, 2, "offs")


def _is_expert_product(module, values, output) -> bool:
    a_index, b_index, offs_index = _operands(module)
    if None in (a_index, b_index, offs_index) or module.argument(3, "bias") is not None:
        return False
    a, b = values[a_index], values[b_index]
    return a.ndim == 2 and b.ndim == 3 and isinstance(output, torch.Tensor) and output.ndim == 2


def grouped_mm_flops(module, inputs, output) -> int:
    a_index, _, _ = _operands(module)
    return 0 if a_index is None else contraction_flops(inputs[a_index], output)


def grouped_mm_coupling(ctx, vertex, module, layouts, values, output):
    """See the module docstring."""
    if not _is_expert_product(module, values, output):
        return barrier_all(ctx, layouts, "a grouped matmul other than (rows, K) x (experts, K, N) with offsets")
    a_index, b_index, offs_index = _operands(module)
    a_layout, b_layout = tensor_layout(layouts[a_index]), tensor_layout(layouts[b_index])
    ctx.barrier_layout(layouts[offs_index], "offsets of a grouped matmul")
    for layout, axis, what in ((a_layout, 0, "rows"), (b_layout, 0, "experts")):
        if axis in layout:
            ctx.barrier(layout[axis], f"{what} of a grouped matmul")
    factors = unify_contraction(ctx, vertex, (a_index, 1, a_layout.get(1)), (b_index, 1, b_layout.get(1)),
                                "grouped matmul contraction with an untracked operand")
    result = {1: b_layout[2]} if 2 in b_layout else {}
    if result:  # the experts' output columns are this op's output channels, as a weight's rows are a linear's
        ctx.mark_producer(result[1], 1)
    factors.extend(result.values())
    ctx.count_flops(vertex, grouped_mm_flops(module, values, output), factors)
    return result or None


def remove_from_grouped_mm(module, input_masks, output_mask, shapes):
    """The same product as :func:`grouped_matmul`, which also runs slim shapes torch's kernel refuses."""
    return FunctionalOp(_STORED_NAME, (module.argument(0, "mat_a"), module.argument(1, "mat_b"),
                                       module.argument(2, "offs")), {})


class _Experts(nn.Module):
    """Two experts, rows sorted by expert: an up and a down projection per expert."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.up, self.down = nn.Parameter(torch.randn(2, 8, 12)), nn.Parameter(torch.randn(2, 12, 8))
        self.register_buffer("offs", torch.tensor([3, 6], dtype=torch.int32))

    def forward(self, x):
        h = torch._grouped_mm(self.embed(x), self.up, offs=self.offs).relu()
        return self.head(torch.nn.functional.grouped_mm(h, self.down, offs=self.offs))


def _example():
    return _Experts(), (torch.randn(6, 4),)


SPECS = (
    OpSpec("grouped_mm", ("torch._grouped_mm", "torch.nn.functional.grouped_mm", _STORED_NAME),
           flops=grouped_mm_flops, coupling=grouped_mm_coupling, removal=remove_from_grouped_mm, example=_example),
)
