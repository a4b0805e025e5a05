"""The fast paths against their references (CPU, float32 unless stated):

- decoding with the static KV cache (stages/ppo/decode.py) vs the dynamic one: the same next-token logits at
  every step (|diff| <= 1e-5), hence the same samples from the same seed; compiled steps likewise; and the
  samples' frequencies against the documented sampling rule applied to unpadded batch-1 logits (chi-square);
- chunked, checkpointed log-probs (rollout.response_logprobs) vs the full-logits reference: the same log-probs,
  entropies and gradients (|diff| <= 1e-5 in float32, <= 0.05 nats in bfloat16), without ever holding a
  full-vocabulary logits tensor for the batch; for models that transform their head's output (Gemma-2
  soft-capping, Granite and Cohere scaling, an unknown transform) and under ZeRO-3 on two ranks whose response
  widths differ.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM)

from stages.config import GenerationConfig
from stages.errors import ConfigError
from stages.models import enable_activation_checkpointing
from stages.ppo import decode
from stages.ppo.decode import DynamicDecoder, StaticDecoder, bucket_left_pad, cache_keyword, static_state
from stages.ppo.rollout import (
    Held,
    fill_undrawn,
    final_hidden_states,
    left_pad,
    process_logits,
    response_logprobs,
    sample,
    sampling_params,
)
from stages.reward_model import positions_from_mask
import stages.ppo.rollout as rollout_mod

VOCAB, PAD_ID, CPU = 48, 0, torch.device("cpu")
PROMPTS = [[5, 9, 12, 3, 7], [21, 4], [33, 8, 15]]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str, layers: int = 2, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=PAD_ID, initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    elif kind == "jamba":  # attention and Mamba layers: the Mamba layer reads the mask's last P columns
        cfg = AutoConfig.for_model("jamba", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_experts=2, mamba_dt_rank=4,
                                   attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                   expert_layer_offset=1, pad_token_id=PAD_ID, initializer_range=0.2,
                                   use_mamba_kernels=False)
        model = AutoModelForCausalLM.from_config(cfg)
    elif kind == "opt":  # its causal LM calls the backbone's decoder, not the backbone
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=PAD_ID, init_std=0.2)
        model = OPTForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=layers, n_head=4, n_positions=128,
                         pad_token_id=PAD_ID, initializer_range=0.2)
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


ARCHS = pytest.mark.parametrize("kind", ["llama", "gpt2", "jamba"])
HEAD_ARCHS = pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])


# ============================================================================================ decoding
@ARCHS
@torch.no_grad()
def test_static_and_dynamic_decoders_give_the_same_logits_at_every_step(kind):
    model = _model(kind)
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    feed = torch.tensor([[7, 7, 11, 2, 9, 30], [1, 40, 40, 3, 3, 8], [6, 5, 4, 3, 2, 1]])
    alive = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    padded_ids, padded_mask = bucket_left_pad(ids, mask, PAD_ID)
    assert padded_ids.shape == (3, 32) and torch.equal(padded_ids[:, -5:], ids)
    dyn = DynamicDecoder(model, mask)
    sta = StaticDecoder(model, padded_mask, max_new_tokens=7, compile_step=False)
    pos_d, pos_s = positions_from_mask(mask), positions_from_mask(padded_mask)
    assert torch.equal(pos_s[:, -5:], pos_d)  # the extra left padding changes no position
    a, b = dyn.prefill(ids, pos_d), sta.prefill(padded_ids, pos_s)
    nxt = pos_d[:, -1] + 1
    diffs = [float((a - b).abs().max())]
    for step in range(feed.shape[1]):
        a = dyn.step(feed[:, step], alive[:, step], nxt)
        b = sta.step(feed[:, step], alive[:, step], nxt)
        nxt = nxt + 1
        diffs.append(float((a - b).abs().max()))
    assert a.shape == b.shape == (3, VOCAB)
    assert max(diffs) <= 1e-5, diffs
    # the static mask holds the prompt mask, then one column per step fed (alive), then zeros
    assert sta.mask.shape == (3, 32 + 7)
    assert torch.equal(sta.mask[:, 32:38], alive.long()) and int(sta.mask[:, 38:].sum()) == 0


@ARCHS
def test_same_seed_same_samples_from_either_cache(kind):
    model = _model(kind)
    ids, mask = left_pad(PROMPTS * 4, PAD_ID, CPU)
    out = {}
    for cache in ("dynamic", "static"):
        gen = GenerationConfig(max_new_tokens=16, cache=cache)  # T 0.8, top-p 0.9, penalty 1.1
        torch.manual_seed(11)
        out[cache] = sample(model, ids, mask, gen, [1, 2], PAD_ID, VOCAB)
    d, s = out["dynamic"], out["static"]
    assert torch.equal(d.response, s.response) and torch.equal(d.response_mask, s.response_mask)
    assert torch.equal(d.truncated, s.truncated)
    assert torch.equal(s.prompt_ids, ids) and torch.equal(s.prompt_mask, mask)  # bucket padding not returned
    assert d.response_mask.sum() > 24  # really sampled something


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_a_model_that_returns_no_kv_cache_is_refused_by_name(cache):
    """OpenAI GPT has no KV cache (RecurrentGemma keeps its state inside the model): neither decoder can work."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("openai-gpt", vocab_size=VOCAB, n_embd=32, n_layer=1,
                                                                  n_head=4)).eval()
    with pytest.raises(ConfigError, match=r"^OpenAIGPTLMHeadModel returns no KV cache from its forward "
                                          r"\(CausalLMOutput\), which rlhf's sampler decodes with"):
        sample(model, *left_pad(PROMPTS, PAD_ID, CPU), GenerationConfig(max_new_tokens=3, cache=cache), [1], PAD_ID,
               VOCAB)


