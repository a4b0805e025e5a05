"""Data and preference-pair edge cases, hand-computed: rows left without a trained token, which truncation a
report counts, HH system preambles, the pair cut's budgets and bounds, repeated-prompt and trained-token counts,
rows of eval seen in training (each pinned after a mutant of it survived the suite)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ONE_LAYER_MODEL, turn
from stages.config import DataSource, ModelConfig, PPOConfig, RMDataConfig, SFTDataConfig
from stages.data import Conversation, DataReport, Segment, render_segments, tokenize_conversations
from stages.errors import DataError
from stages.models import train_tokenizer
from stages.pairs import ContextCut, PreferencePair, repeats_prompt, split_hh_pair, tokenize_pair, tokenize_pairs


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer(["abc"], vocab_size=261, min_frequency=1000)


def _sft(**kw):
    return SFTDataConfig(train=DataSource(path="unused"), **kw)


def _rm(**kw):
    return RMDataConfig(train="x.jsonl", **kw)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_an_example_left_without_trained_token_is_a_bad_row(char_tok):
    conv = [(Conversation((("user", ""), ("assistant", "x")), "raw_pr"), "f row 1")]
    with pytest.raises(DataError, match="no response token left after truncation"):
        tokenize_conversations(conv, char_tok, _sft(add_eos=False), DataReport())
    report = DataReport()
    rows = tokenize_conversations(conv, char_tok, _sft(add_eos=False, on_bad_row="skip"), report)
    assert len(rows) == 0 and report.examples == 0 and report.skipped_rows == 1


def test_a_cut_prompt_is_counted_as_a_prompt_cut_only(char_tok):
    # 30 prompt + 1 response + EOS = 32 > 20: cut = 30 - max(30 - 12, 5) = 12 prompt tokens, response whole
    conv = [(Conversation((("user", "P" * 30), ("assistant", "r")), "raw_pr"), "f row 1")]
    report = DataReport()
    rows = tokenize_conversations(conv, char_tok, _sft(max_length=20, max_prompt_length=5), report)
    assert (report.prompt_truncated, report.response_truncated) == (1, 0)
    assert rows[0]["input_ids"] == _ids(char_tok, "P" * 18 + "r") + [char_tok.eos_token_id]


def test_raw_hh_system_preamble_comes_before_the_first_human_marker():
    conv = Conversation((("system", "Sys"), ("user", " hi"), ("assistant", " yo")), "raw_hh")
    assert render_segments(conv, None, "last_turn") == [Segment("Sys\n\nHuman: hi\n\nAssistant:", False),
                                                        Segment(" yo", True)]


def test_the_shorter_side_keeps_its_prompt_budget(char_tok):
    # rejected: "\n\nHuman: qqqqqqqqqq\n\nAssistant:" = 31 prompt tokens + " b" + EOS = 34
    # chosen: 64 context tokens + " z" + EOS = 67; max_length 39 needs a cut of 28 on chosen, but rejected can give
    # only 31 - 4 = 27: both are cut by 27, rejected keeps its last 4 prompt tokens "ant:", chosen is cut right
    pair = PreferencePair((("user", " " + "q" * 10),),
                          (("assistant", " a"), ("user", " " + "L" * 10), ("assistant", " z")),
                          (("assistant", " b"),), "raw_hh")
    chosen, rejected = tokenize_pair(pair, char_tok, _rm(max_length=39, max_prompt_length=4), [])
    assert rejected.input_ids == _ids(char_tok, "ant: b") + [char_tok.eos_token_id]
    assert len(chosen.input_ids) == 39 and chosen.response_truncated


def test_a_cut_that_stops_just_before_the_difference_keeps_the_pair(char_tok):
    later = (("user", " " + "L" * 10), ("assistant", " z"))
    pair = PreferencePair((("user", " " + "q" * 10),), (("assistant", " a"),) + later, (("assistant", " b"),) + later,
                          "raw_hh")
    # 67 tokens each, first difference at index 32 ('a' vs 'b'); max_length 35 cuts exactly 32: kept
    chosen, rejected = tokenize_pair(pair, char_tok, _rm(max_length=35, max_prompt_length=4), [])
    assert chosen.input_ids[0] == _ids(char_tok, "a")[0] and rejected.input_ids[0] == _ids(char_tok, "b")[0]
    with pytest.raises(ContextCut):  # one more token cut reaches the difference
        tokenize_pair(pair, char_tok, _rm(max_length=34, max_prompt_length=4), [])


def test_hh_pair_differing_right_after_the_marker():
    assert split_hh_pair("\n\nHuman: hi\n\nAssistant:A", "\n\nHuman: hi\n\nAssistant:B") == (
        "\n\nHuman: hi\n\nAssistant:", "A", "B")


def test_a_prompt_of_exactly_16_characters_counts_as_repeated():
    p = "abcdefghijklmnop"  # 16 = REPEAT_MIN_CHARS
    assert repeats_prompt(PreferencePair((("user", p),), (("assistant", p + " X"),), (("assistant", p + " Y"),),
                                         "raw_pr"))
    assert not repeats_prompt(PreferencePair((("user", p[:-1]),), (("assistant", p + " X"),),
                                             (("assistant", p + " Y"),), "raw_pr"))


def test_trained_tokens_count_the_chosen_side(char_tok):
    pair = PreferencePair((("user", "q"),), (("assistant", "ab"),), (("assistant", "abcd"),), "raw_pr")
    report = DataReport()
    tokenize_pairs([(pair, "r1")], char_tok, _rm(), report)
    assert report.trained_tokens == 3  # a, b, EOS of the chosen side
    assert report.tokens == 4 + 6


def test_in_train_counts_eval_rows_seen_in_training_not_the_reverse(tmp_path):
    """train: rows 1-30 plus row 28 again; eval: rows 28-35. Eval rows also in train: 28, 29, 30 -> 3
    (counting training rows found in eval instead gives 4: row 28 twice)."""
    import yaml

    from conftest import REPO
    from rlhf_cli.config_loader import load_config
    from stages.distributed import ONE_PROCESS
    from stages.sft import load_sft_data

    tiny = REPO / "configs" / "tiny"
    model = yaml.safe_load((tiny / "sft.yaml").read_text())["model"]["from_config"]
    rows = (tiny / "data" / "sft.jsonl").read_text().splitlines()[:40]
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:30] + [rows[27]]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[27:35]) + "\n")
    cfg = load_config("sft", tiny / "sft.yaml", [
        f"output_dir={tmp_path / 'out'}", "model.name_or_path=null", f"model.from_config={json.dumps(model)}",
        f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}"])
    reports = load_sft_data(cfg, tmp_path / "out", ONE_PROCESS, save=False)[-1]
    assert reports["eval"].in_train == 3


def test_rows_in_the_layouts_of_popular_datasets_read_in_every_stage():
    """TRL's conversational rows (prompt and completion as message lists: SFT; a prompt list alone: PPO; a prompt
    list beside string responses: the RM) were refused as "'prompt' must be a string"; they are read through the
    chat template. An RM file's message-list `chosen` read as HH text, string pairs beside another prompt column
    read as HH, and PKU-SafeRLHF's response_0/response_1 rows now say how to read them."""
    from stages.config import Columns, PPODataConfig
    from stages.data import BadRow, parse_conversation
    from stages.pairs import detect_pair_format, parse_pair
    from stages.ppo.prompts import parse_prompt

    user, reply = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    system = {"role": "system", "content": "S"}
    sft = _sft(columns=Columns(response="completion"))
    conv = parse_conversation({"prompt": [system, user], "completion": [reply]}, "prompt_response", sft)
    assert conv == Conversation((("system", "S"), ("user", "Q"), ("assistant", "A")), "chat", context_turns=2)
    assert parse_conversation({"prompt": "Q", "completion": [reply]}, "prompt_response", sft) == Conversation(
        (("user", "Q"), ("assistant", "A")), "chat", context_turns=1)
    with pytest.raises(BadRow, match="'completion' holds no assistant turn"):
        parse_conversation({"prompt": [system], "completion": [user]}, "prompt_response", sft)
    assert parse_conversation({"prompt": "Q", "completion": "A"}, "prompt_response", sft).style == "raw_pr"  # as before
    ppo = PPODataConfig(train=DataSource(path="unused"))
    assert parse_prompt({"prompt": [system, user]}, "prompt", ppo) == ([("system", "S"), ("user", "Q")], True)
    assert parse_prompt({"prompt": "Q"}, "prompt", ppo) == ([("user", "Q")], False)
    pair = parse_pair({"prompt": [system, user], "chosen": "yes", "rejected": "no"}, "pairs", _rm())
    assert pair == PreferencePair((("system", "S"), ("user", "Q")), (("assistant", "yes"),), (("assistant", "no"),),
                                  "chat")
    # an RM file's message lists read for SFT or PPO prompts as HH text (the `chosen` column): how to read them
    listed = {"chosen": [user, reply], "rejected": [user, {"role": "assistant", "content": "B"}]}
    for read in (lambda: parse_conversation(listed, "hh", _sft()), lambda: parse_prompt(listed, "hh", ppo)):
        with pytest.raises(BadRow, match="'chosen' holds a message list, not HH-RLHF text: data.columns.messages: "
                                         "chosen reads it as a conversation"):
            read()
    # string pairs beside a prompt column of another name: format auto reads them as HH, and says what they are
    orca = {"system": "S", "question": "Q", "chosen": "yes", "rejected": "no"}
    assert detect_pair_format(orca, _rm()) == "hh"
    with pytest.raises(BadRow, match="no human turn.*; plain responses to a prompt are data.format pairs, with "
                                     "data.columns.prompt naming its column"):
        parse_pair(orca, "hh", _rm())
    # two responses and the index of the better one: no column mapping reads them the right way round
    pku = {"prompt": "Q", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0}
    with pytest.raises(BadRow, match="set data.columns; response_0 and response_1 are two responses whose better "
                                     "one another column names: write each row as chosen/rejected first"):
        detect_pair_format(pku, _rm())
    with pytest.raises(BadRow, match=r"; set data.columns$"):  # (no such hint for other rows)
        detect_pair_format({"prompt": "Q", "answer": "a"}, _rm())


