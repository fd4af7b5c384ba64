"""Tracing with example values: shape branches, sliced buffers, **kwargs, dict-like outputs."""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dagprune
from dagprune.errors import ConversionError
from dagprune.outputs import DagOutput
from gate_states import assert_removal_matches_gates, random_gate_states
from dagprune_algorithms.pruning import ChannelPruning


class _CausalSelfAttention(nn.Module):
    """nanoGPT's form: a causal mask buffer sliced by the traced length, shapes unpacked."""

    def __init__(self, dim: int = 16, heads: int = 4, block: int = 32):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _TinyGPT(nn.Module):
    def __init__(self, vocabulary: int = 50, dim: int = 16):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocabulary, dim), nn.Embedding(32, dim)
        self.attention, self.norm = _CausalSelfAttention(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocabulary)

    def forward(self, idx):
        b, t = idx.size()
        if t > self.position.num_embeddings:  # a check on a size: follows the example
            raise ValueError(f"sequence of {t} is longer than {self.position.num_embeddings}")
        x = self.embed(idx) + self.position(torch.arange(0, t, dtype=torch.long, device=idx.device))
        x = x + self.attention(self.norm(x))
        return self.head(x + self.mlp(self.norm(x)))


def test_causal_mask_buffer_sliced_by_the_traced_length_converts_for_every_length_and_prunes():
    torch.manual_seed(0)
    model = _TinyGPT().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(torch.randint(0, 50, (2, 8)),))
    for batch, length in [(2, 8), (3, 5), (1, 32)]:
        tokens = torch.randint(0, 50, (batch, length))
        assert dagprune.max_relative_difference(model(tokens), dag(tokens)) == 0.0
    example = (torch.randint(0, 50, (2, 8)),)
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    for _ in random_gate_states(pruning, seed=0, count=2):
        assert_removal_matches_gates(pruning, gated, (torch.randint(0, 50, (3, 6)),))


class _DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        if y.sum() > 0:  # depends on the values: no trace may follow it
            return y
        return -y


def test_a_branch_on_tensor_values_is_refused_with_the_users_line():
    with pytest.raises(ConversionError) as caught:
        dagprune.build_from_unstructured_module(_DataBranch(), example_inputs=(torch.randn(2, 4),))
    message = str(caught.value)
    assert "values inside a tensor" in message and "if y.sum() > 0:" in message
    assert "test_value_tracing.py" in message


class _ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x, scale_by_length: bool = True):
        if x.ndim == 2:  # an image-less path the example does not take
            x = x.unsqueeze(1)
        batch, length, width = x.shape
        y = self.linear(x).reshape(batch * length, width)
        if scale_by_length and length > 1:
            y = y / length
        return y.view(batch, length, width)


def test_branches_on_shapes_follow_the_example_and_the_graph_keeps_reading_sizes():
    model = _ShapeBranch().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(torch.randn(2, 3, 8),))
    for shape in [(2, 3, 8), (5, 7, 8)]:
        x = torch.randn(*shape)
        assert torch.equal(model(x), dag(x))


class _GridTokens(nn.Module):
    """timm's Gemma4 ViT form: ``if x.ndim == 4`` picks the image path, and a factory takes the
    traced sizes as separate arguments (``torch.ones(batch, pH * pW, ...)``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)

    def forward(self, x):
        if x.ndim == 4:
            batch, channels, height, width = x.shape
            x = x.reshape(batch, channels, height * width).transpose(1, 2)
        valid = torch.ones(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        return self.embed(x) * valid.unsqueeze(-1) + torch.zeros(x.shape[0], 1, 8)


def test_factories_given_traced_sizes_as_separate_arguments_are_recorded(tmp_path):
    # torch's argument parser refused the proxies: "ones() takes 1 positional argument but 2
    # were given" (timm's gemma4_vit_* models, with example inputs)
    model = _GridTokens().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(torch.randn(2, 3, 4, 4),))
    loaded = dagprune.load_dag(dag.save(tmp_path / "grid"))
    for shape in [(2, 3, 4, 4), (3, 3, 5, 2)]:
        x = torch.randn(*shape)
        assert torch.equal(model(x), dag(x)) and torch.equal(model(x), loaded(x))


class _KeywordsOnly(nn.Module):
    """A forward taking **kwargs, as Hugging Face's decorated forwards do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, **kwargs):
        y = self.linear(x)
        if kwargs.get("mask") is not None:
            y = y * kwargs["mask"]
        return y * kwargs.get("scale", 1.0)


