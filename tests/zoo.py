"""A zoo of tiny hand-written topologies for tracer and pruning tests.

Every entry is a small ``nn.Module`` (well under 50k parameters, milliseconds
on CPU) that exercises one topology pattern a channel-pruning library has to
get right: residual adds, concatenations, depthwise and grouped convolutions,
squeeze-excite gating, channel shuffles, attention, upsampling, multiple
inputs/outputs, normalisation layers over different axes and a pile of
elementwise ops.

The module is pure PyTorch and does not depend on ``dagprune``.

Usage::

    entry = ZOO["resnet_basic_blocks"]
    model = entry.factory().eval()
    inputs = make_example_inputs(entry, batch_size=2)
    out = model(*inputs)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from informative_weights import randomize_normalization_layers

Shape = Tuple[int, ...]
InputShape = Union[Shape, Tuple[Shape, ...]]

__all__ = [
    "ZOO",
    "ZooEntry",
    "input_shapes",
    "make_example_inputs",
    "randomize_normalization_layers",
]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    Attributes:
        factory: ``factory(seed=0)`` returns a freshly built model with
            deterministic weights (and randomized normalisation statistics /
            affine parameters). It does not disturb the caller's global RNG.
        input_shape: input shape without the batch dimension, e.g.
            ``(3, 16, 16)``; a tuple of such shapes for multi-input models.
        description: what the topology exercises.
    """

    factory: Callable[..., nn.Module]
    input_shape: InputShape
    description: str


def input_shapes(entry: ZooEntry) -> Tuple[Shape, ...]:
    """The entry's input shapes (without batch) as a tuple, one per forward argument."""
    shape = entry.input_shape
    if len(shape) > 0 and isinstance(shape[0], tuple):
        return tuple(shape)  # type: ignore[arg-type]
    return (shape,)  # type: ignore[return-value]


