"""Idioms of model forwards met in Hugging Face models (ConvBERT, XLNet, RWKV, Nemotron, XGLM,
ProphetNet, LongT5, LLaMA, OPT, DeBERTa, GPT-Neo), each in a small model: converted with example
inputs, run at other sizes, pruned and removed exactly, or refused with an error that says what
to do."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import dagprune
from dagprune.errors import ConversionError
from gate_states import assert_removal_matches_gates, random_gate_states, slim_models_matching_gates
from dagprune_algorithms.pruning import ChannelPruning, find_channel_groups


def _tokens(batch: int, length: int, width: int = 8) -> tuple:
    return (torch.randn(batch, length, width),)


def _assert_prunes_and_removes_exactly(dag, example, other):
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0.5
    slim_models_matching_gates(pruning, gated, example, [other], count=2)  # and at other sizes


class _SizesInTorchCalls(nn.Module):
    """Traced sizes handed to torch functions: ``torch.reshape(x, [batch, -1, width])``
    (ConvBERT), ``torch.eye(length)`` (XLNet), ``torch.arange``, ``torch.tensor_split`` (Jamba)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        batch, length = x.shape[0], x.shape[1]
        h = torch.reshape(self.up(x), [batch, -1, 16])
        mixing = torch.eye(length) + 0.1 * torch.arange(length).float()
        h = torch.einsum("st,btc->bsc", mixing, h)
        first, rest = torch.tensor_split(h, [length // 2], dim=1)
        return self.down(torch.cat([rest, first], dim=1))


def test_traced_sizes_given_to_torch_functions_stay_symbolic(tmp_path):
    # torch's argument parser read such sizes as Python numbers: the graph was specialised on
    # the example's batch and length ("the DAG runs only where it is 2")
    torch.manual_seed(0)
    model = _SizesInTorchCalls().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 6))
    loaded = dagprune.load_dag(dag.save(tmp_path / "sizes"))
    for batch, length in [(2, 6), (3, 5), (1, 9)]:
        x = _tokens(batch, length)
        assert dagprune.max_relative_difference(model(*x), dag(*x)) == 0.0
        assert torch.equal(dag(*x), loaded(*x))
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 6), _tokens(3, 7))


class _QuantisationCheck(nn.Module):
    """RWKV's form: a branch for quantised weights, taken only when the weight has statistics."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        scale = self.linear.weight.SCB if hasattr(self.linear.weight, "SCB") else 1.0
        return self.linear(x) * scale


def test_hasattr_of_a_parameter_answers_as_for_the_parameter():
    # the parameter's proxy claimed every attribute: the DAG read `weight.SCB` and failed at run time
    model = _QuantisationCheck().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 3))
    x = _tokens(3, 4)
    assert torch.equal(model(*x), dag(*x))


class _RescalesOnFirstCall(nn.Module):
    """RWKV's form: the first call in eval mode divides a weight in place, once."""

    def __init__(self):
        super().__init__()
        self.linear, self.rescaled = nn.Linear(8, 8), False

    def forward(self, x):
        if not self.rescaled:
            with torch.no_grad():
                self.linear.weight.div_(2)
            self.rescaled = True
        return self.linear(x)


def test_a_model_writing_into_its_parameter_is_refused_and_converts_after_its_first_call():
    model = _RescalesOnFirstCall().eval()
    with pytest.raises(ConversionError, match=r"writes into its parameter 'linear.weight'.*call the model once"):
        dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 3))
    assert not model.rescaled  # conversion worked on a copy
    x = _tokens(2, 3)
    model(*x)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=x)
    assert torch.equal(model(*x), dag(*x)) and torch.equal(model(*x), dag(*x))  # no write on later calls


class _AutocastQuery(nn.Module):
    """transformers' ``maybe_autocast`` (Nemotron's layer norm): asks whether autocast is on for
    the input's device type."""

    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.linear(x)
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        return self.norm(h)


