"""The reward model reads a sampled response where its training data ends a turn (stages/ppo/ending.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from stages.config import GenerationConfig, ModelConfig, RMDataConfig
from stages.data import IGNORE
from stages.models import train_tokenizer
from stages.pairs import PreferencePair, tokenize_pair
from stages.ppo.ending import RewardEnding, ending_columns, reward_ending
from stages.ppo.rollout import left_pad, raw_scores
from stages.reward_model import build_reward_model

EOT = "<end_of_turn>"
#: Gemma's shape: the end-of-turn token, then a newline, and no EOS in the template
GEMMA = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOT + "\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
#: Llama-3's shape: the end-of-turn token right after the text
LLAMA3 = GEMMA.replace(EOT + "\n", EOT)
#: ChatML with EOS as the end of turn (Qwen2.5-Instruct): EOS, then a newline
CHATML = GEMMA.replace(EOT + "\n", "{{ eos_token }}\n")
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def base_tok():
    tok = train_tokenizer([f"the answer to {i} is {i + 1}" for i in range(50)], vocab_size=300, min_frequency=1)
    tok.add_tokens([EOT], special_tokens=True)
    return tok


def _with(tok, template: str):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def test_each_stop_token_is_followed_by_what_the_template_writes_after_it(base_tok):
    eos, eot = base_tok.eos_token_id, base_tok.convert_tokens_to_ids(EOT)
    newline = base_tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    other = base_tok("answer", add_special_tokens=False)["input_ids"][0]  # a user's stop id the template lacks
    gemma = reward_ending(_with(base_tok, GEMMA), [eos, eot, other], {"chat"})
    assert gemma.after == {eot: (*newline, eos), eos: (), other: (eos,)} and gemma.width == 2
    assert reward_ending(_with(base_tok, LLAMA3), [eos, eot], {"chat"}).after == {eot: (eos,), eos: ()}
    # ChatML: the RM data drops the newline after the final EOS, so nothing follows EOS
    assert reward_ending(_with(base_tok, CHATML), [eos, eot], {"chat"}).after == {eot: (eos,), eos: ()}
    # prompts in plain text: the RM data was plain text too (EOS after the response), whatever the template
    assert reward_ending(_with(base_tok, GEMMA), [eos, eot], {"raw_hh"}).after == {eot: (eos,), eos: ()}
    # a template that requires a system turn first is rendered with one; one that renders nothing: plain text,
    # with a warning
    system_first = _with(base_tok, "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}"
                                   "{% endif %}" + GEMMA)
    assert reward_ending(system_first, [eos, eot], {"chat"}).after == {eot: (*newline, eos), eos: ()}
    broken = _with(base_tok, "{{ raise_exception('roles must alternate') }}")
    warned: list[str] = []
    assert reward_ending(broken, [eos, eot], {"chat"}, warned.append).after == {eot: (eos,), eos: ()}
    assert warned == ["warning: the chat template renders no plain conversation (the chat template refuses it: roles "
                      "must alternate); the reward model reads a response with EOS appended after its stop token, as "
                      "for plain text"]


def test_an_rm_trained_without_eos_reads_each_stop_token_as_the_template_writes_it(base_tok):
    """data.add_eos: false: the RM's rows end as the template renders them, so a stop token the template writes
    keeps what follows it there, and one it never writes is dropped and replaced by the whole tail."""
    eos, eot = base_tok.eos_token_id, base_tok.convert_tokens_to_ids(EOT)
    newline = base_tok("\n", add_special_tokens=False)["input_ids"][0]
    gemma = reward_ending(_with(base_tok, GEMMA), [eos, eot], {"chat"}, add_eos=False)
    assert gemma.after == {eot: (newline,), eos: (eot, newline)} and gemma.drop == {eos} and not gemma.add_eos
    chatml = reward_ending(_with(base_tok, CHATML), [eos, eot], {"chat"}, add_eos=False)
    assert chatml.after == {eos: (newline,), eot: (eos, newline)} and chatml.drop == {eot}
    plain = reward_ending(_with(base_tok, GEMMA), [eos, eot], {"raw_pr"}, add_eos=False)
    assert plain.after == {eos: (), eot: ()} and plain.drop == {eos, eot} and plain.width == 1
    # a stop id that is text (a user's stop_token_ids) is part of the answer: kept, the tail after it
    text = base_tok("answer", add_special_tokens=False)["input_ids"][0]
    assert reward_ending(_with(base_tok, GEMMA), [eos, text], {"chat"}, add_eos=False).after[text] == (eot, newline)
    assert text not in reward_ending(_with(base_tok, GEMMA), [eos, text], {"raw_pr"}, add_eos=False).drop


def test_template_text_before_the_reply_is_not_taken_for_the_tail(base_tok):
    """Qwen3's template writes an empty think block before the final reply ("<think>\\n\\n</think>\\n\\n"
    here with <end_of_turn> standing for </think>); a stop id found there (a newline, or </think>) must not
    read the reply text itself as what follows it: only what follows the reply is the tail."""
    eos, eot = base_tok.eos_token_id, base_tok.convert_tokens_to_ids(EOT)
    newline = base_tok("\n", add_special_tokens=False)["input_ids"][0]
    qwen3 = CHATML.replace("{{ m['content'] }}", "{% if m['role'] == 'assistant' %}" + EOT + "\n\n{% endif %}"
                           "{{ m['content'] }}")
    ending = reward_ending(_with(base_tok, qwen3), [eos, eot, newline], {"chat"})
    assert ending.after == {eos: (), eot: (eos,), newline: (eos,)} and ending.width == 1


def test_a_stop_token_twice_in_the_tail_is_followed_by_what_comes_after_its_last(base_tok, monkeypatch):
    """A tail [9, 5, 9, EOS] (a template writing the stop token twice): the RM's rows have EOS after the stop
    token's last occurrence, not 5, 9, EOS after its first."""
    from stages.ppo import ending

    eos = base_tok.eos_token_id
    monkeypatch.setattr(ending, "template_tail", lambda *args, **kwargs: [9, 5, 9, eos])
    assert reward_ending(base_tok, [9], {"chat"}).after == {9: (eos,), eos: ()}


