"""Data: every format and file type, bad rows, truncation, the loss mask, packing, holdout split."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import ONE_LAYER_MODEL, REPO
from stages.config import DataSource, SFTDataConfig
from stages.data import (
    IGNORE,
    BadRowLog,
    DataReport,
    load_conversations,
    pack_examples,
    render_segments,
    split_hh,
    tokenize_conversations,
    tokenize_segments,
)
from stages.errors import ConfigError, DataError
from stages.lm import collate, shifted_nll_sum
from stages.models import DEFAULT_CHAT_TEMPLATE, train_tokenizer
from stages.trainer import split_holdout


@pytest.fixture(scope="module")
def char_tok():
    """A byte-level tokenizer with no merges: one token per ASCII character, so counts are hand-checkable."""
    tok = train_tokenizer(["abc"], vocab_size=261, min_frequency=1000)
    assert tok("hello", add_special_tokens=False)["input_ids"].__len__() == 5
    return tok


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _data(path: Path | str, **kw) -> SFTDataConfig:
    return SFTDataConfig(train=DataSource(path=str(path)), **kw)


def _load(path, **kw):
    cfg = _data(path, **kw)
    log = BadRowLog()
    return load_conversations(cfg.train, cfg, log), log


def _exchange(tmp_path: Path, user: str, reply: str) -> list:
    """One user turn and one reply, as a messages row read through the real loader."""
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": user},
                                                       {"role": "assistant", "content": reply}]}])
    return _load(path)[0]


@contextlib.contextmanager
def _template(tok, template: str) -> Iterator[None]:
    """`tok` (the module's shared tokenizer) with another chat template for the block."""
    tok.chat_template = template
    try:
        yield
    finally:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE


def _one(char_tok, conv_rows, **kw):
    """Tokenize rows through the real pipeline; return the TokenRows and report."""
    cfg = SFTDataConfig(train=DataSource(path="unused"), **kw)
    report = DataReport()
    rows = tokenize_conversations(conv_rows, char_tok, cfg, report)
    return rows, report


# ----------------------------------------------------------------------------------------- formats
def test_prompt_response_raw_masks_the_prompt_exactly(tmp_path, char_tok):
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "Q: 2+2?", "response": " 4"}])
    convs, _ = _load(path)
    rows, report = _one(char_tok, convs)
    eos = char_tok.eos_token_id
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    assert char_tok.decode(ids[:7]) == "Q: 2+2?" and char_tok.decode(ids[7:9]) == " 4" and ids[9] == eos
    assert labels == [IGNORE] * 7 + ids[7:9] + [eos]
    assert report.trained_tokens == 3 and report.tokens == 10


def test_prompt_response_rows_go_through_the_chat_template_when_asked(tmp_path, char_tok):
    """data.use_chat_template: a prompt/response row renders as a user and an assistant turn of the template
    (the template's text exactly; only the reply and its EOS trained); off, as the raw text above."""
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "Q: 2+2?", "response": " 4"}])
    chat, _ = _one(char_tok, _load(path, use_chat_template=True)[0])
    raw, _ = _one(char_tok, _load(path)[0])
    expected = char_tok.apply_chat_template([{"role": "user", "content": "Q: 2+2?"},
                                             {"role": "assistant", "content": " 4"}], tokenize=False)
    assert char_tok.decode(chat[0]["input_ids"], skip_special_tokens=False) == expected  # (ends with its EOS)
    trained = [t for t in chat[0]["labels"] if t != IGNORE]
    assert char_tok.decode(trained, skip_special_tokens=False) == " 4<|endoftext|>"
    assert char_tok.decode(raw[0]["input_ids"][:7]) == "Q: 2+2?"


def test_the_eos_label_survives_a_tokenizer_whose_pad_is_its_eos(tmp_path, char_tok):
    """Many base models ship pad = EOS; labels come from the conversation, never from the pad id, so the final EOS
    stays trained and only the padding after it is IGNORE (TRL's pad = eos masking of the EOS label)."""
    import copy

    from stages.lm import collate

    tok = copy.deepcopy(char_tok)
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "Q: 2+2?", "response": " 4"}, {"prompt": "Q?", "response": " 1234567890"}])
    convs, _ = _load(path)
    rows, _ = _one(tok, convs)
    batch = collate([rows[0], rows[1]], tok.pad_token_id, torch.device("cpu"))
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert n0 < n1 and batch["labels"][0, n0 - 1] == eos and batch["labels"][1, n1 - 1] == eos
    assert batch["input_ids"][0, n0:].tolist() == [eos] * (n1 - n0)  # the padding is EOS ids ...
    assert batch["labels"][0, n0:].tolist() == [IGNORE] * (n1 - n0)  # ... not labels
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)


def test_custom_column_names(tmp_path, char_tok):
    path = _jsonl(tmp_path / "c.jsonl", [{"question": "hi", "answer": "yo"}])
    convs, _ = _load(path, columns={"prompt": "question", "response": "answer"})
    assert convs[0][0].messages == (("user", "hi"), ("assistant", "yo"))


def _trained_text(tok, row: dict) -> str:
    """The text of a tokenized row's tokens that carry a label."""
    return "".join(tok.decode([t]) for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE)


def test_messages_every_assistant_turn_trained_or_only_last(tmp_path, char_tok, monkeypatch):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    convs, _ = _load(path)
    monkeypatch.setattr(char_tok, "chat_template", DEFAULT_CHAT_TEMPLATE)  # (the module's shared tokenizer)
    segs = render_segments(convs[0][0], char_tok, "all_turns")
    assert [(s.text, s.train) for s in segs] == [
        ("<|system|>\nS<|endoftext|><|user|>\nu1<|endoftext|><|assistant|>\n", False),
        ("a1<|endoftext|>", True),
        ("<|user|>\nu2<|endoftext|><|assistant|>\n", False),
        ("a2<|endoftext|>", True),
    ]
    rows, _ = _one(char_tok, convs)
    assert _trained_text(char_tok, rows[0]) == "a1<|endoftext|>a2<|endoftext|>"
    rows_last, _ = _one(char_tok, convs, train_on="last_turn")
    assert _trained_text(char_tok, rows_last[0]) == "a2<|endoftext|>"
    assert rows_last[0]["input_ids"] == rows[0]["input_ids"]  # same text, only the mask differs


@pytest.mark.parametrize("system", ["", "{{ '<|system|>\\nYou are helpful.' + eos_token }}"])
def test_an_opening_assistant_turn_trains_its_content_not_the_template_header(tmp_path, char_tok, system, monkeypatch):
    """A conversation that opens with an assistant turn: the header the template writes before it (and a system
    prompt a template adds by default) is context, as a generation prompt is before any later assistant turn."""
    msgs = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    convs, _ = _load(_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    monkeypatch.setattr(char_tok, "chat_template", system + DEFAULT_CHAT_TEMPLATE)  # (restored: the module shares it)
    segs = render_segments(convs[0][0], char_tok, "all_turns")
    opening = "<|system|>\nYou are helpful.<|endoftext|>" if system else ""
    assert [(s.text, s.train) for s in segs] == [
        (opening + "<|assistant|>\n", False),
        ("hi<|endoftext|>", True),
        ("<|user|>\nq<|endoftext|><|assistant|>\n", False),
        ("a<|endoftext|>", True),
    ]
    rows, _ = _one(char_tok, convs)
    assert _trained_text(char_tok, rows[0]) == "hi<|endoftext|>a<|endoftext|>"


def test_trailing_user_turn_is_dropped(tmp_path):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}]
    convs, _ = _load(_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    assert convs[0][0].messages == (("user", "q"), ("assistant", "a"))


def test_hh_split_round_trips_every_real_record(hh_sample):
    rows = [json.loads(line) for line in hh_sample.read_text().splitlines()]
    for row in rows:
        for key in ("chosen", "rejected"):
            turns = split_hh(row[key])
            assert "".join(("\n\nHuman:" if r == "user" else "\n\nAssistant:") + c for r, c in turns) == row[key]
    assert split_hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ok") == [
        ("user", " hi"), ("assistant", " hello"), ("user", " bye"), ("assistant", " ok")
    ]


def test_hh_real_sample_bad_row_is_named_then_skipped(hh_sample, char_tok):
    with pytest.raises(DataError) as exc:
        _load(hh_sample, format="hh")
    assert f"{hh_sample} row 87: empty response" in str(exc.value)
    # the way out, in the config's words and in the command line's (rlhf eval has no config file of its own)
    assert "data.on_bad_row: skip in the config, or --set data.on_bad_row=skip" in str(exc.value)
    convs, log = _load(hh_sample, format="hh", on_bad_row="skip")
    assert len(convs) == 399 and log.total == 1
    conv, where = convs[0]
    assert where == f"{hh_sample} row 1" and conv.style == "raw_hh"
    segs = render_segments(conv, char_tok, "all_turns")
    assert "".join(s.text for s in segs) == json.loads(hh_sample.read_text().splitlines()[0])["chosen"]
    assert [s.train for s in segs] == [False, True] * 3  # three assistant turns, each trained
    assert all(s.text.endswith("\n\nAssistant:") for s in segs if not s.train)


def test_hh_through_chat_template(hh_sample, char_tok):
    convs, _ = _load(hh_sample, format="hh", on_bad_row="skip", use_chat_template=True)
    assert convs[0][0].style == "chat"
    assert convs[0][0].messages[0] == ("user", "what are some pranks with a pen i can do?")


def test_auto_format_detection(tmp_path):
    assert _load(_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}]))[0][0][0].style == "raw_pr"
    assert _load(_jsonl(tmp_path / "b.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b"}]))[0][0][0].style == "raw_hh"
    with pytest.raises(DataError, match=r"c.jsonl row 1: cannot tell the data format from keys \['x'\]"):
        _load(_jsonl(tmp_path / "c.jsonl", [{"x": 1}]))


