"""Hugging Face transformers, random-init from tiny configs: the README workflow end to end.

BERT (encoder, absolute positions), GPT-2 (``Conv1D`` layers, fused q/k/v, tied embeddings) and
LLaMA (RMS norms, rotary embeddings, grouped-query attention) are converted with keyword example
inputs, checked on inputs of other batch sizes, lengths and padding, saved and loaded in a
process that cannot import transformers, gated, trained for a step and slimmed exactly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dagprune
from gate_states import assert_removal_matches_gates, random_gate_states
from dagprune_algorithms.pruning import ChannelPruning, compute_flops

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = 96


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCABULARY, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))


MODELS = {"bert": (_bert, {}), "gpt2": (_gpt2, {"use_cache": False}), "llama": (_llama, {"use_cache": False})}


def _inputs(batch: int, length: int, padding: int, seed: int, fixed: dict) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding:
        mask[0, -padding:] = 0
    return {"input_ids": torch.randint(0, VOCABULARY, (batch, length), generator=generator),
            "attention_mask": mask, **fixed}


def _converted(name: str):
    build, fixed = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    example = _inputs(2, 7, 0, seed=0, fixed=fixed)
    return model, dagprune.build_from_unstructured_module(model, example_inputs=example), example, fixed


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converts_exactly_for_other_batches_lengths_and_padding(name):
    model, dag, _, fixed = _converted(name)
    for batch, length, padding in [(2, 7, 0), (3, 11, 4), (1, 5, 2)]:
        inputs = _inputs(batch, length, padding, seed=batch, fixed=fixed)
        with torch.no_grad():
            expected, actual = model(**inputs), dag(**inputs)
        assert type(actual) is type(expected)
        assert list(actual.keys()) == list(expected.keys())
        # bit-equal, but for GPT-2's Conv1D, computed as nn.Linear (the same product, other kernel)
        assert dagprune.max_relative_difference(expected, actual) <= (1e-6 if name == "gpt2" else 0.0)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_example_without_use_cache_is_traced_without_a_cache(name):
    build, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    assert model.config.use_cache  # left to the config, the model would build a DynamicCache
    dag = dagprune.build_from_unstructured_module(model, example_inputs=_inputs(2, 7, 0, seed=0, fixed={}))
    inputs = _inputs(3, 9, 2, seed=1, fixed={})
    with torch.no_grad():
        expected, actual = model(**inputs, use_cache=False), dag(**inputs)
    assert type(actual) is type(expected) and actual.get("past_key_values") is None
    assert dagprune.max_relative_difference(expected.logits, actual.logits) <= (1e-6 if name == "gpt2" else 0.0)
    assert torch.equal(dag(**inputs, use_cache=False).logits, actual.logits)  # may be passed, as fixed
    with pytest.raises(TypeError, match="use_cache=False fixed"):
        dag(**inputs, use_cache=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gates_train_and_removal_is_exact(name):
    _, dag, example, fixed = _converted(name)
    pruning = ChannelPruning(dag, None, 0.5, 20, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    assert pruning.prunable_proportion > 0.8  # MLP, attention and residual widths
    inputs = _inputs(3, 9, 3, seed=5, fixed=fixed)
    gated.train()
    output = gated(**inputs)
    hidden = output["logits"] if "logits" in output else output["last_hidden_state"]
    proportion, flops_loss, entropy_loss, bkd_loss = pruning.compute_current_proportion_and_pruning_losses(0)
    total = hidden.square().mean() + flops_loss + entropy_loss + bkd_loss
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in pruning.gate_parameters() if p.grad is not None)
    for _ in random_gate_states(pruning, seed=1, count=2):
        slim = assert_removal_matches_gates(pruning, gated, inputs)
    assert compute_flops(slim, example_inputs=example) < compute_flops(dag, example_inputs=example)


def _linear_widths(dag) -> dict:
    return {v.qualified_name: v.module.weight.shape for v in dag.inner_vertices if isinstance(v.module, torch.nn.Linear)}


def test_llama_grouped_query_attention_stays_consistent_after_removal():
    _, dag, example, fixed = _converted("llama")
    pruning = ChannelPruning(dag, None, 0.5, 20, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    for _ in random_gate_states(pruning, seed=3, count=1):
        slim = assert_removal_matches_gates(pruning, gated, _inputs(2, 6, 1, seed=7, fixed=fixed))
    widths = _linear_widths(slim)
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        hidden = widths[prefix + "self_attn.q_proj"][1]
        assert widths[prefix + "self_attn.k_proj"][1] == widths[prefix + "mlp.up_proj"][1] == hidden
        # 4 query heads share 2 key/value heads: each kept value dim is read by 2 query heads
        assert widths[prefix + "self_attn.o_proj"][1] == 2 * widths[prefix + "self_attn.v_proj"][0]
        # rotary embeddings pair dims i and i + 4 of each query/key head: kept or removed together,
        # the same dims in every head (4 query heads, 2 key heads)
        query_dims, key_dims = widths[prefix + "self_attn.q_proj"][0], widths[prefix + "self_attn.k_proj"][0]
        assert query_dims == 2 * key_dims and query_dims % 8 == 0
        assert query_dims < 32  # these gates close a pair of rotary dims
    assert widths["lm_head"][1] < 32  # the residual width was pruned with the gates


def test_llama_whole_heads_go_with_their_shared_key_value_head():
    _, dag, example, fixed = _converted("llama")
    pruning = ChannelPruning(dag, None, 0.5, 20, example_inputs=example, head_pruning="heads")
    gated = pruning.prepare_for_pruning()
    head_groups = [g for g in pruning.analysis.prunable_groups
                   if any("q_proj" in (v.qualified_name or "") for v, _ in g.producers)]
    assert len(head_groups) == 2 and all(len(g.classes) == 2 for g in head_groups)  # 2 kv heads a layer
    for _ in random_gate_states(pruning, seed=4, count=3):
        slim = assert_removal_matches_gates(pruning, gated, _inputs(2, 6, 2, seed=8, fixed=fixed))
        widths = _linear_widths(slim)
        for layer in range(2):
            attention = f"model.layers.{layer}.self_attn."
            kv_heads = widths[attention + "k_proj"][0] // 8
            assert widths[attention + "v_proj"][0] == 8 * kv_heads
            assert widths[attention + "q_proj"][0] == widths[attention + "o_proj"][1] == 16 * kv_heads


def test_gpt2_output_head_stays_tied_to_the_token_embedding():
    _, dag, example, _ = _converted("gpt2")
    pruning = ChannelPruning(dag, None, 0.5, 20, example_inputs=example)
    pruning.prepare_for_pruning()
    for _ in random_gate_states(pruning, seed=6, count=1):
        slim = pruning.remove_channels()
    modules = {v.qualified_name: v.module for v in slim.inner_vertices}
    assert modules["lm_head"].weight is modules["transformer.wte"].weight
    assert modules["lm_head"].weight.shape[1] < 32


_LOAD_WITHOUT_TRANSFORMERS = textwrap.dedent("""
    import sys
    class _NoTransformers:
        def find_spec(self, name, path=None, target=None):
            if name == "transformers" or name.startswith("transformers."):
                raise ImportError("transformers is blocked in this process")
    sys.meta_path.insert(0, _NoTransformers())
    sys.path.insert(0, sys.argv[1])
    import torch, dagprune
    dag = dagprune.load_dag(sys.argv[2] + "/dag").eval()
    saved = torch.load(sys.argv[2] + "/expected.pt")
    with torch.no_grad():
        output = dag(**saved["inputs"])
    assert type(output).__name__ == "DagOutput", type(output)
    assert output.type_name == saved["type_name"], output.type_name
    assert list(output) == list(saved["output"]), (list(output), list(saved["output"]))
    assert all(torch.equal(output[key], value) for key, value in saved["output"].items())
    assert torch.equal(output[0], output.to_tuple()[0]) and getattr(output, list(output)[0]) is output[0]
    print("LOADED", "transformers" in sys.modules)
