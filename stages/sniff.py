"""A quick look at a stage's data before any model loads: the first rows of each local data file, parsed as
the stage's run parses them (no tokenizer, no hub download).

`rlhf sft|train-rm|ppo` look before they launch (and in --dry-run), `rlhf pipeline` looks at every stage's data
before its first stage trains: an RM config pointed at SFT conversations, or a `data.format`/`data.columns`
that matches no row, then fails in seconds, not after the SFT stage's hours or a DeepSpeed launch. A file
some of whose first rows are bad but others good passes: judging those is `data.on_bad_row`'s job, in the run
(or `--check-data`, which reads every row and tokenizes it).
"""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from stages.config import DataSource, PPODataConfig, RMDataConfig, SFTDataConfig
from stages.data import BadRow, BadRowLog, Row, detect_format, parse_conversation, read_rows
from stages.errors import DataError
from stages.pairs import IdenticalPair, detect_pair_format, parse_pair
from stages.ppo.prompts import detect_prompt_format, parse_prompt, ptx_data_config, ptx_wording

#: records read from the top of each local data file
SNIFF_ROWS = 20

Parse = Callable[[dict[str, Any]], object]


def sniff_file(source: DataSource, parse: Parse, what: str, settings: str, rows: int = SNIFF_ROWS) -> None:
    """Parse the first `rows` records of `source` (one local file; a hub dataset is not read) with `parse`,
    which raises BadRow for a record it cannot use. Raises DataError when none of them parses, naming the first
    record's reason and the `settings` that choose how records are read, or when there is none (an empty file:
    a data-preparation step that failed); returns at the first that does."""
    if not all(Path(p).exists() for p in source.paths()):
        return
    log = _HeadLog(rows)
    first, tried = "", 0
    try:
        for row in islice(_head(source, rows, log), rows):
            try:
                parse(row.data)
                return
            except BadRow as exc:
                first, tried = first or f"row {row.row}: {exc}", tried + 1
    except _Unreadable:  # as many unreadable lines as records looked at: a file of another kind
        pass
    if tried:
        which = f"the first {tried}" if tried == rows else f"the {tried}"
        raise DataError(f"none of {which} rows of {source.paths()[0]} is {what} ({first}): is it another "
                        f"stage's data? If not, set {settings} to read it{log.summary()}")
    if log.total:  # not one readable record (the run would say "no usable rows" after reading it all)
        among = f" among its first {log.total} lines" if log.total == rows else ""
        raise DataError(f"{source.paths()[0]}: no readable row{among}{log.summary()}")
    raise DataError(f"{source.paths()[0]}: no record in it (an empty file, blank lines only, or no rows)")


class _Unreadable(Exception):
    """`_HeadLog` is full."""