def test_csv_parquet_and_json_array_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(records))
    for name in ("d.csv", "d.parquet", "d.json"):
        convs, _ = _load(tmp_path / name)
        assert [c.messages[1][1] for c, _ in convs] == ["r0", "r1", "r2"], name
        assert convs[2][1] == f"{tmp_path / name} row 3"
    # a parquet file of no rows holds no record, as an empty JSON Lines file does (datasets failed on it,
    # printing pyarrow's "BatchSize must be greater than 0"), beside a file that has some
    from stages.data import read_rows

    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())])), tmp_path / "e.parquet")
    both = DataSource(path=[str(tmp_path / "e.parquet"), str(tmp_path / "d.parquet")])
    assert [r.data["prompt"] for r in read_rows(both, "error", BadRowLog())] == ["p0", "p1", "p2"]


def test_several_files_in_one_source(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "1"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "response": "2"}])
    cfg = SFTDataConfig(train=DataSource(path=[str(a), str(b)]))
    convs = load_conversations(cfg.train, cfg, BadRowLog())
    assert [c.messages[1][1] for c, _ in convs] == ["1", "2"]
    # format auto decides on the first usable row for the whole source: a later file of another format is told so
    c = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "3"}]}])
    cfg = SFTDataConfig(train=DataSource(path=[str(a), str(c)]))
    with pytest.raises(DataError, match=f"c.jsonl row 1: missing key 'prompt' .*\\(data.format auto: read as "
                                        f"'prompt_response', the format of {a} row 1\\)"):
        load_conversations(cfg.train, cfg, BadRowLog())
    from stages.config import RMDataConfig
    from stages.pairs import load_pairs

    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"chosen": "\n\nHuman: a"}])
    rm = RMDataConfig(train=DataSource(path=str(pairs)), on_bad_row="skip")
    log = BadRowLog()
    assert len(load_pairs(rm.train, rm, log).pairs) == 1 and dict(log.reasons) == {"missing key 'prompt'": 1}  # counted under its reason
    rm = RMDataConfig(train=DataSource(path=str(pairs)))
    with pytest.raises(DataError, match=f"p.jsonl row 2: missing key .*\\(data.format auto: read as 'pairs', the "
                                        f"format of {pairs} row 1\\)"):
        load_pairs(rm.train, rm, BadRowLog())


def test_unknown_hub_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="cannot load dataset 'no-such-org/no-such-dataset'"):
        _load("no-such-org/no-such-dataset")


# ----------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "p", "response": ', "invalid JSON (Expecting value at column 29)"),  # (not column 1 of a next line)
        ('{"prompt": "p"}', "missing key 'response' (keys present: prompt)"),
        ('{"prompt": "p", "response": "   "}', "empty 'response'"),
        ('{"prompt": "p", "response": 7}', "'response' must be a string, got int"),
        ('[1, 2]', "expected a JSON object, got list"),
    ],
)
def test_bad_row_error_names_file_and_row(tmp_path, line, reason):
    good = json.dumps({"prompt": "p", "response": "r"})
    path = _jsonl(tmp_path / "d.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as exc:
        _load(path)
    assert f"{path} row 3: {reason}" in str(exc.value)
    convs, log = _load(path, on_bad_row="skip")
    assert len(convs) == 3 and log.total == 1


def test_non_utf8_bytes_are_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff\xfe", "response": "r"}\n')
    with pytest.raises(DataError, match=r"row 2: not valid UTF-8"):
        _load(path)


def test_only_bad_rows_is_an_error_that_says_why_they_were_skipped(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["nope", "nope", {"prompt": "a", "response": " "}])
    with pytest.raises(DataError) as exc:
        _load(path, on_bad_row="skip")
    assert str(exc.value) == f"no usable rows in {path} (skipped: 2 x invalid JSON, 1 x empty 'response')"


def test_bad_messages_structure(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"row 1: messages\[0\] must be \{role: system\|user\|assistant"):
        _load(path)
    path = _jsonl(tmp_path / "m2.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="row 1: no assistant turn"):
        _load(path)


# ----------------------------------------------------------------------------------------- truncation
def test_truncation_prompt_from_left_response_from_right(char_tok):
    from stages.data import Segment

    segs = [Segment("PPPPPPPPPP", False), Segment("RRRRR", True)]  # 10 + 5 + eos = 16 tokens
    p, r = char_tok.convert_tokens_to_ids("P"), char_tok.convert_tokens_to_ids("R")
    eos = char_tok.eos_token_id
    # overflow 2: only the prompt loses its 2 leftmost tokens
    ex = tokenize_segments(segs, char_tok, max_length=14, prompt_budget=4, add_eos=True, bos=[])
    assert ex.input_ids == [p] * 8 + [r] * 5 + [eos] and ex.prompt_truncated and not ex.response_truncated
    # overflow 8: the prompt goes down to its budget (4), then the response is cut from the right
    ex = tokenize_segments(segs, char_tok, max_length=8, prompt_budget=4, add_eos=True, bos=[])
    assert ex.input_ids == [p] * 4 + [r] * 4 and ex.labels == [IGNORE] * 4 + [r] * 4
    assert ex.prompt_truncated and ex.response_truncated
    # fits: untouched
    ex = tokenize_segments(segs, char_tok, max_length=16, prompt_budget=4, add_eos=True, bos=[])
    assert len(ex.input_ids) == 16 and not (ex.prompt_truncated or ex.response_truncated)
    # all turns trained, the cut starting inside the first answer: its token now first has no label (nothing
    # predicts it) and is not counted as trained
    turns = [Segment("PP", False), Segment("AAA", True), Segment("PP", False), Segment("RR", True)]
    a = char_tok.convert_tokens_to_ids("A")
    ex = tokenize_segments(turns, char_tok, max_length=8, prompt_budget=4, add_eos=True, bos=[])
    assert ex.input_ids == [a, a, a, p, p, r, r, eos]  # 10 tokens, the 2 leftmost cut
    assert ex.labels == [IGNORE, a, a, IGNORE, IGNORE, r, r, eos]


def test_truncation_counts_are_reported(tmp_path, char_tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "P" * 30, "response": "R" * 30}, {"prompt": "p", "response": "r"}])
    convs, _ = _load(path)
    _, report = _one(char_tok, convs, max_length=20, max_prompt_length=5)
    assert (report.examples, report.prompt_truncated, report.response_truncated) == (2, 1, 1)


def test_bos_is_prepended_when_the_tokenizer_uses_one_and_kept_when_the_prompt_is_cut(char_tok):
    from stages.data import Segment, bos_ids

    assert bos_ids(char_tok) == []
    ex = tokenize_segments([Segment("ab", False), Segment("c", True)], char_tok, 10, 5, True, bos=[7])
    assert ex.input_ids[0] == 7 and ex.labels[0] == IGNORE
    a, b, c = (char_tok.convert_tokens_to_ids(x) for x in "abc")
    ex = tokenize_segments([Segment("aaab", False), Segment("c", True)], char_tok, 5, 2, True, bos=[7])
    assert ex.input_ids == [7, a, b, c, char_tok.eos_token_id] and ex.prompt_truncated  # 2 cut after the BOS


def test_a_response_with_nothing_before_it_has_no_label_on_its_first_token(tmp_path, char_tok):
    """With an empty prompt and no BOS nothing predicts the first token: it carries no loss, is not counted as
    trained, and packed it is not predicted from the previous example's EOS."""
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "", "response": "xy"}, {"prompt": "", "response": "zw"}])
    convs, _ = _load(path)
    x, y, z, w = (char_tok.convert_tokens_to_ids(t) for t in "xyzw")
    eos = char_tok.eos_token_id
    rows, report = _one(char_tok, convs, max_length=16, packing=True)
    assert rows[0]["input_ids"] == [x, y, eos, z, w, eos]
    assert rows[0]["labels"] == [IGNORE, y, eos, IGNORE, w, eos] and report.trained_tokens == 4


# ----------------------------------------------------------------------------------------- loss mask
def test_prompt_tokens_contribute_exactly_zero(tmp_path, char_tok):
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "abcd", "response": "xy"}])
    convs, _ = _load(path)
    rows, _ = _one(char_tok, convs)
    batch = collate([rows[0]], char_tok.pad_token_id, torch.device("cpu"))
    vocab = len(char_tok)
    # all-zero logits: every trained token has NLL log(V); 3 trained tokens (x, y, eos)
    logits = torch.zeros(1, batch["input_ids"].shape[1], vocab, requires_grad=True)
    loss = shifted_nll_sum(logits, batch["labels"])
    assert loss.item() == pytest.approx(3 * math.log(vocab), rel=1e-6)
    loss.backward()
    # logits at t predict token t+1: positions 0..2 predict prompt tokens b, c, d -> no gradient at all
    assert torch.count_nonzero(logits.grad[0, :3]) == 0
    assert torch.count_nonzero(logits.grad[0, 3:6]) > 0
    assert torch.count_nonzero(logits.grad[0, 6:]) == 0  # eos predicts nothing
    # changing what the model predicts for prompt positions leaves the loss unchanged
    bumped = logits.detach().clone()
    bumped[0, :3] = torch.randn(3, vocab)
    assert shifted_nll_sum(bumped, batch["labels"]).item() == loss.item()


