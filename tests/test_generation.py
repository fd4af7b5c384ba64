"""dagprune.generation.generate: a causal LM DAG continues token IDs as Hugging Face's generate
does, greedy or sampled, with left padding; a slim model generates what its gated model does."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dagprune  # noqa: E402
from dagprune.errors import ExecutionError  # noqa: E402
from dagprune.generation import generate  # noqa: E402
from dagprune_algorithms.pruning import ChannelPruning  # noqa: E402
from gate_states import random_gate_states  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def _prompt(left_padding: int = 0):
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :left_padding], mask[1, :left_padding] = 0, 0
    return ids, mask


def test_greedy_tokens_are_hugging_faces(llama, tmp_path):
    ids, mask = _prompt()
    dag = dagprune.build_from_unstructured_module(llama, example_inputs={"input_ids": ids, "attention_mask": mask})
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(dag, ids, 6), expected)
    dag.save(tmp_path / "dag")
    assert torch.equal(generate(dagprune.load_dag(tmp_path / "dag"), ids, 6), expected)


def test_left_padded_rows_count_positions_from_their_first_token(llama):
    ids, mask = _prompt(left_padding=3)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    dag = dagprune.build_from_unstructured_module(
        llama, example_inputs={"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(dag, ids, 5, attention_mask=mask), expected)


def test_a_slim_model_generates_what_its_gated_model_generates(llama):
    ids, mask = _prompt()
    example = {"input_ids": ids, "attention_mask": mask}
    pruning = ChannelPruning(dagprune.build_from_unstructured_module(llama, example_inputs=example), None, 0.5,
                             10, example_inputs=example, head_pruning="heads")
    gated = pruning.prepare_for_pruning()
    next(iter(random_gate_states(pruning, seed=0, count=1)))
    slim = pruning.remove_channels().eval()
    assert torch.equal(generate(slim, ids, 5), generate(gated.eval(), ids, 5))


def test_sampling_stops_rows_at_the_end_token(llama):
    ids, _ = _prompt()
    dag = dagprune.build_from_unstructured_module(llama, example_inputs={"input_ids": ids})
    first = generate(dag, ids, 1)[:, -1]
    out = generate(dag, ids, 4, eos_token_id=int(first[0]), pad_token_id=0)
    assert out[0, 7] == first[0] and torch.all(out[0, 8:] == 0)  # row 0 stopped, padded after
    sampled = generate(dag, ids, 4, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(0))
    again = generate(dag, ids, 4, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 11) and torch.equal(sampled, again)


@pytest.mark.parametrize("arguments, message", [
    ({"input_ids": torch.zeros(7, dtype=torch.long), "max_new_tokens": 2}, "a \\(batch, length\\) tensor"),
    ({"input_ids": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": -1}, "max_new_tokens"),
    ({"input_ids": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": 1, "temperature": 0.0}, "temperature"),
    ({"input_ids": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": 1,
      "attention_mask": torch.ones(1, 4)}, "attention_mask has shape"),
])
def test_bad_arguments_are_clear_errors(llama, arguments, message):
    with pytest.raises(ExecutionError, match=message):
        generate(llama, **arguments)


class _Encoder(torch.nn.Module):
    """Returns one vector per sequence, not per-token logits."""

    def forward(self, input_ids, attention_mask=None):
        return input_ids.float().mean(1, keepdim=True)


def test_a_model_without_logits_is_a_clear_error():
    with pytest.raises(ExecutionError, match="no logits"):
        generate(_Encoder(), torch.zeros(1, 3, dtype=torch.long), 1)
