"""Example inputs everywhere a shape is taken: token IDs, masks, keyword inputs, fixed flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dagprune
from dagprune.errors import ConversionError, DagpruneError, PruningError
from gate_states import assert_removal_matches_gates, random_gate_states
from dagprune_algorithms.pruning import (ChannelPruning, compute_flops, compute_normalized_flops,
                                         find_channel_groups)


class _TokenModel(nn.Module):
    """Token IDs and a boolean mask in, a dict out; a flag and a scale fixed by the example."""

    def __init__(self, vocabulary: int = 40, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocabulary)

    def forward(self, input_ids, attention_mask=None, scale: float = 1.0, return_dict: bool = False):
        hidden = self.embed(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1)
        hidden = hidden + self.down(torch.relu(self.up(hidden))) * scale
        logits = self.head(self.norm(hidden))
        return {"logits": logits} if return_dict else logits


def _inputs(batch: int = 2, length: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, -2:] = False
    return {"input_ids": torch.randint(0, 40, (batch, length), generator=generator),
            "attention_mask": mask, "return_dict": True}


def _converted():
    model = _TokenModel().eval()
    return model, dagprune.build_from_unstructured_module(model, example_inputs=_inputs())


def test_keyword_token_inputs_convert_exactly_and_fixed_arguments_leave_the_inputs():
    model, dag = _converted()
    assert [(v.name, v.fixed) for v in dag.inputs] == [
        ("input_ids", False), ("attention_mask", False), ("scale", True), ("return_dict", True)]
    tensors = {k: v for k, v in _inputs(3, 5, seed=1).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        expected, actual = model(**tensors, return_dict=True), dag(**tensors)
    assert isinstance(actual, dict) and torch.equal(expected["logits"], actual["logits"])
    assert dagprune.compare_module_outputs(model, dag, example_inputs=_inputs(1, 4, seed=2)) == 0.0
    with pytest.raises(TypeError, match="converted with return_dict=True fixed, got False"):
        dag(**tensors, return_dict=False)


def test_flops_shapes_and_kmapp_take_example_inputs():
    _, dag = _converted()
    inputs = _inputs(batch=2)
    report = dagprune.count_flops(dag, example_inputs=inputs)
    tokens, dim = 2 * 6, 16
    assert report.total == 2 * tokens * (dim * 2 * dim * 2 + dim * 40)  # up, down, head
    assert compute_flops(dag, example_inputs=inputs) == report.total // 2  # per sample
    assert compute_normalized_flops(dag, example_inputs=inputs) == report.total / 2 / 1000
    shapes = dagprune.propagate_shapes(dag, example_inputs=inputs)
    assert shapes[dag.output_vertices[0]] == torch.Size([2, 6, 40])


def test_residual_stream_from_a_token_embedding_prunes_exactly():
    _, dag = _converted()
    inputs = _inputs()
    analysis = find_channel_groups(dag, example_inputs=inputs)
    assert {(g.name, g.size, g.prunable) for g in analysis.groups} >= {("embed", 16, True), ("up", 32, True)}
    config = ChannelPruning(dag, None, pruning_proportion=0.5, num_training_steps=1, example_inputs=inputs)
    gated = config.prepare_for_pruning().eval()
    for _ in random_gate_states(config, seed=3):
        assert_removal_matches_gates(config, gated, inputs)


def test_a_dag_with_keyword_inputs_saves_and_loads(tmp_path):
    _, dag = _converted()
    tensors = {k: v for k, v in _inputs().items() if isinstance(v, torch.Tensor)}
    dag.save(tmp_path / "dag")
    loaded = dagprune.load_dag(tmp_path / "dag")
    with torch.no_grad():
        assert torch.equal(dag(**tensors)["logits"], loaded(**tensors)["logits"])
        assert torch.equal(dag(**tensors)["logits"], loaded(**tensors, return_dict=True)["logits"])
    assert [(v.name, v.fixed, v.default) for v in loaded.inputs][2:] == [("scale", True, 1.0),
                                                                         ("return_dict", True, True)]
    with pytest.raises(TypeError, match="fixed"):
        loaded(**tensors, return_dict=False)


def test_normalized_flops_with_one_shape_per_input():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, image, bias):
            return self.conv(image) + bias

    dag = dagprune.build_from_unstructured_module(TwoInputs())
    assert compute_normalized_flops(dag, [(3, 10, 10), (8, 1, 1)]) == pytest.approx(0.048)


@pytest.mark.parametrize("example_inputs, error, match", [
    ({"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.zeros(1)}, ConversionError,
     r"name \['labels'\], which _TokenModel.forward\(input_ids, attention_mask, scale, return_dict\)"),
    ({"attention_mask": torch.ones(1, 3)}, ConversionError, "no value for 'input_ids'"),
    ("tokens", DagpruneError, "must be a tensor, a tuple"),
    ({"input_ids": [1, 2]}, DagpruneError, "hold no tensor"),
])
def test_bad_example_inputs_say_what_is_wrong(example_inputs, error, match):
    with pytest.raises(error, match=match):
        dagprune.build_from_unstructured_module(_TokenModel(), example_inputs=example_inputs)


def test_passes_without_shape_or_example_inputs_say_what_to_give():
    _, dag = _converted()
    with pytest.raises(DagpruneError, match="input_shape_without_batch .* or example_inputs"):
        dagprune.count_flops(dag)
    with pytest.raises(PruningError, match="example_inputs="):
        ChannelPruning(dag, None, pruning_proportion=0.5, num_training_steps=1)


def test_float16_images_keep_their_dtype_as_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).to(torch.float64)
    image = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    dag = dagprune.build_from_unstructured_module(model, example_inputs=(image,))
    analysis = find_channel_groups(dag, example_inputs=image)
    assert analysis.example_inputs.args[0].dtype == torch.float64
    assert [g.prunable for g in analysis.groups] == [True, False]


def test_units_and_iterative_pruning_take_example_inputs():
    from dagprune_algorithms.pruning import ChannelMutator, ItePruneAlgorithm

    model, _ = _converted()
    inputs = _inputs()
    mutator = ChannelMutator(parse_cfg={"type": "ChannelAnalysis"})
    mutator.prepare_from_supernet(model, example_inputs=inputs)
    assert {unit.name: unit.num_channels for unit in mutator.mutable_units} == {
        "down_(0, 16)_16": 16, "up_(0, 32)_32": 32}  # the residual unit is named by its last producer
    algorithm = ItePruneAlgorithm(model, target_pruning_ratio=0.5, prune_times=1, example_inputs=inputs)
    assert algorithm.mutator.flops_proportion() == pytest.approx(1.0)


def test_inputs_that_do_not_fit_the_model_name_the_vertex_and_the_fix():
    dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)))
    with pytest.raises(dagprune.errors.ExecutionError,
                       match=r"vertex '_0' \(0\) failed on \(float32\[1, 5, 8, 8\]\).*input shape"):
        ChannelPruning(dag, (5, 8, 8), pruning_proportion=0.5, num_training_steps=1).prepare_for_pruning()
    with pytest.raises(DagpruneError, match="must be positive ints"):
        dagprune.count_flops(dag, (3, -1, 8))
