"""Preference-pair data: formats, HH-RLHF prompt splitting on the real sample, identical pairs, margins,
shared prompt truncation."""

from __future__ import annotations

import json

import pytest

from conftest import turn
from stages.config import DataSource, RMDataConfig
from stages.data import IGNORE, BadRow, BadRowLog, DataReport, render_segments
from stages.errors import DataError
from stages.models import train_tokenizer
from stages.pairs import (
    IdenticalPair,
    PreferencePair,
    load_pairs,
    parse_pair,
    split_hh_pair,
    tokenize_pair,
    tokenize_pairs,
)


def _data(path: str = "x.jsonl", **kw) -> RMDataConfig:
    return RMDataConfig(train=path, **kw)


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    texts = [f"user asks question {i} and the assistant answers {i * 7}" for i in range(200)]
    return train_tokenizer(texts, vocab_size=400, min_frequency=1)


def test_split_hh_pair_cuts_the_shared_prefix_at_the_last_assistant_marker():
    c = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: bye\n\nAssistant: see you"
    r = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: bye\n\nAssistant: see ya"
    # the texts agree up to "see y": the prompt still ends at the marker, never inside a response
    assert split_hh_pair(c, r) == (
        "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: bye\n\nAssistant:", " see you", " see ya"
    )
    # they differ in an earlier assistant turn: everything after that turn's marker is the response
    r2 = "\n\nHuman: hi\n\nAssistant: no\n\nHuman: bye\n\nAssistant: see you"
    prompt, rc, rr = split_hh_pair(c, r2)
    assert prompt == "\n\nHuman: hi\n\nAssistant:" and rc == " hello there\n\nHuman: bye\n\nAssistant: see you"
    with pytest.raises(BadRow, match="share no dialogue prefix"):
        split_hh_pair("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x")
    with pytest.raises(IdenticalPair):
        split_hh_pair(c, c)


def test_hh_pairs_on_the_real_sample_render_back_to_the_original_texts(hh_sample):
    records = [json.loads(line) for line in hh_sample.read_text(encoding="utf-8").splitlines()]
    data = _data(format="hh", on_bad_row="skip")
    ok = 0
    for rec in records:
        try:
            pair = parse_pair(rec, "hh", data)
        except BadRow as exc:
            assert str(exc) == "empty chosen response"
            assert rec["chosen"].endswith("Assistant:") or not rec["chosen"].rsplit("Assistant:", 1)[1].strip()
            continue
        ok += 1
        prompt, rc, rr = split_hh_pair(rec["chosen"], rec["rejected"])
        assert prompt.endswith("\n\nAssistant:") and rec["chosen"] == prompt + rc and rec["rejected"] == prompt + rr
        assert rc != rr and pair.prompt[-1][0] == "user"
        for side in ("chosen", "rejected"):
            segments = render_segments(pair.conversation(side), None, "last_turn")
            assert "".join(s.text for s in segments) == rec[side]  # nothing lost or added
            assert [s.text for s in segments if s.train] == [(rc if side == "chosen" else rr)]
    assert ok == 399  # one record of the sample has an empty chosen response
    log = BadRowLog()
    loaded = load_pairs(DataSource(path=str(hh_sample)), data, log)
    assert len(loaded.pairs) == 399 and log.reasons == {"empty chosen response": 1}
    with pytest.raises(DataError, match=rf"{hh_sample.name} row \d+: empty chosen response"):
        load_pairs(DataSource(path=str(hh_sample)), _data(format="hh"), BadRowLog())