def test_autocast_queries_of_a_traced_device_type_take_the_examples_answer():
    model = _AutocastQuery().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 3))
    x = _tokens(3, 5)
    assert torch.equal(model(*x), dag(*x))


class _ElementwiseExtremes(nn.Module):
    """XGLM's ``torch.max(scores, torch.full((), min))`` and ``a.min(b)``: of two tensors, not
    reductions along an axis."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        floor = torch.max(self.left(x), torch.full((), -0.5))
        return self.head(floor.min(self.right(x)))


def test_max_and_min_of_two_tensors_are_elementwise_and_prune():
    # the reduction spec read the second tensor as `dim`: "iteration over a 0-d tensor"
    torch.manual_seed(0)
    model = _ElementwiseExtremes().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 3))
    names = {vertex.module.function_name for vertex in dag.inner_vertices if hasattr(vertex.module, "function_name")}
    assert {"torch.maximum", "Tensor.minimum"} <= names
    x = _tokens(3, 4)
    assert torch.equal(model(*x), dag(*x))
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 3), _tokens(1, 6))


class _StreamsAlongTokens(nn.Module):
    """ProphetNet's form: streams stacked along the tokens, chunked apart after a projection."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        streams = torch.cat([x, 2 * x, -x], dim=1)
        main, first, second = self.up(streams).relu().chunk(3, dim=1)
        return self.down(main + first * second)


def test_a_split_along_tokens_keeps_its_run_time_sizes_after_removal():
    # removal rewrote every chunk as a split with the example's sizes: "split_with_sizes expects
    # split_sizes to sum exactly to 12 ... got [6, 6, 6]" at another length
    torch.manual_seed(0)
    model = _StreamsAlongTokens().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 2))
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 2), _tokens(3, 4))


class _EmptyGuard(nn.Module):
    """LongT5's form: ``if 0 in x.shape`` before reshaping into blocks."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        if 0 in h.shape or not h.size(-1) > 0:
            return x
        return self.down(h.relu())


def test_a_channel_count_compared_with_zero_does_not_bar_its_channels():
    # every group keeps a channel, so `0 in shape` answers the same after removal
    torch.manual_seed(0)
    model = _EmptyGuard().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 3))
    analysis = find_channel_groups(dag, example_inputs=_tokens(2, 3))
    assert any(group.prunable and len(group.classes) == 16 for group in analysis.groups)
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 3), _tokens(3, 5))


class _WidthCheck(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        if h.shape[-1] == 16:  # true for the full width only: removal would change the answer
            h = h.relu()
        return self.down(h)


def test_a_channel_count_compared_with_a_count_it_can_shrink_to_stays_barred():
    model = _WidthCheck().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 3))
    analysis = find_channel_groups(dag, example_inputs=_tokens(2, 3))
    assert not any(group.prunable for group in analysis.groups)
    assert any("channel count used by" in group.reason for group in analysis.groups)


class _RoutedExperts(nn.Module):
    """transformers' grouped-matmul experts: token rows sorted by expert, one up and one down
    matrix per expert, ``torch._grouped_mm`` with the end row of each expert's rows."""

    def __init__(self, experts: int = 3, width: int = 16, hidden: int = 32):
        super().__init__()
        self.embed, self.router, self.head = nn.Linear(8, width), nn.Linear(width, experts), nn.Linear(width, 4)
        self.up = nn.Parameter(torch.randn(experts, width, hidden) / 4)
        self.down = nn.Parameter(torch.randn(experts, hidden, width) / 6)

    def forward(self, x):
        h = self.embed(x)
        expert = self.router(h).argmax(-1)
        order = torch.sort(expert, stable=True).indices
        offsets = torch.cumsum(torch.bincount(expert, minlength=self.up.shape[0]), 0).to(torch.int32)
        rows = torch._grouped_mm(h[order], self.up, offs=offsets).relu()
        out = torch.empty_like(h)
        out[order] = torch.nn.functional.grouped_mm(rows, self.down, offs=offsets)
        return self.head(h + out)


