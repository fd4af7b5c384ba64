"""Regressions found by the timm coverage sweep: each case once removed channels inexactly."""

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning

from informative_weights import make_weights_informative


def _pruned_at_random_gates(dag, input_shape, target: float = 0.5):
    """The pruning, its gated DAG and the DAG with the channels of random gate logits removed."""
    pruning = ChannelPruning(dag, input_shape, target, 10)
    gated = pruning.prepare_for_pruning().eval()
    for gate in pruning.gates:
        gate.logits.data = torch.randn_like(gate.logits)
    return pruning, gated, pruning.remove_channels().eval()


def _assert_followed_and_removed_exactly(model: nn.Module, dag, x: torch.Tensor):
    """``dag`` computes what ``model`` does on ``x``, more than 0.9 of its FLOPs are removable,
    and removing the channels of random gate logits reproduces the gated model. Returns the
    gated and slim DAGs."""
    with torch.no_grad():
        assert dagprune.max_relative_difference(model(x), dag(x)) <= 1e-6
    pruning, gated, slim = _pruned_at_random_gates(dag, tuple(x.shape[1:]))
    assert pruning.max_removable_proportion > 0.9
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-4
    return gated, slim


def _removal_difference(model: nn.Module, input_shape, seed: int = 0, target: float = 0.9) -> float:
    torch.manual_seed(seed)
    dag = dagprune.build_from_unstructured_module(model.eval())
    _, gated, slim = _pruned_at_random_gates(dag, input_shape, target)
    x = torch.randn(2, *input_shape)
    with torch.no_grad():
        return dagprune.max_relative_difference(gated(x), slim(x))


class _SizeReadFromAnotherTensor(nn.Module):
    """Reshapes one branch with the channel count read from another tensor's shape."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        batch, channels, height, width = x.shape
        y = self.branch(x).flatten(2).transpose(1, 2)      # (B, HW, C) from another producer
        y = y.reshape(batch, height * width, channels)     # C read from x: couples the two
        return self.head(y.mean(1) + x.mean((2, 3)))


def test_size_read_from_a_channel_axis_couples_the_axes():
    assert _removal_difference(_SizeReadFromAnotherTensor(), (3, 6, 6)) <= 1e-4


def test_edgenext_reshape_with_run_time_channel_count():
    timm = pytest.importorskip("timm")
    model = timm.create_model("edgenext_xx_small", pretrained=False)
    assert _removal_difference(model, (3, 64, 64), target=0.5) <= 1e-4


class _HeadsFromTheStreamWidth(nn.Module):
    """Class attention as XCiT writes it: the query's heads are split with ``C // heads``, ``C``
    read from the token stream; with ``sliced`` the divided width also slices the stream."""

    def __init__(self, sliced: bool = False):
        super().__init__()
        self.embed, self.q, self.v, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.sliced = sliced

    def forward(self, x):
        tokens = self.embed(x)
        batch, count, width = tokens.shape
        q = self.q(tokens).reshape(batch, count, 2, width // 2).transpose(1, 2)
        v = self.v(tokens).reshape(batch, count, 2, width // 2).transpose(1, 2)
        mixed = (q.sigmoid() * v).transpose(1, 2).reshape(batch, count, width)
        if self.sliced:
            tokens = torch.cat([tokens[..., :width // 2], tokens[..., width // 2:]], -1)
        return self.head(mixed + tokens)


def test_channel_count_divided_into_heads_keeps_the_stream_prunable():
    from dagprune_algorithms.pruning.channel_groups import find_channel_groups

    model = make_weights_informative(_HeadsFromTheStreamWidth()).eval()
    groups = find_channel_groups(dagprune.build_from_unstructured_module(model), (5, 4)).groups
    # one group: the attention's dims join the stream they are added to, tied across heads
    assert [(g.name, len(g.classes)) for g in groups if g.prunable] == [("embed", 4)]
    for seed in range(3):
        assert _removal_difference(model, (5, 4), seed, target=0.5) <= 1e-5


class _ScaledByHalfTheWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        tokens = self.embed(x)
        return self.head(tokens * (tokens.shape[-1] // 2))  # a scale that removal must not change


def test_divided_channel_count_used_as_a_number_keeps_its_value_after_removal():
    # `tokens * (width // 2)` barred every channel `width` came from; the slim model now holds
    # the original half width, as the gated model computes
    from dagprune_algorithms.pruning.channel_groups import find_channel_groups

    model = make_weights_informative(_ScaledByHalfTheWidth()).eval()
    groups = find_channel_groups(dagprune.build_from_unstructured_module(model), (5, 4)).groups
    assert [g.name for g in groups if g.prunable] == ["embed"]
    for seed in range(3):
        assert _removal_difference(model, (5, 4), seed, target=0.5) <= 1e-5


def test_halves_cut_at_the_divided_channel_count_are_tied_and_stay_prunable():
    # `tokens[..., :width // 2]` cuts at half of the run-time width: the halves are tied channel
    # by channel, so the slim model's own half cuts where the gated model's did
    from dagprune_algorithms.pruning.channel_groups import find_channel_groups

    model = make_weights_informative(_HeadsFromTheStreamWidth(sliced=True)).eval()
    groups = find_channel_groups(dagprune.build_from_unstructured_module(model), (5, 4)).groups
    assert [(g.name, len(g.classes)) for g in groups if g.prunable] == [("embed", 4)]
    for seed in range(3):
        assert _removal_difference(model, (5, 4), seed, target=0.5) <= 1e-5


def test_xcit_position_encoding_and_class_attention_keep_the_stream_prunable(tmp_path):
    """XCiT adds projected Fourier position features to its tokens (a leaf module, whose channels
    were barred: 0.67 of the FLOPs removable) and splits class-attention heads with ``C //
    heads``."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("xcit_nano_12_p16_224", pretrained=False,
                                                       img_size=32)).eval()
    dag = dagprune.build_from_unstructured_module(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dag(x), model(x))
    pruning, gated, slim = _pruned_at_random_gates(dag, (3, 32, 32))
    assert pruning.max_removable_proportion > 0.9
    dagprune.save_dag(slim, tmp_path / "slim")
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-4
        assert torch.equal(dagprune.load_dag(tmp_path / "slim")(x), slim(x))


