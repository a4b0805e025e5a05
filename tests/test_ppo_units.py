"""Unit tests of the PPO building blocks (stages/ppo/{rollout,experience,models,monitor,presets,prompts}.py)
against hand-computed values, with tiny random-init models built in-process (CPU, offline, a few seconds)."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from conftest import floor_within_rounding, invoke_cli, write_yaml
from rlhf_cli.config_loader import apply_override, parse_override
from stages.config import (
    GenerationConfig,
    MonitorConfig,
    PPOAlgoConfig,
    PPOConfig,
    PPODataConfig,
    PPOTrainConfig,
)
from stages.data import BadRowLog
from stages.errors import CheckpointError, DataError
from stages.models import PAD, enable_activation_checkpointing, ensure_distinct_pad, train_tokenizer
from stages.ppo import experience
from stages.ppo.experience import (
    GlobalMeans,
    advantages_for,
    global_moments,
    kl_per_token,
    merge_across_ranks,
    transform_scores,
)
from stages.ppo.ending import RewardEnding
from stages.ppo.models import ValueModel, check_tokenizers, disable_dropout, is_dropout_name, stop_token_ids
from stages.ppo.monitor import collapse_reasons
from stages.ppo.presets import DEFAULT_PRESET, PRESETS, TRICK_FLAGS, fill_preset, flag_overrides
from stages.ppo.prompts import load_prompts
from stages.ppo.rollout import (
    Rollout,
    left_pad,
    logprob_temperature,
    nucleus_floor,
    nucleus_floor_searched,
    nucleus_floor_sorted,
    process_logits,
    repetition_rate,
    response_lists,
    response_logits,
    sample,
    raw_scores,
    token_logprobs,
)
from stages.ppo.trainer import score_rollout
from stages.ppo.tricks import RunningMoments, policy_loss, value_loss
from stages.reward_model import positions_from_mask

VOCAB, PAD_ID = 40, 0
CPU = torch.device("cpu")
NEG_INF = float("-inf")
LOG2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(**kw) -> GenerationConfig:
    """Every sampling transform off unless given; the reference (dynamic) cache, which the stand-in models
    below support."""
    return GenerationConfig(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                               "cache": "dynamic", **kw})


def _arch(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       pad_token_id=PAD_ID, **kw)


def _gpt2_arch(**kw) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=16, n_inner=32, n_layer=1, n_head=2, n_positions=64,
                      pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=1, **kw)


def _llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    # a wide init so that the greedy next token is never a near-tie (float noise of cache vs no cache ~1e-7)
    torch.manual_seed(seed)
    return LlamaForCausalLM(_arch(initializer_range=0.3, **kw)).eval()


def _causal(kind: str) -> torch.nn.Module:
    """Llama (rotary positions: a constant shift of a row's positions changes nothing) or GPT-2 (learned absolute
    positions: a left-padded row gives the unpadded row's outputs only with the right position ids)."""
    if kind == "llama":
        return _llama()
    torch.manual_seed(0)
    return GPT2LMHeadModel(_gpt2_arch(initializer_range=0.3)).eval()


ARCHS = pytest.mark.parametrize("kind", ["llama", "gpt2"])
CACHES = pytest.mark.parametrize("cache", ["static", "dynamic"])


def _kept(z: torch.Tensor) -> list[list[int]]:
    """Indices of the finite scores of each row."""
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in z]


def _none(z: torch.Tensor) -> torch.Tensor:
    """An empty generation history for the rows of `z` (nothing generated yet)."""
    return torch.zeros(z.shape[0], 0, dtype=torch.long)


# ============================================================================================ process_logits
def test_process_logits_all_off_is_the_identity_in_float32():
    z = torch.tensor([[1.5, -2.0, 0.0, 3.0]], dtype=torch.bfloat16)
    out = process_logits(z, torch.tensor([[0, 1, 2, 3]]), _gen())
    assert out.dtype == torch.float32 and out.tolist() == [[1.5, -2.0, 0.0, 3.0]]


def test_repetition_penalty_once_on_each_generated_token_positive_divided_negative_multiplied():
    z = torch.tensor([[3.0, 2.0, -1.0, 1.0, -4.0, 0.0]])
    history = torch.tensor([[0, 2, 5, 0, 0]])  # token 0 generated three times: penalised once
    out = process_logits(z, history, _gen(repetition_penalty=2.0))
    # generated: 3 -> 3/2, -1 -> -1*2, 0 -> 0; others 2, 1, -4 unchanged (also the negative one)
    assert out.tolist() == [[1.5, 2.0, -2.0, 1.0, -4.0, 0.0]]
    # penalty 1 (off): unchanged even where generated; the input itself is never modified
    assert process_logits(z, history, _gen()).tolist() == z.tolist()
    assert z.tolist() == [[3.0, 2.0, -1.0, 1.0, -4.0, 0.0]]


def test_penalty_on_the_generated_positions_equals_the_whole_vocabulary_formula():
    # process_logits penalises by gather/scatter over the [B, t] history; the formula applied to every column
    # where the token was generated must give the same bits (random logits of both signs, repeated tokens)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 97, generator=g).to(torch.bfloat16)
    history = torch.randint(0, 97, (5, 40), generator=g)
    seen = torch.zeros(5, 97, dtype=torch.bool).scatter_(1, history, True)
    zf = z.float()
    expected = torch.where(seen, torch.where(zf > 0, zf / 1.3, zf * 1.3), zf) / 0.7
    assert torch.equal(process_logits(z, history, _gen(repetition_penalty=1.3, temperature=0.7)), expected)


def test_vocab_size_and_banned_ids_are_masked_before_top_p():
    # probabilities [0.1, 0.2, 0.3, 0.4]: id 3 lies beyond a vocab_size of 3, id 2 is banned -> only 0 and 1
    # compete, renormalised [1/3, 2/3]: top-p 0.5 keeps id 1 alone (without the masks it would keep {3, 2})
    z = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    assert _kept(process_logits(z, _none(z), _gen(top_p=0.5))) == [[2, 3]]
    out = process_logits(z, _none(z), _gen(top_p=0.5), vocab_size=3, banned=torch.tensor([2]))
    assert _kept(out) == [[1]]
    assert process_logits(z, _none(z), _gen(), vocab_size=3)[0, 3] == NEG_INF  # masked to -inf, not merely low
    # the repetition penalty does not un-mask a banned id or one beyond vocab_size that the history holds:
    # [3, 2, 1, -1] with ids 1 and 3 banned / beyond 3, history {0, 1, 3}, penalty 2: [1.5, -inf, 1, -inf]
    out = process_logits(torch.tensor([[3.0, 2.0, 1.0, -1.0]]), torch.tensor([[1, 3, 0]]),
                         _gen(repetition_penalty=2.0), vocab_size=3, banned=torch.tensor([1]))
    assert out.tolist() == [[1.5, NEG_INF, 1.0, NEG_INF]]


def test_a_stop_id_without_a_logit_column_is_not_held_before_min_new_tokens():
    """Stop ids are sorted and deduplicated; those below the logits' width are the ones masked until
    min_new_tokens (an id equal to the width has no column: masking it would be an IndexError)."""
    from stages.ppo.rollout import DrawState

    state = DrawState.start(2, 3, 5, [7, 2, 5, 2], CPU)
    assert state.stops.tolist() == [2, 5, 7] and state.held.tolist() == [2]
    out = sample(_llama(), *left_pad([[5, 9], [3]], PAD_ID, CPU), _gen(top_k=1, max_new_tokens=3, min_new_tokens=2),
                 [VOCAB], PAD_ID, VOCAB)
    assert out.response.shape == (2, 3) and out.truncated.tolist() == [True, True]


def test_temperature_divides_after_the_penalty():
    z = torch.tensor([[3.0, 2.0, -1.0, 1.0]])
    out = process_logits(z, torch.tensor([[2, 0]]), _gen(repetition_penalty=2.0, temperature=0.5))
    # penalty [1.5, 2, -2, 1], then / 0.5
    assert out.tolist() == [[3.0, 4.0, -4.0, 2.0]]


def test_top_k_keeps_the_k_largest_and_k_0_or_k_ge_vocab_is_off():
    z = torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.5, -1.0, -3.0, 9.0]])
    out = process_logits(z, _none(z), _gen(top_k=2))
    assert out.tolist() == [[NEG_INF, 4.0, NEG_INF, 3.0], [0.5, NEG_INF, NEG_INF, 9.0]]
    for k in (0, 4, 10):
        assert process_logits(z, _none(z), _gen(top_k=k)).tolist() == z.tolist()
    # k = V - 1 (the largest k that drops anything) drops the smallest
    assert process_logits(z, _none(z), _gen(top_k=3)).tolist() == [[NEG_INF, 4.0, 2.0, 3.0], [0.5, -1.0, NEG_INF, 9.0]]


@pytest.mark.parametrize("top_p, kept", [
    # row 0: p = [0.2, 0.5, 0.3] -> sorted 0.5 (idx 1), 0.3 (idx 2), 0.2 (idx 0); mass ranked above: 0, 0.5, 0.8
    # row 1: p = [0.15, 0.05, 0.8] -> sorted 0.8 (idx 2), 0.15 (idx 0), 0.05 (idx 1); mass above: 0, 0.8, 0.95
    (0.01, [[1], [2]]),  # at least one token always survives
    (0.45, [[1], [2]]),  # 0.5 alone reaches 0.45
    (0.55, [[1, 2], [2]]),  # row 0: 0.5 < 0.55, the second one is needed; row 1: 0.8 alone
    (0.85, [[0, 1, 2], [0, 2]]),  # row 0: 0.8 < 0.85, all three; row 1: 0.8 < 0.85 <= 0.95, two
    (1.0, [[0, 1, 2], [0, 1, 2]]),  # off
])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, kept):
    z = torch.tensor([[0.2, 0.5, 0.3], [0.15, 0.05, 0.8]]).log()
    out = process_logits(z, _none(z), _gen(top_p=top_p))
    assert _kept(out) == kept
    assert torch.equal(out[torch.isfinite(out)], z[torch.isfinite(out)])  # survivors keep their score


#: probabilities with hand-known top-p floors: row 0 cumulative 0.5, 0.8, 0.95, 1; row 1 a three-way tie at 0.2
#: after 0.4; row 2 uniform
FLOOR_ROWS = [[0.5, 0.3, 0.15, 0.05], [0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]]


@pytest.mark.parametrize("floor", [nucleus_floor_sorted, nucleus_floor_searched])
@pytest.mark.parametrize("top_p, expected", [
    (0.3, [0.5, 0.4, 0.25]),  # the top token alone reaches 0.3 (row 2: one of the tied four, all four kept)
    (0.5, [0.5, 0.2, 0.25]),  # row 0: 0.5 reaches 0.5 exactly; row 1: 0.4 < 0.5, the tie at 0.2 is needed
    (0.7, [0.3, 0.2, 0.25]),
    (0.9, [0.15, 0.2, 0.25]),
    (0.99, [0.05, 0.2, 0.25]),
])
def test_nucleus_floor_is_the_least_probability_of_the_smallest_set_reaching_p(floor, top_p, expected):
    probs = torch.tensor(FLOOR_ROWS)
    assert torch.equal(floor(probs, top_p), torch.tensor(expected)[:, None])


def test_top_p_keeps_or_drops_tokens_tied_at_the_edge_together():
    # [0.4, 0.2, 0.2, 0.2], top-p 0.5: 0.4 is not enough and the second token ranked could be any of the three
    # tied ones; a sort keeping exactly one of them would pick by the sort's order (not stable on a GPU)
    z = torch.tensor([FLOOR_ROWS[1]]).log()
    assert _kept(process_logits(z, _none(z), _gen(top_p=0.5))) == [[0, 1, 2, 3]]
    assert _kept(process_logits(z, _none(z), _gen(top_p=0.3))) == [[0]]


