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

An RM trained with `data.add_eos: false` (its record says so, `stages.rendering.trained_with_eos`) read rows
that end as the template writes them (ChatML: `answer<|im_end|>\n`; plain text: `answer`, no EOS). Then a stop
token the template writes keeps what follows it there (ChatML: "\n" after <|im_end|>), and one it never writes
is followed by the template's whole tail; such a token that is no text (EOS after plain text, any special token)
is itself masked out of the RM's input (for plain text the RM then reads the response's last text token), while
a text token (a stop id such as ".") stays, as part of the answer. A truncated response gets no EOS either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from stages.data import Conversation, bos_ids, encode_segments, render_segments
from stages.pairs import end_at_last_eos
from stages.rendering import CHAT, RAW_PR, trained_with_eos

#: two dummy replies rendered to find the template's tail: what their renders end with alike is the template's
_REPLIES = ("Hello", "Goodbye")
#: the turns tried before them: a plain user turn, then with a system turn (templates that require one)
_CONTEXTS = ((("user", "Hi"),), (("system", "Be brief."), ("user", "Hi")))


@dataclass(frozen=True)
class RewardEnding:
    """EOS and, per stop token, the ids the RM's training data has after it (a stop token the template's tail
    does not contain: EOS after it, or nothing after EOS itself). Without `add_eos` (an RM trained on rows
    without EOS): a stop token the tail does not contain is followed by the whole tail, those in `drop` (no
    text: EOS, special tokens) are also masked out of the RM's input, and a truncated or unstopped response gets
    nothing appended."""

    eos_id: int
    after: dict[int, tuple[int, ...]]
    drop: frozenset[int] = frozenset()
    add_eos: bool = True
    _tensors: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def plain(cls, eos_id: int) -> "RewardEnding":
        """Nothing after EOS, EOS after anything else (plain-text training rows)."""
        return cls(eos_id, {eos_id: ()})

    @property
    def width(self) -> int:
        """Columns appended: the longest tail (EOS alone is 1)."""
        return max([1, *map(len, self.after.values())])

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """stops [S], their tails [S, width] (0-padded), lengths [S] and whether each is dropped [S], made once
        per device (a copy to the GPU per call would be a host sync)."""
        if device not in self._tensors:
            stops = sorted(self.after)
            rows = [list(self.after[s]) + [0] * (self.width - len(self.after[s])) for s in stops]
            self._tensors[device] = (torch.tensor(stops, dtype=torch.long, device=device),
                                     torch.tensor(rows, dtype=torch.long, device=device).view(len(stops), self.width),
                                     torch.tensor([len(self.after[s]) for s in stops], device=device),
                                     torch.tensor([s in self.drop for s in stops], device=device))
        return self._tensors[device]


def _reply_ids(tokenizer: Any, style: str, context: tuple[tuple[str, str], ...], reply: str,
               add_eos: bool) -> list[int]:
    """The ids of a final assistant turn `reply` after `context`, as the RM's training data renders it
    (`stages.pairs.tokenize_pair`): the reply part of `encode_segments`, with add_eos cut after its last EOS
    (`end_at_last_eos`)."""
    messages = (*context, ("assistant", reply)) if style == CHAT else (("prompt", context[-1][1]), ("response", reply))
    segments = render_segments(Conversation(messages, style), tokenizer, "last_turn")
    ex, prompt_len = encode_segments(segments, tokenizer, add_eos, bos_ids(tokenizer))
    if add_eos:
        ex = end_at_last_eos(ex, tokenizer.eos_token_id, prompt_len)
    return ex.input_ids[prompt_len:]


def _common_suffix(a: list[int], b: list[int]) -> list[int]:
    """The longest run of ids both lists end with.

    >>> _common_suffix([5, 1, 9, 2], [7, 9, 2])
    [9, 2]
    """
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def template_tail(tokenizer: Any, chat: bool, warn: Callable[[str], None] | None = None,
                  add_eos: bool = True) -> list[int]:
    """The ids the RM's training data puts after a final assistant turn's text: what the renders of two
    different replies end with alike (add_eos: Gemma <end_of_turn> "\\n" <eos>, plain text EOS; without:
    Gemma <end_of_turn> "\\n", plain text nothing). Only what follows
    the text counts: a template's text before the reply (Qwen3's empty think block) is not the tail. A chat
    template that renders neither a user/assistant nor a system/user/assistant conversation gives the plain-text
    tail (with a warning through `warn`)."""
    if chat and getattr(tokenizer, "chat_template", None):
        why = ""
        for context in _CONTEXTS:
            try:
                return _common_suffix(*(_reply_ids(tokenizer, CHAT, context, r, add_eos) for r in _REPLIES))
            except Exception as exc:  # noqa: BLE001 - a template's own error (jinja, raise_exception): the next try
                why = str(exc)
        if warn is not None:
            how = ("with EOS appended after its stop token" if add_eos else
                   "without its stop token (a special one) and nothing appended")
            warn(f"warning: the chat template renders no plain conversation ({why}); the reward model reads a "
                 f"response {how}, as for plain text")
    return _common_suffix(*(_reply_ids(tokenizer, RAW_PR, _CONTEXTS[0], r, add_eos) for r in _REPLIES))