def test_ending_columns_append_each_rows_tail_after_a_masked_gap():
    """Rows ending on EOS (2), on the end of turn (5), truncated (cap reached), and on a token that is no stop."""
    ending = RewardEnding(2, {2: (), 5: (9, 2)})
    last = torch.tensor([2, 5, 7, 8])
    truncated = torch.tensor([False, False, True, False])
    for eos_on_truncation, cut in ((True, [2, 0]), (False, [0, 0])):
        ids, mask, drop = ending_columns(last, truncated, ending, eos_on_truncation)
        assert ids.tolist() == [[0, 0], [9, 2], cut, [2, 0]]
        assert mask.tolist() == [[0, 0], [1, 1], [int(eos_on_truncation), 0], [1, 0]]
        assert drop.tolist() == [False] * 4
    # an RM trained without EOS: EOS (dropped) is replaced by the tail (9), the end of turn (5) keeps its own;
    # truncated rows and rows on no stop token get nothing, whatever eos_on_truncation says
    no_eos = RewardEnding(2, {2: (5, 9), 5: (9,)}, frozenset({2}), add_eos=False)
    ids, mask, drop = ending_columns(last, truncated, no_eos, True)
    assert ids.tolist() == [[5, 9], [9, 0], [0, 0], [0, 0]] and mask.tolist() == [[1, 1], [1, 0], [0, 0], [0, 0]]
    assert drop.tolist() == [True, False, False, False]
    # a truncated row gets EOS (with eos_on_truncation) even if its last token is a stop: the cap cut it there
    ids, mask, _ = ending_columns(torch.tensor([5]), torch.tensor([True]), ending, True)
    assert ids.tolist() == [[2, 0]] and mask.tolist() == [[1, 0]]
    # the tensors are made once per device and kept
    assert ending.tensors(torch.device("cpu"))[0] is ending.tensors(torch.device("cpu"))[0]
    assert RewardEnding.plain(2).after == {2: ()} and RewardEnding.plain(2).width == 1


