"""Prompts for PPO rollouts.

Formats (`data.format`; `auto` picks from the first row's keys):
  prompt    {prompt: "..."}                        raw text (or one user turn through the chat template);
            {prompt: [{role, content}, ...]}       a message list: read as `messages` reads it
  messages  {messages: [{role, content}, ...]}     through the chat template with the generation prompt; a
                                                   trailing assistant turn is dropped (SFT data works as is)
  hh        HH-RLHF text (the `chosen` column)     everything up to and including the last "\\n\\nAssistant:"

A prompt longer than `max_prompt_length` tokens keeps its last `max_prompt_length` tokens (the end of a prompt,
with the generation prompt, matters most).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from stages.config import PPODataConfig, SFTDataConfig
from stages.data import (AutoFormat, BadRow, BadRowLog, Segment, _bad, _field, bos_head, bos_ids, hh_dialogue, hh_field,
                         hh_text, opens_with_bos, parse_messages, prompt_column_turns, read_rows, render_template,
                         specials_read_as_text, text_ids, unread_input, with_input, with_plain_specials,
                         with_system)
from stages.errors import DataError
from stages.rendering import CHAT, RAW_HH, RAW_PR

Turns = list[tuple[str, str]]


def detect_prompt_format(record: dict[str, Any], data: PPODataConfig) -> str:
    cols = data.columns
    for fmt, key in (("messages", cols.messages), ("prompt", cols.prompt), ("hh", cols.text)):
        if key in record:
            return fmt
    raise BadRow(
        f"cannot tell the prompt format from keys {sorted(record)}; expected '{cols.messages}', '{cols.prompt}' "
        f"or '{cols.text}' (HH-RLHF text); set data.format/columns"
    )


def _drop_final_response(turns: Turns) -> Turns:
    """The turns before the last assistant turn when the dialogue ends with one; it must then end with a user
    turn."""
    if turns and turns[-1][0] == "assistant":
        turns = turns[:-1]
    if not turns or turns[-1][0] != "user":
        raise BadRow("a prompt must end with a user turn (after dropping a final assistant turn)")
    if not turns[-1][1].strip():
        raise BadRow("empty user turn at the end of the prompt")
    return turns


def parse_prompt(record: dict[str, Any], fmt: str, data: PPODataConfig) -> tuple[Turns, bool]:
    """(turns, chat?) of one record: chat=True renders through the chat template, else the single turn's text
    is the raw prompt."""
    turns, chat = _prompt_turns(record, fmt, data)
    return with_system(turns, record, data.columns.system, chat), chat


def _prompt_turns(record: dict[str, Any], fmt: str, data: PPODataConfig) -> tuple[Turns, bool]:
    """`parse_prompt` before data.columns.system."""
    cols = data.columns
    if fmt == "prompt" and isinstance(record.get(cols.prompt), list):  # (TRL's conversational prompt-only rows)
        return with_input(_drop_final_response(prompt_column_turns(record, cols.prompt)), record, cols.input), True
    if fmt == "prompt":  # (an empty prompt column beside an input: the input alone, as SFT and the RM read it)
        turns = with_input([("user", _field(record, cols.prompt, cols.input is not None))], record, cols.input)
        if not turns[0][1].strip():
            raise BadRow(f"empty '{cols.prompt}'" + (f" and '{cols.input}'" if cols.input is not None else ""))
        return turns, data.use_chat_template
    unread_input(record, cols.input, fmt)
    if fmt == "messages":
        return _drop_final_response(parse_messages(record, cols.messages)), True
    if fmt == "hh":
        text = hh_text(hh_field(record, cols.text))  # (as SFT and the RM read it)
        turns = hh_dialogue(text)  # (no marker found: the whole text, answer and all, would become the prompt)
        if not data.use_chat_template:  # up to the last assistant marker; a dialogue that ends with a human
            at = text.rfind("\n\nAssistant:")  # turn is the prompt as it is (as with the chat template)
            ends_with_user = bool(turns) and turns[-1][0] == "user"
            prompt = text[: at + len("\n\nAssistant:")] if at >= 0 and not ends_with_user else \
                text.rstrip() + "\n\nAssistant:"
            if not prompt.strip() or "Human:" not in prompt:
                raise BadRow("no human turn before the last '\\n\\nAssistant:'")
            return [("user", prompt)], False
        return _drop_final_response([(r, c.strip()) for r, c in turns]), True
    raise ValueError(fmt)


def render_prompt(turns: Turns, chat: bool, tokenizer: Any, specials_as_text: bool = True) -> Segment:
    """The prompt's text: the single turn's text as it is, or the chat template's render with the generation
    prompt, a special-token string inside a content marked to be read as text (as SFT and the RM read it)."""
    if not chat:
        return Segment(turns[0][1], False)

    def through_template(turns: Sequence[tuple[str, str]]) -> list[Segment]:
        msgs = [{"role": r, "content": c} for r, c in turns]
        return [Segment(render_template(tokenizer, msgs, add_generation_prompt=True), False)]

    return with_plain_specials(turns, tokenizer, through_template, specials_as_text)[0]


#: prompt format -> the rendering style (stages/rendering.py) of a prompt not rendered through the chat template
RAW_STYLES = {"prompt": RAW_PR, "hh": RAW_HH}


class Prompts(NamedTuple):
    ids: list[list[int]]  # each usable prompt's token ids
    cut: int  # prompts cut to data.max_prompt_length
    special_as_text: int  # prompts with a special-token string in a message's content, read as text


def held_out_sha256(rows: Sequence[tuple[int, int]], fraction: float, seed: int) -> str:
    """sha256 of a validation share of data.train: where each usable prompt came from, (the file's index in
    data.train, row number) in order (the rows `split_holdout` splits by position), with data.eval_fraction and
    the seed it split with. Two reads of data.train with one digest hold the same prompts out, whatever their
    token ids (another data.max_prompt_length cuts the same rows)."""
    return hashlib.sha256(json.dumps([[list(row) for row in rows], fraction, seed]).encode("utf-8")).hexdigest()


def load_prompts(source: Any, data: PPODataConfig, tokenizer: Any, log: BadRowLog,
                 styles: set[str] | None = None, limit: int | None = None,
                 rows: list[tuple[int, int]] | None = None) -> Prompts:
    """Token ids of every usable prompt of `source` (of the first `limit` when given: the rows after them are not
    read), with counts over them (`Prompts`); the rendering style of each is added to `styles` when given, and
    where it came from, (its file's index in `source`, row number), to `rows` (`held_out_sha256`)."""
    files = {name: i for i, name in enumerate(source.paths())}
    files |= {str(Path(name)): i for i, name in enumerate(source.paths())}  # (how read_rows names a local file)
    fmt = AutoFormat(data.format)
    bos = bos_ids(tokenizer)
    prompts: list[list[int]] = []
    truncated = as_text = 0
    for row in read_rows(source, data.on_bad_row, log):
        where = f"{row.file} row {row.row}"
        try:
            row_fmt = fmt.of(row.data, lambda r: detect_prompt_format(r, data))
            turns, chat = parse_prompt(row.data, row_fmt, data)
            rendered = render_prompt(turns, chat, tokenizer, data.content_special_tokens == "text")
        except BadRow as exc:
            _bad(where, f"{exc}{fmt.note()}", data.on_bad_row, log)
            continue
        fmt.keep(row_fmt, where)
        log.note_columns(row.data, data.columns, row.file)
        text = rendered.text
        ids = text_ids(tokenizer, text, rendered.plain)[0]
        if bos and not opens_with_bos(tokenizer, rendered):
            ids = bos + ids
        if not ids:
            _bad(where, "the prompt encodes to no token with this tokenizer", data.on_bad_row, log)
            continue
        if len(ids) > data.max_prompt_length:  # cut from the left, after the BOS (as SFT and the RM cut)
            head = bos_head(ids, bos) if data.max_prompt_length > len(bos) else 0
            ids, truncated = ids[:head] + ids[len(ids) - (data.max_prompt_length - head):], truncated + 1
        prompts.append(ids)
        as_text += specials_read_as_text(tokenizer, [rendered])
        if styles is not None:
            styles.add(CHAT if chat else RAW_STYLES[row_fmt])
        if rows is not None:
            rows.append((files.get(row.file, -1), row.row))
        if limit is not None and len(prompts) >= limit:
            break  # (before the next row is read: its errors are not this evaluation's)
    if not prompts:
        raise DataError(f"no usable prompts in {', '.join(source.paths())}{log.summary()}")
    return Prompts(prompts, truncated, as_text)


#: the SFT keys a message about data.ptx rows names (`ptx_wording`), the longer forms first
_SFT_KEYS = re.compile(r"data\.max_length \(or data\.max_prompt_length\)|data\.format/columns|"
                       r"data\.train_on last_turn trains the final reply of such rows|"
                       r"data\.(?:columns|format|max_length)\b")
#: what a message quotes (a row's content, a column name): never reworded
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")


def ptx_wording(text: str, paths: Sequence[str] = ()) -> str:
    """`text`, a message about data.ptx's rows (read as SFT data: `ptx_data_config`), naming the PPO config's keys
    for them: data.columns.X -> data.ptx_columns.X, data.format -> data.ptx_format, data.max_length (the prompt
    budget is half of it) -> data.ptx_max_length; SFT's train_on advice, which PTX has no key for, says what to
    do instead. Quoted text (a row's content, a column name) and the `paths` (the PTX files) are left as they are.

    >>> ptx_wording("set data.format/columns; data.columns.messages: chosen; data.format: text")
    'set data.ptx_format/ptx_columns; data.ptx_columns.messages: chosen; data.ptx_format: text'
    >>> ptx_wording("cut to data.max_length (or data.max_prompt_length); data.formats")
    'cut to data.ptx_max_length; data.formats'
    >>> ptx_wording("/d/data.format/p.jsonl row 2: (got 'data.format'); data.format", ["/d/data.format/p.jsonl"])
    "/d/data.format/p.jsonl row 2: (got 'data.format'); data.ptx_format"
    """
    def key(found: re.Match[str]) -> str:
        said = found.group(0)
        if said.startswith("data.train_on"):
            return ("PTX trains every reply of a row (no data.ptx key chooses otherwise): give such rows their final "
                    "reply only")
        if said.startswith("data.max_length"):
            return "data.ptx_max_length"
        return "data.ptx_format/ptx_columns" if said == "data.format/columns" else "data.ptx_" + said[len("data."):]

    kept = re.compile("|".join([re.escape(p) for p in sorted(paths, key=len, reverse=True) if p] + [_QUOTED.pattern]))
    out, at = [], 0
    for found in kept.finditer(text):
        out += [_SFT_KEYS.sub(key, text[at:found.start()]), found.group(0)]
        at = found.end()
    return "".join(out) + _SFT_KEYS.sub(key, text[at:])


def ptx_data_config(data: PPODataConfig) -> SFTDataConfig:
    """How PPO reads its PTX data: SFT conversations in data.ptx_format, rendered as the prompts are."""
    return SFTDataConfig(train=data.ptx, format=data.ptx_format, columns=data.ptx_columns,
                         max_length=data.ptx_max_length,
                         chat_template=data.chat_template, use_chat_template=data.use_chat_template,
                         on_bad_row=data.on_bad_row, eval_fraction=0.0,
                         content_special_tokens=data.content_special_tokens)
