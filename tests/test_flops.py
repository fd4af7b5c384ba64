"""FLOPs: ``count_flops`` counts 2 x multiply-adds of conv, linear, matmul and attention.

Checked against hand-computed values, and against fvcore's ``FlopCountAnalysis`` (one
multiply-add = one FLOP) on timm models and the zoo: ours equals 2 x fvcore's ``total()`` less
the rough estimates fvcore adds for memory-bound ops (``FVCORE_ESTIMATED_OPERATORS``, left out
by dagprune on purpose, see :mod:`dagprune.flops`), which is also 2 x fvcore's
conv/linear/matmul operators; the estimates stay under ``FVCORE_ESTIMATED_SHARE_BOUND`` of the
total. fvcore does not count the fused ``scaled_dot_product_attention`` op, so models using it
differ from fvcore by exactly their attention vertices (``FVCORE_BLIND_TO_SDPA``). Leaf modules
(black boxes to the DAG) are counted inside, by hand and against fvcore.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import dagprune
import dagprune.flops
from dagprune.ops import AttentionOp, FunctionalLayerOp, MatmulOp
from timm_families import TIMM_FAMILY_MODELS, TimmCase, create_timm_model
from zoo import ZOO, input_shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FVCORE_OPERATORS = ("conv", "linear", "matmul", "bmm", "addmm", "einsum")
"""fvcore ``by_operator()`` keys of the operators dagprune counts."""

FVCORE_ESTIMATED_OPERATORS = ("batch_norm", "group_norm", "layer_norm", "instance_norm",
                              "adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
                              "grid_sampler")
"""fvcore ``by_operator()`` keys of its memory-bound estimates, which dagprune counts as zero."""

FVCORE_ESTIMATED_SHARE_BOUND = 0.05
"""Largest share of fvcore's total in its estimates (measured: 4.3 % on mobilenetv2_100)."""

FVCORE_BLIND_TO_SDPA = {"attention_block_sdpa"}
"""Zoo entries using F.scaled_dot_product_attention, which fvcore skips."""

FVCORE_TIMM_MODELS = {
    "resnet": TIMM_FAMILY_MODELS["resnet"],
    "resnet18": TimmCase("resnet18"),
    "mobilenetv2": TimmCase("mobilenetv2_100"),
    "mobilenetv3": TIMM_FAMILY_MODELS["mobilenetv3"],
    "efficientnet": TIMM_FAMILY_MODELS["efficientnet"],
    "convnext": TIMM_FAMILY_MODELS["convnext"],
    "vit": TIMM_FAMILY_MODELS["vit"],  # built with fused attention off: explicit q @ k, attn @ v
    "mobilevit": TimmCase("mobilevit_xxs"),  # MobileVitBlock is a leaf: counted inside
    "efficientvit": TimmCase("efficientvit_b0"),  # LiteMLA is a leaf: counted inside
}
"""Family -> timm model compared with fvcore (all at 64 px, fused attention off)."""

LEAF_FAMILIES = {"mobilevit": "MobileVitBlock", "efficientvit": "LiteMLA"}
"""Families of ``FVCORE_TIMM_MODELS`` whose FLOPs sit partly in leaf modules of this type."""

COUNTED_VERTEX_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, MatmulOp,
                        AttentionOp, FunctionalLayerOp)


