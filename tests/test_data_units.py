"""stages/data.py unit edges, hand-computed with a one-token-per-character tokenizer: each test pins a mutant of
the module that survived tests/test_data.py, test_data_edges.py, test_pairs.py, test_sniff.py and test_fuzz.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stages.config import Columns, DataSource, SFTDataConfig
from stages.data import (
    IGNORE,
    BadRow,
    BadRowLog,
    Conversation,
    DataReport,
    Segment,
    detect_format,
    encode_segments,
    load_conversations,
    parse_conversation,
    split_hh,
    tokenize_conversations,
    tokenize_segments,
)
from stages.errors import DataError
from stages.models import train_tokenizer


@pytest.fixture(scope="module")
def char_tok() -> Any:
    """A byte-level tokenizer with no merges: one token per ASCII character (built as tests/test_data.py does)."""
    return train_tokenizer(["abc"], vocab_size=261, min_frequency=1000)


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _data(**kw: Any) -> SFTDataConfig:
    return SFTDataConfig(train=DataSource(path="unused"), **kw)


def _load(path: Path, **kw: Any) -> tuple[list[tuple[Conversation, str]], BadRowLog]:
    cfg = SFTDataConfig(train=DataSource(path=str(path)), **kw)
    log = BadRowLog()
    return load_conversations(cfg.train, cfg, log), log


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- reading
def test_a_csv_row_with_more_cells_than_columns_is_named_by_its_data_row(tmp_path: Path) -> None:
    """A CSV row with an extra cell is a bad row, numbered from the first data row."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\np,r\np,r,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv row 2: more cells than header columns"):
        _load(path)
    convs, log = _load(path, on_bad_row="skip")
    assert len(convs) == 1 and log.reasons == {"more cells than header columns": 1}


def test_a_short_csv_row_reads_its_missing_cells_as_empty_strings(tmp_path: Path) -> None:
    """Cells a short CSV row lacks are "" (an empty prompt is allowed), not null."""
    path = tmp_path / "d.csv"
    path.write_text("response,prompt\nr\n,p\n", encoding="utf-8")
    convs, log = _load(path, on_bad_row="skip")
    assert [c.messages for c, _ in convs] == [(("user", ""), ("assistant", "r"))]
    assert log.reasons == {"empty 'response'": 1}
    with pytest.raises(DataError, match=r"d\.csv row 2: empty 'response' \(data\.format auto"):
        _load(path)


# ----------------------------------------------------------------------------------------- formats
def test_detect_format_prefers_messages_and_needs_both_prompt_and_response() -> None:
    """'messages' wins over prompt+response, which wins over HH text; a prompt alone fits no format."""
    cols = Columns()
    assert detect_format({"messages": [], "prompt": "p", "response": "r"}, cols) == "messages"
    assert detect_format({"prompt": "p", "response": "r", "chosen": "t"}, cols) == "prompt_response"
    assert detect_format({"chosen": "t"}, cols) == "hh"
    for record in ({"prompt": "p"}, {"response": "r"}):
        with pytest.raises(BadRow, match=r"cannot tell the data format from keys"):
            detect_format(record, cols)


def test_a_null_field_and_an_empty_messages_list_are_named_as_such() -> None:
    """A null response says "(null)"; an empty messages list says it must be non-empty."""
    with pytest.raises(BadRow, match=r"^empty 'response' \(null\)$"):
        parse_conversation({"prompt": "p", "response": None}, "prompt_response", _data())
    with pytest.raises(BadRow, match=r"^'messages' must be a non-empty list"):
        parse_conversation({"messages": []}, "messages", _data())


def test_split_hh_drops_a_blank_preamble_and_reads_an_opening_assistant_marker() -> None:
    """Whitespace before the first marker is no system turn; text opening with 'Assistant:' is read as a turn."""
    assert split_hh("  \n\nHuman: hi\n\nAssistant: yo") == [("user", " hi"), ("assistant", " yo")]
    assert split_hh("Assistant: yo\n\nHuman: hi") == [("assistant", " yo"), ("user", " hi")]
    assert split_hh("Human: hi\n\nAssistant: yo") == [("user", " hi"), ("assistant", " yo")]


def test_auto_format_is_chosen_by_the_first_usable_row_not_a_bad_one(tmp_path: Path) -> None:
    """A first row of a detectable format that fails to parse does not fix data.format auto's choice."""
    msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": ""}, msgs, {"prompt": "p", "response": "r"}])
    convs, log = _load(path, on_bad_row="skip")
    assert [where for _, where in convs] == [f"{path} row 2"]
    assert log.reasons == {"empty 'response'": 1, "missing key 'messages'": 1}


# ----------------------------------------------------------------------------------------- bad-row accounting
def test_skip_summary_lists_the_most_common_reason_first() -> None:
    """The summary buckets reasons by their text before " (" and puts the commonest first."""
    log = BadRowLog()
    for reason in ("empty 'response'", "invalid JSON (x at column 1)", "invalid JSON (y at column 9)"):
        log.add(reason)
    assert log.total == 3
    assert log.summary() == " (skipped: 2 x invalid JSON, 1 x empty 'response')"
    assert BadRowLog().summary() == ""


def test_a_configured_format_adds_no_auto_note_to_a_bad_row(tmp_path: Path) -> None:
    """Only data.format auto says which row's format it chose."""
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    with pytest.raises(DataError) as exc:
        _load(path, format="prompt_response")
    assert f"{path} row 2: missing key 'response'" in str(exc.value) and "data.format auto" not in str(exc.value)
    with pytest.raises(DataError, match=r"row 2: missing key 'response' .*\(data\.format auto: read as "
                                        r"'prompt_response', the format of .*d\.jsonl row 1\)"):
        _load(path)


