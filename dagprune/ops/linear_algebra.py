"""Products of tensors: matmul, bmm, einsum and scaled dot-product attention."""

from __future__ import annotations

from dagprune.ops.base import FunctionalOp, register_op_type

__all__ = ["MatmulOp", "AddMatmulOp", "AttentionOp", "EinsumOp"]


@register_op_type
class MatmulOp(FunctionalOp):
    """Matrix product over the last two axes, broadcasting the leading ones."""

    function_names = ("operator.matmul", "torch.matmul", "Tensor.matmul", "torch.bmm",
                      "Tensor.bmm", "torch.mm", "Tensor.mm", "Tensor.__matmul__")


@register_op_type
class AddMatmulOp(FunctionalOp):
    """``beta * input + alpha * (batch1 @ batch2)``: ``baddbmm`` (``torch.addmm`` is a
    :class:`~dagprune.ops.layers.FunctionalLayerOp`, with the same coupling)."""

    function_names = ("torch.baddbmm", "Tensor.baddbmm")


@register_op_type
class EinsumOp(FunctionalOp):
    """``torch.einsum(equation, *operands)``."""

    function_names = ("torch.einsum",)


@register_op_type
class AttentionOp(FunctionalOp):
    """``F.scaled_dot_product_attention(q, k, v, ...)``; dropout follows the DAG's mode."""

    function_names = ("torch.nn.functional.scaled_dot_product_attention",)

    def argument_templates(self) -> tuple[tuple, dict]:
        if self.training:
            return self.args, self.kwargs
        args, kwargs = list(self.args), dict(self.kwargs)
        if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
            args[4] = 0.0
        else:
            kwargs["dropout_p"] = 0.0
        return tuple(args), kwargs
