"""Reading, validating, rendering and tokenizing conversation data (SFT; the row readers are shared by the
other stages).

Formats (`data.format`, `auto` picks from the columns of the first row):
  prompt_response  {prompt, response}                  raw `prompt + response`, or through the chat template
  messages         {messages: [{role, content}, ...]}   always through the chat template
  hh               HH-RLHF text "\\n\\nHuman: ...\\n\\nAssistant: ..." (multi-turn), raw or through the template

Every row becomes a list of segments (text, trained?). The segments are tokenized one by one and
concatenated, so the loss mask is exact: a token is trained iff it comes from an assistant turn.
"""

from __future__ import annotations

import bisect
import json
import re
import weakref
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

from stages.config import LOCAL_SUFFIXES, Columns, DataSource, SFTDataConfig
from stages.errors import DataError
from stages.rendering import CHAT, RAW_HH, RAW_PR

IGNORE = -100  # label of tokens that carry no loss
ROLES = ("system", "user", "assistant")
HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


class BadRow(Exception):
    """A row that cannot be used; the message says why (the caller adds file and row)."""


@dataclass
class Row:
    """One record of a data file, with where it came from (row numbers are 1-based)."""

    data: dict[str, Any]
    file: str
    row: int


#: column names that hold part of a prompt in popular datasets (alpaca's instruction + input, orca's system +
#: question, SHP's history): one that data.columns does not name is left out of every row, which is said
PROMPT_PARTS = ("input", "instruction", "system", "system_prompt", "context", "history", "question", "query")


@dataclass
class BadRowLog:
    """Skipped rows, counted by reason (with `on_bad_row: skip`), and the columns of a source's first usable row
    that look like part of a prompt but are not read (`unread`, `note_columns`)."""

    reasons: Counter = field(default_factory=Counter)
    unread: list[str] = field(default_factory=list)
    _noted: set[str] = field(default_factory=set)  # the files whose first usable row was noted

    def add(self, reason: str) -> None:
        self.reasons[reason.split(" (")[0]] += 1  # "invalid JSON (... column 7)" -> "invalid JSON"

    def note_columns(self, record: dict[str, Any], columns: Any, file: str) -> None:
        """Add the columns of `file`'s first usable row (`record`) named as prompt parts are (`PROMPT_PARTS`:
        alpaca's `input`, an orca pair's `system`) that no data.columns key names: their text is not read."""
        if file in self._noted:
            return
        self._noted.add(file)
        named = set(columns.model_dump().values())
        self.unread += [key for key in record if key in PROMPT_PARTS and key not in named and key not in self.unread]

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        """" (skipped: 40 x empty 'response', 2 x invalid JSON)", or "" when nothing was skipped."""
        if not self.reasons:
            return ""
        return " (skipped: " + ", ".join(f"{n} x {reason}" for reason, n in self.reasons.most_common()) + ")"


class AutoFormat:
    """data.format as a source's rows are read: the configured one, or (auto) the one detected from the first
    usable row, which then holds for the whole source (every file of a list). `note()` says so in a later row's
    error: a file of another format after the first (`data.train: [sft.jsonl, pairs.jsonl]`) is otherwise told
    only "missing key 'messages'", with no word of where 'messages' came from."""

    def __init__(self, configured: str) -> None:
        self.fmt: str | None = None if configured == "auto" else configured
        self.decided_at = ""  # "FILE row N" whose format auto chose

    def of(self, record: dict[str, Any], detect: Callable[[dict[str, Any]], str]) -> str:
        """The format to parse `record` in (detected when none is chosen yet: BadRow when none fits)."""
        return self.fmt or detect(record)

    def keep(self, fmt: str, where: str) -> None:
        """A row parsed in `fmt`: auto's choice from now on, if none was made."""
        if self.fmt is None:
            self.fmt, self.decided_at = fmt, where

    def note(self) -> str:
        """" (data.format auto: read as 'messages', the format of FILE row N)" once auto has chosen, else ""."""
        return f" (data.format auto: read as {self.fmt!r}, the format of {self.decided_at})" if self.decided_at else ""


def _bad(where: str, reason: str, on_bad_row: str, log: BadRowLog) -> None:
    if on_bad_row == "error":
        raise DataError(f"{where}: {reason} (data.on_bad_row: skip in the config, or --set data.on_bad_row=skip, "
                        "skips such rows)")
    log.add(reason)


# --------------------------------------------------------------------------------------------- reading
class _Repeated(dict):  # type: ignore[type-arg]
    """A parsed JSON object that gave a key twice (`json` keeps the last value without a word): `key` names it."""

    key: str


class _RepeatWatch:
    """json's object_pairs_hook: each object as a dict, one that gives a key twice as a _Repeated, counted in
    `found` (so that only a record whose parse found one is searched for it)."""

    def __init__(self) -> None:
        self.found = 0

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        self.found += 1
        seen: set[str] = set()
        repeated = _Repeated(obj)
        repeated.key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return repeated


def repeated_key_reason(value: Any) -> str | None:
    """Why a record parsed with a _RepeatWatch is unusable: an object inside it (the record, a message, ...) gives
    a key twice, e.g. two "chosen" (JSON keeps the last value, so the other is lost unseen); None if none."""
    if isinstance(value, _Repeated):
        return f"the key {value.key!r} twice in one JSON object (only the last value would be read)"
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((reason for child in children if (reason := repeated_key_reason(child)) is not None), None)