""")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_saved_dag_loads_without_transformers(name, tmp_path):
    _, dag, _, fixed = _converted(name)
    dag.save(tmp_path / "dag")
    inputs = _inputs(2, 5, 1, seed=9, fixed={})
    with torch.no_grad():
        output = dag(**inputs, **fixed)
    torch.save({"inputs": inputs, "output": dict(output), "type_name": type(output).__name__},
               tmp_path / "expected.pt")
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_TRANSFORMERS, str(REPO_ROOT), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED False" in result.stdout


class _CenteredNorm(torch.nn.Module):
    """A norm of transformers' shape (one weight, an epsilon) that is no RMS norm."""

    def __init__(self, width: int):
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(torch.randn(width)), 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


_CenteredNorm.__module__ = "transformers.models.example"


def _norm_types(norm: torch.nn.Module) -> tuple[list, float]:
    wrapper = torch.nn.Sequential(torch.nn.Linear(8, 8), norm)
    converted = dagprune.build_from_unstructured_module(wrapper, example_inputs=(torch.randn(2, 3, 8),))
    x = torch.randn(4, 5, 8)
    difference = dagprune.max_relative_difference(wrapper(x), converted(x))
    return [type(v.module) for v in converted.inner_vertices], difference


def test_rms_norms_become_nn_rms_norm_and_other_norm_forms_stay_traced():
    _, dag, _, _ = _converted("llama")
    norms = [v for v in dag.inner_vertices if isinstance(v.module, torch.nn.RMSNorm)]
    assert len(norms) == 5  # two per layer and the final one
    gemma = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(8)  # scales by 1 + weight
    torch.nn.init.normal_(gemma.weight)
    types, difference = _norm_types(gemma)
    assert torch.nn.RMSNorm in types and difference <= 1e-6
    types, difference = _norm_types(_CenteredNorm(8))
    assert torch.nn.RMSNorm not in types and difference == 0.0


def test_mixture_of_experts_converts_exactly_and_its_attention_prunes(tmp_path):
    """Mixtral's experts run with torch._grouped_mm (a private torch function, allowed by name);
    their channels are barred, the attention and residual widths are pruned."""
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)).eval()
    example = _inputs(2, 7, 0, seed=0, fixed={"use_cache": False})
    dag = dagprune.build_from_unstructured_module(model, example_inputs=example)
    inputs = _inputs(3, 9, 3, seed=4, fixed={"use_cache": False})
    with torch.no_grad():
        assert torch.equal(dag(**inputs).logits, model(**inputs).logits)
    dag.save(tmp_path / "dag")
    with torch.no_grad():
        assert torch.equal(dagprune.load_dag(tmp_path / "dag")(**inputs).logits, dag(**inputs).logits)
    pruning = ChannelPruning(dag, None, 0.9, 20, example_inputs=example)
    gated = pruning.prepare_for_pruning()
    assert 0.0 < pruning.max_removable_proportion < 1.0
    for _ in random_gate_states(pruning, seed=1, count=2):
        assert_removal_matches_gates(pruning, gated, inputs)