def reward_ending(tokenizer: Any, stop_ids: Iterable[int], styles: Iterable[str],
                  warn: Callable[[str], None] | None = None, add_eos: bool = True) -> RewardEnding:
    """Per stop token, what the RM's training data has after it: the template tail after the token's last
    occurrence in it (prompts rendered with the chat template: `styles` has "chat"); else EOS, and nothing
    after EOS itself. `add_eos` false (the RM's rows had no EOS appended): a stop token the tail does not
    contain gets the whole tail, and is dropped (masked out) when it is no text (EOS, a special token: it
    decodes to nothing with skip_special_tokens), as the RM's rows never had it.

    >>> from stages.models import train_tokenizer
    >>> tok = train_tokenizer(["hello there"] * 3, vocab_size=300, min_frequency=1)  # ends a turn with EOS
    >>> eos = tok.eos_token_id
    >>> ending = reward_ending(tok, [eos, 7], {"chat"})
    >>> ending.after == {eos: (), 7: (eos,)}, ending.width
    (True, 1)
    """
    eos = tokenizer.eos_token_id
    tail = template_tail(tokenizer, CHAT in set(styles), warn, add_eos)
    after, drop = {}, set()
    for stop in {eos, *stop_ids}:
        at = max((i for i, t in enumerate(tail) if t == stop), default=None)
        if at is not None:
            after[stop] = tuple(tail[at + 1:])
        elif add_eos:
            after[stop] = () if stop == eos else (eos,)
        else:
            after[stop] = tuple(tail)
            if stop == eos or not tokenizer.decode([stop], skip_special_tokens=True):
                drop.add(stop)
    return RewardEnding(eos, after, frozenset(drop), add_eos)


def ending_for(rm_dir: str | None, rm_add_eos: bool | None, tokenizer: Any, stop_ids: Iterable[int],
               styles: Iterable[str], warn: Callable[[str], None], tell: Callable[[str], None]) -> RewardEnding:
    """`reward_ending` for the reward model in `rm_dir`, read as its rows were trained (`trained_with_eos`:
    data.rm_add_eos, else its record), with `describe_ending`'s line, when there is one, given to `tell` (what
    PPO and `rlhf eval` print at start)."""
    ending = reward_ending(tokenizer, stop_ids, styles, warn, trained_with_eos(rm_dir, rm_add_eos, warn))
    if (line := describe_ending(ending, tokenizer)) is not None:
        tell(line)
    return ending


def describe_ending(ending: RewardEnding, tokenizer: Any) -> str | None:
    """One line naming the stop tokens after which more than EOS is appended and those the reward model reads
    the response without (None when there are none)."""
    def names(ids: Iterable[int]) -> str:
        return " ".join(repr(tokenizer.decode([t])) for t in ids)

    parts = []
    for stop, tail in sorted(ending.after.items()):
        if stop in ending.drop:
            parts.append(f"{names([stop])} without it" + (f", followed by {names(tail)}" if tail else ""))
        elif tail not in ((), (ending.eos_id,)):
            parts.append(f"{names([stop])} after {names(tail)}")
    if not parts:
        return None
    return ("the reward model reads a response that stopped at " + "; at ".join(parts)
            + " (as its training data ends a turn" + ("" if ending.add_eos else ", without EOS") + ")")


def ending_columns(last: torch.Tensor, truncated: torch.Tensor, ending: RewardEnding,
                   eos_on_truncation: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids and mask [B, width] to append to each [prompt | response] row, from its last token `last` [B], and
    whether that last token is to be masked out of the RM's input [B]: a row that stopped on a stop token gets
    that token's tail (and is dropped when the token is in `ending.drop`); a truncated row EOS
    (eos_on_truncation) or nothing; any other row EOS (nothing for an RM trained without EOS). No host sync.

    >>> e = RewardEnding(2, {2: (), 5: (9, 2)})
    >>> ids, mask, drop = ending_columns(torch.tensor([2, 5, 7, 7]), torch.tensor([False, False, True, True]), e, True)
    >>> ids.tolist(), mask.tolist(), drop.tolist()
    ([[0, 0], [9, 2], [2, 0], [2, 0]], [[0, 0], [1, 1], [1, 0], [1, 0]], [False, False, False, False])
    >>> plain = RewardEnding(2, {2: ()}, frozenset({2}), add_eos=False)   # no EOS in the RM's rows
    >>> [t.tolist() for t in ending_columns(torch.tensor([2, 7]), torch.tensor([False, True]), plain, True)]
    [[[0], [0]], [[0], [0]], [True, False]]
    """
    stops, tails, lengths, drops = ending.tensors(last.device)
    hit = last[:, None] == stops[None]
    known = hit.any(1) & ~truncated
    which = hit.int().argmax(1)
    eos_row = torch.zeros_like(tails[0])
    eos_row[0] = ending.eos_id
    ids = torch.where(known[:, None], tails[which], eos_row)
    n = torch.where(known, lengths[which], torch.full_like(lengths[which], int(ending.add_eos)))
    if not eos_on_truncation:
        n = torch.where(truncated, torch.zeros_like(n), n)
    mask = torch.arange(ending.width, device=last.device)[None] < n[:, None]
    return ids * mask, mask.long(), known & drops[which]