def test_an_attention_free_model_is_refused_before_it_samples():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", vocab_size=VOCAB, hidden_size=32,
                                                                  num_hidden_layers=1, state_size=4)).eval()
    with pytest.raises(ConfigError, match=r"^MambaForCausalLM \(mamba\) has no attention layers"):
        sample(model, *left_pad(PROMPTS, PAD_ID, CPU), GenerationConfig(max_new_tokens=3, cache="dynamic"), [1],
               PAD_ID, VOCAB)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_decoders_use_the_models_own_cache_keyword(cache):
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40) and warns
    # on the old one; older 5.x (and the stand-in models of test_ppo_units) take only `past_key_values`
    model = _model("llama")
    new_api = "cache" in inspect.signature(model.forward).parameters
    assert cache_keyword(model) == ("cache" if new_api else "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sample(model, *left_pad(PROMPTS, PAD_ID, CPU), GenerationConfig(max_new_tokens=3, cache=cache), [1], PAD_ID,
               VOCAB)

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
            raise AssertionError

    assert cache_keyword(OldStyle()) == "past_key_values"


def _slot(model: torch.nn.Module, batch: int) -> dict:
    return static_state(model)["caches"][(batch, torch.float32, CPU)]


def test_static_cache_is_reused_and_reset_between_rollouts():
    model = _model("llama")
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    gen = GenerationConfig(max_new_tokens=6, cache="static")
    torch.manual_seed(3)
    first = sample(model, ids, mask, gen, [1], PAD_ID, VOCAB)
    cache = _slot(model, 3)["cache"]
    torch.manual_seed(3)
    again = sample(model, ids, mask, gen, [1], PAD_ID, VOCAB)
    assert _slot(model, 3)["cache"] is cache  # same shape: same buffers
    assert torch.equal(first.response, again.response)  # and nothing left over from the first rollout
    sample(model, *left_pad(PROMPTS[:2], PAD_ID, CPU), gen, [1], PAD_ID, VOCAB)
    assert _slot(model, 2)["cache"] is not cache and _slot(model, 3)["cache"] is cache  # one cache per batch size


def test_static_cache_grows_for_wider_prompts_and_serves_narrower_ones_alike(monkeypatch):
    """Prompt batches of 32, then 64, then 32 bucketed columns: the cache grows once to 64 + R columns and
    serves the narrower batch after it with the same samples as the dynamic reference; the compiled step is
    traced once per cache width (recompiling for the narrow batch after the growth is an error here)."""
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "eager")
    model = _model("llama")
    narrow, wide = PROMPTS, [list(range(2, 42)), [7, 8], list(range(5, 38))]  # widths 5 and 40
    widths, caches = [], []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for n, prompts in enumerate((narrow, wide, narrow)):
        ids, mask = left_pad(prompts, PAD_ID, CPU)
        out = {}
        for cache, compiled in (("dynamic", False), ("static", True)):
            torch.manual_seed(9)
            with torch._dynamo.config.patch(error_on_recompile=n == 2):
                out[cache] = sample(model, ids, mask, GenerationConfig(max_new_tokens=6, cache=cache,
                                                                       compile=compiled), [1], PAD_ID, VOCAB)
        assert torch.equal(out["static"].response, out["dynamic"].response), n
        widths.append(_slot(model, 3)["width"])
        caches.append(_slot(model, 3)["cache"])
    assert widths == [32 + 6, 64 + 6, 64 + 6] and caches[1] is caches[2]
    # one decoding step per cache width, and the top-p floor of the compiled path's sampling (top_p 0.9)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    # allocated for a prompt capacity (rlhf ppo: data.max_prompt_length) it is as wide as that from the start
    fresh = _model("llama")
    sample(fresh, *left_pad(narrow, PAD_ID, CPU), GenerationConfig(max_new_tokens=6, cache="static"), [1], PAD_ID,
           VOCAB, prompt_capacity=40)
    assert _slot(fresh, 3)["width"] == 64 + 6