def make_example_inputs(entry: ZooEntry, batch_size: int = 2, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Deterministic standard-normal inputs for ``entry``, one tensor per forward argument."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((batch_size, *shape), generator=generator) for shape in input_shapes(entry))


@torch.no_grad()
def _factory(model_class: Callable[..., nn.Module], **kwargs) -> Callable[..., nn.Module]:
    """A seeded factory for ``model_class(**kwargs)``; the global RNG state is restored afterwards."""

    def factory(seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(**kwargs)
            randomize_normalization_layers(model, torch.Generator().manual_seed(seed + 1))
        return model

    factory.__name__ = f"make_{model_class.__name__}"
    factory.__doc__ = f"Build a seeded ``{model_class.__name__}``."
    return factory


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> ReLU with 'same' padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# ---------------------------------------------------------------------------
# Plain stacks
# ---------------------------------------------------------------------------


class PlainFlattenNet(nn.Module):
    """conv-bn-relu x3 with max pooling; ``x.flatten(1)`` feeds the linear head (C*H*W features)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 8),
            nn.MaxPool2d(2),
            conv_bn_relu(8, 12, stride=2),
            conv_bn_relu(12, 16),
        )
        self.classifier = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.flatten(1))


class PlainMeanPoolNet(nn.Module):
    """conv-bn-relu stack (biased convs) with ``x.mean((2, 3))`` global pooling and a two-layer head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = x.mean((2, 3))
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class PlainAdaptivePoolNet(nn.Module):
    """conv-bn-relu stack with ``nn.AdaptiveAvgPool2d(1)`` + ``torch.flatten(x, 1)`` and a dropout head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(3, 8, stride=2), conv_bn_relu(8, 16), conv_bn_relu(16, 12, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        x = torch.flatten(x, 1)
        return self.fc(self.dropout(x))


# ---------------------------------------------------------------------------
# Residual
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv-bn projection is used when stride or width changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetBasicBlocks(nn.Module):
    """Stem, a downsampling basic block (projection shortcut), then an identity basic block."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.layer1 = BasicBlock(8, 16, stride=2)
        self.layer2 = BasicBlock(16, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class IdentityResidualChain(nn.Module):
    """Three consecutive identity residuals (``x = x + f(x)``, pre-activation style) on one channel
    group, so stem, all branch outputs and the head input must share a single channel mask."""

    def __init__(self, num_classes: int = 10, width: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, width, 3, padding=1))
            for _ in range(3)
        )
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            x = x + branch(x)
        x = F.relu(self.norm(x))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# Concatenation
# ---------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """Pre-activation bottleneck whose output is concatenated onto its input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck_width)
        self.conv2 = nn.Conv2d(bottleneck_width, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        new_features = self.conv1(F.relu(self.norm1(x)))
        new_features = self.conv2(F.relu(self.norm2(new_features)))
        return torch.cat([x, new_features], 1)


class DenseNetLike(nn.Module):
    """Two dense blocks of ``torch.cat([x, f(x)], 1)`` layers joined by a transition (bn-relu-1x1-avgpool);
    each BatchNorm sees a concatenation of several producers."""

    def __init__(self, num_classes: int = 10, growth_rate: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        block1 = [DenseLayer(6 + i * growth_rate, growth_rate, 8) for i in range(3)]
        self.block1 = nn.Sequential(*block1)
        width = 6 + 3 * growth_rate
        self.transition = nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 10, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = nn.Sequential(*[DenseLayer(10 + i * growth_rate, growth_rate, 8) for i in range(2)])
        width = 10 + 2 * growth_rate
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionModule(nn.Module):
    """Four parallel branches of different widths concatenated along channels."""

    def __init__(self, in_channels: int, width_1x1: int, width_3x3: Tuple[int, int], width_5x5: Tuple[int, int],
                 width_pool: int):
        super().__init__()
        self.branch1 = conv_bn_relu(in_channels, width_1x1, 1)
        self.branch2 = nn.Sequential(conv_bn_relu(in_channels, width_3x3[0], 1), conv_bn_relu(*width_3x3, 3))
        self.branch3 = nn.Sequential(conv_bn_relu(in_channels, width_5x5[0], 1), conv_bn_relu(*width_5x5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(in_channels, width_pool, 1))

    def forward(self, x):
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class InceptionLike(nn.Module):
    """Stem followed by two inception modules (output widths 4+6+3+5 = 18 and 6+5+4+3 = 18)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8, stride=2)
        self.inception1 = InceptionModule(8, 4, (4, 6), (2, 3), 5)
        self.inception2 = InceptionModule(18, 6, (4, 5), (2, 4), 3)
        self.fc = nn.Linear(18, num_classes)

    def forward(self, x):
        x = self.inception2(self.inception1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# Depthwise separable / grouped
# ---------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> ReLU6 -> depthwise 3x3 -> ReLU6 -> 1x1 linear projection,
    with a residual when stride is 1 and the width is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Like(nn.Module):
    """Stem, a no-expansion depthwise block, a strided expansion block and a residual expansion block."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, expand_ratio=1),
            InvertedResidual(8, 12, 2, expand_ratio=4),
            InvertedResidual(12, 12, 1, expand_ratio=3),
        )
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, num_classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3x3 convolution (1x1 -> grouped 3x3 -> 1x1) and a residual."""

    def __init__(self, channels: int, bottleneck_width: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, bottleneck_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck_width)
        self.conv2 = nn.Conv2d(bottleneck_width, bottleneck_width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck_width)
        self.conv3 = nn.Conv2d(bottleneck_width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + x)


class ResNeXtLike(nn.Module):
    """Stem, a grouped conv (groups=4) directly fed by the stem, then a ResNeXt bottleneck (groups=4)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16, stride=2)
        self.grouped = conv_bn_relu(16, 16, groups=4)
        self.block = ResNeXtBlock(16, bottleneck_width=16, groups=4)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block(self.grouped(self.stem(x)))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# Squeeze-excite
# ---------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid -> broadcast multiply."""

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced_channels, 1)
        self.expand = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, x):
        scale = self.expand(F.relu(self.reduce(self.pool(x))))
        return x * torch.sigmoid(scale)


