"""Whole-head attention pruning (``head_pruning="heads"``) and its exact removal.

In the default mode (``"dims"``) attention loses the same head dimensions in every head; with
``"heads"`` a gate holds one logit per head and a closed head takes its q, k and v rows, its
share of the output projection's input and, where the model has one, its column of a relative
position bias table with it. Removal must stay exact and the FLOPs must be what the gates
predict, whatever the gate state (the checks of ``test_channel_removal``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dagprune as dp
from dagprune.errors import PruningError
from dagprune_algorithms.pruning import ChannelPruning
from dagprune_algorithms.pruning.channel_groups import find_channel_groups

from test_channel_removal import (TIMM_INPUT, TimmCase, check_random_states, create_timm_model, prepare,
                                  prepare_zoo, set_gate_logits)
from zoo import ZOO, input_shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

HEADS_RANDOM_STATES = 4
SMALL_BEIT = TimmCase("beit_base_patch16_224", (("img_size", 64), ("depth", 2)))


def _head_counts(model: nn.Module) -> dict[str, int]:
    """qualified name of each attention's qkv layer -> its number of heads."""
    return {f"{name}.qkv": module.num_heads for name, module in model.named_modules()
            if hasattr(module, "num_heads") and hasattr(module, "qkv")}


def _head_groups(cfg: ChannelPruning, names) -> dict[str, int]:
    return {group.name: group.size for group in cfg.prunable_groups if group.name in names}


@pytest.mark.parametrize("name", ["attention_block", "attention_block_sdpa", "tiny_vit"])
def test_zoo_attention_loses_whole_heads_exactly(name, tmp_path):
    heads = _head_counts(ZOO[name].factory(seed=0))
    prepared = prepare_zoo(name, head_pruning="heads")
    assert heads and _head_groups(prepared.cfg, heads) == heads  # one logit per head
    check_random_states(prepared, HEADS_RANDOM_STATES, tmp_path, save_load=True)


def test_default_mode_prunes_head_dims():
    heads = _head_counts(ZOO["attention_block"].factory(seed=0))
    prepared = prepare_zoo("attention_block")
    dims = {name: 32 // count for name, count in heads.items()}  # dim 32 split into heads
    assert _head_groups(prepared.cfg, heads) == dims


def test_closing_heads_shrinks_qkv_projection_and_head_count():
    model = ZOO["tiny_vit"].factory(seed=0)
    heads = _head_counts(model)
    prepared = prepare_zoo("tiny_vit", head_pruning="heads")
    logits = [torch.full((group.size,), 3.0) for group in prepared.cfg.prunable_groups]
    for index, group in enumerate(prepared.cfg.prunable_groups):
        if group.name in heads:
            logits[index][0] = -3.0  # close the first head of every attention
    set_gate_logits(prepared.cfg, logits)
    slim = prepared.cfg.remove_channels().eval()
    modules = {vertex.qualified_name: vertex.module for vertex in slim.inner_vertices}
    for name, count in heads.items():
        original = dict(model.named_modules())[name]
        head_dim = original.out_features // 3 // count
        assert modules[name].out_features == 3 * (count - 1) * head_dim
    with torch.no_grad():
        x = torch.randn(2, *input_shapes(ZOO["tiny_vit"])[0])
        assert dp.max_relative_difference(prepared.gated.eval()(x), slim(x)) <= 1e-4


def test_gradient_reaches_every_head_logit():
    prepared = prepare_zoo("attention_block_sdpa", head_pruning="heads")
    prepared.gated.train()
    torch.manual_seed(0)
    x = torch.randn(4, *input_shapes(ZOO["attention_block_sdpa"])[0])
    prepared.gated(x).square().mean().backward()
    for gate, group in zip(prepared.cfg.gates, prepared.cfg.prunable_groups):
        assert gate.logits.grad is not None and bool((gate.logits.grad != 0).all()), group.name


class _SingleHeadAttention(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.num_heads = 1

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, C).permute(2, 0, 3, 1, 4).unbind(0)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def test_single_head_attention_keeps_pruning_dims(tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 8, 16),)
    prepared = prepare(nn.Sequential(nn.Linear(16, 16), _SingleHeadAttention(), nn.Linear(16, 4)),
                       (8, 16), inputs, head_pruning="heads")
    assert _head_groups(prepared.cfg, {"1.qkv"}) == {"1.qkv": 16}
    check_random_states(prepared, 2, tmp_path, save_load=False)


def test_unknown_head_pruning_mode_is_refused():
    dag = dp.build_from_unstructured_module(ZOO["attention_block"].factory(seed=0))
    with pytest.raises(PruningError, match="head_pruning must be one of .*'heads'.*got 'head'"):
        ChannelPruning(dag, input_shapes(ZOO["attention_block"])[0], 0.5, 10, head_pruning="head")
    with pytest.raises(PruningError, match="head_pruning must be one of .*got 'all'"):
        find_channel_groups(dag, input_shapes(ZOO["attention_block"])[0], head_pruning="all")