def test_the_three_formats_and_auto_detection(tmp_path):
    user = {"role": "user", "content": "q?"}
    rows = [
        # explicit prompt + assistant messages
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
        # implicit prompt: the shared leading messages
        {"chosen": [user, {"role": "assistant", "content": "yes"}],
         "rejected": [user, {"role": "assistant", "content": "no"}]},
        # a plain-string prompt with message responses
        {"prompt": "q?", "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ]
    log = BadRowLog()
    loaded = load_pairs(DataSource(path=str(_write(tmp_path, rows))), _data(duplicates="keep"), log)
    assert len(loaded.pairs) == 3 and not log.total and loaded.duplicates == 0
    dropped = load_pairs(DataSource(path=str(_write(tmp_path, rows))), _data(), log)  # the same pair three times
    assert len(dropped.pairs) == 1 and dropped.duplicates == 2
    with pytest.raises(DataError, match=r"pairs.jsonl row 2: duplicate of .*pairs.jsonl row 1 "):
        load_pairs(DataSource(path=str(_write(tmp_path, rows))), _data(duplicates="error"), log)
    for pair, _ in loaded.pairs:
        assert pair == PreferencePair((("user", "q?"),), (("assistant", "yes"),), (("assistant", "no"),), "chat")
    strings = load_pairs(DataSource(path=str(_write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}],
                                                     "s.jsonl"))), _data(), log).pairs[0][0]
    assert strings.style == "raw_pr" and strings.chosen == (("assistant", "a"),)
    chat = parse_pair({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs", _data(use_chat_template=True))
    assert chat.style == "chat"
    hh = parse_pair({"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}, "hh",
                    _data(use_chat_template=True))
    assert hh == PreferencePair((("user", "p"),), (("assistant", "a"),), (("assistant", "b"),), "chat")


def test_identical_pairs_are_dropped_and_counted_bad_rows_name_file_and_row(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "chosen": "a", "rejected": ""},
    ]
    path = _write(tmp_path, rows)
    with pytest.raises(DataError, match=rf"{path} row 3: missing key 'rejected'"):
        load_pairs(DataSource(path=str(path)), _data(format="pairs"), BadRowLog())
    log = BadRowLog()
    loaded = load_pairs(DataSource(path=str(path)), _data(format="pairs", on_bad_row="skip"), log)
    assert len(loaded.pairs) == 1 and loaded.identical == 1
    assert log.reasons == {"missing key 'rejected'": 1, "empty 'rejected'": 1}
    only_identical = _write(tmp_path, [rows[1]], "same.jsonl")
    with pytest.raises(DataError, match="no usable preference pairs .*1 identical pair"):
        load_pairs(DataSource(path=str(only_identical)), _data(), BadRowLog())
    # a message pair whose last turn is not the assistant's
    with pytest.raises(BadRow, match="chosen must end with an assistant turn"):
        q, more = {"role": "user", "content": "q"}, {"role": "user", "content": "more"}
        parse_pair({"chosen": [q, {"role": "assistant", "content": "A"}, more],
                    "rejected": [q, {"role": "assistant", "content": "B"}, more]}, "messages", _data())


def test_margin_column(tmp_path):
    data = _data(columns={"margin": "m"})
    assert parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "m": 1.5}, "pairs", data).margin == 1.5
    assert parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "m": "2"}, "pairs", data).margin == 2.0
    assert parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "m": -0.5}, "pairs", data).margin == -0.5
    for bad in ("x", None, True):
        with pytest.raises(BadRow, match="'m' must be a number"):
            parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "m": bad}, "pairs", data)
    # a misspelt column: missing, said as such (it was "must be a number, got NoneType")
    with pytest.raises(BadRow, match=r"missing key 'm' \(data.columns.margin; keys present: chosen, prompt, rejected, "
                                     r"score\)"):
        parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, "pairs", data)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,chosen,rejected,m\nq,a,b,0.5\n")
    assert load_pairs(DataSource(path=str(csv)), data, BadRowLog()).pairs[0][0].margin == 0.5


def test_both_sides_share_the_prompt_cut_and_keep_eos(tok):
    prompt = "user asks question " + " ".join(str(i) for i in range(40))
    pair = PreferencePair((("user", prompt),), (("assistant", "answers 7"),),
                          (("assistant", "answers " + " ".join(str(i * 7) for i in range(30))),), "raw_pr")
    data = _data(max_length=40, max_prompt_length=10)
    chosen, rejected = tokenize_pair(pair, tok, data, [])
    n_prompt_c = next(i for i, t in enumerate(chosen.labels) if t != IGNORE)
    n_prompt_r = next(i for i, t in enumerate(rejected.labels) if t != IGNORE)
    # the rejected side needs the larger cut; the chosen prompt is cut just as much, so the contexts match
    assert n_prompt_c == n_prompt_r == 10
    assert chosen.input_ids[:10] == rejected.input_ids[:10]
    assert len(rejected.input_ids) == 40 and rejected.response_truncated and rejected.prompt_truncated
    assert chosen.input_ids[-1] == rejected.input_ids[-1] == tok.eos_token_id  # cut response still ends in EOS
    assert chosen.labels[-1] == tok.eos_token_id  # a whole response: its EOS is an LM label
    assert rejected.labels[-1] == IGNORE and rejected.labels[-2] != IGNORE  # a cut one: the forced EOS is not
    assert len(chosen.input_ids) < 40 and chosen.prompt_truncated and not chosen.response_truncated