def test_chunked_nll_equals_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 11)
    labels = torch.randint(0, 11, (3, 9))
    labels[:, :4] = IGNORE
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    assert shifted_nll_sum(logits, labels, chunk=5).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["sft", "rm_lm_head"])
def test_chunked_nll_keeps_no_float32_logits_for_backward_and_gives_the_plain_gradient(loss):
    """bf16 logits (SFT: the model's; reward model: h W^T inside LMHead), upcast in blocks of 4 rows: the loss
    and gradients equal plain float32 cross-entropy's (to bf16 rounding), and the forward pass leaves autograd
    no float32 [rows, V] tensor: each block is checkpointed (recomputed in the backward pass), where plain
    float32 cross-entropy, like the uncheckpointed blocks before, keeps [tokens, V]."""
    from stages.reward_model import LMHead

    torch.manual_seed(0)
    vocab, chunk = 50, 4
    hidden = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, 16, dtype=torch.bfloat16))
    labels = torch.randint(0, vocab, (2, 9))
    labels[:, :2] = IGNORE
    rows = labels[:, 1:] != IGNORE
    results = []
    for how in (loss, "plain"):
        saved: dict[int, int] = {}  # float32 V-wide storages autograd keeps: data pointer -> elements

        def keep(t: torch.Tensor) -> torch.Tensor:
            if t.dtype == torch.float32 and t.shape and t.shape[-1] == vocab:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // 4
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            if how == "sft":
                value = shifted_nll_sum(hidden @ weight.T, labels, chunk=chunk)
            elif how == "rm_lm_head":
                value = LMHead(weight, chunk=chunk)(hidden[:, :-1][rows], labels[:, 1:][rows])
            else:
                logits = (hidden @ weight.T)[:, :-1][rows].float()
                value = torch.nn.functional.cross_entropy(logits, labels[:, 1:][rows], reduction="sum")
        value.backward()
        results.append((value.item(), hidden.grad.float(), weight.grad.float(), sum(saved.values())))
        hidden.grad = weight.grad = None
    (v1, h1, w1, kept), (v0, h0, w0, plain_kept) = results
    assert v1 == pytest.approx(v0, rel=1e-5)
    assert torch.allclose(h1, h0, rtol=2e-2, atol=2e-2) and torch.allclose(w1, w0, rtol=2e-2, atol=2e-2)
    assert kept == 0 and plain_kept >= int(rows.sum()) * vocab


def test_the_reward_models_lm_loss_and_the_zero_loss_stay_finite_in_fp16_over_a_large_vocabulary():
    """LMHead starts from 0 x (a row of logits summed) and zero_loss from 0 x (each parameter summed): summed in
    fp16, 151,936 logits averaging -2 overflow to -inf and inf x 0 = NaN made every fp16 micro-batch's loss NaN
    (with loss.lm_coef > 0). Summed in float32 the loss is the float32 one's (to fp16 rounding) and 0 adds 0."""
    from stages.reward_model import LMHead
    from stages.trainer import zero_loss

    torch.manual_seed(0)
    vocab = 151_936
    hidden = torch.full((4, 8), 0.5, dtype=torch.float16)
    weight = torch.nn.Parameter((0.01 * torch.randn(vocab, 8) - 0.5).half())  # logits about -2
    gold = torch.randint(0, vocab, (4,))
    assert torch.isinf((hidden[:1] @ weight.T).sum())  # (the fp16 sum)
    value = LMHead(weight, chunk=2)(hidden, gold)
    expected = LMHead(torch.nn.Parameter(weight.float()), chunk=2)(hidden.float(), gold)
    assert torch.isfinite(value) and value.item() == pytest.approx(expected.item(), rel=1e-3)
    big = torch.nn.Linear(vocab, 1, bias=False).half()
    with torch.no_grad():
        big.weight.fill_(1.0)
    assert zero_loss(big).item() == 0.0


# ----------------------------------------------------------------------------------------- packing
def test_packing_keeps_examples_apart(tmp_path, char_tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.data import TokenizedExample

    exs = [TokenizedExample([5, 6, 7, 8], [IGNORE, 6, 7, 8]), TokenizedExample([9, 10, 11], [IGNORE, 10, 11]),
           TokenizedExample([12, 13, 14, 15, 16], [IGNORE] * 2 + [14, 15, 16])]
    rows = pack_examples(exs, max_length=8)
    assert len(rows) == 2
    assert rows[0] == {"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [IGNORE, 6, 7, 8, IGNORE, 10, 11],
                       "position_ids": [0, 1, 2, 3, 0, 1, 2]}
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    batch = collate([rows[0]], 0, torch.device("cpu"))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([[9, 10, 11]]), use_cache=False).logits
    assert torch.allclose(packed[0, 4:7], alone[0], atol=1e-5)


def test_packed_rows_train_exactly_as_their_examples_one_by_one():
    """The training loss and its gradients (train mode, activation checkpointing on and off) of six examples
    packed into three padded rows equal those of the six examples run one by one: no example attends to
    another, none is predicted from the previous one's end, and padding carries nothing (a peer bug: packed
    examples attending to each other, or positions not restarting)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.data import TokenizedExample
    from stages.lm import lm_forward, shifted_nll_sum
    from stages.models import enable_activation_checkpointing

    lengths = (4, 7, 3, 6, 5, 2)
    exs = [TokenizedExample(list(range(3 + i, 3 + i + n)), [IGNORE] + list(range(4 + i, 3 + i + n)))
           for i, n in enumerate(lengths)]
    rows = pack_examples(exs, max_length=11)
    assert len(rows) == 3 and len({rows.tokens(i) for i in range(3)}) > 1  # (rows of several widths: padded)
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=32, attention_dropout=0.0)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
        if checkpointing:
            enable_activation_checkpointing(model)
        results = []
        for batches in ([collate([rows[i] for i in range(3)], 0, torch.device("cpu"))],
                        [collate([{"input_ids": e.input_ids, "labels": e.labels}], 0, torch.device("cpu"))
                         for e in exs]):
            model.zero_grad()
            loss = sum(shifted_nll_sum(lm_forward(model, b), b["labels"]) for b in batches)
            loss.backward()
            results.append((loss.item(), [q.grad.clone() for q in model.parameters()]))
        (packed, packed_grads), (alone, alone_grads) = results
        assert packed == pytest.approx(alone, rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(packed_grads, alone_grads))


#: tiny configs of common model types (and those whose attention mask ignores position ids)
PACKING_ARCHS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),  # (eager attention only)
    "mpt": dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=64),  # (eager attention only)
    "biogpt": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


@pytest.mark.parametrize("model_type", sorted(PACKING_ARCHS))
def test_packed_examples_stay_apart_on_every_model_type_packing_allows(model_type):
    """Two examples packed into one row (position ids restart, no attention mask: what `collate` and
    `lm_forward` hand the model): the second one's logits equal those of it alone exactly where the type is not
    in PACKING_UNSAFE, which `check_packing` refuses; the list is checked against the installed transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.lm import lm_forward
    from stages.models import PACKING_UNSAFE, check_packing

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, **PACKING_ARCHS[model_type])
    attention = "eager" if model_type in ("bloom", "mpt") else "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention).eval()
    first, second = list(range(10, 17)), list(range(30, 36))
    batch = collate([{"input_ids": first + second, "labels": first + second,
                      "position_ids": list(range(7)) + list(range(6))}], 0, torch.device("cpu"))
    with torch.no_grad():
        packed = lm_forward(model, batch)[0, 7:]
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5) == (model_type not in PACKING_UNSAFE)
    if model_type in PACKING_UNSAFE:
        with pytest.raises(ConfigError, match=f"data.packing: true is not supported for {model_type} models"):
            check_packing(model_type, True)
    check_packing(model_type, False)


def test_packing_through_the_pipeline(tmp_path, char_tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}] * 10)
    convs, _ = _load(path)
    rows, report = _one(char_tok, convs, packing=True, max_length=9)
    assert report.packed_rows == 4 and len(rows) == 4  # 3 tokens each, 3 per row of 9: 3 + 3 + 3 + 1
    assert rows[3]["position_ids"] == [0, 1, 2]


