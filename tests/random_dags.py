"""Random small CNN DAGs for property-based tests of tracing and channel pruning.

``random_dag_model(seed)`` draws a structure from ``random.Random(seed)``: a
stem convolution, 3-8 blocks chosen among

* ``conv``       conv-bn-relu (1x1 or 3x3, occasionally stride 2),
* ``residual``   basic residual block (identity or 1x1 projection shortcut),
* ``concat``     two parallel branches concatenated along channels (or
  densenet-style ``cat([x, f(x)])``),
* ``depthwise``  depthwise 3x3 then pointwise 1x1,
* ``grouped``    grouped 3x3 convolution (widths divisible by the groups),
* ``split``      ``chunk(2, dim=1)``, a conv on each half, concat,
* ``se``         squeeze-excite gate multiplied onto the feature map,

then global average pooling and a linear head. The structure is fixed in
``__init__``; every block's ``forward`` is straight-line code, so the model is
``torch.fx.symbolic_trace``-able. Weights and BatchNorm statistics are
deterministic functions of the seed.

The module is pure PyTorch (plus an optional ``hypothesis`` strategy) and does
not depend on ``dagprune``.
"""

from __future__ import annotations

import random
from typing import List, Tuple

import torch
import torch.nn as nn

__all__ = ["BLOCK_KINDS", "INPUT_SHAPE", "RandomDagModel", "random_dag_model", "random_dag_models"]

INPUT_SHAPE: Tuple[int, int, int] = (3, 8, 8)
"""Input shape (without batch) of every random DAG model."""

BLOCK_KINDS: Tuple[str, ...] = ("conv", "residual", "concat", "depthwise", "grouped", "split", "se")
"""Names of the block kinds a random DAG is assembled from."""