@pytest.mark.parametrize("name, size, removable", [
    # NHWC position embedding resampled to the input's grid; the decomposed relative positions
    # (get_rel_pos tables contracted with the queries by torch.einsum) keep the head dims prunable
    ("samvit_base_patch16", 64, 0.99),
    ("swin_tiny_patch4_window7_224", 224, 0.9),  # channels-last window merging
])
def test_channels_last_timm_functions_keep_the_token_stream_prunable(tmp_path, name, size, removable):
    """timm's channels-last rearrangements (``resample_abs_pos_embed_nhwc``, ``window_reverse``)
    are called as whole functions; their last axis carries the channels (SAM ViT: 0.43 of the
    FLOPs removable when they were barriers)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {"img_size": size, "depth": 2} if name.startswith("samvit") else {"depths": (1, 1, 1, 1)}
    model = make_weights_informative(timm.create_model(name, pretrained=False, **kwargs)).eval()
    dag = dagprune.build_from_unstructured_module(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(dag(x), model(x))
    pruning, gated, slim = _pruned_at_random_gates(dag, (3, size, size))
    assert pruning.max_removable_proportion > removable
    dagprune.save_dag(slim, tmp_path / "slim")
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-4
        assert torch.equal(dagprune.load_dag(tmp_path / "slim")(x), slim(x))


def test_asserted_equal_channel_counts_are_one_group():
    """GCViT asserts ``x.shape[-1] == q_global.shape[-1]`` (``torch._assert``): the two channel
    counts are tied, not barred (gcvit_xxtiny: 0.73 of the FLOPs removable when barred)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("gcvit_xxtiny", pretrained=False, img_size=64)).eval()
    dag = dagprune.build_from_unstructured_module(model)
    x = torch.randn(2, 3, 64, 64)
    pruning, gated, slim = _pruned_at_random_gates(dag, (3, 64, 64))
    assert pruning.max_removable_proportion > 0.95
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-4