@pytest.mark.parametrize("template, style, add_eos, stop", [
    (GEMMA, "chat", True, EOT),          # answer<end_of_turn>  ->  answer<end_of_turn> "\\n" <eos>
    (GEMMA, "chat", False, EOT),         # answer<end_of_turn>  ->  answer<end_of_turn> "\\n"
    (GEMMA, "chat", False, "eos"),       # answer<eos>          ->  answer [eos masked] <end_of_turn> "\\n"
    (LLAMA3, "chat", False, EOT),        # answer<end_of_turn>  ->  answer<end_of_turn>
    (CHATML, "chat", False, "eos"),      # answer<eos>          ->  answer<eos> "\\n"
    (None, "raw_pr", False, "eos"),      # answer<eos>          ->  answer [eos masked]
    (None, "raw_hh", False, "eos"),      # (the same, HH-RLHF text)
    (None, "raw_pr", False, "text"),     # answer's last token is a stop id: it stays, nothing appended
    (GEMMA, "chat", False, "text"),      # ... and is followed by the template's tail <end_of_turn> "\\n"
], ids=["gemma-eot", "gemma-no-eos-eot", "gemma-no-eos-eos", "llama3-no-eos-eot", "chatml-no-eos", "plain-no-eos",
        "hh-no-eos", "plain-no-eos-text-stop", "gemma-no-eos-text-stop"])
def test_a_stopped_response_scores_as_its_rm_training_row(base_tok, template, style, add_eos, stop):
    """PPO samples `answer<stop>` and stops; the RM trained on the row its data (data.add_eos, the template)
    renders for the same answer. With the template's ending the PPO score of the stopped response (right-padded,
    the tail after a masked gap, the prompt left-padded) equals the RM's score of that training row; EOS alone
    (what PPO appended before) reads another position. Without EOS in the RM's rows a truncated response (the
    answer cut, no stop) scores as its cut training row, nothing appended."""
    tok = _with(base_tok, template)
    eos = tok.eos_token_id
    text = tok(" is 4" if style == "raw_hh" else "is 4", add_special_tokens=False)["input_ids"]
    stop_id = {"eos": eos, "text": text[-1]}.get(stop) or tok.convert_tokens_to_ids(stop)
    roles = {"chat": ("user", "assistant"), "raw_pr": ("prompt", "response"), "raw_hh": ("user", "assistant")}[style]
    answer = " is 4" if style == "raw_hh" else "is 4"
    pair = PreferencePair(((roles[0], "the answer to 3"),), ((roles[1], answer),), ((roles[1], "is 5"),), style)
    row, _ = tokenize_pair(pair, tok, RMDataConfig(train="x.jsonl", add_eos=add_eos), [])
    start = next(i for i, label in enumerate(row.labels) if label != IGNORE)
    assert row.input_ids[start:start + len(text)] == text
    prompt = row.input_ids[:start]
    response = text if stop == "text" else text + [stop_id]
    prompts = [prompt, prompt[:2] + prompt]  # a longer second prompt: the first row (compared) is left-padded
    p_ids, p_mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))

    def batch(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        resp = torch.tensor([tokens + [tok.pad_token_id] * 2] * 2)  # right padding as in a rollout batch
        resp_mask = torch.tensor([[1] * len(tokens) + [0, 0]] * 2)
        return torch.cat([p_ids, resp], 1), torch.cat([p_mask, resp_mask], 1)

    torch.manual_seed(0)
    rm = build_reward_model(ModelConfig(from_config=TINY), tok, "fp32", {}, seed=0, with_lm_head=False, resize=True).eval()
    gen, stopped, cut = GenerationConfig(), torch.tensor([False, False]), torch.tensor([True, True])
    ending = reward_ending(tok, [eos, tok.convert_tokens_to_ids(EOT), stop_id], {style}, add_eos=add_eos)

    def rm_score(ids: list[int]) -> float:
        return rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].item()

    with torch.no_grad():
        scored = raw_scores(gen, rm, *batch(response), stopped, ending)
        eos_only = raw_scores(gen, rm, *batch(response), stopped, RewardEnding.plain(eos))
        assert scored[0].item() == pytest.approx(rm_score(row.input_ids), abs=1e-5)
        assert eos_only[0].item() != pytest.approx(rm_score(row.input_ids), abs=1e-3)
        if not add_eos:  # the answer cut after its first token: its training row is the prompt and that token
            truncated = raw_scores(gen, rm, *batch(text[:1]), cut, ending)
            assert truncated[0].item() == pytest.approx(rm_score(prompt + text[:1]), abs=1e-5)