def test_nucleus_floor_by_search_equals_the_sorted_one_up_to_summation_rounding_eager_and_compiled():
    """bf16 logits (a model's) tie often: rows of several widths, flat and peaked, at several p. The two floors
    sum the same probabilities in different orders, so where S(v) passes top_p within rounding they may cut a
    group of tied tokens apart: each floor must be the float64 one up to 1e-5 of mass (`floor_within_rounding`),
    and most rows agree exactly. Compiled
    (inductor, as generation.compile runs it) on rows as wide as Qwen2.5's vocabulary, and process_logits with
    generation.compile then keeps the same tokens as without, up to the same few."""
    g = torch.Generator().manual_seed(0)
    rows_apart = rows_total = 0
    for vocab, rows in ((7, 64), (97, 32), (5000, 16), (151936, 4)):
        for scale in (0.1, 1.0, 3.0, 10.0):
            probs = torch.softmax((torch.randn(rows, vocab, generator=g) * scale).to(torch.bfloat16).float(), -1)
            for top_p in (0.1, 0.5, 0.9, 0.999):
                sorted_, searched = nucleus_floor_sorted(probs, top_p), nucleus_floor_searched(probs, top_p)
                assert floor_within_rounding(probs, sorted_, top_p).all(), (vocab, scale, top_p)
                assert floor_within_rounding(probs, searched, top_p).all(), (vocab, scale, top_p)
                rows_apart += int((sorted_ != searched).sum())
                rows_total += rows
    assert rows_apart <= rows_total // 100, (rows_apart, rows_total)
    z = (torch.randn(8, 151936, generator=g) * 2).to(torch.bfloat16)
    probs = torch.softmax(z.float() / 0.7, -1)
    compiled = nucleus_floor(probs, 0.9, compiled=True)
    assert floor_within_rounding(probs, compiled, 0.9).all()
    settings = dict(temperature=0.7, top_p=0.9, cache="static")
    plain = process_logits(z, _none(z), GenerationConfig(**settings))
    fast = process_logits(z, _none(z), GenerationConfig(**settings, compile=True))
    assert torch.equal(fast[torch.isfinite(fast)], plain[torch.isfinite(fast)])  # survivors keep their score
    apart = torch.isfinite(fast) != torch.isfinite(plain)
    assert torch.where(apart, probs, 0).sum(-1).max() <= 1e-5
    assert 0 < torch.isfinite(plain).sum() < plain.numel()  # the nucleus cut something and kept something


def test_penalty_comes_before_top_k():
    z = torch.tensor([[3.0, 2.0, -1.0, 1.0]])
    history = torch.tensor([[0]])
    # penalised: [1.5, 2, -1, 1] -> top-1 is token 1 (unpenalised it would be token 0)
    out = process_logits(z, history, _gen(repetition_penalty=2.0, top_k=1))
    assert _kept(out) == [[1]]
    assert _kept(process_logits(z, history, _gen(top_k=1))) == [[0]]


def test_temperature_comes_before_top_p():
    z = torch.tensor([[0.5, 0.3, 0.2]]).log()
    none = _none(z)
    # T = 1: mass above = 0, 0.5, 0.8 -> top-p 0.6 keeps {0, 1}
    assert _kept(process_logits(z, none, _gen(top_p=0.6))) == [[0, 1]]
    # T = 0.5: p ~ p^2 = [0.25, 0.09, 0.04] / 0.38 = [0.658, 0.237, 0.105] -> top-p 0.6 keeps {0} only
    out = process_logits(z, none, _gen(top_p=0.6, temperature=0.5))
    assert _kept(out) == [[0]]
    assert out[0, 0].item() == pytest.approx(math.log(0.5) / 0.5)


def test_top_k_comes_before_top_p():
    z = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    none = _none(z)
    # top-k 2 first: renormalised [4/7, 3/7] -> mass above token 1 is 0.571 >= 0.5 -> only token 0 survives.
    # (top-p first on [0.4, 0.3, 0.2, 0.1] would keep {0, 1}: mass above token 1 is 0.4 < 0.5.)
    assert _kept(process_logits(z, none, _gen(top_k=2, top_p=0.5))) == [[0]]
    assert _kept(process_logits(z, none, _gen(top_p=0.5))) == [[0, 1]]


# ============================================================================================ sample
def _greedy_reference(model, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Step-by-step argmax over full no-cache forwards of the unpadded prompt + what was generated, with the
    repetition penalty applied by hand to the generated tokens only."""
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            z = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        if penalty != 1.0:
            for t in set(out):
                z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
        tok = int(z.argmax())
        out.append(tok)
        ids.append(tok)
    return out


PROMPTS = [[5, 9, 12, 3, 7], [21, 4], [33, 8, 15]]


@CACHES
@ARCHS
def test_greedy_kv_cache_sampling_on_left_padded_prompts_equals_no_cache_argmax(kind, cache):
    model = _causal(kind)
    n = 8
    refs = [_greedy_reference(model, p, n) for p in PROMPTS]
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    out = sample(model, ids, mask, _gen(top_k=1, max_new_tokens=n, cache=cache), [VOCAB + 5], PAD_ID, VOCAB)  # no stop
    assert out.response.tolist() == refs
    assert out.response_mask.tolist() == [[1] * n] * 3
    assert out.truncated.tolist() == [True, True, True]
    assert torch.equal(out.prompt_ids, ids) and torch.equal(out.prompt_mask, mask)


@CACHES
@ARCHS
def test_greedy_sampling_stops_rows_at_a_stop_token(kind, cache):
    model = _causal(kind)
    n = 8
    refs = [_greedy_reference(model, p, n) for p in PROMPTS]
    # a stop id that some rows produce before their last step and another row never produces (chosen from the
    # greedy trajectories, which do not depend on the stop ids)
    stop = next(t for t in sorted({t for r in refs for t in r})
                if any(t in r[:-1] for r in refs) and not all(t in r for r in refs))
    cut = [r.index(stop) + 1 if stop in r else n for r in refs]
    out = sample(model, *left_pad(PROMPTS, PAD_ID, CPU), _gen(top_k=1, max_new_tokens=n, cache=cache), [stop], PAD_ID,
                 VOCAB)
    width = max(cut)
    assert out.response.shape == (3, width)
    for i, r in enumerate(refs):
        assert out.response[i].tolist() == r[: cut[i]] + [PAD_ID] * (width - cut[i])
        assert out.response_mask[i].tolist() == [1] * cut[i] + [0] * (width - cut[i])
    assert out.truncated.tolist() == [stop not in r for r in refs]
    assert any(out.truncated.tolist()) and not all(out.truncated.tolist())


@CACHES
@ARCHS
def test_greedy_sampling_penalises_generated_tokens_but_not_the_prompt(kind, cache):
    model = _causal(kind)
    n = 8
    refs = [_greedy_reference(model, p, n, penalty=3.0) for p in PROMPTS]
    assert refs != [_greedy_reference(model, p, n) for p in PROMPTS]  # the penalty matters here
    out = sample(model, *left_pad(PROMPTS, PAD_ID, CPU), _gen(top_k=1, repetition_penalty=3.0, max_new_tokens=n, cache=cache),
                 [VOCAB + 5], PAD_ID, VOCAB)
    assert out.response.tolist() == refs


class Scripted(torch.nn.Module):
    """A stand-in causal LM: at decoding step s, row b's next token is script[b][s] (logit 10, the rest 0;
    `base` sets the rest instead). Records every call's inputs."""

    def __init__(self, script: list[list[int]], prompt_width: int, vocab: int = VOCAB,
                 base: torch.Tensor | None = None) -> None:
        super().__init__()
        self.script, self.prompt_width, self.vocab, self.base = script, prompt_width, vocab, base
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        step = attention_mask.shape[1] - self.prompt_width
        self.calls.append({"ids": input_ids.clone(), "mask": attention_mask.clone(), "pos": position_ids.clone(),
                           "past": past_key_values})
        b, length = input_ids.shape
        logits = torch.zeros(b, length, self.vocab) if self.base is None else self.base.repeat(b, length, 1)
        for row, script in enumerate(self.script):
            if step < len(script):
                logits[row, -1, script[step]] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=("cache", step))


def test_sample_stop_mask_pad_and_truncation_flags_with_a_scripted_model():
    prompts = [[4, 5], [6, 7, 8], [9]]
    ids, mask = left_pad(prompts, PAD_ID, CPU)
    model = Scripted([[5, 6, 2], [8, 9, 10, 11], [3, 30]], prompt_width=3)
    out = sample(model, ids, mask, _gen(top_k=1, max_new_tokens=3), [2, 3], PAD_ID, VOCAB)
    # row 0 stops on its last allowed step (not truncated), row 1 never stops, row 2 stops at once (stop id 3)
    assert out.response.tolist() == [[5, 6, 2], [8, 9, 10], [3, PAD_ID, PAD_ID]]
    assert out.response_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert out.truncated.tolist() == [False, True, False]
    # prompt forward, then one forward per further step (none after the last step)
    assert len(model.calls) == 3
    first, second, third = model.calls
    assert first["pos"].tolist() == [[0, 0, 1], [0, 1, 2], [0, 0, 0]] and first["past"] is None
    # the stop token itself is fed with mask 1; a finished row is fed pad with mask 0
    assert second["ids"].tolist() == [[5], [8], [3]] and second["mask"][:, -1].tolist() == [1, 1, 1]
    assert third["ids"].tolist() == [[6], [9], [PAD_ID]] and third["mask"][:, -1].tolist() == [1, 1, 0]
    # positions continue each row's own count of real prompt tokens (2, 3, 1)
    assert second["pos"].tolist() == [[2], [3], [1]] and third["pos"].tolist() == [[3], [4], [2]]
    assert second["past"] == ("cache", 0) and third["past"] == ("cache", 1)


def test_sample_with_pad_equal_to_the_stop_id_masks_by_the_sampler_not_by_the_ids():
    """A tokenizer without a pad token gets pad = EOS (prepare_tokenizer): the response mask comes from the
    sampler's own flags, so each real EOS stays in (mask 1: its reward is read there) and the padding after it
    is out, though the two are the same id (a peer's bug: masking by id dropped the real EOS)."""
    ids, mask = left_pad([[4, 5], [6, 7, 8], [9]], 2, CPU)
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]
    model = Scripted([[5, 6, 2], [8, 9, 10, 11], [2, 30]], prompt_width=3)
    out = sample(model, ids, mask, _gen(top_k=1, max_new_tokens=3), [2], 2, VOCAB)
    assert out.response.tolist() == [[5, 6, 2], [8, 9, 10], [2, 2, 2]]
    assert out.response_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert out.truncated.tolist() == [False, True, False]


@pytest.mark.parametrize("ahead, forwards", [(False, 2), (True, 3)])
def test_sample_ends_early_when_every_row_has_stopped(ahead, forwards):
    ids, mask = left_pad([[4, 5], [6]], PAD_ID, CPU)
    model = Scripted([[5, 2, 7, 7], [2, 7, 7, 7]], prompt_width=2)
    out = sample(model, ids, mask, _gen(top_k=1, max_new_tokens=6), [2], PAD_ID, VOCAB, queue_ahead=ahead)
    assert out.response.tolist() == [[5, 2], [2, PAD_ID]]
    assert out.response_mask.tolist() == [[1, 1], [1, 0]]
    assert out.truncated.tolist() == [False, False]
    # queued ahead (the GPU default), the forward after the last step was already on its way when the host saw
    # that every row had stopped: one forward more, its logits dropped
    assert len(model.calls) == forwards


@CACHES
def test_queueing_the_next_forward_ahead_draws_the_same_tokens(cache):
    model = _llama()
    prompts = [[5, 9, 12], [21, 4], [33, 8, 15], [1, 2, 3]] * 3
    out = []
    for ahead in (False, True):
        torch.manual_seed(4)
        out.append(sample(model, *left_pad(prompts, PAD_ID, CPU), _gen(max_new_tokens=10, cache=cache), [2, 3],
                          PAD_ID, VOCAB, queue_ahead=ahead))
    assert torch.equal(out[0].response, out[1].response) and torch.equal(out[0].truncated, out[1].truncated)
    assert torch.equal(out[0].response_mask, out[1].response_mask)
    assert 12 < int(out[0].response_mask.sum()) < 120  # some rows stopped early, some later


def test_sampling_runs_the_model_in_eval_mode_and_restores_each_modules_mode():
    # the policy is a training engine's module (training mode, maybe gradient checkpointing): transformers
    # before 5.24 then drops each layer's KV cache, so sampling must run in eval mode
    model = _llama().train()
    model.model.norm.eval()  # a submodule in its own mode stays so
    seen: list[bool] = []
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    sample(model, *left_pad(PROMPTS, PAD_ID, CPU), _gen(max_new_tokens=4, min_new_tokens=4), [2], PAD_ID, VOCAB)
    assert len(seen) == 4 and not any(seen)  # prefill + 3 steps, all in eval mode
    assert model.training and model.model.layers[0].training and not model.model.norm.training


def test_sampling_runs_without_the_input_grad_hooks_of_gradient_checkpointing_and_restores_them():
    # activation (gradient) checkpointing hooks the input embeddings (output.requires_grad_(True)): useless without
    # gradients, and torch 2.11's dynamo breaks the compiled decoding step into two graphs at it
    model = _llama().train()
    enable_activation_checkpointing(model)
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(False)
    assert len(emb._forward_hooks) == 1 and emb(torch.tensor([[1, 2]])).requires_grad  # the hook's doing
    seen: list[int] = []
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(len(emb._forward_hooks)))
    sample(model, *left_pad(PROMPTS, PAD_ID, CPU), _gen(max_new_tokens=4, min_new_tokens=4), [2], PAD_ID, VOCAB)
    assert seen == [0] * 4  # prefill + 3 steps without it
    assert len(emb._forward_hooks) == 1 and emb(torch.tensor([[1, 2]])).requires_grad  # back for training