def _standardised_conv_model():
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    return nn.Sequential(layers.ScaledStdConv2dSame(3, 8, 3, stride=2), nn.ReLU(),
                         layers.ScaledStdConv2dSame(8, 8, 3), nn.ReLU(),
                         layers.StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                         layers.ScaledStdConv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


def test_weight_standardised_convs_are_prunable_on_both_sides():
    model = _standardised_conv_model()
    dag = dagprune.build_from_unstructured_module(model.eval())
    convs = [v.module for v in dag.inner_vertices if isinstance(v.module, dagprune.ops.StandardizedConv2d)]
    assert len(convs) == 4  # one vertex per conv, not a batch_norm over its weight
    pruning = ChannelPruning(dag, (3, 16, 16), 0.5, 10)
    pruning.prepare_for_pruning()
    # every conv's output: the grouped conv (2 groups of 4 inputs and 8 outputs) keeps the same
    # positions in every group, so its input channels and its own output channels stay apart
    assert len(pruning.prunable_groups) == 4
    assert _removal_difference(_standardised_conv_model(), (3, 16, 16), target=0.5) <= 1e-4


def test_removing_inputs_of_a_standardised_conv_bakes_its_weight():
    dag = dagprune.build_from_unstructured_module(_standardised_conv_model().eval())
    pruning = ChannelPruning(dag, (3, 16, 16), 0.5, 10)
    gated = pruning.prepare_for_pruning().eval()
    for gate in pruning.gates:
        gate.logits.data = torch.linspace(-1, 1, gate.logits.numel())
    slim = pruning.remove_channels().eval()
    kinds = [type(v.module).__name__ for v in slim.inner_vertices if isinstance(v.module, nn.Conv2d)]
    # the first conv keeps its 3 inputs (standardised); the others lose inputs, the grouped one
    # the same positions in every group (plain convs holding their standardised weights)
    assert kinds == ["StandardizedConv2d", "Conv2d", "Conv2d", "Conv2d"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-5


def test_a_standardised_conv_losing_whole_groups_stays_standardised():
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), layers.ScaledStdConv2d(8, 8, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(8, 2, 1))
    dag = dagprune.build_from_unstructured_module(model.eval())
    pruning, gated, slim = _pruned_at_random_gates(dag, (3, 8, 8))
    grouped = next(v.module for v in slim.inner_vertices if isinstance(v.module, nn.Conv2d) and v.module.groups > 1
                   or isinstance(v.module, dagprune.ops.StandardizedConv2d))
    # 4 groups of 2 channels: whole groups go, no kept filter's statistics change
    assert isinstance(grouped, dagprune.ops.StandardizedConv2d) and grouped.out_channels == 2 * grouped.groups
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-5


def test_normfree_block_is_traced_with_its_in_place_skipinit_gain(tmp_path):
    """``out.mul_(skipinit_gain)`` (dm_nfnet configurations) becomes a vertex run in trace order
    before the residual sum reads ``out``: the DAG, the gated and the slim model compute it, the
    gated model trains through it and the slim model saves and loads with it."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("nf_regnet_b0", pretrained=False, num_classes=10).eval()
    for block in (model.stages[0][0], model.stages[1][1]):
        block.skipinit_gain = nn.Parameter(torch.tensor(0.5))
    make_weights_informative(model)  # NFNets' last gains start at zero, hiding the branch
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(model)
    assert not any(type(v.module).__name__ == "NormFreeBlock" for v in dag.inner_vertices)
    assert sum(getattr(v.module, "function_name", "") == "Tensor.mul_" for v in dag.inner_vertices) == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert dagprune.max_relative_difference(model(x), dag(x)) == 0
        with_gain = model(x)
        model.stages[0][0].skipinit_gain.fill_(2.0)
        assert dagprune.max_relative_difference(with_gain, model(x)) > 1e-3  # the gain shows
        model.stages[0][0].skipinit_gain.fill_(0.5)
    pruning = ChannelPruning(dag, (3, 64, 64), 0.5, 10)
    gated = pruning.prepare_for_pruning().train()
    _, flops, entropy, bkd = pruning.compute_current_proportion_and_pruning_losses(1)
    (gated(x).square().mean() + flops + entropy + bkd).backward()
    for gate in pruning.gates:
        gate.logits.data = torch.randn_like(gate.logits)
    gated.eval()
    slim = pruning.remove_channels().eval()
    path = dagprune.save_dag(slim, tmp_path / "slim")
    loaded = dagprune.load_dag(path).eval()
    with torch.no_grad():
        assert dagprune.max_relative_difference(gated(x), slim(x)) <= 1e-4
        assert torch.equal(slim(x), loaded(x))


class _ExpandToAnotherShape(nn.Module):
    """``s.expand(x.shape)``: a per-channel statistic broadcast to the shape of its source (timm's
    instance_rms in filter response norms)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        rms = x.square().mean(dim=(2, 3), keepdim=True).add(1e-5).sqrt()
        return self.head(x / rms.expand(x.shape))


def test_expand_to_a_whole_run_time_shape_keeps_channels_prunable():
    dag = dagprune.build_from_unstructured_module(_ExpandToAnotherShape().eval())
    pruning = ChannelPruning(dag, (3, 8, 8), 0.5, 10)
    pruning.prepare_for_pruning()
    assert [g.size for g in pruning.prunable_groups] == [8]
    assert _removal_difference(_ExpandToAnotherShape(), (3, 8, 8), target=0.5) <= 1e-4


def test_filter_response_norm_resnet_is_prunable():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnetv2_50d_frn", pretrained=False, num_classes=10)
    assert _removal_difference(model, (3, 64, 64), target=0.5) <= 1e-4


class _ChannelsFirstLayerNorm(nn.Module):
    """A layer norm over the channels of NCHW activations written with means (as in the
    original ConvNeXt code), then a channel sum feeding a gate: reductions over channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.weight, self.bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))

    def forward(self, x):
        x = self.stem(x)
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + 1e-6)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        gate = torch.sigmoid(x.sum(dim=1, keepdim=True))
        return self.head(x * gate)


@pytest.mark.parametrize("seed", range(3))
def test_means_and_sums_over_channels_reduce_over_the_kept_ones(seed):
    torch.manual_seed(seed)
    model = _ChannelsFirstLayerNorm()
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 6, 6), 0.5, 10)
    pruning.prepare_for_pruning()
    assert [group.name for group in pruning.prunable_groups] == ["stem"]
    assert _removal_difference(model, (3, 6, 6), seed) < 1e-5


class _TransposedByAttribute(nn.Module):
    """``x.T`` and ``x.mT`` read as attributes: the channels move with the axes (they were
    dropped, so a producer behind them was pruned and the product's shapes no longer matched)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        tokens = x.flatten(0, 1)
        scores = self.a(tokens) @ self.b(tokens).T                # a and b contracted
        mixed = (scores.softmax(-1) @ self.c(tokens)).mT.mT       # c's channels pass
        return self.head(mixed).reshape(x.shape[0], -1, 2)


@pytest.mark.parametrize("seed", range(3))
def test_tensor_attributes_carry_their_channels(seed):
    model = _TransposedByAttribute()
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model), (6, 4), 0.5, 10)
    pruning.prepare_for_pruning()
    assert sorted(group.name for group in pruning.prunable_groups) == ["a", "c"]
    assert _removal_difference(model, (6, 4), seed) < 1e-5


