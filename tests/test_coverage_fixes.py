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