class _HeadLog(BadRowLog):
    """A BadRowLog that stops the reading at its `limit`-th unreadable record (a large file of another kind,
    CSV or binary, is not read to its end to find it has no JSON row)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def add(self, reason: str) -> None:
        super().add(reason)
        if self.total >= self.limit:
            raise _Unreadable


#: how much of a .json file holding one JSON array the look reads for its first records
JSON_WINDOW = 8 * 2**20
#: what lies between two items of a JSON array (and before its `[`)
_BETWEEN_ITEMS = re.compile(r"[\s,]*")


def _head(source: DataSource, rows: int, log: BadRowLog) -> Iterator[Row]:
    """The first records of a local file: a parquet file's first row group batch through pyarrow (read_rows
    would have `datasets` convert the whole file first), a large .json array's from its first JSON_WINDOW
    (`_json_array_head`; read_rows parses the whole file), every other kind through read_rows."""
    path = Path(source.paths()[0])
    if path.suffix.lower() == ".json" and path.stat().st_size > JSON_WINDOW:
        head = _json_array_head(path, rows)
        if head is not None:
            return iter(head)
    if path.suffix.lower() != ".parquet":
        return read_rows(source, "skip", log)
    import pyarrow.parquet as pq

    try:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=rows), None)
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, ...
        raise DataError(f"{path}: cannot read it as parquet ({exc})") from None
    return iter([Row(record, str(path), i) for i, record in enumerate(batch.to_pylist() if batch else [], start=1)])


def _json_array_head(path: Path, rows: int) -> list[Row] | None:
    """The object records among the first `rows` items of a .json file holding one JSON array, parsed from its
    first JSON_WINDOW characters (a multi-GB file is not read whole for a look at its top); None when it holds
    no array (JSON Lines, read line by line anyway) or no item ends inside the window (nothing to tell)."""
    import json

    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        text = fh.read(JSON_WINDOW)
    decoder, pos = json.JSONDecoder(), _BETWEEN_ITEMS.match(text).end()
    if not text.startswith("[", pos):
        return None
    pos += 1
    found: list[Row] = []
    for index in range(1, rows + 1):
        pos = _BETWEEN_ITEMS.match(text, pos).end()
        if text.startswith("]", pos):
            break
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # cut by the window, or invalid: the run's reading says which
            break
        if isinstance(item, dict):
            found.append(Row(item, str(path), index))
    return found or None


def _parser(detect: Callable[[dict[str, Any]], str], parse: Callable[[dict[str, Any], str], object],
            fmt: str) -> Parse:
    """A record parser: `parse(record, fmt)`, with fmt "auto" detected from the record first."""
    return lambda record: parse(record, detect(record) if fmt == "auto" else fmt)


def sft_parser(data: SFTDataConfig) -> Parse:
    return _parser(lambda r: detect_format(r, data.columns), lambda r, f: parse_conversation(r, f, data), data.format)


def pair_parser(data: RMDataConfig) -> Parse:
    def parse(record: dict[str, Any], fmt: str) -> object:
        try:
            return parse_pair(record, fmt, data)
        except IdenticalPair:  # a pair in the right format (the run drops and counts it)
            return None

    return _parser(lambda r: detect_pair_format(r, data), parse, data.format)


def prompt_parser(data: PPODataConfig) -> Parse:
    return _parser(lambda r: detect_prompt_format(r, data), lambda r, f: parse_prompt(r, f, data), data.format)


def stage_sources(stage: str, cfg: Any) -> list[tuple[str, DataSource, Parse, str, str]]:
    """(config key, source, record parser, what a record should be, the keys that say how records are read) of
    each data source `stage` reads."""
    data = cfg.data
    if stage == "sft":
        parse, what = sft_parser(data), "an SFT conversation"
    elif stage == "train-rm":
        parse, what = pair_parser(data), "a preference pair"
    else:
        parse, what = prompt_parser(data), "a PPO prompt"
    out = [(f"data.{split}", source, parse, what, "data.format / data.columns") for split in ("train", "eval")
           if (source := getattr(data, split)) is not None]
    if stage == "ppo" and data.ptx is not None and cfg.ppo.ptx_coef > 0:
        out.append(("data.ptx", data.ptx, ptx_parser(data), "an SFT conversation (PTX)",
                    "data.ptx_format / data.ptx_columns"))
    return out


def ptx_parser(data: PPODataConfig) -> Parse:
    """`sft_parser` of data.ptx's rows, whose reasons name the PPO config's keys (`ptx_wording`)."""
    parse = sft_parser(ptx_data_config(data))

    def in_ppo_keys(record: dict[str, Any]) -> object:
        try:
            return parse(record)
        except BadRow as exc:
            raise BadRow(ptx_wording(str(exc))) from None

    return in_ppo_keys


def sniff_data(stage: str, cfg: Any) -> None:
    """`sniff_file` on each file of each data source of `stage`'s config; the error names the config key."""
    for key, source, parse, what, settings in stage_sources(stage, cfg):
        for path in source.paths():
            try:
                sniff_file(source.model_copy(update={"path": path}), parse, what, settings)
            except DataError as exc:
                raise DataError(f"{key}: {exc}") from None