def test_compiled_decoding_draws_the_same_samples():
    model = _model("llama", layers=1)
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    out = []
    for compiled in (False, True):
        torch.manual_seed(5)
        gen = GenerationConfig(max_new_tokens=5, min_new_tokens=5, cache="static", compile=compiled)
        out.append(sample(model, ids, mask, gen, [1], PAD_ID, VOCAB).response)
    assert "step" in static_state(model)
    assert torch.equal(out[0], out[1])
    # the compiled step kept on the model serves compiled decoders only
    padded = bucket_left_pad(ids, mask, PAD_ID)[1]
    assert StaticDecoder(model, padded, 5, compile_step=False)._step is decode._forward_last
    assert StaticDecoder(model, padded, 5, compile_step=True)._step is static_state(model)["step"]


def test_sampling_compiled_into_the_decoding_step_draws_the_eager_samples():
    """generation.compile_sampling: the compiled step (inductor, as in production) also draws the next token.
    Same seed, same tokens as the eager reference (dynamic cache), with the repetition penalty, top-k, top-p,
    stop tokens held back before min_new_tokens and rows stopping; one graph for the steps before
    min_new_tokens and one after, traced once over several rollouts."""
    model = _model("llama", layers=1)
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    settings = dict(max_new_tokens=8, min_new_tokens=3, repetition_penalty=1.3, top_k=40, top_p=0.9, temperature=0.7)
    stops = [3, 17, PAD_ID]  # ids the tiny model draws now and then: rows stop at different steps
    vocab = VOCAB - 6  # logits wider than the vocabulary
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for seed in range(3):
        out = {}
        for name, extra in (("eager", dict(cache="dynamic")),
                            ("fused", dict(cache="static", compile=True, compile_sampling=True))):
            torch.manual_seed(seed)
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                out[name] = sample(model, ids, mask, GenerationConfig(**settings, **extra), stops, PAD_ID, vocab)
            out[name + "_rng"] = torch.rand(1)  # the generator is left where the eager path leaves it
        assert torch.equal(out["fused"].response, out["eager"].response), seed
        assert torch.equal(out["fused"].response_mask, out["eager"].response_mask), seed
        assert torch.equal(out["fused_rng"], out["eager_rng"]), seed
    assert "step_draw" in static_state(model)
    # held stop ids or not; and the top-p floor of the first token's sampling (from the prefill, outside the step)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


def test_a_history_whose_undrawn_columns_repeat_the_first_token_is_penalised_as_its_drawn_prefix():
    """What lets the fused step read the whole [B, R] history at every step: with the columns after t holding
    the first token (`fill_undrawn`), the scores equal those of the first t columns, bit for bit, rows that
    finished (pad) and stop ids held back included, eagerly and compiled (inductor, one shape for every t)."""
    torch.manual_seed(0)
    rows, width, vocab = 4, 6, 50
    logits = (torch.randn(rows, vocab + 6) * 3).to(torch.bfloat16)
    drawn = torch.randint(1, vocab, (rows, width))
    drawn[1, 3:] = PAD_ID  # row 1 finished after 3 tokens
    banned = torch.tensor([7, 11])
    compiled = torch.compile(process_logits, dynamic=False)
    for gen in (GenerationConfig(repetition_penalty=1.3, temperature=0.7, top_p=1.0),  # no cut hides a change
                GenerationConfig(repetition_penalty=1.3, top_k=20, top_p=0.8, temperature=0.7)):
        for t in range(1, width + 1):
            full = torch.empty_like(drawn)
            full[:, 0] = drawn[:, 0]
            fill_undrawn(full, drawn[:, 0])  # as the rollout does after its first draw
            full[:, 1:t] = drawn[:, 1:t]  # then each step's own column
            expected = process_logits(logits, drawn[:, :t], gen, vocab, banned)
            assert torch.equal(process_logits(logits, full, gen, vocab, banned), expected), t
            assert torch.equal(compiled(logits, full, sampling_params(gen), vocab, banned), expected), t
            if t < width and gen.top_p == 1.0:  # filled with another token, the penalty would reach one not drawn
                full[:, t:] = 45
                assert not torch.equal(process_logits(logits, full, gen, vocab, banned), expected), t