def test_grouped_matmul_experts_prune_and_slim_widths_run_without_the_kernels_alignment(tmp_path):
    # torch._grouped_mm was an opaque call: every channel it touched was a barrier (Mixtral 0.21
    # of its FLOPs removable); slim widths that are no multiple of 4 float32 channels are
    # refused by torch's CPU kernel and computed expert by expert
    torch.manual_seed(0)
    model = _RoutedExperts().eval()
    example = (torch.randn(10, 8),)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    assert torch.equal(model(*example), dag(*example))
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0.75  # all but the router's experts, the input and the output
    for _ in random_gate_states(pruning, seed=1, count=2):
        slim = assert_removal_matches_gates(pruning, gated, example)
    widths = {name: tuple(t.shape) for name, t in slim.state_dict().items()
              if name.endswith(("up.value", "down.value"))}
    assert any(size % 4 for shape in widths.values() for size in shape[1:]), widths
    loaded = dagprune.load_dag(slim.save(tmp_path / "slim"))
    x = torch.randn(7, 8)
    with torch.no_grad():
        assert torch.equal(slim(x), loaded(x))
        assert dagprune.max_relative_difference(gated.eval()(x), slim(x)) <= 1e-4


def test_tokens_gathered_by_an_index_expanded_to_the_channel_count_keep_their_channels_prunable():
    # gather had no spec (its channels were barriers), and expand of a size-1 axis to a channel
    # count read at run time barred that count ("shapes an untracked axis")
    from dagprune.ops.specs.selection import _example
    torch.manual_seed(0)
    model, example = _example()
    dag = dagprune.build_from_unstructured_module(model.eval(), example_inputs=example)
    analysis = find_channel_groups(dag, example_inputs=example)
    assert any(group.prunable and group.size == 8 for group in analysis.groups)
    _assert_prunes_and_removes_exactly(dag, example, (torch.randn(3, 7, 4),))


class _ConstantExpanded(nn.Module):
    """A constant made in the forward and expanded to the traced batch (spatial transformers'
    identity ``theta``)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        shift = torch.eye(8)[:1].expand(x.shape[0], x.shape[1], -1)
        return self.linear(x) + shift.new_zeros(x.shape[0], 1, 1) + shift


def test_tensor_methods_of_a_constant_given_traced_sizes_are_recorded():
    # torch's argument parser refused proxies: "expand() takes 1 positional argument but 3 were given"
    model = _ConstantExpanded().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 3))
    for batch, length in [(2, 3), (4, 5)]:
        x = _tokens(batch, length)
        assert torch.equal(model(*x), dag(*x))


def test_a_scripted_submodule_is_named_in_the_error():
    # the error was "attribute 'act._c' read by the model is a ScriptModule, not a tensor"
    with warnings.catch_warnings():  # torch.jit.script is deprecated (a FutureWarning), and still met in models
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(nn.GELU())
    model = nn.Sequential(nn.Linear(8, 8), scripted, nn.Linear(8, 2))
    with pytest.raises(ConversionError, match=r"module '1' is a TorchScript module .*eager nn.Module"):
        dagprune.build_from_unstructured_module(model)


class _PositionTable(nn.Module):
    """FSMT's sinusoidal positions: a table read by size, checked against the length."""

    def __init__(self):
        super().__init__()
        self.table, self.linear = nn.Parameter(torch.randn(16, 8)), nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[1] > self.table.size(0):
            raise ValueError("sequence longer than the position table")
        return self.linear(x + self.table[: x.shape[1]].view(1, -1, self.table.size(1)))