def test_skipped_rows_counts_rows_not_reasons() -> None:
    """Two rows skipped for one reason are two skipped rows."""
    log = BadRowLog()
    for reason in ("empty 'response'", "empty 'response'", "no assistant turn"):
        log.add(reason)
    report = DataReport()
    report.count_skipped(log)
    report.count_skipped(log)
    assert report.skipped_rows == 6 and report.skipped_by_reason == {"empty 'response'": 4, "no assistant turn": 2}
    assert report.skipped_note() == ", skipped 6 bad row(s) (empty 'response': 4; no assistant turn: 2)"


# ----------------------------------------------------------------------------------------- tokenizing
def test_every_token_of_a_multi_token_bos_carries_no_label(char_tok: Any) -> None:
    """All ids bos_ids gives are context: none of them is trained (one BOS is covered by labels[0] alone)."""
    a, b, c = _ids(char_tok, "abc")
    eos = char_tok.eos_token_id
    ex, prompt_len = encode_segments([Segment("ab", False), Segment("c", True)], char_tok, True, [7, 8])
    assert ex.input_ids == [7, 8, a, b, c, eos] and prompt_len == 4
    assert ex.labels == [IGNORE, IGNORE, IGNORE, IGNORE, c, eos]



def test_a_cut_after_a_kept_bos_leaves_the_first_kept_answer_token_its_label(char_tok: Any) -> None:
    """BOS P P A A A P P R R EOS into 9: 2 prompt tokens go after the BOS; the BOS still predicts the first A."""
    p, a, r = _ids(char_tok, "PAR")
    eos = char_tok.eos_token_id
    turns = [Segment("PP", False), Segment("AAA", True), Segment("PP", False), Segment("RR", True)]
    ex = tokenize_segments(turns, char_tok, max_length=9, prompt_budget=4, add_eos=True, bos=[7])
    assert ex.input_ids == [7, a, a, a, p, p, r, r, eos] and ex.prompt_truncated and not ex.response_truncated
    assert ex.labels == [IGNORE, a, a, a, IGNORE, IGNORE, r, r, eos]


def test_a_special_string_quoted_later_in_the_first_segment_keeps_its_opening_bos() -> None:
    """A segment opening with the BOS string gets no second BOS, even when it quotes a special string later."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate("abc</s>")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    first = Segment("<s>a</s>b", False, plain=((4, 8),))  # "</s>" from a message's content, read as text
    ex, _ = encode_segments([first, Segment("c", True)], tok, True, [0])
    assert ex.input_ids[0] == 0 and ex.input_ids.count(0) == 1


def test_a_raw_response_with_an_eos_string_just_before_its_last_token_still_gets_an_eos(char_tok: Any) -> None:
    """Only a raw response's very last token stands for its end: "x<eos>a" is followed by an EOS."""
    p, x, a = _ids(char_tok, "pxa")
    eos = char_tok.eos_token_id
    ex, _ = encode_segments([Segment("p", False), Segment("x<|endoftext|>a", True)], char_tok, True, [])
    assert ex.input_ids == [p, x, eos, a, eos] and ex.labels == [IGNORE, x, eos, a, eos]


def test_a_templated_turns_own_eos_is_looked_for_up_to_three_tokens_from_its_end(char_tok: Any) -> None:
    """A template's text may follow its EOS with a few tokens (newlines): an EOS up to 3 tokens from the turn's
    end is its own (no second one appended); one 4 tokens back is a quoted one, and the EOS is appended."""
    p, r, nl = _ids(char_tok, "pr\n")
    eos = char_tok.eos_token_id
    ex, _ = encode_segments([Segment("p", False), Segment("r<|endoftext|>\n\n", True, templated=True)], char_tok,
                            True, [])
    assert ex.input_ids == [p, r, eos, nl, nl]
    ex, _ = encode_segments([Segment("p", False), Segment("r<|endoftext|>\n\n\n", True, templated=True)],
                            char_tok, True, [])
    assert ex.input_ids == [p, r, eos, nl, nl, nl, eos]


def test_a_tokenizer_without_a_chat_template_is_one_error_naming_the_way_out() -> None:
    """A messages row for a tokenizer with no chat template (a hub base model's, in rlhf eval) was transformers'
    ValueError, a traceback: now a DataError naming data.chat_template and plain-text prompts."""
    from stages.data import render_template

    tok = train_tokenizer(["abc"], vocab_size=261, min_frequency=1000)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"^the tokenizer has no chat template .*data\.chat_template.*"
                                        r"data\.use_chat_template false"):
        render_template(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_a_template_that_renders_no_reply_is_a_bad_row_naming_it() -> None:
    """A template dropping assistant turns gives a bad row naming the row (it was a bare ValueError from
    encode_segments, a traceback even with on_bad_row: skip), skipped and counted with skip."""
    tok = train_tokenizer(["abc"], vocab_size=261, min_frequency=1000)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    conv = Conversation((("user", "hi"), ("assistant", "yo")), "chat")
    with pytest.raises(DataError, match=r"f\.jsonl row 1: the chat template renders nothing of the assistant reply"):
        tokenize_conversations([(conv, "f.jsonl row 1")], tok, _data(), DataReport())
    report = DataReport()
    assert len(tokenize_conversations([(conv, "f.jsonl row 1")], tok, _data(on_bad_row="skip"), report)) == 0
    assert report.skipped_by_reason == {"the chat template renders nothing of the assistant reply: no token to train "
                                        "on": 1}
