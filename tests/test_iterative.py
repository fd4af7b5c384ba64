"""Iterative pruning (mmrazor's ItePruneAlgorithm) and ``dagprune prune --method l1``.

Pinned down here:

* the schedule: prunes at step 0 and every ``step_epoch`` steps, ``prune_times`` in all, the
  kept share falling linearly to the target (float or per-unit dict, ratio or number mode);
* exact resume: masks and the prune count live in ``algorithm.state_dict()``, so a run stopped
  and resumed from a checkpoint (model, optimizer and algorithm state) ends bit-identical to
  an uninterrupted one, also through ``run_iterative_l1``'s checkpoints;
* exact export: after masked training, the removed model equals the masked model (zoo models
  and timm models), and the uniform ratio meets the FLOPs target within 0.02;
* importance "taylor" by name: each prune keeps the channels with the largest |sum(weight x
  gradient)| averaged over the training steps since the previous prune (not the L1 ranking),
  the prune due at step 0 waits for one training step, and the scores resume exactly;
* the library's plan (plain arguments) and loop (:func:`prune_iteratively` around the caller's
  training step) give the same slim model as the app's checkpointed ``--method l1`` loop;
* the schedule of ``dagprune prune --method l1`` (defaults, and errors naming the flags).
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dagprune as dp
from dagprune.errors import PruningError
from dagprune_algorithms.pruning import ChannelMutator, ChannelUnitError, ItePruneAlgorithm
from dagprune_algorithms.app.iterative_job import iterative_schedule, plan_from_arguments, run_iterative_l1
from dagprune_algorithms.app.training import batch_indices
from dagprune_algorithms.pruning.iterative import (FLOPS_TARGET_TOLERANCE, choices_for_flops_target,
                                                   plan_iterative_pruning, prune_iteratively)

from zoo import ZOO, input_shapes, make_example_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ------------------------------------------------------------------------------- named data
REMOVAL_TOLERANCE = 1e-4
"""``max_relative_difference(masked(x), slim(x))`` bound after masked training (eval mode)."""

TIMM_MODELS = ["test_resnet", "mobilenetv3_small_050"]
"""timm models trained and exported here (small; 32x32 inputs)."""

SLOW_TIMM_MODELS = ["resnet34", "efficientnet_b0", "convnext_atto", "regnetx_002"]
"""More timm models for ``-m slow``."""

TIMM_INPUT = (3, 32, 32)


# ------------------------------------------------------------------------------- helpers
def zoo_dag(name: str) -> dp.DagModule:
    return dp.build_from_unstructured_module(ZOO[name].factory(seed=0).eval())


def zoo_shape(name: str):
    shapes = input_shapes(ZOO[name])
    return shapes[0] if len(shapes) == 1 else shapes


def train_a_step(algorithm: ItePruneAlgorithm, optimizer, inputs) -> None:
    output = algorithm(*inputs)
    outputs = output if isinstance(output, tuple) else (output,)
    loss = sum(o.float().square().mean() for o in outputs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def step_inputs(name: str, step: int):
    return make_example_inputs(ZOO[name], batch_size=4, seed=1000 + step)


def empties_a_tensor(mutator: ChannelMutator) -> bool:
    from dagprune_algorithms.pruning.channel_groups import iter_layout_atoms

    keep = mutator.kept_classes()
    return any(len(c) and not keep[c].any() for v in mutator.analysis.dag.inner_vertices
               for c in iter_layout_atoms(mutator.analysis.layouts[v]))


def check_export(algorithm: ItePruneAlgorithm, inputs) -> dp.DagModule:
    algorithm.eval()
    slim = algorithm.remove_channels().eval()
    with torch.no_grad():
        difference = dp.max_relative_difference(algorithm(*inputs), slim(*inputs))
    assert difference <= REMOVAL_TOLERANCE, f"slim differs from the masked model by {difference:.3g}"
    return slim


# ------------------------------------------------------------------------------- schedule
def test_schedule_prunes_at_step_0_and_every_step_epoch_down_to_the_target():
    algorithm = ItePruneAlgorithm(zoo_dag("plain_mean_pool"), target_pruning_ratio=0.5, step_epoch=3,
                                  prune_times=4, input_shape=(3, 16, 16))
    assert algorithm.prune_steps == [0, 3, 6, 9]
    widths = {unit.name: unit.num_channels for unit in algorithm.mutator.mutable_units}
    assert widths == {"conv1_(0, 8)_8": 8, "conv2_(0, 16)_16": 16, "conv3_(0, 16)_16": 16, "fc1_(0, 12)_12": 12}
    kept_share = 1.0
    for step in range(14):
        pruned = algorithm.maybe_prune(step)
        assert pruned == (step in (0, 3, 6, 9))
        if pruned:
            kept_share = 1 - 0.5 * (step // 3 + 1) / 4  # 0.875, 0.75, 0.625, 0.5
        expected = {name: np.floor(kept_share * width + 0.5) / width for name, width in widths.items()}
        assert algorithm.mutator.current_choices == expected, f"step {step}"
    assert algorithm.done and int(algorithm.prunes_done) == 4


def test_per_unit_targets_in_number_mode():
    mutator = ChannelMutator({"default_args": {"choice_mode": "number"}}, {"input_shape": [3, 16, 16]})
    algorithm = ItePruneAlgorithm(zoo_dag("plain_mean_pool"), mutator, step_epoch=1, prune_times=3,
                                  target_pruning_ratio={"conv2_(0, 16)_16": 4, "fc1_(0, 12)_12": 12})
    seen = []
    for step in range(4):
        algorithm.maybe_prune(step)
        seen.append(algorithm.mutator.current_choices)
    # 16 -> 4 in three prunes: 12, 8, 4; units not named are not pruned
    assert [c["conv2_(0, 16)_16"] for c in seen] == [12, 8, 4, 4]
    assert all(c["fc1_(0, 12)_12"] == 12 and c["conv1_(0, 8)_8"] == 8 for c in seen)
    assert algorithm.scheduled_choices(1) == {"conv2_(0, 16)_16": 8, "fc1_(0, 12)_12": 12}


def test_a_late_call_applies_the_latest_prune_due_and_repeats_do_nothing():
    algorithm = ItePruneAlgorithm(zoo_dag("plain_mean_pool"), target_pruning_ratio=0.25, step_epoch=2,
                                  prune_times=3, input_shape=(3, 16, 16))
    assert algorithm.maybe_prune(5)  # prunes 0, 1 and 2 were due: the model goes to prune 2's state
    assert int(algorithm.prunes_done) == 3
    assert algorithm.mutator.current_choices["conv2_(0, 16)_16"] == 4 / 16
    assert not algorithm.maybe_prune(5) and not algorithm.maybe_prune(6)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"target_pruning_ratio": None}, PruningError, "target_pruning_ratio is required"),
    ({"target_pruning_ratio": {"conv2_(0, 16)_17": 0.5}}, ChannelUnitError, r"closest: 'conv2_\(0, 16\)_16'"),
    ({"target_pruning_ratio": 1.5}, ChannelUnitError, r"out of range.*\(0, 1\]"),
    ({"target_pruning_ratio": {"fc2_(0, 10)_10": 0.5}}, ChannelUnitError, "cannot be pruned"),
    ({"target_pruning_ratio": 0.5, "step_epoch": 0}, PruningError, "step_epoch must be a positive int"),
    ({"target_pruning_ratio": 0.5, "prune_times": 1.5}, PruningError, "prune_times must be a positive int"),
])
def test_bad_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        ItePruneAlgorithm(zoo_dag("plain_mean_pool"), input_shape=(3, 16, 16), **kwargs)


# ------------------------------------------------------------------------------- taylor
def taylor_case_algorithm(step_epoch: int) -> ItePruneAlgorithm:
    """conv(3->8) conv(8->4) pool linear; unit '0_(0, 8)_8' prunes 8 -> 5 -> 2 channels.

    conv0's filter i has L1 norm growing with i, but conv1 reads channels 4..7 through tiny
    weights, so their gradients (and Taylor scores) are small: the two rankings differ.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.rand(8, 3, 1, 1) * 0.1 + torch.arange(1.0, 9.0).view(8, 1, 1, 1))
        model[1].weight[:, 4:] *= 0.01
    mutator = ChannelMutator({"default_args": {"importance": "taylor"}}, {"input_shape": [3, 6, 6]})
    return ItePruneAlgorithm(dp.build_from_unstructured_module(model), mutator,
                             target_pruning_ratio={"0_(0, 8)_8": 0.25}, step_epoch=step_epoch, prune_times=2)


