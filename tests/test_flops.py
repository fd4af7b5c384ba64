"""FLOPs: ``count_flops`` counts 2 x multiply-adds of conv, linear, matmul and attention.

Checked against hand-computed values, and against fvcore's ``FlopCountAnalysis`` (one
multiply-add = one FLOP) restricted to the same operators, on timm models and the zoo. fvcore
does not count the fused ``scaled_dot_product_attention`` op, so models using it differ from fvcore
by exactly their attention vertices (``FVCORE_BLIND_TO_SDPA``).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import dagprune
from dagprune.ops import AttentionOp, FunctionalLayerOp, MatmulOp
from timm_families import TIMM_FAMILY_MODELS, TimmCase, create_timm_model
from zoo import ZOO, input_shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FVCORE_OPERATORS = ("conv", "linear", "matmul", "bmm", "addmm")
"""fvcore ``by_operator()`` keys of the operators dagprune counts."""

FVCORE_BLIND_TO_SDPA = {"attention_block_sdpa"}
"""Zoo entries using F.scaled_dot_product_attention, which fvcore skips."""

FVCORE_TIMM_MODELS = {
    "resnet": TIMM_FAMILY_MODELS["resnet"],
    "mobilenetv3": TIMM_FAMILY_MODELS["mobilenetv3"],
    "convnext": TIMM_FAMILY_MODELS["convnext"],
    "vit": TIMM_FAMILY_MODELS["vit"],  # built with fused attention off: explicit q @ k, attn @ v
}

COUNTED_VERTEX_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, MatmulOp,
                        AttentionOp, FunctionalLayerOp)


def _fvcore_flops(model: nn.Module, inputs: tuple) -> int:
    """2 x fvcore's multiply-adds on conv/linear/matmul/bmm."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            analysis = fvcore_nn.FlopCountAnalysis(model.eval(), inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_operator = analysis.by_operator()
        finally:
            logging.disable(logging.NOTSET)
    return 2 * sum(count for operator, count in by_operator.items() if operator in FVCORE_OPERATORS)


def _shape_argument(shapes: tuple):
    return shapes[0] if len(shapes) == 1 else shapes


# --------------------------------------------------------------------------------- by hand
@pytest.mark.parametrize("layer, input_shape, expected", [
    (nn.Conv2d(3, 8, 3, padding=1), (3, 10, 10), 2 * (8 * 10 * 10) * (3 * 3 * 3)),
    (nn.Conv2d(8, 8, 3, stride=2, groups=8), (8, 9, 9), 2 * (8 * 4 * 4) * (1 * 3 * 3)),
    (nn.Conv2d(8, 12, 1, groups=4), (8, 5, 5), 2 * (12 * 5 * 5) * 2),
    (nn.ConvTranspose2d(4, 6, 2, stride=2), (4, 5, 5), 2 * (4 * 5 * 5) * 6 * 4),
    (nn.Conv1d(4, 6, 3), (4, 20), 2 * (6 * 18) * (4 * 3)),
    (nn.Linear(16, 10), (7, 16), 2 * 7 * 10 * 16),
    (nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), (3, 8, 8), 0),
], ids=["conv", "depthwise-stride", "grouped-1x1", "conv-transpose", "conv1d", "linear-tokens",
        "norm-act-pool"])
def test_layer_flops_match_hand_count(layer, input_shape, expected):
    dag = dagprune.build_from_unstructured_module(nn.Sequential(layer))  # the layer as a vertex
    assert dagprune.count_flops(dag, input_shape).total == expected


class _Products(nn.Module):
    def forward(self, x, y):
        return torch.matmul(x, y) + torch.bmm(x, y) + x @ y


def test_matrix_products_match_hand_count():
    dag = dagprune.build_from_unstructured_module(_Products())
    report = dagprune.count_flops(dag, ((5, 6), (6, 7)))  # batch 1: (1, 5, 6) @ (1, 6, 7)
    assert report.total == 3 * 2 * (5 * 7) * 6


# --------------------------------------------------------------------------------- vs fvcore
@pytest.mark.parametrize("name", sorted(set(ZOO) - FVCORE_BLIND_TO_SDPA))
def test_zoo_flops_equal_twice_fvcore(name):
    entry = ZOO[name]
    model, shapes = entry.factory().eval(), input_shapes(entry)
    dag = dagprune.build_from_unstructured_module(model)
    inputs = tuple(torch.randn(1, *shape) for shape in shapes)
    assert dagprune.count_flops(dag, _shape_argument(shapes)).total == _fvcore_flops(model, inputs)


@pytest.mark.parametrize("family", sorted(FVCORE_TIMM_MODELS))
def test_timm_flops_equal_twice_fvcore(family):
    timm = pytest.importorskip("timm")
    case: TimmCase = FVCORE_TIMM_MODELS[family]
    fused_attention = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)
    try:
        model = create_timm_model(case).eval()
    finally:
        timm.layers.set_fused_attn(fused_attention)
    dag = dagprune.build_from_unstructured_module(model)
    if family == "vit":
        assert any(isinstance(v.module, MatmulOp) for v in dag.inner_vertices)
    expected = _fvcore_flops(model, (torch.randn(1, *case.input_size),))
    assert expected > 0
    assert dagprune.count_flops(dag, case.input_size).total == expected


def test_sdpa_counts_like_explicit_attention_and_differs_from_fvcore_by_it():
    explicit, fused = ZOO["attention_block"], ZOO["attention_block_sdpa"]
    shape = explicit.input_shape
    explicit_report = dagprune.count_flops(
        dagprune.build_from_unstructured_module(explicit.factory()), shape)
    fused_model = fused.factory().eval()
    fused_dag = dagprune.build_from_unstructured_module(fused_model)
    fused_report = dagprune.count_flops(fused_dag, shape)
    assert fused_report.total == explicit_report.total

    attention = sum(fused_report.per_vertex[v.name] for v in fused_dag.inner_vertices
                    if isinstance(v.module, AttentionOp))
    assert attention > 0
    fvcore = _fvcore_flops(fused_model, (torch.randn(1, *shape),))
    assert fused_report.total - fvcore == attention


# --------------------------------------------------------------------------------- per vertex
@pytest.mark.parametrize("name", ["resnet_basic_blocks", "tiny_vit", "unet_learned_upsample",
                                  "multi_input_two_streams", "attention_block_sdpa"])
def test_per_vertex_flops_sum_to_total_and_sit_on_counted_ops(name):
    entry = ZOO[name]
    dag = dagprune.build_from_unstructured_module(entry.factory())
    report = dagprune.count_flops(dag, _shape_argument(input_shapes(entry)))
    assert set(report.per_vertex) == {v.name for v in dag.inner_vertices}
    assert sum(report.per_vertex.values()) == report.total > 0
    for vertex in dag.inner_vertices:
        if report.per_vertex[vertex.name]:
            assert isinstance(vertex.module, COUNTED_VERTEX_TYPES), vertex
    top_name, top_flops = report.top(1)[0]
    assert top_flops == max(report.per_vertex.values())


def test_nested_dag_flops_are_counted_once():
    entry = ZOO["resnet_basic_blocks"]
    inner = dagprune.build_from_unstructured_module(entry.factory())
    outer = dagprune.build_from_unstructured_module(nn.Sequential(inner, nn.Identity()))
    assert any(isinstance(v.module, dagprune.DagModule) for v in outer.inner_vertices)
    assert (dagprune.count_flops(outer, entry.input_shape).total
            == dagprune.count_flops(inner, entry.input_shape).total)
