"""Support for timm layers that torch.fx cannot trace faithfully.

Loaded by :mod:`dagprune.integrations` when a model is converted while timm is imported, or when
a saved graph names timm types. It depends only on the registries of
:mod:`dagprune.leaf_modules` and on :mod:`dagprune.ops`, never on tracing or saving. It registers:

* rewrites of fused norm + activation layers (``BatchNormAct2d``, ``GroupNormAct``, ...) into a
  standard norm, dropout and activation sharing the same parameters, so that batch-norm
  statistics keep updating in train mode (tracing the fused layer would freeze its mode);
* rewrites of TensorFlow-``SAME`` convolutions and pools into :class:`~dagprune.ops.SamePad2d`
  followed by the standard layer;
* rewrites of weight-standardised convolutions (``StdConv2d``, ``ScaledStdConv2d`` and their
  ``Same`` variants) into :class:`~dagprune.ops.StandardizedConv2d`;
* a rewrite of ``DropPath`` (stochastic depth, from ``drop_path_rate``) into
  :class:`~dagprune.ops.StochasticDepth`, which keeps dropping paths in train mode;
* attention layers holding an eval-mode cache of their attention biases get an empty one, so
  that the traced graph computes the biases from their parameter;
* a rewrite of XCiT's ``PositionalEncodingFourier`` into
  :class:`~dagprune.ops.FourierPositionFeatures` and its projection, whose channels are followed;
* a rewrite of ``CondConv2d`` (EfficientNet-CondConv's mixture of expert kernels) into
  :class:`~dagprune.ops.CondConv2d`, whose channels are followed;
* rewrites of the EvoNorm layers (``EvoNorm2dB0`` ... ``EvoNorm2dS2a``) into
  :class:`~dagprune.ops.EvoNorm2d`, whose channels are followed (kept whole where an activation
  holds parameters);
* timm's own lists of modules and helper functions that must not be traced into (blocks that
  branch on sizes are traced through when the model is converted with example inputs);
* timm's activation functions as storable functions (leaf modules hold them as attributes).
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from dagprune.leaf_modules import (apply_module_rewrites, register_autowrap_function, register_leaf_module,
                                   register_module_rewrite, shallow_copy)
from dagprune.ops.cond_conv import CondConv2d
from dagprune.ops.evo_norm import EvoNorm2d
from dagprune.ops.fourier_features import FourierPositionFeatures
from dagprune.ops.flop_counting import no_flops
from dagprune.ops.functions import register_function
from dagprune.ops.registry import register_op
from dagprune.ops.slicing import unchanged_removal
from dagprune.ops.spec import OpSpec
from dagprune.ops.specs.channelwise import last_axis_pass_through_coupling
from dagprune.ops.padding import SamePad2d
from dagprune.ops.standardized_conv import StandardizedConv2d
from dagprune.ops.stochastic_depth import StochasticDepth

__all__ = ["NormAct", "PaddedLayer"]

# timm.layers re-exports functions named like its submodules, so import the submodules by path.
_norm_act = importlib.import_module("timm.layers.norm_act")
_conv2d_same = importlib.import_module("timm.layers.conv2d_same")
_pool2d_same = importlib.import_module("timm.layers.pool2d_same")
_std_conv = importlib.import_module("timm.layers.std_conv")
_timm_fx = importlib.import_module("timm.models._features_fx")
_pos_embed = importlib.import_module("timm.layers.pos_embed")


class NormAct(nn.Module):
    """``act(drop(norm(x)))``: the traceable equivalent of timm's fused norm + activation."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x):
        return self.act(self.drop(self.norm(x)))


class PaddedLayer(nn.Module):
    """``layer(pad(x))``: a SAME-padded conv or pool as two standard modules."""

    def __init__(self, pad: SamePad2d, layer: nn.Module):
        super().__init__()
        self.pad, self.layer = pad, layer

    def forward(self, x):
        return self.layer(self.pad(x))