@CACHES
def test_tokens_at_or_above_vocab_size_are_never_sampled(cache):
    # a real model with 40 embedding rows but a 30-token vocabulary, plain sampling: without the mask a quarter
    # of the draws would land on 30..39
    model = _llama()
    prompts = [[5, 9, 12], [21, 4], [33, 8, 15], [1, 2, 3]] * 3
    torch.manual_seed(1)
    out = sample(model, *left_pad(prompts, PAD_ID, CPU), _gen(max_new_tokens=12, cache=cache), [VOCAB + 5], PAD_ID,
                 30)
    assert out.response.numel() == 144 and int(out.response.max()) < 30
    # and the scripted model whose favourite token is 35: never drawn
    base = torch.zeros(VOCAB)
    base[35] = 8.0
    torch.manual_seed(2)
    out = sample(Scripted([], 1, base=base), *left_pad([[4]] * 16, PAD_ID, CPU), _gen(max_new_tokens=8), [99],
                 PAD_ID, 30)
    assert int(out.response.max()) < 30


@pytest.mark.parametrize("gen", [_gen(top_k=1, max_new_tokens=4), _gen(top_p=0.5, max_new_tokens=4)],
                         ids=["top_k=1", "top_p=0.5"])
def test_vocab_mask_applies_before_top_k_and_top_p(gen):
    # logits: token 35 (not a token: vocab_size 30) = 10, token 7 = 5, the rest 0. Over the real vocabulary
    # token 7 has p = e^5 / (e^5 + 29) = 0.84: greedy and top-p 0.5 both must give 7 (a stop id).
    base = torch.zeros(VOCAB)
    base[35], base[7] = 10.0, 5.0
    out = sample(Scripted([], 1, base=base), *left_pad([[4], [5]], PAD_ID, CPU), gen, [7], PAD_ID, 30)
    assert out.response.tolist() == [[7], [7]]


@CACHES
def test_same_seed_same_samples(cache):
    model = _llama()
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    gen = GenerationConfig(max_new_tokens=10, cache=cache)  # the paper's sampling: T 0.8, top-p 0.9, penalty 1.1

    def draw(seed):
        torch.manual_seed(seed)
        return sample(model, ids, mask, gen, [1], PAD_ID, VOCAB)

    a, b, c = draw(123), draw(123), draw(124)
    assert torch.equal(a.response, b.response) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.truncated, b.truncated)
    assert not torch.equal(a.response, c.response)


# ============================================================================================ scoring
def test_token_logprobs_and_entropy_hand_values_across_chunks():
    # one position per row, V = 3; chunk 2 < batch 3
    logits = torch.tensor([[[0.0, 0.0, LOG2]], [[1.0, 1.0, 1.0]], [[0.0, -1e4, -1e4]]])
    tokens = torch.tensor([[2], [0], [0]])
    lp, ent = token_logprobs(logits, tokens, with_entropy=True, chunk=2)
    # p = [0.25, 0.25, 0.5]: log 0.5, H = 1.5 log 2; uniform: log 1/3, H = log 3; one-hot: 0, 0
    assert lp.flatten().tolist() == pytest.approx([math.log(0.5), -math.log(3), 0.0], abs=1e-6)
    assert ent.flatten().tolist() == pytest.approx([1.5 * LOG2, math.log(3), 0.0], abs=1e-6)
    assert token_logprobs(logits, tokens)[1] is None


def test_token_logprobs_leave_out_the_embedding_rows_the_sampler_never_draws():
    # a 4th embedding row past the tokenizer (vocab 3): the distribution over the first 3 is p = [0.25, 0.25, 0.5]
    logits = torch.tensor([[[0.0, 0.0, LOG2, 5.0]], [[1.0, 1.0, 1.0, 1.0]]])
    lp, ent = token_logprobs(logits, torch.tensor([[2], [0]]), with_entropy=True, vocab=3)
    assert lp.flatten().tolist() == pytest.approx([math.log(0.5), -math.log(3)], abs=1e-6)
    assert ent.flatten().tolist() == pytest.approx([1.5 * LOG2, math.log(3)], abs=1e-6)
    every_row = token_logprobs(logits, torch.tensor([[2], [0]]), vocab=None)[0]
    assert every_row.flatten().tolist() == pytest.approx([LOG2 - math.log(4 + math.exp(5)), -math.log(4)], abs=1e-6)
    assert torch.equal(token_logprobs(logits, torch.tensor([[2], [0]]), vocab=4)[0], every_row)


def test_token_logprobs_leave_out_held_ids_at_the_first_positions_and_keep_the_logits():
    """`Held` ids (stop ids before min_new_tokens) have probability 0 at the first `steps` positions: position 0
    without id 2 is p = [1/3, 2/3]; position 1 keeps all three. A float32 caller's logits are not changed."""
    from stages.ppo.rollout import Held

    logits = torch.tensor([[[0.0, LOG2, 5.0], [0.0, LOG2, 5.0]]])
    before = logits.clone()
    lp, ent = token_logprobs(logits, torch.tensor([[1, 1]]), with_entropy=True, held=Held((2,), 1))
    assert lp.flatten().tolist() == pytest.approx([math.log(2 / 3), LOG2 - math.log(3 + math.exp(5))], abs=1e-6)
    assert ent[0, 0].item() == pytest.approx(-(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3), abs=1e-6)
    assert torch.equal(logits, before)
    assert torch.equal(token_logprobs(logits, torch.tensor([[1, 1]]), held=Held((2,), 0))[0],
                       token_logprobs(logits, torch.tensor([[1, 1]]))[0])  # (no step held: none)


def test_token_logprobs_at_a_temperature_are_those_of_the_scaled_logits():
    # logits 2 z at T = 2 are z: p = [0.25, 0.25, 0.5] again
    logits = torch.tensor([[[0.0, 0.0, 2 * LOG2]], [[2.0, 2.0, 2.0]]])
    lp, ent = token_logprobs(logits, torch.tensor([[2], [0]]), with_entropy=True, temperature=2.0)
    assert lp.flatten().tolist() == pytest.approx([math.log(0.5), -math.log(3)], abs=1e-6)
    assert ent.flatten().tolist() == pytest.approx([1.5 * LOG2, math.log(3)], abs=1e-6)
    assert logprob_temperature(_gen(temperature=0.7)) == 1.0  # the default: the model's own distribution
    # gradients through the scaling: in place on the float32 copy of bf16 logits, out of place on float32 ones
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (2, 3), generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(2, 3, 7, generator=gen) * 3).to(dtype).requires_grad_()
        lp, ent = token_logprobs(x, tokens, with_entropy=True, temperature=0.7)
        (lp.sum() + ent.sum()).backward()
        y = x.detach().clone().requires_grad_()
        logp_all = torch.log_softmax(y.float() / 0.7, -1)
        (logp_all.gather(-1, tokens[..., None]).sum() - (logp_all.exp() * logp_all).sum()).backward()
        assert torch.allclose(x.grad.float(), y.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert logprob_temperature(_gen(temperature=0.7, logprobs_at_temperature=True)) == 0.7


@pytest.mark.parametrize("at_temperature", [False, True])
def test_score_rollout_takes_policy_and_reference_logprobs_at_the_configured_temperature(at_temperature):
    """score_rollout's old and reference log-probs and entropy, on the fast (chunked) path, against
    log_softmax(logits / T) of a plain forward: T = generation.temperature (0.5) with logprobs_at_temperature,
    else 1."""
    policy, reference = _llama(0), _llama(1)
    p_ids, p_mask = left_pad(PROMPTS, PAD_ID, CPU)
    resp = torch.tensor([[11, 2], [13, 14], [16, 3]])
    rollout = Rollout(p_ids, p_mask, resp, torch.ones_like(resp), torch.tensor([False, True, False]))
    models = {"policy": policy, "reference": reference, "critic": lambda i, m: torch.zeros(i.shape, dtype=torch.float),
              "reward": lambda i, m: (torch.zeros(i.shape[0]),)}
    gen = _gen(temperature=0.5, logprobs_at_temperature=at_temperature)
    cfg = SimpleNamespace(train=SimpleNamespace(forward_batch_size=2, micro_batch_size=2, logprob_chunk=3),
                          generation=gen)
    exp = score_rollout(cfg, models, rollout, RewardEnding.plain(2))
    ids, mask = rollout.sequences()
    t = 0.5 if at_temperature else 1.0
    for key, model in (("logp", policy), ("ref_logp", reference)):
        with torch.no_grad():
            logp_all = torch.log_softmax(response_logits(model, ids, mask, rollout.prompt_width) / t, -1)
        assert torch.allclose(exp[key], logp_all.gather(-1, resp[..., None]).squeeze(-1), atol=1e-5), key
        if key == "logp":
            assert torch.allclose(exp["entropy"], -(logp_all.exp() * logp_all).sum(-1), atol=1e-5)


def test_token_logprobs_equal_log_softmax_gather_and_entropy_minus_p_log_p():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 3, 7, generator=gen) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, 7, (5, 3), generator=gen)
    lp, ent = token_logprobs(logits, tokens, with_entropy=True, chunk=2)
    z = logits.float()
    logp_all = torch.log_softmax(z, -1)
    assert lp.dtype == torch.float32 and lp.shape == (5, 3)
    assert torch.allclose(lp, logp_all.gather(-1, tokens[..., None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent, -(logp_all.exp() * logp_all).sum(-1), atol=1e-5)


@ARCHS
def test_response_logprobs_of_a_left_padded_batch_equal_each_sequence_alone(kind):
    model = _causal(kind)
    responses = [[11, 2], [13, 14, 15], [16]]
    p_ids, p_mask = left_pad(PROMPTS, PAD_ID, CPU)
    width = max(map(len, responses))
    resp = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in responses])
    rmask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    rollout = Rollout(p_ids, p_mask, resp, rmask, torch.tensor([False, True, False]))
    ids, mask = rollout.sequences()
    assert ids.shape == (3, 8) and mask.sum(1).tolist() == [7, 5, 4]
    with torch.no_grad():
        logits = response_logits(model, ids, mask, rollout.prompt_width)
    assert logits.shape == (3, width, VOCAB)
    lp, ent = token_logprobs(logits, resp, with_entropy=True, chunk=2)
    for i, (p, r) in enumerate(zip(PROMPTS, responses)):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) + len(r) - 1]
        logp = torch.log_softmax(alone, -1)
        assert torch.allclose(logits[i, : len(r)], alone, atol=1e-5)
        assert torch.allclose(lp[i, : len(r)], logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1), atol=1e-5)
        assert torch.allclose(ent[i, : len(r)], -(logp.exp() * logp).sum(-1), atol=1e-5)


@pytest.mark.parametrize("on_truncation", ["eos", "penalty"])
def test_reward_is_read_at_an_eos_after_any_stop_token_and_truncation_is_handled_per_setting(on_truncation):
    """Rows: ended on EOS (2); ended on another stop token (3, a chat template's end of turn); cut at the cap.
    The RM sees EOS after the other stop token either way (its training data puts EOS after the turn's end); the
    cut row gets EOS appended (eos) or is scored as it is with truncation_penalty subtracted (penalty)."""
    from stages.config import GenerationConfig

    seen = {}

    def rm(ids, mask):
        seen["ids"], seen["mask"] = ids.tolist(), mask.tolist()
        return (mask.sum(1).float(),)  # the score: how many tokens the RM attended to

    ids = torch.tensor([[0, 7, 5, 2, 0], [7, 7, 5, 3, 0], [0, 7, 5, 6, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    truncated = torch.tensor([False, False, True])
    gen = GenerationConfig(on_truncation=on_truncation, truncation_penalty=0.5)
    raw = raw_scores(gen, rm, ids, mask, truncated, RewardEnding.plain(2))
    cut_eos = on_truncation == "eos"
    assert seen["ids"] == [[0, 7, 5, 2, 0, 0], [7, 7, 5, 3, 0, 2], [0, 7, 5, 6, 8, 2 if cut_eos else 0]]
    assert seen["mask"] == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, int(cut_eos)]]
    assert raw.tolist() == [3.0, 5.0, 5.0 if cut_eos else 4.0 - 0.5]


@pytest.mark.parametrize("tokens, n, rate", [
    ([1, 2, 1, 2, 1, 2], 2, 0.6),  # 5 bigrams, 2 distinct
    ([1, 2, 3, 1, 2, 3], 3, 0.25),  # 123 231 312 123: 4, 3 distinct
    ([5, 5, 5, 5], 1, 0.75),  # 4 unigrams, 1 distinct
    ([1, 2, 3], 2, 0.0),
    ([1], 2, 0.0),  # no bigram
    ([], 3, 0.0),
])
def test_repetition_rate(tokens, n, rate):
    assert repetition_rate(tokens, n) == pytest.approx(rate)


@ARCHS
def test_the_zero3_sampling_copy_holds_the_trained_weights_after_each_refresh(kind):
    """GenerationCopy (ZeRO-3 runs sample from it) is refreshed once per rollout: after a refresh it equals the
    trained model tensor for tensor (GPT-2's tied head included) and gives its logits; after an optimizer step
    without a refresh it is stale. (Gathering a partitioned parameter is a no-op here; the two-process ZeRO-3
    PPO test runs the gathering.)"""
    from stages.ppo.models import GenerationCopy

    model = _causal(kind)
    copy = GenerationCopy(model, CPU)
    ids = torch.tensor([PROMPTS[0]])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        sampler = copy.refresh(model)
        assert sampler is copy.model and sampler.generation_config is model.generation_config
        mine, theirs = model.state_dict(), sampler.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, sampler(ids).logits)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            assert not torch.allclose(model(ids).logits, sampler(ids).logits)