# ----------------------------------------------------------------------------------------- splits, shipped data
def test_holdout_split_is_seeded_and_disjoint():
    rows = list(range(100))
    train, held = split_holdout(rows, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
    assert split_holdout(rows, 0.1, seed=3) == (train, held)
    assert split_holdout(rows, 0.1, seed=4)[1] != held


def test_shipped_tiny_data_matches_its_generator():
    from stages.toydata import SHIPPED

    for name, (make, n, seed) in SHIPPED.items():
        shipped = (REPO / "configs" / "tiny" / "data" / name).read_text().splitlines()
        assert [json.loads(line) for line in shipped] == make(n, seed)


# ----------------------------------------------------------------------------------------- review fixes
def test_csv_values_stay_strings_and_empty_cells_are_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\nwhat is 1+1?,2\nwhat is 2+4?,6\nq,\n")
    with pytest.raises(DataError, match=r"d.csv row 3: empty 'response'"):
        _load(path)
    convs, log = _load(path, on_bad_row="skip")
    assert [c.messages[1][1] for c, _ in convs] == ["2", "6"] and log.total == 1


def test_skip_mode_tolerates_a_bad_first_row_and_buckets_reasons(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ['{"oops": 1}', "{bad", "{bad json here", {"prompt": "p", "response": "r"}])
    convs, log = _load(path, on_bad_row="skip")
    assert len(convs) == 1 and convs[0][0].style == "raw_pr"
    assert log.reasons["invalid JSON"] == 2  # one bucket, whatever the column
    assert sum(n for r, n in log.reasons.items() if r.startswith("cannot tell the data format")) == 1


def test_chatml_style_template_gets_no_second_eos(tmp_path, char_tok):
    chatml = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    convs = _exchange(tmp_path, "hi", "yo")
    with _template(char_tok, chatml):
        rows, _ = _one(char_tok, convs)
    trained = [t for t, lab in zip(rows[0]["input_ids"], rows[0]["labels"]) if lab != IGNORE]
    assert char_tok.decode(trained) == "yo<|endoftext|>\n"
    assert rows[0]["input_ids"].count(char_tok.eos_token_id) == 2  # user turn + assistant turn, no extra


def test_bos_detected_from_a_tokenizer_that_adds_one():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from stages.data import Segment, bos_ids

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcxyz")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    assert bos_ids(tok) == [0]
    ex = tokenize_segments([Segment("ab", False), Segment("c", True)], tok, 10, 5, True, bos=bos_ids(tok))
    assert ex.input_ids == [0, 2, 3, 4, 1] and ex.labels == [IGNORE, IGNORE, IGNORE, 4, 1]  # <s> a b | c </s>
    # a text that already starts with the BOS string does not get a second one
    ex = tokenize_segments([Segment("<s>ab", False), Segment("c", True)], tok, 10, 5, True, bos=[0])
    assert ex.input_ids.count(0) == 1


def test_a_template_writing_bos_beside_a_tokenizer_adding_one_gives_one_bos_in_every_stage(tmp_path):
    """A chat template that writes {{ bos_token }} (Llama-3's) with a tokenizer that also puts BOS before a text:
    exactly one BOS opens each SFT row, each reward-model side and each PPO prompt (a peer bug: two)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from stages.config import PPODataConfig, RMDataConfig
    from stages.data import BadRowLog, bos_ids, parse_conversation
    from stages.pairs import parse_pair, tokenize_pair
    from stages.ppo.prompts import load_prompts

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcxyz|<>\n")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    bos = bos_ids(tok)
    assert bos == [0]
    row = {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cx"}]}
    data = SFTDataConfig(train=DataSource(path="unused"))
    ex = tokenize_segments(render_segments(parse_conversation(row, "messages", data), tok, "all_turns"), tok,
                           64, 32, True, bos)
    assert ex.input_ids.count(0) == 1 and ex.input_ids[0] == 0
    pair = parse_pair({"prompt": "ab", "chosen": "cx", "rejected": "yz"}, "pairs",
                      RMDataConfig(train="x.jsonl", use_chat_template=True))
    for side in tokenize_pair(pair, tok, RMDataConfig(train="x.jsonl"), bos):
        assert side.input_ids.count(0) == 1 and side.input_ids[0] == 0
    prompts = str(_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ab"}]))
    for chat in (True, False):  # (a plain prompt gets the tokenizer's BOS put before it)
        ids = load_prompts(DataSource(path=prompts), PPODataConfig(train=prompts, use_chat_template=chat), tok,
                           BadRowLog()).ids[0]
        assert ids.count(0) == 1 and ids[0] == 0


#: the shape of Mistral v0.3's chat template: the system prompt goes before the last user turn only
MISTRAL_LIKE = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
                "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
                "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
                "{%- if loop.last and system_message is defined %}"
                "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
                "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
                "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
                "{%- endfor %}")


def test_a_template_that_moves_the_system_prompt_says_so(tmp_path):
    """A Mistral-style template writes the system prompt before the last user turn only, so a reply's render never
    holds it: a row with a system turn cannot be trained (a bad row), and the reason now says why and what to do;
    the same row without it trains, and PPO renders the system prompt before the question."""
    from stages.data import BadRow, Conversation

    tok = train_tokenizer(["abc"], vocab_size=261, min_frequency=1000)
    tok.chat_template = MISTRAL_LIKE
    with_system = Conversation((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")), "chat")
    with pytest.raises(BadRow, match=r"cannot mask turns: it renders the system prompt otherwise once a reply "
                                     r"follows \(Mistral's templates write it before the last user turn only"):
        render_segments(with_system, tok, "all_turns")
    from stages.ppo.prompts import render_prompt

    assert render_prompt(list(with_system.messages[:2]), True, tok).text == "[INST] Be brief.\n\nHi[/INST]"
    plain = Conversation(with_system.messages[1:], "chat")
    assert [seg.text for seg in render_segments(plain, tok, "all_turns")] == ["[INST] Hi[/INST]",
                                                                              " Hello<|endoftext|>"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if messages|length == 3 %}!{% endif %}"
    with pytest.raises(BadRow, match=r"cannot mask turns$"):  # (another cause: no such hint)
        render_segments(Conversation((("user", "Hi"), ("assistant", "Hello"), ("user", "x"), ("assistant", "y")),
                                     "chat"), tok, "all_turns")


def test_an_eos_string_inside_a_response_does_not_stand_for_its_end(tmp_path, char_tok):
    """A raw response quoting "<|endoftext|>" (scraped text; a raw row keeps it as the control token) still gets
    the EOS that ends it: only its last token, or a template's own EOS among the turn's last tokens ("EOS\\n",
    ChatML), replaces it — also two tokens before the end."""
    for response, tail in (("say <|endoftext|> then stop", " then stop"), ("x<|endoftext|>ab", "ab")):
        path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "ab", "response": response}])
        convs, _ = _load(path)
        rows, _ = _one(char_tok, convs)
        ids, eos = rows[0]["input_ids"], char_tok.eos_token_id
        assert ids[-1] == eos and ids.count(eos) == 2 and rows[0]["labels"][-1] == eos, response
        assert char_tok.decode(ids[:-1]).endswith(tail)
    convs, _ = _load(_jsonl(tmp_path / "pr.jsonl", [{"prompt": "ab", "response": "the end<|endoftext|>"}]))
    assert _one(char_tok, convs)[0][0]["input_ids"].count(char_tok.eos_token_id) == 1  # the row's own end


def test_an_empty_earlier_reply_is_not_trained(char_tok):
    """train_on all_turns with an empty assistant turn before the last: through the chat template it would train
    the template's EOS alone (a reply that stops at once); it is context, in raw HH as in chat."""
    from stages.data import Conversation, render_segments

    msgs = (("user", "hi"), ("assistant", ""), ("user", "again"), ("assistant", "ok"))
    for style in ("chat", "raw_hh"):
        trained = [seg.text for seg in render_segments(Conversation(msgs, style), char_tok, "all_turns") if seg.train]
        assert len(trained) == 1 and trained[0].startswith("ok"), (style, trained)


#: like Qwen3's: a reply after the conversation's last user turn opens with an empty think block, an earlier one
#: does not, so a reply renders otherwise once a later user turn follows it (our own words, not Qwen's template)
THINKING_TEMPLATE = (
    "{%- set last = namespace(user=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set last.user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ '\\n' }}"
    "{%- if message['role'] == 'assistant' and loop.index0 > last.user -%}<think>{{ '\\n\\n' }}</think>"
    "{{ '\\n\\n' }}{%- endif -%}"
    "{{ message['content'] }}{{ eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)


def test_a_template_that_renders_earlier_replies_otherwise_trains_the_last_turn_after_the_ppo_prompt(char_tok):
    """A Qwen3-style template drops an earlier reply's think block once a later user turn follows: the replies'
    renders do not nest, so every multi-turn row was a bad row, in the RM (last turn) too. Only the trained turns
    must nest: the last turn is the full render less the PPO prompt (the render before it, generation prompt and
    all); all_turns cannot train the earlier replies apart, a bad row that names last_turn."""
    import copy

    from stages.data import BadRow, BadRowLog, Conversation, render_segments
    from stages.ppo.prompts import render_prompt

    tok = copy.deepcopy(char_tok)
    tok.chat_template = THINKING_TEMPLATE
    msgs = (("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"))
    segs = render_segments(Conversation(msgs, "chat"), tok, "last_turn")
    assert [(s.text, s.train) for s in segs] == [
        ("<|user|>\nu1<|endoftext|><|assistant|>\na1<|endoftext|><|user|>\nu2<|endoftext|><|assistant|>\n", False),
        ("<think>\n\n</think>\n\na2<|endoftext|>", True)]
    assert segs[0].text == render_prompt(list(msgs[:3]), True, tok).text  # PPO's prompt, to the character
    with pytest.raises(BadRow, match="renders an earlier assistant reply otherwise once a later turn follows it, "
                                     "so the replies cannot be trained apart: data.train_on last_turn trains") as caught:
        render_segments(Conversation(msgs, "chat"), tok, "all_turns")
    log = BadRowLog()  # (the skipped-rows report keeps a reason up to its first " (": the advice is before any)
    log.add(str(caught.value))
    assert list(log.reasons) == [str(caught.value)], log.reasons
    one = render_segments(Conversation(msgs[:2], "chat"), tok, "all_turns")  # one reply: nothing to nest
    assert [s.text for s in one if s.train] == ["<think>\n\n</think>\n\na1<|endoftext|>"]
    # a template whose reply does not begin with its generation prompt cannot be split at all
    tok.chat_template = DEFAULT_CHAT_TEMPLATE.replace("<|assistant|>{{ '\\n' }}{%- endif", "<|bot|>{%- endif")
    with pytest.raises(BadRow, match="render of an assistant reply does not begin with its render of the "
                                     "conversation before it with the generation prompt"):
        render_segments(Conversation(msgs, "chat"), tok, "last_turn")


def test_an_earlier_reply_is_trained_as_later_renders_keep_it_without_the_closing_eos(char_tok):
    """A Phi-3-style template writes EOS once, after a conversation's last turn (none after a generation prompt):
    an earlier reply's render ends "<|end|>\n<|endoftext|>", the later renders have "<|end|>\n<|user|>". The
    reply is trained as the conversation reads, without that EOS; every multi-turn row was a bad row."""
    import copy

    from stages.data import BadRow, Conversation, render_segments

    tok = copy.deepcopy(char_tok)
    tok.chat_template = ("{%- for message in messages -%}<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
                         "<|end|>{{ '\\n' }}{%- endfor -%}"
                         "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}")
    msgs = (("user", "u1"), ("assistant", "a1 "), ("user", "u2"), ("assistant", "a2"))
    segs = render_segments(Conversation(msgs, "chat"), tok, "all_turns")
    assert [(s.text, s.train) for s in segs] == [
        ("<|user|>\nu1<|end|>\n<|assistant|>\n", False), ("a1 <|end|>\n", True),
        ("<|user|>\nu2<|end|>\n<|assistant|>\n", False), ("a2<|end|>\n<|endoftext|>", True)]
    assert "".join(s.text for s in segs) == tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in msgs], tokenize=False)
    # ... the EOS and a newline after it: both dropped from the earlier reply
    tok.chat_template = tok.chat_template.replace("{{ eos_token }}", "{{ eos_token }}{{ '\\n' }}")
    assert [s.text for s in render_segments(Conversation(msgs, "chat"), tok, "all_turns") if s.train] == [
        "a1 <|end|>\n", "a2<|end|>\n<|endoftext|>\n"]
    # what the template writes after an earlier reply otherwise (another closing token; the reply itself left
    # out) is not a conversation's end dropped: the replies cannot be trained apart
    for other in ("{%- if message['role'] == 'assistant' and not loop.last -%}<|pad|>{%- else -%}{{ eos_token }}"
                  "{%- endif -%}",
                  "{%- if loop.last or message['role'] != 'assistant' -%}{{ message['content'] }}{%- endif -%}"):
        tok.chat_template = ("{%- for message in messages -%}<|{{ message['role'] }}|>{{ '\\n' }}"
                             + (other if "content" in other else "{{ message['content'] }}" + other)
                             + "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}")
        replies = (("user", "u1"), ("assistant", "<|pad|>" if "content" in other else "a1"), *msgs[2:])
        with pytest.raises(BadRow, match="renders an earlier assistant reply otherwise"):
            render_segments(Conversation(replies, "chat"), tok, "all_turns")


