"""prunable_proportion against torch-dag's own table, and the honest max_removable_proportion.

torch-dag's ``prunable_proportion`` is the share of FLOPs in ops that a gate touches on their
input or output side (its table, timm 0.9.5, default input size, batch 1). Ours must be at
least theirs (within ``TABLE_SLACK``) on every model they list, and work where they fail
(densenet121). ``max_removable_proportion`` (the FLOPs share that vanishes when every group is
cut to its minimum) must exceed ``MIN_MAX_REMOVABLE`` on all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import pytest
import torch

import dagprune as dp
from dagprune_algorithms.pruning import ChannelPruning

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

TABLE_SLACK = 0.01
MIN_MAX_REMOVABLE = 0.9


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One model of torch-dag's table.

    Attributes:
        torch_dag: torch-dag's prunable_proportion; None where torch-dag fails on the model.
        slow: only with ``-m slow`` (the default-suite models take < 5 s each on 2 cores).
    """

    torch_dag: Optional[float]
    slow: bool = False


TORCH_DAG_TABLE: Dict[str, TableRow] = {
    "resnet18": TableRow(0.9996),
    "mobilenetv2_100": TableRow(0.9953),
    "mobilenetv3_large_100": TableRow(0.9944),
    "efficientnet_b0": TableRow(0.9963),
    "regnety_004": TableRow(0.5934),  # torch-dag stops at SE/grouped convs; ours goes through
    "deit_tiny_patch16_224": TableRow(0.9038),  # torch-dag leaves the residual width alone
    "repvit_m1": TableRow(0.9982),
    "resnet50": TableRow(0.9992, slow=True),
    "convnext_tiny": TableRow(0.9305, slow=True),
    "vit_small_patch16_224": TableRow(0.9096, slow=True),
    "fbnetv3_g": TableRow(0.9985, slow=True),
    "densenet121": TableRow(None, slow=True),  # torch-dag: shape error when a group is emptied
}
"""timm model name -> torch-dag's prunable_proportion."""


def _prepared(name: str, **kwargs):
    """``(model, default input size without batch)``, seeded; the global RNG is left alone."""
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    input_size = tuple(model.pretrained_cfg["input_size"]) if not kwargs else None
    return model, input_size


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if row.slow else [])
                                  for name, row in TORCH_DAG_TABLE.items()])
def test_prunable_proportion_at_least_torch_dags(name):
    model, input_size = _prepared(name)
    cfg = ChannelPruning(dp.build_from_unstructured_module(model), input_size, 0.5, 100)
    cfg.prepare_for_pruning()  # batch 1 at the model's default input size
    theirs = TORCH_DAG_TABLE[name].torch_dag
    ours, removable = cfg.prunable_proportion, cfg.max_removable_proportion
    if theirs is not None:
        assert ours >= theirs - TABLE_SLACK, f"{name}: prunable_proportion {ours:.4f} < torch-dag {theirs}"
    assert 0.0 <= removable <= ours <= 1.0
    assert removable > MIN_MAX_REMOVABLE, f"{name}: max_removable_proportion {removable:.4f}"


def test_vit_residual_width_is_one_prunable_group_over_all_blocks():
    model, _ = _prepared("vit_tiny_patch16_224", img_size=64)
    cfg = ChannelPruning(dp.build_from_unstructured_module(model), (3, 64, 64), 0.5, 100)
    cfg.prepare_for_pruning()
    producers = {group.index: {vertex.qualified_name or vertex.name for vertex, _ in group.producers}
                 for group in cfg.channel_groups}
    (residual,) = [group for group in cfg.channel_groups if "patch_embed.proj" in producers[group.index]]
    assert residual.prunable, residual.reason
    assert residual.size == model.embed_dim
    depth = len(model.blocks)
    for block in range(depth):
        assert f"blocks.{block}.mlp.fc2" in producers[residual.index]
        assert f"blocks.{block}.attn.proj" in producers[residual.index]
    assert cfg.prunable_proportion >= 0.99