def test_forward_with_kwargs_traces_the_example_keywords_as_named_inputs():
    model = _KeywordsOnly().eval()
    x, mask = torch.randn(2, 4), (torch.rand(2, 4) > 0.5).float()
    dag = dagprune.build_from_unstructured_module(model, example_inputs={"x": x, "mask": mask, "scale": 3.0})
    assert [(v.name, v.fixed) for v in dag.inputs] == [("x", False), ("mask", False), ("scale", True)]
    x2, mask2 = torch.randn(5, 4), torch.ones(5, 4)
    assert torch.equal(model(x2, mask=mask2, scale=3.0), dag(x=x2, mask=mask2))
    with pytest.raises(TypeError):
        dag(x=x2)  # the mask was given as a tensor: it is a required input


@dataclasses.dataclass
class _Output(collections.OrderedDict):
    logits: torch.Tensor = None
    hidden: torch.Tensor = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class _DictOutputModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        hidden = self.body(x)
        return _Output(logits=self.head(hidden.relu()), hidden=hidden)


def test_dict_like_outputs_keep_their_class_and_load_as_dag_output(tmp_path):
    model = _DictOutputModel().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(torch.randn(2, 4),))
    x = torch.randn(3, 4)
    output = dag(x)
    assert type(output) is _Output and torch.equal(output.logits, model(x).logits)
    dag.save(tmp_path / "dag")
    loaded = dagprune.load_dag(tmp_path / "dag")(x)
    assert isinstance(loaded, DagOutput) and loaded.type_name == "_Output"
    assert list(loaded) == ["logits", "hidden"] and torch.equal(loaded.hidden, output.hidden)
    assert torch.equal(loaded[0], output.logits)
    with pytest.raises(AttributeError, match="no field 'loss'"):
        loaded.loss


class _ModuleMadeOnTheFly(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.__dict__["helpers"] = {"act": nn.SiLU()}  # a module that is no submodule

    def forward(self, x):
        return self.helpers["act"](self.linear(x))


def test_a_module_that_is_no_submodule_is_traced_through():
    model = _ModuleMadeOnTheFly().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(torch.randn(2, 4),))
    x = torch.randn(3, 4)
    assert torch.equal(model(x), dag(x))


class _SquareTokens(nn.Module):
    """A ViT-style token grid whose side is computed with int(): a size the model specialises."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, tokens):
        batch, count, width = tokens.shape
        side = int(math.sqrt(count))
        grid = tokens.transpose(1, 2).reshape(batch, width, side, side)
        return self.conv(grid).flatten(2).transpose(1, 2)


def test_int_of_a_size_is_specialised_and_guarded_at_run_time():
    model = _SquareTokens().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(torch.randn(2, 16, 4),))
    x = torch.randn(3, 16, 4)  # another batch size, the same grid: runs
    assert torch.equal(model(x), dag(x))
    with pytest.raises(Exception, match="runs only where it is 4"):
        dag(torch.randn(2, 25, 4))  # a 5 x 5 grid: the model specialised the side on 4


class _TorchTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoderLayer(16, 4, 32, batch_first=True, dropout=0.0, norm_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, source, target, padding=None):
        memory = self.encoder(source, src_key_padding_mask=padding)
        return self.head(self.decoder(target, memory, memory_key_padding_mask=padding))


def _transformer_inputs(batch: int, source: int, target: int):
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[0, -2:] = True
    return torch.randn(batch, source, 16), torch.randn(batch, target, 16), padding


@pytest.mark.parametrize("head_pruning", ["dims", "heads"])
def test_torch_transformer_blocks_are_traced_through_with_example_inputs_and_prune(head_pruning):
    torch.manual_seed(0)
    model = _TorchTransformer().eval()
    example = _transformer_inputs(2, 7, 5)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    assert not any(isinstance(v.module, (nn.TransformerEncoder, nn.TransformerDecoderLayer))
                   for v in dag.inner_vertices)
    other = _transformer_inputs(3, 9, 4)
    assert dagprune.max_relative_difference(model(*other), dag(*other)) == 0.0
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example, head_pruning=head_pruning)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0.9
    for _ in random_gate_states(pruning, seed=2, count=2):
        assert_removal_matches_gates(pruning, gated, other)


class _MaskedSequenceModel(nn.Module):
    """``nn.Transformer`` called with attention masks, as torch's tutorials call it: a source
    mask (the encoder reads its dtype with an ``isinstance`` check) and a target mask (the
    decoder compares it with the causal mask, reading its values)."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, source, target, source_mask, target_mask):
        return self.head(self.transformer(source, target, src_mask=source_mask, tgt_mask=target_mask))