def _reference_distribution(model: torch.nn.Module, prompt: list[int], drawn: list[int], gen: GenerationConfig,
                            stops: list[int]) -> torch.Tensor:
    """The next-token distribution [V] (float64) the documented sampling rule gives after `prompt` + `drawn`
    before min_new_tokens, computed apart from the code under test: a batch-1 forward without padding, then the
    penalty on the drawn tokens, the `stops` ids removed, the temperature, top-k, and top-p by walking the sorted probabilities."""
    z = model(input_ids=torch.tensor([prompt + drawn])).logits[0, -1].double()
    for token in set(drawn):
        z[token] = z[token] / gen.repetition_penalty if z[token] > 0 else z[token] * gen.repetition_penalty
    z[stops] = float("-inf")  # before min_new_tokens
    z = z / gen.temperature
    if gen.top_k:
        z[z < torch.sort(z, descending=True).values[gen.top_k - 1]] = float("-inf")
    p = torch.softmax(z, -1)
    mass, floor = 0.0, 1.0
    for q in torch.sort(p, descending=True).values.tolist():
        if mass >= gen.top_p:
            break
        mass, floor = mass + q, q
    p = torch.where(p >= floor, p, 0.0)
    return p / p.sum()


def _chi_square_bound(df: int, z: float = 4.75) -> float:
    """The chi-square quantile with `df` degrees of freedom at the normal quantile `z` (4.75: p ~ 1e-6), by the
    Wilson-Hilferty approximation df (1 - 2/(9 df) + z sqrt(2/(9 df)))^3."""
    a = 2 / (9 * df)
    return df * (1 - a + z * a ** 0.5) ** 3


@pytest.mark.parametrize("settings", [dict(),  # the defaults: T 0.8, top-p 0.9, penalty 1.1
                                      dict(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)])
@torch.no_grad()
def test_the_fast_path_samples_from_the_documented_distribution(settings):
    """3 x 3000 rows of three prompts of different lengths, left-padded into one batch, 2 tokens each from the
    static cache: the counts of the first token per prompt, and of the second after each prompt's most frequent
    first token, against `_reference_distribution` by a chi-square test (cells expecting < 5 draws pooled; the
    bound is p ~ 1e-6), and no token drawn where the rule gives probability 0. Without the temperature or the
    top-p cut the sampler draws tokens the rule removes; without the penalty of 1.3 the statistic is ~3x the
    bound (the default 1.1 moves it less than the test can see). Statistics here: 1-26 against bounds of 37-73.
    The compiled paths draw what this one draws (tests above), so this covers them."""
    model = _model("llama")
    gen = GenerationConfig(max_new_tokens=2, min_new_tokens=2, cache="static", **settings)
    rows = PROMPTS * 3000
    ids, mask = left_pad(rows, PAD_ID, CPU)
    torch.manual_seed(3)
    drawn = sample(model, ids, mask, gen, [1], PAD_ID, VOCAB).response.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for prompt in map(tuple, PROMPTS):
        firsts = [r[0] for p, r in zip(rows, drawn) if tuple(p) == prompt]
        groups[prompt] = firsts
        common = max(set(firsts), key=firsts.count)
        groups[prompt + (-1, common)] = [r[1] for p, r in zip(rows, drawn) if tuple(p) == prompt and r[0] == common]
    for key, tokens in groups.items():
        prompt, after = (list(key[:-2]), [key[-1]]) if -1 in key else (list(key), [])
        assert len(tokens) >= 200, (key, len(tokens))
        expected = _reference_distribution(model, prompt, after, gen, [1]) * len(tokens)
        observed = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()
        assert observed[expected == 0].sum() == 0, key  # never a token the rule removes
        big = expected >= 5
        o = torch.cat([observed[big], observed[~big].sum()[None]])
        e = torch.cat([expected[big], expected[~big].sum()[None]])
        o, e = o[e > 0], e[e > 0]
        statistic = float(((o - e) ** 2 / e).sum())
        assert len(o) >= 4 and statistic < _chi_square_bound(len(o) - 1), (key, statistic, len(o))


def test_compile_sampling_needs_compile():
    with pytest.raises(ValueError, match="compile_sampling needs compile: true"):
        GenerationConfig(compile_sampling=True)


