"""Analysis passes that look at one vertex at a time stream the values
(``DagModule.iter_vertex_values``, ``dagprune.shape_prop.stream_values``): the same values as
``forward_with_all_values``, each dropped once its last reader has run, so a channel analysis
holds about one forward's activations instead of every one."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import dagprune
from dagprune.errors import ExecutionError
from dagprune.shape_prop import analysis_mode, propagate_values, stream_values
from dagprune_algorithms.pruning.channel_groups import find_channel_groups


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


def test_streamed_values_equal_all_values_in_vertex_order():
    dag = dagprune.build_from_unstructured_module(_Residual())
    x = torch.randn(2, 3, 8, 8)
    expected = propagate_values(dag, (x,))
    with analysis_mode(dag):
        streamed = [(vertex, value) for vertex, _, value in stream_values(dag, (x,))]
    assert [vertex for vertex, _ in streamed] == dag.vertices
    for vertex, value in streamed:
        assert torch.equal(value, expected[vertex]), vertex.name


def test_a_value_is_dropped_once_its_last_reader_has_run():
    dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.ReLU()))
    first = dag.inner_vertices[0]
    alive_when_reached = {}
    reference = None
    with analysis_mode(dag):
        for vertex, _, value in stream_values(dag, (torch.randn(3, 5),)):
            gc.collect()
            if reference is not None:
                alive_when_reached[vertex.name] = reference() is not None
            if vertex is first:
                reference = weakref.ref(value)
            del value
    second, third = dag.inner_vertices[1].name, dag.inner_vertices[2].name
    assert alive_when_reached[second]  # its reader is still to run
    assert not alive_when_reached[third]  # read only by the second vertex: dropped after it


def test_channel_analysis_keeps_no_activation_alive():
    dag = dagprune.build_from_unstructured_module(_Residual())
    values = []
    original = dag.iter_vertex_values

    def recording(*args, **kwargs):
        for vertex, inputs, value in original(*args, **kwargs):
            if vertex in dag.inner_vertices:
                values.append(weakref.ref(value))
            yield vertex, inputs, value

    dag.iter_vertex_values = recording
    analysis = find_channel_groups(dag, (3, 8, 8))
    gc.collect()
    assert analysis.groups and values
    assert all(reference() is None for reference in values[:-1])  # only the output may be held


def test_a_failing_vertex_is_named_in_the_stream():
    dag = dagprune.build_from_unstructured_module(nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2)))
    with pytest.raises(ExecutionError, match=r"vertex '_1' \(1\) failed on \(float32\[2, 3\]\)"):
        with analysis_mode(dag):
            list(stream_values(dag, (torch.randn(2, 4),)))
