"""A bounded sample of the Hugging Face coverage sweep (``scripts/coverage_transformers.py``),
run in-process.

Two encoders, five decoders and one vision model from the sweep's tiny configs. Each runs the
sweep's own per-model check: the DAG reproduces the model on the example inputs and on a second
input of another batch size (and length and padding) (max relative difference <= 1e-5) and
returns its ``ModelOutput`` class; the saved DAG loads bit-exactly in a fresh process where
``import transformers`` fails; a channel group is prunable; removing the channels closed by
random gate logits reproduces the gated model (<= 1e-4) and lowers the FLOPs. Models that fail
today stay in the list as strict xfails with the reason, so a fix shows up as an unexpected pass.

Select it with ``pytest -m coverage_sample``; with one torch thread the eight take about 45 s
(65 s under load) on the shared 2-core machine, each with one fresh process for the load check.
"""

import pytest

from sample_params import sample_params, sweep_script

coverage_script = sweep_script("coverage_transformers.py", "transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SAMPLE_MODELS = {
    "encoder with pooler": "BertModel",
    "decoder, rotary and grouped-query attention": "LlamaForCausalLM",
    "decoder, GPT-2 Conv1D": "GPT2LMHeadModel",
    "decoder, nn.Linear subclass with its own forward": "FalconForCausalLM",
    "vision transformer": "ViTModel",
    "encoder, traced sizes in torch.reshape, a span convolution": "ConvBertModel",
    "decoder, torch.max of two tensors, sinusoidal positions": "XGLMForCausalLM",
    "decoder, mixture of experts run by torch._grouped_mm": "OlmoeForCausalLM",
}
"""What the model stands for -> a class of :data:`MODELS` or ``MORE_MODELS`` in the sweep."""

EXPECTED_FAILURES: dict = {}
"""Sample models that fail today, with the reason (strict xfail: a fix must remove the entry)."""


@pytest.mark.parametrize("name", sample_params(SAMPLE_MODELS, EXPECTED_FAILURES))
def test_sample_model_converts_round_trips_and_removes_exactly(name):
    record = coverage_script.check_model(name)
    assert record["converts_exactly"], (f"{name}: conversion differs by {record['convert_max_rel_diff']:.2e} "
                                        f"(second input {record['second_max_rel_diff']:.2e})")
    assert record["output_type_kept"], f"{name}: the DAG does not return {record['output_type']}"
    assert record["prunable"] and record["prunable_groups"] > 0, record
    assert 0 < record["max_removable_proportion"] <= record["prunable_proportion"] <= 1, record
    assert record["removal_exact"], (f"{name}: removal differs by {record['removal_max_rel_diff']:.2e} "
                                     f"(second input {record['removal_second_max_rel_diff']:.2e})")
    assert 0 < record["slim_flops"] < record["flops"], record
    assert record["roundtrip_exact"], f"{name}: save/load without transformers: {record.get('roundtrip_error')}"