def _share_state(target: nn.Module, source: nn.Module) -> nn.Module:
    for name, _ in list(target.named_parameters(recurse=False)):
        setattr(target, name, getattr(source, name))
    for name, _ in list(target.named_buffers(recurse=False)):
        setattr(target, name, getattr(source, name))
    return target


def _drop_and_act(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    return getattr(module, "drop", nn.Identity()), getattr(module, "act", nn.Identity())


def _layout_of(template: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The settings (plain attributes), parameter names and buffer names a layer type holds."""
    settings = tuple(sorted(set(template.__dict__) - set(nn.Module().__dict__)))
    return settings, tuple(template._parameters), tuple(template._buffers)


_NORM_LAYOUTS = {cls: _layout_of(template) for cls, template in (
    (nn.BatchNorm2d, nn.BatchNorm2d(1)), (nn.GroupNorm, nn.GroupNorm(1, 1)), (nn.LayerNorm, nn.LayerNorm(1)))}


def _norm_sharing_state(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` (the torch norm timm's fused layer subclasses) with ``module``'s settings,
    parameters and buffers (shared), built without the constructor, which would allocate and
    initialise tensors only to replace them (most of the cost of converting a network of
    BatchNormAct2d layers)."""
    settings, parameters, buffers = _NORM_LAYOUTS[cls]
    norm = object.__new__(cls)
    nn.Module.__init__(norm)
    for name in settings:
        norm.__dict__[name] = module.__dict__[name]
    for name in parameters:
        norm._parameters[name] = module._parameters[name]
    for name in buffers:
        norm._buffers[name] = module._buffers[name]
    norm._non_persistent_buffers_set.update(set(buffers) & module._non_persistent_buffers_set)
    norm.training = module.training
    return norm


@register_module_rewrite(_norm_act.BatchNormAct2d)
def _rewrite_batch_norm_act(module):
    return NormAct(_norm_sharing_state(module, nn.BatchNorm2d), *_drop_and_act(module))


def _rewrite_group_norm_act(module):
    return NormAct(_norm_sharing_state(module, nn.GroupNorm), *_drop_and_act(module))


def _rewrite_layer_norm_act(module):
    return NormAct(_norm_sharing_state(module, nn.LayerNorm), *_drop_and_act(module))


register_module_rewrite(_norm_act.GroupNormAct)(_rewrite_group_norm_act)
register_module_rewrite(_norm_act.GroupNorm1Act)(_rewrite_group_norm_act)
register_module_rewrite(_norm_act.LayerNormAct)(_rewrite_layer_norm_act)


@register_module_rewrite(_conv2d_same.Conv2dSame)
def _rewrite_conv2d_same(module):
    conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                     module.dilation, module.groups, module.bias is not None)
    pad = SamePad2d(module.kernel_size, module.stride, module.dilation)
    return PaddedLayer(pad, _share_state(conv, module))


@register_module_rewrite(_pool2d_same.MaxPool2dSame)
def _rewrite_max_pool2d_same(module):
    pool = nn.MaxPool2d(module.kernel_size, module.stride, 0, module.dilation, ceil_mode=module.ceil_mode)
    pad = SamePad2d(pool.kernel_size, pool.stride, pool.dilation, value=-float("inf"))
    return PaddedLayer(pad, pool)


@register_module_rewrite(_pool2d_same.AvgPool2dSame)
def _rewrite_avg_pool2d_same(module):
    pool = nn.AvgPool2d(module.kernel_size, module.stride, 0, module.ceil_mode,
                        module.count_include_pad)
    pad = SamePad2d(pool.kernel_size, pool.stride, (1, 1))
    return PaddedLayer(pad, pool)


def _rewrite_standardized_conv(module):
    same_pad = getattr(module, "same_pad", False)  # the Same variants pad at run time
    conv = StandardizedConv2d(module.in_channels, module.out_channels, module.kernel_size,
                              module.stride, 0 if same_pad else module.padding, module.dilation,
                              module.groups, module.bias is not None, module.eps,
                              getattr(module, "scale", None))
    conv = _share_state(conv, module)
    if same_pad:
        return PaddedLayer(SamePad2d(conv.kernel_size, conv.stride, conv.dilation), conv)
    return conv


@register_module_rewrite(importlib.import_module("timm.layers.drop").DropPath)
def _rewrite_drop_path(module):
    return StochasticDepth(module.drop_prob, module.scale_by_keep)


class FourierPositionEncoding(nn.Module):
    """timm's XCiT ``PositionalEncodingFourier`` as its fixed features, then their projection
    repeated over the batch: traced, the projection's channels join the token stream."""

    def __init__(self, features: FourierPositionFeatures, token_projection: nn.Conv2d):
        super().__init__()
        self.features = features
        self.token_projection = token_projection

    def forward(self, B: int, H: int, W: int):  # noqa: N803 - timm's argument names
        return self.token_projection(self.features(H, W)).repeat(B, 1, 1, 1)


@register_module_rewrite(importlib.import_module("timm.models.xcit").PositionalEncodingFourier)
def _rewrite_fourier_position_encoding(module):
    features = FourierPositionFeatures(module.hidden_dim, module.temperature, module.eps)
    features.reference = torch.empty(0, dtype=module.token_projection.weight.dtype,
                                     device=module.token_projection.weight.device)
    return FourierPositionEncoding(features, module.token_projection)


@register_module_rewrite(importlib.import_module("timm.layers.cond_conv2d").CondConv2d)
def _rewrite_cond_conv(module):
    layer = CondConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                       (0, 0) if module.dynamic_padding else module.padding, module.dilation, module.groups,
                       module.num_experts, module.bias is not None, same_padding=module.dynamic_padding)
    return _share_state(layer, module)


