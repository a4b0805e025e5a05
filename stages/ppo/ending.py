"""What the reward model reads after a sampled response: the tokens its training data puts after the turn's end.

The RM's training rows end as `stages.pairs.tokenize_pair` renders them (data.add_eos, the default): the
response's template text up to its last EOS, EOS appended when the template wrote none. For a chat template
whose end-of-turn token is not EOS that is more than one token after the response's text:

    Llama-3     answer<|eot_id|><|end_of_text|>          after <|eot_id|>:     <|end_of_text|>
    Gemma       answer<end_of_turn>\\n<eos>              after <end_of_turn>:  \\n <eos>
    Phi-3       answer<|end|>\\n<|endoftext|>            after <|end|>:        \\n <|endoftext|>
    ChatML      answer<|im_end|>     (EOS = <|im_end|>; the template's "\\n" after EOS is dropped)

PPO's sampling stops at the first stop token (the tokenizer's EOS, the generation config's EOS ids,
generation.stop_token_ids), so a response ends `answer<end_of_turn>`; scoring it there reads the RM at a
position its training never scored. `reward_ending` renders two dummy replies once per run the way the RM
data does, takes what both end with (the template's tail) and records, for each stop token in it, the tokens
after it; `ending_columns` appends a row's tokens after its response (after the right padding, a masked gap:
positions count real tokens only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from stages.data import Conversation, bos_ids, encode_segments, render_segments
from stages.pairs import end_at_last_eos
from stages.rendering import CHAT, RAW_PR

#: two dummy replies rendered to find the template's tail: what their renders end with alike is the template's
_REPLIES = ("Hello", "Goodbye")
#: the turns tried before them: a plain user turn, then with a system turn (templates that require one)
_CONTEXTS = ((("user", "Hi"),), (("system", "Be brief."), ("user", "Hi")))


@dataclass(frozen=True)
class RewardEnding:
    """EOS and, per stop token, the ids the RM's training data has after it (a stop token the template's tail
    does not contain: EOS after it, or nothing after EOS itself)."""

    eos_id: int
    after: dict[int, tuple[int, ...]]
    _tensors: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def plain(cls, eos_id: int) -> "RewardEnding":
        """Nothing after EOS, EOS after anything else (plain-text training rows)."""
        return cls(eos_id, {eos_id: ()})

    @property
    def width(self) -> int:
        """Columns appended: the longest tail (EOS alone is 1)."""
        return max([1, *map(len, self.after.values())])

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """stops [S], their tails [S, width] (0-padded) and lengths [S], made once per device (a copy to the GPU
        per call would be a host sync)."""
        if device not in self._tensors:
            stops = sorted(self.after)
            rows = [list(self.after[s]) + [0] * (self.width - len(self.after[s])) for s in stops]
            self._tensors[device] = (torch.tensor(stops, dtype=torch.long, device=device),
                                     torch.tensor(rows, dtype=torch.long, device=device).view(len(stops), self.width),
                                     torch.tensor([len(self.after[s]) for s in stops], device=device))
        return self._tensors[device]


def _reply_ids(tokenizer: Any, style: str, context: tuple[tuple[str, str], ...], reply: str) -> list[int]:
    """The ids of a final assistant turn `reply` after `context`, as the RM's training data (add_eos) renders
    it: the reply part of `encode_segments`, cut after its last EOS (`end_at_last_eos`)."""
    messages = (*context, ("assistant", reply)) if style == CHAT else (("prompt", context[-1][1]), ("response", reply))
    segments = render_segments(Conversation(messages, style), tokenizer, "last_turn")
    ex, prompt_len = encode_segments(segments, tokenizer, True, bos_ids(tokenizer))
    return end_at_last_eos(ex, tokenizer.eos_token_id, prompt_len).input_ids[prompt_len:]


def _common_suffix(a: list[int], b: list[int]) -> list[int]:
    """The longest run of ids both lists end with.

    >>> _common_suffix([5, 1, 9, 2], [7, 9, 2])
    [9, 2]
    """
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def template_tail(tokenizer: Any, chat: bool, warn: Callable[[str], None] | None = None) -> list[int]:
    """The ids the RM's training data (add_eos) puts after a final assistant turn's text: what the renders of
    two different replies end with alike (Gemma: <end_of_turn> "\\n" <eos>; plain text: EOS). Only what follows
    the text counts: a template's text before the reply (Qwen3's empty think block) is not the tail. A chat
    template that renders neither a user/assistant nor a system/user/assistant conversation gives the plain-text
    tail (with a warning through `warn`)."""
    if chat and getattr(tokenizer, "chat_template", None):
        for context in _CONTEXTS:
            try:
                return _common_suffix(*(_reply_ids(tokenizer, CHAT, context, r) for r in _REPLIES))
            except Exception:  # noqa: BLE001 - a template's own error (jinja, raise_exception): the next try
                continue
        if warn is not None:
            warn("warning: the chat template renders no plain conversation; the reward model reads a response "
                 "with EOS appended after its stop token, as for plain text")
    return _common_suffix(*(_reply_ids(tokenizer, RAW_PR, _CONTEXTS[0], r) for r in _REPLIES))


def reward_ending(tokenizer: Any, stop_ids: Iterable[int], styles: Iterable[str],
                  warn: Callable[[str], None] | None = None) -> RewardEnding:
    """Per stop token, what the RM's training data has after it: the template tail after the token's last
    occurrence in it (prompts rendered with the chat template: `styles` has "chat"); else EOS, and nothing
    after EOS itself.

    >>> from stages.models import train_tokenizer
    >>> tok = train_tokenizer(["hello there"] * 3, vocab_size=300, min_frequency=1)  # ends a turn with EOS
    >>> eos = tok.eos_token_id
    >>> ending = reward_ending(tok, [eos, 7], {"chat"})
    >>> ending.after == {eos: (), 7: (eos,)}, ending.width
    (True, 1)
    """
    eos = tokenizer.eos_token_id
    tail = template_tail(tokenizer, CHAT in set(styles), warn)
    after = {}
    for stop in {eos, *stop_ids}:
        at = max((i for i, t in enumerate(tail) if t == stop), default=None)
        after[stop] = tuple(tail[at + 1:]) if at is not None else (() if stop == eos else (eos,))
    return RewardEnding(eos, after)


def describe_ending(ending: RewardEnding, tokenizer: Any) -> str | None:
    """One line naming the stop tokens after which more than EOS is appended (None when there are none)."""
    def names(ids: Iterable[int]) -> str:
        return " ".join(repr(tokenizer.decode([t])) for t in ids)

    more = {s: tail for s, tail in sorted(ending.after.items()) if tail not in ((), (ending.eos_id,))}
    if not more:
        return None
    return "the reward model reads a response that stopped at " + "; at ".join(
        f"{names([s])} after {names(tail)} (as its training data ends a turn)" for s, tail in more.items())


def ending_columns(last: torch.Tensor, truncated: torch.Tensor, ending: RewardEnding,
                   eos_on_truncation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask [B, width] to append to each [prompt | response] row, from its last token `last` [B]:
    a row that stopped on a stop token gets that token's tail; a truncated row EOS (eos_on_truncation) or
    nothing; any other row EOS. No host sync.

    >>> e = RewardEnding(2, {2: (), 5: (9, 2)})
    >>> ids, mask = ending_columns(torch.tensor([2, 5, 7, 7]), torch.tensor([False, False, True, True]), e, True)
    >>> ids.tolist(), mask.tolist()
    ([[0, 0], [9, 2], [2, 0], [2, 0]], [[0, 0], [1, 1], [1, 0], [1, 0]])
    """
    stops, tails, lengths = ending.tensors(last.device)
    hit = last[:, None] == stops[None]
    known = hit.any(1) & ~truncated
    which = hit.int().argmax(1)
    eos_row = torch.zeros_like(tails[0])
    eos_row[0] = ending.eos_id
    ids = torch.where(known[:, None], tails[which], eos_row)
    n = torch.where(known, lengths[which], torch.ones_like(lengths[which]))
    if not eos_on_truncation:
        n = torch.where(truncated, torch.zeros_like(n), n)
    mask = torch.arange(ending.width, device=last.device)[None] < n[:, None]
    return ids * mask, mask.long()