def test_a_parameters_size_along_one_axis_is_read_while_tracing():
    # torch.fx's parameter proxy took no dim: "ParameterProxy.size() takes 1 positional argument"
    model = _PositionTable().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 5))
    for length in (5, 9):
        x = _tokens(3, length)
        assert torch.equal(model(*x), dag(*x))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _RotaryAttention(nn.Module):
    """LLaMA / ModernBERT's rotary attention: ``rotate_half`` cuts the head dims at
    ``x.shape[-1] // 2`` read at run time; the angles come from a buffer of frequencies."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        angles = torch.arange(length).float()[:, None] * self.inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1))


def test_rotate_half_at_a_run_time_half_keeps_query_and_key_dims_prunable():
    # the cut at `x.shape[-1] // 2` barred the rotary head dims (LLaMA 0.956, ModernBERT 0.549 of
    # its FLOPs removable): the halves are now tied, so the slim model's own half cuts the same
    torch.manual_seed(0)
    model = _RotaryAttention().eval()
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_tokens(2, 5, 16))
    analysis = find_channel_groups(dag, example_inputs=_tokens(2, 5, 16))
    qkv = next(g for g in analysis.groups if any(v.name == "qkv" for v, _ in g.producers))
    assert qkv.prunable, qkv.reason
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 5, 16), _tokens(3, 7, 16))


class _CutAtAnotherTensorsWidth(nn.Module):
    """Partial rotary embeddings' form: ``q[..., :rot]`` and ``q[..., rot:]`` with
    ``rot = cos.shape[-1]`` (GPT-NeoX, Persimmon, Phi); and a cut at half of another tensor's
    width, which nothing ties."""

    def __init__(self, halved: bool):
        super().__init__()
        self.halved = halved
        self.wide, self.narrow, self.head = nn.Linear(8, 12), nn.Linear(8, 4), nn.Linear(12, 3)

    def forward(self, x):
        cut, wide = self.narrow(x), self.wide(x)
        width = cut.shape[-1] // 2 if self.halved else cut.shape[-1]
        first, rest = wide[..., :width], wide[..., width:]
        return self.head(torch.cat([first * cut[..., :first.shape[-1]].sigmoid(), rest], -1))


def test_a_cut_at_another_tensors_width_ties_the_first_channels_to_them():
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(_CutAtAnotherTensorsWidth(False).eval(), example_inputs=_tokens(2, 3))
    groups = find_channel_groups(dag, example_inputs=_tokens(2, 3)).groups
    assert sorted((g.name, g.size) for g in groups if g.prunable) == [("narrow", 4), ("wide", 8)]
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 3), _tokens(3, 5))


def test_a_cut_at_half_another_tensors_width_stays_barred():
    dag = dagprune.build_from_unstructured_module(_CutAtAnotherTensorsWidth(True).eval(), example_inputs=_tokens(2, 3))
    wide = next(g for g in find_channel_groups(dag, example_inputs=_tokens(2, 3)).groups
                if any(v.name == "wide" for v, _ in g.producers))
    assert not wide.prunable and "run-time bounds" in wide.reason


class _OffsetPositions(nn.Embedding):
    def forward(self, positions):
        return nn.functional.embedding(positions + 2, self.weight)


class _LearnedPositions(nn.Module):
    """OPT's positions: an ``nn.Embedding`` subclass whose own forward calls ``F.embedding``."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(30, 8), _OffsetPositions(20, 8)
        self.mlp, self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), nn.Linear(8, 5)

    def forward(self, ids):
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.head(h + self.mlp(h))


def test_positions_looked_up_by_a_functional_embedding_leave_the_residual_stream_prunable():
    # the table read as a parameter was an untracked operand of the sum: the residual stream of
    # OPT and BioGPT was barred (0.635 of their FLOPs removable)
    torch.manual_seed(0)
    ids, other = (torch.randint(0, 30, (2, 6)),), (torch.randint(0, 30, (3, 9)),)
    dag = dagprune.build_from_unstructured_module(_LearnedPositions().eval(), example_inputs=ids)
    stream = next(g for g in find_channel_groups(dag, example_inputs=ids).groups
                  if any(v.name == "tokens" for v, _ in g.producers))
    assert stream.prunable, stream.reason
    _assert_prunes_and_removes_exactly(dag, ids, other)


