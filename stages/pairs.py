"""Preference pairs for the reward model: reading, parsing, tokenizing.

Formats (`data.format`; `auto` decides from the first usable row):
  pairs     {prompt, chosen, rejected} strings: raw `prompt + response` (or the chat template with
            use_chat_template: true, the prompt as a user turn and each response as the assistant turn)
  messages  chosen / rejected are lists of {role, content}; either with a `prompt` column (a message list or a
            string) and the responses as assistant messages, or without one: then the messages the two share at
            the start are the prompt
  hh        HH-RLHF {chosen, rejected} full-dialogue texts: the longest shared prefix that ends with
            "\\n\\nAssistant:" is the prompt, the rest of each text is its response

A pair whose chosen and rejected responses are identical says nothing about preference: it is dropped and
counted (never an error). Both sides are tokenized with the same prompt truncation, so the reward model
compares the two responses in the same context.
"""

from __future__ import annotations

import math
import re
import sys
from array import array
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Iterable

from stages.config import DataSource, RMDataConfig
from stages.errors import DataError
from stages.data import (
    IGNORE,
    AutoFormat,
    BadRow,
    BadRowLog,
    Conversation,
    DataReport,
    TokenizedExample,
    TokenRows,
    _bad,
    _field,
    bos_head,
    bos_ids,
    check_hh_turns,
    encode_segments,
    hh_dialogue,
    message_turns,
    parse_messages,
    prompt_column_turns,
    prompt_cut,
    read_rows,
    render_segments,
    split_hh,
    truncate_example,
    unread_input,
    with_input,
    with_system,
)
from stages.rendering import CHAT, RAW_HH, RAW_PR

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
Messages = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the shared prompt turns, the two continuations, how to render them, and the margin the
    reward difference should exceed (0 unless a margin column is set)."""

    prompt: Messages
    chosen: Messages
    rejected: Messages
    style: str  # raw_pr | raw_hh | chat (as in stages.data.Conversation)
    margin: float = 0.0

    def conversation(self, side: str) -> Conversation:
        return Conversation(self.prompt + (self.chosen if side == "chosen" else self.rejected), self.style)


class IdenticalPair(Exception):
    """Chosen and rejected are the same text: the pair carries no preference."""


class ContextCut(Exception):
    """A pair whose sides differ before its final turn that max_length cuts into where they differ: what is
    left would compare leftover contexts, not the two answers."""


class NoRoom(Exception):
    """A pair whose context as kept (at least min(prompt, data.max_prompt_length) tokens, or one side's longer
    context, which the other side's prompt cannot shorten enough) fills max_length: a side would keep no token
    of its response."""


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two HH-RLHF dialogues: the prompt is the longest common
    prefix cut back to the end of its last "\\n\\nAssistant:" marker.

    >>> split_hh_pair("\\n\\nHuman: hi\\n\\nAssistant: hello", "\\n\\nHuman: hi\\n\\nAssistant: go away")
    ('\\n\\nHuman: hi\\n\\nAssistant:', ' hello', ' go away')
    """
    if chosen == rejected:
        raise IdenticalPair()
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    at = chosen.rfind(HH_ASSISTANT, 0, n)
    if at < 0:
        raise BadRow("chosen and rejected share no dialogue prefix ending in '\\n\\nAssistant:' (they were read as "
                     "HH-RLHF dialogues; plain responses to a prompt column are data.format: pairs)")
    end = at + len(HH_ASSISTANT)
    if HH_HUMAN in chosen[end:n]:
        raise BadRow("chosen and rejected differ in a human turn, not in a response")
    return chosen[:end], chosen[end:], rejected[end:]


def _ends_with_response(turns: Messages, side: str) -> None:
    if not turns or turns[-1][0] != "assistant":
        raise BadRow(f"{side} must end with an assistant turn")
    if not turns[-1][1].strip():
        raise BadRow(f"empty {side} response")


def _margin(record: dict[str, Any], column: str | None) -> float:
    if column is None:
        return 0.0
    if column not in record:  # (a misspelt data.columns.margin: said as such, not as a value of the wrong type)
        raise BadRow(f"missing key '{column}' (data.columns.margin; keys present: {', '.join(sorted(record))})")
    value = record[column]
    if isinstance(value, str):  # CSV cells are strings
        try:
            value = float(value)
        except ValueError:
            raise BadRow(f"'{column}' must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow(f"'{column}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise BadRow(f"'{column}' must be a finite number, got {value}")
    return float(value)


#: two response columns told apart by a last 0/1 or A/B (PKU-SafeRLHF's response_0/response_1, SHP's
#: human_ref_A/human_ref_B), whose better one another column names
_INDEXED = re.compile(r"^(.*?)[_-]?([01AB])$")


def index_twins(a: str, b: str) -> bool:
    """Whether two column names differ only in a last 0/1 or A/B (`_INDEXED`).

    >>> index_twins("response_0", "response_1"), index_twins("response_j", "response_k")
    (True, False)
    """
    ma, mb = _INDEXED.match(a), _INDEXED.match(b)
    return bool(ma and mb) and ma.group(1) == mb.group(1) and ma.group(2) != mb.group(2)


def indexed_pair_hint(record: dict[str, Any]) -> str:
    """For rows with two response columns and the index of the better one in a third, the note that no column
    mapping reads them (chosen is response_0 in some rows and response_1 in others); "" for other rows.

    >>> indexed_pair_hint({"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1})[:40]
    '; response_0 and response_1 are two resp'
    """
    texts = sorted(key for key, value in record.items() if isinstance(value, str))
    pairs = [(a, b) for a, b in combinations(texts, 2) if index_twins(a, b)]
    if not pairs:
        return ""
    pair = max(pairs, key=lambda keys: sum(len(record[k]) for k in keys))  # the texts, not ids (SHP's c_root_id_A/B)
    return (f"; {pair[0]} and {pair[1]} are two responses whose better one another column names: write each row as "
            "chosen/rejected first, since no column mapping can (it would take some pairs the wrong way round)")


def indexed_columns_caution(chosen: str, rejected: str) -> str | None:
    """A caution when data.columns.chosen and .rejected are two columns told apart only by an index (`index_twins`:
    PKU-SafeRLHF's response_0/response_1, SHP's human_ref_A/human_ref_B): such data names the better one per row
    in another column, so unless the first is the better in every row, about half the pairs are read the wrong
    way round."""
    if not index_twins(chosen, rejected):
        return None
    return (f"data.columns.chosen and .rejected are {chosen} and {rejected}, two responses told apart by an index: "
            f"unless {chosen} is the better in every row, rewrite each row as chosen/rejected first (such data names "
            "the better one per row in another column, and about half the pairs would be read the wrong way round)")


def detect_pair_format(record: dict[str, Any], data: RMDataConfig) -> str:
    """The format a record's keys and values indicate (raises BadRow when none fits)."""
    cols = data.columns
    if cols.chosen not in record or cols.rejected not in record:
        raise BadRow(
            f"expected keys '{cols.chosen}' and '{cols.rejected}' (keys present: {', '.join(sorted(record))}); "
            "set data.columns" + indexed_pair_hint(record))
    if isinstance(record[cols.chosen], list):
        return "messages"
    return "pairs" if cols.prompt in record else "hh"


def parse_pair(record: dict[str, Any], fmt: str, data: RMDataConfig) -> PreferencePair:
    """One record -> PreferencePair. Raises BadRow (with the reason) or IdenticalPair."""
    cols = data.columns
    margin = _margin(record, cols.margin)
    if fmt != "pairs":  # (no prompt column to join an input to)
        unread_input(record, cols.input, fmt)
    if fmt == "pairs":  # (a message list in the prompt column: TRL's conversational prompt)
        prompt_turns = tuple(with_input(prompt_column_turns(record, cols.prompt), record, cols.input))
        sides = [(("assistant", _field(record, cols.chosen)),), (("assistant", _field(record, cols.rejected)),)]
        style = CHAT if data.use_chat_template or isinstance(record[cols.prompt], list) else RAW_PR
    elif fmt == "hh":
        texts = _field(record, cols.chosen), _field(record, cols.rejected)
        try:
            prompt_text, chosen, rejected = split_hh_pair(*texts)
        except BadRow:
            for text in texts:  # text that is no HH dialogue (CRLF line ends, say) says so as in SFT and PPO ...
                try:
                    hh_dialogue(text)
                except BadRow as exc:  # ... and how rows of plain responses are read (format auto took them for HH)
                    raise BadRow(f"{exc}; plain responses to a prompt are data.format pairs, with data.columns.prompt "
                                 "naming its column") from None
            raise
        prompt_turns = tuple(hh_dialogue(prompt_text)[:-1])  # the prompt ends with an empty assistant turn
        sides = [tuple(check_hh_turns(split_hh(HH_ASSISTANT + text))) for text in (chosen, rejected)]
        style = RAW_HH
        if data.use_chat_template:
            prompt_turns = tuple((r, c.strip()) for r, c in prompt_turns)
            sides = [tuple((r, c.strip()) for r, c in side) for side in sides]
            style = CHAT
    elif fmt == "messages":
        chosen_msgs = tuple(parse_messages(record, cols.chosen))
        rejected_msgs = tuple(parse_messages(record, cols.rejected))
        n = 0
        while n < min(len(chosen_msgs), len(rejected_msgs)) and chosen_msgs[n] == rejected_msgs[n]:
            n += 1
        at_n = [side[n][0] for side in (chosen_msgs, rejected_msgs) if len(side) > n]
        if any(role != "assistant" for role in at_n):  # either side: the first difference must be a response
            raise BadRow(f"chosen and rejected differ in a user/system turn, not in a response (message {n}: "
                         f"{' vs '.join(at_n)})")
        raw = record.get(cols.prompt)
        empty = raw is None or raw == [] or (isinstance(raw, str) and not raw.strip())
        given = None if empty else tuple(message_turns(record, cols.prompt, "user"))
        if given is None or conversations_contain(given, chosen_msgs[:n]):
            prompt_turns, sides = chosen_msgs[:n], [chosen_msgs[n:], rejected_msgs[n:]]
        else:  # responses to the prompt, or conversations repeating it (e.g. UltraFeedback): the repeat dropped
            k = repeated_turns(given, chosen_msgs[:n])
            prompt_turns, sides = given, [chosen_msgs[k:], rejected_msgs[k:]]
            if sides[0] and sides[0][0][0] != "assistant":
                raise BadRow(f"'{cols.chosen}' and '{cols.rejected}' are conversations that neither begin with "
                             f"'{cols.prompt}' nor hold its turns: give the prompt in one place")
        style = CHAT
    else:
        raise ValueError(fmt)
    prompt_turns = tuple(with_system(prompt_turns, record, cols.system, style == CHAT))  # (a bad row, not a tie)
    if sides[0] == sides[1]:
        raise IdenticalPair()
    for side, name in zip(sides, ("chosen", "rejected")):
        _ends_with_response(side, name)
    return PreferencePair(prompt_turns, sides[0], sides[1], style, margin)


def _same_turn(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """The same role and content, whitespace at the ends aside ("Q\n" in a prompt column, "Q" in the messages)."""
    return a[0] == b[0] and a[1].strip() == b[1].strip()


def repeated_turns(prompt: Messages, shared: Messages) -> int:
    """How many turns the sides' shared opening `shared` begins with that end the prompt column's `prompt`: the
    most k with shared[:k] the last k turns of prompt (a prompt [system, user] before conversations that start
    at the user turn); 0 when they repeat none of it.

    >>> repeated_turns((("system", "S"), ("user", "Q")), (("user", "Q "), ("assistant", "A")))
    1
    """
    return next((k for k in range(min(len(prompt), len(shared)), 0, -1)
                 if all(_same_turn(a, b) for a, b in zip(prompt[-k:], shared[:k]))), 0)


def conversations_contain(prompt: Messages, shared: Messages) -> bool:
    """Whether the sides are whole conversations (they open with a user or system turn) whose shared opening
    holds every turn of the prompt column's `prompt` but does not begin with its end (`repeated_turns`): a system
    turn before the prompt, or a prompt column holding the last question of a multi-turn dialogue. They stand
    as given, the column a copy of part of them."""
    if not shared or shared[0][0] == "assistant" or repeated_turns(prompt, shared):
        return False
    return all(any(_same_turn(turn, other) for other in shared) for turn in prompt)


@dataclass
class PairLoad:
    """Usable pairs of a source with "file row N" of each, plus how many identical pairs were dropped."""

    pairs: list[tuple[PreferencePair, str]]
    identical: int
    duplicates: int = 0


def pair_key(pair: PreferencePair) -> tuple[Messages, Messages, Messages]:
    """What makes two pairs the same comparison: prompt, chosen and rejected turns (not the style or margin)."""
    return pair.prompt, pair.chosen, pair.rejected


def load_pairs(source: DataSource, data: RMDataConfig, log: BadRowLog) -> PairLoad:
    """All usable pairs of `source`; bad rows raise (naming file and row) or are skipped and counted in `log`.
    A pair repeating an earlier one (same prompt, chosen and rejected) is dropped and counted (data.duplicates:
    drop; repeats weight a comparison twice and leak into a held-out split), raises naming both rows (error)
    or is kept (keep)."""
    fmt = AutoFormat(data.format)
    pairs: list[tuple[PreferencePair, str]] = []
    identical = duplicates = 0
    seen: dict[tuple[Messages, Messages, Messages], str] = {}
    for row in read_rows(source, data.on_bad_row, log):
        where = f"{row.file} row {row.row}"
        try:
            row_fmt = fmt.of(row.data, lambda r: detect_pair_format(r, data))
            pair = parse_pair(row.data, row_fmt, data)
        except IdenticalPair:
            identical += 1
            continue
        except BadRow as exc:
            _bad(where, f"{exc}{fmt.note()}", data.on_bad_row, log)
            continue
        fmt.keep(row_fmt, where)
        log.note_columns(row.data, data.columns, row.file)
        key = pair_key(pair)
        if key in seen and data.duplicates != "keep":
            if data.duplicates == "error":
                raise DataError(f"{where}: duplicate of {seen[key]} (same prompt, chosen and rejected; set "
                                "data.duplicates: drop to drop repeats, or keep)")
            duplicates += 1
            continue
        seen.setdefault(key, where)
        pairs.append((pair, where))
    if not pairs:
        extra = f" ({identical} identical pair(s) dropped)" if identical else ""
        raise DataError(f"no usable preference pairs in {', '.join(source.paths())}{extra}{log.summary()}")
    return PairLoad(pairs, identical, duplicates)


# --------------------------------------------------------------------------------------------- tokenizing
def tokenize_pair(
    pair: PreferencePair, tokenizer: Any, data: RMDataConfig, bos: list[int]
) -> tuple[TokenizedExample, TokenizedExample]:
    """Both sides as token ids; labels mark the chosen/rejected response tokens (the last assistant turn).

    The two prompts are cut by the same number of tokens (the larger cut either side needs, but no more than
    either side's prompt can give beyond data.max_prompt_length's budget: a side whose context is shorter, having
    fewer turns); responses are then cut from the right. A pair whose sides differ before the final turn, when
    that cut reaches the tokens where they differ, raises ContextCut (it would compare leftover contexts); a
    pair whose kept context leaves a side's response no room, NoRoom. With add_eos every side ends with EOS:
    what a chat template puts after the response's last EOS (ChatML's "\n") is dropped, as a sampled response
    ends at its EOS; a response cut short gets EOS as its last token (with no LM label: the LM loss must not
    learn to stop mid-sentence). So the reward is always read at an EOS. A prompt cut from the left keeps its
    BOS."""
    encoded = []
    eos = tokenizer.eos_token_id
    as_text = data.content_special_tokens == "text"
    for side in ("chosen", "rejected"):
        segments = render_segments(pair.conversation(side), tokenizer, "last_turn", as_text)
        ex, prompt_len = encode_segments(segments, tokenizer, data.add_eos, bos)
        if data.add_eos:
            ex = end_at_last_eos(ex, eos, prompt_len)
        encoded.append((ex, prompt_len))
    cut = max(prompt_cut(n, len(ex.input_ids), data.max_length, data.prompt_budget) for ex, n in encoded)
    # the same cut for both (the same context), and never into a side's response or prompt budget: when one side
    # continues with more turns its context is longer, and the cut that side needs may be more than the other's
    # prompt can give; that side's response is then cut from the right
    own = min(min(cut, n - min(n, data.prompt_budget)) for _, n in encoded)
    if own:  # does the cut reach the tokens where the sides differ?
        (c, _), (r, _) = encoded
        shared = next((i for i, (a, b) in enumerate(zip(c.input_ids, r.input_ids)) if a != b),
                      min(len(c.input_ids), len(r.input_ids)))
        if bos_head(c.input_ids, bos) + own > shared:
            raise ContextCut
    room = data.max_length - (1 if data.add_eos else 0)  # (a cut response's last token becomes its EOS)
    if any(n - own >= room for _, n in encoded):  # a (longer) context left no room for a token of its response
        raise NoRoom
    out = []
    for ex, _ in encoded:
        ex = truncate_example(ex, own, data.max_length, bos_head(ex.input_ids, bos))
        if data.add_eos and ex.response_truncated:
            ex.input_ids[-1] = eos  # the reward is read at an EOS; not an end the LM loss should learn
            ex.labels[-1] = IGNORE
        out.append(ex)
    return out[0], out[1]


def _differ_uncut(pair: PreferencePair, tokenizer: Any, data: RMDataConfig, bos: list[int]) -> bool:
    """Whether the two sides of `pair` differ as tokens when nothing is cut (`tokenize_pair` without max_length)."""
    chosen, rejected = tokenize_pair(pair, tokenizer, data.model_copy(update={"max_length": sys.maxsize}), bos)
    return chosen.input_ids != rejected.input_ids


def end_at_last_eos(ex: TokenizedExample, eos: int, prompt_len: int) -> TokenizedExample:
    """Drop the tokens after the last EOS of the response part (positions >= prompt_len), if any."""
    ids = ex.input_ids
    last = max((i for i in range(prompt_len, len(ids)) if ids[i] == eos), default=None)
    if last is None or last == len(ids) - 1:
        return ex
    return TokenizedExample(ids[: last + 1], ex.labels[: last + 1], special_as_text=ex.special_as_text)


class PairRows:
    """Tokenized pairs: chosen[i] and rejected[i] ({input_ids, labels}) and margin[i]."""

    def __init__(self) -> None:
        self.chosen = TokenRows(with_positions=False)
        self.rejected = TokenRows(with_positions=False)
        self.margins = array("d")

    def append(self, chosen: TokenizedExample, rejected: TokenizedExample, margin: float) -> None:
        self.chosen.append(chosen.input_ids, chosen.labels)
        self.rejected.append(rejected.input_ids, rejected.labels)
        self.margins.append(margin)

    def __len__(self) -> int:
        return len(self.margins)


#: a prompt this long (characters, stripped) that both responses start with is taken for a repeat, not chance
REPEAT_MIN_CHARS = 16


def repeats_prompt(pair: PreferencePair) -> bool:
    """Whether both responses of a one-turn pair begin with its (not short) prompt text: full texts beside a
    prompt column, whose prompt the model then reads twice. Counted and said, not cut: a shared opening may be
    the answers' own."""
    if len(pair.prompt) != 1 or len(pair.chosen) != 1 or len(pair.rejected) != 1:
        return False
    text = pair.prompt[0][1]
    return len(text.strip()) >= REPEAT_MIN_CHARS and pair.chosen[0][1].startswith(text) and \
        pair.rejected[0][1].startswith(text)


def tokenize_pairs(
    pairs: Iterable[tuple[PreferencePair, str]], tokenizer: Any, data: RMDataConfig, report: DataReport
) -> PairRows:
    """Tokenized pairs; an identical pair is dropped and counted as identical, and as identical after truncation
    when max_length cut its difference away (its sides differ when tokenized uncut)."""
    bos = bos_ids(tokenizer)
    log = BadRowLog()
    rows = PairRows()
    for pair, where in pairs:
        try:
            chosen, rejected = tokenize_pair(pair, tokenizer, data, bos)
        except BadRow as exc:
            _bad(where, str(exc), data.on_bad_row, log)
            continue
        except ContextCut:
            report.context_cut_pairs += 1
            continue
        except NoRoom:
            report.no_room_pairs += 1
            continue
        if chosen.input_ids == rejected.input_ids:
            report.identical_pairs += 1
            cut = chosen.prompt_truncated or rejected.prompt_truncated or chosen.response_truncated or \
                rejected.response_truncated
            # else equal once rendered (the tokenizer's normalisation, text after the last EOS, ...)
            report.identical_after_truncation += bool(cut) and _differ_uncut(pair, tokenizer, data, bos)
            continue
        rows.append(chosen, rejected, pair.margin)
        report.prompt_repeats += repeats_prompt(pair)
        report.examples += 1
        report.count_style(pair.style)
        report.prompt_truncated += chosen.prompt_truncated or rejected.prompt_truncated
        report.response_truncated += chosen.response_truncated or rejected.response_truncated
        report.special_as_text += chosen.special_as_text or rejected.special_as_text
        report.tokens += len(chosen.input_ids) + len(rejected.input_ids)
        report.trained_tokens += sum(1 for t in chosen.labels if t != IGNORE)
    report.count_skipped(log)
    return rows