def test_response_lists_drop_the_final_stop_token_and_padding():
    rollout = Rollout(
        torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long),
        torch.tensor([[5, 6, 1, 0], [7, 8, 9, 9], [3, 0, 0, 0]]),
        torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
        torch.tensor([False, True, False]),
    )
    assert response_lists(rollout, [1, 3]) == [[5, 6], [7, 8, 9, 9], []]
    assert response_lists(rollout, [1]) == [[5, 6], [7, 8, 9, 9], [3]]
    assert response_lists(rollout, []) == [[5, 6, 1], [7, 8, 9, 9], [3]]


# ============================================================================================ experience
@pytest.fixture(scope="module")
def single_process_group():
    """DeepSpeed's comm initialised for one CPU process. setup_distributed() writes RANK/LOCAL_RANK/WORLD_SIZE
    into os.environ; they are restored at once (the process group needs them no more), so that the CLI tests
    after the first user of this module-wide fixture do not look like launcher workers."""
    from stages.distributed import setup_distributed

    saved = dict(os.environ)
    info = setup_distributed()
    os.environ.clear()
    os.environ.update(saved)
    return info


def _moments(mean: float, std: float, count: float = 4.0) -> RunningMoments:
    return RunningMoments(count=count, mean=mean, m2=std * std * count)


@pytest.mark.parametrize("flags, expected", [
    ({}, [3.0, -1.0, 5.0]),
    ({"reward_scaling": True}, [1.5, -0.5, 2.5]),  # / std 2
    ({"reward_norm": True}, [1.0, -1.0, 2.0]),  # (s - 1) / 2
    ({"reward_clip": 2.0}, [2.0, -1.0, 2.0]),
    ({"reward_scaling": True, "reward_clip": 1.0}, [1.0, -0.5, 1.0]),
    ({"reward_norm": True, "reward_clip": 1.5}, [1.0, -1.0, 1.5]),
])
def test_transform_scores(flags, expected):
    out = transform_scores(torch.tensor([3.0, -1.0, 5.0]), _moments(mean=1.0, std=2.0), PPOAlgoConfig(**flags))
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("moments", [RunningMoments(count=1.0, mean=2.0, m2=0.0),  # one score seen
                                     RunningMoments(count=8.0, mean=2.0, m2=0.0)])  # eight equal scores
def test_reward_transforms_divide_by_1_until_the_scores_spread(moments):
    raw = torch.tensor([2.0])
    assert transform_scores(raw, moments, PPOAlgoConfig(reward_scaling=True)).tolist() == pytest.approx([2.0])
    assert transform_scores(raw, moments, PPOAlgoConfig(reward_norm=True)).tolist() == pytest.approx([0.0])
    moments.merge(1.0, 5.0, 0.0)  # a different score: now the running std divides (2, 5: 1.5; 8 x 2, 5: sqrt(8/9))
    assert moments.scale == moments.std == pytest.approx(1.5 if moments.count == 2 else (8 / 9) ** 0.5)
    assert transform_scores(raw, moments, PPOAlgoConfig(reward_scaling=True)).tolist() == pytest.approx(
        [2.0 / moments.std])


def test_reward_scaling_and_norm_are_exclusive():
    with pytest.raises(ValueError, match="alternatives"):
        PPOAlgoConfig(reward_scaling=True, reward_norm=True)


def test_merge_across_ranks_one_process_equals_update(single_process_group):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen) * 2 + 3 for n in (6, 1, 9)]
    merged, updated = RunningMoments(), RunningMoments()
    for b in batches:
        merge_across_ranks(merged, b, single_process_group.device)
        updated.update(b)
    allv = torch.cat(batches).double()
    assert merged.count == updated.count == 16
    assert merged.mean == pytest.approx(updated.mean) == pytest.approx(float(allv.mean()))
    assert merged.var == pytest.approx(updated.var) == pytest.approx(float(allv.var(unbiased=False)))
    merge_across_ranks(merged, torch.tensor([]), single_process_group.device)  # nothing anywhere: unchanged
    assert merged.count == 16


def test_merge_across_ranks_keeps_the_variance_of_scores_far_from_zero(single_process_group):
    # scores near 1e8 with std ~1: sum x^2 - n mean^2 in float64 cancels every digit of M2 (~1e19 - 1e19);
    # the deviations about the batch mean keep it exact
    gen = torch.Generator().manual_seed(0)
    batches = [1e8 + torch.randn(500, generator=gen, dtype=torch.float64) for _ in range(2)]
    m = RunningMoments()
    for b in batches:
        merge_across_ranks(m, b, single_process_group.device)
    allv = torch.cat(batches)
    assert m.count == 1000 and m.mean == pytest.approx(float(allv.mean()), rel=1e-15)
    assert m.var == pytest.approx(float(allv.var(unbiased=False)), rel=1e-9)


def test_merge_across_ranks_two_simulated_ranks_equal_the_concatenation(monkeypatch):
    mine, other = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([3.0, 8.0])
    # the other rank's [n, sum] = [2, 11], then, about the batch mean 4 over both ranks, its sum of squared
    # deviations (3 - 4)^2 + (8 - 4)^2 = 17: each all-reduce adds the other rank's part to this rank's
    other_parts = {2: torch.tensor([2.0, 11.0]), 1: torch.tensor([17.0])}
    monkeypatch.setattr(experience, "all_reduce_sum",
                        lambda v, device: v.double() + other_parts[v.numel()])
    m = _moments(mean=0.0, std=1.0, count=5.0)  # earlier scores: 5 values, mean 0, M2 5
    merge_across_ranks(m, mine, CPU)
    # batch over both ranks: [1, 2, 6, 3, 8]: n 5, mean 4, M2 9 + 4 + 4 + 1 + 16 = 34
    # merged with (5, 0, 5): mean 2, M2 = 5 + 34 + 16 * 25 / 10 = 79 -> var 7.9
    assert m.count == 10 and m.mean == pytest.approx(2.0) and m.m2 == pytest.approx(79.0)
    ref = _moments(mean=0.0, std=1.0, count=5.0)
    ref.update(torch.cat([mine, other]))
    assert (m.count, m.mean, m.m2) == pytest.approx((ref.count, ref.mean, ref.m2))


LOGP = torch.tensor([[0.5, 0.25, 0.5, 0.9]]).log()
REF_LOGP = torch.tensor([[0.25, 0.25, 1.0, 0.1]]).log()
VALUES = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # a 3-token response and one pad


def test_kl_estimators_k1_and_k3_hand_values():
    # k1 = log p - log p_ref = [log 2, 0, -log 2]; k3 with ratio = p_ref / p = [0.5, 1, 2]: (r - 1) - log r
    assert kl_per_token(LOGP, REF_LOGP, "k1")[0, :3].tolist() == pytest.approx([LOG2, 0.0, -LOG2], abs=1e-6)
    assert kl_per_token(LOGP, REF_LOGP, "k3")[0, :3].tolist() == pytest.approx(
        [-0.5 + LOG2, 0.0, 1.0 - LOG2], abs=1e-6)


def _adv(**ppo):
    return advantages_for(torch.tensor([1.0]), LOGP, REF_LOGP, VALUES, MASK, PPOAlgoConfig(**ppo))


def test_kl_coef_changes_rewards_only_by_minus_beta_kl_and_the_score_sits_on_the_last_token():
    off, on = _adv(kl_coef=0.0), _adv(kl_coef=0.1)
    assert off.rewards.tolist() == [[0.0, 0.0, 1.0, 0.0]]  # the score on the last real token, pad 0
    assert on.rewards[0].tolist() == pytest.approx([-0.1 * LOG2, 0.0, 1.0 + 0.1 * LOG2, 0.0], abs=1e-6)
    assert torch.allclose(on.rewards - off.rewards, -0.1 * on.kl)
    assert on.kl[0, 3].item() == 0.0  # the pad's KL (log 0.9 - log 0.1) is masked out
    k3 = _adv(kl_coef=0.1, kl_estimator="k3")
    assert k3.rewards[0].tolist() == pytest.approx(
        [-0.1 * (LOG2 - 0.5), 0.0, 1.0 - 0.1 * (1 - LOG2), 0.0], abs=1e-6)


def test_a_non_finite_value_on_a_pad_position_reaches_no_reward_advantage_loss_or_metric(single_process_group):
    """Masking drops padded positions outright (x * 0 would keep a NaN/inf): k3's expm1 overflows when the
    policy gives the pad token after the stop ~100 nats less than the reference, and a pad's value or
    log-prob may be anything. The real tokens' numbers are those of the clean case above."""
    logp, values = LOGP.clone(), VALUES.clone()
    logp[0, 3], values[0, 3] = -200.0, float("nan")  # ref_logp - logp = 197.7 at the pad: expm1 -> inf
    assert math.isinf(kl_per_token(logp, REF_LOGP, "k3")[0, 3].item())
    ppo = PPOAlgoConfig(kl_coef=0.1, kl_estimator="k3")
    dirty = advantages_for(torch.tensor([1.0]), logp, REF_LOGP, values, MASK, ppo)
    clean = advantages_for(torch.tensor([1.0]), LOGP, REF_LOGP, VALUES, MASK, ppo)
    for name in ("kl", "rewards", "advantages", "returns"):
        assert torch.equal(getattr(dirty, name), getattr(clean, name)), name
    new = logp.clone()
    new[0, 3] = 500.0  # the ratio at the pad would overflow to inf, times its advantage 0: NaN unless dropped
    new.requires_grad_(True)
    loss, clipped = policy_loss(new, logp, dirty.advantages, MASK, 0.2)
    assert loss.item() == pytest.approx(-float(clean.advantages[0, :3].mean())) and clipped.item() == 0.0
    loss.backward()  # and no NaN gradient from it either: -A_t / 3 at real tokens (ratio 1), 0 at the pad
    assert new.grad[0].tolist() == pytest.approx((-clean.advantages[0] / 3).tolist()[:3] + [0.0])
    v = values.clone().requires_grad_(True)
    vloss, _ = value_loss(v, values, dirty.returns, MASK, 0.2)
    vloss.backward()
    assert math.isfinite(vloss.item()) and torch.isfinite(v.grad).all() and v.grad[0, 3] == 0
    assert global_moments(values, MASK, single_process_group.device) == pytest.approx((0.4, 0.02 / 3))


def test_a_nan_reward_on_a_pad_an_empty_mask_and_equal_values_leave_every_statistic_finite(single_process_group):
    """GAE masks the rewards before reading them (a NaN reward on a pad would leak as NaN x 0); a mean over an
    all-pad mask is 0 and its moments (0, 0); advantages that are all equal, whose E[x^2] - E[x]^2 cancels to a
    negative rounding error, have variance exactly 0, so whitening them gives zeros, not a NaN from sqrt(< 0)."""
    from stages.ppo.tricks import gae, masked_mean, whiten

    dev = single_process_group.device
    adv, ret = gae(torch.tensor([[1.0, float("nan")]]), torch.tensor([[0.25, 0.0]]), torch.tensor([[1.0, 0.0]]),
                   1.0, 0.95)
    assert adv.tolist() == [[0.75, 0.0]] and ret.tolist() == [[1.0, 0.0]]  # one token: A = 1 - 0.25, G = A + V
    assert masked_mean(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == 0.0
    assert policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), 0.2)[0] == 0.0
    assert global_moments(torch.ones(1, 2), torch.zeros(1, 2), dev) == (0.0, 0.0)
    assert global_moments(torch.full((1, 1000), 1.1), torch.ones(1, 1000), dev)[1] == 0.0  # exactly
    equal, every = torch.full((1, 601), 31559.849609375), torch.ones(1, 601)
    mean, var = global_moments(equal, every, dev)
    assert var == 0.0 and whiten(equal, every, mean=mean, var=var).tolist() == [[0.0] * 601]