class _ReshapedLikeItsSource(nn.Module):
    """LeViT's LinearNorm: ``bn(x.flatten(0, 1)).reshape_as(x)``; with ``other_template`` the
    reshape takes the shape of a tensor whose last axis carries other channels."""

    def __init__(self, other_template: bool = False):
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.other = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.other_template = other_template

    def forward(self, x):
        y = self.linear(x)
        template = self.other(x) if self.other_template else y
        return self.head(self.bn(y.flatten(0, 1)).reshape_as(template))


def test_reshape_as_its_own_source_keeps_channels_prunable():
    from dagprune_algorithms.pruning.channel_groups import find_channel_groups

    model = make_weights_informative(_ReshapedLikeItsSource()).eval()
    groups = find_channel_groups(dagprune.build_from_unstructured_module(model), (5, 6)).groups
    assert [(g.size, g.prunable) for g in groups if g.size == 8] == [(8, True)]
    assert _removal_difference(model, (5, 6), target=0.5) <= 1e-5


def test_reshape_as_another_tensor_couples_the_two_channel_axes():
    from dagprune_algorithms.pruning.channel_groups import find_channel_groups

    model = make_weights_informative(_ReshapedLikeItsSource(other_template=True)).eval()
    groups = find_channel_groups(dagprune.build_from_unstructured_module(model), (5, 6)).groups
    assert [(g.size, g.prunable) for g in groups if g.size == 8] == [(8, True)]  # one group, both sides
    for seed in range(3):
        assert _removal_difference(model, (5, 6), seed=seed, target=0.5) <= 1e-5