def taylor_training_step(algorithm: ItePruneAlgorithm, optimizer, step: int) -> torch.Tensor:
    """One step; returns |sum(weight x gradient)| of conv0's filters, computed here from .grad."""
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 2, (4,), generator=generator)
    loss = torch.nn.functional.cross_entropy(algorithm(x), y)
    optimizer.zero_grad()
    loss.backward()
    conv = algorithm.mutator.dag.vertex("_0").module
    scores = (conv.weight * conv.weight.grad).sum(dim=(1, 2, 3)).abs().detach()
    optimizer.step()
    return scores


def top(scores: torch.Tensor, count: int) -> set[int]:
    return set(torch.argsort(scores, descending=True, stable=True)[:count].tolist())


def test_taylor_by_name_keeps_the_largest_weight_times_gradient_averaged_between_prunes():
    algorithm = taylor_case_algorithm(step_epoch=3)
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.05)
    mask = algorithm.mutator.unit("0_(0, 8)_8").mask
    conv_weight = algorithm.mutator.dag.vertex("_0").module.weight.detach()
    l1_ranking = top(conv_weight.abs().flatten(1).sum(1), 5)
    assert l1_ranking == {3, 4, 5, 6, 7}

    assert not algorithm.maybe_prune(0)  # due, but no gradients yet: waits
    assert mask.tolist() == [1.0] * 8
    step0 = taylor_training_step(algorithm, optimizer, 0)
    assert algorithm.maybe_prune(1)  # prune 1 of 2: 5 channels, ranked by step 0's gradients
    kept = set(np.flatnonzero(mask.numpy()).tolist())
    assert kept == top(step0, 5) and kept != l1_ranking

    step1 = taylor_training_step(algorithm, optimizer, 1)
    step2 = taylor_training_step(algorithm, optimizer, 2)
    assert step1[mask == 0].abs().max() == 0  # pruned channels get no gradient through the mask
    assert algorithm.maybe_prune(3)  # prune 2 of 2: 2 channels, mean of steps 1 and 2 (after the reset)
    assert set(np.flatnonzero(mask.numpy()).tolist()) == top((step1 + step2) / 2, 2)
    assert algorithm.done

    passes = algorithm.taylor_scores.backward_passes.clone()
    taylor_training_step(algorithm, optimizer, 3)
    assert torch.equal(algorithm.taylor_scores.backward_passes, passes)  # no accumulating once done