@pytest.mark.parametrize("case", [TimmCase("vit_tiny_patch16_224", (("img_size", 64), ("depth", 3))), SMALL_BEIT],
                         ids=lambda case: case.name)
def test_timm_heads_are_removed_exactly(case, tmp_path):
    prepared = _timm_heads(case)
    heads = _head_counts(create_timm_model(case))
    found = {group.name: group.size for group in prepared.cfg.prunable_groups if group.size in heads.values()}
    assert len(found) >= len(heads), f"expected a head group per attention ({heads}), found {found}"
    check_random_states(prepared, 2, tmp_path, save_load=False, fixed=("all_closed", "alternating"))


def _timm_heads(case: TimmCase):
    inputs = (torch.randn((2, *TIMM_INPUT), generator=torch.Generator().manual_seed(0)),)
    return prepare(create_timm_model(case), TIMM_INPUT, inputs, head_pruning="heads")


def test_beit_relative_position_table_loses_the_closed_heads():
    prepared = _timm_heads(SMALL_BEIT)
    logits = [torch.full((group.size,), 3.0) for group in prepared.cfg.prunable_groups]
    closed = 0
    for index, group in enumerate(prepared.cfg.prunable_groups):
        if group.size == 12:  # beit_base: 12 heads per block
            logits[index][:5] = -3.0
            closed += 1
    assert closed == 2
    set_gate_logits(prepared.cfg, logits)
    slim = prepared.cfg.remove_channels()
    tables = [p for name, p in slim.named_parameters() if "relative_position_bias_table" in name]
    assert tables and all(table.shape[1] == 7 for table in tables)


def test_beit_residual_width_is_not_tied_to_its_attention():
    """timm's beit shapes the merged heads with the residual stream's run-time width ``C``;
    that size becomes a constant at removal, so the residual stream keeps its own group."""
    model = create_timm_model(SMALL_BEIT)
    dag = dp.build_from_unstructured_module(model)
    for mode in ("dims", "heads"):
        cfg = ChannelPruning(dag, TIMM_INPUT, 0.5, 10, head_pruning=mode)
        cfg.prepare_for_pruning()
        sizes = {group.name: group.size for group in cfg.prunable_groups}
        assert sizes["patch_embed.proj"] == 768, (mode, sizes)


def test_units_of_whole_heads_round_trip_through_a_template():
    from dagprune_algorithms.pruning.mutator import ChannelMutator

    model = ZOO["attention_block"].factory(seed=0)
    heads = _head_counts(model)
    parse = {"type": "ChannelAnalysis", "input_shape": list(input_shapes(ZOO["attention_block"])[0]),
             "head_pruning": "heads"}
    mutator = ChannelMutator(parse_cfg=parse)
    mutator.prepare_from_supernet(dp.build_from_unstructured_module(model))
    widths = {unit.name.split("_(")[0]: unit.num_channels for unit in mutator.mutable_units}
    assert {name: widths[name] for name in heads} == heads
    template = mutator.config_template(with_unit_init_args=True, with_channels=True)
    assert template["parse_cfg"]["head_pruning"] == "heads"
    rebuilt = ChannelMutator.from_config(template)
    rebuilt.prepare_from_supernet(dp.build_from_unstructured_module(model))
    assert rebuilt.choice_template() == mutator.choice_template()
    choices = {name: 0.5 for name in mutator.choice_template()}
    rebuilt.set_choices(choices)
    x = torch.randn(2, *input_shapes(ZOO["attention_block"])[0])
    with torch.no_grad():
        assert dp.max_relative_difference(rebuilt.masked_model.eval()(x), rebuilt.remove_channels().eval()(x)) <= 1e-4
    with pytest.raises(Exception, match="head_pruning"):
        ChannelMutator(parse_cfg={**parse, "head_pruning": "head"})


def test_units_command_lists_whole_head_units(tmp_path, capsys):
    import json

    from test_units import run_command

    model = ZOO["attention_block"].factory(seed=0)
    heads = _head_counts(model)
    saved = dp.build_from_unstructured_module(model).save(tmp_path / "dag")
    size = ["--input-size", *map(str, input_shapes(ZOO["attention_block"])[0])]
    choices = json.loads(run_command([saved, "--choice", "--head-pruning", "heads", *size], capsys))
    widths = {name.split("_(")[0]: int(name.rsplit("_", 1)[1]) for name in choices}
    assert {name: widths[name] for name in heads} == heads
    template = json.loads(run_command([saved, "--head-pruning", "heads", *size], capsys))
    assert template["parse_cfg"]["head_pruning"] == "heads"