def _holds_attention_bias_cache(module) -> bool:
    return type(module).__module__.startswith("timm.") and isinstance(
        module.__dict__.get("attention_bias_cache"), dict)


@register_module_rewrite(_holds_attention_bias_cache)
def _without_attention_bias_cache(module):
    """The attention layer (LeViT, TinyViT, EfficientFormer...) with an empty eval-mode cache of
    its attention biases, its children rewritten too: traced, it reads the biases from their
    parameter (a cache filled by an earlier forward would be traced as a constant, which
    training and pruning would then leave stale)."""
    copied = shallow_copy(module)
    copied.__dict__["attention_bias_cache"] = {}
    for name, child in module._modules.items():
        if child is not None:
            copied._modules[name] = apply_module_rewrites(child)
    return copied


def _evo_norm_kind(module) -> str:
    """The :class:`EvoNorm2d` kind computing what timm's ``EvoNorm2d<variant>`` computes."""
    variant = type(module).__name__.removeprefix("EvoNorm2d")
    if variant.startswith("B"):
        return variant if (module.v is not None if variant == "B0" else module.apply_act) else "affine"
    always = variant.endswith("a")  # the "a" variants divide by their statistics even without activation
    base = variant.removesuffix("a")
    if base == "S0" and module.v is None:
        return "S1" if always else "affine"  # S0a without v: x / group_std(x), S1 with the identity
    return base if always or base == "S0" or module.apply_act else "affine"


def _rewrite_evo_norm(module):
    act = getattr(module, "act", None)
    if act is not None and (list(act.parameters()) or list(act.buffers())):
        return module  # a registered leaf: removal would not slice its activation's state
    kind = _evo_norm_kind(module)
    norm = EvoNorm2d(module.weight.shape[0], kind, getattr(module, "groups", 1), module.eps,
                     getattr(module, "momentum", 0.1), act if kind in ("S1", "S2") else None)
    return _share_state(norm, module)