def test_gae_hand_values_and_gamma_and_lambda_each_change_them():
    # beta 0.1, k1: R = [-0.1 log 2, 0, 1 + 0.1 log 2]; V = [0.5, 0.4, 0.3]; V after the last token = 0
    r0, r2 = -0.1 * LOG2, 1 + 0.1 * LOG2

    def expected(g, lam):
        a2 = r2 - 0.3
        a1 = (0.0 + g * 0.3 - 0.4) + g * lam * a2
        a0 = (r0 + g * 0.4 - 0.5) + g * lam * a1
        return [a0, a1, a2, 0.0]

    base = _adv(kl_coef=0.1)  # gamma 1, lambda 0.95
    # a2 = 0.7693147, a1 = -0.1 + 0.95 a2 = 0.6308490, a0 = -0.1693147 + 0.95 a1 = 0.4299918
    assert base.advantages[0].tolist() == pytest.approx([0.4299918, 0.6308490, 0.7693147, 0.0], abs=1e-6)
    assert base.advantages[0].tolist() == pytest.approx(expected(1.0, 0.95), abs=1e-6)
    assert base.returns[0].tolist() == pytest.approx([0.4299918 + 0.5, 0.6308490 + 0.4, 0.7693147 + 0.3, 0.0],
                                                     abs=1e-6)
    gamma = _adv(kl_coef=0.1, gamma=0.5)
    # a1 = (0.15 - 0.4) + 0.475 a2 = 0.1154245; a0 = (r0 + 0.2 - 0.5) + 0.475 a1 = -0.3144881
    assert gamma.advantages[0].tolist() == pytest.approx([-0.3144881, 0.1154245, 0.7693147, 0.0], abs=1e-6)
    assert gamma.advantages[0].tolist() == pytest.approx(expected(0.5, 0.95), abs=1e-6)
    lam = _adv(kl_coef=0.1, lam=0.5)
    # a1 = -0.1 + 0.5 a2 = 0.2846574; a0 = -0.1693147 + 0.5 a1 = -0.0269860
    assert lam.advantages[0].tolist() == pytest.approx([-0.0269860, 0.2846574, 0.7693147, 0.0], abs=1e-6)
    assert lam.advantages[0].tolist() == pytest.approx(expected(1.0, 0.5), abs=1e-6)


def test_global_means_reduce(single_process_group):
    means = GlobalMeans()
    assert means.reduce(single_process_group.device) == {}
    means.add("loss", 3.0, 2)
    means.add("kl", torch.tensor(0.5), torch.tensor(5.0))
    means.add("loss", torch.tensor(1.0), 1.0)
    means.add("empty", 0.0, 0)
    out = means.reduce(single_process_group.device)
    assert list(out) == ["loss", "kl", "empty"]
    assert out == pytest.approx({"loss": 4 / 3, "kl": 0.1, "empty": 0.0})  # (3 + 1) / (2 + 1), 0.5 / 5