MIN_WIDTH = 4
MAX_WIDTH = 16


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                  groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _random_width(rng: random.Random, multiple_of: int = 1) -> int:
    """A random width in [MIN_WIDTH, MAX_WIDTH] that is a multiple of ``multiple_of``."""
    low = -(-MIN_WIDTH // multiple_of)
    high = MAX_WIDTH // multiple_of
    return multiple_of * rng.randint(low, high)


class ConvBlock(nn.Module):
    """conv-bn-relu with a random kernel size (1 or 3), width and stride."""

    def __init__(self, in_channels: int, rng: random.Random, allow_stride: bool):
        super().__init__()
        self.out_channels = _random_width(rng)
        self.stride = 2 if allow_stride and rng.random() < 0.3 else 1
        self.body = _conv_bn_relu(in_channels, self.out_channels, rng.choice((1, 3)), self.stride)

    def forward(self, x):
        return self.body(x)


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the shortcut is the identity or a
    1x1 conv-bn projection to a new width."""

    def __init__(self, in_channels: int, rng: random.Random):
        super().__init__()
        use_projection = rng.random() < 0.4
        self.out_channels = _random_width(rng) if use_projection else in_channels
        hidden = _random_width(rng)
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, hidden),
            nn.Conv2d(hidden, self.out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(self.out_channels),
        )
        self.shortcut = nn.Identity()
        if use_projection:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, self.out_channels, 1, bias=False), nn.BatchNorm2d(self.out_channels)
            )
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ConcatBlock(nn.Module):
    """``cat([branch_a(x), branch_b(x)], 1)``; branch_a is the identity with probability 1/2
    (densenet style), otherwise a 1x1 conv-bn-relu; branch_b is a 3x3 conv-bn-relu."""

    def __init__(self, in_channels: int, rng: random.Random):
        super().__init__()
        if rng.random() < 0.5:
            self.branch_a = nn.Identity()
            width_a = in_channels
        else:
            width_a = rng.randint(2, MAX_WIDTH // 2)
            self.branch_a = _conv_bn_relu(in_channels, width_a, 1)
        width_b = rng.randint(2, MAX_WIDTH // 2)
        self.branch_b = _conv_bn_relu(in_channels, width_b, 3)
        self.out_channels = width_a + width_b

    def forward(self, x):
        return torch.cat([self.branch_a(x), self.branch_b(x)], 1)


class DepthwiseBlock(nn.Module):
    """Depthwise 3x3 conv-bn-relu followed by a pointwise 1x1 conv-bn-relu to a random width."""

    def __init__(self, in_channels: int, rng: random.Random):
        super().__init__()
        self.out_channels = _random_width(rng)
        self.depthwise = _conv_bn_relu(in_channels, in_channels, 3, groups=in_channels)
        self.pointwise = _conv_bn_relu(in_channels, self.out_channels, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class GroupedConvBlock(nn.Module):
    """Grouped 3x3 conv-bn-relu (groups 2 or 4). The input is used directly when its width is
    divisible by the groups, otherwise a 1x1 conv-bn-relu adapts it to a divisible width."""

    def __init__(self, in_channels: int, rng: random.Random):
        super().__init__()
        self.groups = rng.choice((2, 4))
        if in_channels % self.groups == 0 and rng.random() < 0.7:
            self.adapter = nn.Identity()
            grouped_in = in_channels
        else:
            grouped_in = _random_width(rng, self.groups)
            self.adapter = _conv_bn_relu(in_channels, grouped_in, 1)
        self.out_channels = _random_width(rng, self.groups)
        self.grouped = _conv_bn_relu(grouped_in, self.out_channels, 3, groups=self.groups)

    def forward(self, x):
        return self.grouped(self.adapter(x))


class SplitBlock(nn.Module):
    """``a, b = x.chunk(2, dim=1)``; ``cat([conv_a(a), conv_b(b)], 1)``. A 1x1 conv-bn-relu first
    makes the width even when needed."""

    def __init__(self, in_channels: int, rng: random.Random):
        super().__init__()
        if in_channels % 2 == 0:
            self.adapter = nn.Identity()
            split_in = in_channels
        else:
            split_in = _random_width(rng, 2)
            self.adapter = _conv_bn_relu(in_channels, split_in, 1)
        half = split_in // 2
        width_a = rng.randint(2, MAX_WIDTH // 2)
        width_b = rng.randint(2, MAX_WIDTH // 2)
        self.conv_a = _conv_bn_relu(half, width_a, rng.choice((1, 3)))
        self.conv_b = _conv_bn_relu(half, width_b, 3)
        self.out_channels = width_a + width_b

    def forward(self, x):
        a, b = self.adapter(x).chunk(2, dim=1)
        return torch.cat([self.conv_a(a), self.conv_b(b)], 1)


class SqueezeExciteBlock(nn.Module):
    """``x * sigmoid(expand(relu(reduce(mean(x, (2, 3), keepdim=True)))))``."""

    def __init__(self, in_channels: int, rng: random.Random):
        super().__init__()
        reduced = rng.randint(2, max(2, in_channels // 2))
        self.reduce = nn.Conv2d(in_channels, reduced, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(reduced, in_channels, 1)
        self.out_channels = in_channels

    def forward(self, x):
        gate = self.expand(self.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class RandomDagModel(nn.Module):
    """A random CNN DAG: stem conv, the blocks named in ``plan``, global average pool, linear head.

    Args:
        seed: seeds both the structure (``random.Random(seed)``) and the weights.

    Attributes:
        plan: the block kinds in order (entries of ``BLOCK_KINDS``), for debugging and reports.
        blocks: the corresponding modules.
    """

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        num_blocks = rng.randint(3, 8)
        self.plan: List[str] = [rng.choice(BLOCK_KINDS) for _ in range(num_blocks)]

        width = _random_width(rng)
        self.stem = _conv_bn_relu(INPUT_SHAPE[0], width)
        spatial = INPUT_SHAPE[1]
        self.blocks = nn.ModuleList()
        for kind in self.plan:
            block = self._make_block(kind, width, rng, allow_stride=spatial >= 4)
            spatial //= getattr(block, "stride", 1)
            width = block.out_channels
            self.blocks.append(block)
        self.num_classes = rng.randint(2, 6)
        self.head = nn.Linear(width, self.num_classes)

    @staticmethod
    def _make_block(kind: str, in_channels: int, rng: random.Random, allow_stride: bool) -> nn.Module:
        if kind == "conv":
            return ConvBlock(in_channels, rng, allow_stride)
        if kind == "residual":
            return ResidualBlock(in_channels, rng)
        if kind == "concat":
            return ConcatBlock(in_channels, rng)
        if kind == "depthwise":
            return DepthwiseBlock(in_channels, rng)
        if kind == "grouped":
            return GroupedConvBlock(in_channels, rng)
        if kind == "split":
            return SplitBlock(in_channels, rng)
        if kind == "se":
            return SqueezeExciteBlock(in_channels, rng)
        raise ValueError(f"unknown block kind {kind!r}")

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))

    def extra_repr(self) -> str:
        return f"plan={self.plan}"


@torch.no_grad()
def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm running stats and affine parameters, so mis-sliced pruning shows up."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.2 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.empty(module.num_features).uniform_(0.5, 2.0, generator=generator))
            module.weight.copy_(torch.empty(module.num_features).uniform_(0.5, 1.5, generator=generator))
            module.bias.copy_(0.1 * torch.randn(module.num_features, generator=generator))


def random_dag_model(seed: int) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """Build the random DAG model for ``seed``; returns ``(model, input_shape_without_batch)``.

    Deterministic in ``seed``; the caller's global torch RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RandomDagModel(seed)
    _randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model, INPUT_SHAPE


def random_dag_models():
    """Hypothesis strategy drawing ``(model, input_shape)`` pairs from ``random_dag_model``."""
    from hypothesis import strategies as st

    return st.integers(0, 10_000).map(random_dag_model)