def test_the_run_names_the_stop_tokens_scored_with_more_than_eos(base_tok):
    from stages.ppo.ending import describe_ending

    eos, eot = base_tok.eos_token_id, base_tok.convert_tokens_to_ids(EOT)
    gemma = _with(base_tok, GEMMA)
    assert describe_ending(reward_ending(gemma, [eos, eot], {"chat"}), gemma) == (
        "the reward model reads a response that stopped at '<end_of_turn>' after '\\n' '<|endoftext|>' "
        "(as its training data ends a turn)")
    assert describe_ending(reward_ending(_with(base_tok, LLAMA3), [eos, eot], {"chat"}), base_tok) is None
    assert describe_ending(reward_ending(gemma, [eos, eot], {"chat"}, add_eos=False), gemma) == (
        "the reward model reads a response that stopped at '<|endoftext|>' without it, followed by '<end_of_turn>' "
        "'\\n'; at '<end_of_turn>' after '\\n' (as its training data ends a turn, without EOS)")
    assert describe_ending(reward_ending(gemma, [eos], {"raw_pr"}, add_eos=False), gemma) == (
        "the reward model reads a response that stopped at '<|endoftext|>' without it (as its training data ends a "
        "turn, without EOS)")


# ============================================================================================ _common_suffix, ending_for
def test_common_suffix_keeps_a_list_that_is_all_tail():
    """The longest run both lists end with, also when it is the whole of the shorter one (or of both)."""
    from stages.ppo.ending import _common_suffix

    assert _common_suffix([9, 2], [7, 9, 2]) == [9, 2]  # all of `a`
    assert _common_suffix([7, 9, 2], [9, 2]) == [9, 2]  # all of `b`
    assert _common_suffix([4, 2], [4, 2]) == [4, 2]  # equal lists: all of it
    assert _common_suffix([1], [2]) == [] and _common_suffix([], [3]) == []


def test_ending_for_reads_the_rm_as_its_setting_or_record_says_and_tells_the_line(base_tok, tmp_path):
    """`ending_for`: data.rm_add_eos, else the RM's record, decides add_eos; the `describe_ending` line (when
    there is one) goes to `tell`, nothing when every stop token is scored with EOS alone."""
    import json

    from stages.ppo.ending import describe_ending, ending_for

    gemma, llama3 = _with(base_tok, GEMMA), _with(base_tok, LLAMA3)
    eos, eot = base_tok.eos_token_id, base_tok.convert_tokens_to_ids(EOT)
    told: list[str] = []
    setting = ending_for(None, False, gemma, [eos, eot], {"chat"}, told.append, told.append)
    assert not setting.add_eos and setting.drop == {eos} and told == [describe_ending(setting, gemma)]
    (tmp_path / "rlhf_checkpoint.json").write_text(json.dumps({"rendering": {"styles": ["chat"], "add_eos": False}}))
    told.clear()
    recorded = ending_for(str(tmp_path), None, gemma, [eos, eot], {"chat"}, told.append, told.append)
    assert recorded == setting and told == [describe_ending(setting, gemma)]
    told.clear()  # Llama-3 with EOS: <|eot_id|> then EOS, EOS then nothing: no line
    plain = ending_for(None, None, llama3, [eos, eot], {"chat"}, told.append, told.append)
    assert plain.add_eos and plain.after == {eot: (eos,), eos: ()} and told == []
