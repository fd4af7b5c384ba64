"""The mask-weighted group statistics shared by GroupNorm's and EvoNorm's masking equal the
statistics of the tensor with the removed channels cut out, in every floating dtype."""

import pytest
import torch
import torch.nn.functional as F

from dagprune.ops.evo_norm import group_statistic
from dagprune.ops.specs.normalization import masked_group_norm

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
KEPT = [0, 2, 3, 5, 6]  # of 8 channels in 2 groups of 4: 3 kept in the first, 2 in the second


def _inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 3, 3, generator=generator) * 3 + 1).to(dtype)
    mask = torch.zeros(8, dtype=dtype)
    mask[KEPT] = 1
    return x, mask


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_masked_group_norm_equals_group_norm_of_the_kept_channels(dtype):
    x, mask = _inputs(dtype)
    out = masked_group_norm(x, mask, 2, None, None, 1e-5)
    # the kept channels regrouped as removal leaves them: the groups keep 3 and 2 channels, so
    # each group is normalised on its own
    expected = torch.cat([F.group_norm(x[:, [0, 2, 3]].double(), 1, eps=1e-5),
                          F.group_norm(x[:, [5, 6]].double(), 1, eps=1e-5)], dim=1)
    assert out.dtype == dtype
    assert torch.allclose(out[:, KEPT].double(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("rms", [False, True])
def test_masked_evo_norm_statistic_equals_that_of_the_kept_channels(dtype, rms):
    x, mask = _inputs(dtype)
    statistic = group_statistic(x, 2, 1e-5, rms, mask)
    first = group_statistic(x[:, [0, 2, 3]].float(), 1, 1e-5, rms)
    second = group_statistic(x[:, [5, 6]].float(), 1, 1e-5, rms)
    assert statistic.dtype == dtype
    expected = torch.cat([first, second], dim=1).to(dtype).double()
    # computed in float32 whatever the dtype, as timm computes it
    tolerance = max(TOLERANCE[dtype], TOLERANCE[torch.float32]) * 4
    assert torch.allclose(statistic[:, KEPT].double(), expected, atol=tolerance, rtol=0)