def test_a_template_that_reads_the_date_renders_the_same_day_whenever_it_runs(char_tok, monkeypatch):
    """transformers gives a chat template the current date (strftime_now): a Llama-3.2-style "Today Date:" made
    the SFT rows rendered one day differ from the PPO prompts rendered the next, and a resumed run's prompts from
    its first day's. Every render now sees Friday 26 July 2024 (Llama-3.1's default date)."""
    import copy
    import datetime as dt

    import transformers.utils.chat_template_utils as ctu
    from stages.data import Conversation, render_segments
    from stages.ppo.prompts import render_prompt

    tok = copy.deepcopy(char_tok)
    tok.chat_template = ("{%- if date_string is not defined -%}{%- set date_string = strftime_now('%d %b %Y') -%}"
                         "{%- endif -%}<|system|>{{ '\\n' }}Today Date: {{ date_string }} "
                         "({{ strftime_now('%A, %B %-d, %y') }}){{ eos_token }}" + DEFAULT_CHAT_TEMPLATE)
    msgs = (("user", "hi"), ("assistant", "yo"))
    seen = {}
    for day in (dt.datetime(2025, 3, 1), dt.datetime(2025, 3, 2)):
        class Clock(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return day
        monkeypatch.setattr(ctu, "datetime", Clock)
        plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert day.strftime("%d %b %Y") in plain  # (the clock the templates read: this test can tell days apart)
        segs = render_segments(Conversation(msgs, "chat"), tok, "last_turn")
        seen[day] = (segs[0].text, render_prompt([msgs[0]], True, tok).text)
    (sft, ppo), = set(seen.values())  # the same text both days ...
    assert sft == ppo == ("<|system|>\nToday Date: 26 Jul 2024 (Friday, July 26, 24)<|endoftext|>"
                          "<|user|>\nhi<|endoftext|><|assistant|>\n")  # ... for SFT and PPO alike


def test_the_fixed_day_is_what_strftime_gives_and_a_template_renders_around_it_as_written(char_tok):
    """Every directive the clock fills in is that of Friday 26 July 2024 as strftime writes it, "%%" is "%",
    and the clock changes nothing else: the whitespace a template opens with is kept (a macro's end trims it),
    and a tokenizer's named templates render their default one."""
    import copy
    import datetime as dt

    from stages.data import FIXED_DAY, render_template

    day = dt.datetime(2024, 7, 26)
    assert FIXED_DAY == {code: day.strftime(code) for code in FIXED_DAY}
    tok = copy.deepcopy(char_tok)
    hi = [{"role": "user", "content": "hi"}]
    for template, expected in (("\n  {{ strftime_now('%Y') }}|{{ messages[0]['content'] }}", "\n  2024|hi"),
                               ("{{ strftime_now('100%% on %%d, %d %j') }}", "100% on %d, 26 208")):
        tok.chat_template = template
        assert render_template(tok, hi) == expected, template
    tok.chat_template = {"default": "[{{ strftime_now('%d %b') }}]", "other": "x"}
    assert render_template(tok, hi) == "[26 Jul]"


def test_add_eos_off_leaves_the_response_open(tmp_path, char_tok):
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "ab", "response": "cd"}])
    convs, _ = _load(path)
    with_eos, _ = _one(char_tok, convs)
    without, _ = _one(char_tok, convs, add_eos=False)
    assert with_eos[0]["input_ids"] == without[0]["input_ids"] + [char_tok.eos_token_id]


def _sentencepiece_style_tokenizer(texts: list[str], legacy: bool = False, split: bool = True):
    """A Llama-2 / Mistral-style tokenizer trained here: Metaspace word starts (a "▁" before the first piece
    of any text it is given), byte fallback, BOS added by the post-processor. `legacy`: the older tokenizer.json
    of those models, whose normalizer prepends the "▁" and replaces the spaces (no pre-tokenizer); not `split`:
    the pieces are not split at the spaces, so tokens merge across them ("\n\nHuman:▁")."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=split)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=split)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    return hf


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
@pytest.mark.parametrize("chat", [False, True, "thinking"])
def test_sft_rm_and_ppo_prompts_are_the_same_tokens_on_every_real_hh_row(hh_sample, kind, chat):
    """The PPO prompt (tokenized at once) must be exactly the tokens SFT and the reward model put before the
    response, or the policy samples after a context it was never trained on. A SentencePiece-style tokenizer
    marks a word start at the beginning of each piece it encodes, so the conversation is tokenized as one text
    and split at the segments' character offsets. And the SFT sequence is the whole text's tokenization.
    "thinking": a Qwen3-style template, whose earlier replies render otherwise once a later turn follows."""
    from stages.config import PPODataConfig, RMDataConfig
    from stages.data import bos_ids, encode_segments
    from stages.pairs import load_pairs
    from stages.ppo.prompts import load_prompts

    records = [json.loads(line) for line in hh_sample.read_text(encoding="utf-8").splitlines()]
    texts = [r["chosen"] for r in records]
    tok = _sentencepiece_style_tokenizer(texts) if kind == "sentencepiece" else train_tokenizer(texts, 1500, 2)
    bos = bos_ids(tok)
    assert bool(bos) == (kind == "sentencepiece")
    if chat == "thinking":
        tok.chat_template = THINKING_TEMPLATE
    source = DataSource(path=str(hh_sample))
    prompts, _, _ = load_prompts(source, PPODataConfig(train=source, format="hh", use_chat_template=bool(chat),
                                                    max_prompt_length=10**6), tok, BadRowLog())
    assert len(prompts) == len(records)  # every record has a usable prompt (row numbers line up)

    def row(where: str) -> int:
        return int(where.rsplit(" ", 1)[1]) - 1

    convs, _ = _load(hh_sample, format="hh", on_bad_row="skip", use_chat_template=bool(chat))
    assert len(convs) == 399
    if chat == "thinking":  # the rows with an earlier reply: each was a bad row there before 2026-12-07
        assert sum(sum(role == "assistant" for role, _ in conv.messages) > 1 for conv, _ in convs) > 150
    for conv, where in convs:
        ex, split = encode_segments(render_segments(conv, tok, "last_turn"), tok, True, bos)
        assert ex.input_ids[:split] == prompts[row(where)], where
        if not chat:
            whole = tok("".join(s.text for s in render_segments(conv, tok, "last_turn")))["input_ids"]
            assert ex.input_ids == whole + [tok.eos_token_id], where
    load = load_pairs(source, RMDataConfig(train=source, format="hh", on_bad_row="skip",
                                           use_chat_template=bool(chat)), BadRowLog())
    assert len(load.pairs) > 300
    for pair, where in load.pairs:
        for side in ("chosen", "rejected"):
            ex, split = encode_segments(render_segments(pair.conversation(side), tok, "last_turn"), tok, True, bos)
            assert ex.input_ids[:split] == prompts[row(where)], (where, side)


def test_prompts_are_the_ppo_prompts_with_a_vocabulary_merging_across_spaces(hh_sample):
    """A vocabulary whose tokens run across spaces and newlines ("\\n\\nAssistant:▁", "\\n\\nHuman:▁") joins the
    prompt to the response on most real HH rows, so prompt and response are tokenized apart: the tokens before
    the response are still the PPO prompt's, with every earlier turn (all_turns) and on both RM sides (the
    earlier turns were tokenized segment by segment: 281 of 399 multi-turn prompts were not PPO's)."""
    from stages.config import PPODataConfig, RMDataConfig
    from stages.data import bos_ids, encode_segments
    from stages.pairs import load_pairs
    from stages.ppo.prompts import load_prompts

    records = [json.loads(line) for line in hh_sample.read_text(encoding="utf-8").splitlines()]
    tok = _sentencepiece_style_tokenizer([r[side] for r in records for side in ("chosen", "rejected")], split=False)
    assert "\n\nHuman:▁" in tok.get_vocab() and "\n\nAssistant:▁" in tok.get_vocab()
    bos, source = bos_ids(tok), DataSource(path=str(hh_sample))
    prompts, _, _ = load_prompts(source, PPODataConfig(train=source, format="hh", max_prompt_length=10**6), tok,
                                 BadRowLog())
    convs, _ = _load(hh_sample, format="hh", on_bad_row="skip")
    rows = [(conv, int(where.rsplit(" ", 1)[1]) - 1) for conv, where in convs]
    load = load_pairs(source, RMDataConfig(train=source, format="hh", on_bad_row="skip"), BadRowLog())
    rows += [(pair.conversation(side), int(where.rsplit(" ", 1)[1]) - 1) for pair, where in load.pairs
             for side in ("chosen", "rejected")]
    multi = 0
    for conv, row in rows:
        for train_on in ("all_turns", "last_turn"):
            segments = render_segments(conv, tok, train_on)
            ex, split = encode_segments(segments, tok, True, bos)
            assert ex.input_ids[:split] == prompts[row], (row, train_on)
            assert tok.decode(ex.input_ids[split:], skip_special_tokens=True) == segments[-1].text.lstrip(" ")
            multi += sum(seg.train for seg in segments) > 1
    assert multi > 500  # (the all_turns rows with earlier assistant turns: 281 of 399 per side)