class SqueezeExciteNet(nn.Module):
    """Conv stack with two SE gates; the second one pools with ``x.mean((2, 3), keepdim=True)`` and
    sits inside a residual, like EfficientNet / SE-ResNet."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 16, stride=2)
        self.se1 = SqueezeExcite(16, 4)
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.se2_reduce = nn.Conv2d(16, 6, 1)
        self.se2_expand = nn.Conv2d(6, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.se1(self.conv1(x))
        out = self.conv2(x)
        gate = self.se2_expand(F.silu(self.se2_reduce(out.mean((2, 3), keepdim=True)))).sigmoid()
        x = F.relu(x + out * gate)
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# Split + channel shuffle
# ---------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: view as (b, g, c/g, h, w), swap the group axes, flatten back."""
    batch_size, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batch_size, groups, channels_per_group, height, width)
    x = x.transpose(1, 2).contiguous()
    return x.reshape(batch_size, num_channels, height, width)


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 unit. Stride 1: ``x.chunk(2, dim=1)``, transform the second half, concat, shuffle.
    Stride 2: both branches see the full input and downsample."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        branch_channels = out_channels // 2
        if stride == 1:
            assert in_channels == out_channels
            branch_in = branch_channels
            self.branch1 = None
        else:
            branch_in = in_channels
            self.branch1 = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                nn.BatchNorm2d(branch_channels),
                nn.ReLU(inplace=True),
            )
        self.branch2 = nn.Sequential(
            nn.Conv2d(branch_in, branch_channels, 1, bias=False),
            nn.BatchNorm2d(branch_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_channels, branch_channels, 3, stride, 1, groups=branch_channels, bias=False),
            nn.BatchNorm2d(branch_channels),
            nn.Conv2d(branch_channels, branch_channels, 1, bias=False),
            nn.BatchNorm2d(branch_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Like(nn.Module):
    """Stem, a downsampling ShuffleNetV2 unit, two stride-1 units (split/concat/shuffle), 1x1 head conv.
    The inline shuffle in ``forward`` reads dims from ``x.shape``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.down = ShuffleV2Unit(8, 16, stride=2)
        self.unit1 = ShuffleV2Unit(16, 16, stride=1)
        self.unit2 = ShuffleV2Unit(16, 16, stride=1)
        self.head = conv_bn_relu(16, 20, 1)
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.unit1(self.down(self.stem(x)))
        x = self.unit2(x)
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        x = self.head(x)
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# Attention / transformers
# ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens, written out by hand or via SDPA."""

    def __init__(self, dim: int, num_heads: int, use_sdpa: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block; with ``layer_scale`` the residual branches are ``x + gamma * f(x)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, use_sdpa: bool = False,
                 layer_scale: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, use_sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.empty(dim).uniform_(0.1, 1.0))
            self.gamma2 = nn.Parameter(torch.empty(dim).uniform_(0.1, 1.0))
        else:
            self.gamma1 = None
            self.gamma2 = None

    def forward(self, x):
        if self.gamma1 is None:
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        else:
            x = x + self.gamma1 * self.attn(self.norm1(x))
            x = x + self.gamma2 * self.mlp(self.norm2(x))
        return x


class TokenTransformer(nn.Module):
    """Input (B, N, C) tokens -> one transformer block -> final LayerNorm -> token mean -> linear head."""

    def __init__(self, dim: int = 32, num_heads: int = 4, num_classes: int = 10, use_sdpa: bool = False):
        super().__init__()
        self.block = TransformerBlock(dim, num_heads, use_sdpa=use_sdpa)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.norm(self.block(x))
        return self.head(x.mean(1))


class TinyViT(nn.Module):
    """Patch-embed conv -> ``flatten(2).transpose(1, 2)`` -> class token cat -> position embedding ->
    two layer-scaled blocks -> LayerNorm -> head on ``x[:, 0]``."""

    def __init__(self, dim: int = 24, patch_size: int = 4, image_size: int = 16, num_heads: int = 3,
                 depth: int = 2, num_classes: int = 10):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, num_heads, layer_scale=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class MixerBlock(nn.Module):
    """MLP-Mixer block: token mixing (Linear over the token axis via transposes), then channel MLP."""

    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(num_tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, channel_hidden)

    def forward(self, x):
        y = self.norm1(x).transpose(1, 2)
        x = x + self.token_mlp(y).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MlpMixer(nn.Module):
    """Patch embedding to 16 tokens x 24 channels (distinct sizes), one mixer block, mean-token head."""

    def __init__(self, dim: int = 24, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.block = MixerBlock(num_tokens=16, dim=dim, token_hidden=20, channel_hidden=40)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.norm(self.block(x))
        return self.head(x.mean(dim=1))


# ---------------------------------------------------------------------------
# Encoder-decoder
# ---------------------------------------------------------------------------


class UNetInterpolate(nn.Module):
    """Two-level UNet; decoders upsample with ``F.interpolate`` (nearest, then bilinear) and concat skips."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.enc1 = conv_bn_relu(3, 8)
        self.enc2 = conv_bn_relu(8, 12)
        self.bottleneck = conv_bn_relu(12, 16)
        self.dec2 = conv_bn_relu(16 + 12, 12)
        self.dec1 = conv_bn_relu(12 + 8, 8)
        self.out = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(b, scale_factor=2, mode="nearest"), e2], dim=1))
        up = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, e1], dim=1))
        return self.out(d1)


class UNetLearnedUpsample(nn.Module):
    """Two-level UNet; decoders upsample with ``nn.ConvTranspose2d`` and ``nn.Upsample`` (bilinear)
    and concat skips; the decoder adds (rather than concats) one skip."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.enc1 = conv_bn_relu(3, 8)
        self.down1 = nn.MaxPool2d(2)
        self.enc2 = conv_bn_relu(8, 12)
        self.down2 = nn.AvgPool2d(2)
        self.bottleneck = conv_bn_relu(12, 16)
        self.up2 = nn.ConvTranspose2d(16, 12, kernel_size=2, stride=2)
        self.dec2 = conv_bn_relu(12, 10)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = conv_bn_relu(10 + 8, 8)
        self.out = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.down1(e1))
        b = self.bottleneck(self.down2(e2))
        d2 = self.dec2(self.up2(b) + e2)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


# ---------------------------------------------------------------------------
# Multi-output / multi-input
# ---------------------------------------------------------------------------


class TwoHeadNet(nn.Module):
    """Shared trunk, forward returns ``(logits, aux)``: a classifier and a dense 1x1-conv head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.trunk = nn.Sequential(conv_bn_relu(3, 8, stride=2), conv_bn_relu(8, 16))
        self.classifier = nn.Linear(16, num_classes)
        self.aux_head = nn.Sequential(conv_bn_relu(16, 6, 1), nn.Conv2d(6, 2, 1))

    def forward(self, x):
        features = self.trunk(x)
        logits = self.classifier(features.mean((2, 3)))
        aux = self.aux_head(features)
        return logits, aux


class TwoStreamNet(nn.Module):
    """``forward(x, y)``: an RGB stream and a 1-channel stream fused by concat and by add."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.rgb = nn.Sequential(conv_bn_relu(3, 8, stride=2), conv_bn_relu(8, 12))
        self.depth = nn.Sequential(conv_bn_relu(1, 6, stride=2), conv_bn_relu(6, 12))
        self.fuse = conv_bn_relu(24, 16, 1)
        self.fc = nn.Linear(16 + 12, num_classes)

    def forward(self, x, y):
        a = self.rgb(x)
        b = self.depth(y)
        fused = torch.cat([self.fuse(torch.cat([a, b], dim=1)), a + b], dim=1)
        return self.fc(fused.mean((2, 3)))


# ---------------------------------------------------------------------------
# 1-D convolutions
# ---------------------------------------------------------------------------


class Conv1dNet(nn.Module):
    """Conv1d/BatchNorm1d stack on (C, L) sequences with a residual and a max-pool, mean over length."""

    def __init__(self, in_channels: int = 4, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, 12, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.conv3 = nn.Conv1d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(16)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(x + self.bn3(self.conv3(x)))
        x = self.pool(x)
        return self.fc(x.mean(-1))


# ---------------------------------------------------------------------------
# Other normalisations
# ---------------------------------------------------------------------------


class GroupNormNet(nn.Module):
    """Conv stack normalised with ``nn.GroupNorm`` (4 groups and 1 group); pruning must keep whole
    groups consistent."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(4, 16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.gn3 = nn.GroupNorm(1, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(x + self.gn2(self.conv2(x)))
        x = F.gelu(self.gn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> permute to NHWC -> LayerNorm -> Linear -> GELU -> Linear -> layer scale ->
    permute back -> residual."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expansion * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim).uniform_(0.1, 1.0))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXtLike(nn.Module):
    """Patchify stem with channels-last LayerNorm, two ConvNeXt blocks, pooled LayerNorm head."""

    def __init__(self, dim: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.stem_norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stem_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x.mean((2, 3))))


# ---------------------------------------------------------------------------
# Elementwise-heavy
# ---------------------------------------------------------------------------


class ElementwiseNet(nn.Module):
    """Two parallel convs combined by many elementwise ops: sub, div by a constant, sigmoid gating,
    mish (``x * tanh(softplus(x))``), hardswish, clamp, abs/pow, and ``amax`` + ``sum`` reductions."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.bn_a = nn.BatchNorm2d(12)
        self.conv_b = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.conv_c = nn.Conv2d(12, 16, 1)
        self.bn_c = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        a = self.bn_a(self.conv_a(x))
        b = self.conv_b(x)
        y = (a - b) / 2.0
        y = y * torch.sigmoid(b) + 0.5 * a
        y = y * torch.tanh(F.softplus(y))
        y = F.hardswish(y) - torch.clamp(b, min=-1.0, max=1.0)
        y = self.bn_c(self.conv_c(y))
        y = torch.clamp(y, -3.0, 3.0) + 0.1 * y.abs().pow(2)
        pooled = torch.amax(y, dim=(2, 3)) + y.sum((2, 3)) / 64.0 - y.mean(dim=(2, 3)) * 2
        return self.fc(pooled)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

def _entry(model_class: Callable[..., nn.Module], input_shape: InputShape, description: str = "",
           **kwargs) -> ZooEntry:
    """A ``ZooEntry`` for ``model_class(**kwargs)``; the description defaults to the class docstring."""
    description = description or " ".join(inspect.cleandoc(model_class.__doc__ or "").split())
    return ZooEntry(_factory(model_class, **kwargs), input_shape, description)


IMAGE = (3, 16, 16)
TOKENS = (16, 32)

ZOO: Dict[str, ZooEntry] = {
    "plain_flatten": _entry(PlainFlattenNet, IMAGE),
    "plain_mean_pool": _entry(PlainMeanPoolNet, IMAGE),
    "plain_adaptive_pool": _entry(PlainAdaptivePoolNet, IMAGE),
    "resnet_basic_blocks": _entry(ResNetBasicBlocks, IMAGE),
    "identity_residual_chain": _entry(IdentityResidualChain, IMAGE),
    "densenet_concat": _entry(DenseNetLike, IMAGE),
    "inception_concat": _entry(InceptionLike, IMAGE),
    "mobilenetv2_depthwise": _entry(MobileNetV2Like, IMAGE),
    "resnext_grouped": _entry(ResNeXtLike, IMAGE),
    "squeeze_excite": _entry(SqueezeExciteNet, IMAGE),
    "shufflenetv2_split_shuffle": _entry(ShuffleNetV2Like, IMAGE),
    "attention_block": _entry(
        TokenTransformer, TOKENS, "Hand-written multi-head attention + GELU MLP on (N, C) = (16, 32) tokens."
    ),
    "attention_block_sdpa": _entry(
        TokenTransformer, TOKENS, "Attention block using F.scaled_dot_product_attention on (16, 32) tokens.",
        use_sdpa=True,
    ),
    "tiny_vit": _entry(TinyViT, IMAGE),
    "mlp_mixer": _entry(MlpMixer, IMAGE),
    "unet_interpolate": _entry(UNetInterpolate, IMAGE),
    "unet_learned_upsample": _entry(UNetLearnedUpsample, IMAGE),
    "multi_output_two_heads": _entry(TwoHeadNet, IMAGE),
    "multi_input_two_streams": _entry(TwoStreamNet, ((3, 16, 16), (1, 16, 16))),
    "conv1d": _entry(Conv1dNet, (4, 32)),
    "groupnorm": _entry(GroupNormNet, IMAGE),
    "convnext_layernorm": _entry(ConvNeXtLike, IMAGE),
    "elementwise_ops": _entry(ElementwiseNet, IMAGE),
}
"""All zoo entries by name."""
