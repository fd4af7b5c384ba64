"""float16, bfloat16 and float64 models: conversion, FLOPs, comparison, pruning and removal
keep the model's dtype and never mix dtypes (the gates stay float32; their masks are cast to
the activations' dtype)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dagprune
from dagprune.shape_prop import example_inputs_for_shape as example_inputs, module_dtype
from dagprune_algorithms.pruning import ChannelPruning, compute_normalized_flops

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = [torch.float16, torch.bfloat16, torch.float64]

REMOVAL_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}
"""Removed vs gated output, relative: a masked norm rounds at each of its ops where the slim
model's native norm rounds once, a few units of the dtype's precision (seen: 3.6e-3 float16,
2.0e-2 bfloat16, 2.1e-16 float64 on these models)."""


class ConvNet(nn.Module):
    """Convolutions (plain and depthwise), batch and group norm, a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(F.relu(self.depthwise(self.expand(x))))
        return self.head(x.mean((2, 3)))


class TransformerBlock(nn.Module):
    """Embedding, pre-norm attention (two heads, matmuls, softmax), an MLP, RMSNorm and a head."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.final_norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.final_norm(x).mean(1))


MODELS = {"conv_net": (ConvNet, (3, 8, 8)), "transformer_block": (TransformerBlock, (5, 6))}


def _model(name: str, dtype: torch.dtype) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory()
    for module in model.modules():  # non-trivial statistics, so that slicing them matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval(), shape


def _cpu_runs(dtype: torch.dtype) -> bool:
    """Whether this torch build runs the ops of the test models in ``dtype`` on the CPU (older
    builds had no float16 convolution on the CPU)."""
    try:
        nn.Conv2d(2, 2, 3, groups=2).to(dtype)(torch.ones(1, 2, 4, 4, dtype=dtype))
        nn.LayerNorm(2).to(dtype)(torch.ones(1, 2, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request):
    if not _cpu_runs(request.param):
        pytest.skip(f"this torch build has no CPU kernels for {request.param} convolution or layer norm")
    return request.param


@pytest.mark.parametrize("name", MODELS)
def test_conversion_flops_and_comparison_use_the_model_dtype(name, dtype):
    model, shape = _model(name, dtype)
    dag = dagprune.build_from_unstructured_module(model)
    assert module_dtype(dag) == dtype
    assert all(x.dtype == dtype for x in example_inputs(dag, shape))
    float_dag = dagprune.build_from_unstructured_module(_model(name, torch.float32)[0])
    assert dagprune.count_flops(dag, shape).total == dagprune.count_flops(float_dag, shape).total
    assert compute_normalized_flops(dag, shape) == compute_normalized_flops(float_dag, shape)
    assert dagprune.compare_module_outputs(model, dag, (2, *shape)) == 0.0
    assert dagprune.compare_module_outputs(model, dag, (2, *shape), dtype=dtype) == 0.0


def test_compare_module_outputs_takes_an_explicit_dtype():
    model = nn.Linear(4, 2).double()
    assert dagprune.compare_module_outputs(model, model, (2, 4), dtype=torch.float64) == 0.0
    with pytest.raises(RuntimeError):  # float32 inputs into a float64 layer: torch refuses
        dagprune.compare_module_outputs(model, model, (2, 4), dtype=torch.float32)


def test_module_dtype_is_the_dtype_of_most_weights():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(2, 2))
    assert module_dtype(model) == torch.bfloat16
    assert module_dtype(nn.ReLU()) == torch.get_default_dtype()


@pytest.mark.parametrize("name", MODELS)
def test_pruning_keeps_the_model_dtype_and_removal_is_exact(name, dtype):
    model, shape = _model(name, dtype)
    dag = dagprune.build_from_unstructured_module(model)
    pruning = ChannelPruning(dag, shape, 0.6, 10)
    gated = pruning.prepare_for_pruning().train()
    assert all(gate.logits.dtype == torch.float32 for gate in pruning.gates)
    x = torch.randn(2, *shape).to(dtype)
    output = gated(x)
    assert output.dtype == dtype
    losses = pruning.compute_current_proportion_and_pruning_losses(global_step=3)
    assert all(torch.isfinite(loss) for loss in losses)
    (output.float().square().mean() + sum(losses[1:])).backward()
    for gate in pruning.gates:
        assert gate.logits.grad is not None and torch.isfinite(gate.logits.grad).all()

    generator = torch.Generator().manual_seed(1)
    for gate in pruning.gates:  # a random mix of kept and removed channels in every group
        gate.logits.data = torch.randn(gate.logits.numel(), generator=generator)
    gated.eval()
    slim = pruning.remove_channels().eval()
    assert {p.dtype for p in slim.parameters()} == {dtype}
    assert {b.dtype for b in slim.buffers() if b.is_floating_point()} <= {dtype}
    with torch.no_grad():
        expected, actual = gated(x), slim(x)
    assert actual.dtype == dtype
    assert dagprune.max_relative_difference(expected, actual) <= REMOVAL_TOLERANCE[dtype]
    assert module_dtype(gated) == dtype  # a few float32 gate logits do not make it float32
    assert dagprune.compare_module_outputs(gated, slim, (2, *shape), atol=REMOVAL_TOLERANCE[dtype]) \
        <= REMOVAL_TOLERANCE[dtype]
    original = dagprune.count_flops(dag, shape).total
    assert dagprune.count_flops(slim, shape).total / original == pytest.approx(
        pruning.current_hard_proportion(), rel=1e-9)
    assert pruning.current_hard_proportion() < 1.0


def test_float16_energy_of_large_activations_does_not_overflow():
    """Squares of float16 activations above 256 overflow float16; the distillation energy is
    summed in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).half()
    dag = dagprune.build_from_unstructured_module(model)
    pruning = ChannelPruning(dag, (4,), 0.6, 10)
    gated = pruning.prepare_for_pruning().train()
    gated(torch.full((4, 4), 1000.0, dtype=torch.float16))
    *_, bkd_loss = pruning.compute_current_proportion_and_pruning_losses(global_step=1)
    assert torch.isfinite(bkd_loss)