# ============================================================================================ models
TEXTS = ["hello world, how are you?", "the quick brown fox jumps over the lazy dog", "a b c d e f g h i j k",
         "Human: hi there Assistant: hello, nice to meet you"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


def _word_tokenizer(vocab: dict[str, int], eos: str = "<|endoftext|>"):
    """A word-level tokenizer with exactly `vocab` and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token="<unk>")


WORDS = {"<unk>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "c": 4}


def test_check_tokenizers_identical_pass(tokenizer):
    check_tokenizers(tokenizer, tokenizer, "rm")
    check_tokenizers(tokenizer, train_tokenizer(TEXTS, vocab_size=300, min_frequency=1), "rm")  # deterministic


def test_check_tokenizers_allow_only_an_added_pad(tokenizer):
    policy = _word_tokenizer(WORDS)
    rm = copy.deepcopy(policy)
    assert ensure_distinct_pad(rm) and rm.get_vocab()[PAD] == 5  # what train-rm does to a pad-less tokenizer
    check_tokenizers(policy, rm, "rm")
    other = copy.deepcopy(policy)
    other.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    with pytest.raises(CheckpointError, match=re.escape("(6 and 5 tokens; 1 only in its (e.g. ['<|sep|>']))")):
        check_tokenizers(policy, other, "rm-dir")
    both = copy.deepcopy(rm)  # train-rm's <|pad|> is not counted as a difference beside a real one
    both.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    with pytest.raises(CheckpointError, match=re.escape("(7 and 5 tokens; 1 only in its (e.g. ['<|sep|>']))")):
        check_tokenizers(policy, both, "rm-dir")
    # the policy may not be the one with more
    with pytest.raises(CheckpointError, match=re.escape(f"(5 and 6 tokens; 1 only in the policy's (e.g. ['{PAD}']))")):
        check_tokenizers(rm, policy, "rm-dir")


def test_check_tokenizers_reject_a_different_vocabulary(tokenizer):
    other = train_tokenizer(["completely different words: zebra quartz jukebox"] * 3, vocab_size=300,
                            min_frequency=1)
    only_other = set(other.get_vocab()) - set(tokenizer.get_vocab())
    only_policy = set(tokenizer.get_vocab()) - set(other.get_vocab())
    assert only_other and only_policy
    with pytest.raises(CheckpointError, match="different vocabulary") as exc:
        check_tokenizers(tokenizer, other, "/rm/dir")
    said = str(exc.value)
    assert "/rm/dir" in said and f"{len(only_other)} only in its (e.g. {sorted(only_other)[:3]})" in said, said
    assert f"{len(only_policy)} only in the policy's (e.g. {sorted(only_policy)[:3]})" in said, said
    # the same tokens with other ids
    swapped = _word_tokenizer({**WORDS, "a": 3, "b": 2})
    with pytest.raises(CheckpointError, match=r"token '[ab]' has id [23] in the policy's tokenizer but [23]"):
        check_tokenizers(_word_tokenizer(WORDS), swapped, "rm")


def test_check_tokenizers_reject_a_different_eos():
    with pytest.raises(CheckpointError, match="EOS differs"):
        check_tokenizers(_word_tokenizer(WORDS), _word_tokenizer(WORDS, eos="c"), "rm")


@pytest.mark.parametrize("model_type, arch", [
    ("gpt_bigcode", dict(n_embd=32, n_layer=2, n_head=4)),  # attn_pdrop 0.1 by default, read by its attention
    ("starcoder2", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, residual_dropout=0.1, embedding_dropout=0.1)),
    ("biogpt", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    activation_dropout=0.1, layerdrop=0.5)),  # layerdrop: whole layers skipped at random
    ("mixtral", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5)),
])
def test_disable_dropout_finds_every_kind_of_dropout_attribute(model_type, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=300, bos_token_id=1,
                                                                  eos_token_id=2, **arch)).train()
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live
        disable_dropout(model)
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name, is_one", [("attn_pdrop", True), ("residual_dropout", True), ("layerdrop", True),
                                          ("hidden_dropout_prob", True), ("jitter_noise", True),
                                          ("input_jitter_noise", True), ("moe_jitter_eps", True),
                                          # PhiMoE's routing threshold (eval mode reads it too), not noise
                                          ("router_jitter_noise", False),
                                          ("drop_last", False), ("dropped", False), ("rope_theta", False)])
def test_a_dropout_probability_is_told_by_its_name(name, is_one):
    assert is_dropout_name(name) is is_one


def test_disable_dropout_zeroes_modules_attributes_and_config():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_arch(attention_dropout=0.3)).train()
    attn = model.model.layers[0].self_attn
    assert attn.attention_dropout == 0.3
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live
    disable_dropout(model)
    assert attn.attention_dropout == 0.0 and model.config.attention_dropout == 0.0
    with torch.no_grad():  # still in train mode, now deterministic
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    disable_dropout(seq)
    assert seq[1].p == 0.0
    # GPT-2: nn.Dropout modules (attn/resid/embd_pdrop 0.1 by default)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(_gpt2_arch()).train()
    with torch.no_grad():
        assert not torch.equal(gpt2(input_ids=ids).logits, gpt2(input_ids=ids).logits)
    disable_dropout(gpt2)
    assert all(m.p == 0.0 for m in gpt2.modules() if isinstance(m, torch.nn.Dropout))
    with torch.no_grad():
        assert torch.equal(gpt2(input_ids=ids).logits, gpt2(input_ids=ids).logits)


@pytest.mark.parametrize("gen_eos, extra, expected", [
    (7, [9, 1], [1, 7, 9]),
    ([7, 8], [], [1, 7, 8]),
    (None, [9], [1, 9]),
    ([1], [], [1]),
])
def test_stop_token_ids(gen_eos, extra, expected):
    policy = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=gen_eos))
    assert stop_token_ids(policy, SimpleNamespace(eos_token_id=1), extra) == expected


def test_stop_token_ids_of_a_real_model_without_generation_eos():
    model = _llama()
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=2), [5]) == [2, 5]
    model.generation_config.eos_token_id = [3, 4]
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=2), []) == [2, 3, 4]


def test_saved_stop_ids_are_those_of_the_model_loaded_from_the_folder(tmp_path):
    """The data check reads a policy's stop tokens from its folder without its weights: the same ids as the
    loaded model gives, with generation_config.json (EOS ids [3, 4]) and without it (config.json's eos 6), and the
    tokenizer's EOS and the extra ids alone for a folder that holds no model (a hub id, a stand-in)."""
    from transformers import AutoModelForCausalLM

    from stages.ppo.models import saved_stop_ids

    tok = SimpleNamespace(eos_token_id=2)
    model = _llama()
    model.generation_config.eos_token_id = [3, 4]
    model.save_pretrained(tmp_path / "with")
    model.config.eos_token_id = 6
    model.save_pretrained(tmp_path / "without")
    (tmp_path / "without" / "generation_config.json").unlink()
    for name, expected in (("with", [2, 3, 4, 5]), ("without", [2, 5, 6])):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert saved_stop_ids(str(tmp_path / name), tok, [5]) == stop_token_ids(loaded, tok, [5]) == expected, name
    assert saved_stop_ids(str(tmp_path), tok, [5]) == saved_stop_ids(None, tok, [5]) == [2, 5]


@ARCHS
def test_value_model_reads_the_score_head_at_every_position(kind):
    torch.manual_seed(0)
    arch = (_arch if kind == "llama" else _gpt2_arch)(num_labels=1, initializer_range=0.3)
    seqcls = (LlamaForSequenceClassification if kind == "llama" else GPT2ForSequenceClassification)(arch).eval()
    critic = ValueModel(seqcls)
    ids, mask = left_pad([[5, 9, 12, 3], [21, 4]], PAD_ID, CPU)
    with torch.no_grad():
        values = critic(ids, mask)
    assert values.shape == (2, 4) and values.dtype == torch.float32
    # V at position t of a row = the reward model's score of that row's prefix up to t (read alone, unpadded)
    for i, prompt in enumerate([[5, 9, 12, 3], [21, 4]]):
        start = 4 - len(prompt)
        with torch.no_grad():
            prefix_scores = [seqcls(input_ids=torch.tensor([prompt[: t + 1]])).logits[0, 0].item()
                             for t in range(len(prompt))]
        assert values[i, start:].tolist() == pytest.approx(prefix_scores, abs=1e-5)
    with torch.no_grad():
        critic = critic.to(torch.bfloat16)
        values = critic(ids, mask)
        # the head computes in float32 on the bf16 hidden states (a bf16 head would round values by ~1e-2)
        backbone = getattr(seqcls, seqcls.base_model_prefix)
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).last_hidden_state
        assert hidden.dtype == torch.bfloat16 and values.dtype == torch.float32
        exact = hidden.float() @ seqcls.score.weight.float().T
        assert torch.allclose(values, exact.squeeze(-1), atol=1e-5, rtol=0)
        rounded = (hidden @ seqcls.score.weight.T).float().squeeze(-1)
        assert not torch.allclose(values, rounded, atol=1e-5, rtol=0)


# ============================================================================================ monitor
QUIET = {"rollout/cap_share": 0.2, "rollout/response_length": 10.0, "objective/kl_per_token": 0.05,
         "objective/kl_k3_per_token": 0.04, "rollout/repetition": 0.1}


@pytest.mark.parametrize("key, value, message", [
    ("rollout/cap_share", 0.75, "75% of responses hit max_new_tokens (> 50%)"),
    ("rollout/response_length", 17.0, "mean length 17.0 > 2 x its start 8.0"),
    ("objective/kl_per_token", 0.2, "KL to the reference 0.2000/token (k1) > 0.1"),
    ("rollout/repetition", 0.6, "3-gram repetition 0.60 > 0.5"),
])
def test_collapse_monitor_each_check_alone_and_0_disables_it(key, value, message):
    cfg = MonitorConfig()
    assert collapse_reasons(QUIET, 8.0, cfg) == []
    assert collapse_reasons({**QUIET, key: value}, 8.0, cfg) == [message]
    field = {"rollout/cap_share": "max_cap_share", "rollout/response_length": "max_length_ratio",
             "objective/kl_per_token": "max_kl", "rollout/repetition": "max_repetition"}[key]
    assert collapse_reasons({**QUIET, key: value}, 8.0, MonitorConfig(**{field: 0})) == []
    # every response made to run to max_new_tokens (min_new_tokens = max_new_tokens, as the bench's): a cap share
    # of 100 % is no sign of collapse; the other checks stand
    assert collapse_reasons({**QUIET, key: value}, 8.0, cfg, cap_forced=True) == (
        [] if key == "rollout/cap_share" else [message])


def test_collapse_monitor_thresholds_are_strict_and_all_fire_together():
    cfg = MonitorConfig(max_cap_share=0.5, max_length_ratio=2.0, max_kl=0.1, max_repetition=0.5, ngram=2)
    at_limit = {"rollout/cap_share": 0.5, "rollout/response_length": 16.0, "objective/kl_per_token": 0.1,
                "rollout/repetition": 0.5}
    assert collapse_reasons(at_limit, 8.0, cfg) == []
    assert collapse_reasons({**at_limit, "rollout/response_length": 99.0}, None, cfg) == []  # no start yet
    every = {"rollout/cap_share": 1.0, "rollout/response_length": 20.0, "objective/kl_per_token": 0.3,
             "rollout/repetition": 0.9}
    reasons = collapse_reasons(every, 8.0, cfg)
    assert len(reasons) == 4 and reasons[3] == "2-gram repetition 0.90 > 0.5"


def test_collapse_monitor_reads_the_kl_of_its_estimator():
    """k1 can read negative (sampling at a temperature or top-p, log-probs at 1): the k1 check compares the signed
    value (-0.5 is below any max_kl, not a drift of 0.5); monitor.kl_estimator k3 checks the never-negative
    estimate instead."""
    drifted = {**QUIET, "objective/kl_per_token": -0.5, "objective/kl_k3_per_token": 0.15}
    assert collapse_reasons(drifted, 8.0, MonitorConfig()) == []
    assert collapse_reasons(drifted, 8.0, MonitorConfig(kl_estimator="k3")) == [
        "KL to the reference 0.1500/token (k3) > 0.1"]


# ============================================================================================ presets
def test_fill_preset_defaults_to_vanilla_and_fills_every_key():
    data: dict = {}
    filled = fill_preset(data, None)
    assert DEFAULT_PRESET == "vanilla" and data["ppo"]["preset"] == "vanilla"
    assert sorted(filled) == sorted(PRESETS["vanilla"])
    assert data["ppo"]["kl_coef"] == 0.0 and data["ppo"]["lam"] == 0.95


def test_fill_preset_only_fills_missing_keys_and_the_file_wins():
    data = {"ppo": {"preset": "ppo-max", "kl_coef": 0.2, "reward_clip": 0.3}, "train": {"policy_lr": 1e-6}}
    filled = fill_preset(data, None)
    assert data["ppo"]["preset"] == "ppo-max"
    assert data["ppo"]["kl_coef"] == 0.2 and data["ppo"]["reward_clip"] == 0.3 and data["train"]["policy_lr"] == 1e-6
    assert data["ppo"]["reward_norm"] is True and data["ppo"]["lam"] == 0.9 and data["train"]["critic_lr"] == 1.65e-6
    assert "ppo.kl_coef" not in filled and "train.policy_lr" not in filled and "ppo.reward_norm" in filled
    assert len(filled) == len(PRESETS["ppo-max"]) - 3


def test_fill_preset_command_line_wins_over_the_files_preset():
    data = {"ppo": {"preset": "vanilla"}}
    fill_preset(data, "moss-release")
    assert data["ppo"]["preset"] == "moss-release"
    assert data["ppo"]["reward_scaling"] is True and data["ppo"]["kl_coef"] == 0.01


@pytest.mark.parametrize("preset, given, other", [("ppo-max", "reward_scaling", "reward_norm"),
                                                 ("moss-release", "reward_norm", "reward_scaling")])
def test_turning_on_one_reward_transform_keeps_the_preset_from_turning_on_the_other(preset, given, other):
    data = {"ppo": {given: True}}
    filled = fill_preset(data, preset)
    assert data["ppo"][given] is True and data["ppo"][other] is False and f"ppo.{other}" in filled
    PPOAlgoConfig.model_validate(data["ppo"])  # valid: one transform on
    data = {"ppo": {given: False}}  # turning one off leaves the preset's choice of the other
    fill_preset(data, preset)
    assert data["ppo"][other] is PRESETS[preset][f"ppo.{other}"]
    for on in ("true", "yes", "on", 1):  # on as pydantic reads it (a --set 'true', a YAML 1.1 yes)
        data = {"ppo": {given: on}}
        fill_preset(data, preset)
        assert data["ppo"][other] is False, on
        PPOAlgoConfig.model_validate(data["ppo"])


@pytest.mark.parametrize("section", ["ppo", "train"])
def test_a_section_that_is_not_a_mapping_is_left_for_validation_to_name(section, tmp_path):
    """`ppo: [kl_coef: 0.1]` or `train: 5` with a preset: fill_preset leaves the section as it is (it used to
    crash with a TypeError), and the config's validation names it: exit 2, no traceback."""
    data = {section: [{"kl_coef": 0.1}]}
    fill_preset(data, "ppo-max")
    assert data[section] == [{"kl_coef": 0.1}]
    cfg = {"ppo": {"preset": "ppo-max"}, section: 5}
    res = invoke_cli("ppo", "--config", str(write_yaml(tmp_path / "p.yaml", cfg)), "--ppo-max", "--dry-run")
    assert res.exit_code == 2 and f"{section}: Input should be a mapping of its keys" in res.stderr, res.output


def test_fill_preset_rejects_an_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'max'"):
        fill_preset({}, "max")
    with pytest.raises(ValueError, match="unknown preset 'bogus'"):
        fill_preset({"ppo": {"preset": "bogus"}}, None)


def test_fill_preset_with_an_empty_ppo_section_records_the_preset():
    data = {"ppo": None}  # YAML `ppo:` with every key commented out
    fill_preset(data, "ppo-max")
    assert data["ppo"]["kl_coef"] == 0.05  # the values are filled ...
    assert data["ppo"]["preset"] == "ppo-max"  # ... and the name is recorded


def _section_fields(key: str) -> tuple[type, str]:
    section, name = key.split(".")
    return PPOConfig.model_fields[section].annotation, name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_key_is_a_real_field_with_a_valid_value(preset, tmp_path):
    by_section: dict[str, dict] = {}
    for key, value in PRESETS[preset].items():
        schema, name = _section_fields(key)
        assert name in schema.model_fields, key
        by_section.setdefault(key.split(".")[0], {})[name] = value
    assert PPOAlgoConfig(**by_section["ppo"]).model_dump(include=set(by_section["ppo"])) == by_section["ppo"]
    if "train" in by_section:
        PPOTrainConfig(**by_section["train"])
    data = {"output_dir": str(tmp_path), "model": {"name_or_path": "x"}, "reward_model": {"name_or_path": "y"},
            "data": {"train": "p.jsonl"}}
    fill_preset(data, preset)
    cfg = PPOConfig.model_validate(data)
    assert cfg.ppo.preset == preset
    for key, value in PRESETS[preset].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


def test_every_trick_flag_sets_a_real_field_and_names_are_unique():
    assert len({f.name for f in TRICK_FLAGS}) == len(TRICK_FLAGS)
    assert len({f.key for f in TRICK_FLAGS}) == len(TRICK_FLAGS)
    for flag in TRICK_FLAGS:
        schema, name = _section_fields(flag.key)
        assert name in schema.model_fields, flag
    # every preset key can be set by a flag
    assert set().union(*PRESETS.values()) <= {f.key for f in TRICK_FLAGS}


def test_flag_overrides_parse_back_to_the_same_values():
    values = {"kl-coef": 0.05, "reward-norm": True, "reward-scaling": False, "kl-estimator": "k3",
              "policy-lr": 5e-7, "critic-lr": 1.65e-6, "critic-pretrain-steps": 20, "adv-clip": None}
    overrides = flag_overrides(values)
    assert len(overrides) == 7  # None = not given
    keys = {f.name: f.key for f in TRICK_FLAGS}
    data: dict = {}
    for item in overrides:
        parts, value = parse_override(item)  # the CLI's own `--set` parser
        name = next(n for n, k in keys.items() if k == ".".join(parts))
        assert value == values[name] and type(value) is type(values[name]), item
        apply_override(data, parts, value)
    # a flag wins over the preset: the preset fills only the rest
    fill_preset(data, "vanilla")
    assert data["ppo"]["kl_coef"] == 0.05 and data["ppo"]["kl_estimator"] == "k3"
    assert data["train"]["policy_lr"] == 5e-7 and data["ppo"]["value_clip"] == 0.0


#: PPO-MAX.md trick table row -> the flags that control it
TABLE_ROWS = {
    "token-level KL penalty beta": ["kl-coef", "kl-estimator"],
    "reward scaling": ["reward-scaling"],
    "reward normalization + clipping": ["reward-norm", "reward-clip"],
    "advantage normalization / clipping": ["adv-norm", "adv-clip"],
    "PPO clip epsilon": ["policy-clip"],
    "value-loss clipping": ["value-clip"],
    "critic init from RM": ["critic-init"],
    "critic pre-training steps": ["critic-pretrain-steps"],
    "global grad clip": ["grad-clip"],
    "GAE gamma / lambda": ["gamma", "lam"],
    "entropy bonus": ["entropy-coef"],
    "importance sampling vs pi_ref": ["ref-importance-sampling"],
    "PTX loss": ["ptx-coef"],
    "small buffer": ["rollout-batch-size", "mini-batch-size", "ppo-epochs"],
    "learning rates": ["policy-lr", "critic-lr", "warmup-ratio"],
}


def test_every_row_of_the_trick_table_has_a_flag():
    names = {f.name for f in TRICK_FLAGS}
    missing = {row: [f for f in flags if f not in names] for row, flags in TABLE_ROWS.items()}
    assert not {row: f for row, f in missing.items() if f}


def test_preset_values_match_the_ppo_max_table():
    v, moss, mx = PRESETS["vanilla"], PRESETS["moss-release"], PRESETS["ppo-max"]
    common = {"ppo.policy_clip": 0.2, "ppo.critic_init": "reward_model", "ppo.grad_clip": 1.0, "ppo.gamma": 1.0,
              "ppo.entropy_coef": 0.0, "ppo.ref_importance_sampling": False, "ppo.adv_norm": False,
              "ppo.adv_clip": 0.0, "ppo.ptx_coef": 0.0, "ppo.ppo_epochs": 1}
    for p in (v, moss, mx):
        assert {k: p[k] for k in common} == common
    assert (v["ppo.kl_coef"], v["ppo.reward_scaling"], v["ppo.reward_norm"], v["ppo.reward_clip"]) == (0, False, False, 0)
    assert (v["ppo.value_clip"], v["ppo.critic_pretrain_steps"], v["ppo.lam"]) == (0, 0, 0.95)
    assert (moss["ppo.kl_coef"], moss["ppo.reward_scaling"], moss["ppo.reward_norm"]) == (0.01, True, False)
    assert (moss["ppo.value_clip"], moss["ppo.critic_pretrain_steps"], moss["ppo.lam"]) == (0.2, 0, 0.95)
    assert (moss["train.policy_lr"], moss["train.critic_lr"], moss["train.warmup_ratio"]) == (5e-7, 1.5e-6, 0.1)
    assert (mx["ppo.kl_coef"], mx["ppo.reward_norm"], mx["ppo.reward_scaling"]) == (0.05, True, False)
    assert mx["ppo.reward_clip"] > 0 and mx["ppo.value_clip"] == 0.2 and mx["ppo.critic_pretrain_steps"] > 0
    assert (mx["ppo.gamma"], mx["ppo.lam"]) == (1.0, 0.9)
    assert (mx["train.policy_lr"], mx["train.critic_lr"]) == (5e-7, 1.65e-6)


# ============================================================================================ prompts
def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _load(path, tokenizer, styles: set[str] | None = None, **data):
    cfg = PPODataConfig(train=path, **data)
    log = BadRowLog()
    prompts, truncated, _ = load_prompts(cfg.train, cfg, tokenizer, log, styles)
    return prompts, truncated, log


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_load_prompts_prompt_format_raw_and_through_the_chat_template(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world"}, {"prompt": "the lazy dog", "other": 1}])
    prompts, truncated, _ = _load(path, tokenizer)
    assert prompts == [_enc(tokenizer, "hello world"), _enc(tokenizer, "the lazy dog")] and truncated == 0
    chat, _, _ = _load(path, tokenizer, use_chat_template=True)
    assert tokenizer.decode(chat[0]) == "<|user|>\nhello world<|endoftext|><|assistant|>\n"


def test_load_prompts_messages_drop_the_final_assistant_turn_and_add_the_generation_prompt(tmp_path, tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a b"}]},
    ]
    prompts, _, _ = _load(_jsonl(tmp_path / "m.jsonl", rows), tokenizer)
    assert prompts[0] == _enc(tokenizer, "<|user|>\nhi<|endoftext|><|assistant|>\n")
    assert tokenizer.decode(prompts[1]) == "<|system|>\nbe nice<|endoftext|><|user|>\na b<|endoftext|><|assistant|>\n"


def test_load_prompts_hh_cut_after_the_last_assistant_marker(tmp_path, tokenizer, hh_sample):
    records = [json.loads(line) for line in hh_sample.read_text(encoding="utf-8").splitlines()[:3]]
    prompts, truncated, _ = _load(_jsonl(tmp_path / "hh.jsonl", records), tokenizer, max_prompt_length=100_000)
    assert len(prompts) == 3 and truncated == 0
    for rec, ids in zip(records, prompts):
        text = rec["chosen"]
        expected = text[: text.rfind("\n\nAssistant:") + len("\n\nAssistant:")]
        assert len(expected) < len(text) and expected.count("\n\nHuman:") >= 1
        assert ids == _enc(tokenizer, expected)
        assert tokenizer.decode(ids).endswith("\n\nAssistant:")


def test_load_prompts_hh_ending_with_a_human_turn_asks_for_the_reply_to_it_raw_and_chat(tmp_path, tokenizer):
    """A dialogue whose last turn is the human's is the prompt as it is, raw as through the chat template (the
    raw path used to cut it back to the previous assistant marker, dropping the last exchange)."""
    text = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?"
    path = _jsonl(tmp_path / "hh.jsonl", [{"chosen": text}])
    raw, _, _ = _load(path, tokenizer)
    assert raw[0] == _enc(tokenizer, text + "\n\nAssistant:")
    chat, _, _ = _load(path, tokenizer, use_chat_template=True)
    assert tokenizer.decode(chat[0]).endswith("<|user|>\nhow are you?<|endoftext|><|assistant|>\n")


def test_a_prompt_cut_to_max_prompt_length_keeps_its_bos(tmp_path, tokenizer, monkeypatch):
    from stages.ppo import prompts as prompt_module

    monkeypatch.setattr(prompt_module, "bos_ids", lambda tok: [7])  # a tokenizer that starts texts with id 7
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "the lazy dog jumps over the fox"}])
    full = _enc(tokenizer, "the lazy dog jumps over the fox")
    prompts, truncated, _ = _load(path, tokenizer, max_prompt_length=4)
    assert prompts == [[7] + full[-3:]] and truncated == 1


