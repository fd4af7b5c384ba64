"""fold_batch_norms: every batch norm reading a conv read by nothing else folds into it, and the
folded DAG computes what the eval-mode DAG computes, pruned or not."""

import pytest
import torch
from torch import nn

import dagprune
from dagprune_algorithms.pruning import ChannelPruning

from informative_weights import make_weights_informative


class _Branches(nn.Module):
    """Foldable pairs (2d affine, 1d without affine), a conv read twice (its norm stays) and a
    norm on a sum (stays)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.bn_sum = nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv1d(8, 6, 1), nn.BatchNorm1d(6, affine=False)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        y = self.bn2(y) + y  # conv2 has two readers
        z = self.bn_sum(x + y)
        return self.bn3(self.conv3(z.flatten(2)))


def _norm_kinds(dag):
    return sorted(v.qualified_name for v in dag.inner_vertices if isinstance(v.module, nn.modules.batchnorm._BatchNorm))


def test_folds_exactly_where_a_norm_alone_reads_a_conv():
    model = make_weights_informative(_Branches()).eval()
    dag = dagprune.build_from_unstructured_module(model).train()
    folded = dagprune.fold_batch_norms(dag)
    assert dag.training and not folded.training  # the original is left as it is
    assert _norm_kinds(dag) == ["bn1", "bn2", "bn3", "bn_sum"]
    assert _norm_kinds(folded) == ["bn2", "bn_sum"]
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        assert dagprune.max_relative_difference(dag.eval()(x), folded(x)) <= 1e-5


def test_a_pruned_timm_model_folds_and_saves(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = make_weights_informative(timm.create_model("mobilenetv2_050", pretrained=False))
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model.eval()), (3, 32, 32), 0.5, 10)
    pruning.prepare_for_pruning()
    for gate in pruning.gates:
        gate.logits.data = torch.randn_like(gate.logits)
    slim = pruning.remove_channels().eval()
    folded = dagprune.fold_batch_norms(slim)
    assert not _norm_kinds(folded)
    x = torch.randn(2, 3, 32, 32)
    loaded = dagprune.load_dag(dagprune.save_dag(folded, tmp_path / "folded")).eval()
    with torch.no_grad():
        assert dagprune.max_relative_difference(slim(x), folded(x)) <= 1e-5
        assert torch.equal(folded(x), loaded(x))