def _masked_sequence_inputs(batch: int, source: int, target: int, causal: bool = True):
    target_mask = nn.Transformer.generate_square_subsequent_mask(target)
    if not causal:
        target_mask = torch.zeros(target, target).masked_fill(torch.rand(target, target) < 0.3, float("-inf"))
        target_mask.fill_diagonal_(0.0)
    return (torch.randn(batch, source, 16), torch.randn(batch, target, 16),
            nn.Transformer.generate_square_subsequent_mask(source), target_mask)


def test_torch_transformer_called_with_masks_follows_each_mask_it_is_given():
    torch.manual_seed(0)
    model = _MaskedSequenceModel().eval()
    example = _masked_sequence_inputs(2, 6, 5)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    # the causal check is an op of the DAG: a mask that is not causal takes the other path
    for other in (_masked_sequence_inputs(3, 8, 4), _masked_sequence_inputs(2, 6, 5, causal=False)):
        with torch.no_grad():
            assert dagprune.max_relative_difference(model(*other), dag(*other)) <= 1e-6
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0.9
    for _ in random_gate_states(pruning, seed=1, count=2):
        assert_removal_matches_gates(pruning, gated, _masked_sequence_inputs(2, 6, 5, causal=False))


class _VariadicModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, *more, **options):
        return self.linear(x) * options.get("scale", 1.0)


@pytest.mark.parametrize("example_inputs, message", [
    ((torch.randn(2, 4), torch.randn(2, 4)), r"takes \*args; pass the values after its named arguments \(x\) by keyword"),
    ({"x": torch.randn(2, 4), "not-a-name": torch.randn(2, 4)}, r"keys \['not-a-name'\] are not Python argument names"),
])
def test_inputs_a_variadic_forward_cannot_name_are_clear_errors(example_inputs, message):
    with pytest.raises(ConversionError, match=message):
        dagprune.build_from_unstructured_module(_VariadicModel(), example_inputs=example_inputs)


class _CroppedToEven(nn.Module):
    """Crops its input to an even width (a branch on a size symbolic tracing cannot take), then
    projects it."""

    def __init__(self):
        super().__init__()
        self.project = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = x[..., :-1]
        return self.project(x)


dagprune.register_leaf_module(_CroppedToEven, traced_with_values=True)


class _WithCroppedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = _CroppedToEven()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_block_traced_with_values_is_whole_without_examples_and_followed_with_them():
    from dagprune.tracing import needs_example_inputs
    from dagprune_algorithms.pruning.channel_groups import find_channel_groups

    model = _WithCroppedBlock().eval()
    x = torch.randn(2, 3, 5, 7)
    assert needs_example_inputs(model) and not needs_example_inputs(model.stem)
    symbolic = dagprune.build_from_unstructured_module(model)
    assert any(isinstance(v.module, _CroppedToEven) for v in symbolic.inner_vertices)
    traced = dagprune.build_from_unstructured_module(model, example_inputs=(x,))
    assert not any(isinstance(v.module, _CroppedToEven) for v in traced.inner_vertices)
    other_batch = torch.randn(3, 3, 5, 7)
    for dag in (symbolic, traced):
        assert torch.equal(dag(other_batch), model(other_batch))
    prunable = lambda dag: sorted(g.size for g in find_channel_groups(dag, (3, 5, 7)).groups if g.prunable)  # noqa: E731
    assert prunable(symbolic) == [] and prunable(traced) == [8, 8]


class _BranchesOnRank(nn.Module):
    """Branches on its input's rank in its own forward, where no leaf can hold it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if x.ndim == 3:
            x = x.unsqueeze(0)
        return self.head(self.conv(x).relu())


def test_size_branch_error_suggests_example_inputs_and_the_app_converts_with_them():
    from dagprune_algorithms.app.models import as_dag

    model = _BranchesOnRank().eval()
    with pytest.raises(ConversionError, match=r"example_inputs=\(x,\)"):
        dagprune.build_from_unstructured_module(model)
    dag = as_dag(model, (3, 5, 7))
    x = torch.randn(3, 3, 5, 7)
    assert torch.equal(dag(x), model(x))
    pruning = ChannelPruning(dag, (3, 5, 7), 0.5, 10)
    pruning.prepare_for_pruning()
    assert pruning.max_removable_proportion > 0.5


class _CachesPositions(nn.Module):
    """Caches a table computed from its input's width on itself, as timm's ConViT does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("positions", torch.zeros(1, 1, 1, 1), persistent=False)

    def forward(self, x):
        if self.positions.shape[-1] != x.shape[-1]:
            self.positions = torch.arange(x.shape[-1], dtype=x.dtype).reshape(1, 1, 1, -1)
            self.cached_width = torch.ones(1) * x.shape[-1]
            self.cached_sizes = [self.positions.sum(), x.shape[-1]]
        return self.conv(x) * self.positions