def test_taylor_scores_are_in_the_state_dict_and_resume_exactly():
    first = taylor_case_algorithm(step_epoch=3)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.05)
    for step in range(3):
        first.maybe_prune(step)
        taylor_training_step(first, optimizer, step)
    state = checkpoint(first, optimizer)
    assert any(key.startswith("taylor_scores.score_sum_") for key in state["algorithm"])
    resumed = taylor_case_algorithm(step_epoch=3)
    resumed.load_state_dict(state["algorithm"])
    assert first.maybe_prune(3) and resumed.maybe_prune(3)  # ranked by the scores of steps 1 and 2
    assert torch.equal(first.mutator.unit("0_(0, 8)_8").mask, resumed.mutator.unit("0_(0, 8)_8").mask)
    assert int(resumed.mutator.unit("0_(0, 8)_8").mask.sum()) == 2


# ------------------------------------------------------------------------------- resume
def run_plain_loop(name, start, stop, algorithm=None, optimizer=None, state=None):
    """Steps ``start..stop-1`` of a plain loop: maybe_prune, forward, backward, SGD step."""
    if algorithm is None:
        algorithm = ItePruneAlgorithm(zoo_dag(name), target_pruning_ratio=0.5, step_epoch=2, prune_times=3,
                                      input_shape=zoo_shape(name))
        optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.05, momentum=0.9)
        if state is not None:
            algorithm.load_state_dict(state["algorithm"])
            optimizer.load_state_dict(state["optimizer"])
    algorithm.train()
    for step in range(start, stop):
        algorithm.maybe_prune(step)
        train_a_step(algorithm, optimizer, step_inputs(name, step))
    return algorithm, optimizer