def test_pairs_identical_after_truncation_are_dropped(tok):
    long = "answers " + " ".join(str(i) for i in range(50))
    pairs = [
        (PreferencePair((("user", "q"),), (("assistant", long + " 1"),), (("assistant", long + " 2"),), "raw_pr"), "r1"),
        (PreferencePair((("user", "q"),), (("assistant", "answers 7"),), (("assistant", "answers 8"),), "raw_pr"), "r2"),
    ]
    report = DataReport()
    rows = tokenize_pairs(pairs, tok, _data(max_length=20, add_eos=False), report)
    assert len(rows) == 1 and report.identical_pairs == 1 and report.examples == 1
    assert report.identical_after_truncation == 1  # counted apart: preferences max_length destroyed
    assert rows.chosen[0]["input_ids"] != rows.rejected[0]["input_ids"]
    assert report.tokens == len(rows.chosen[0]["input_ids"]) + len(rows.rejected[0]["input_ids"])
    # equal as tokens whatever the cut (a lower-casing tokenizer), yet cut: identical, but not made so by max_length
    import copy

    from tokenizers import normalizers

    lower = copy.deepcopy(tok)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    cased = PreferencePair((("user", "q " + long),), (("assistant", "answers 7"),), (("assistant", "ANSWERS 7"),),
                           "raw_pr")
    report = DataReport()
    assert len(tokenize_pairs([(cased, "r3")] + pairs, lower, _data(max_length=20, add_eos=False), report)) == 1
    assert report.identical_pairs == 2 and report.identical_after_truncation == 1


