"""Random gate states for removal tests: each state is checked the same way everywhere."""

from __future__ import annotations

import pytest
import torch

import dagprune


def random_gate_states(config, seed: int, count: int = 3):
    """Sets ``count`` random logit states on ``config``'s gates in turn, yielding after each."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        for gate in config.gates:
            gate.logits.data = torch.randn(gate.logits.shape, generator=generator)
        yield


def assert_removal_matches_gates(config, gated, inputs):
    """The slim model computes what the gated eval model computes on ``inputs`` (a tuple of
    positional tensors or a dict of keyword tensors), with the FLOPs the gates predict for the
    analysed inputs. Returns the slim model."""
    slim = config.remove_channels().eval()
    call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(*inputs))
    with torch.no_grad():
        assert dagprune.max_relative_difference(call(gated.eval()), call(slim)) <= 1e-4
    analysis = config.analysis
    measured = dagprune.count_flops(slim, example_inputs=analysis.example_inputs).total
    assert measured / analysis.total_flops == pytest.approx(config.current_hard_proportion(), abs=1e-9)
    return slim


def slim_models_matching_gates(config, gated, example, others=(), seed: int = 0, count: int = 3) -> list:
    """For ``count`` random gate states (:func:`random_gate_states`): the slim model matches the
    gated eval model on ``example`` (:func:`assert_removal_matches_gates`) and on each input of
    ``others`` (tuples of positional tensors, at sizes other than the example's). Returns the
    slim models."""
    slims = []
    for _ in random_gate_states(config, seed=seed, count=count):
        slim = assert_removal_matches_gates(config, gated, example)
        with torch.no_grad():
            for inputs in others:
                assert dagprune.max_relative_difference(gated.eval()(*inputs), slim(*inputs)) <= 1e-4
        slims.append(slim)
    return slims