def _read_jsonl(path: Path, on_bad_row: str, log: BadRowLog) -> Iterator[Row]:
    """JSON Lines, line by line, so that a bad line is reported by its number. Blank lines are skipped."""
    watch = _RepeatWatch()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path} row {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # (a BOM, as Windows editors write)
            except UnicodeDecodeError as exc:
                _bad(where, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", on_bad_row, log)
                continue
            if not line.strip():
                continue
            repeats = watch.found
            try:
                record = json.loads(line.rstrip("\r\n"), object_pairs_hook=watch)  # (a truncated row's error
            except json.JSONDecodeError as exc:  # lands on its own line)
                _bad(where, f"invalid JSON ({exc.msg} at column {exc.colno})", on_bad_row, log)
                continue
            if not isinstance(record, dict):
                _bad(where, f"expected a JSON object, got {type(record).__name__}", on_bad_row, log)
                continue
            if watch.found != repeats and (reason := repeated_key_reason(record)):
                _bad(where, reason, on_bad_row, log)
                continue
            if SURROGATE_ESCAPE.search(line) and (reason := surrogate_reason(record)):
                _bad(where, reason, on_bad_row, log)
                continue
            yield Row(record, str(path), lineno)


#: a JSON escape of a UTF-16 surrogate (\\ud800-\\udfff): the only way a parsed JSON text can hold one
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def surrogate_reason(record: dict[str, Any]) -> str | None:
    """Why a parsed JSON record holds no valid Unicode: an unpaired surrogate escape (`"\\ud83d"`, half of an
    emoji a cut string kept), which JSON allows but no UTF-8 text can hold (tokenizers refuse it); None if none."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        found = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
        return f"an unpaired surrogate escape ({found}): not valid Unicode text (half of an emoji cut off?)"
    return None


def _read_with_datasets(source_name: str, what: str, **load_args: Any) -> Iterator[Row]:
    """Rows of anything `datasets.load_dataset(**load_args)` reads (parquet files, hub datasets)."""
    import datasets

    from stages.distributed import quiet_datasets

    quiet_datasets()
    try:
        ds = datasets.load_dataset(**load_args)
    except Exception as exc:  # datasets / pyarrow / the hub client raise many types
        raise DataError(f"cannot load {what}: {exc}") from None
    for i, record in enumerate(ds, start=1):
        yield Row(dict(record), source_name, i)


def _read_csv(path: Path, on_bad_row: str, log: BadRowLog) -> Iterator[Row]:
    """CSV with a header row, every value a string (no type guessing: "2" stays "2"). Row 1 is the first data
    row; an empty cell is an empty string."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # (a BOM would join the first column's name)
            reader = csv.DictReader(fh)
            names = list(reader.fieldnames or [])
            twice = sorted({c for c in names if names.count(c) > 1})
            if twice:  # DictReader would keep the last such column's cell without a word
                raise DataError(f"{path}: the header names column(s) {', '.join(map(repr, twice))} more than once")
            for i, record in enumerate(reader, start=1):
                if None in record:
                    _bad(f"{path} row {i}", "more cells than header columns", on_bad_row, log)
                    continue
                yield Row({k: ("" if v is None else v) for k, v in record.items()}, str(path), i)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _read_json(path: Path, on_bad_row: str, log: BadRowLog) -> Iterator[Row]:
    """A .json file holding either a JSON array of objects or JSON Lines."""
    with path.open("rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # (after a BOM)
    if not head.startswith(b"["):
        yield from _read_jsonl(path, on_bad_row, log)
        return
    watch = _RepeatWatch()
    try:
        text = path.read_text(encoding="utf-8-sig")
        records = json.loads(text, object_pairs_hook=watch)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    escapes = SURROGATE_ESCAPE.search(text) is not None  # (only then is a record checked for them)
    del text
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            _bad(f"{path} row {i}", f"expected a JSON object, got {type(record).__name__}", on_bad_row, log)
            continue
        if watch.found and (reason := repeated_key_reason(record)):
            _bad(f"{path} row {i}", reason, on_bad_row, log)
            continue
        if escapes and (reason := surrogate_reason(record)):
            _bad(f"{path} row {i}", reason, on_bad_row, log)
            continue
        yield Row(record, str(path), i)


def _parquet_rows(path: Path) -> int | None:
    """The number of rows a parquet file's footer records; None when pyarrow cannot read it (`datasets` then
    says why)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError, ...
        return None


def read_rows(source: DataSource, on_bad_row: str, log: BadRowLog) -> Iterator[Row]:
    """Every record of a data source: local .jsonl/.json/.parquet/.csv file(s) or a hub dataset.
    Row numbers are 1-based: the line for JSON Lines, the record otherwise (CSV: the data row after the header)."""
    for name in source.paths():
        path = Path(name)
        if path.exists():
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _read_jsonl(path, on_bad_row, log)
            elif suffix == ".json":
                yield from _read_json(path, on_bad_row, log)
            elif suffix == ".csv":
                yield from _read_csv(path, on_bad_row, log)
            elif suffix == ".parquet":
                if _parquet_rows(path) != 0:  # (datasets fails on a file of no rows, as if it were damaged)
                    yield from _read_with_datasets(str(path), str(path), path="parquet", data_files=str(path),
                                                   split="train")
            else:
                raise DataError(f"{path}: unsupported data file type (use {', '.join(LOCAL_SUFFIXES)})")
            continue
        yield from _read_with_datasets(
            name, f"dataset {name!r} (split {source.split!r})", path=name, name=source.subset, split=source.split
        )


# --------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class Conversation:
    """A parsed row: messages plus how to render them ("raw_pr", "raw_hh" or "chat")."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    style: str
    context_turns: int = 0  # the first turns are context whatever data.train_on (a prompt column's, before its completion)
    whole_text: bool = False  # format text: a longer text is split into rows of max_length (`text_rows`), not cut


def detect_format(record: dict[str, Any], columns: Columns) -> str:
    """The format a record's keys indicate (raises BadRow when none fits). Never "text": plain text trains every
    token, human turns too, so it is chosen by data.format only (the error says so for a row with that column)."""
    if columns.messages in record:
        return "messages"
    if columns.prompt in record and columns.response in record:
        return "prompt_response"
    if columns.text in record:
        return "hh"
    plain = (f"; data.format: text trains the whole text of '{columns.document}' (every token: a pretraining "
             "corpus)" if columns.document in record else "")
    raise BadRow(
        f"cannot tell the data format from keys {sorted(record)}; expected '{columns.messages}', "
        f"'{columns.prompt}' + '{columns.response}', or '{columns.text}' (HH-RLHF text); set data.format/columns"
        f"{plain}"
    )


def _field(record: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    if key not in record:
        raise BadRow(f"missing key '{key}' (keys present: {', '.join(sorted(record)) or 'none'})")
    value = record[key]
    if value is None:
        raise BadRow(f"empty '{key}' (null)")
    if not isinstance(value, str):
        raise BadRow(f"'{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(f"empty '{key}'")
    return value


#: the bad-row reason of HH text in which no `\n\nHuman:` marker is found (CRLF or single newlines before the
#: markers, say): every stage refuses it, rather than reading the whole text as one system or prompt turn
NO_HUMAN_TURN = "no human turn: HH text needs '\\n\\nHuman:' / '\\n\\nAssistant:' markers"


def split_hh(text: str) -> list[tuple[str, str]]:
    """HH-RLHF dialogue text -> [(role, content)], content exactly as written after the `Human:` /
    `Assistant:` marker (leading space kept). Text before the first marker becomes a system turn.

    >>> split_hh("\\n\\nHuman: hi\\n\\nAssistant: hello")
    [('user', ' hi'), ('assistant', ' hello')]
    """
    parts = HH_MARKER.split(hh_text(text))
    turns: list[tuple[str, str]] = []
    if parts[0].strip():
        turns.append(("system", parts[0]))
    for marker, content in zip(parts[1::2], parts[2::2]):
        turns.append(("user" if marker == "Human" else "assistant", content))
    return turns


def hh_text(text: str) -> str:
    """HH text as every stage reads it: one that opens with its marker gets the blank line the format puts
    before every other marker."""
    return "\n\n" + text if text.startswith(("Human:", "Assistant:")) else text


def hh_dialogue(text: str) -> list[tuple[str, str]]:
    """`split_hh` of a whole HH dialogue (or prompt), which must hold a human turn (BadRow NO_HUMAN_TURN) and no
    marker after a single line break (`Human: hi\\nAssistant: hello`, CRLF text: the answer would be read as
    part of the human turn, and in a PPO prompt given to the policy)."""
    turns = split_hh(text)
    if not any(role == "user" for role, _ in turns):
        raise BadRow(NO_HUMAN_TURN)
    return check_hh_turns(turns)


def check_hh_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`turns` of HH text, refused (BadRow) when one holds a marker after a single line break."""
    for _, content in turns:
        if found := LONE_HH_MARKER.search(content):
            raise BadRow(f"a '{found.group(1)}:' marker after a single line break (HH-RLHF markers follow a blank "
                         f"line: '\\n\\n{found.group(1)}:'; CRLF text needs its line ends made \\n)")
    return turns


#: an HH marker that opens a line without the blank line before it (a single \n, or CRLF text)
LONE_HH_MARKER = re.compile(r"[\r\n](Human|Assistant):")


def parse_messages(record: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """`record[key]`, a non-empty list of {role: system|user|assistant, content: string}, as (role, content)."""
    value = record.get(key)
    if value is None:
        raise BadRow(f"missing key '{key}' (keys present: {', '.join(sorted(record)) or 'none'})")
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' must be a non-empty list of {{role, content}}")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            found = repr(m)[:40]
        elif m.get("role") not in ROLES:
            found = f"role {m.get('role')!r}"
        elif not isinstance(m.get("content"), str):
            content = m.get("content")
            found = ("content as a list of parts: give its text" if isinstance(content, list) else
                     f"content {type(content).__name__}" if "content" in m else "no content")
        else:
            turns.append((m["role"], m["content"]))
            continue
        raise BadRow(f"{key}[{i}] must be {{role: system|user|assistant, content: string}} (got {found})")
    return turns


def message_turns(record: dict[str, Any], key: str, role: str) -> list[tuple[str, str]]:
    """`record[key]` as turns: a message list (`parse_messages`), or a string as one turn of `role` (a user's may
    be empty)."""
    if isinstance(record.get(key), list):
        return parse_messages(record, key)
    return [(role, _field(record, key, allow_empty=role == "user"))]


def prompt_column_turns(record: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """`message_turns` of a prompt column: a message list there must end with a user turn (the responses follow
    it; a reply at its end would be read as context in one stage and dropped in another)."""
    turns = message_turns(record, key, "user")
    if turns[-1][0] != "user":
        raise BadRow(f"'{key}' must end with a user turn (the responses follow it), not {turns[-1][0]}")
    return turns


def _part(record: dict[str, Any], key: str) -> str:
    """`record[key]`, an optional part of a prompt: a string, null read as "" (a missing key is a BadRow)."""
    return "" if key in record and record[key] is None else _field(record, key, allow_empty=True)


def with_input(turns: list[tuple[str, str]], record: dict[str, Any], key: str | None) -> list[tuple[str, str]]:
    """The prompt column's `turns` with `record[key]` (data.columns.input: alpaca's input) joined to their last
    user turn after a blank line, `instruction + "\\n\\n" + input` (the input alone after an empty prompt);
    unchanged when `key` is None or the value is empty or whitespace.

    >>> with_input([("user", "Translate.")], {"input": "chat"}, "input")
    [('user', 'Translate.\\n\\nchat')]
    """
    extra = _part(record, key) if key is not None else ""
    if not extra.strip():
        return turns
    at = max(i for i, (role, _) in enumerate(turns) if role == "user")  # (a prompt column ends with a user turn)
    asked = turns[at][1]
    return turns[:at] + [("user", f"{asked}\n\n{extra}" if asked.strip() else extra)] + turns[at + 1:]


def unread_input(record: dict[str, Any], key: str | None, fmt: str) -> None:
    """A BadRow when data.columns.input names a column with text in a row of `fmt`, a format without a prompt
    column to join it to (messages, hh, text): it would be left out. A row without the column loses nothing."""
    if key is not None and key in record and _part(record, key).strip():
        raise BadRow(f"'{key}' (data.columns.input) is joined to a prompt column, which format {fmt} has none of: "
                     "its text would not be read")


def with_system(turns: Sequence[tuple[str, str]], record: dict[str, Any], key: str | None, chat: bool
                ) -> list[tuple[str, str]]:
    """`record[key]` (data.columns.system: orca's system) as a first system turn before `turns`, unchanged when
    `key` is None or the value is empty or whitespace. A BadRow when the turns are not rendered through the chat
    template (`chat`: plain text has no system turn) or already open with a system turn (two system prompts)."""
    system = _part(record, key) if key is not None else ""
    if not system.strip():
        return list(turns)
    if not chat:
        raise BadRow(f"'{key}' holds a system prompt, which plain text has no place for: data.use_chat_template: "
                     "true renders it as the system turn")
    if turns and turns[0][0] == "system":
        raise BadRow(f"a system prompt in '{key}' and a system turn in the conversation: give it in one place")
    return [("system", system), *turns]


def hh_field(record: dict[str, Any], key: str) -> str:
    """`record[key]`, HH-RLHF text: a message list there (an RM file's `chosen` read for SFT or PPO prompts) is a
    BadRow saying how to read it."""
    if isinstance(record.get(key), list):
        raise BadRow(f"'{key}' holds a message list, not HH-RLHF text: data.columns.messages: {key} reads it as a "
                     "conversation")
    return _field(record, key)


def parse_conversation(record: dict[str, Any], fmt: str, data: SFTDataConfig) -> Conversation:
    """One record -> Conversation, ending with a non-empty assistant turn (later turns are dropped).
    Raises BadRow with the reason."""
    cols = data.columns
    context = 0  # turns never trained
    if fmt == "prompt_response" and any(isinstance(record.get(k), list) for k in (cols.prompt, cols.response)):
        # TRL's conversational prompt-completion: message lists (a string is one user / assistant turn); only the
        # completion's replies are trained
        completion = message_turns(record, cols.response, "assistant")
        if all(role != "assistant" for role, _ in completion):
            raise BadRow(f"'{cols.response}' holds no assistant turn")
        asked = with_input(prompt_column_turns(record, cols.prompt), record, cols.input)
        turns, style, context = asked + completion, CHAT, len(asked)
    elif fmt == "prompt_response":
        asked = with_input([("user", _field(record, cols.prompt, allow_empty=True))], record, cols.input)
        turns = asked + [("assistant", _field(record, cols.response))]
        style = CHAT if data.use_chat_template else RAW_PR
    elif fmt == "hh":
        turns = hh_dialogue(hh_field(record, cols.text))
        style = RAW_HH
        if data.use_chat_template:
            turns = [(r, c.strip()) for r, c in turns]
            style = CHAT
    elif fmt == "messages":
        turns, style = parse_messages(record, cols.messages), CHAT
    elif fmt == "text":  # (plain text, never through the chat template: an empty prompt, the text its response)
        turns, style = [("user", ""), ("assistant", _field(record, cols.document))], RAW_PR
        if cols.system is not None and _part(record, cols.system).strip():
            raise BadRow(f"'{cols.system}' holds a system prompt, which format text does not read (plain text, "
                         "never rendered through the chat template)")
    else:
        raise ValueError(fmt)
    if not fmt.startswith("prompt"):
        unread_input(record, cols.input, fmt)
    with_own = with_system(turns, record, cols.system, style == CHAT)
    turns, context = with_own, context + len(with_own) - len(turns)
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise BadRow("no assistant turn")
    if not turns[last][1].strip():
        raise BadRow("empty response (last assistant turn)")
    return Conversation(tuple(turns[: last + 1]), style, context, whole_text=fmt == "text")


def load_conversations(
    source: DataSource, data: SFTDataConfig, log: BadRowLog
) -> list[tuple[Conversation, str]]:
    """All usable rows of `source` as (conversation, "file row N"); bad rows raise or are skipped."""
    out: list[tuple[Conversation, str]] = []
    fmt = AutoFormat(data.format)
    for row in read_rows(source, data.on_bad_row, log):
        where = f"{row.file} row {row.row}"
        try:
            row_fmt = fmt.of(row.data, lambda r: detect_format(r, data.columns))
            conv = parse_conversation(row.data, row_fmt, data)
        except BadRow as exc:
            _bad(where, f"{exc}{fmt.note()}", data.on_bad_row, log)
            continue
        fmt.keep(row_fmt, where)
        log.note_columns(row.data, data.columns, row.file)
        out.append((conv, where))
    if not out:
        raise DataError(f"no usable rows in {', '.join(source.paths())}{log.summary()}")
    return out


# --------------------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Segment:
    text: str
    train: bool
    #: (start, end) in `text` of each special-token string a message's content held ("<|im_end|>" quoted in a
    #: chat-template message): read as plain text, not as the control token (`text_ids`)
    plain: tuple[tuple[int, int], ...] = ()
    templated: bool = False  # rendered by a chat template (which may end a turn with "EOS\n": `encode_segments`)


#: a special-token string of a message's content stands as \ue000N\ue001 (private-use characters, in no chat
#: template) while the template renders, N indexing the strings swapped out, so that the template's own control
#: tokens can be told from the data's (`render_segments`)
_MARK = re.compile("\ue000(\\d+)\ue001")


#: tokenizer -> (its length, its `special_strings` pattern): built once per tokenizer (Llama 3 has 256 special
#: tokens; rebuilt for every row it cost more than the row's render), again when tokens are added
_SPECIALS: weakref.WeakKeyDictionary[Any, tuple[int, re.Pattern[str] | None]] = weakref.WeakKeyDictionary()


def special_strings(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern matching the strings the tokenizer reads as special (control) tokens, longest first; None when
    it has none (or is None)."""
    if tokenizer is None:
        return None
    try:
        size, pattern = _SPECIALS.get(tokenizer, (-1, None))
    except TypeError:  # (an object that cannot be weakly referenced: no caching)
        size, pattern = -1, None
    if size == len(tokenizer):
        return pattern
    found = set(getattr(tokenizer, "all_special_tokens", []))
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    found |= {t.content for t in added if getattr(t, "special", False)}
    found.discard("")
    # (the lookahead turns most positions away at their first character: an alternation of 256 strings alone
    # was tried at every character of every content)
    first = "".join(sorted({re.escape(t[0]) for t in found}))
    alternatives = "|".join(re.escape(t) for t in sorted(found, key=len, reverse=True))
    pattern = re.compile(f"(?=[{first}])(?:{alternatives})") if found else None
    try:
        _SPECIALS[tokenizer] = (len(tokenizer), pattern)
    except TypeError:
        pass
    return pattern


def mark_specials(text: str, pattern: re.Pattern[str], swapped: list[str]) -> str:
    """`text` with each special-token string swapped for a mark (`_MARK`) of its index in `swapped`."""
    def swap(match: re.Match[str]) -> str:
        swapped.append(match.group(0))
        return f"\ue000{len(swapped) - 1}\ue001"

    return pattern.sub(swap, text)


def unmark(text: str, swapped: list[str]) -> tuple[str, tuple[tuple[int, int], ...]] | None:
    """`text` with the marks swapped back, and the (start, end) of each swapped-back string; None when the
    template changed a mark (a private-use character left, an index out of range)."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = length = 0
    for match in _MARK.finditer(text):
        index = int(match.group(1))
        if index >= len(swapped):
            return None
        parts.append(text[pos:match.start()])
        length += match.start() - pos
        spans.append((length, length + len(swapped[index])))
        parts.append(swapped[index])
        length += len(swapped[index])
        pos = match.end()
    parts.append(text[pos:])
    out = "".join(parts)
    return None if "\ue000" in out or "\ue001" in out else (out, tuple(spans))


def render_segments(conv: Conversation, tokenizer: Any, train_on: str, specials_as_text: bool = True
                    ) -> list[Segment]:
    """Split a conversation's text into segments, marking the assistant turns that carry the loss.

    raw_pr: [prompt][response]; raw_hh: ["\\n\\nHuman:" + user + "\\n\\nAssistant:"][assistant]...;
    chat: differences of chat-template renders, so each trained assistant segment is exactly the template text of
    that turn (including its end-of-turn tokens) and everything else (system, user, generation prompt, turns not
    trained) is context: turn i's reply is render(turns[:i+1]) less render(turns[:i], generation prompt), cut
    where the later renders keep it (`kept_reply_end`: a closing EOS the template writes only at a
    conversation's end dropped), the text before it the latter less what the trained turn before it kept. Only
    the trained turns must render prefix by prefix: with last_turn (the RM's) a template that renders earlier
    replies otherwise once a later turn follows them (Qwen3's drops their think block) still gives the final
    reply after PPO's prompt.
    An empty assistant turn before the last is context (parse_conversation refuses an empty last one).
    """
    msgs = conv.messages
    assistant_idx = [i for i, (role, _) in enumerate(msgs) if role == "assistant"]
    trained = set(assistant_idx if train_on == "all_turns" else assistant_idx[-1:]) - set(range(conv.context_turns))
    trained -= {i for i in assistant_idx[:-1] if not msgs[i][1].strip()}  # an empty earlier reply teaches nothing
    #                                         but to stop at once (its template EOS would be the trained token)
    if conv.style == RAW_PR:
        return [Segment(msgs[0][1], False), Segment(msgs[1][1], True)]
    if conv.style == RAW_HH:
        segments: list[Segment] = []
        context = ""
        for i, (role, content) in enumerate(msgs):
            if role == "assistant":
                segments.append(Segment(context + "\n\nAssistant:", False))
                segments.append(Segment(content, i in trained))
                context = ""
            else:
                context += content if role == "system" else "\n\nHuman:" + content
        return segments

    def through_template(turns: Sequence[tuple[str, str]]) -> list[Segment]:
        as_dicts = [{"role": r, "content": c} for r, c in turns]
        renders = []  # (turn index, the text before the reply, the text through it) of each trained turn
        for i in sorted(trained):
            full = render_template(tokenizer, as_dicts[: i + 1])
            if i:
                prompt = render_template(tokenizer, as_dicts[:i], add_generation_prompt=True)
            else:  # an opening assistant turn: its header (and a default system prompt) is context too
                prompt = opening_context(tokenizer, full)
            if not full.startswith(prompt):
                raise BadRow(unmaskable_reason(tokenizer, as_dicts[: i + 1]))
            renders.append((i, prompt, full))
        out: list[Segment] = []
        done = ""
        for k, (i, prompt, full) in enumerate(renders):
            # an earlier reply is trained as the later renders keep it (Phi-3's closing EOS dropped)
            end = len(full) if k + 1 == len(renders) else kept_reply_end(
                full, renders[k + 1][1], len(prompt), tokenizer,
                lambda i=i: render_template(tokenizer, as_dicts[: i + 1], add_generation_prompt=True))
            out.append(Segment(prompt[len(done):], False, templated=True))
            out.append(Segment(full[len(prompt):end], True, templated=True))
            done = full[:end]
        kept = [seg for seg in out if seg.text]
        if not any(seg.train for seg in kept):  # (a template that prints the user's turns only)
            raise BadRow("the chat template renders nothing of the assistant reply: no token to train on")
        return kept

    return with_plain_specials(msgs, tokenizer, through_template, specials_as_text)


def unmaskable_reason(tokenizer: Any, turns: list[dict[str, str]]) -> str:
    """Why the render of `turns` (ending with the reply to train) does not begin with the render of the turns before
    it with the generation prompt; said more closely when the system turn alone causes it (Mistral's templates
    write the system prompt before the last user turn only: no trained reply ever follows it)."""
    reason = ("the chat template's render of an assistant reply does not begin with its render of the conversation "
              "before it with the generation prompt; cannot mask turns")
    rest = turns[1:]
    if turns[0]["role"] != "system" or len(rest) < 2:
        return reason
    if render_template(tokenizer, rest).startswith(render_template(tokenizer, rest[:-1], add_generation_prompt=True)):
        return (f"{reason}: it renders the system prompt otherwise once a reply follows (Mistral's templates write "
                "it before the last user turn only, so no trained reply sees it); train such rows without their "
                "system turn (or data.columns.system), or give a data.chat_template that keeps it")
    return reason


def kept_reply_end(full: str, later: str, start: int, tokenizer: Any, continued: Callable[[], str]) -> int:
    """Where an earlier assistant reply ends as a later render keeps it: `full` is the template's render through
    the reply (which begins at `start`), `later` its render of the conversation up to the next trained reply,
    `continued()` its render through the reply with the generation prompt after it. len(full) when `later`
    begins with it; else `full` less the special-token strings and whitespace it closes with, when the template
    writes them only where a conversation ends — `later` and `continued()` both lack them (Phi-3's EOS:
    "…<|end|>\n<|endoftext|>" becomes "…<|end|>\n<|user|>…"). A reply rendered otherwise (Qwen3's drops its
    think block once a later turn follows; a template that closes it with another token then) is a BadRow: the
    replies cannot be trained apart."""
    specials = special_strings(tokenizer)
    closing = re.compile(rf"(?:\s|{specials.pattern})\Z" if specials else r"\s\Z")
    end = len(full)
    while end > start and not later.startswith(full[:end]):
        match = closing.search(full, 0, end)
        end = match.start() if match else start
    if end == len(full):
        return end
    if end > start:
        with_prompt = continued()
        if with_prompt.startswith(full[:end]) and not with_prompt.startswith(full):
            return end
    raise BadRow("the chat template renders an earlier assistant reply otherwise once a later turn follows it, so "
                 "the replies cannot be trained apart: data.train_on last_turn trains the final reply of such rows, "
                 "as with Qwen3's template, which drops the reply's think block")


#: the day a chat template's `strftime_now` sees (Friday 26 July 2024, the date Llama-3.1's template writes when
#: given none), as a macro of that name put before the template: transformers gives templates the current time,
#: so Llama-3.2's "Today Date:" (Mistral-Small's, Granite's system prompts likewise) would differ between data
#: rendered for SFT one day and PPO prompts another, or a run and its resume. Common directives are filled in,
#: "%%" is "%"; any other stays as written (the same every day). The macro's end keeps the whitespace that
#: opens the template ("+%}": not trimmed)
FIXED_DAY = {"%-d": "26", "%d": "26", "%e": "26", "%j": "208", "%b": "Jul", "%B": "July", "%-m": "7", "%m": "07",
             "%Y": "2024", "%y": "24", "%A": "Friday", "%a": "Fri", "%H": "00", "%I": "12", "%M": "00",
             "%S": "00", "%p": "AM"}
_PERCENT = "\u2063percent\u2063"  # stands for "%%" while the directives are filled in (in no real format)
TEMPLATE_CLOCK = (f"{{%- macro strftime_now(format) -%}}{{{{ format|replace('%%', '{_PERCENT}')"
                  + "".join(f"|replace('{code}', '{value}')" for code, value in FIXED_DAY.items())
                  + f"|replace('{_PERCENT}', '%') }}}}{{%- endmacro +%}}")


def render_template(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """`tokenizer.apply_chat_template` as text, a template that reads the date given the same day whenever it
    runs (`TEMPLATE_CLOCK`). A template that refuses the conversation (its raise_exception: roles that do not
    alternate, a system turn it does not take) makes the row a BadRow naming its reason, which data.on_bad_row
    stops at or skips, rather than a traceback."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        if "strftime_now" in str(getattr(tokenizer, "chat_template", None) or ""):
            kwargs["chat_template"] = TEMPLATE_CLOCK + tokenizer.get_chat_template()
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateSyntaxError as exc:  # the template itself, not this row
        raise DataError(f"the chat template is not valid Jinja (data.chat_template, or the tokenizer's): {exc}") from None
    except TemplateError as exc:
        raise BadRow(f"the chat template refuses it: {exc}") from None
    except ValueError:
        if getattr(tokenizer, "chat_template", None):
            raise
        # (transformers: "Cannot use chat template functions because tokenizer.chat_template is not set ...")
        raise DataError("the tokenizer has no chat template to render this row through: give one "
                        "(data.chat_template; rlhf eval: --set data.chat_template=...), or plain-text prompts "
                        "(format prompt or hh with data.use_chat_template false)") from None


def with_plain_specials(turns: Sequence[tuple[str, str]], tokenizer: Any,
                        render: Callable[[Sequence[tuple[str, str]]], list[Segment]], as_text: bool = True
                        ) -> list[Segment]:
    """`render(turns)` (a chat template's render of the (role, content) turns, as segments) with each special-token
    string inside a content recorded in its segment's `plain` spans, to be read as text: only the template's own
    control tokens are control tokens (a scraped reply quoting "<|endoftext|>" must not teach the model to stop
    there, nor a user turn end the turn). The strings are swapped for marks while the template renders, then
    back; unless that gives the template's own render of the turns (a template that changes or cuts the content),
    the turns are read as they render, control tokens and all — as they are with `as_text` off
    (data.content_special_tokens: control)."""
    pattern = special_strings(tokenizer) if as_text else None
    swapped: list[str] = []
    marked = [(role, mark_specials(content, pattern, swapped)) for role, content in turns] if pattern else turns
    segments = render(turns)
    if not swapped:
        return segments
    try:
        back = [unmark(seg.text, swapped) for seg in render(marked)]  # (a rare row: the second render costs little)
    except Exception:  # noqa: BLE001 - the template refuses the marked content (BadRow, its raise_exception)
        return segments  # that it rendered as it is: read as it renders
    spans = [b[1] for b, seg in zip(back, segments) if b is not None and b[0] == seg.text]
    if len(spans) != len(segments) or len(back) != len(segments):
        return segments
    return [Segment(seg.text, seg.train, plain, seg.templated) for seg, plain in zip(segments, spans)]


#: stands for an assistant turn's content in `opening_context` (invisible separators: in no real text)
_CONTENT_MARK = "\u2063rlhf-content\u2063"


def opening_context(tokenizer: Any, full: str) -> str:
    """What the chat template writes before the content of a conversation's opening assistant turn (its header,
    and any system prompt the template adds by default): the template's render of that turn with a marker for
    its content, cut at the marker. "" when the template does not show the content verbatim or writes something
    else before it for the real content (then the whole render is the turn, as before)."""
    probe = render_template(tokenizer, [{"role": "assistant", "content": _CONTENT_MARK}])
    head = probe[:probe.index(_CONTENT_MARK)] if _CONTENT_MARK in probe else ""
    return head if full.startswith(head) else ""


# --------------------------------------------------------------------------------------------- tokenizing
def cut_warning(counts: dict[str, int], total: int, what: str, limit: str) -> str | None:
    """A warning when more than half of `total` items had some part cut (`counts`: part -> items cut there):
    the data is mostly trained on as cut.

    >>> cut_warning({"prompts": 3, "responses": 1}, 4, "examples", "data.max_length")
    'most of the 4 examples were cut to data.max_length (3 prompts, 1 responses): raise it unless that is meant'
    >>> cut_warning({"prompts": 2}, 4, "prompts", "data.max_prompt_length") is None
    True
    """
    if not total or 2 * max(counts.values(), default=0) <= total:
        return None
    parts = ", ".join(f"{n} {part}" for part, n in counts.items())
    return f"most of the {total} {what} were cut to {limit} ({parts}): raise it unless that is meant"


def skip_warning(reasons: dict[str, int], read: int) -> str | None:
    """A warning when most of the `read` rows of a source were skipped as bad rows (data.on_bad_row: skip;
    `reasons`: reason -> rows): the run trains on what is left of data it mostly could not read.

    >>> skip_warning({"empty response": 1, "invalid JSON": 5}, 10)
    '6 of the 10 rows read were skipped as bad rows, most for: invalid JSON; mend the data or what the reason names'
    >>> skip_warning({"invalid JSON": 5}, 10) is None
    True
    """
    skipped = sum(reasons.values())
    if 2 * skipped <= read:
        return None
    commonest = max(reasons, key=lambda reason: reasons[reason])
    return (f"{skipped} of the {read} rows read were skipped as bad rows, most for: {commonest}; mend the data or "
            "what the reason names")


def unread_warning(unread: list[str]) -> str | None:
    """A warning naming the prompt-part columns no data.columns key names (`BadRowLog.note_columns`); None for none.

    >>> unread_warning(["input"])[:60]
    "column 'input' is not read (no data.columns key names it): i"
    >>> unread_warning(["system", "context"])[:61]
    "columns 'system', 'context' are not read (no data.columns key"
    """
    if not unread:
        return None
    names = ", ".join(f"'{key}'" for key in unread)
    one = len(unread) == 1
    return (f"column{'' if one else 's'} {names} {'is' if one else 'are'} not read (no data.columns key names "
            f"{'it' if one else 'them'}): if {'it is' if one else 'they are'} part of the prompt, data.columns.input "
            "names a column joined after the prompt's text, data.columns.system one given as the system turn")


def count_in_train(train: Iterable[Hashable], held: Iterable[Hashable]) -> int:
    """How many of the eval split's examples (`held`, each by a key of its content) equal a training example's: a
    separate eval file that repeats training rows, or a row repeated in the data and split across a held-out
    fraction, makes the eval loss or accuracy partly a measure of memory.

    >>> count_in_train(["a", "b", "b"], ["b", "c", "b"])
    2
    """
    seen = set(train)
    return sum(key in seen for key in held)


def special_note(count: int) -> str:
    """"; N with special-token text in a message, read as text" for a data report, "" for none."""
    return f"; {count} with special-token text in a message, read as text" if count else ""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool = False
    response_truncated: bool = False
    special_as_text: bool = False  # a message's content held a special-token string, read as text (Segment.plain)


def bos_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before a text by itself (e.g. Llama's BOS); [] for most chat tokenizers."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:n + len(plain)] == plain else []


def text_ids(tokenizer: Any, text: str, plain: Sequence[tuple[int, int]] = (), with_offsets: bool = False
             ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no BOS/EOS added) and, `with_offsets` or for `plain` spans, each token's (start, end)
    characters ([] from a slow tokenizer, or else). A special token lying over a `plain` span (a special-token
    string from the data, `with_plain_specials`) becomes that text's ordinary tokens (`as_text`), each given the
    special token's span. (A slow tokenizer, without offsets, keeps them as control tokens: `reads_plain_spans`.)"""
    fast = reads_plain_spans(tokenizer)
    offsets_too = fast and (with_offsets or bool(plain))  # (the tokenizer call as before for the rows without)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets_too)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]] if offsets_too else []
    if not plain or not fast:
        return ids, offsets
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    spans = iter(sorted(plain))
    span = next(spans, None)
    for token, (begin, end) in zip(ids, offsets):
        while span is not None and span[1] <= begin:  # (a span no token lies over: the tokenizer read it as text)
            span = next(spans, None)
        if span is not None and begin <= span[0] and span[1] <= end:
            ordinary = as_text(tokenizer, text[begin:end])
            out_ids += ordinary
            out_offsets += [(begin, end)] * len(ordinary)
            span = next(spans, None)
            continue
        out_ids.append(token)
        out_offsets.append((begin, end))
    return out_ids, out_offsets


def reads_plain_spans(tokenizer: Any) -> bool:
    """Whether `text_ids` reads `plain` spans as text (a fast tokenizer: it has the offsets to find them)."""
    return bool(getattr(tokenizer, "is_fast", False))


def specials_read_as_text(tokenizer: Any, segments: Sequence[Segment]) -> bool:
    """Whether a message's special-token string in `segments` is read as text (what the data reports count)."""
    return reads_plain_spans(tokenizer) and any(seg.plain for seg in segments)


#: what `after_lead` tokenizes before a text, so that it is not the start of a text (a SentencePiece-style
#: tokenizer puts a word-start "▁" there, i.e. a space the data does not have): the first of them that does not
#: merge with the text (a vocabulary may hold "\nParis")
_LEADS = ("\n", ".", "\t", "0")


def after_lead(ids_of: Callable[[str, int], list[int]], text: str) -> list[int]:
    """The tokens of `text` as it reads in the middle of a text: those of `lead + text` after the lead's own
    tokens, for the first of `_LEADS` whose tokens come first unchanged there (it did not merge with the text);
    the tokens of `text` alone when every lead merged. `ids_of(piece, at)` tokenizes `piece`, in which `text`
    starts at character `at`."""
    for lead_text in _LEADS:
        at = len(lead_text)
        lead, led = ids_of(lead_text, at), ids_of(lead_text + text, at)
        if led[:len(lead)] == lead and len(led) > len(lead):
            return led[len(lead):]
    return ids_of(text, 0)


def as_text(tokenizer: Any, text: str) -> list[int]:
    """The ordinary tokens of `text` (a special-token string from the data, with whatever whitespace the special
    token absorbed), tokenized as it reads in the middle of a text (`after_lead`)."""
    return after_lead(lambda piece, _: tokenizer(piece, add_special_tokens=False, split_special_tokens=True)[
        "input_ids"], text)


def opens_with_bos(tokenizer: Any, seg: Segment) -> bool:
    """Whether the segment's text already starts with the tokenizer's BOS token (it then gets no second one); a
    BOS string from a message's content, read as text, is no BOS."""
    bos = tokenizer.bos_token
    return bool(bos) and seg.text.startswith(bos) and not (reads_plain_spans(tokenizer) and seg.plain
                                                          and seg.plain[0][0] == 0)


def segment_token_ids(segments: list[Segment], tokenizer: Any) -> list[list[int]]:
    """The token ids of each segment, such that the tokens before the last trained segment (the response) are
    exactly the tokenization of the text before it, the PPO prompt (tokenized at once), and the response starts
    with its own first token.

    With a fast tokenizer (offsets), from ONE tokenization of the joined text when it allows that: no token runs
    across the response's start, and the tokens before it are the prompt's own. Else the prompt text and the
    response are tokenized apart (a prompt ending in a space that a byte-level tokenizer joins to the next word,
    or a SentencePiece-style one to the next word's "▁"), the response and any segment after it as each reads in
    the middle of a text (`after_lead`): alone, a SentencePiece-style tokenizer (Llama, Mistral: Metaspace)
    would give it a word-start "▁", a space the data does not have ("Answer: " + "Four." trained as the tokens
    "Answer:", "▁", "▁Four", ".": two spaces). Within a tokenization, each token goes to the segment its first character is in, except one
    running into an earlier trained segment (an earlier assistant turn, part of the PPO prompt), which goes to
    that turn and is trained: it holds the turn's first word. (A token running from a response into the
    context after it, e.g. "?\n\n", stays with the response.)

    Slow tokenizers (no offsets) go segment by segment, each after some text as it reads mid-text."""
    def mid_text(seg: Segment) -> list[int]:
        return after_lead(lambda piece, at: text_ids(tokenizer, piece, [(a + at, b + at) for a, b in seg.plain])[0],
                          seg.text)

    if not getattr(tokenizer, "is_fast", False) or not segments:
        out, opening = [], True  # (no text before the segment yet: it starts the text)
        for seg in segments:
            out.append(text_ids(tokenizer, seg.text, seg.plain)[0] if opening else mid_text(seg))
            opening = opening and not seg.text
        return out
    starts, at = [], 0
    for seg in segments:
        starts.append(at)
        at += len(seg.text)
    last = max((i for i, seg in enumerate(segments) if seg.train), default=0)
    cut = starts[last]  # where the response starts
    trained = sorted({start for start, seg in zip(starts, segments) if seg.train and seg.text})
    plain = [(start + a, start + b) for start, seg in zip(starts, segments) for a, b in seg.plain]
    text = "".join(seg.text for seg in segments)

    def assign(ids: list[int], offsets: list[tuple[int, int]], count: int) -> list[list[int]]:
        """The tokens of the first `count` segments' text, each to its segment (a space trimmed from the offsets
        of a token at the text's end may put it at the end: it stays in the last segment)."""
        out: list[list[int]] = [[] for _ in segments[:count]]
        for token, (begin, end) in zip(ids, offsets):
            after = bisect.bisect_right(trained, begin)
            into = trained[after] if after < len(trained) and trained[after] < end else begin
            out[min(count - 1, max(0, bisect.bisect_right(starts, into) - 1))].append(token)
        return out

    ids, offsets = text_ids(tokenizer, text, plain, with_offsets=True)
    before = sum(begin < cut for begin, _ in offsets)
    prompt_ids, prompt_offsets = text_ids(tokenizer, text[:cut], [s for s in plain if s[1] <= cut], with_offsets=True)
    if ids[:before] == prompt_ids and not any(begin < cut < end for begin, end in offsets):
        return assign(ids, offsets, len(segments))
    return assign(prompt_ids, prompt_offsets, last) + [mid_text(seg) for seg in segments[last:]]


#: tokens at the end of a trained segment among which a chat template's own EOS is looked for ("<|im_end|>\n")
TEMPLATE_TAIL = 3


def encode_segments(
    segments: list[Segment], tokenizer: Any, add_eos: bool, bos: list[int]
) -> tuple[TokenizedExample, int]:
    """Token ids and labels (IGNORE on context tokens) of one conversation, untruncated, and the prompt length:
    the number of tokens before the last trained segment."""
    ids: list[int] = []
    labels: list[int] = []
    if bos and not (segments and opens_with_bos(tokenizer, segments[0])):
        ids += bos
        labels += [IGNORE] * len(bos)
    split = 0
    last_ids: list[int] = []
    last_trained = max(i for i, s in enumerate(segments) if s.train)
    for i, seg_ids in enumerate(segment_token_ids(segments, tokenizer)):
        if i == last_trained:
            split, last_ids = len(ids), seg_ids
        ids += seg_ids
        labels += seg_ids if segments[i].train else [IGNORE] * len(seg_ids)
    eos = tokenizer.eos_token_id
    # a template may end the turn with "EOS\n" (ChatML): no second EOS; only the segment's last tokens count (a raw
    # response's last one), so an EOS string inside a raw response (scraped text quoting "<|endoftext|>", which a
    # raw row keeps as the control token) does not stand for the end
    tail = TEMPLATE_TAIL if segments[last_trained].templated else 1
    if add_eos and eos not in last_ids[-tail:]:
        ids.append(eos)
        labels.append(eos if segments[-1].train else IGNORE)
    if labels:  # nothing before the first token predicts it (an empty prompt, no BOS): no loss there, and
        labels[0] = IGNORE  # packed, none from the previous example's end either
    return TokenizedExample(ids, labels, special_as_text=specials_read_as_text(tokenizer, segments)), split


def prompt_cut(prompt_len: int, total: int, max_length: int, prompt_budget: int) -> int:
    """Tokens to drop from the left of the prompt: as many as the overflow needs, but the prompt keeps at
    least min(prompt_len, prompt_budget) tokens (the response is cut from the right after that)."""
    if total <= max_length:
        return 0
    return prompt_len - max(prompt_len - (total - max_length), min(prompt_len, prompt_budget))


def bos_head(ids: list[int], bos: list[int]) -> int:
    """How many leading tokens of `ids` are the tokenizer's BOS (kept when the prompt is cut from the left)."""
    return len(bos) if bos and ids[:len(bos)] == bos else 0


def truncate_example(ex: TokenizedExample, cut: int, max_length: int, head: int = 0) -> TokenizedExample:
    """Drop `cut` tokens from the left, after the first `head` (the BOS, which models of the Llama family expect
    at position 0), then keep at most `max_length` tokens from the left. The first token keeps no label
    (nothing before it predicts it), also when the cut makes an earlier turn's trained token the first; after
    a kept BOS, the token the BOS predicts keeps its label."""
    ids, labels = ex.input_ids, ex.labels
    if cut:
        ids, labels = ids[:head] + ids[head + cut:], labels[:head] + labels[head + cut:]
        if labels:
            labels[0] = IGNORE
    return TokenizedExample(ids[:max_length], labels[:max_length], prompt_truncated=cut > 0,
                            response_truncated=len(ids) > max_length, special_as_text=ex.special_as_text)


def text_rows(ex: TokenizedExample, max_length: int) -> list[TokenizedExample]:
    """A whole text's tokens (format text, untruncated) as rows of at most `max_length` tokens that overlap by one:
    row k holds tokens [k (L - 1), k (L - 1) + L) with L = max_length, and its first token carries no label (the
    row before it trained that token), so every label of the text is trained exactly once and none is lost. A
    last row holding only the overlap token (no label) is left out.

    >>> [r.input_ids for r in text_rows(TokenizedExample([1, 2, 3, 4, 5, 6], [-100, 2, 3, 4, 5, 6]), 3)]
    [[1, 2, 3], [3, 4, 5], [5, 6]]
    """
    step = max_length - 1
    rows = []
    for start in range(0, max(1, len(ex.input_ids) - 1), step):
        ids = ex.input_ids[start:start + max_length]
        labels = ex.labels[start:start + max_length]
        rows.append(TokenizedExample(ids, labels if start == 0 else [IGNORE] + labels[1:],
                                     special_as_text=ex.special_as_text))
    return rows


def tokenize_segments(
    segments: list[Segment], tokenizer: Any, max_length: int, prompt_budget: int, add_eos: bool, bos: list[int]
) -> TokenizedExample:
    """Token ids and labels (IGNORE on context tokens) for one conversation, truncated to `max_length`.

    prompt = the tokens before the last trained segment, response = the rest. When too long, the prompt loses
    tokens from the left, down to `prompt_budget` tokens at least; then the response loses tokens from the right.
    """
    ex, prompt_len = encode_segments(segments, tokenizer, add_eos, bos)
    cut = prompt_cut(prompt_len, len(ex.input_ids), max_length, prompt_budget)
    return truncate_example(ex, cut, max_length, bos_head(ex.input_ids, bos))


class TokenRows:
    """Tokenized rows stored compactly (int32 arrays + offsets): row i is {input_ids, labels[, position_ids]}."""

    def __init__(self, with_positions: bool) -> None:
        self.ids = array("i")
        self.labels = array("i")
        self.positions = array("i") if with_positions else None
        self.offsets = [0]

    def append(self, ids: list[int], labels: list[int], positions: list[int] | None = None) -> None:
        self.ids.extend(ids)
        self.labels.extend(labels)
        if self.positions is not None:
            self.positions.extend(positions if positions is not None else range(len(ids)))
        self.offsets.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        a, b = self.offsets[i], self.offsets[i + 1]
        row = {"input_ids": self.ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}
        if self.positions is not None:
            row["position_ids"] = self.positions[a:b].tolist()
        return row

    def tokens(self, i: int) -> int:
        return self.offsets[i + 1] - self.offsets[i]


def pack_examples(examples: Iterable[TokenizedExample], max_length: int) -> TokenRows:
    """Greedy, order-preserving packing into rows of at most `max_length` tokens.

    position_ids restart at 0 for every example; with attention_mask=None transformers turns such rows into a
    block-diagonal causal mask, so examples never attend to each other."""
    rows = TokenRows(with_positions=True)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(ids, labels, positions)
            ids, labels, positions = [], [], []
        ids += ex.input_ids
        labels += ex.labels
        positions += range(len(ex.input_ids))
    if ids:
        rows.append(ids, labels, positions)
    return rows


@dataclass
class DataReport:
    """What data loading did, printed at start and saved as data_report.json."""

    skipped_rows: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    examples: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packed_rows: int | None = None
    identical_pairs: int = 0  # preference data: pairs dropped because chosen == rejected
    identical_after_truncation: int = 0  # ... of which made identical by max_length (their difference cut away)
    duplicate_pairs: int = 0  # preference data: repeats of an earlier pair dropped (data.duplicates: drop)
    context_cut_pairs: int = 0  # preference data: pairs differing before the final turn whose difference max_length cut
    no_room_pairs: int = 0  # preference data: pairs whose kept context filled max_length (no response token left)
    prompt_repeats: int = 0  # preference data: pairs whose responses both begin with the prompt text (`repeats_prompt`)
    styles: dict[str, int] = field(default_factory=dict)  # examples per rendering style (stages/rendering.py)
    special_as_text: int = 0  # examples (pairs) with a special-token string in a message's content, read as text
    in_train: int = 0  # eval split: examples (pairs) whose messages equal a training example's (`count_in_train`)
    unread_columns: list[str] = field(default_factory=list)  # prompt-part columns no data.columns key names
    source_rows: int = 0  # rows of the split's source read, bad ones too (before a validation share was held out)
    cautions: list[str] = field(default_factory=list)  # what the settings may read wrongly, said as warnings
    split_texts: int = 0  # format text: texts longer than max_length, split into several rows (`text_rows`)

    @classmethod
    def from_log(cls, log: BadRowLog, usable: int) -> DataReport:
        """The report of a source read with `log`, which gave `usable` rows (before any split)."""
        report = cls(source_rows=log.total + usable)
        report.count_skipped(log)
        return report

    def cut_warning(self, what: str = "examples") -> str | None:
        """`cut_warning` of the examples (`what`: "pairs" for preference data) whose prompt, or response, was cut
        to the length limits."""
        return cut_warning({"prompts": self.prompt_truncated, "responses": self.response_truncated}, self.examples,
                           what, "data.max_length (or data.max_prompt_length)")

    def skip_warning(self) -> str | None:
        """`skip_warning` of the rows skipped among those read (without a count of them: skipped and kept)."""
        return skip_warning(self.skipped_by_reason, self.source_rows or self.skipped_rows + self.examples)

    def unread_warning(self) -> str | None:
        """`unread_warning` of the report's unread prompt-part columns."""
        return unread_warning(self.unread_columns)

    def notes(self) -> str:
        """The report's closing notes: special-token text read as text, eval examples also in the training data,
        texts split into rows (format text), skipped rows."""
        seen = f"; {self.in_train} also in the training data (scored on what was trained on)" if self.in_train else ""
        split = f"; {self.split_texts} text(s) longer than a row split into several" if self.split_texts else ""
        return f"{special_note(self.special_as_text)}{seen}{split}{self.skipped_note()}"

    def skipped_note(self) -> str:
        """", skipped N bad row(s) (reason: n; ...)" or "" when nothing was skipped."""
        if not self.skipped_rows:
            return ""
        reasons = "; ".join(f"{k}: {v}" for k, v in self.skipped_by_reason.items())
        return f", skipped {self.skipped_rows} bad row(s) ({reasons})"

    def count_skipped(self, log: BadRowLog) -> None:
        self.unread_columns += [key for key in log.unread if key not in self.unread_columns]
        self.skipped_rows += log.total
        for reason, n in log.reasons.items():
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + n

    def count_style(self, style: str) -> None:
        self.styles[style] = self.styles.get(style, 0) + 1

    def add(self, ex: TokenizedExample, style: str) -> None:
        self.examples += 1
        self.count_style(style)
        self.prompt_truncated += ex.prompt_truncated
        self.response_truncated += ex.response_truncated
        self.special_as_text += ex.special_as_text
        self.tokens += len(ex.input_ids)
        self.trained_tokens += sum(1 for t in ex.labels if t != IGNORE)


def tokenize_conversations(
    convs: Iterable[tuple[Conversation, str]], tokenizer: Any, data: SFTDataConfig, report: DataReport
) -> TokenRows:
    """Tokenized rows ready for batching (packed when data.packing); counts go into `report`."""
    bos = bos_ids(tokenizer)
    log = BadRowLog()

    def examples() -> Iterator[TokenizedExample]:
        for conv, where in convs:
            try:
                segments = render_segments(conv, tokenizer, data.train_on, data.content_special_tokens == "text")
            except BadRow as exc:
                _bad(where, str(exc), data.on_bad_row, log)
                continue
            if conv.whole_text:  # (split into rows, never cut)
                parts = text_rows(encode_segments(segments, tokenizer, data.add_eos, bos)[0], data.max_length)
                report.split_texts += len(parts) > 1
            else:
                parts = [tokenize_segments(segments, tokenizer, data.max_length, data.prompt_budget, data.add_eos,
                                           bos)]
            if all(t == IGNORE for ex in parts for t in ex.labels):
                _bad(where, "no response token left after truncation", data.on_bad_row, log)
                continue
            for ex in parts:
                report.add(ex, conv.style)
                yield ex

    if data.packing:
        rows = pack_examples(examples(), data.max_length)
        report.packed_rows = len(rows)
    else:
        rows = TokenRows(with_positions=False)
        for ex in examples():
            rows.append(ex.input_ids, ex.labels)
    report.count_skipped(log)
    return rows


def corpus_texts(convs: Iterable[tuple[Conversation, str]]) -> Iterator[str]:
    """Text of each conversation as the model will see it (raw styles), or its turns' contents (chat style);
    used to train a tokenizer."""
    for conv, _ in convs:
        if conv.style == CHAT:
            yield "\n".join(content for _, content in conv.messages)
        else:
            yield "".join(seg.text for seg in render_segments(conv, None, "all_turns"))