def test_a_token_running_into_an_earlier_turn_is_that_turn_s_and_trained():
    """A byte-level token across an earlier context/turn boundary ("Q: " + "Paris": " Paris") goes to the turn,
    trained: the tokens before the last turn stay the whole prompt's tokenization (PPO's); tokenized segment by
    segment they were not ("Q: " + "Paris" is not "Q: Paris"'s tokens)."""
    from stages.data import Segment, encode_segments

    tok = train_tokenizer(["Q: Paris Q: Rome, Q: Paris Q: Rome"] * 20, 300, 2)
    segments = [Segment("Q: ", False), Segment("Paris", True), Segment(" Q:", False), Segment(" Rome", True)]
    ex, split = encode_segments(segments, tok, True, [])
    prompt = tok("Q: Paris Q:", add_special_tokens=False)["input_ids"]
    paris = tok.convert_tokens_to_ids("ĠParis")
    assert ex.input_ids[:split] == prompt and paris in prompt
    assert ex.labels[prompt.index(paris)] == paris
    assert tok.decode(ex.input_ids[split:-1]) == " Rome"


@pytest.mark.parametrize("kind", ["byte-level", "byte-level-trimmed", "sentencepiece", "sentencepiece-legacy"])
def test_a_prompt_ending_in_a_space_keeps_the_response_s_first_word_trained(kind):
    """A byte-level tokenizer joins a prompt's trailing space to the response's first word (" Paris"), a
    SentencePiece-style one (Llama-2, Mistral) makes it the word's "▁": that token belongs to neither side, so
    the conversation is tokenized side by side: the prompt as PPO would get it (ending in " "), the response
    from its own first token, trained, and as it reads in the middle of a text: tokenized alone, a
    SentencePiece-style tokenizer gave it a word-start "▁" too, and the model learnt "is:  Paris" (two spaces).
    Byte-level offsets trimmed of spaces or not."""
    from tokenizers import processors

    from stages.data import Segment, encode_segments

    texts = ["the answer is: Paris, the answer is: Rome"] * 20
    if kind.startswith("byte-level"):
        tok = train_tokenizer(texts, 300, 2)
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=kind.endswith("trimmed"))
    else:
        tok = _sentencepiece_style_tokenizer(texts, legacy=kind.endswith("legacy"))
    prompt, response = "the answer is: ", "Paris"
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok(prompt + response, add_special_tokens=False)["input_ids"][:len(alone)] != alone  # a token across
    ex, split = encode_segments([Segment(prompt, False), Segment(response, True)], tok, True, [])
    p_ids, r_ids = ex.input_ids[:split], ex.input_ids[split:-1]
    assert p_ids == alone and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids, skip_special_tokens=True) == prompt + response  # one space
    assert tok.decode(r_ids) == response
    if kind.startswith("byte-level"):
        assert r_ids == tok(response, add_special_tokens=False)["input_ids"]
    assert ex.labels == [IGNORE] * len(p_ids) + r_ids + [tok.eos_token_id]


def test_a_quoted_control_token_stays_text_in_a_response_tokenized_on_its_own():
    """The side-by-side tokenization (a prompt ending in a space) reads the response's quoted "</s>" (a `plain`
    span) as text too, its place counted past the lead the response is tokenized after: no EOS inside it."""
    from stages.data import Segment, encode_segments

    tok = _sentencepiece_style_tokenizer(["the answer is: Paris, the answer is: Rome", "s / < >"] * 20)
    response = "Paris</s> or Rome"
    ex, split = encode_segments([Segment("the answer is: ", False), Segment(response, True, plain=((5, 9),))],
                                tok, True, [])
    assert tok.eos_token_id not in ex.input_ids[split:-1] and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[split:-1]) == response


def test_a_response_whose_start_merges_with_the_lead_is_read_mid_text_after_another_lead():
    """A vocabulary holding "\\nParis" merges the first lead with the response: the next lead is taken (tokenized
    alone, "Paris" got a word-start "▁": "the answer is:  Paris")."""
    from stages.data import Segment, encode_segments

    tok = _sentencepiece_style_tokenizer(["the answer is: Paris, the answer is:\nParis"] * 20)
    assert tok.convert_ids_to_tokens(tok("\nParis", add_special_tokens=False)["input_ids"])[-1] == "\nParis"
    ex, split = encode_segments([Segment("the answer is: ", False), Segment("Paris", True)], tok, False, [])
    assert "".join(tok.convert_ids_to_tokens(ex.input_ids[split:])) == "Paris"
    assert tok.decode(ex.input_ids) == "the answer is: Paris"


def test_a_slow_tokenizer_reads_each_segment_after_some_text_mid_text():
    """Without offsets (a slow tokenizer) the segments are tokenized one by one: the first with text as the text's
    start (after an empty one too), each later one mid-text (no word-start "▁" invented)."""
    from stages.data import Segment, encode_segments

    fast = _sentencepiece_style_tokenizer(["the answer is: Paris, the answer is: Rome"] * 20)

    class Slow(type(fast)):
        is_fast = False

    slow = Slow(tokenizer_object=fast.backend_tokenizer, eos_token="</s>", bos_token="<s>")
    ex, split = encode_segments([Segment("", False), Segment("the answer is: ", False), Segment("Paris", True)],
                                slow, False, [])
    assert ex.input_ids[:split] == slow("the answer is: ", add_special_tokens=False)["input_ids"]
    assert "".join(slow.convert_ids_to_tokens(ex.input_ids)).replace("▁", " ") == " the answer is: Paris"