def test_a_prompt_part_column_no_data_columns_key_names_is_said_in_every_stage(tmp_path, char_tok, capsys):
    """alpaca's `input` (mapped `prompt: instruction`) and an orca pair's `system` were left out of every row without
    a word: a column named as prompt parts are that data.columns does not name is a warning in each stage's
    report (data_report.json's unread_columns), and a column it names is read, so not said."""
    from stages.config import Columns, RMConfig, SFTConfig
    from stages.data import PROMPT_PARTS, BadRowLog, load_conversations
    from stages.distributed import ONE_PROCESS
    from stages.ppo.trainer import load_ppo_data
    from stages.reward import load_rm_data
    from stages.sft import load_sft_data
    from stages.trainer import say_report

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}) + "\n")
    sft = SFTConfig.model_validate({"output_dir": str(tmp_path / "sft"), "model": ONE_LAYER_MODEL, "data": {
        "train": str(alpaca), "columns": {"prompt": "instruction", "response": "output"}, "eval_fraction": 0}})
    report = load_sft_data(sft, tmp_path / "sft", ONE_PROCESS, save=False)[3]["train"]
    assert report.unread_columns == ["input"] and report.examples == 1
    say_report(True, "train", report, lambda split, r: f"{split} data")
    assert "warning: train data: column 'input' is not read (no data.columns key names it): if it is part of the " \
           "prompt, data.columns.input names a column joined after the prompt's text" in \
           " ".join(capsys.readouterr().out.split())
    log = BadRowLog()  # one that data.columns names is read, not said (here `instruction` is the one left out)
    load_conversations(DataSource(path=str(alpaca)), _sft(columns=Columns(prompt="input", response="output")), log)
    assert log.unread == ["instruction"]
    for part in PROMPT_PARTS:  # each, unnamed, is said (once per file)
        log = BadRowLog()
        log.note_columns({"prompt": "p", part: "x"}, Columns(), "f")
        log.note_columns({"prompt": "p", part: "x", "other": "y"}, Columns(), "f")
        assert log.unread == [part]
    orca = tmp_path / "orca.jsonl"
    orca.write_text("".join(json.dumps({"system": "Be brief.", "question": f"Q{i}", "chosen": "yes", "rejected": "no"})
                            + "\n" for i in range(2)))
    rm = RMConfig.model_validate({"output_dir": str(tmp_path / "rm"), "model": ONE_LAYER_MODEL, "data": {
        "train": str(orca), "columns": {"prompt": "question"}, "eval_fraction": 0}})
    reports = load_rm_data(rm, tmp_path / "rm", ONE_PROCESS, save=False)[4]
    assert reports["train"].unread_columns == ["system"] and reports["train"].examples == 2
    cfg = PPOConfig.model_validate({"output_dir": str(tmp_path), "model": {"name_or_path": "stub/policy"},
                                    "reward_model": {"name_or_path": "stub/rm"},
                                    "data": {"train": str(orca), "columns": {"prompt": "question"}, "eval_fraction": 0}})
    load_ppo_data(cfg, tmp_path, ONE_PROCESS, char_tok)
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: data.train: column 'system' is not read" in said, said
    assert json.loads((tmp_path / "data_report.json").read_text())["train"]["unread_columns"] == ["system"]