class _ScaledByRunTimeHeadDim(nn.Module):
    """Attention scaled by the head dim read at run time, the ways custom code and DeBERTa write it."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.q, self.k, self.v, self.o = how, *(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (layer(x).view(batch, length, 2, 8).transpose(1, 2) for layer in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1)
        if self.how == "math.sqrt":
            scores = scores / math.sqrt(q.size(-1))
        elif self.how == "pow":
            scores = scores * q.size(-1) ** -0.5
        else:
            scores = scores / torch.sqrt(torch.tensor(k.size(-1), dtype=torch.float))
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width))


@pytest.mark.parametrize("how", ["math.sqrt", "pow", "torch.tensor"])
def test_a_head_dim_read_at_run_time_as_a_scale_keeps_its_value_and_the_dims_prunable(how):
    # the count reaching a scale barred the query/key dims (DeBERTa-v2: 0.333 of its FLOPs
    # removable); the slim model now holds the original count, as the gated model computes
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(_ScaledByRunTimeHeadDim(how).eval(), example_inputs=_tokens(2, 5, 16))
    query = next(g for g in find_channel_groups(dag, example_inputs=_tokens(2, 5, 16)).groups
                 if any(v.name == "q" for v, _ in g.producers))
    assert query.prunable, query.reason
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 5, 16), _tokens(3, 7, 16))


class _HeadsShapedBySizeTuples(nn.Module):
    """BERT-era heads (GPT-Neo, Megatron-BERT): ``x.size()[:-1] + (heads, dim)`` computed
    before the view, and ``out.size()[:-2] + (width,)`` to merge them back."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def split(self, x):
        return x.view(x.size()[:-1] + (2, 8)).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        out = (((q @ k.transpose(-1, -2)) * 0.35).softmax(-1) @ v).permute(0, 2, 1, 3).contiguous()
        return self.o(out.view(out.size()[:-2] + (16,)))


def test_heads_shaped_by_a_size_tuple_computed_before_the_view_prune_and_the_slim_model_loads(tmp_path):
    # a channel axis sized by such a tuple was barred (GPT-Neo, Megatron-BERT); removal now
    # overrides its entry with the kept count, stored with the view
    torch.manual_seed(0)
    dag = dagprune.build_from_unstructured_module(_HeadsShapedBySizeTuples().eval(), example_inputs=_tokens(2, 5, 16))
    groups = find_channel_groups(dag, example_inputs=_tokens(2, 5, 16)).groups
    assert [g.name for g in groups if g.prunable] == ["q", "v"]
    _assert_prunes_and_removes_exactly(dag, _tokens(2, 5, 16), _tokens(3, 7, 16))
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=_tokens(2, 5, 16))
    gated = pruning.prepare_for_pruning()
    slim = next(assert_removal_matches_gates(pruning, gated, _tokens(2, 5, 16))
                for _ in random_gate_states(pruning, seed=1, count=1))
    assert any(getattr(v.module, "size_overrides", ()) for v in slim.inner_vertices)
    loaded, x = dagprune.load_dag(slim.save(tmp_path / "slim")), _tokens(4, 3, 16)
    assert torch.equal(loaded(*x), slim(*x))


class _BatchAndChannelsMerged(nn.Module):
    def __init__(self, rows: str):
        super().__init__()
        self.rows, self.conv, self.head = rows, nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        rows = -1 if self.rows == "inferred" else h.size(0) * 6  # batch * channels
        rows = h.reshape((rows,) + h.size()[2:])
        rows = rows - rows.mean(dim=(1, 2), keepdim=True)
        return self.head(rows.reshape(h.size()))