def test_a_token_from_the_response_into_the_context_after_it_keeps_the_whole_text_s_tokens():
    """A token running from the response into context after it ("?\\n\\nQ:") splits nothing the PPO prompt
    needs: the row is the whole text's tokenization, that token the response's."""
    from stages.data import Segment, encode_segments

    tok = _sentencepiece_style_tokenizer(["Q: Paris?\n\nQ: Rome?\n\nQ: Oslo?"] * 20)
    segments = [Segment("Q:", False), Segment(" Paris?", True), Segment("\n\nQ: Rome?", False)]
    ex, split = encode_segments(segments, tok, False, [])
    whole = tok("Q: Paris?\n\nQ: Rome?", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == whole and ex.input_ids[:split] == tok("Q:", add_special_tokens=False)["input_ids"]
    crossing = [t for t in tok.convert_ids_to_tokens(whole) if "?" in t and "Q" in t]
    assert crossing, tok.convert_ids_to_tokens(whole)  # (the case: one token across the response's end)


def test_the_first_text_after_an_empty_prompt_is_tokenized_as_the_text_s_start():
    """Side by side (a later prompt ends in a space), the segments after some text are tokenized as in the
    middle of a text; one after an empty prompt starts the text and keeps its word-start "▁" ("▁the")."""
    from stages.data import Segment, encode_segments

    tok = _sentencepiece_style_tokenizer(["the answer is: Paris, the answer is: Rome"] * 20)
    segments = [Segment("", False), Segment("the answer", True), Segment(" is: ", False), Segment("Paris", True)]
    ex, split = encode_segments(segments, tok, True, [])
    opening = tok("the answer", add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:len(opening)] == opening and tok.convert_ids_to_tokens(opening[0]) == "▁the"
    assert tok.decode(ex.input_ids, skip_special_tokens=True) == "the answer is: Paris"


def test_a_utf8_bom_is_read_past_in_jsonl_json_and_csv(tmp_path):
    """Files saved by Windows editors start with a UTF-8 BOM: row 1 of a .jsonl, a .json array and a CSV header
    read as without it (the first row was a bad row, and a CSV's first column name got the BOM)."""
    from stages.data import BadRowLog, read_rows

    bom = b"\xef\xbb\xbf"
    row = {"prompt": "p", "response": "r"}
    (tmp_path / "a.jsonl").write_bytes(bom + ((json.dumps(row) + "\n") * 2).encode())
    (tmp_path / "a.json").write_bytes(bom + json.dumps([row, row]).encode())
    (tmp_path / "a.csv").write_bytes(bom + b"prompt,response\np,r\np,r\n")
    for name in ("a.jsonl", "a.json", "a.csv"):
        log = BadRowLog()
        rows = list(read_rows(DataSource(path=str(tmp_path / name)), "error", log))
        assert [r.data for r in rows] == [row, row] and log.total == 0, name


def test_hh_text_without_human_markers_is_a_bad_row_in_every_stage(tmp_path):
    """HH text whose markers are not '\\n\\nHuman:' (single newlines, CRLF inside the text): SFT and PPO refuse it
    alike, where PPO took the whole text, answer included, as the prompt; text starting 'Human:' renders in
    PPO as SFT renders it (with the leading blank line)."""
    from stages.config import PPODataConfig
    from stages.data import BadRow, parse_conversation
    from stages.ppo.prompts import parse_prompt

    text = "Human: how do I bake bread?\nAssistant: Use flour."
    with pytest.raises(BadRow, match="no human turn"):
        parse_conversation({"chosen": "\n" + text}, "hh", SFTDataConfig(train="x.jsonl"))
    with pytest.raises(BadRow, match="no human turn"):
        parse_prompt({"chosen": "\r\n\r\n" + text.replace("\n", "\r\n\r\n")}, "hh", PPODataConfig(train="x.jsonl"))
    turns, chat = parse_prompt({"chosen": "Human: hi\n\nAssistant: hello"}, "hh", PPODataConfig(train="x.jsonl"))
    assert turns == [("user", "\n\nHuman: hi\n\nAssistant:")] and not chat


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_special_token_strings_in_chat_messages_are_read_as_text_in_every_stage(tmp_path, kind):
    """A chat-template message quoting the tokenizer's control-token strings (scraped text with "</s>" or
    "<|endoftext|>", a user typing "<|assistant|>") is read as text: the only control tokens are the template's.
    Else SFT teaches the model to stop mid-reply, the RM reads its reward there, and a user turn can open an
    assistant turn. SFT, the RM and PPO's prompts read it alike; the data report counts such examples."""
    from stages.config import PPODataConfig, RMDataConfig
    from stages.data import bos_ids, encode_segments
    from stages.pairs import tokenize_pairs, load_pairs
    from stages.ppo.prompts import load_prompts

    texts = ["hello there how are you", "fine thanks and you", "say the word now", "a<b>c/d|e"] * 20
    tok = _sentencepiece_style_tokenizer(texts) if kind == "sentencepiece" else train_tokenizer(texts, 400, 2)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE  # <|role|>\n content EOS, for every message
    eos, bos = tok.eos_token, bos_ids(tok)
    user = f"say {eos} or <|assistant|> now" if kind == "byte-level" else f"say {eos} or <s> now"
    reply = f"fine{eos}thanks"
    rows = [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]}]
    convs, _ = _load(_jsonl(tmp_path / "m.jsonl", rows))
    rows_out, report = _one(tok, convs)
    assert report.special_as_text == 1 and report.examples == 2
    ids = rows_out[0]["input_ids"]
    assert ids.count(tok.eos_token_id) == 2  # the template's, after each message; none from the contents
    assert ids.count(tok.convert_tokens_to_ids("<|assistant|>" if kind == "byte-level" else "<s>")) == \
        (1 if kind == "byte-level" else len(bos))  # the generation header's (or the BOS) only
    trained = [t for t, lab in zip(ids, rows_out[0]["labels"]) if lab != IGNORE]
    assert trained.count(tok.eos_token_id) == 1 and trained[-1] == tok.eos_token_id
    if kind == "byte-level":  # every character survives: the quoted strings decode back as they were written
        assert tok.decode(ids) == f"<|user|>\n{user}{eos}<|assistant|>\n{reply}{eos}"
    else:  # ... and gain no word-start "▁" (a space) before them
        assert tok.decode(ids).endswith(f"{reply}{eos}") and f"say {eos} or <s> now{eos}" in tok.decode(ids)
    # PPO's prompt is SFT's context, token for token
    ex, split = encode_segments(render_segments(convs[0][0], tok, "last_turn"), tok, True, bos)
    source = DataSource(path=str(tmp_path / "m.jsonl"))
    prompts, _, as_text = load_prompts(source, PPODataConfig(train=source, format="messages"), tok, BadRowLog())
    assert prompts[0] == ex.input_ids[:split] and prompts[0].count(tok.eos_token_id) == 1  # the user turn's end
    assert as_text == 1  # counted, as in SFT's and the RM's reports
    # the RM: the chosen reply's quoted EOS is text, so the reply is not cut there (end_at_last_eos) ...
    pair = _jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": user}],
                                          "chosen": [{"role": "assistant", "content": reply}],
                                          "rejected": [{"role": "assistant", "content": "no"}]}])
    rm = RMDataConfig(train=DataSource(path=str(pair)), format="messages")
    rm_report = DataReport()
    out = tokenize_pairs(load_pairs(rm.train, rm, BadRowLog()).pairs, tok, rm, rm_report)
    chosen = out.chosen[0]["input_ids"]
    assert chosen[:split] == ex.input_ids[:split] and chosen.count(tok.eos_token_id) == 2 and \
        chosen[-1] == tok.eos_token_id and rm_report.special_as_text == 1


def test_a_template_that_alters_the_content_renders_the_message_as_before(tmp_path, char_tok):
    """The data's special-token strings are swapped for private-use marks while the template renders; a template
    that changes the content (here: cuts it) would break a mark, so the turns are rendered as they are."""
    cutting = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'][:6] }}{{ eos_token }}{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    convs = _exchange(tmp_path, "a<|user|>b", "yo")
    with _template(char_tok, cutting):
        segments = render_segments(convs[0][0], char_tok, "last_turn")
    assert [s.text for s in segments] == ["<|user|>a<|use<|endoftext|><|assistant|>", "yo<|endoftext|>"]
    assert all(not s.plain for s in segments)
    # ... as when the template refuses the marked content (a chat template may raise on what it does not expect)
    refusing = ("{% for m in messages %}{% if '\ue000' in m['content'] %}{{ raise_exception('odd') }}{% endif %}"
                "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}")
    with _template(char_tok, refusing):
        segments = render_segments(convs[0][0], char_tok, "last_turn")
    assert segments[0].text == "<|user|>a<|user|>b<|endoftext|>" and all(not s.plain for s in segments)


def test_content_special_tokens_control_keeps_them_and_a_slow_tokenizer_counts_none(tmp_path, char_tok):
    """data.content_special_tokens: control reads a content's special-token strings as the control tokens (data
    that means them: tool-call tags), in SFT and PPO's prompts alike; a slow tokenizer (no offsets to find
    them) can only do that, and the report does not count them as read as text."""
    from stages.config import PPODataConfig
    from stages.ppo.prompts import load_prompts

    convs = _exchange(tmp_path, "a<|user|>b", "c<|endoftext|>d")
    eos, user = char_tok.eos_token_id, char_tok.convert_tokens_to_ids("<|user|>")
    rows, report = _one(char_tok, convs, content_special_tokens="control")
    assert rows[0]["input_ids"].count(eos) == 3 and rows[0]["input_ids"].count(user) == 2
    assert report.special_as_text == 0
    source = DataSource(path=str(tmp_path / "m.jsonl"))
    for setting, users in (("control", 2), ("text", 1)):
        prompts, _, as_text = load_prompts(source, PPODataConfig(train=source, format="messages",
                                                              content_special_tokens=setting), char_tok, BadRowLog())
        assert prompts[0].count(user) == users and as_text == (setting == "text"), setting

    class Slow(type(char_tok)):
        is_fast = False

    slow = Slow(tokenizer_object=char_tok.backend_tokenizer, eos_token=char_tok.eos_token,
                chat_template=DEFAULT_CHAT_TEMPLATE)
    rows, report = _one(slow, convs)
    assert rows[0]["input_ids"].count(eos) == 3 and report.special_as_text == 0
    assert load_prompts(source, PPODataConfig(train=source, format="messages"), slow, BadRowLog()).special_as_text == 0


def test_a_bos_string_opening_a_message_is_text_and_the_bos_is_still_added(tmp_path):
    """A template that renders a message's content first: content opening with "<s>" (read as text) is no BOS,
    so the BOS the tokenizer wants is still put first, in SFT and PPO alike."""
    from stages.config import PPODataConfig
    from stages.data import bos_ids
    from stages.ppo.prompts import load_prompts

    tok = _sentencepiece_style_tokenizer(["hello there", "say the word now", "a<b>c/d|e"] * 20)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    convs = _exchange(tmp_path, "<s>hello", "there")
    rows, report = _one(tok, convs)
    bos = bos_ids(tok)
    assert bos and rows[0]["input_ids"][:len(bos)] == bos and rows[0]["input_ids"].count(bos[0]) == 1
    source = DataSource(path=str(tmp_path / "m.jsonl"))
    prompts, _, _ = load_prompts(source, PPODataConfig(train=source, format="messages"), tok, BadRowLog())
    assert prompts[0][:len(bos)] == bos and prompts[0].count(bos[0]) == 1