def test_compiled_decoding_is_traced_once_across_ppo_iterations(monkeypatch, process_group):
    """rlhf ppo samples from its policy engine's module between optimizer steps. The compiled decoding step must
    stay one graph: DeepSpeed's forward hook on that module reads the engine's step counters, and a step traced
    through it recompiled at every iteration (a fresh CUDA-graph recording each time on a GPU). Traced here by
    dynamo with recompilation an error (backend eager: the same guards, no code generation), the module in
    training mode with gradient checkpointing as a PPO preset has it."""
    from stages import engine as engines
    from stages.config import DeepSpeedConfig, TrainConfig

    monkeypatch.setattr(decode, "COMPILE_BACKEND", "eager")
    model = _model("llama").train()
    enable_activation_checkpointing(model)
    train = TrainConfig(micro_batch_size=3, lr=1e-3)
    engine = engines.initialize_engine(model, engines.build_deepspeed_config(train, DeepSpeedConfig(precision="fp32"),
                                                                             1, False), train, 10)
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    gen = GenerationConfig(max_new_tokens=4, min_new_tokens=4, cache="static", compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    before = [p.detach().clone() for p in model.parameters()]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            roll = sample(engine.module, ids, mask, gen, [1], PAD_ID, VOCAB)
            assert model.training  # the sampler's eval mode was undone
            seq, seq_mask = roll.sequences()
            loss = engine(input_ids=seq, attention_mask=seq_mask, labels=seq).loss
            engine.backward(loss)
            engine.step()
    assert engine.global_steps == 3 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    frames = torch._dynamo.utils.counters["stats"]
    assert frames["unique_graphs"] == 2, dict(frames)  # the decoding step and the top-p floor of its sampling


def _ancestors(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def _host_syncs(fn) -> tuple[int, int]:
    """Ops `fn` runs that make the host wait for the device on a GPU, counted by torch.profiler on the CPU
    (where every one of them shows): `aten::_local_scalar_dense` (behind .item(), bool() and float() of a
    tensor) and `aten::nonzero` (boolean indexing), except inside `aten::_assert_async` (a device-side check
    on a GPU, e.g. torch.multinomial's); and, second, the `aten::index_put_`s (an assignment like
    z[:, ids] = -inf, whose host scalar CUDA copies to the device with a blocking copy)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    syncs = puts = 0
    for event in prof.events():
        above = _ancestors(event)
        if event.name in ("aten::_local_scalar_dense", "aten::nonzero"):
            syncs += "aten::_assert_async" not in above
        puts += event.name == "aten::index_put_"
    return syncs, puts


def test_static_decoding_makes_no_host_sync_per_step():
    # exactly as many syncs in a rollout of 8 tokens as in one of 4 (the prefill's), none in a decoding step,
    # also while the stop token is held back (min_new_tokens); with a stop check (min_new_tokens below
    # max_new_tokens), one per step that asks it, as sample() documents
    model = _model("llama")
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)

    def rollout(n: int, min_new: int, stop: int) -> tuple[int, int]:
        gen = GenerationConfig(max_new_tokens=n, min_new_tokens=min_new, cache="static")
        sample(model, ids, mask, gen, [stop], PAD_ID, VOCAB)  # the cache allocated outside the count
        return _host_syncs(lambda: sample(model, ids, mask, gen, [stop], PAD_ID, VOCAB))

    fixed, puts = rollout(4, 4, stop=1)  # stop id 1 held back at every step
    assert rollout(8, 8, stop=1) == (fixed, puts) and fixed <= 3 and puts == 0
    never = VOCAB + 5  # a stop id no row can draw: every row runs to max_new_tokens and asks at every step
    assert rollout(8, 2, stop=never) == (fixed + 5, puts)  # asked after steps 2..6 (the last step never asks)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_min_new_tokens_keeps_stop_tokens_out_until_reached(cache):
    # a model whose favourite token is the stop id 1: without min_new_tokens rows stop at once
    model = _model("llama")
    model.lm_head.register_forward_hook(lambda mod, args, out: out + 4.0 * (torch.arange(VOCAB) == 1))
    ids, mask = left_pad(PROMPTS * 3, PAD_ID, CPU)
    gen = GenerationConfig(max_new_tokens=8, cache=cache, top_p=1.0)
    torch.manual_seed(0)
    free = sample(model, ids, mask, gen, [1], PAD_ID, VOCAB)
    assert free.response_mask.sum(1).float().mean() < 4  # stop tokens come early
    torch.manual_seed(0)
    held = sample(model, ids, mask, gen.model_copy(update={"min_new_tokens": 5}), [1], PAD_ID, VOCAB)
    lengths = held.response_mask.sum(1)
    assert int(lengths.min()) >= 5
    assert not (held.response[:, :4] == 1).any()
    exact = sample(model, ids, mask, gen.model_copy(update={"min_new_tokens": 8}), [1], PAD_ID, VOCAB)
    assert exact.response_mask.sum(1).tolist() == [8] * 9  # min = max: exactly max_new_tokens each


def test_min_new_tokens_above_max_is_a_config_error():
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="compile needs cache: static"):
        GenerationConfig(cache="dynamic", compile=True)


# ============================================================================================ log-probs
def _batch(kind: str):
    ids, mask = left_pad(PROMPTS, PAD_ID, CPU)
    resp = torch.tensor([[11, 2, 0, 0], [13, 14, 15, 16], [16, 3, 9, 0]])
    rmask = (resp != 0).long()
    return torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1), ids.shape[1], resp


@HEAD_ARCHS
@torch.no_grad()
def test_final_hidden_states_are_what_the_lm_head_reads(kind):
    ids, mask, _, _ = _batch(kind)
    model = _model(kind)
    full = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), output_hidden_states=True)
    hooks = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    hidden, last = final_hidden_states(model, ids, mask, with_logits=True)
    assert torch.allclose(model.get_output_embeddings()(hidden), full.logits, atol=1e-6)
    assert torch.allclose(last, full.logits[:, -1], atol=1e-6)
    if kind != "opt":  # (OPT's hidden_states[-1] is the decoder's before its output projection)
        assert torch.equal(hidden, full.hidden_states[-1])
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks  # the catching hooks are gone


def test_a_model_whose_forward_runs_no_hookable_backbone_is_named_with_the_setting_that_avoids_it():
    ids, mask, _, _ = _batch("llama")
    model = _model("llama")
    model.base_model_prefix = "lm_head"  # the "backbone" now returns a tensor, no last_hidden_state
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM.*\(Linear\).*train\.logprob_chunk: 0"):
        final_hidden_states(model, ids, mask)
    assert not model.lm_head._forward_hooks


@HEAD_ARCHS
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logprobs_entropy_and_gradients_equal_the_reference(kind, chunk):
    ids, mask, p, resp = _batch(kind)
    weights = torch.randn(resp.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for c in (0, chunk):
        model = _model(kind).train()
        model.zero_grad()
        logp, ent = response_logprobs(model, ids, mask, p, resp, with_entropy=True, chunk_tokens=c)
        ((logp * weights).sum() + ent.sum()).backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        results.append((logp.detach(), ent.detach(), grads))
    (lp0, e0, g0), (lp1, e1, g1) = results
    assert lp1.dtype == torch.float32 and lp1.shape == resp.shape
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 4
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


@pytest.mark.parametrize("chunk", [0, 5])
def test_logprobs_are_those_of_the_ids_the_sampler_can_draw(chunk):
    """An embedding with rows past the tokenizer (VOCAB - 8 ids drawable): log-probs, entropy and their gradients
    are those of softmax over the drawable ids' logits, on the reference and the chunked path alike; the rollout
    carries the sampler's vocabulary to the scoring and the update."""
    ids, mask, p, resp = _batch("llama")
    vocab = VOCAB - 8
    model = _model("llama").train()
    logp, ent = response_logprobs(model, ids, mask, p, resp, with_entropy=True, chunk_tokens=chunk, vocab=vocab)
    (logp.sum() + ent.sum()).backward()
    got = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    z = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, p - 1:-1, :vocab]
    logp_all = torch.log_softmax(z.float(), -1)
    want_lp, want_ent = logp_all.gather(-1, resp[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
    (want_lp.sum() + want_ent.sum()).backward()
    assert torch.allclose(logp, want_lp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    for n, q in model.named_parameters():
        assert torch.allclose(got[n], q.grad, atol=1e-5), n
    every_row = response_logprobs(model, ids, mask, p, resp, chunk_tokens=chunk)[0]
    assert (every_row - logp).abs().max() > 1e-3  # the 8 extra rows hold probability: leaving them out shows
    roll = sample(_model("llama"), *left_pad(PROMPTS, PAD_ID, CPU), GenerationConfig(max_new_tokens=4), [2],
                  PAD_ID, vocab)
    assert roll.vocab_size == vocab and roll.select([1, 0]).vocab_size == vocab
    assert int(roll.response.max()) < vocab


@pytest.mark.parametrize("chunk", [0, 5])
def test_logprobs_leave_out_the_stop_ids_held_back_before_min_new_tokens(chunk):
    """generation.min_new_tokens: the sampler never draws a stop id at the first positions, so the log-probs,
    entropy and their gradients there are those of softmax over the other ids (`Held`), on the reference and the
    chunked path alike (and on the chunked path's fallback to the reference). A policy that moves probability
    onto the held ids alone then shows no KL there, where the sampler cannot see the change (before, k1 read
    log((1 - p) / (1 - p_ref)) per position: -5.4 per token in an audit's case); the entropy's gradients stay
    finite however large the gradient flowing into it (an fp16 loss scale); the rollout carries what its
    sampler held back: the stop ids with a logit it reads."""
    ids, mask, p, resp = _batch("llama")
    held = Held((21, 30), 2)  # (neither among the responses' first two tokens: the sampler never drew them there)
    model = _model("llama").train()
    logp, ent = response_logprobs(model, ids, mask, p, resp, with_entropy=True, chunk_tokens=chunk, held=held)
    (logp.sum() + ent.sum()).backward()
    got = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    z = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, p - 1:-1].float()
    z = z.masked_fill((torch.arange(z.shape[1]) < 2)[:, None] & torch.isin(torch.arange(VOCAB), torch.tensor([21, 30])),
                      float("-inf"))
    logp_all = torch.log_softmax(z, -1)
    want_lp = logp_all.gather(-1, resp[..., None]).squeeze(-1)
    want_ent = -(logp_all.exp() * logp_all.nan_to_num(neginf=0.0)).sum(-1)
    (want_lp.sum() + want_ent.sum()).backward()
    assert torch.allclose(logp, want_lp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    for n, q in model.named_parameters():
        assert torch.allclose(got[n], q.grad, atol=1e-5), n
    other = _model("llama")
    with torch.no_grad():
        other.lm_head.weight[[21, 30]] += 1.0  # only the held ids' logits move
    with torch.no_grad():
        mine, theirs = (response_logprobs(m, ids, mask, p, resp, chunk_tokens=chunk, held=held)[0]
                        for m in (_model("llama"), other))
        whole = response_logprobs(other, ids, mask, p, resp, chunk_tokens=chunk)[0]
    assert torch.allclose(mine[:, :2], theirs[:, :2], atol=1e-6) and (mine[:, 2:] - theirs[:, 2:]).abs().max() > 1e-3
    assert (whole[:, :2] - theirs[:, :2]).abs().max() > 1e-3  # (the whole distribution's log-probs do move)
    for scale in (2.0, 65536.0):  # (float32's lowest as the held logit made NaN gradients from 1 on)
        model = _model("llama").train()
        ent = response_logprobs(model, ids, mask, p, resp, with_entropy=True, chunk_tokens=chunk, held=held)[1]
        (scale * ent.sum()).backward()
        assert all(torch.isfinite(q.grad).all() for q in model.parameters()), scale
    if chunk:  # a model whose head the chunked path cannot reproduce falls back to the reference path, held too
        fallback = _model("llama")
        rollout_mod._FAST_HEAD_OK[fallback] = False
        with torch.no_grad():
            got = response_logprobs(fallback, ids, mask, p, resp, chunk_tokens=chunk, held=held)[0]
        assert torch.allclose(got, mine, atol=1e-6)
    gen = GenerationConfig(max_new_tokens=4, min_new_tokens=2)
    roll = sample(_model("llama"), *left_pad(PROMPTS, PAD_ID, CPU), gen, [2, VOCAB, VOCAB + 3], PAD_ID, VOCAB)
    assert roll.held == Held((2,), 2) and roll.select([1, 0]).held == roll.held  # (an id with no logit: left out)
    roll = sample(_model("llama"), *left_pad(PROMPTS, PAD_ID, CPU), gen, [2, VOCAB + 1], PAD_ID, VOCAB + 5)
    assert roll.held == Held((2,), 2)  # (the embedding's VOCAB rows, fewer than the vocabulary said: its width)
    assert not sample(_model("llama"), *left_pad(PROMPTS, PAD_ID, CPU), GenerationConfig(max_new_tokens=4), [2],
                      PAD_ID, VOCAB).held


def test_chunked_logprobs_in_bfloat16_stay_within_the_stated_tolerance():
    ids, mask, p, resp = _batch("llama")
    ref = response_logprobs(_model("llama"), ids, mask, p, resp)[0]
    with torch.no_grad():
        fast = response_logprobs(_model("llama", dtype=torch.bfloat16), ids, mask, p, resp, chunk_tokens=4)[0]
        slow = response_logprobs(_model("llama", dtype=torch.bfloat16), ids, mask, p, resp, chunk_tokens=0)[0]
    assert torch.allclose(fast, slow, atol=1e-6)  # the same bf16 logits, upcast the same way
    assert float((fast - ref.detach()).abs().max()) < 0.05


def test_chunked_logprobs_never_keep_full_vocabulary_logits_for_backward():
    """Every logit-shaped tensor (last dimension V, not a weight) autograd saves, recorded by a hook: the
    reference keeps [B, R, V] float32 logits; the chunked path nothing larger than one chunk of [chunk, V]."""
    ids, mask, p, resp = _batch("llama")
    sizes: dict[int, list[int]] = {}
    for chunk in (0, 4):
        model = _model("llama").train()
        weights = {q.untyped_storage().data_ptr() for q in model.parameters()}
        saved: list[int] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            logit_shaped = t.shape and t.shape[-1] == VOCAB and t.untyped_storage().data_ptr() not in weights
            saved.append(t.numel() if logit_shaped else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logp, _ = response_logprobs(model, ids, mask, p, resp, chunk_tokens=chunk)
        logp.sum().backward()
        sizes[chunk] = saved
    assert max(sizes[0]) >= resp.numel() * VOCAB  # float32 logits of every response token
    assert max(sizes[4]) <= 4 * VOCAB


def _transforming_model(kind: str) -> torch.nn.Module:
    """Tiny causal LMs whose logits are not their LM head's output."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD_ID, initializer_range=0.2)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, final_logit_softcapping=2.0))
    elif kind == "granite":
        model = GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=0.25))
    elif kind == "cohere":
        model = CohereForCausalLM(CohereConfig(**shape, logit_scale=3.0))
    else:  # a transform head_transform does not know: logits * 2.5 ("unknown"), * 1.002 ("slight")
        factor = 2.5 if kind == "unknown" else 1.002

        class Shifted(LlamaForCausalLM):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * factor
                return out
        model = Shifted(LlamaConfig(**shape))
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere", "unknown"])
def test_chunked_logprobs_follow_a_model_that_transforms_its_head_output(kind):
    ids, mask, p, resp = _batch("llama")
    results = []
    for chunk in (0, 4):
        model = _transforming_model(kind).train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logp, ent = response_logprobs(model, ids, mask, p, resp, with_entropy=True, chunk_tokens=chunk)
        (logp.sum() + ent.sum()).backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        results.append((logp.detach(), ent.detach(), grads, [str(w.message) for w in caught]))
    (lp0, e0, g0, _), (lp1, e1, g1, said) = results
    model = _transforming_model(kind)
    with torch.no_grad():
        head_out = model.get_output_embeddings()(final_hidden_states(model, ids, mask)[:, p - 1:-1])
    untransformed = torch.log_softmax(head_out.float(), -1).gather(-1, resp[..., None]).squeeze(-1)
    assert float((untransformed - lp0).abs().max()) > 0.1  # the transform matters at this scale
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name
    fell_back = any("train.logprob_chunk ignored" in m for m in said)
    assert fell_back == (kind == "unknown"), said


def test_a_float32_head_transform_smaller_than_bf16_rounding_is_still_noticed():
    """logits x 1.002 moves these logits by less than 1e-2 (the 16-bit tolerance) but more than float32's 1e-4:
    the chunked path falls back to the full logits and equals the reference."""
    ids, mask, p, resp = _batch("llama")
    model = _transforming_model("slight")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        moved = float((full - full / 1.002).abs().max())
        assert 1e-4 < moved < 1e-2, moved
        reference, _ = response_logprobs(model, ids, mask, p, resp, chunk_tokens=0)
        with pytest.warns(UserWarning, match="train.logprob_chunk ignored"):
            chunked, _ = response_logprobs(model, ids, mask, p, resp, chunk_tokens=4)
    assert torch.allclose(reference, chunked, atol=1e-6)


@pytest.mark.slow
def test_zero3_chunked_logprobs_on_two_ranks_with_different_response_widths(tmp_path):
    """tests/workers/zero3_logprobs.py on two CPU processes: rank 1 needs three LM-head blocks, rank 0 one. The
    ranks make as many head calls (each gathers the partitioned weight), so nothing deadlocks; log-probs equal
    the full-logits reference and one SGD step on them equals the reference's step."""
    from stages.runtime import free_port

    worker = Path(__file__).parent / "workers" / "zero3_logprobs.py"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(worker)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    results = [json.loads(line[len("RESULT "):]) for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2, "\n".join(out[-2000:] for out in outs)
    for r in results:
        assert r["logprob_diff"] <= 1e-5 and r["step_diff"] <= 1e-6 and r["moved"] > 1e-3, r
