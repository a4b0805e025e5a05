"""Rollouts: sampling responses for a batch of prompts, and the per-token quantities read from the four models.

Layout of one rollout batch (B rows): prompts left-padded to width P, responses right-padded to width R, so the
sequence [prompt | response] has every prompt ending at column P - 1. Response token t sits at column P + t and
is predicted from column P + t - 1: log-probs and values of the response are read from columns P - 1 ... P + R - 2.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from stages.config import GenerationConfig
from stages.distributed import all_reduce_max
from stages.errors import ConfigError
from stages.ppo import decode
from stages.ppo.decode import StaticDecoder, bucket_left_pad, make_decoder
from stages.ppo.ending import RewardEnding, ending_columns
from stages.ppo.tricks import entropy_from_logits
from stages.reward_model import last_token_index, positions_from_mask


@dataclass(frozen=True)
class Held:
    """Ids the sampler never draws at the first `steps` response positions: the stop ids before
    generation.min_new_tokens (`banned_at`). Log-probs, entropies and so the KL leave them out there
    (`hold_back`): with them, a policy moving probability onto a token it can never sample there changed the
    KL all the same (k1 by log((1 - p) / (1 - p_ref)) per position, a bonus for the move; k3 a large charge)."""

    ids: tuple[int, ...] = ()
    steps: int = 0

    def __bool__(self) -> bool:
        return bool(self.ids) and self.steps > 0


def held_of(gen: GenerationConfig, stop_ids: list[int], vocab_size: int | None) -> Held:
    """`Held` of a rollout sampled with `gen` and `stop_ids` (those below `vocab_size`: the others have no logit
    the sampler reads)."""
    return Held(tuple(sorted({s for s in stop_ids if vocab_size is None or s < vocab_size})), gen.min_new_tokens)


def held_ids(held: Held, device: torch.device) -> torch.Tensor:
    """`held.ids` as a tensor on `device` (an asynchronous copy: no host sync)."""
    return torch.tensor(held.ids, dtype=torch.long).to(device, non_blocking=True)


#: the logit `hold_back` gives a held id: exp(HELD_LOGIT - logsumexp) is exactly 0 in float32 (probability 0), and
#: the entropy's gradient there, -HELD_LOGIT times the one flowing into it, stays finite up to 3e8 (an fp16 loss
#: scale and entropy_coef included; at float32's lowest it overflowed from 1 on, and softmax's backward made NaN)
HELD_LOGIT = -1e30


def hold_back(z: torch.Tensor, ids: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """z [..., V] (scaled float32 logits) with the logits of `ids` (`held_ids`) set to HELD_LOGIT at the positions
    where `banned` (bool, broadcast over z's leading dimensions) is true: probability 0 there, and a finite
    product p z = 0 in the entropy. In place (z is the caller's own float32 copy); no host sync."""
    z[..., ids] = torch.where(banned[..., None], HELD_LOGIT, z[..., ids])
    return z


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response: torch.Tensor  # [B, R] right-padded
    response_mask: torch.Tensor  # [B, R] 1 on sampled tokens (the stop token included)
    truncated: torch.Tensor  # [B] bool: no stop token within max_new_tokens
    vocab_size: int | None = None  # the sampler drew ids below this only (None: any); log-probs use these logits
    held: Held = Held()  # ids it never drew at the first positions (min_new_tokens); log-probs leave them out there

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of [prompt | response], [B, P + R]."""
        return torch.cat([self.prompt_ids, self.response], 1), torch.cat([self.prompt_mask, self.response_mask], 1)

    def select(self, rows: torch.Tensor | list[int]) -> "Rollout":
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.response.device)
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response[idx], self.response_mask[idx],
                       self.truncated[idx], self.vocab_size, self.held)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded [B, P] id tensor and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------- sampling
class SamplingParams(NamedTuple):
    """The generation settings `process_logits` reads (plain numbers: a compiled function takes them as constants)."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    compile: bool  # generation.compile: the top-p floor by the compiled search (`nucleus_floor`)


def sampling_params(gen: GenerationConfig) -> SamplingParams:
    return SamplingParams(gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty, gen.compile)


def process_logits(logits: torch.Tensor, history: torch.Tensor, gen: GenerationConfig | SamplingParams,
                   vocab_size: int | None = None, banned: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token scores [B, V] to sample from, as a new float32 tensor (`logits` is left as it is), in this order:

    0. -inf for ids at or above `vocab_size` (embedding rows without a token) and for the `banned` ids, so that
       top-k/top-p choose among the remaining tokens only;
    1. repetition penalty p on the tokens already generated in this response (`history` [B, t] of token ids, t
       may be 0; prompt tokens are not penalised), once per distinct token: z -> z / p where z > 0,
       z -> z * p where z <= 0;
    2. temperature T: z -> z / T;
    3. top-k: all but the k largest scores -> -inf (k = 0: off);
    4. top-p: keep the smallest set of most likely tokens whose probability reaches p (at least one), and every
       token as likely as the least likely of them (`nucleus_floor`: ties at the edge are all kept or all
       dropped, whatever order a sort would put them in).

    The penalty reads and writes only the [B, t] generated positions (gather, then scatter: a token generated
    twice gets the same penalised value written twice), not the whole [B, V] scores; the float32 copy, the
    temperature, top-k's threshold and fill and top-p's softmax, floor and fill each pass over them (the floor:
    a sort in eager mode, 10 fused passes when compiled, see `nucleus_floor`). No host sync."""
    z = logits.to(torch.float32, copy=True)
    if vocab_size is not None:
        z[:, vocab_size:] = float("-inf")
    if banned is not None and banned.numel():
        # index_fill_, not z[:, banned] = -inf: that is an index_put_ of a host scalar, which CUDA copies to the
        # device with a blocking copy, a host sync at every step before min_new_tokens
        z.index_fill_(1, banned, float("-inf"))
    if gen.repetition_penalty != 1.0 and history.shape[1]:
        picked = z.gather(1, history)
        z.scatter_(1, history, torch.where(picked > 0, picked / gen.repetition_penalty,
                                           picked * gen.repetition_penalty))
    z.div_(gen.temperature)
    if gen.top_k > 0 and gen.top_k < z.shape[-1]:
        kth = torch.topk(z, gen.top_k, dim=-1).values[:, -1:]
        z.masked_fill_(z < kth, float("-inf"))
    if gen.top_p < 1.0:
        probs = torch.softmax(z, dim=-1)
        z.masked_fill_(probs < nucleus_floor(probs, gen.top_p, gen.compile), float("-inf"))
    return z


def nucleus_floor_sorted(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p floor [B, 1] of probabilities [B, V] by a sort (eager mode's way, and the reference): with the row
    sorted descending, s_1 >= s_2 >= ..., the floor is s_k for the smallest k whose mass s_1 + ... + s_k reaches
    top_p, i.e. k = #{j : s_1 + ... + s_(j-1) < top_p} (at least 1)."""
    ranked = torch.sort(probs, dim=-1, descending=True).values
    before = torch.cumsum(ranked, dim=-1) - ranked  # probability mass of the tokens ranked above
    return ranked.gather(1, (before < top_p).sum(-1, keepdim=True) - 1)


#: `nucleus_floor_searched` splits its interval 2^FLOOR_BITS ways per pass; probabilities lie in [0, 1], whose
#: float32 bit patterns are the integers 0 ... 0x3F800000 < 2^30, so 30 / FLOOR_BITS passes (rounded up) pin it
FLOOR_BITS = 3


def nucleus_floor_searched(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same floor without a sort: v* = max{v : S(v) >= top_p}, S(v) = sum of the probabilities >= v. S falls as
    v grows, so v* is found by a search over the float32 bit patterns of v (non-negative floats order as their
    bits do as integers): lo := 0 (S = 1, or all of it that rounding leaves: every token kept), hi := max + 1 ulp
    (S = 0), and each pass computes S at 2^FLOOR_BITS - 1 cuts c_j = lo + floor((hi - lo) j / 2^FLOOR_BITS) in one
    masked sum over [B, V, cuts], then lo := the last cut reaching top_p, hi := the first not reaching it. The
    interval shrinks from L to at most ceil(L / 2^FLOOR_BITS), so after the passes hi = lo + 1 and lo = v*.
    v* is a probability of the row and S(v*) the mass of the tokens ranked down to it: the floor of
    `nucleus_floor_sorted`, up to the rounding of the two ways of summing (tests/test_ppo_units.py bounds what
    that can move). Compiled, a pass is one fused kernel over data that stays in cache (10 passes here; a plain
    bisection's 30 took 2.5x as long to compile on a CPU); eager, it builds the [B, V, cuts] tensor: for tests."""
    ways = 1 << FLOOR_BITS
    lo = torch.zeros(probs.shape[0], 1, dtype=torch.int32, device=probs.device)
    hi = probs.amax(-1, keepdim=True).view(torch.int32) + 1
    fractions = torch.arange(1, ways, device=probs.device)
    for _ in range(-(-30 // FLOOR_BITS)):
        cuts = (lo + (hi - lo).long() * fractions // ways).int()  # [B, ways - 1], ascending
        masses = torch.where(probs[:, :, None] >= cuts.view(torch.float32)[:, None, :], probs[:, :, None], 0).sum(1)
        reaching = (masses >= top_p).sum(-1, keepdim=True)  # S falls as the cut rises: the first `reaching` cuts
        lo = torch.where(reaching > 0, cuts.gather(1, (reaching - 1).clamp(min=0)), lo)
        hi = torch.where(reaching < ways - 1, cuts.gather(1, reaching.clamp(max=ways - 2)), hi)
    return lo.view(torch.float32)


#: `nucleus_floor_searched` compiled, per compile backend (tests swap decode.COMPILE_BACKEND)
_COMPILED_FLOOR: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {}


def nucleus_floor(probs: torch.Tensor, top_p: float, compiled: bool) -> torch.Tensor:
    """The top-p floor [B, 1]: every token at least this likely is kept. Inside a compiled function (the decoding
    step with the sampling inside) and with `compiled` (generation.compile: the sampling of the compiled static
    path) by a search, compiled (`nucleus_floor_searched`); else by a sort (`nucleus_floor_sorted`)."""
    if torch.compiler.is_compiling():
        return nucleus_floor_searched(probs, top_p)
    if not compiled:
        return nucleus_floor_sorted(probs, top_p)
    backend = decode.COMPILE_BACKEND
    if backend not in _COMPILED_FLOOR:
        _COMPILED_FLOOR[backend] = torch.compile(nucleus_floor_searched, dynamic=False, backend=backend)
    return _COMPILED_FLOOR[backend](probs, top_p)


def choose_tokens(logits: torch.Tensor, history: torch.Tensor, gen: GenerationConfig | SamplingParams,
                  vocab_size: int | None, banned: torch.Tensor | None) -> torch.Tensor:
    """`process_logits`, then one multinomial draw per row: token ids [B]."""
    scores = process_logits(logits, history, gen, vocab_size, banned)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)


@dataclass
class DrawState:
    """What `draw_tokens` carries from one decoding step to the next (all on the device)."""

    history: torch.Tensor  # [B, R] the token drawn at each step (pad after the row finished; with the sampling
    #                        inside the compiled step, the columns not yet drawn hold the first token)
    alive: torch.Tensor  # [B, R] bool: the row had not finished before that step
    finished: torch.Tensor  # [B] bool: the row has produced a stop token
    stops: torch.Tensor  # stop ids
    held: torch.Tensor  # the stop ids with a logit, masked before min_new_tokens

    @classmethod
    def start(cls, batch: int, steps: int, width: int, stop_ids: list[int], device: torch.device) -> "DrawState":
        """Buffers for `steps` decoding steps of `batch` rows whose logits have `width` columns."""
        stops = sorted(set(stop_ids))
        held = [s for s in stops if s < width]
        both = torch.tensor(stops + held, dtype=torch.long, device=device)  # one copy to the device
        return cls(torch.empty(batch, steps, dtype=torch.long, device=device),
                   torch.empty(batch, steps, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.bool, device=device), both[:len(stops)], both[len(stops):])


def fill_undrawn(history: torch.Tensor, first: torch.Tensor) -> None:
    """Columns 1.. of a [B, R] history := the first token drawn. Each step then overwrites its own column, so the
    columns not drawn yet repeat a token drawn already, and the repetition penalty over the whole buffer (one
    shape for every step: the fused step) is the penalty over the tokens drawn so far (duplicates write the same
    penalised value)."""
    history[:, 1:].copy_(first[:, None].expand(-1, history.shape[1] - 1))


def banned_at(state: DrawState, step: int, gen: GenerationConfig) -> torch.Tensor | None:
    """The ids masked at `step`: the stop ids before min_new_tokens, else none."""
    return state.held if step < gen.min_new_tokens else None


def draw_tokens(logits: torch.Tensor | None, state: DrawState, step: int, gen: GenerationConfig, vocab_size: int,
                pad_id: int, drawn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step's sampling from next-token logits [B, V]: `choose_tokens` (no token at or above
    `vocab_size`, no stop token before min_new_tokens, the penalty on this response's earlier tokens, a
    multinomial draw), or the tokens `drawn` already (by a decoding step with the sampling inside); a finished
    row gets `pad_id`. Records the step in `state` and returns (tokens [B], alive [B]: the row had not finished
    before this step). No host sync."""
    with record_function("rlhf.sampling"):  # a named range in a profile (logging.profile_step), else nothing
        tok = drawn if drawn is not None else choose_tokens(logits, state.history[:, :step], gen, vocab_size,
                                                            banned_at(state, step, gen))
        alive = ~state.finished
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        state.history[:, step] = tok
        state.alive[:, step] = alive
        state.finished = state.finished | (alive & torch.isin(tok, state.stops))
    return tok, alive


class AllStopped:
    """Asks the device whether every row has stopped, so that work queued after the question does not delay the
    answer: on a GPU the flag is copied into pinned host memory without blocking and an event marks it; the
    host waits for that event only, while the forward queued after it runs. Elsewhere it is read at once."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def ask(self, finished: torch.Tensor) -> None:
        self.host.copy_(finished.all(), non_blocking=self.cuda)
        if self.event is not None:
            self.event.record()

    def answer(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each one's own mode restored after. Sampling needs it:
    transformers before 5.24 drops a layer's KV cache when the layer is in training mode with gradient
    checkpointing on, even without gradients (the policy is a training engine's module), so each decoding step
    would see only its own token."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def input_grad_hooks_off(model: torch.nn.Module) -> Iterator[None]:
    """transformers' input-embedding hooks of `enable_input_require_grads` (output.requires_grad_(True), which
    `gradient_checkpointing_enable` registers) removed inside the block and registered again after. They do
    nothing without gradients, as when sampling, but torch 2.11's dynamo cannot trace `requires_grad_()`: it
    broke the compiled decoding step into two graphs (CUDA graphs) at the embedding. Any other hook on the
    embedding registered after them then runs before them (hooks run in the order registered)."""
    if not getattr(model, "_require_grads_hooks", None):  # what every transformers 5.x keeps them in
        yield
        return
    model.disable_input_require_grads()
    try:
        yield
    finally:
        model.enable_input_require_grads()


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gen: GenerationConfig,
    stop_ids: list[int],
    pad_id: int,
    vocab_size: int,
    queue_ahead: bool | None = None,
    prompt_capacity: int = 0,
) -> Rollout:
    """Sample one response per prompt with a KV cache, the whole batch at once, until every row has produced
    a stop token or max_new_tokens. Tokens at or above `vocab_size` (embedding rows without a token) are never
    sampled; stop tokens are not sampled before `min_new_tokens`. `gen.cache` picks the decoder (decode.py:
    static = the fast path, dynamic = the reference); both draw the same tokens from the same random stream.
    The model runs in eval mode (see `eval_mode`), without transformers' input-grad hooks (`input_grad_hooks_off`).

    Host syncs: none per step before min_new_tokens (no row can have stopped); after it, one per step to ask
    whether every row has stopped. With `queue_ahead` (default: on a GPU) the question is asked (`AllStopped`)
    before the next step's forward is queued and answered after, so the device runs that forward while the host
    waits for the answer; when every row has stopped, that one forward is wasted and its logits dropped (the
    tokens are the same either way). With gen.compile_sampling the compiled step also draws the next token
    (`StaticDecoder.step_draw`): the same tokens, but a wasted queued step has drawn its random numbers too, so
    after a rollout in which every row stopped early with `queue_ahead` the global generator is one draw further
    on than the unfused path leaves it (a fused run still reproduces itself). `prompt_capacity`: prompt columns
    the static cache is allocated for at least (rlhf ppo passes data.max_prompt_length), so rollouts of every
    prompt width share one cache and one compiled decoding step.
    Randomness: torch's global generator (saved with checkpoints, so resumed runs sample alike)."""
    device = prompt_ids.device
    ahead = device.type == "cuda" if queue_ahead is None else queue_ahead
    batch = prompt_ids.shape[0]
    ids, mask = (bucket_left_pad(prompt_ids, prompt_mask, pad_id) if gen.cache == "static"
                 else (prompt_ids, prompt_mask))
    with eval_mode(model), input_grad_hooks_off(model):
        decoder = make_decoder(model, mask, gen.cache, gen.max_new_tokens, gen.compile, prompt_capacity)
        positions = positions_from_mask(mask)
        logits = decoder.prefill(ids, positions)
        next_pos = positions[:, -1] + 1
        logits_width = logits.shape[-1]
        state = DrawState.start(batch, gen.max_new_tokens, logits_width, stop_ids, device)
        all_stopped = AllStopped(device)
        fused = gen.compile_sampling and isinstance(decoder, StaticDecoder)
        params, next_tok = sampling_params(gen), None
        for step in range(gen.max_new_tokens):
            tok, alive = draw_tokens(logits, state, step, gen, vocab_size, pad_id, next_tok)
            if fused and step == 0:
                fill_undrawn(state.history, tok)
            if step == gen.max_new_tokens - 1:
                break
            may_stop = step >= gen.min_new_tokens  # a stop token could be drawn at this step
            if may_stop:
                all_stopped.ask(state.finished)
                if not ahead and all_stopped.answer():
                    break
            if fused:
                next_tok = decoder.step_draw(tok, alive, next_pos, state.history, banned_at(state, step + 1, gen),
                                             params, vocab_size)
            else:
                logits = decoder.step(tok, alive, next_pos)
            next_pos = next_pos + 1
            if may_stop and ahead and all_stopped.answer():
                break
    drawn = step + 1
    response = state.history[:, :drawn].contiguous()
    response_mask = state.alive[:, :drawn].long()
    return Rollout(prompt_ids, prompt_mask, response, response_mask, ~state.finished, vocab_size,
                   held_of(gen, stop_ids, min(vocab_size, logits_width)))


# --------------------------------------------------------------------------------------------- scoring
def logprob_temperature(gen: GenerationConfig) -> float:
    """The temperature log-probs and entropies are taken at: generation.temperature with
    generation.logprobs_at_temperature, else 1 (the model's own distribution)."""
    return gen.temperature if gen.logprobs_at_temperature else 1.0


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = logits / T in float32 (no division at T = 1, so that path stays bit-identical); in place on the
    float32 copy of lower-precision logits, so no second [N, V] block exists."""
    z = logits.float()
    if temperature == 1.0:
        return z
    return z / temperature if z is logits else z.div_(temperature)


def drawable(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """The logits of the ids a sampler can draw, [..., :vocab] (a view): an embedding padded past the tokenizer
    (Qwen2.5: 151,936 rows for 151,665 tokens) has rows the sampler never draws (`process_logits`), so the
    log-probs, entropy and KL of the distribution it samples from leave them out. vocab None: every row."""
    return logits if vocab is None or vocab >= logits.shape[-1] else logits[..., :vocab]


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False, chunk: int = 8, temperature: float = 1.0,
    vocab: int | None = None, held: Held = Held(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(token) = z_token - logsumexp(z) [B, R] in float32 with z = logits[..., :vocab] / temperature from
    logits [B, R, V] (`drawable`), the `held` ids left out at its first positions (`hold_back`), and (with_entropy)
    the entropy H = logsumexp(z) - sum softmax(z) z per position. Upcast `chunk` rows at a time, so no float32 copy
    of the whole [B, R, V] tensor exists (autograd keeps each chunk's own)."""
    logps, ents = [], []
    hold = (held_ids(held, logits.device), torch.arange(logits.shape[1], device=logits.device) < held.steps) \
        if held else None
    for start in range(0, logits.shape[0], chunk):
        part = drawable(logits[start:start + chunk], vocab)
        z = scaled(part, temperature)
        if hold is not None:  # (a float32 model's own logits at temperature 1: copied first)
            z = hold_back(z.clone() if z is part else z, *hold)
        lse = torch.logsumexp(z, dim=-1)
        logps.append(z.gather(-1, tokens[start:start + chunk, :, None]).squeeze(-1) - lse)
        if with_entropy:
            ents.append(entropy_from_logits(z))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def response_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Causal-LM logits at the positions that predict the response tokens, [B, R, V]."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    return out.logits[:, prompt_width - 1:-1]


def head_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a causal LM applies to its LM head's output z before returning logits, read from its config:
    Gemma-2/3 soft-capping c tanh(z / c) (final_logit_softcapping c), Granite z / s (logits_scaling s), Cohere
    z s (logit_scale s); the identity otherwise. Any other transform is caught by `_fast_head_ok`."""
    cap = getattr(config, "final_logit_softcapping", None)
    divide = getattr(config, "logits_scaling", None)
    times = getattr(config, "logit_scale", None)

    def transform(z: torch.Tensor) -> torch.Tensor:
        if cap:
            z = torch.tanh(z.float() / cap) * cap
        if divide and divide != 1:
            z = z / divide
        if times and times != 1:
            z = z * times
        return z
    return transform


def _head_logprobs(head: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                   tokens: torch.Tensor, with_entropy: bool, temperature: float, vocab: int | None,
                   held: torch.Tensor | None = None, banned: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and entropy (empty unless with_entropy) of [N, H] hidden rows through the LM head, float32,
    from z = transform(head(hidden))[:, :vocab] / temperature (`drawable`), the `held` ids (`held_ids`) left out
    of the rows `banned` ([N] bool) marks (`hold_back`)."""
    z = scaled(drawable(transform(head(hidden)), vocab), temperature)
    if held is not None and banned is not None:  # (z: the head's own fresh output, or its float32 copy)
        z = hold_back(z, held, banned)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return logp, entropy_from_logits(z) if with_entropy else z.new_zeros(0)


def final_hidden_states(model: Any, ids: torch.Tensor, mask: torch.Tensor,
                        with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The causal LM's final hidden states [B, L, H] (what its LM head reads), from a forward through the model
    itself (a DeepSpeed engine included, so its hooks run) with the head on one position only. A forward hook
    on the backbone (HF's `base_model`) catches its `last_hidden_state`, and one on each model nested directly
    in it (OPT's causal LM calls `model.decoder` itself, never `model`): hooks fire as modules return, so the
    last output caught is the outermost backbone's that ran. `output_hidden_states` would keep every layer's
    output alive until the call returns. with_logits: also the model's logits at the last position [B, V]."""
    inner = getattr(model, "module", model)
    backbone = inner.base_model
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False,
                  logits_to_keep=1)
    if backbone is inner:  # no separate backbone module to hook
        out = model(**kwargs, output_hidden_states=True)
        hidden = out.hidden_states[-1]
    else:
        caught: list[torch.Tensor] = []

        def catch(module: torch.nn.Module, args: Any, out: Any) -> None:
            if getattr(out, "last_hidden_state", None) is not None:
                caught.append(out.last_hidden_state)

        hooked = [backbone, *(m for m in backbone.children() if isinstance(m, PreTrainedModel))]
        handles = [m.register_forward_hook(catch) for m in hooked]
        try:
            out = model(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not caught:
            raise ConfigError(f"{type(inner).__name__}'s forward runs neither its backbone "
                              f"({type(backbone).__name__}) nor a model inside it, so its final hidden states "
                              "cannot be caught for chunked log-probs: set train.logprob_chunk: 0")
        hidden = caught[-1]
    return (hidden, out.logits[:, -1]) if with_logits else hidden


#: per model (its inner module): whether its LM head, followed by `head_transform`, gives its logits
_FAST_HEAD_OK: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _fast_head_ok(model: Any, head: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor],
                  hidden_last: torch.Tensor, logits_last: torch.Tensor) -> bool:
    """Whether transform(head(h)) reproduces the model's own logits at the last position (rtol = atol = 1e-2 for
    a 16-bit model: its rounding; 1e-4 for a float32 one, where a transform that small would still change the
    log-probs); decided at the model's first chunked call and remembered. A model whose logits are
    something else (a transform `head_transform` does not know) takes the full-logits path, with a warning.
    Every rank reaches the same answer (all-reduced), so their calls into a ZeRO-3 partitioned head stay paired."""
    inner = getattr(model, "module", model)
    if inner in _FAST_HEAD_OK:
        return _FAST_HEAD_OK[inner]
    with torch.no_grad():
        mine = transform(head(hidden_last.detach())).float()
    tol = 1e-4 if hidden_last.dtype == torch.float32 else 1e-2  # (a bf16 model may return float32 logits)
    bad = not torch.allclose(mine, logits_last.detach().float(), rtol=tol, atol=tol)
    ok = not all_reduce_max(int(bad), logits_last.device)
    if not ok:
        warnings.warn(f"{type(inner).__name__} transforms its LM head's output in a way the chunked log-prob path "
                      "does not reproduce; its log-probs use the full logits instead (train.logprob_chunk ignored "
                      "for this model)", stacklevel=3)
    _FAST_HEAD_OK[inner] = ok
    return ok


def chunk_bounds(n_tokens: int, chunk_tokens: int, head: torch.nn.Module, device: torch.device) -> list[slice]:
    """Row slices of at most chunk_tokens rows covering n_tokens rows, as few as possible. With a ZeRO-3
    partitioned head (its weight has `ds_id`) every rank makes as many slices as the rank with the most rows
    (some possibly empty): each call into the head gathers its weight, a collective all ranks must join."""
    count = max(1, -(-n_tokens // chunk_tokens))
    if hasattr(head.weight, "ds_id"):
        count = all_reduce_max(count, device)
    size = -(-n_tokens // count)
    return [slice(i * size, (i + 1) * size) for i in range(count)]


def response_logprobs(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, tokens: torch.Tensor,
    with_entropy: bool = False, chunk_tokens: int = 0, temperature: float = 1.0, vocab: int | None = None,
    held: Held = Held(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(response token) [B, R] in float32, and the entropy with `with_entropy`, of the distribution
    softmax(logits[..., :vocab] / temperature) (generation.logprobs_at_temperature; else temperature 1; vocab:
    the ids the sampler could draw, `Rollout.vocab_size`, see `drawable`), without the `held` ids at the first
    `held.steps` positions (`Rollout.held`: the stop ids before min_new_tokens, which the sampler never drew).

    chunk_tokens = 0, the reference path: the model's [B, P + R, V] logits, upcast 8 rows at a time.
    chunk_tokens > 0, the fast path: the model applies its LM head to one position only and returns its final
    hidden states; the head (and `head_transform`) then runs on the R response positions, at most chunk_tokens
    rows at a time. With gradients each chunk is checkpointed (its logits are recomputed in the backward pass),
    so no more than one [chunk_tokens, V] block of logits exists at any moment, forward or backward, and none
    for the prompt. A model whose head output is not its logits (`_fast_head_ok`) takes the reference path."""
    inner = getattr(model, "module", model)
    if chunk_tokens <= 0 or _FAST_HEAD_OK.get(inner) is False:
        return token_logprobs(response_logits(model, ids, mask, prompt_width), tokens, with_entropy,
                              temperature=temperature, vocab=vocab, held=held)
    hidden, logits_last = final_hidden_states(model, ids, mask, with_logits=True)
    head, transform = inner.get_output_embeddings(), head_transform(inner.config)
    if not _fast_head_ok(model, head, transform, hidden[:, -1], logits_last):
        return response_logprobs(model, ids, mask, prompt_width, tokens, with_entropy, 0, temperature, vocab, held)
    hidden = hidden[:, prompt_width - 1:-1]
    rows, width = tokens.shape
    flat_h, flat_t = hidden.reshape(rows * width, -1), tokens.reshape(-1)
    grad = torch.is_grad_enabled() and flat_h.requires_grad
    logps, ents = [], []
    ids_held = held_ids(held, flat_h.device) if held else None
    position = torch.arange(rows * width, device=flat_h.device) % width if held else None  # (of each flat row)
    for part in chunk_bounds(flat_t.numel(), chunk_tokens, head, flat_h.device):
        banned = position[part] < held.steps if position is not None else None
        args = (head, transform, flat_h[part], flat_t[part], with_entropy, temperature, vocab, ids_held, banned)
        lp, ent = checkpoint(_head_logprobs, *args, use_reentrant=False) if grad else _head_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(rows, width)
    return logp, torch.cat(ents).view(rows, width) if with_entropy else None


def raw_scores(gen: GenerationConfig, reward: Any, ids: torch.Tensor, mask: torch.Tensor, truncated: torch.Tensor,
               ending: RewardEnding) -> torch.Tensor:
    """The reward model's score of [prompt | response] rows, read where its training data ends a turn: a
    response that stopped on a stop token is scored with what that data has after the token appended
    (`stages.ppo.ending`: EOS after Llama-3's <|eot_id|>, "\\n" and EOS after Gemma's <end_of_turn>, nothing
    after EOS); a truncated one with EOS appended (on_truncation: eos, as the RM data ends a cut response) or
    as it is with truncation_penalty subtracted (penalty). For an RM trained without EOS (`ending.add_eos`
    false), a stop token its rows never had is masked out (plain text: the RM reads the last text token)."""
    last = last_token_index(mask)[:, None]  # a left-padded prompt and a right-padded response alike
    extra, extra_mask, drop = ending_columns(ids.gather(1, last).squeeze(1), truncated, ending,
                                             gen.on_truncation == "eos")
    if ending.drop:  # a stop token the RM's rows never had (add_eos false): masked out
        at_last = torch.arange(ids.shape[1], device=ids.device)[None] == last
        mask = mask.masked_fill(at_last & drop[:, None], 0)
    raw = reward(torch.cat([ids, extra], 1), torch.cat([mask, extra_mask.to(mask.dtype)], 1))[0]
    if gen.on_truncation == "penalty":
        raw = raw - gen.truncation_penalty * truncated.float()
    return raw


# --------------------------------------------------------------------------------------------- text statistics
def repetition_rate(tokens: list[int], n: int) -> float:
    """Share of the response's n-grams that repeat an earlier one: 1 - distinct / total (0 without n-grams).

    >>> repetition_rate([1, 2, 1, 2, 1, 2], 2)   # 5 bigrams, 2 distinct
    0.6
    """
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def response_lists(rollout: Rollout, stop_ids: list[int]) -> list[list[int]]:
    """Each response's sampled tokens, without the final stop token."""
    out = []
    for row, m in zip(rollout.response.tolist(), rollout.response_mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep]
        if toks and toks[-1] in stop_ids:
            toks = toks[:-1]
        out.append(toks)
    return out