def test_a_max_prompt_length_no_longer_than_the_bos_keeps_prompt_tokens_not_the_bos(tmp_path, tokenizer, monkeypatch):
    """max_prompt_length 1 with a 1-token BOS: keeping the BOS would leave a prompt of no text at all, so the
    last prompt token is kept instead."""
    from stages.ppo import prompts as prompt_module

    monkeypatch.setattr(prompt_module, "bos_ids", lambda tok: [7])
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "the lazy dog jumps over the fox"}])
    full = _enc(tokenizer, "the lazy dog jumps over the fox")
    prompts, truncated, _ = _load(path, tokenizer, max_prompt_length=1)
    assert prompts == [full[-1:]] and truncated == 1


def test_load_prompts_hh_through_the_chat_template(tmp_path, tokenizer):
    text = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine"
    prompts, _, _ = _load(_jsonl(tmp_path / "hh.jsonl", [{"chosen": text}]), tokenizer, use_chat_template=True)
    assert tokenizer.decode(prompts[0]) == ("<|user|>\nhi there<|endoftext|><|assistant|>\nhello<|endoftext|>"
                                            "<|user|>\nhow are you?<|endoftext|><|assistant|>\n")


def test_a_prompt_of_exactly_max_prompt_length_tokens_is_not_cut(tmp_path, tokenizer):
    n = len(_enc(tokenizer, "hello world"))
    prompts, truncated, _ = _load(_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world"}]), tokenizer,
                                  max_prompt_length=n)
    assert prompts == [_enc(tokenizer, "hello world")] and truncated == 0


def test_an_empty_last_user_turn_is_a_bad_row(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "  "}]},
            {"messages": [{"role": "user", "content": "a b c"}]}]
    prompts, _, log = _load(_jsonl(tmp_path / "m.jsonl", rows), tokenizer, on_bad_row="skip")
    assert len(prompts) == 1 and dict(log.reasons) == {"empty user turn at the end of the prompt": 1}


def test_a_prompt_that_opens_with_the_bos_gets_no_second_one(tmp_path, tokenizer, monkeypatch):
    """A tokenizer that puts BOS (here <|endoftext|>) before a text: a prompt without it gets one, a prompt whose
    text already starts with it keeps just that one."""
    from stages.ppo import prompts as prompt_module

    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    monkeypatch.setattr(prompt_module, "bos_ids", lambda tok: [bos])
    monkeypatch.setattr(type(tokenizer), "bos_token", property(lambda self: "<|endoftext|>"), raising=False)
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world"}, {"prompt": "<|endoftext|>hello world"}])
    prompts, _, _ = _load(path, tokenizer)
    assert prompts == [[bos] + _enc(tokenizer, "hello world")] * 2


def test_each_prompt_records_its_rendering_style(tmp_path, tokenizer):
    from stages.rendering import CHAT, RAW_HH, RAW_PR

    for rows, data, want in (([{"prompt": "hi"}], {}, {RAW_PR}), ([{"prompt": "hi"}], {"use_chat_template": True}, {CHAT}),
                             ([{"chosen": "\n\nHuman: hi\n\nAssistant: yo"}], {}, {RAW_HH}),
                             ([{"messages": [{"role": "user", "content": "hi"}]}], {}, {CHAT})):
        styles: set[str] = set()
        _load(_jsonl(tmp_path / "s.jsonl", rows), tokenizer, styles, **data)
        assert styles == want, (rows, data)


def test_ptx_rows_are_read_with_the_ptx_settings():
    from stages.ppo.prompts import ptx_data_config

    data = PPODataConfig(train="p.jsonl", ptx="x.jsonl", ptx_format="messages", ptx_max_length=77, max_prompt_length=16,
                         on_bad_row="skip", content_special_tokens="control", use_chat_template=True,
                         chat_template="{{ messages }}")
    sft = ptx_data_config(data)
    assert (sft.max_length, sft.format, sft.on_bad_row, sft.content_special_tokens, sft.use_chat_template,
            sft.eval_fraction, sft.chat_template) == (77, "messages", "skip", "control", True, 0.0, "{{ messages }}")
    assert sft.train.paths() == data.ptx.paths() != data.train.paths()  # the PTX file, not the prompts


def test_format_auto_prefers_messages_over_prompt(tmp_path, tokenizer):
    rows = [{"prompt": "hello world", "messages": [{"role": "user", "content": "a b c"}]}]
    prompts, _, _ = _load(_jsonl(tmp_path / "both.jsonl", rows), tokenizer)
    assert tokenizer.decode(prompts[0]) == "<|user|>\na b c<|endoftext|><|assistant|>\n"


BAD_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                  {"role": "assistant", "content": "b"}]},
    {"messages": [{"role": "user", "content": "a b c"}]},
]


def test_load_prompts_bad_row_error_names_file_and_row(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: a prompt must end with a user turn")):
        _load(path, tokenizer)


def test_load_prompts_bad_row_skip(tmp_path, tokenizer):
    prompts, _, log = _load(_jsonl(tmp_path / "bad.jsonl", BAD_ROWS), tokenizer, on_bad_row="skip")
    assert [tokenizer.decode(p) for p in prompts] == ["<|user|>\nhi<|endoftext|><|assistant|>\n",
                                                      "<|user|>\na b c<|endoftext|><|assistant|>\n"]
    assert log.total == 1 and list(log.reasons) == ["a prompt must end with a user turn"]
    with pytest.raises(DataError, match="no usable prompts"):
        _load(_jsonl(tmp_path / "none.jsonl", BAD_ROWS[1:2]), tokenizer, on_bad_row="skip")


def test_ppo_data_report_counts_prompts_cuts_and_skipped_rows_by_reason(tmp_path, tokenizer, capsys):
    """PPO's data loading prints and saves data_report.json as SFT and the RM do: per split the prompts, how
    many were cut and the bad rows skipped by reason (data.on_bad_row: skip); `save=False` (--check-data)
    writes nothing; PTX data given with ptx_coef 0 is said to be unused."""
    from stages.distributed import ONE_PROCESS
    from stages.ppo.trainer import load_ppo_data

    train = _jsonl(tmp_path / "train.jsonl", BAD_ROWS + [{"messages": [{"role": "user", "content": "x " * 80}]}])
    held = _jsonl(tmp_path / "eval.jsonl", BAD_ROWS[:2])
    cfg = PPOConfig.model_validate({
        "output_dir": str(tmp_path), "model": {"name_or_path": "stub/policy"}, "reward_model": {"name_or_path": "stub/rm"},
        "data": {"train": str(train), "eval": str(held), "on_bad_row": "skip", "max_prompt_length": 16,
                 "ptx": str(train)}})
    data = load_ppo_data(cfg, tmp_path, ONE_PROCESS, tokenizer, save=False)
    assert not (tmp_path / "data_report.json").exists() and len(data["train"]) == 3 and len(data["eval"]) == 1
    load_ppo_data(cfg, tmp_path, ONE_PROCESS, tokenizer)
    report = json.loads((tmp_path / "data_report.json").read_text())
    reason = {"a prompt must end with a user turn": 1}
    assert report == {"train": {"rows_read": 3, "cut": 1, "special_as_text": 0, "skipped_rows": 1, "skipped_by_reason": reason,
                                "unread_columns": [], "prompts": 3},
                      "eval": {"rows_read": 1, "cut": 0, "special_as_text": 0, "skipped_rows": 1, "skipped_by_reason": reason,
                               "unread_columns": [], "prompts": 1, "in_train": 1}}  # its one prompt ("hi") is a train prompt too
    said = " ".join(capsys.readouterr().out.split())
    assert "prompts: 3 train, 1 validation (1 also among the train prompts); 1 of data.train's prompts cut to 16 tokens; train: 1 bad row(s) (skipped: 1 x a prompt must end " \
        "with a user turn); eval: 1 bad row(s)" in said
    assert "warning: data.ptx is given but ppo.ptx_coef is 0: the PTX data is not used" in said
    assert "skipped as bad rows" not in said  # (as many skipped as kept, in the eval file: no warning)
    _jsonl(tmp_path / "eval.jsonl", BAD_ROWS[:2] + BAD_ROWS[1:2])  # two bad rows of three: mostly unread, a warning
    load_ppo_data(cfg, tmp_path, ONE_PROCESS, tokenizer, save=False)
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: data.eval: 2 of the 3 rows read were skipped as bad rows, most for: a prompt must end with a " \
        "user turn; mend the data or what the reason names" in said and "data.train: 1 of" not in said


def test_ptx_rows_read_with_their_own_columns_and_as_plain_text(tmp_path, tokenizer, capsys):
    """data.ptx_columns maps the PTX rows' columns as SFT's data.columns does (alpaca with its input joined);
    data.ptx_format: text trains a pretraining corpus row's whole text: every token after the first (nothing
    predicts it without a BOS), then EOS, a longer text split into rows of data.ptx_max_length (not cut). Errors and warnings about
    PTX rows name the PPO config's keys (data.ptx_format, data.ptx_columns, data.ptx_max_length), not SFT's."""
    from stages.distributed import ONE_PROCESS
    from stages.errors import DataError
    from stages.ppo.trainer import load_ppo_data
    from stages.sniff import sniff_data

    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}, {"prompt": "a b c"}])
    base = {"output_dir": str(tmp_path), "model": {"name_or_path": "stub/policy"},
            "reward_model": {"name_or_path": "stub/rm"}, "ppo": {"ptx_coef": 0.5}}

    def ptx_rows(rows: list, **data: object) -> list:
        cfg = PPOConfig.model_validate(base | {"data": {"train": prompts, "eval_fraction": 0,
                                                        "ptx": _jsonl(tmp_path / "ptx.jsonl", rows)} | data})
        sniff_data("ppo", cfg)
        got = load_ppo_data(cfg, tmp_path, ONE_PROCESS, tokenizer, save=False)["ptx"]
        return [got[i] for i in range(len(got))]

    eos = tokenizer.eos_token_id
    ids = tokenizer("a b c hello", add_special_tokens=False)["input_ids"]
    [row] = ptx_rows([{"text": "a b c hello"}], ptx_format="text")
    assert row == {"input_ids": ids + [eos], "labels": [-100] + ids[1:] + [eos]}
    whole = ids + [eos]
    rows = ptx_rows([{"body": "a b c hello"}], ptx_format="text", ptx_columns={"document": "body"}, ptx_max_length=3)
    # a longer text: rows of 3 overlapping by one token, each label trained once, nothing cut
    assert [r["input_ids"] for r in rows] == [whole[i:i + 3] for i in range(0, len(whole) - 1, 2)]
    trained = [t for r in rows for t in r["labels"] if t != -100]
    assert trained == whole[1:] and all(r["labels"][0] == -100 for r in rows)
    said = " ".join(capsys.readouterr().out.split())
    assert f"PTX data: {len(rows)} examples" in said and "1 text(s) longer than a row split into several" in said
    assert "were cut" not in said
    alpaca = {"instruction": "a b", "input": "c", "output": "hello"}
    [row] = ptx_rows([alpaca], ptx_columns={"prompt": "instruction", "input": "input", "response": "output"})
    [same] = ptx_rows([{"prompt": "a b\n\nc", "response": "hello"}])
    assert row == same and row["labels"][-1] == eos
    with pytest.raises(DataError, match=r"set data\.ptx_format/ptx_columns; data\.ptx_format: text trains the whole "
                                        r"text of 'text' \(every token: a pretraining corpus\)"):
        ptx_rows([{"text": "a b c hello"}])  # (format auto never reads plain text: the sniff says so)
    from stages.data import kept_reply_end
    from stages.ppo.prompts import ptx_wording

    advice = "replies cannot be trained apart: data.train_on last_turn trains the final reply of such rows, as with"
    assert "data.train_on last_turn trains" in inspect.getsource(kept_reply_end)  # (the SFT advice reworded here)
    assert ptx_wording(advice) == ("replies cannot be trained apart: PTX trains every reply of a row (no data.ptx "
                                   "key chooses otherwise): give such rows their final reply only, as with")
    folder = tmp_path / "data.format"  # (a path, like a row's quoted content, is never reworded)
    folder.mkdir()
    for rows, error in (([{"text": "a b c hello"}], r"row 1: cannot tell the data format .*set "
                                                     r"data\.ptx_format/ptx_columns"),
                        ([{"messages": [{"role": "data.columns", "content": "x"}]}],
                         r"row 1: messages\[0\] must be .*\(got role 'data\.columns'\)")):
        cfg = PPOConfig.model_validate(base | {"data": {"train": prompts, "eval_fraction": 0,
                                                        "ptx": _jsonl(folder / "ptx.jsonl", rows)}})
        with pytest.raises(DataError, match=r"data\.format/ptx\.jsonl " + error):
            load_ppo_data(cfg, tmp_path, ONE_PROCESS, tokenizer, save=False)  # (and the run, past the sniff)