def test_a_template_that_adds_text_after_eos_still_ends_each_side_at_eos(tok):
    """ChatML-style templates end a turn with EOS + newline; a sampled response ends at its EOS, so the reward
    model is trained on sequences that end there too."""
    import copy

    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{{ '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )
    pair = PreferencePair((("user", "question 1"),), (("assistant", "answers 7"),), (("assistant", "answers 8"),),
                          "chat")
    chosen, rejected = tokenize_pair(pair, tok, _data(), [])
    for ex in (chosen, rejected):
        assert ex.input_ids[-1] == tok.eos_token_id and ex.input_ids.count(tok.eos_token_id) == 2
    assert tok.decode(chosen.input_ids).endswith("answers 7" + tok.eos_token)
    # without add_eos the rendered text is kept as it is
    kept, _ = tokenize_pair(pair, tok, _data(add_eos=False), [])
    assert tok.decode(kept.input_ids).endswith(tok.eos_token + "\n")


def test_sides_must_differ_in_the_response_and_a_repeated_prompt_is_not_doubled():
    user = {"role": "user", "content": "hi"}
    a, b = {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}
    # UltraFeedback layout: a prompt string and full conversations that repeat it
    pair = parse_pair({"prompt": "hi", "chosen": [user, a], "rejected": [user, b]}, "messages", _data())
    assert pair == PreferencePair((("user", "hi"),), (("assistant", "A"),), (("assistant", "B"),), "chat")
    # the two sides answer different questions: not a comparison of responses
    other = {"role": "user", "content": "other"}
    with pytest.raises(BadRow, match="differ in a user/system turn"):
        parse_pair({"chosen": [user, a], "rejected": [other, a]}, "messages", _data())
    # ... also when only one side has a user turn where they first differ (it asks another question first)
    with pytest.raises(BadRow, match=r"differ in a user/system turn, not in a response \(message 1: assistant vs user\)"):
        parse_pair({"chosen": [user, a], "rejected": [user, other, b]}, "messages", _data())
    # HH text with no '\n\nHuman:' marker (single newlines, say): no human turn, refused
    with pytest.raises(BadRow, match="no human turn"):
        parse_pair({"chosen": "\n\nAssistant: hi\n\nAssistant: A", "rejected": "\n\nAssistant: hi\n\nAssistant: B"},
                   "hh", _data())
    with pytest.raises(BadRow, match="differ in a human turn"):
        split_hh_pair("\n\nHuman: hi\n\nAssistant: A\n\nHuman: x\n\nAssistant: C",
                      "\n\nHuman: hi\n\nAssistant: A\n\nHuman: y\n\nAssistant: C")
    for bad in ("nan", float("inf")):
        with pytest.raises(BadRow, match="'m' must be a finite number"):
            parse_pair({"prompt": "p", "chosen": "a", "rejected": "b", "m": bad}, "pairs", _data(columns={"margin": "m"}))


def test_a_prompt_column_beside_whole_conversations_is_never_read_twice():
    """A prompt column and message-list sides that repeat it other than exactly (trailing whitespace, a system
    turn first, the prompt column holding only the dialogue's last question, a [system, user] prompt before
    sides that start at the user turn) were read with the prompt twice, silently: each row's prompt now appears
    once, the sides' own turns kept when they hold the column's; sides that neither begin with nor hold it are a
    bad row; an empty prompt column is no prompt."""
    sys_, q, q2, a1 = turn("system", "S"), turn("user", "Q"), turn("user", "Q2"), turn("assistant", "A1")
    yes, no = turn("assistant", "yes"), turn("assistant", "no")

    def as_pair(prompt, *sides):
        return parse_pair({"prompt": prompt, "chosen": [*sides, yes], "rejected": [*sides, no]}, "messages", _data())

    responses = (("assistant", "yes"),), (("assistant", "no"),)
    for prompt, sides, expected in (
            ("Q\n", [q], (("user", "Q\n"),)),  # the repeat, but for whitespace
            ([sys_, q], [q], (("system", "S"), ("user", "Q"))),  # the repeat of the prompt's last turn
            ("Q", [sys_, q], (("system", "S"), ("user", "Q"))),  # conversations holding it after a system turn
            ("Q2", [q, a1, q2], (("user", "Q"), ("assistant", "A1"), ("user", "Q2"))),  # ... its last question
            ("", [q], (("user", "Q"),)), ([], [q], (("user", "Q"),)),  # no prompt: the shared opening
            ("Q", [], (("user", "Q"),))):  # responses to the prompt, as before
        pair = as_pair(prompt, *sides)
        assert (pair.prompt, (pair.chosen, pair.rejected)) == (expected, responses), (prompt, sides)
    with pytest.raises(BadRow, match="'chosen' and 'rejected' are conversations that neither begin with 'prompt' nor "
                                     "hold its turns: give the prompt in one place"):
        as_pair("another question", q)


def test_a_prompt_cut_from_the_left_keeps_its_bos_on_both_sides(tok):
    """Llama-family models expect BOS at position 0: the left cut of a long prompt happens after it."""
    prompt = "user asks question " + " ".join(str(i) for i in range(40))
    pair = PreferencePair((("user", prompt),), (("assistant", "answers 7"),), (("assistant", "answers 8"),), "raw_pr")
    bos = [tok.convert_tokens_to_ids("<|pad|>")]  # any id standing for a BOS
    plain = tokenize_pair(pair, tok, _data(max_length=20, max_prompt_length=10), [])
    for side, other in zip(tokenize_pair(pair, tok, _data(max_length=20, max_prompt_length=10), bos), plain):
        assert side.prompt_truncated and side.input_ids[0] == bos[0] and side.labels[0] == IGNORE
        assert side.input_ids[1:] == other.input_ids[1:]  # one token more cut after the BOS, the rest the same


def test_a_side_with_more_turns_does_not_make_the_other_side_lose_its_response(tok):
    """HH pairs may continue one side for more turns: its context is longer and needs the larger cut. Both
    sides are cut alike, by no more than the other side's prompt gives (down to prompt_budget), never into its
    response; the longer side's response is cut from the right. When even that would cut into where the sides
    differ (ContextCut), or leave the longer side's response no room (NoRoom), the pair is dropped: it used to
    keep the longer side's tail alone, its differing first answer cut away."""
    from stages.pairs import NoRoom

    prompt = (("user", " user asks question 1 and 2 and 3 " + " ".join(str(i) for i in range(20))),)
    more = " ".join(f"question {i}" for i in range(30))
    pair = PreferencePair(prompt, (("assistant", " answers 7"), ("user", " " + more), ("assistant", " answers 14")),
                          (("assistant", " answers 21"),), "raw_hh")
    full, _ = tokenize_pair(pair, tok, _data(max_length=512), [])
    chosen, rejected = tokenize_pair(pair, tok, _data(max_length=len(full.input_ids) - 8, max_prompt_length=4), [])
    answer = tok(" answers 21", add_special_tokens=False)["input_ids"]
    n_prompt = next(i for i, t in enumerate(rejected.labels) if t != IGNORE)
    assert rejected.input_ids[n_prompt:] == answer + [tok.eos_token_id] and n_prompt >= 4
    assert rejected.labels[n_prompt:] == answer + [tok.eos_token_id]
    assert chosen.prompt_truncated and rejected.prompt_truncated
    assert full.input_ids[8:8 + n_prompt] == chosen.input_ids[:n_prompt] == rejected.input_ids[:n_prompt]  # alike
    with pytest.raises(NoRoom):
        tokenize_pair(pair, tok, _data(max_length=40, max_prompt_length=4), [])


def test_a_pair_differing_before_its_final_turn_is_dropped_when_the_cut_reaches_the_difference(tok):
    """Sides that differ in an earlier assistant turn (the final answers alike): a prompt cut that reaches the
    differing turn left two sequences that differ in how much leftover context they kept, trained on as a
    preference. Such a pair is dropped and counted (context_cut_pairs); uncut, or cut only where the sides agree,
    it is kept, both sides cut alike."""
    from stages.pairs import ContextCut

    long = " ".join(str(i) for i in range(40))
    later = (("user", "q " + long), ("assistant", "answers 8"))  # a long turn after the differing one
    pair = PreferencePair((("user", "q 1"),), (("assistant", "answers 7"),) + later,
                          (("assistant", "answers 9 9 9"),) + later, "chat")
    with pytest.raises(ContextCut):
        tokenize_pair(pair, tok, _data(max_length=40, max_prompt_length=4), [])
    report = DataReport()
    assert len(tokenize_pairs([(pair, "r1")], tok, _data(max_length=40, max_prompt_length=4), report)) == 0
    assert report.context_cut_pairs == 1 and report.identical_pairs == 0
    chosen, rejected = tokenize_pair(pair, tok, _data(max_length=512), [])  # uncut: kept whole
    assert not chosen.prompt_truncated and chosen.input_ids != rejected.input_ids
    cut_c, cut_r = tokenize_pair(pair, tok, _data(max_length=len(rejected.input_ids) - 6, max_prompt_length=4), [])
    assert cut_c.prompt_truncated and cut_r.prompt_truncated  # cut alike, only where the sides agree:
    assert tok.decode(cut_c.input_ids).startswith("\nanswers 7") and tok.decode(cut_r.input_ids).startswith("\nanswers 9")


def test_a_pair_alike_to_its_final_answer_whose_kept_prompt_fills_max_length_is_counted_as_no_room(tok):
    """Sides that differ only in their final answer, the prompt (n tokens) kept whole by max_prompt_length: at
    max_length n + 1 the one slot after it is the forced EOS, so no answer token is left: dropped and counted as
    no_room_pairs (not as a pair differing before its final turn, nor as identical); at n + 2 kept."""
    from stages.pairs import NoRoom

    pair = PreferencePair((("user", "q " + " ".join(str(i) for i in range(12))),), (("assistant", "yes yes"),),
                          (("assistant", "no no"),), "chat")
    full, _ = tokenize_pair(pair, tok, _data(max_length=512), [])
    n = next(i for i, t in enumerate(full.labels) if t != IGNORE)
    with pytest.raises(NoRoom):
        tokenize_pair(pair, tok, _data(max_length=n + 1, max_prompt_length=n), [])
    report = DataReport()
    assert len(tokenize_pairs([(pair, "r1")], tok, _data(max_length=n + 1, max_prompt_length=n), report)) == 0
    assert (report.no_room_pairs, report.context_cut_pairs, report.identical_pairs) == (1, 0, 0)
    chosen, rejected = tokenize_pair(pair, tok, _data(max_length=n + 2, max_prompt_length=n), [])
    assert chosen.input_ids[:n] == rejected.input_ids[:n] == full.input_ids[:n]
    assert chosen.input_ids[n] != rejected.input_ids[n] and chosen.input_ids[-1] == tok.eos_token_id


def test_every_kept_side_keeps_a_trained_response_token(tok):
    """A longer side whose context leaves one slot (which add_eos turns into the forced EOS) kept no response
    token at all; across every max_length, a kept pair's sides each keep one, or the pair is dropped."""
    from stages.pairs import ContextCut, NoRoom

    prompt = (("user", " user asks question 1 and 2 and 3 " + " ".join(str(i) for i in range(20))),)
    more = " ".join(f"question {i}" for i in range(30))
    pair = PreferencePair(prompt, (("assistant", " answers 7"), ("user", " " + more), ("assistant", " answers 14")),
                          (("assistant", " answers 21"),), "raw_hh")
    full, _ = tokenize_pair(pair, tok, _data(max_length=512), [])
    kept = 0
    for max_length in range(8, len(full.input_ids) + 1):
        try:
            sides = tokenize_pair(pair, tok, _data(max_length=max_length, max_prompt_length=4), [])
        except (ContextCut, NoRoom):
            continue
        kept += 1
        assert all(any(t != IGNORE for t in side.labels) for side in sides), max_length
    assert kept


def test_hh_pairs_refuse_a_marker_after_a_single_line_break_in_a_response():
    """The RM read `\\n\\nAssistant: Sure.\\nHuman: and then?` as one response (SFT and PPO refuse such text)."""
    chosen = "\n\nHuman: hi\n\nAssistant: Sure.\nHuman: and then?"
    with pytest.raises(BadRow, match="a 'Human:' marker after a single line break"):
        parse_pair({"chosen": chosen, "rejected": "\n\nHuman: hi\n\nAssistant: No."}, "hh", _data())


def test_hh_pairs_of_crlf_text_say_what_sft_and_ppo_say():
    """CRLF line ends (no `\n\nHuman:` marker) were refused as sharing no dialogue prefix, a plain-responses
    hint: now, as SFT and PPO say, no human turn; single line breaks before the markers, a lone marker."""
    import re

    from stages.data import NO_HUMAN_TURN

    crlf = {"chosen": "\r\n\r\nHuman: hi\r\n\r\nAssistant: a", "rejected": "\r\n\r\nHuman: hi\r\n\r\nAssistant: b"}
    with pytest.raises(BadRow, match=re.escape(NO_HUMAN_TURN)):
        parse_pair(crlf, "hh", _data())
    single = {"chosen": "\n\nHuman: hi\nAssistant: a", "rejected": "\n\nHuman: hi\nAssistant: b"}
    with pytest.raises(BadRow, match="a 'Assistant:' marker after a single line break"):
        parse_pair(single, "hh", _data())
    other_turn = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: a"}
    with pytest.raises(BadRow, match="share no dialogue prefix ending in"):  # well-formed, no shared prompt
        parse_pair(other_turn, "hh", _data())


def test_pairs_whose_responses_repeat_the_prompt_are_counted_and_said(tok):
    """`{prompt: P, chosen: P + a, rejected: P + b}` (full texts beside a prompt column) reads the prompt twice:
    counted and said in the report, the text kept as given (a shared opening may be the answers' own: "Hi"
    before "Hi there!" is not taken for a repeat, nor is any prompt shorter than REPEAT_MIN_CHARS)."""
    from stages.reward import describe_pairs

    data = _data()
    long = "user asks question 12 and 13"
    pairs = [(parse_pair({"prompt": long, "chosen": long + " answers 7", "rejected": long + " answers 8"}, "pairs",
                         data), "r1"),
             (parse_pair({"prompt": "Hi", "chosen": "Hi there", "rejected": "Hi you"}, "pairs", data), "r2")]
    report = DataReport()
    assert len(tokenize_pairs(pairs, tok, data, report)) == 2 and report.prompt_repeats == 1
    assert pairs[0][0].chosen == (("assistant", long + " answers 7"),)  # kept as given
    assert "; 1 pair(s) whose chosen and rejected both begin with the prompt text (read twice: give the responses " \
           "alone)" in describe_pairs("train", report)
