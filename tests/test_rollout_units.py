"""Rollout, decoding and scoring details the other PPO unit tests leave open (stages/ppo/{rollout,decode}.py):
hand-made inputs, CPU, well under a second each."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================ decode: buckets
def test_bucket_width_rounds_up_and_leaves_a_multiple_as_it_is():
    """Widths already a multiple of the bucket keep their width: a 32-column prompt batch (or
    data.max_prompt_length 32) takes 32 cache columns, not 64."""
    from stages.ppo.decode import PROMPT_BUCKET, bucket_left_pad, bucket_width

    assert PROMPT_BUCKET == 32
    # 0 -> 0, 1 -> 32, 32 -> 32, 33 -> 64, 64 -> 64; bucket 4: 5 -> 8, 8 -> 8
    assert [bucket_width(w) for w in (0, 1, 32, 33, 64)] == [0, 32, 32, 64, 64]
    assert bucket_width(5, 4) == 8 and bucket_width(8, 4) == 8
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 1, 1, 1]])
    same = bucket_left_pad(ids, mask, 0, bucket=4)  # already 4 wide: the same tensors
    assert same[0] is ids and same[1] is mask
    padded = bucket_left_pad(ids[:, 1:], mask[:, 1:], 9, bucket=4)  # 3 -> 4: one pad column on the left
    assert padded[0].tolist() == [[9, 6, 7, 8]] and padded[1].tolist() == [[0, 1, 1, 1]]


# ============================================================================================ chunked log-probs
def _tiny_llama() -> Any:
    """A 1-layer Llama config: vocabulary 24, hidden 16, 2 heads over 1 KV head."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def test_chunk_bounds_cover_every_row_in_as_few_equal_slices_as_the_chunk_allows():
    """13 rows, chunks of at most 5: ceil(13 / 5) = 3 slices of ceil(13 / 3) = 5 rows, [0:5] [5:10] [10:15]
    (the last one holds the 3 rows left); 7 rows by 3: 3 slices of 3, [0:3] [3:6] [6:9]; 10 by 5: 2 of 5."""
    from stages.ppo.rollout import chunk_bounds

    head, cpu = torch.nn.Linear(4, 6, bias=False), torch.device("cpu")
    assert chunk_bounds(13, 5, head, cpu) == [slice(0, 5), slice(5, 10), slice(10, 15)]
    assert chunk_bounds(7, 3, head, cpu) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert chunk_bounds(10, 5, head, cpu) == [slice(0, 5), slice(5, 10)]
    assert chunk_bounds(4, 64, head, cpu) == [slice(0, 4)]
    rows = list(range(13))
    assert sorted(r for part in chunk_bounds(13, 5, head, cpu) for r in rows[part]) == rows


def test_chunked_logprobs_of_a_batch_whose_tokens_do_not_divide_into_the_chunks_equal_the_reference():
    """B = 1, R = 7 response tokens in chunks of 3 (7 = 3 + 3 + 1): the same log-probs as the full logits."""
    from transformers import LlamaForCausalLM

    from stages.ppo.rollout import response_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama())
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])  # prompt 3, response 7
    mask, tokens = torch.ones_like(ids), ids[:, 3:]
    with torch.no_grad():
        ref = response_logprobs(model, ids, mask, 3, tokens)[0]
        fast = response_logprobs(model, ids, mask, 3, tokens, chunk_tokens=3)[0]
    assert fast.shape == ref.shape == (1, 7) and torch.allclose(fast, ref, atol=1e-5)


def test_a_model_found_unfit_for_chunking_takes_the_full_logits_path_at_once_on_later_calls():
    """A model whose logits are its head's output times 2.5 (a transform `head_transform` does not know): the
    first chunked call runs the hidden-state forward, finds the head unfit (one warning) and runs the reference
    forward, 2 forwards; every later call goes straight to the reference, 1 forward, no warning."""
    import warnings

    from transformers import LlamaForCausalLM

    from stages.ppo.rollout import response_logprobs

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.5
            return out

    torch.manual_seed(0)
    model = Scaled(_tiny_llama())
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(1))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask, tokens = torch.ones_like(ids), ids[:, 2:]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = response_logprobs(model, ids, mask, 2, tokens, chunk_tokens=2)[0]
        assert len(forwards) == 2 and len(caught) == 1
        second = response_logprobs(model, ids, mask, 2, tokens, chunk_tokens=2)[0]
        assert len(forwards) == 3 and len(caught) == 1
        ref = response_logprobs(model, ids, mask, 2, tokens)[0]
    assert torch.equal(first, ref) and torch.equal(second, ref)