_evo_norm = importlib.import_module("timm.layers.evo_norm")
for _name in ("B0", "B1", "B2", "S0", "S0a", "S1", "S1a", "S2", "S2a"):
    register_module_rewrite(getattr(_evo_norm, "EvoNorm2d" + _name))(_rewrite_evo_norm)
    register_leaf_module(getattr(_evo_norm, "EvoNorm2d" + _name))

for _name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
    register_module_rewrite(getattr(_std_conv, _name))(_rewrite_standardized_conv)

# timm's blocks that branch on their input's sizes (window padding, patch unfolding, cached
# attention biases): kept whole when traced symbolically, traced through when the model is
# converted with example inputs (their branches then follow the example's sizes); each was
# checked to convert and remove channels exactly that way, for other batch sizes too
_TRACED_WITH_VALUES = {("timm.models.tiny_vit", "TinyVitBlock"), ("timm.models.mobilevit", "MobileVitBlock"),
                       ("timm.models.mobilevit", "MobileVitV2Block"), ("timm.models.twins", "LocallyGroupedAttn"),
                       ("timm.models.efficientvit_msra", "LocalWindowAttention"), ("timm.models.vgg", "ConvMlp"),
                       ("timm.models.cpubone", "ConvAttention"), ("timm.models.lowformer", "ConvAttention"),
                       ("timm.models.convit", "GPSA"), ("timm.models.efficientvit_mit", "LiteMLA"),
                       ("timm.models.mobilenetv5", "MobileNetV5MultiScaleFusionAdapter")}
for _module_type in _timm_fx.get_notrace_modules():
    register_leaf_module(_module_type, traced_with_values=(_module_type.__module__, _module_type.__name__)
                         in _TRACED_WITH_VALUES)
# timm lists NormFreeBlock as not traceable for its in-place `out.mul_(skipinit_gain)`; traced
# here, the multiply is a vertex run in trace order, before the residual sum reads `out`
register_leaf_module(importlib.import_module("timm.models.nfnet").NormFreeBlock, when=lambda block: False)
for _function in _timm_fx.get_notrace_functions():
    register_autowrap_function(_function)
# timm's activation functions, called by traced blocks (NFNets' GammaAct.act_fn) or held as
# attributes by leaf modules, may be saved by name
_activations = importlib.import_module("timm.layers.activations")
for _function in vars(_activations).values():
    if inspect.isfunction(_function) and _function.__module__ == _activations.__name__:
        register_function(_function)

# timm's functions that rearrange or resample the positions of a channels-last tensor, channel
# by channel (each reads C from its input; SAM ViT's get_rel_pos resamples and gathers the rows
# of its (positions, C) table): channels pass through on the last axis
CHANNELS_LAST_FUNCTIONS = (
    "timm.layers.pos_embed.resample_abs_pos_embed", "timm.layers.pos_embed.resample_abs_pos_embed_nhwc",
    "timm.models.swin_transformer.window_reverse", "timm.models.swin_transformer_v2.window_reverse",
    "timm.models.swin_transformer_v2_cr.window_reverse", "timm.models.gcvit.window_reverse",
    "timm.models.davit.window_reverse", "timm.models.maxxvit.window_reverse",
    "timm.models.maxxvit.grid_reverse", "timm.models.nest.deblockify",
    "timm.models.vision_transformer_sam.get_rel_pos")


class _ResampledPositionEmbedding(nn.Module):
    """The example of the channels-last functions' spec: SAM ViT's resampled NHWC embedding."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)
        self.pos_embed = nn.Parameter(torch.randn(1, 2, 2, 8))

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)
        x = x + _pos_embed.resample_abs_pos_embed_nhwc(self.pos_embed, (x.shape[1], x.shape[2]))
        return self.head(x)


register_op(OpSpec("timm_channels_last_rearrangement", CHANNELS_LAST_FUNCTIONS, flops=no_flops,
                   coupling=last_axis_pass_through_coupling, removal=unchanged_removal,
                   example=lambda: (_ResampledPositionEmbedding(), (torch.randn(1, 3, 4, 4),))))