def checkpoint(algorithm, optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save({"algorithm": algorithm.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("stop_at", [3, 4])  # between two prunes, and at a prune step
def test_a_resumed_run_continues_exactly(stop_at):
    name = "resnet_basic_blocks"
    continuous, _ = run_plain_loop(name, 0, 8)
    first, optimizer = run_plain_loop(name, 0, stop_at)
    state = checkpoint(first, optimizer)
    assert any(key.endswith(".mask") for key in state["algorithm"]) and "prunes_done" in state["algorithm"]
    resumed, _ = run_plain_loop(name, stop_at, 8, state=state)
    expected, actual = continuous.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed.mutator.current_choices == continuous.mutator.current_choices


# ------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", sorted(ZOO))
def test_export_after_masked_training_equals_the_masked_model(name):
    algorithm = ItePruneAlgorithm(zoo_dag(name), target_pruning_ratio=0.4, step_epoch=1, prune_times=2,
                                  input_shape=zoo_shape(name))
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.01)
    for step in range(3):
        algorithm.maybe_prune(step)
        train_a_step(algorithm, optimizer, step_inputs(name, step))
    if empties_a_tensor(algorithm.mutator):  # a unit spread over tensors kept channels in one only
        with pytest.raises(ChannelUnitError, match="without channels"):
            algorithm.remove_channels()
        return
    check_export(algorithm, make_example_inputs(ZOO[name], batch_size=2))


def export_timm(model_name: str):
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, num_classes=10).eval()
    algorithm = ItePruneAlgorithm(dp.build_from_unstructured_module(model), target_pruning_ratio=0.5,
                                  step_epoch=1, prune_times=2, input_shape=TIMM_INPUT)
    optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        algorithm.maybe_prune(step)
        train_a_step(algorithm, optimizer, (torch.randn(4, *TIMM_INPUT, generator=generator),))
    slim = check_export(algorithm, (torch.randn(2, *TIMM_INPUT, generator=generator),))
    flops = dp.count_flops(slim, TIMM_INPUT).total / dp.count_flops(algorithm.mutator.dag, TIMM_INPUT).total
    assert flops == pytest.approx(algorithm.mutator.flops_proportion(), abs=1e-6)
    assert flops < 0.9


@pytest.mark.parametrize("model_name", TIMM_MODELS)
def test_export_of_timm_models_equals_the_masked_model(model_name):
    export_timm(model_name)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", SLOW_TIMM_MODELS)
def test_export_of_more_timm_models_equals_the_masked_model(model_name):
    export_timm(model_name)


# ------------------------------------------------------------------------------- FLOPs target
@pytest.mark.parametrize("name", ["resnet_basic_blocks", "densenet_concat"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_choices_meet_the_flops_target(name, target):
    mutator = ChannelMutator(parse_cfg={"input_shape": [3, 16, 16]})
    mutator.prepare_from_supernet(zoo_dag(name))
    choices, proportion = choices_for_flops_target(mutator, target)
    assert abs(proportion - target) <= FLOPS_TARGET_TOLERANCE
    assert choices.keys() == mutator.choice_template().keys()
    assert max(choices.values()) - min(choices.values()) <= 0.5  # near-uniform
    mutator.set_choices(choices)
    assert mutator.flops_proportion() == pytest.approx(proportion)


def test_a_large_model_gets_one_uniform_ratio():
    timm = pytest.importorskip("timm")
    mutator = ChannelMutator(parse_cfg={"input_shape": list(TIMM_INPUT)})
    mutator.prepare_from_supernet(dp.build_from_unstructured_module(timm.create_model("test_resnet")))
    choices, proportion = choices_for_flops_target(mutator, 0.5)
    assert len(set(choices.values())) == 1 and abs(proportion - 0.5) <= FLOPS_TARGET_TOLERANCE


def test_an_unreachable_flops_target_says_the_lowest_reachable():
    mutator = ChannelMutator({"default_args": {"divisor": 8}}, {"input_shape": [3, 16, 16]})
    mutator.prepare_from_supernet(zoo_dag("resnet_basic_blocks"))
    with pytest.raises(PruningError, match="cannot be reached.*choose a target >="):
        choices_for_flops_target(mutator, 0.05)


# ------------------------------------------------------------------------------- the prune job
@pytest.mark.parametrize("steps, prune_times, step_epoch, importance, message", [
    (10, 0, None, "l1", "--prune-times must be an int >= 1, got 0"),
    (10, None, 0, "l1", "--step-epoch must be an int >= 1, got 0"),
    (10, 4, 4, "l1", "puts the last prune at step 12, but the run has --steps 10"),
    (3, 4, None, "l1", "puts the last prune at step 3"),
    (1, None, None, "taylor", "needs --steps >= 2"),
])
def test_schedule_errors_name_the_flags(steps, prune_times, step_epoch, importance, message):
    with pytest.raises(PruningError, match=message):
        iterative_schedule(steps, prune_times, step_epoch, importance)


@pytest.mark.parametrize("ratio", [0.5, {"conv2_(0, 16)_16": 0.25, "fc1_(0, 12)_12": 0.5}])
def test_a_target_pruning_ratio_replaces_the_flops_target(ratio):
    plan = plan_iterative_pruning(zoo_dag("plain_mean_pool"), (3, 16, 16), prune_times=3, step_epoch=4,
                                  target_pruning_ratio=ratio)
    expected = ratio if isinstance(ratio, dict) else {name: ratio for name in plan.mutator.choice_template()}
    assert plan.target_pruning_ratio == expected
    plan.mutator.set_choices(expected)
    assert plan.predicted_flops_proportion == pytest.approx(plan.mutator.flops_proportion())


def test_an_unknown_unit_in_the_target_pruning_ratio_lists_the_closest():
    args = l1_arguments(target=None, target_pruning_ratio={"conv2_(0, 16)_61": 0.5})
    with pytest.raises(ChannelUnitError, match=r"--target-pruning-ratio .*unknown unit 'conv2_\(0, 16\)_61'; "
                                               r"closest: 'conv2_\(0, 16\)_16'"):
        plan_from_arguments(zoo_dag("plain_mean_pool"), (3, 16, 16), args)


def test_the_plan_takes_one_of_a_flops_target_and_unit_ratios():
    for target, ratio in ((None, None), (0.5, 0.5)):
        with pytest.raises(PruningError, match="give one of target .* and target_pruning_ratio"):
            plan_iterative_pruning(zoo_dag("plain_mean_pool"), (3, 16, 16), prune_times=2, step_epoch=1,
                                   target=target, target_pruning_ratio=ratio)


def test_the_arguments_plan_is_the_plain_arguments_plan():
    args = l1_arguments(importance="taylor", head_pruning="heads")
    from_arguments = plan_from_arguments(zoo_dag("plain_mean_pool"), (3, 16, 16), args)
    plain = plan_iterative_pruning(zoo_dag("plain_mean_pool"), (3, 16, 16), prune_times=3, step_epoch=4,
                                   target=0.5, importance="taylor", head_pruning="heads")
    assert (from_arguments.target_pruning_ratio, from_arguments.predicted_flops_proportion) == \
        (plain.target_pruning_ratio, plain.predicted_flops_proportion)
    assert (from_arguments.prune_times, from_arguments.step_epoch, from_arguments.importance) == (3, 4, "taylor")


def test_schedule_defaults_fit_the_prunes_in_the_steps():
    assert iterative_schedule(12) == (5, 2) and iterative_schedule(12, prune_times=3) == (3, 4)
    assert iterative_schedule(12, step_epoch=5) == (3, 5)  # prunes at 0, 5, 10
    assert iterative_schedule(2) == (2, 1)  # the default 5 prunes, lowered to what fits


def l1_arguments(**overrides) -> argparse.Namespace:
    values = dict(target=0.5, steps=12, batch_size=8, lr=1e-3, seed=0, checkpoint_every=4,
                  block_size=1, prune_times=3, amp="none")
    values.update(overrides)
    return argparse.Namespace(**values)


def digits_like_data(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 16, 16, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def interrupt_after(steps: int):
    def progress(iterable, total, initial):
        for done, item in enumerate(iterable):
            if done == steps:
                raise KeyboardInterrupt
            yield item
    return progress


@pytest.mark.parametrize("importance, prunes_done_at_step_0", [("l1", 1), ("taylor", 0)])
def test_run_iterative_l1_meets_the_target_exports_exactly_and_resumes_exactly(tmp_path, importance,
                                                                               prunes_done_at_step_0):
    train, val = digits_like_data(64, 0), digits_like_data(16, 1)
    args = l1_arguments(importance=importance)
    pruned, history, accuracy, difference = run_iterative_l1(
        zoo_dag("plain_mean_pool"), (3, 16, 16), args, train, val, "cpu", tmp_path / "whole")
    assert difference <= REMOVAL_TOLERANCE and 0 <= accuracy <= 100
    original = dp.count_flops(zoo_dag("plain_mean_pool"), (3, 16, 16)).total
    assert abs(dp.count_flops(pruned, (3, 16, 16)).total / original - args.target) <= FLOPS_TARGET_TOLERANCE
    # taylor's prune due at step 0 waits for step 1's call (gradients of step 0)
    assert [(entry["step"], entry["prunes_done"]) for entry in history] == \
        [(0, prunes_done_at_step_0), (10, 3), (11, 3)]
    assert history[-1]["proportion"] == pytest.approx(dp.count_flops(pruned, (3, 16, 16)).total / original)

    with pytest.raises(KeyboardInterrupt):  # stopped after step 5; the last checkpoint is step 4
        run_iterative_l1(zoo_dag("plain_mean_pool"), (3, 16, 16), args, train, val, "cpu",
                         tmp_path / "stopped", progress=interrupt_after(6))
    resumed, resumed_history, _, _ = run_iterative_l1(
        zoo_dag("plain_mean_pool"), (3, 16, 16), args, train, val, "cpu", tmp_path / "stopped")
    assert resumed_history == history
    for (key, expected), (other, actual) in zip(pruned.state_dict().items(), resumed.state_dict().items()):
        assert key == other and torch.equal(expected, actual), key


def test_run_iterative_l1_with_fewer_steps_than_prunes(tmp_path):
    train, val = digits_like_data(32, 0), digits_like_data(8, 1)
    args = l1_arguments(steps=2, prune_times=None, checkpoint_every=0)  # default 5 prunes -> 2
    pruned, history, _, difference = run_iterative_l1(zoo_dag("plain_mean_pool"), (3, 16, 16), args,
                                                      train, val, "cpu", tmp_path)
    assert difference <= REMOVAL_TOLERANCE
    assert [entry["prunes_done"] for entry in history] == [1, 2]


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_prune_iteratively_around_the_same_training_step_gives_the_app_s_slim_model(tmp_path, importance):
    train, val = digits_like_data(64, 0), digits_like_data(16, 1)
    args = l1_arguments(importance=importance, checkpoint_every=0)
    from_app, _, _, _ = run_iterative_l1(zoo_dag("plain_mean_pool"), (3, 16, 16), args, train, val, "cpu",
                                         tmp_path)

    algorithm = plan_from_arguments(zoo_dag("plain_mean_pool"), (3, 16, 16), args).create_algorithm().train()
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=args.lr)

    def train_step(masked_model, step):
        index = batch_indices(len(train[0]), args.batch_size, args.seed + 1, step)
        loss = F.cross_entropy(masked_model(train[0][index]), train[1][index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    from_library = prune_iteratively(algorithm, train_step, args.steps)
    assert algorithm.done
    for (key, expected), (other, actual) in zip(from_app.state_dict().items(), from_library.state_dict().items()):
        assert key == other and torch.equal(expected, actual), key


def test_prune_iteratively_refuses_steps_that_end_before_the_last_prune():
    plan = plan_iterative_pruning(zoo_dag("plain_mean_pool"), (3, 16, 16), prune_times=3, step_epoch=4, target=0.5)
    with pytest.raises(PruningError, match=r"steps=8 ends before the last prune \(step 8\)"):
        prune_iteratively(plan.create_algorithm(), lambda model, step: None, steps=8)


# ------------------------------------------------------------------------------- the guide
@pytest.mark.slow
def test_units_guide_python_example_prints_what_the_guide_says(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "resources" / "units_guide.md").read_text()
    (example,) = re.findall(r"^```python\n(.*?)^```", guide, re.MULTILINE | re.DOTALL)
    printed = re.search(r"^prints\n\n```text\n(.*?)^```", guide, re.MULTILINE | re.DOTALL).group(1).splitlines()
    monkeypatch.chdir(tmp_path)  # the example saves to out/
    exec(compile(example, "units_guide.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == printed[:3]
    assert float(lines[3]) <= REMOVAL_TOLERANCE
    assert (tmp_path / "out" / "resnet34_l1" / "graph.json").is_file()