def test_load_prompts_refuses_a_prompt_that_encodes_to_no_token(tmp_path):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "x": 1}, unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Replace(Regex("[a-w]"), "")  # every letter but x is erased before splitting
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    blind = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x x"}, {"prompt": "hello"}])
    with pytest.raises(DataError, match=r"p.jsonl row 2: the prompt encodes to no token"):
        _load(path, blind)
    prompts, _, log = _load(path, blind, on_bad_row="skip")
    assert prompts == [[1, 1]] and log.total == 1


def test_load_prompts_max_prompt_length_keeps_the_last_tokens(tmp_path, tokenizer):
    long = "the quick brown fox jumps over the lazy dog"
    full = _enc(tokenizer, long)
    assert len(full) > 4
    prompts, truncated, _ = _load(_jsonl(tmp_path / "p.jsonl", [{"prompt": long}, {"prompt": "hi"}]), tokenizer,
                                  max_prompt_length=4)
    assert prompts == [full[-4:], _enc(tokenizer, "hi")] and truncated == 1
    assert len(_enc(tokenizer, "hi")) <= 4


@pytest.mark.parametrize("mode", ["error", "warn", "off"])
def test_rendering_check_modes(tmp_path, mode, monkeypatch):
    """data.rendering_check: error raises naming the model, warn prints and goes on, off does not look; a model
    without a record (a hub model) is not checked."""
    from stages.distributed import DistInfo
    from stages.errors import ConfigError
    from stages import rendering
    from stages.ppo import trainer
    from stages.ppo.trainer import check_prompt_rendering as check_rendering

    said = []
    monkeypatch.setattr(trainer, "say", lambda enabled, text: said.append(text))
    if mode == "off":  # off reads no record at all
        monkeypatch.setattr(rendering, "read_rendering", lambda folder: pytest.fail("read with rendering_check off"))

    for name, meta in (("sft", {"stage": "sft", "rendering": {"styles": ["chat"], "chat_template_sha256": "x"}}),
                       ("rm", {"stage": "train-rm"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "rlhf_checkpoint.json").write_text(json.dumps(meta))
    cfg = SimpleNamespace(data=SimpleNamespace(rendering_check=mode, content_special_tokens="text"),
                          model=SimpleNamespace(name_or_path=str(tmp_path / "sft")),
                          reward_model=SimpleNamespace(name_or_path=str(tmp_path / "rm")))
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=CPU)
    tok = SimpleNamespace(chat_template="t")
    if mode == "error":
        with pytest.raises(ConfigError, match=f"the policy \\(SFT\\) {tmp_path / 'sft'} was trained on chat-template "
                                              "conversations; PPO renders its prompts as HH-RLHF"):
            check_rendering(cfg, {"raw_hh"}, tok, dist)
        with pytest.raises(ConfigError, match="trained with another chat template"):
            check_rendering(cfg, {"chat"}, tok, dist)
        # HH-trained models and prompts from a prompt column: the hint names the setting that reads them as HH
        meta = {"stage": "sft", "rendering": {"styles": ["raw_hh"], "chat_template_sha256": None}}
        (tmp_path / "sft" / "rlhf_checkpoint.json").write_text(json.dumps(meta))
        with pytest.raises(ConfigError, match="HH-RLHF text in a prompt column is read as HH with data.format: hh and "
                                              "data.columns.text naming that column"):
            check_rendering(cfg, {"raw_pr"}, tok, dist)
        return
    check_rendering(cfg, {"raw_hh"}, tok, dist)
    out = "".join(said)
    assert ("warning: the policy (SFT)" in out and "reward model" not in out) == (mode == "warn"), out


def test_rendering_records_template_digest_and_unreadable_record(tmp_path):
    from stages.rendering import read_rendering, rendering_record, template_digest, trained_with_eos

    lone = SimpleNamespace(chat_template={"default": "{{ x }}"})
    assert template_digest(lone) == template_digest(SimpleNamespace(chat_template="{{ x }}")) is not None
    named = SimpleNamespace(chat_template={"default": "{{ x }}", "tool_use": "{{ y }}"})
    assert template_digest(named) not in (None, template_digest(lone))
    assert template_digest(SimpleNamespace(chat_template=None)) is None
    assert rendering_record(["raw_hh", "raw_hh"], lone) == {"styles": ["raw_hh"], "chat_template_sha256": None}
    assert rendering_record(["raw_hh"], lone, False) == {"styles": ["raw_hh"], "chat_template_sha256": None,
                                                         "add_eos": False}
    assert read_rendering(str(tmp_path)) is None  # no rlhf_checkpoint.json: a model no stage wrote
    assert trained_with_eos(str(tmp_path))  # the default
    (tmp_path / "rlhf_checkpoint.json").write_text('{"stage": "sft"}')
    assert read_rendering(str(tmp_path)) is None  # written before records existed
    assert trained_with_eos(str(tmp_path))
    for add_eos in (True, False, None):
        record = rendering_record(["raw_pr"], lone, add_eos)
        (tmp_path / "rlhf_checkpoint.json").write_text(json.dumps({"stage": "train-rm", "rendering": record}))
        assert trained_with_eos(str(tmp_path)) is (add_eos is not False)
    # data.rm_add_eos wins; against a record that says otherwise with a warning naming both
    warned: list[str] = []
    assert trained_with_eos(str(tmp_path), False, warned.append) is False and not warned  # the record has none
    assert trained_with_eos(None, False) is False and trained_with_eos(None) is True
    (tmp_path / "rlhf_checkpoint.json").write_text(json.dumps({"rendering": rendering_record([], lone, True)}))
    assert trained_with_eos(str(tmp_path), False, warned.append) is False
    assert warned == [f"warning: data.rm_add_eos: false, but {tmp_path} records that the reward model was trained "
                      "with data.add_eos: true; reading responses as data.rm_add_eos says"]
    assert trained_with_eos(str(tmp_path), True, warned.append) is True and len(warned) == 1
    (tmp_path / "rlhf_checkpoint.json").write_text('{"stage": "sft", "rendering": {"sty')
    with pytest.raises(CheckpointError, match="cannot read .*rlhf_checkpoint.json: JSONDecodeError"):
        read_rendering(str(tmp_path))


def test_a_resumed_run_compares_with_a_best_written_after_its_checkpoint(tmp_path):
    """best/ written by the interrupted run at iteration 7, after the checkpoint at 6 it resumes from: its reward
    becomes the one to beat when higher than the checkpoint's; a best/ from before the checkpoint (already in
    its state), a lower or non-finite reward, or no best/ leave the checkpoint's."""
    from stages.ppo.trainer import resumed_best

    assert resumed_best(tmp_path, 6, 0.5) == (0.5, None)  # no best/
    (tmp_path / "best").mkdir()
    record = tmp_path / "best" / "rlhf_checkpoint.json"
    for iteration, reward, best, want in ((7, 0.9, 0.5, (0.9, 7)), (7, 0.9, None, (0.9, 7)), (7, 0.4, 0.5, (0.5, None)),
                                          (6, 0.9, 0.5, (0.5, None)), (7, float("nan"), 0.5, (0.5, None))):
        record.write_text(json.dumps({"stage": "ppo", "iteration": iteration, "eval_reward": reward}))
        assert resumed_best(tmp_path, 6, best) == want, (iteration, reward, best)
    for broken in ("{not json", "[1, 2]", '{"eval_reward": 0.9}'):
        record.write_text(broken)
        assert resumed_best(tmp_path, 6, 0.5) == (0.5, None)


def test_only_a_finite_reward_above_the_best_during_policy_iterations_makes_a_new_best():
    """beats_best: the first finite reward is best; later ones must be strictly higher; a NaN or ±inf reward
    never is (a NaN best would freeze best/ for the rest of the run), nor any reward while only the critic
    trains."""
    from stages.ppo.trainer import beats_best

    nan, inf = float("nan"), float("inf")
    assert beats_best(0.1, None, False) and beats_best(-3.0, None, False)
    assert beats_best(0.6, 0.5, False) and not beats_best(0.5, 0.5, False) and not beats_best(0.4, 0.5, False)
    assert not any(beats_best(r, b, False) for r in (nan, inf, -inf) for b in (None, 0.5))
    assert not beats_best(0.9, None, True) and not beats_best(0.9, 0.5, True)


def test_the_reading_of_special_token_strings_is_recorded_and_checked_like_the_template():
    """A policy fine-tuned with data.content_special_tokens: control (tool-call tags as control tokens) would see
    its prompts' tags as text under PPO's default: the rendering check names it, only where both render with the
    chat template and both say how they read them."""
    from stages.rendering import rendering_mismatches, rendering_record

    tok = SimpleNamespace(chat_template="{{ messages }}")
    control = rendering_record(["chat"], tok, True, "control")
    assert control["content_special_tokens"] == "control"
    assert "content_special_tokens" not in rendering_record(["raw_pr"], tok, True, "control")  # nothing rendered
    assert rendering_mismatches({"chat"}, tok, {"policy DIR": control}, "PPO", "text") == [
        "policy DIR was trained with data.content_special_tokens: control; PPO reads its prompts with text"]
    assert rendering_mismatches({"chat"}, tok, {"policy DIR": control}, "PPO", "control") == []
    older = rendering_record(["chat"], tok, True)  # a record from before the key: not compared
    assert rendering_mismatches({"chat"}, tok, {"policy DIR": older}, "PPO", "text") == []


def test_hh_prompts_with_markers_after_a_single_line_break_are_bad_rows(tmp_path, tokenizer):
    """`Human: hi\\nAssistant: hello` (or CRLF text) has no HH assistant marker: PPO took the whole text, answer
    and all, as the human turn and prompted after it (SFT refused the same row); now a bad row naming the
    marker, raw or through the chat template."""
    rows = [{"chosen": "Human: hi\nAssistant: hello"}, {"chosen": "\n\nHuman: what is 2+2?"}]
    for chat in (False, True):
        prompts, _, log = _load(_jsonl(tmp_path / "hh.jsonl", rows), tokenizer, format="hh", on_bad_row="skip",
                                use_chat_template=chat)
        assert len(prompts) == 1 and log.total == 1, chat
        assert "a 'Assistant:' marker after a single line break" in next(iter(log.reasons)), log.reasons
