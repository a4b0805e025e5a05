"""The forward passes of a decoding loop, with two KV caches behind one interface.

`sample` (rollout.py) owns the sampling; a decoder only turns tokens into next-token logits:

    logits = decoder.prefill(prompt_ids, mask, positions)    # [B, V] at each prompt's last column
    logits = decoder.step(tokens, mask, positions)           # [B, V] after feeding one token per row

dynamic  transformers' DynamicCache, grown by concatenation each step; the mask grows by one column per step.
         Full [B, P, V] prefill logits. The reference path: plain, any model (also the test stand-ins).
static   a StaticCache of W >= P + R columns and a [B, W] mask filled in place, kept on the model per batch
         size and reused by every later rollout that fits (a wider prompt batch grows it; a narrower one leaves
         the columns after its own P + R masked), logits of the last position only. The prefill passes the
         prompt's own P mask columns, as transformers' generate() does (a recurrent layer — Jamba's, Falcon-H1's,
         Qwen3-Next's Mamba or linear-attention layers — reads the mask's last P columns as the prompt's);
         each decoding step the whole W-column mask. Prompts are left-padded to a multiple of `PROMPT_BUCKET`
         columns (the extra padding is masked and changes nothing), so the cache grows a few times at most;
         rlhf ppo and rlhf eval allocate it for data.max_prompt_length prompt columns from the start
         (`prompt_capacity`), so it never grows. A decoding step's shapes are [B, 1] tokens against the
         W-column cache whatever the prompt width, so with
         `compile` one graph serves every rollout of a batch size: each step is a torch.compile'd forward (mode
         reduce-overhead: CUDA graphs on a GPU, one graph launch per token instead of hundreds of kernel
         launches); the prefill stays eager.

Both compute the same function of the same inputs: tests/test_fastpath.py checks the logits agree to float
rounding (and greedy tokens exactly) and that one seed draws the same samples from either.

Both call the module's own `forward`, not the module: a DeepSpeed engine hooks its module's `__call__` with a
prologue that reads the engine's step counters, so a compiled step traced through it recompiled at every PPO
iteration (tests/test_fastpath.py runs PPO iterations with recompilation made an error). The cache goes in as
`cache` where the forward takes that name (transformers >= 5.24, which drops `past_key_values` in 5.40), else
as `past_key_values` (earlier 5.x, and the GPU machine's 5.17).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from stages.errors import ConfigError

#: static prompts are left-padded to a multiple of this width (fewer distinct shapes to compile)
PROMPT_BUCKET = 32
#: torch.compile backend of a compiled decoding step (tests swap in "eager": the same tracing and guards, no code
#: generation)
COMPILE_BACKEND = "inductor"


def cache_keyword(model: Any) -> str:
    """The name under which `model.forward` takes its KV cache: `cache` or (older) `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor, alive: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


class DynamicDecoder:
    """Reference path: a growing cache and mask."""

    def __init__(self, model: Any, prompt_mask: torch.Tensor) -> None:
        self.model, self.mask, self.past = model, prompt_mask.clone(), None
        self.keyword = cache_keyword(model)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model.forward(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.past = returned_cache(self.model, out, self.keyword)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, alive: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, alive.long()[:, None]], 1)
        out = self.model.forward(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=positions[:, None],
                                 use_cache=True, **{self.keyword: self.past})
        self.past = getattr(out, self.keyword)
        return out.logits[:, -1]


def returned_cache(model: Any, out: Any, keyword: str) -> Any:
    """The KV cache a prefill's output carries; a model that returns none (RecurrentGemma keeps its state inside
    the model, OpenAI GPT has no cache) cannot be sampled from by these decoders: refused, naming it."""
    cache = getattr(out, keyword, None)
    if cache is None:
        raise ConfigError(f"{type(model).__name__} returns no KV cache from its forward ({type(out).__name__}), "
                          "which rlhf's sampler decodes with (generation.cache static or dynamic): it cannot "
                          "generate PPO rollouts or evaluation samples")
    return cache


def _forward_cached(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                    keyword: str) -> Any:
    """The model's output with the LM head on the last position only, the KV cache updated in place."""
    return model.forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{keyword: cache})


def _forward_last(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                  keyword: str) -> torch.Tensor:
    """Logits [B, V] of the last position, the KV cache updated in place."""
    return _forward_cached(model, ids, mask, positions, cache, keyword).logits[:, -1]


def _forward_and_draw(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                      keyword: str, history: torch.Tensor, banned: torch.Tensor | None, params: Any,
                      vocab_size: int) -> torch.Tensor:
    """`_forward_last`, then the next token drawn from its logits (`rollout.choose_tokens`): token ids [B]."""
    from stages.ppo.rollout import choose_tokens

    return choose_tokens(_forward_last(model, ids, mask, positions, cache, keyword), history, params, vocab_size,
                         banned)


def static_state(model: Any) -> dict[str, Any]:
    """What the static decoder keeps on a model: `caches` {(batch, dtype, device): {width, cache, mask}} and,
    once compiled, `step` and `step_draw` (the step with the sampling inside: a graph for each batch size,
    response length, sampling setting and held-stop-ids-or-not; dynamo's recompile limit, 8 graphs per
    function by default, bounds how many of those stay compiled)."""
    return model.__dict__.setdefault("_rlhf_static_decode", {"caches": {}})


class StaticDecoder:
    """Fast path: a StaticCache and mask of at least P + R columns, kept on the model between rollouts."""

    def __init__(self, model: Any, prompt_mask: torch.Tensor, max_new_tokens: int, compile_step: bool,
                 prompt_capacity: int = 0) -> None:
        from transformers import StaticCache

        batch, width = prompt_mask.shape
        state = static_state(model)
        key = (batch, next(model.parameters()).dtype, prompt_mask.device)
        slot = state["caches"].get(key)
        if slot is None or slot["width"] < width + max_new_tokens:  # none yet, or too narrow: (re)allocate
            cols = max(width, bucket_width(prompt_capacity)) + max_new_tokens
            slot = state["caches"][key] = {
                "width": cols, "cache": StaticCache(config=model.config, max_cache_len=cols),
                "mask": torch.zeros(batch, cols, dtype=torch.long, device=prompt_mask.device)}
        if compile_step and "step" not in state:
            mode = "reduce-overhead" if prompt_mask.device.type == "cuda" else "default"
            options = {"mode": mode} if COMPILE_BACKEND == "inductor" else {}
            state["step"] = torch.compile(_forward_last, dynamic=False, backend=COMPILE_BACKEND, **options)
            # with the sampling inside: its random draws through torch's own kernels (fallback_random), so it
            # draws what the eager sampler would from the same generator; CUDA graphs on a GPU, as reduce-overhead
            options = ({"options": {"fallback_random": True, "triton.cudagraphs": prompt_mask.device.type == "cuda"}}
                       if COMPILE_BACKEND == "inductor" else {})
            state["step_draw"] = torch.compile(_forward_and_draw, dynamic=False, backend=COMPILE_BACKEND, **options)
        self.model, self.cache, self.mask = model, slot["cache"], slot["mask"]
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, :width] = prompt_mask
        self.width, self.steps, self.keyword = width, 0, cache_keyword(model)
        self._step = state["step"] if compile_step else _forward_last
        self._step_draw = state["step_draw"] if compile_step else _forward_and_draw

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Eager, checking that the model filled the cache (`returned_cache`)."""
        out = _forward_cached(self.model, ids, self.mask[:, :self.width], positions, self.cache, self.keyword)
        returned_cache(self.model, out, self.keyword)
        return out.logits[:, -1]

    def _append(self, alive: torch.Tensor) -> None:
        """The mask column of the token fed next: 1 where its row is still alive."""
        self.mask[:, self.width + self.steps] = alive.long()
        self.steps += 1

    def step(self, tokens: torch.Tensor, alive: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._append(alive)
        return self._step(self.model, tokens[:, None], self.mask, positions[:, None], self.cache, self.keyword)

    def step_draw(self, tokens: torch.Tensor, alive: torch.Tensor, positions: torch.Tensor, history: torch.Tensor,
                  banned: torch.Tensor | None, params: Any, vocab_size: int) -> torch.Tensor:
        """`step`, then the next token drawn from its logits in the same (compiled) function: token ids [B]."""
        self._append(alive)
        return self._step_draw(self.model, tokens[:, None], self.mask, positions[:, None], self.cache, self.keyword,
                               history, banned, params, vocab_size)


def bucket_width(width: int, bucket: int = PROMPT_BUCKET) -> int:
    """`width` rounded up to a multiple of `bucket`."""
    return width + (-width % bucket)


def bucket_left_pad(ids: torch.Tensor, mask: torch.Tensor, pad_id: int, bucket: int = PROMPT_BUCKET
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad [B, P] prompts to the next multiple of `bucket` columns (pad id, mask 0).

    >>> bucket_left_pad(torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), 0, bucket=4)[1].tolist()
    [[0, 0, 1, 1]]
    """
    extra = bucket_width(ids.shape[1], bucket) - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=0)


#: model types without attention, whose forward multiplies hidden states by the raw mask: a decoding step's
#: [B, 1] input against the grown [B, P + t] mask broadcasts silently (transformers' generate() drops the mask)
ATTENTION_FREE = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")


def make_decoder(model: Any, prompt_mask: torch.Tensor, cache: str, max_new_tokens: int, compile_step: bool,
                 prompt_capacity: int = 0) -> Decoder:
    """The decoder `cache` names for this batch; an attention-free model (`ATTENTION_FREE`) is refused."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ATTENTION_FREE:
        raise ConfigError(f"{type(model).__name__} ({model_type}) has no attention layers; rlhf's sampler feeds every "
                          "decoding step the attention mask, which such a model would apply to the wrong positions")
    if cache == "static":
        return StaticDecoder(model, prompt_mask, max_new_tokens, compile_step, prompt_capacity)
    return DynamicDecoder(model, prompt_mask)
