"""Self-test of the test-support models in ``zoo.py`` and ``random_dags.py``.

Every model must run on a batch of 2, give finite outputs, stay small, be
deterministic in its seed, and be exactly reproduced by
``torch.fx.symbolic_trace`` in eval mode.
"""

import pytest
import torch
import torch.fx

from random_dags import BLOCK_KINDS, random_dag_model
from zoo import ZOO, make_example_inputs

RANDOM_DAG_SEEDS = range(20)
MAX_PARAMETERS = 50_000


def _flatten_outputs(output):
    if isinstance(output, torch.Tensor):
        return [output]
    return [tensor for item in output for tensor in _flatten_outputs(item)]


def _check_runs_and_traces(model: torch.nn.Module, inputs) -> None:
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
        for tensor in _flatten_outputs(expected):
            assert tensor.shape[0] == inputs[0].shape[0]
            assert torch.isfinite(tensor).all()
        traced = torch.fx.symbolic_trace(model)
        traced.eval()
        torch.testing.assert_close(traced(*inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_runs_and_traces_exactly(name):
    entry = ZOO[name]
    model = entry.factory()
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMETERS
    assert entry.description
    _check_runs_and_traces(model, make_example_inputs(entry, batch_size=2))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_factory_is_deterministic(name):
    state_a = ZOO[name].factory().state_dict()
    state_b = ZOO[name].factory().state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


@pytest.mark.parametrize("seed", RANDOM_DAG_SEEDS)
def test_random_dag_runs_and_traces_exactly(seed):
    model, input_shape = random_dag_model(seed)
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMETERS
    inputs = (torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(seed)),)
    _check_runs_and_traces(model, inputs)


def test_random_dags_cover_every_block_kind():
    seen = set()
    for seed in RANDOM_DAG_SEEDS:
        seen.update(random_dag_model(seed)[0].plan)
    assert seen == set(BLOCK_KINDS)
