"""A bounded sample of the timm coverage sweep (``scripts/coverage.py``), run in-process.

One small member per family, torch-dag's unsupported families included (swin, maxvit, levit,
eva, davit, coat, mvitv2, repvgg, cait, xcit, crossvit, resmlp, cs3darknet, cspdarknet, eca,
...). Each runs the sweep's own per-model check: the DAG reproduces the model (max relative
difference <= 1e-5) and removing the channels closed by random gate logits reproduces the gated
model (<= 1e-4). Models that fail today stay in the list as strict xfails with the reason, so a
fix shows up as an unexpected pass.

Select it with ``pytest -m coverage_sample``. With one torch thread the 38 models take about
40 s on one core of the shared 2-core machine (7 min with torch's default threads under load,
hence the ``one_torch_thread`` fixture), so the sample is not marked ``slow``.
"""


import pytest

from sample_params import sample_params, sweep_script

coverage_script = sweep_script("coverage.py", "timm", "fvcore")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SAMPLE_MODELS = {
    "resnet": "resnet10t",
    "mobilenetv3": "mobilenetv3_small_050",
    "efficientnet": "efficientnet_b0",
    "tf_efficientnet (SAME padding)": "tf_efficientnet_lite0",
    "regnet": "regnetx_002",
    "convnext": "convnext_atto",
    "convnextv2 (GRN)": "convnextv2_atto",
    "vit": "vit_tiny_patch16_224",
    "deit distilled": "deit_tiny_distilled_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
    "maxvit": "maxvit_pico_rw_256",
    "levit": "levit_128s",
    "eva02": "eva02_tiny_patch14_224",
    "davit": "davit_tiny",
    "coat": "coat_lite_tiny",
    "mvitv2": "mvitv2_tiny",
    "repvgg": "repvgg_a0",
    "cait": "cait_xxs24_224",
    "xcit": "xcit_nano_12_p16_224",
    "edgenext": "edgenext_xx_small",
    "crossvit": "crossvit_tiny_240",
    "resmlp": "resmlp_12_224",
    "cs3darknet": "cs3darknet_focus_s",
    "cspdarknet": "cspdarknet53",
    "nfnet": "nf_regnet_b0",
    "eca": "eca_resnet33ts",
    "densenet (concatenation)": "densenet121",
    "ghostnet": "ghostnet_050",
    "mobilevit": "mobilevit_xxs",
    "poolformer": "poolformer_s12",
    "hrnet (multi-branch)": "hrnet_w18_small",
    "volo (unfold/fold)": "volo_d1_224",
    "pit distilled": "pit_ti_distilled_224",
    "inception (min size 75)": "inception_v3",
    "efficientformer": "efficientformer_l1",
    "dla": "dla34",
    "gcnet (global context)": "gcresnet33ts",
    "focalnet": "focalnet_tiny_srf",
}
"""Family -> the model that stands for it in the sample."""

EXPECTED_FAILURES: dict = {}
"""Sample models that fail today, with the reason (strict xfail: a fix must remove the entry)."""


@pytest.mark.parametrize("name", sample_params(SAMPLE_MODELS, EXPECTED_FAILURES))
def test_sample_model_converts_and_removes_exactly(name):
    record = coverage_script.check_model(name, with_fvcore=False)
    assert record["converts_exactly"], f"{name}: conversion differs by {record['convert_max_rel_diff']:.2e}"
    assert record["roundtrip_exact"] and record["slim_roundtrip_exact"], f"{name}: save/load is not bit-exact"
    assert record["prunable"] and record["prunable_groups"] > 0, record
    assert record["removal_exact"], f"{name}: removal differs by {record['removal_max_rel_diff']:.2e}"
    assert record["flops"] > 0 and 0 < record["max_removable_proportion"] <= 1