def test_input_and_system_columns_join_the_prompt_in_every_stage(tmp_path, char_tok):
    """data.columns.input (alpaca's input) is joined to the prompt after a blank line and data.columns.system
    (orca's system) is the first system turn, in SFT, the RM and PPO alike: the rows read exactly as the same
    prompt written out by hand (the same tokens), and the unread-column warning is gone. An empty or null part
    adds nothing; a system prompt in plain text, or beside a system turn, is a bad row naming its column."""
    from stages.config import Columns, PairColumns, PPODataConfig, PromptColumns, RMConfig
    from stages.data import BadRow, BadRowLog, parse_conversation, with_input, with_system
    from stages.distributed import ONE_PROCESS
    from stages.pairs import parse_pair
    from stages.ppo.prompts import load_prompts, parse_prompt
    from stages.reward import load_rm_data

    # hand values: the join, an empty prompt, nothing to add, a prompt list's last user turn, and the bad values
    assert with_input([("user", "Add")], {"in": "2 and 3"}, "in") == [("user", "Add\n\n2 and 3")]
    assert with_input([("user", "")], {"in": "2 and 3"}, "in") == [("user", "2 and 3")]
    for empty in ("", " \n", None):
        assert with_input([("user", "Add")], {"in": empty}, "in") == [("user", "Add")]
        assert with_system([("user", "Q")], {"sys": empty}, "sys", chat=False) == [("user", "Q")]
    assert with_input([("user", "Add")], {"in": "x"}, None) == [("user", "Add")]
    assert with_input([("user", " ")], {"in": "x"}, "in") == [("user", "x")]  # (a blank prompt: the input alone)
    assert with_input([("user", "Add")], {"in": " x\n"}, "in") == [("user", "Add\n\n x\n")]  # (as written)
    assert with_input([("system", "S"), ("user", "A"), ("assistant", "B"), ("user", "C")], {"in": "x"}, "in") == \
        [("system", "S"), ("user", "A"), ("assistant", "B"), ("user", "C\n\nx")]
    with pytest.raises(BadRow, match="missing key 'in'"):
        with_input([("user", "Add")], {}, "in")
    with pytest.raises(BadRow, match="'in' must be a string, got int"):
        with_input([("user", "Add")], {"in": 3}, "in")
    assert with_system([("user", "Q")], {"sys": "Be brief."}, "sys", chat=True) == [("system", "Be brief."),
                                                                                     ("user", "Q")]
    with pytest.raises(BadRow, match="'sys' holds a system prompt, which plain text has no place for: "
                                     "data.use_chat_template: true renders it as the system turn"):
        with_system([("user", "Q")], {"sys": "Be brief."}, "sys", chat=False)
    with pytest.raises(BadRow, match="a system prompt in 'sys' and a system turn in the conversation"):
        with_system([("system", "S"), ("user", "Q")], {"sys": "Be brief."}, "sys", chat=True)

    # each stage reads the columns as the prompt written out by hand
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}
    joined = {"instruction": "Add\n\n2 and 3", "output": "5"}
    sft_cols = Columns(prompt="instruction", response="output", input="input")
    assert parse_conversation(alpaca, "prompt_response", _sft(columns=sft_cols)) == \
        parse_conversation(joined, "prompt_response", _sft(columns=Columns(prompt="instruction", response="output")))
    conv = parse_conversation(alpaca, "prompt_response", _sft(columns=sft_cols.model_copy(update={"system": "system"}),
                                                              use_chat_template=True))
    assert conv == Conversation((("system", "Be brief."), ("user", "Add\n\n2 and 3"), ("assistant", "5")), "chat",
                                context_turns=1)  # (a system turn is never trained)
    listed = {"prompt": [{"role": "user", "content": "Add"}], "completion": [{"role": "assistant", "content": "5"}],
              "input": "2 and 3", "system": "Be brief."}
    conv = parse_conversation(listed, "prompt_response", _sft(columns=Columns(response="completion", input="input",
                                                                              system="system")))
    assert conv.messages[:2] == (("system", "Be brief."), ("user", "Add\n\n2 and 3")) and conv.context_turns == 2
    with pytest.raises(BadRow, match="'system' holds a system prompt"):  # plain prompt text
        parse_conversation(alpaca, "prompt_response", _sft(columns=sft_cols.model_copy(update={"system": "system"})))
    orca = {"system": "Be brief.", "question": "Q", "extra": "more", "chosen": "yes", "rejected": "no"}
    pair = parse_pair(orca, "pairs", _rm(columns=PairColumns(prompt="question", input="extra", system="system"),
                                         use_chat_template=True))
    assert pair == PreferencePair((("system", "Be brief."), ("user", "Q\n\nmore")), (("assistant", "yes"),),
                                  (("assistant", "no"),), "chat")
    hh = {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no", "sys": "S"}
    assert parse_pair(hh, "hh", _rm(columns=PairColumns(system="sys"), use_chat_template=True)).prompt == \
        (("system", "S"), ("user", "Q"))
    with pytest.raises(BadRow, match="'sys' holds a system prompt"):
        parse_pair(hh, "hh", _rm(columns=PairColumns(system="sys")))
    ppo = PPODataConfig(train=DataSource(path="unused"), use_chat_template=True,
                        columns=PromptColumns(prompt="question", input="extra", system="system"))
    assert parse_prompt(orca, "prompt", ppo) == ([("system", "Be brief."), ("user", "Q\n\nmore")], True)
    messages = {"messages": [{"role": "user", "content": "Q"}], "system": "Be brief.", "extra": ""}
    assert parse_prompt(messages, "messages", ppo)[0] == [("system", "Be brief."), ("user", "Q")]
    listed_prompt = {"question": [{"role": "user", "content": "Q"}], "extra": "more", "system": ""}
    assert parse_prompt(listed_prompt, "prompt", ppo)[0] == [("user", "Q\n\nmore")]
    empty = {"question": "", "extra": "more", "system": ""}  # (the input alone, in PPO as in SFT and the RM)
    assert parse_prompt(empty, "prompt", ppo)[0] == [("user", "more")]
    with pytest.raises(BadRow, match="empty 'question' and 'extra'"):
        parse_prompt(empty | {"extra": " "}, "prompt", ppo)
    # an input where no prompt column takes it (messages, hh, text) would be left out: a bad row in every stage
    hh_row = {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no",
              "extra": "more"}
    for read in (lambda: parse_prompt(messages | {"extra": "more"}, "messages", ppo),
                 lambda: parse_prompt(hh_row, "hh", ppo),
                 lambda: parse_pair(hh_row, "hh", _rm(columns=PairColumns(input="extra"))),
                 lambda: parse_conversation(hh_row, "hh", _sft(columns=Columns(input="extra"))),
                 lambda: parse_conversation({"text": "t", "extra": "more"}, "text", _sft(columns=Columns(input="extra")))):
        with pytest.raises(BadRow, match=r"'extra' \(data.columns.input\) is joined to a prompt column, which format "
                                         r"(messages|hh|text) has none of"):
            read()
    blank = {"extra": " "}  # (whitespace adds nothing, so nothing is lost: no bad row)
    assert parse_prompt(messages | blank, "messages", ppo)[0] == [("system", "Be brief."), ("user", "Q")]
    assert parse_conversation({"text": "t", "system": " \n"} | blank, "text",
                              _sft(columns=Columns(input="extra", system="system"))).messages[-1] == ("assistant", "t")
    assert parse_prompt({"messages": messages["messages"], "system": ""}, "messages", ppo)  # (no input column)
    pair_rows = {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(BadRow, match=r"'extra' \(data.columns.input\) is joined to a prompt column, which format "
                                     r"messages has none of"):
        parse_pair(pair_rows | {"extra": "more"}, "messages", _rm(columns=PairColumns(input="extra")))
    with pytest.raises(BadRow, match="'system' holds a system prompt, which format text does not read"):
        parse_conversation({"text": "t", "system": "S"}, "text", _sft(columns=Columns(system="system"),
                                                                       use_chat_template=True))
    # a bad system column is a bad row even beside identical responses (not counted as a tie)
    with pytest.raises(BadRow, match="missing key 'system'"):
        parse_pair({"question": "Q", "chosen": "a", "rejected": "a"}, "pairs",
                   _rm(columns=PairColumns(prompt="question", system="system"), use_chat_template=True))

    # the same tokens as the prompt written out, and nothing said unread: PPO's prompt ids, the RM's context
    path, by_hand = tmp_path / "orca.jsonl", tmp_path / "by_hand.jsonl"
    path.write_text(json.dumps(orca) + "\n")
    by_hand.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Q\n\nmore"}]}) + "\n")
    ids = load_prompts(DataSource(path=str(path)), ppo, char_tok, BadRowLog()).ids
    plain = ppo.model_copy(update={"columns": PromptColumns()})
    assert ids == load_prompts(DataSource(path=str(by_hand)), plain, char_tok, BadRowLog()).ids
    rm = RMConfig.model_validate({"output_dir": str(tmp_path / "rm"), "model": ONE_LAYER_MODEL, "data": {
        "train": str(path), "eval_fraction": 0, "use_chat_template": True,
        "columns": {"prompt": "question", "input": "extra", "system": "system"}}})
    report = load_rm_data(rm, tmp_path / "rm", ONE_PROCESS, save=False)[4]["train"]
    assert report.unread_columns == [] and report.examples == 1
    chosen = tokenize_pair(pair, char_tok, rm.data, [])[0]  # the RM reads its response after PPO's prompt
    n = len(ids[0])
    assert chosen.input_ids[:n] == ids[0] and set(chosen.labels[:n]) == {-100} and chosen.labels[n] != -100
    with pytest.raises(ValueError, match="prompt and input both name column 'question'"):
        PromptColumns(prompt="question", input="question")
    with pytest.raises(ValueError, match="input and system both name column 'x'"):
        PairColumns(input="x", system="x")


def test_format_text_trains_a_whole_text_and_is_never_chosen_by_auto(char_tok):
    """data.format: text (a pretraining-style row): the whole text of columns.document is the response to an empty
    prompt, plain text even with use_chat_template (so every token but an unpredicted first one is trained, then
    EOS). format auto never takes a row for it (plain text would train the human turns of a '### Human:' text
    too): its error says how."""
    from stages.config import Columns
    from stages.data import BadRow, detect_format, parse_conversation

    conv = parse_conversation({"text": "abc", "prompt": "x"}, "text", _sft(use_chat_template=True))
    assert conv == Conversation((("user", ""), ("assistant", "abc")), "raw_pr", whole_text=True)
    plain = parse_conversation({"prompt": "", "response": "abc"}, "prompt_response", _sft())
    assert plain.messages == conv.messages and not plain.whole_text  # (a response longer than a row is cut)
    segments = render_segments(conv, char_tok, "all_turns")
    assert [(seg.text, seg.train) for seg in segments if seg.text] == [("abc", True)]
    assert parse_conversation({"body": "abc"}, "text", _sft(columns=Columns(document="body"))) == conv
    for row, reason in (({"text": " "}, "empty 'text'"), ({"body": "abc"}, "missing key 'text'")):
        with pytest.raises(BadRow, match=reason):
            parse_conversation(row, "text", _sft())
    with pytest.raises(BadRow, match=r"set data.format/columns; data.format: text trains the whole text of 'text' "
                                     r"\(every token: a pretraining corpus\)$"):
        detect_format({"text": "### Human: hi ### Assistant: hello"}, Columns())
    with pytest.raises(BadRow, match=r"set data.format/columns$"):  # (no such hint without the column)
        detect_format({"body": "abc"}, Columns())


def test_prompt_columns_and_their_repeats_read_one_way_in_every_stage(char_tok):
    """(each pinned after a mutant of it survived) A prompt message list must end with a user turn in every stage
    (the responses follow it; PPO dropped a final reply the RM kept as context); a conversational completion
    alone is trained, never a reply inside the prompt list; the whole repeat of a prompt is dropped; a prompt
    turn the conversations lack makes a bad row; SHP's hint names its texts, not its ids, and rows without two
    response texts get none."""
    from stages.config import PPODataConfig
    from stages.data import BadRow, parse_conversation
    from stages.pairs import detect_pair_format, indexed_pair_hint, parse_pair
    from stages.ppo.prompts import parse_prompt

    q, x, a = turn("user", "Q"), turn("assistant", "X"), turn("assistant", "A")
    ends_with_reply = {"prompt": [q, x], "chosen": "A", "rejected": "B", "completion": [a]}
    for read in (lambda: parse_pair(ends_with_reply, "pairs", _rm()),
                 lambda: parse_prompt(ends_with_reply, "prompt", PPODataConfig(train=DataSource(path="unused"))),
                 lambda: parse_conversation(ends_with_reply, "prompt_response", _sft(columns={"response": "completion"}))):
        with pytest.raises(BadRow, match="'prompt' must end with a user turn .*, not assistant"):
            read()
    row = {"prompt": [q, x, turn("user", "Q2")], "completion": [a]}  # a reply inside the prompt: context
    conv = parse_conversation(row, "prompt_response", _sft(columns={"response": "completion"}))
    assert [s.text for s in render_segments(conv, char_tok, "all_turns") if s.train] == ["A<|endoftext|>"]
    # the most turns a prompt's end and the conversations' start share are its repeat
    s1, s2 = turn("system", "S1"), turn("system", "S2")
    yes, no = turn("assistant", "yes"), turn("assistant", "no")
    pair = parse_pair({"prompt": [q, x, q], "chosen": [q, x, q, yes], "rejected": [q, x, q, no]}, "messages", _rm())
    assert pair.chosen == (("assistant", "yes"),) and len(pair.prompt) == 3
    # a prompt turn the conversations lack (another system prompt): neither its repeat nor held, a bad row
    with pytest.raises(BadRow, match="neither begin with 'prompt' nor hold its turns"):
        parse_pair({"prompt": [s1, q], "chosen": [s2, q, yes], "rejected": [s2, q, no]}, "messages", _rm())
    # sides opening with a reply are responses to the prompt, whatever turns they hold later
    pair = parse_pair({"prompt": "Q", "chosen": [a, q, yes], "rejected": [a, q, no]}, "messages", _rm())
    assert pair.prompt == (("user", "Q"),) and pair.chosen == (("assistant", "A"), ("user", "Q"), ("assistant", "yes"))
    # a whitespace-only prompt column is no prompt
    pair = parse_pair({"prompt": "\n", "chosen": [q, yes], "rejected": [q, no]}, "messages", _rm())
    assert pair.prompt == (("user", "Q"),)
    shp = {"history": "How?", "c_root_id_A": "c1", "c_root_id_B": "c2", "score_A": 5, "score_B": 3,
           "human_ref_A": "A long answer.", "human_ref_B": "Another long answer.", "labels": 1}
    with pytest.raises(BadRow, match="set data.columns; human_ref_A and human_ref_B are two responses"):
        detect_pair_format(shp, _rm())
    assert indexed_pair_hint({"prompt": "p", "score_A": 5, "score_B": 3}) == ""  # (numbers, not texts)


def test_chosen_and_rejected_columns_told_apart_by_an_index_are_a_caution(tmp_path, capsys):
    """PKU-SafeRLHF's response_0/response_1 (SHP's human_ref_A/B) mapped as chosen/rejected load without error,
    but such data names the better response per row in another column: about half the pairs would be read the
    wrong way round. The RM's report says so (run and --check-data); response_j/response_k (stack-exchange-paired,
    j the better in every row) and plain names do not."""
    from stages.config import RMConfig
    from stages.distributed import ONE_PROCESS
    from stages.pairs import indexed_columns_caution
    from stages.reward import load_rm_data
    from stages.trainer import say_report

    pku = tmp_path / "pku.jsonl"
    pku.write_text("".join(json.dumps({"prompt": f"Q{i}", "response_0": "a", "response_1": "b",
                                       "better_response_id": i % 2}) + "\n" for i in range(4)))
    rm = RMConfig.model_validate({"output_dir": str(tmp_path / "rm"), "model": ONE_LAYER_MODEL, "data": {
        "train": str(pku), "columns": {"chosen": "response_0", "rejected": "response_1"}, "eval_fraction": 0}})
    report = load_rm_data(rm, tmp_path / "rm", ONE_PROCESS, save=False)[4]["train"]
    say_report(True, "train", report, lambda split, r: f"{split} data")
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: train data: data.columns.chosen and .rejected are response_0 and response_1, two responses told " \
           "apart by an index: unless response_0 is the better in every row, rewrite each row as chosen/rejected" in said
    assert indexed_columns_caution("human_ref_A", "human_ref_B") is not None
    for names in (("response_j", "response_k"), ("chosen", "rejected"), ("response_0", "response_0"),
                  ("answer_0", "response_1")):
        assert indexed_columns_caution(*names) is None, names


def test_rows_rendered_with_the_default_template_of_a_tokenizer_without_one_are_said_in_every_stage(
        tmp_path, capsys):
    """A tokenizer folder without a chat template gets the built-in default silently (and the trained model is
    saved with it): SFT's and the RM's report carry a caution, and PPO says it, when rows of any split (PPO: or
    its PTX rows, said once) were rendered through the template (messages rows); raw prompt/response rows, or a
    tokenizer with its own template (here the one the stage trains for a from_config model), are not
    cautioned."""
    from stages.config import RMConfig, SFTConfig
    from stages.distributed import ONE_PROCESS
    from stages.reward import load_rm_data
    from stages.sft import load_sft_data

    bare = train_tokenizer(["user says hi", "assistant says hello"], vocab_size=300, min_frequency=1)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "tok")
    assert not list((tmp_path / "tok").glob("chat_template*"))
    messages, raw = tmp_path / "messages.jsonl", tmp_path / "raw.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}) + "\n")
    raw.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    said = f"tokenizer {tmp_path / 'tok'} has no chat template: rows were rendered with the built-in default"

    def sft_cautions(data: Path, model: dict) -> list[str]:
        cfg = SFTConfig.model_validate({"output_dir": str(tmp_path / "sft"), "model": model,
                                        "data": {"train": str(data), "eval_fraction": 0}})
        return load_sft_data(cfg, tmp_path / "sft", ONE_PROCESS, save=False)[3]["train"].cautions

    bare_model = {**ONE_LAYER_MODEL, "tokenizer": str(tmp_path / "tok")}
    assert [c[:len(said)] for c in sft_cautions(messages, bare_model)] == [said]
    assert sft_cautions(raw, bare_model) == [] and sft_cautions(messages, ONE_LAYER_MODEL) == []
    beside = SFTConfig.model_validate({"output_dir": str(tmp_path / "sft"), "model": bare_model,  # raw train rows,
                                       "data": {"train": str(raw), "eval": str(messages)}})  # a messages eval file
    assert [c[:len(said)] for c in load_sft_data(beside, tmp_path / "sft", ONE_PROCESS, save=False)[3]["train"]
            .cautions] == [said]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    given = SFTConfig.model_validate({"output_dir": str(tmp_path / "sft"), "model": bare_model, "data": {
        "train": str(messages), "eval_fraction": 0, "chat_template": template}})
    assert load_sft_data(given, tmp_path / "sft", ONE_PROCESS, save=False)[3]["train"].cautions == []  # its own
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                 "rejected": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "no"}]}) + "\n")
    rm = RMConfig.model_validate({"output_dir": str(tmp_path / "rm"), "model": bare_model,
                                  "data": {"train": str(pairs), "eval_fraction": 0}})
    assert [c[:len(said)] for c in load_rm_data(rm, tmp_path / "rm", ONE_PROCESS, save=False)[4]["train"].cautions] \
        == [said]
    raw_pairs = tmp_path / "raw_pairs.jsonl"
    raw_pairs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "no"}) + "\n")
    rm_beside = RMConfig.model_validate({"output_dir": str(tmp_path / "rm"), "model": bare_model,
                                         "data": {"train": str(raw_pairs), "eval": str(pairs)}})
    assert [c[:len(said)] for c in load_rm_data(rm_beside, tmp_path / "rm", ONE_PROCESS, save=False)[4]["train"]
            .cautions] == [said]
    from stages.models import prepare_tokenizer
    from stages.ppo.trainer import load_ppo_data

    capsys.readouterr()
    ppo = PPOConfig.model_validate({"output_dir": str(tmp_path / "ppo"), "model": {"name_or_path": "stub/policy"},
                                    "reward_model": {"name_or_path": "stub/rm"},
                                    "data": {"train": str(messages), "eval_fraction": 0}})
    policy_tok = prepare_tokenizer(ModelConfig(**bare_model), tmp_path / "ppo", ONE_PROCESS, lambda: iter(()), None,
                                   save=False)
    load_ppo_data(ppo, tmp_path / "ppo", ONE_PROCESS, policy_tok, save=False)
    assert f"warning: {said}" in " ".join(capsys.readouterr().out.split())
    ptx = PPOConfig.model_validate({**ppo.model_dump(), "ppo": {"ptx_coef": 0.5},  # raw prompts, PTX in messages:
                                    "data": {"train": str(raw), "eval_fraction": 0, "ptx": str(messages)}})
    load_ppo_data(ptx, tmp_path / "ppo", ONE_PROCESS, policy_tok, save=False)  # said once, on the PTX line
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("has no chat template") == 1 and f"warning: PTX data: {said}" in out
    load_ppo_data(ptx.model_copy(update={"data": ptx.data.model_copy(update={"train": ptx.data.ptx})}),
                  tmp_path / "ppo", ONE_PROCESS, policy_tok, save=False)  # messages in both: said once, for the prompts
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("has no chat template") == 1 and f"warning: PTX data: {said}" not in out