def _fvcore_by_operator(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """fvcore's multiply-adds per operator (``FlopCountAnalysis.by_operator()``)."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            analysis = fvcore_nn.FlopCountAnalysis(model.eval(), inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_operator = dict(analysis.by_operator())
            assert sum(by_operator.values()) == analysis.total()
        finally:
            logging.disable(logging.NOTSET)
    return by_operator


def _fvcore_flops(model: nn.Module, inputs: tuple) -> int:
    """2 x fvcore's ``total()`` less its estimates, checked to equal 2 x its conv/linear/matmul."""
    by_operator = _fvcore_by_operator(model, inputs)
    unknown = set(by_operator) - set(FVCORE_OPERATORS) - set(FVCORE_ESTIMATED_OPERATORS)
    assert not unknown, f"fvcore counts operators this test does not classify: {unknown}"
    estimated = sum(by_operator.get(operator, 0) for operator in FVCORE_ESTIMATED_OPERATORS)
    counted = sum(by_operator.get(operator, 0) for operator in FVCORE_OPERATORS)
    assert counted == sum(by_operator.values()) - estimated
    return 2 * counted


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
    inputs = (torch.randn(1, *case.input_size),)
    fvcore_total = 2 * sum(_fvcore_by_operator(model, inputs).values())
    report = dagprune.count_flops(dag, case.input_size)
    assert report.total == _fvcore_flops(model, inputs) > 0
    assert report.total >= (1 - FVCORE_ESTIMATED_SHARE_BOUND) * fvcore_total
    if family in LEAF_FAMILIES:
        leaves = [v for v in dag.inner_vertices if type(v.module).__name__ == LEAF_FAMILIES[family]]
        assert leaves and all(report.per_vertex[v.name] > 0 for v in leaves)


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


# --------------------------------------------------------------------------------- leaf modules
class _ConvMixer(nn.Module):
    """A block kept whole as a leaf: a depthwise conv, then channels mixed by an einsum."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.mix = nn.Parameter(torch.randn(channels, channels))

    def forward(self, x, scale: float = 1.0):
        return torch.einsum("bchw,dc->bdhw", self.depthwise(x), self.mix) * scale


class _LeafMixerNet(nn.Module):
    """Conv stem, a ``_ConvMixer`` leaf called with a constant keyword, pooled linear head."""

    def __init__(self, channels: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3)
        self.mixer = _ConvMixer(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.mixer(self.stem(x), scale=2.0).mean((2, 3)))


def test_custom_leaf_is_counted_inside_like_fvcore():
    model = _LeafMixerNet().eval()
    dag = dagprune.build_from_unstructured_module(model, leaf_modules=[_ConvMixer])
    (mixer,) = [v for v in dag.inner_vertices if v.qualified_name == "mixer"]
    report = dagprune.count_flops(dag, (3, 10, 10))
    channels, pixels = 8, 8 * 8
    assert report.per_vertex[mixer.name] == 2 * channels * pixels * (9 + channels)
    assert report.total == _fvcore_flops(model, (torch.randn(1, 3, 10, 10),))


class _EncoderClassifier(nn.Module):
    """Tokens -> ``nn.TransformerEncoderLayer`` (a torch.nn leaf) -> mean -> linear head."""

    def __init__(self, dim: int, heads: int, hidden: int, classes: int):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(dim, heads, hidden, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.encoder(tokens).mean(1))


def test_transformer_encoder_layer_leaf_matches_hand_count():
    tokens, dim, heads, hidden, classes = 10, 32, 4, 64, 5
    dag = dagprune.build_from_unstructured_module(_EncoderClassifier(dim, heads, hidden, classes).eval())
    (encoder,) = [v for v in dag.inner_vertices if isinstance(v.module, nn.TransformerEncoderLayer)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    report = dagprune.count_flops(dag, (tokens, dim))
    projections = tokens * (dim * 3 * dim + dim * dim + dim * hidden + hidden * dim)  # qkv, out, MLP
    attention = heads * tokens * tokens * (dim // heads) * 2  # q @ k^T and attn @ v
    assert report.per_vertex[encoder.name] == 2 * (projections + attention)
    assert report.total == 2 * (projections + attention) + 2 * dim * classes
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # the fast path is restored


class _Recurrent(nn.Module):
    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, sequence):
        return self.lstm(sequence, None)[0]  # a constant argument: called through ModuleCallOp


@pytest.mark.parametrize("wrap", [nn.Sequential, _Recurrent], ids=["module", "module-call"])
def test_lstm_matches_hand_count(wrap):
    steps, features, hidden = 10, 16, 32
    lstm = nn.LSTM(features, hidden, num_layers=2, bidirectional=True, batch_first=True)
    dag = dagprune.build_from_unstructured_module(wrap(lstm))
    gates = 4 * hidden
    per_direction = gates * (features + hidden) + gates * (2 * hidden + hidden)  # layers 0 and 1
    assert dagprune.count_flops(dag, (steps, features)).total == 2 * steps * 2 * per_direction


def test_ops_with_nothing_inside_are_not_run_again(monkeypatch):
    def fail(module, inputs, output):
        raise AssertionError(f"{type(module).__name__} was measured")

    entry = ZOO["tiny_vit"]
    dag = dagprune.build_from_unstructured_module(entry.factory())
    monkeypatch.setattr(dagprune.ops.flop_counting, "measured_flops", fail)
    assert dagprune.count_flops(dag, _shape_argument(input_shapes(entry))).total > 0


class _RunsOnce(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("this block runs only once")
        return self.linear(x)


def test_black_box_that_cannot_run_again_names_vertex_and_next_step():
    dag = dagprune.build_from_unstructured_module(nn.Sequential(_RunsOnce()), leaf_modules=[_RunsOnce])
    with pytest.raises(dagprune.errors.UnsupportedOpError,
                       match=r"vertex '.*' \(0\), which calls _RunsOnce: this block runs only "
                             r"once.*dagprune.ops.register_op"):
        dagprune.count_flops(dag, (4,))


def test_leaf_attention_counts_the_same_fused_or_not():
    timm = pytest.importorskip("timm")
    case = FVCORE_TIMM_MODELS["mobilevit"]
    fused_attention = timm.layers.use_fused_attn()
    totals = []
    try:
        for fused in (True, False):  # fused: F.scaled_dot_product_attention inside MobileVitBlock
            timm.layers.set_fused_attn(fused)
            dag = dagprune.build_from_unstructured_module(create_timm_model(case))
            totals.append(dagprune.count_flops(dag, case.input_size).total)
    finally:
        timm.layers.set_fused_attn(fused_attention)
    assert totals[0] == totals[1]