def test_values_cached_on_the_model_while_tracing_are_restored():
    model = _CachesPositions().eval()
    x = torch.randn(2, 3, 5, 7)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(x,), copy_model=False)
    assert type(model.positions) is torch.Tensor and torch.equal(model.positions, torch.zeros(1, 1, 1, 1))
    assert "cached_width" not in model.__dict__ and "cached_sizes" not in model.__dict__
    other_batch = torch.randn(3, 3, 5, 7)
    assert torch.equal(dag(other_batch), model(other_batch))
    assert model.positions.shape == (1, 1, 1, 7)  # the model's own forward still caches


class _WritesIntoTensors(nn.Module):
    """Builds a table by item assignment from sizes (BEiT's relative position index), and writes
    into a channel of an activation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        table = torch.zeros(y.shape[0], y.shape[1], 1, 1, dtype=y.dtype)
        table[:, 1] = y.mean((1, 2, 3)).reshape(-1, 1, 1)
        y[:, 0] = 0.0
        return self.head(y + table)


def test_item_assignment_is_recorded_and_runs_in_order(tmp_path):
    from dagprune_algorithms.pruning.channel_groups import find_channel_groups

    model = _WritesIntoTensors().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(torch.randn(2, 3, 4, 4),))
    assert sum(getattr(v.module, "function_name", "") == "operator.setitem" for v in dag.inner_vertices) == 2
    x = torch.randn(3, 3, 5, 5)  # another batch and size
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(dag(x), expected)
        loaded = dagprune.load_dag(dagprune.save_dag(dag, tmp_path / "dag"))
        assert torch.equal(loaded(x), expected)
    conv_group = next(g for g in find_channel_groups(dag, (3, 4, 4)).groups if g.name == "conv")
    assert not conv_group.prunable  # written into by index: its channels are not followed


class _Float32Attention(nn.Module):
    """Linear attention kept in float32 with ``torch.autocast(..., enabled=False)`` around it, the
    device type read from the input (timm's EfficientViT ``LiteMLA``)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 24), nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = torch.relu(q.float()), torch.relu(k.float()), v.float()
            out = q @ (k.transpose(-1, -2) @ v) / (x.shape[1] * 8)
        return self.out(out.to(x.dtype))


def test_a_block_that_disables_autocast_traces_with_example_values():
    torch.manual_seed(0)
    model, x = _Float32Attention().eval(), torch.randn(2, 5, 6)
    with pytest.raises(ConversionError, match="autocast"):
        dagprune.build_from_unstructured_module(model)  # symbolically: the device type is a proxy
    dag = dagprune.build_from_unstructured_module(model, example_inputs=x)
    other = torch.randn(3, 5, 6)
    assert torch.equal(dag(x), model(x)) and torch.equal(dag(other), model(other))
    assert isinstance(torch.autocast, type)  # the tracing patch is undone
    config = ChannelPruning(dag, None, 0.7, 1, example_inputs=x)
    gated = config.prepare_for_pruning().eval()
    assert config.prunable_proportion > 0.5
    for _ in random_gate_states(config, seed=0):
        assert_removal_matches_gates(config, gated, (x,))


class _AsyncChecked(nn.Module):
    """Checks a property of its input's values without a host sync (timm's Gemma 4 pooler checks
    its grid this way)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        torch._assert_async((x.abs() < 1e6).all())
        return self.conv(x)


def test_an_async_assert_is_stored_and_still_checks(tmp_path):
    model = _AsyncChecked().eval()
    x = torch.randn(2, 3, 4, 4)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(x,))
    loaded = dagprune.load_dag(dag.save(tmp_path / "dag"))
    other = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(other), model(other))
        with pytest.raises(RuntimeError):
            loaded(torch.full((1, 3, 4, 4), 1e7))
