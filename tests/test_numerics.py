"""Nothing silently wrong: NaN and Inf are errors, never "equal"; non-finite gates, weights,
statistics and losses stop pruning with a message naming the group or the vertex; a second
``prepare_for_pruning()`` keeps the gates; a missed FLOPs target is a failed check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dagprune
from dagprune.compare import describe_non_finite, non_finite_tensors
from dagprune.errors import PruningError
from dagprune_algorithms.app.cli import main
from dagprune_algorithms.pruning import ChannelPruning
from dagprune_algorithms.pruning.channel_pruning import check_flops_target
from dagprune_algorithms.pruning.losses import NonFiniteLossWatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NON_FINITE = [float("nan"), float("inf"), float("-inf")]
SHAPE = (3, 8, 8)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()


def _prepared(steps: int = 10, **kwargs) -> tuple[ChannelPruning, dagprune.DagModule]:
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(_cnn()), SHAPE, 0.5, steps, **kwargs)
    return pruning, pruning.prepare_for_pruning()


# ------------------------------------------------------------------------------- comparisons
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("side", ["first", "second", "both"])
def test_max_relative_difference_is_infinite_for_non_finite_outputs(value, side):
    finite, broken = torch.ones(3), torch.tensor([1.0, value, 1.0])
    first = broken if side in ("first", "both") else finite
    second = broken if side in ("second", "both") else finite
    assert dagprune.max_relative_difference(first, second) == float("inf")
    assert dagprune.max_relative_difference((finite, first), [finite, second]) == float("inf")


def test_max_relative_difference_of_finite_outputs_is_unchanged():
    assert dagprune.max_relative_difference(torch.tensor([2.0, 4.0]), torch.tensor([2.0, 3.0])) == 0.25
    assert dagprune.max_relative_difference(torch.zeros(0), torch.zeros(0)) == 0.0


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_compare_module_outputs_fails_on_a_non_finite_model(value, word):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(value)
    dag = dagprune.build_from_unstructured_module(model)
    assert dagprune.compare_module_outputs(model, dag, (2, 4), raise_error=False) == float("inf")
    with pytest.raises(AssertionError, match=f"not finite.*{word}"):
        dagprune.compare_module_outputs(model, dag, (2, 4))


def test_non_finite_tensors_name_the_vertex():
    model = _cnn()
    model[4].running_var[3] = float("nan")
    model[0].weight.data[0, 0, 0, 0] = float("inf")
    found = non_finite_tensors(dagprune.build_from_unstructured_module(model))
    assert found == ["vertex '_0' (0) weight: 1 Inf of 216 values",
                     "vertex '_4' (4) running_var: 1 NaN of 8 values"]
    assert describe_non_finite({"a": torch.ones(1), "b": torch.tensor([float("nan")])}) == \
        "output 1 holds 1 NaN of 1 values"


# ------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("tensor", ["running_mean", "running_var", "weight"])
def test_prepare_refuses_non_finite_statistics_and_parameters(tensor):
    model = _cnn()
    getattr(model[1], tensor).data[2] = float("nan")
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model), SHAPE, 0.5, 10)
    with pytest.raises(PruningError, match=rf"prepare_for_pruning\(\).*vertex '_1' \(1\) {tensor}: 1 NaN"):
        pruning.prepare_for_pruning()


class _ClampedLinear(nn.Linear):
    """A linear layer whose output clamp bounds are buffers, ±Inf meaning "no bound"."""

    def __init__(self, features: int):
        super().__init__(features, features)
        self.register_buffer("clamp_min", torch.tensor(float("-inf")))
        self.register_buffer("clamp_max", torch.tensor(float("inf")))

    def forward(self, x):
        return super().forward(x).clamp(self.clamp_min, self.clamp_max)


def test_infinite_bounds_in_buffers_are_allowed_but_nan_is_not():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), _ClampedLinear(8), nn.ReLU(), nn.Linear(8, 2))
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(model), (4,), 0.5, 10)
    pruning.prepare_for_pruning()  # the ±Inf bounds are the model's design, not corruption
    model[2].clamp_max.fill_(float("nan"))
    again = ChannelPruning(dagprune.build_from_unstructured_module(model), (4,), 0.5, 10)
    with pytest.raises(PruningError, match=r"clamp_max.*: 1 NaN of 1 values"):
        again.prepare_for_pruning()


@pytest.mark.parametrize("argument, value", [("initial_logit", float("nan")), ("temperature", float("inf")),
                                             ("initial_logit_spread", float("nan")), ("temperature", 0.0)])
def test_non_finite_gate_settings_are_refused(argument, value):
    dag = dagprune.build_from_unstructured_module(_cnn())
    with pytest.raises(PruningError, match=argument):
        ChannelPruning(dag, SHAPE, 0.5, 10, **{argument: value})


def test_second_prepare_returns_the_same_gated_model_and_gates():
    pruning, gated = _prepared()
    gates = pruning.gate_parameters()
    optimizer = torch.optim.SGD(gates, lr=1.0)
    assert pruning.prepare_for_pruning() is gated
    assert all(a is b for a, b in zip(gates, pruning.gate_parameters()))
    gated.train()(torch.randn(2, *SHAPE))
    _, flops_loss, _, _ = pruning.compute_current_proportion_and_pruning_losses(global_step=5)
    before = [g.detach().clone() for g in gates]
    flops_loss.backward()
    optimizer.step()  # the optimizer's gates are the ones the model uses
    assert any(not torch.equal(a, g) for a, g in zip(before, pruning.gate_parameters()))


# ------------------------------------------------------------------------------- training
@pytest.mark.parametrize("value", NON_FINITE)
def test_training_step_refuses_non_finite_gate_logits(value):
    pruning, gated = _prepared()
    gated.train()(torch.randn(2, *SHAPE))
    pruning.gates[1].logits.data[2] = value
    group = pruning.prunable_groups[1].name
    with pytest.raises(PruningError, match=rf"step 0: the gate logits of channel group\(s\) '{group}' \(1 "):
        pruning.compute_current_proportion_and_pruning_losses(global_step=0)


def test_non_finite_losses_between_checks_are_caught_at_the_next_check():
    pruning, gated = _prepared(steps=100, finite_check_interval=10)
    pruning.loss_config.bkd_weight = float("nan")  # finite gates and weights, NaN losses
    gated.train()
    for step in range(1, 10):  # unchecked steps: no error, no host synchronisation
        gated(torch.randn(2, *SHAPE))
        pruning.compute_current_proportion_and_pruning_losses(global_step=step)
    gated(torch.randn(2, *SHAPE))
    with pytest.raises(PruningError, match="step 10: the pruning losses were NaN or Inf at step 1"):
        pruning.compute_current_proportion_and_pruning_losses(global_step=10)


def test_non_finite_weights_during_training_name_the_vertex():
    pruning, gated = _prepared()
    gated.train()(torch.randn(2, *SHAPE))
    pruning.model.vertex_modules["_3"].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(PruningError, match=r"vertex '_3' \(3\) weight: 1 NaN"):
        pruning.compute_current_proportion_and_pruning_losses(global_step=0)


def test_the_last_step_is_checked():
    pruning, gated = _prepared(steps=10, finite_check_interval=1000)
    gated.train()(torch.randn(2, *SHAPE))
    pruning.compute_current_proportion_and_pruning_losses(global_step=4)
    pruning.gates[0].logits.data[0] = float("nan")
    pruning.compute_current_proportion_and_pruning_losses(global_step=5)  # not checked
    with pytest.raises(PruningError, match="NaN or Inf"):
        pruning.compute_current_proportion_and_pruning_losses(global_step=9)


@pytest.mark.parametrize("step", [float("nan"), float("inf"), -1, 2.5, 3.0, True, torch.tensor(3), "4"])
def test_global_step_must_be_a_non_negative_int(step):
    pruning, _ = _prepared()
    with pytest.raises(PruningError, match="global_step must be an int >= 0"):
        pruning.compute_current_proportion_and_pruning_losses(global_step=step)


def test_loss_watch_records_without_reading_the_device():
    watch = NonFiniteLossWatch()
    assert watch.first_step() is None
    watch.record(3, torch.tensor(1.0), torch.tensor(float("-inf")))
    watch.record(4, torch.tensor(float("nan")))
    assert watch.first_step() == 3


# ------------------------------------------------------------------------------- removal
def test_removal_refuses_non_finite_gates_and_statistics():
    pruning, _ = _prepared()
    pruning.gates[0].logits.data[0] = float("nan")
    with pytest.raises(PruningError, match=r"remove_channels\(\): the gate logits"):
        pruning.remove_channels()
    pruning.gates[0].logits.data[0] = 1.0
    pruning.model.vertex_modules["_4"].running_mean[1] = float("inf")
    with pytest.raises(PruningError, match=r"remove_channels\(\).*vertex '_4' \(4\) running_mean: 1 Inf"):
        pruning.remove_channels()


def test_calibration_refuses_non_finite_gates():
    pruning, _ = _prepared()
    pruning.gates[0].logits.data[0] = float("nan")
    with pytest.raises(PruningError, match=r"calibrate_to_target\(\).*'0'"):
        pruning.calibrate_to_target()


# ------------------------------------------------------------------------------- FLOPs target
def test_missed_flops_target_is_an_error_with_the_miss():
    pruning, _ = _prepared()
    assert pruning.current_hard_proportion() == 1.0  # untrained: every gate open
    with pytest.raises(PruningError, match=r"keeps 1\.0000 .* target 0\.5000, 0\.5000 above it"):
        pruning.check_target_reached()
    assert pruning.check_target_reached(proportion=0.51) == pytest.approx(0.01)
    assert pruning.check_target_reached(tolerance=0.6) == pytest.approx(0.5)
    assert check_flops_target(0.3, 0.5) == pytest.approx(-0.2)  # below the budget: reached
    with pytest.raises(PruningError, match="proportion must be a finite number"):
        check_flops_target(float("nan"), 0.5)


def test_a_short_schedule_ends_calibrated_to_the_target():
    """The gates freeze, and so calibrate, at least on the last step: four steps reach the target."""
    pruning, gated = _prepared(steps=4)
    gated.train()
    for step in range(4):
        gated(torch.randn(2, *SHAPE))
        pruning.compute_current_proportion_and_pruning_losses(global_step=step)
    assert all(gate.frozen for gate in pruning.gates)
    assert pruning.check_target_reached(tolerance=0.05) <= 0.05


# ------------------------------------------------------------------------------- convert
def test_convert_says_nan_when_a_saved_dag_holds_nan(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    path = dagprune.build_from_unstructured_module(model).save(tmp_path / "dag")
    assert main(["convert", str(path), "--input-size", "3", "8", "8"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("save/load"))
    assert "NOT bit-exact" in line and "non-finite" in line
    assert "vertex '_0' (0) weight: 1 NaN of 108 values" in line and "NaN of 288 values" in line