def test_eval_examples_that_repeat_training_ones_are_counted_for_sft_and_rm(tmp_path):
    """An eval file that repeats training rows makes eval loss/accuracy partly a measure of memory: the SFT and RM
    data reports count such eval examples (`in_train`, by messages; RM by prompt, chosen and rejected turns) and
    the start-up line says so. Here 3 of 8 eval rows are training rows."""
    import yaml

    from rlhf_cli.config_loader import load_config
    from stages.distributed import ONE_PROCESS
    from stages.reward import describe_pairs, load_rm_data
    from stages.sft import describe_report, load_sft_data

    tiny = REPO / "configs" / "tiny"
    model = yaml.safe_load((tiny / "sft.yaml").read_text())["model"]["from_config"]
    for stage, name, load, describe in (("sft", "sft.jsonl", load_sft_data, describe_report),
                                        ("train-rm", "rm.jsonl", load_rm_data, describe_pairs)):
        rows = (tiny / "data" / name).read_text().splitlines()[:40]
        (tmp_path / "train.jsonl").write_text("\n".join(rows[:30]) + "\n")
        (tmp_path / "eval.jsonl").write_text("\n".join(rows[27:35]) + "\n")  # rows 28-30 are training rows
        cfg = load_config(stage, tiny / ("sft.yaml" if stage == "sft" else "rm.yaml"), [
            f"output_dir={tmp_path / stage}", "model.name_or_path=null", f"model.from_config={json.dumps(model)}",
            f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}"])
        reports = load(cfg, tmp_path / stage, ONE_PROCESS, save=False)[-1]
        assert reports["eval"].in_train == 3 and reports["train"].in_train == 0, stage
        assert "; 3 also in the training data (scored on what was trained on)" in describe("eval", reports["eval"])
        assert "also in the training data" not in describe("train", reports["train"])


def test_a_data_report_warns_when_most_examples_were_cut():
    """`data.max_length: 8` cut every example and only the counts said so; more than half with their prompt, or
    their response, cut is now a warning naming the keys (half or fewer: none)."""
    from stages.data import DataReport

    assert DataReport(examples=4, prompt_truncated=2, response_truncated=1).cut_warning() is None
    assert DataReport(examples=4, prompt_truncated=1, response_truncated=3).cut_warning() == (
        "most of the 4 examples were cut to data.max_length (or data.max_prompt_length) (1 prompts, 3 responses): "
        "raise it unless that is meant")
    assert DataReport().cut_warning() is None


def test_a_data_report_warns_when_most_rows_read_were_skipped(tmp_path, capsys):
    """data.on_bad_row: skip trained on what was left however little: a chat template refusing 270 of 380 rows was
    a count in the report line only. Most rows of a source skipped is now a warning naming the commonest reason
    (half or fewer: none), for SFT and the RM, in the run and in --check-data, counted over the rows read before
    a validation share is held out (the train split alone keeps fewer)."""
    from stages.config import SFTConfig
    from stages.data import DataReport
    from stages.distributed import ONE_PROCESS
    from stages.sft import load_sft_data
    from stages.trainer import say_report

    report = DataReport(source_rows=5, examples=2, skipped_rows=3,
                        skipped_by_reason={"empty response": 1, "the template refuses it": 2})
    say_report(True, "train", report, lambda split, r: f"{split} data: {r.examples} pairs", "pairs")
    said = " ".join(capsys.readouterr().out.split())
    assert said == ("train data: 2 pairs warning: train data: 3 of the 5 rows read were skipped as bad rows, most "
                    "for: the template refuses it; mend the data or what the reason names"), said
    assert DataReport(source_rows=6, examples=3, skipped_rows=3, skipped_by_reason={"x": 3}).skip_warning() is None
    assert DataReport().skip_warning() is None
    good = [{"prompt": f"q{i}", "response": "a"} for i in range(10)]
    path = tmp_path / "rows.jsonl"
    for bad, warned in ((10, False), (11, True)):  # 10 usable rows, 1 held out for validation (9 kept for training)
        path.write_text("".join(json.dumps(r) + "\n" for r in good + [{"prompt": "q", "response": ""}] * bad))
        cfg = SFTConfig.model_validate({"output_dir": str(tmp_path / "out"), "model": ONE_LAYER_MODEL, "data": {
            "train": str(path), "on_bad_row": "skip", "eval_fraction": 0.1}})
        reports = load_sft_data(cfg, tmp_path / "out", ONE_PROCESS, save=False)[3]
        assert reports["train"].examples == 9 and reports["train"].source_rows == 10 + bad
        assert (reports["train"].skip_warning() is not None) is warned, bad


def test_split_or_subset_on_a_local_file_is_refused():
    """`data.train: {path: sft.jsonl, split: test}` read the whole file, the split ignored without a word; split and
    subset are for hub datasets."""
    from pydantic import ValidationError

    assert DataSource(path="org/dataset", split="test", subset="harmless").split == "test"
    assert DataSource(path="sft.jsonl").split == "train"
    for given in ({"split": "test"}, {"subset": "x"}):
        with pytest.raises(ValidationError, match="split/subset select a part of a hub dataset; sft.jsonl is a local "
                                                  "file, read whole"):
            DataSource(path="sft.jsonl", **given)


def test_a_chat_template_that_refuses_a_conversation_makes_a_bad_row(char_tok, tmp_path):
    """Mistral-style templates raise on roles that do not alternate (Gemma's on a system turn): that crashed every
    stage with a jinja2 traceback, `data.on_bad_row: skip` or not; it is now that row's error, or skipped."""
    import copy

    from stages.data import BadRow, Conversation, DataReport, render_segments, tokenize_conversations
    from stages.ppo.prompts import render_prompt

    tok = copy.deepcopy(char_tok)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    twice = Conversation((("user", "a"), ("user", "b"), ("assistant", "c")), "chat")
    with pytest.raises(BadRow, match="the chat template refuses it: Conversation roles must alternate"):
        render_segments(twice, tok, "last_turn")
    with pytest.raises(BadRow, match="the chat template refuses it"):
        render_prompt([("user", "a"), ("user", "b")], True, tok)
    good = Conversation((("user", "a"), ("assistant", "c")), "chat")
    report = DataReport()
    rows = tokenize_conversations([(twice, "f row 1"), (good, "f row 2")], tok, _data("f", on_bad_row="skip"), report)
    assert len(rows) == 1 and report.skipped_by_reason == {
        "the chat template refuses it: Conversation roles must alternate": 1}
    with pytest.raises(DataError, match="f row 1: the chat template refuses it"):
        tokenize_conversations([(twice, "f row 1")], tok, _data("f"), DataReport())


def test_an_unpaired_surrogate_escape_is_a_bad_row(tmp_path):
    """`"\\ud800"` (half of an emoji a cut string kept) is valid JSON but no valid Unicode: the tokenizer
    training or the tokenizer then crashed with a traceback, `on_bad_row: skip` or not. It is a bad row of
    JSON Lines and of a JSON array; a whole surrogate pair (an emoji) is fine."""
    from stages.data import BadRowLog, read_rows

    rows = ['{"prompt": "ok", "response": "x"}', '{"prompt": "cut \\ud83d", "response": "x"}',
            '{"prompt": "emoji \\ud83d\\ude00", "response": "y"}']
    jsonl = _jsonl(tmp_path / "s.jsonl", rows)
    array = tmp_path / "s.json"
    array.write_text("[" + ", ".join(rows) + "]")
    for path in (jsonl, array):
        log = BadRowLog()
        read = list(read_rows(DataSource(path=str(path)), "skip", log))
        assert [r.row for r in read] == [1, 3] and read[1].data["prompt"] == "emoji \U0001F600"
        assert log.reasons == {"an unpaired surrogate escape": 1}
        with pytest.raises(DataError) as exc:
            list(read_rows(DataSource(path=str(path)), "error", BadRowLog()))
        assert f"{path.name} row 2: an unpaired surrogate escape (\\ud83d): not valid Unicode text" in str(exc.value)


def test_a_key_given_twice_in_a_json_object_is_a_bad_row(tmp_path):
    """`{"chosen": "a", "chosen": "b"}` is valid JSON whose parse keeps "b" without a word: a bad row naming the
    key (also inside a message), in JSON Lines and in a JSON array; a CSV header naming a column twice is a data
    error naming it."""
    from stages.data import BadRowLog, read_rows

    rows = ['{"prompt": "ok", "response": "x"}', '{"prompt": "a", "response": "b", "response": "c"}',
            '{"messages": [{"role": "user", "content": "hi", "content": "yo"}]}', '{"prompt": "b", "response": "d"}']
    jsonl = _jsonl(tmp_path / "d.jsonl", rows)
    array = tmp_path / "d.json"
    array.write_text("[" + ", ".join(rows) + "]")
    for path in (jsonl, array):
        log = BadRowLog()
        assert [r.row for r in read_rows(DataSource(path=str(path)), "skip", log)] == [1, 4]
        assert log.reasons == {"the key 'response' twice in one JSON object": 1,
                               "the key 'content' twice in one JSON object": 1}
        with pytest.raises(DataError) as exc:
            list(read_rows(DataSource(path=str(path)), "error", BadRowLog()))
        assert f"{path.name} row 2: the key 'response' twice in one JSON object (only the last value" in str(exc.value)
    table = tmp_path / "d.csv"
    table.write_text("prompt,response,prompt\nhi,yo,ho\n")
    with pytest.raises(DataError, match=r"d\.csv: the header names column\(s\) 'prompt' more than once$"):
        list(read_rows(DataSource(path=str(table)), "skip", BadRowLog()))


def test_a_bad_message_says_what_it_found():
    """`messages[i] must be {role, content}` did not say what was wrong: a non-object, a role such as `tool`,
    content given as a list of parts (the OpenAI multimodal shape) or missing."""
    import re

    from stages.data import BadRow, parse_messages

    for value, found in (([1], "(got 1)"), ([{"role": "tool", "content": "x"}], "(got role 'tool')"),
                         ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          "(got content as a list of parts: give its text)"), ([{"role": "user"}], "(got no content)")):
        with pytest.raises(BadRow, match=re.escape(f"messages[0] must be {{role: system|user|assistant, content: "
                                                   f"string}} {found}")):
            parse_messages({"messages": value}, "messages")


def test_a_chat_template_that_is_not_valid_jinja_stops_the_run_once(char_tok):
    """A syntax error in the template is no row's fault: one DataError, not every row a bad row (skipped)."""
    import copy

    from stages.data import Conversation, DataReport, render_segments, tokenize_conversations

    tok = copy.deepcopy(char_tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }"
    conv = Conversation((("user", "a"), ("assistant", "c")), "chat")
    with pytest.raises(DataError, match="the chat template is not valid Jinja"):
        render_segments(conv, tok, "last_turn")
    with pytest.raises(DataError, match="the chat template is not valid Jinja"):
        tokenize_conversations([(conv, "f row 1")], tok, _data("f", on_bad_row="skip"), DataReport())


def test_sft_hh_rows_refuse_a_marker_after_a_single_line_break():
    from stages.data import BadRow, parse_conversation

    with pytest.raises(BadRow, match="a 'Assistant:' marker after a single line break"):
        parse_conversation({"chosen": "\n\nHuman: hi\nAssistant: hello\n\nAssistant: ok"}, "hh", _data("f"))
