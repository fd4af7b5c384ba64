"""Elementwise ops: arithmetic between tensors (with broadcasting) and pointwise functions."""

from __future__ import annotations


from dagprune.ops.base import FunctionalOp, register_op_type

__all__ = ["ElementwiseOp", "PointwiseOp", "DropoutOp"]


def _names(*short_names: str, namespaces=("operator", "torch", "Tensor")) -> tuple[str, ...]:
    return tuple(f"{namespace}.{name}" for name in short_names for namespace in namespaces)


@register_op_type
class ElementwiseOp(FunctionalOp):
    """Arithmetic of two operands with broadcasting: ``a + b``, ``torch.mul(a, b)``, ``a / 2``..."""

    function_names = _names("add", "sub", "mul", "truediv", "div", "floordiv", "pow", "maximum",
                            "minimum", "iadd", "imul", "isub", "itruediv", "add_", "mul_", "sub_",
                            "div_", "true_divide", "subtract", "multiply", "rsub", "where",
                            "floor_divide", "addcmul", "lerp", "mod", "fmod", "remainder",
                            "logical_and", "logical_or", "logical_xor", "and_", "or_", "xor",
                            "bitwise_and", "bitwise_or", "bitwise_xor", "masked_fill", "masked_fill_") + \
        _names("eq", "ne", "gt", "lt", "ge", "le", "greater", "less", "greater_equal", "less_equal",
               "not_equal", "heaviside", "logaddexp", "logaddexp2", "hypot", "atan2", "copysign",
               "xlogy", "fmax", "fmin", "float_power", namespaces=("torch", "Tensor"))


@register_op_type
class PointwiseOp(FunctionalOp):
    """A function applied to each element independently (activations, casts, clamps, ...)."""

    function_names = (
        _names("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt",
               "rsqrt", "abs", "neg", "erf", "sin", "cos", "clamp", "clamp_", "clip",
               "clamp_min", "clamp_max", "reciprocal", "square", "sign", "floor", "ceil", "round",
               "contiguous", "float", "half", "to", "type_as", "type", "detach", "clone",
               "nan_to_num", "log1p", "expm1", "hardtanh", "silu", "gelu", "softplus", "mish",
               "hardswish", "hardsigmoid", "relu6", "leaky_relu", "elu", "selu", "celu",
               "logsigmoid", "tanhshrink", "softsign", "prelu", "erfc", "neg_", "abs_",
               "sigmoid", "exp_", "pow_", "invert", "not_", "inv", "logical_not", "bitwise_not",
               "isnan", "isinf", "isfinite", "isneginf", "isposinf", "signbit",
               namespaces=("torch", "Tensor", "torch.nn.functional", "operator"))
        + _names("tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "log2",
                 "log10", "exp2", "sinc", "frac", "trunc", "logit", "sgn", "positive", "digamma",
                 "lgamma", "i0", "fix", "deg2rad", "rad2deg", "erfinv",
                 namespaces=("torch", "Tensor"))
        + _names("softshrink", "hardshrink", "threshold", namespaces=("torch.nn.functional",))
        + ("operator.neg", "operator.pos", "torch.special.expit", "torch.special.erf", "Tensor.double",
           "Tensor.bfloat16"))


@register_op_type
class DropoutOp(PointwiseOp):
    """Functional dropout; follows the DAG's train/eval mode rather than the mode at tracing."""

    function_names = ("torch.nn.functional.dropout", "torch.dropout", "torch.nn.functional.dropout1d",
                      "torch.nn.functional.dropout2d", "torch.nn.functional.dropout3d",
                      "torch.nn.functional.alpha_dropout", "torch.alpha_dropout",
                      "torch.feature_alpha_dropout", "torch.nn.functional.feature_alpha_dropout")

    def argument_templates(self) -> tuple[tuple, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        keyword = "training" if self.function_name.startswith("torch.nn.functional.") else "train"
        if len(args) > 2:  # (input, p, training/train, ...)
            args[2] = self.training
        else:
            kwargs[keyword] = self.training
        return tuple(args), kwargs