def test_a_size_tuple_merging_the_batch_with_channels_is_inferred_or_barred():
    # at batch 1 the merged axis holds the channels alone: a kept count there would fix the
    # batch; a size left to the reshape (-1) follows both
    torch.manual_seed(0)
    for batch in (1, 2):
        x, other = (torch.randn(batch, 3, 4, 4),), (torch.randn(3, 3, 4, 4),)
        dag = dagprune.build_from_unstructured_module(_BatchAndChannelsMerged("batch * 6").eval(), example_inputs=x)
        conv = find_channel_groups(dag, example_inputs=x).groups[0]
        assert conv.name == "conv" and not conv.prunable and "size computed outside" in conv.reason
        dag = dagprune.build_from_unstructured_module(_BatchAndChannelsMerged("inferred").eval(), example_inputs=x)
        _assert_prunes_and_removes_exactly(dag, x, other)


class _TokenPickedPerSequence(nn.Module):
    """CLIP's pooled text: ``h[torch.arange(B), ids.argmax(-1)]``; and the same with the indexed
    axes apart (torch then puts the index's axes first)."""

    def __init__(self, apart: bool):
        super().__init__()
        self.apart, self.embed, self.head = apart, nn.Embedding(30, 8), nn.Linear(8, 3)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.mlp(h)
        if self.apart:
            return self.head(h.transpose(0, 1).unsqueeze(1)[ids.argmax(-1), :, torch.arange(h.shape[0])])
        return self.head(h[torch.arange(h.shape[0]), ids.argmax(-1)])


@pytest.mark.parametrize("apart", [False, True], ids=["adjacent", "apart"])
def test_a_token_picked_per_sequence_by_tensor_indices_keeps_the_stream_prunable(apart):
    # any tensor in an index barred every channel of the indexed tensor (CLIP's text stream)
    torch.manual_seed(0)
    ids, other = (torch.randint(0, 30, (2, 6)),), (torch.randint(0, 30, (3, 4)),)
    dag = dagprune.build_from_unstructured_module(_TokenPickedPerSequence(apart).eval(), example_inputs=ids)
    stream = find_channel_groups(dag, example_inputs=ids).groups[0]
    assert stream.name == "embed" and stream.prunable, stream.reason
    _assert_prunes_and_removes_exactly(dag, ids, other)


def test_channels_picked_by_a_tensor_index_stay_barred():
    class PickedChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.head = nn.Linear(8, 6), nn.Linear(3, 2)
            self.register_buffer("picked", torch.tensor([0, 2, 5]))

        def forward(self, x):
            return self.head(self.up(x)[torch.arange(x.shape[0]), :, self.picked.unsqueeze(-1)].transpose(0, 1))

    x = _tokens(2, 3)
    dag = dagprune.build_from_unstructured_module(PickedChannels().eval(), example_inputs=x)
    up = find_channel_groups(dag, example_inputs=x).groups[0]
    assert up.name == "up" and not up.prunable and "indexed" in up.reason


def test_a_run_time_index_beside_a_run_time_half_still_ties_the_halves():
    # the index's value was filled into the slice's bound too, which then read as a constant cut
    class LastTokenHalves(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.head = nn.Linear(8, 12), nn.Linear(12, 2)

        def forward(self, x):
            h = self.up(x)
            last, before = h[:, x.shape[1] - 1, :h.shape[-1] // 2], h[:, x.shape[1] - 2, h.shape[-1] // 2:]
            return self.head(torch.cat([last, before], -1))

    torch.manual_seed(0)
    x = _tokens(2, 3)
    dag = dagprune.build_from_unstructured_module(LastTokenHalves().eval(), example_inputs=x)
    pruning = ChannelPruning(dag, None, 0.5, 10, example_inputs=x)
    gated = pruning.prepare_for_pruning()
    for _ in random_gate_states(pruning, seed=0, count=6):  # the halves keep different counts
        assert_removal_matches_gates(pruning, gated, x)
