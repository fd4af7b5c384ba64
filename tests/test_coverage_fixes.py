"""Regression tests for the fixes the timm coverage sweep (``scripts/coverage.py``) led to.

Each case is the smallest timm model of the family whose failure the fix removed, run through
the sweep's own per-model check: the DAG reproduces the model and removing the channels closed
by random gate logits reproduces the gated model.
"""


import pytest

from sample_params import sweep_script

coverage_script = sweep_script("coverage.py", "timm")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

FIXED_FAMILY_MODELS = {
    # x[:, :token_length] with token_length read from a shape at run time, on the token axis
    # that the two (cls, dist) token parameters make channel-tracked: the getitem coupling
    # rule raised TypeError on the slice bounds; it now bars such an axis.
    "pit_distilled": "pit_ti_distilled_224",
    # Outlook attention: v -> nn.Unfold -> reshape(B, heads, C // heads, k*k, h*w), C read from
    # the (pruned) residual stream, -> F.fold. Unfold had no coupling rule, so the reshape kept
    # the run-time C while its input kept every v channel: removal broke the reshape. Unfold
    # and fold now have coupling rules (and no-op removal handlers).
    "volo": "volo_d1_224",
    # BottleneckAttn's q.reshape(B * heads, dim_head, -1): at batch 1 the analysis merges the
    # batch axis with the channels, so removal froze B * heads to its batch-1 value and the
    # slim model broke at batch 2; output axis 0 holding the batch now stays run-time.
    "botnet": "sebotnet33ts_256",
}
"""Family -> the model that failed before its fix (why in the comment above it)."""


@pytest.mark.parametrize("name", list(FIXED_FAMILY_MODELS.values()), ids=list(FIXED_FAMILY_MODELS))
def test_fixed_family_converts_and_removes_exactly(name):
    record = coverage_script.check_model(name, with_fvcore=False)
    assert record["converts_exactly"], record
    assert record["prunable"] and record["removal_exact"], record


def _pruned_resnet10t(target: float):
    import timm
    import torch

    import dagprune as dp
    removal_check = coverage_script.sys.modules["removal_check"]
    torch.manual_seed(0)
    dag = dp.build_from_unstructured_module(timm.create_model("resnet10t", pretrained=False).eval())
    pruning, gated, used = removal_check.prepare_at_target_or_reachable(dag, (3, 32, 32), target, 10)
    return removal_check, pruning, gated, used


def test_float64_recheck_tells_rounding_from_a_wrong_removal():
    import torch

    removal_check, pruning, gated, _ = _pruned_resnet10t(0.5)
    _, slim, x = removal_check.removal_difference_at_random_gates(pruning, gated, (3, 32, 32), 2, seed=1)
    assert removal_check.float64_removal_difference(gated, slim, x) <= removal_check.FLOAT64_REMOVAL_TOLERANCE
    with torch.no_grad():  # one kept weight off by 1e-3: a removal that is wrong, however slightly
        next(slim.parameters()).view(-1)[0] *= 1.001
    assert removal_check.float64_removal_difference(gated, slim, x) > 1e3 * removal_check.FLOAT64_REMOVAL_TOLERANCE


def test_unreachable_target_is_checked_at_a_reachable_one():
    removal_check, pruning, gated, used = _pruned_resnet10t(1e-4)
    reachable = 1.0 - pruning.max_removable_proportion
    assert 1e-4 < reachable < used < 1.0 and pruning.pruning_proportion == used
    assert gated is pruning.prepare_for_pruning()


def test_large_models_take_the_exclusive_lane_and_the_largest_are_skipped():
    from types import SimpleNamespace

    options = SimpleNamespace(max_params=1.4e9, large_params=250e6, memory_gb=6.0, large_memory_gb=18.0,
                              cpu_seconds=120, wall_seconds=900)
    small, large = coverage_script.choose_lane(100e6, options), coverage_script.choose_lane(600e6, options)
    assert (small.name, small.memory_gb, small.exclusive, small.share_weights) == ("small", 6.0, False, False)
    assert (large.name, large.memory_gb, large.exclusive, large.share_weights) == ("large", 18.0, True, True)
    assert large.cpu_seconds > small.cpu_seconds and large.wall_seconds > small.wall_seconds
    assert coverage_script.choose_lane(2e9, options) is None
    assert coverage_script.choose_lane(None, options).name == "small"  # not countable on meta: counted later


def test_a_paused_sweep_does_not_spend_its_wall_clock_bound():
    import time

    now = time.monotonic()
    deadline, polled = coverage_script._deadline_after_pause(now + 10.0, now - 600.0)  # stopped 10 minutes
    assert deadline >= now + 600.0 and polled >= now
    assert coverage_script._deadline_after_pause(now + 10.0, time.monotonic() - 1.0)[0] == now + 10.0