def test_levit_attention_biases_stay_parameters_and_levit_is_prunable():
    """LeViT's attention layers cache their biases in eval mode; a cache filled before conversion
    must not become a constant of the DAG (training and pruning would leave it stale)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("levit_128s", pretrained=False, img_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    model(x)  # fills the caches
    dag = dagprune.build_from_unstructured_module(model, copy_model=False)
    with torch.no_grad():
        assert dagprune.max_relative_difference(model(x), dag(x)) == 0
        for name, parameter in model.named_parameters():
            if name.endswith("attention_biases"):
                parameter.add_(torch.randn_like(parameter))
        for module in model.modules():
            if hasattr(module, "attention_bias_cache"):
                module.attention_bias_cache = {}
        assert dagprune.max_relative_difference(model(x), dag(x)) <= 1e-6
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model), (3, 64, 64), 0.5, 10)
    pruning.prepare_for_pruning()
    assert pruning.max_removable_proportion > 0.9
    assert _removal_difference(model, (3, 64, 64), target=0.5) <= 1e-4


def test_app_converts_timm_blocks_branching_on_sizes_with_example_inputs():
    """MobileViT's blocks unfold patches with sizes read from their input: the app converts such
    models with an example batch, so their channels are followed (kept whole, 20% of the FLOPs
    of mobilevit_xxs are removable; followed, over 90%)."""
    timm = pytest.importorskip("timm")
    from dagprune_algorithms.app.models import as_dag

    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("mobilevit_xxs", pretrained=False)).eval()
    dag = as_dag(model, (3, 64, 64))
    assert not any(type(v.module).__name__ == "MobileVitBlock" for v in dag.inner_vertices)
    _assert_followed_and_removed_exactly(model, dag, torch.randn(3, 3, 64, 64))


def test_convit_gated_positional_attention_is_traced_with_example_inputs(tmp_path):
    """ConViT's GPSA builds its relative position table from the input's size by item assignment
    and caches it on itself: converted with an example batch it is traced through (kept whole,
    its channels barred), and the model keeps its own table."""
    timm = pytest.importorskip("timm")
    from timm.models.convit import GPSA

    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("convit_tiny", pretrained=False, img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(x,), copy_model=False)
    assert not any(isinstance(v.module, GPSA) for v in dag.inner_vertices)
    assert all(type(m.rel_indices) is torch.Tensor for m in model.modules() if isinstance(m, GPSA))
    other_batch = torch.randn(3, 3, 32, 32)
    _, slim = _assert_followed_and_removed_exactly(model, dag, other_batch)
    dagprune.save_dag(slim, tmp_path / "slim")
    loaded = dagprune.load_dag(tmp_path / "slim")
    with torch.no_grad():
        assert torch.equal(loaded(other_batch), slim(other_batch))


def test_mobilenetv5_fusion_adapter_is_traced_with_example_inputs():
    """timm's MobileNetV5 multi-scale fusion adapter takes a list of feature maps and resizes
    them by their sizes (timm marks it not traceable): converted with an example batch it is
    traced through, so the channels of the maps it fuses are pruned, not barred."""
    pytest.importorskip("timm")
    from timm.models.mobilenetv5 import MobileNetV5MultiScaleFusionAdapter

    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.high, self.low = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.fuse = MobileNetV5MultiScaleFusionAdapter([8, 16], 12, output_resolution=4)
            self.head = nn.Conv2d(12, 2, 1)

        def forward(self, x):
            return self.head(self.fuse([self.high(x), self.low(x)]))

    torch.manual_seed(0)
    model = make_weights_informative(TwoScales()).eval()
    x = torch.randn(2, 3, 8, 8)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(x,))
    assert not any(isinstance(v.module, MobileNetV5MultiScaleFusionAdapter) for v in dag.inner_vertices)
    _assert_followed_and_removed_exactly(model, dag, torch.randn(3, 3, 8, 8))
