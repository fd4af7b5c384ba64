"""Ops: the small modules standing for a traced model's calls, and one spec per op.

Each op family (elementwise arithmetic, reshapes, concatenation, reductions, matmul, ...) is a
registered subclass of :class:`FunctionalOp`. What an op means for FLOPs, channel coupling,
channel removal, masking and importance is declared once, in its :class:`OpSpec`
(``dagprune/ops/specs/``); passes read the specs from :data:`OPS`, which users extend with
:func:`register_op`.
"""

from dagprune.ops.base import OP_TYPES, FunctionalOp, op_class_for_function, register_op_type
from dagprune.ops.elementwise import DropoutOp, ElementwiseOp, PointwiseOp
from dagprune.ops.cond_conv import CondConv2d
from dagprune.ops.fourier_features import FourierPositionFeatures
from dagprune.ops.evo_norm import EvoNorm2d
from dagprune.ops.functions import function_name, register_function, resolve_function
from dagprune.ops.layers import FunctionalLayerOp, InterpolateOp, NormOp, PadOp, PoolOp
from dagprune.ops.linear_algebra import AttentionOp, EinsumOp, MatmulOp
from dagprune.ops.multihead_attention import PrunedMultiheadAttention
from dagprune.ops.padding import SamePad2d
from dagprune.ops.parameter import ModuleCallOp, ParameterOp
from dagprune.ops.reduction import ReductionOp, SoftmaxOp
from dagprune.ops.standardized_conv import StandardizedConv2d
from dagprune.ops.stochastic_depth import StochasticDepth
from dagprune.ops.shape import (ConcatOp, ExpandOp, GetItemOp, PermuteOp, ReshapeOp, ShapeQueryOp,
                                SplitOp)
from dagprune.ops.templates import InputRef
from dagprune.ops.spec import INNER_AXIS, ChannelWeight, OpRegistry, OpSpec, opaque_coupling
from dagprune.ops.registry import OPS, op_flops, register_op, spec_for

__all__ = [
    "OPS", "OpSpec", "OpRegistry", "ChannelWeight", "opaque_coupling", "INNER_AXIS", "register_op", "spec_for",
    "op_flops", "OP_TYPES", "FunctionalOp", "op_class_for_function", "register_op_type", "register_function",
    "function_name", "resolve_function", "InputRef",
    "ElementwiseOp", "PointwiseOp", "DropoutOp", "ReshapeOp", "ExpandOp", "PermuteOp", "ConcatOp",
    "SplitOp", "GetItemOp", "ShapeQueryOp", "ReductionOp", "SoftmaxOp", "MatmulOp", "EinsumOp",
    "AttentionOp", "FunctionalLayerOp", "NormOp", "PoolOp", "InterpolateOp", "PadOp",
    "ParameterOp", "ModuleCallOp", "SamePad2d", "StandardizedConv2d", "StochasticDepth", "EvoNorm2d", "CondConv2d",
    "FourierPositionFeatures",
    "PrunedMultiheadAttention",
]
