"""Unit checks of the toy gold judge (stages/toydata.py) and its wrappers (stages/gold.py) on hand-computed
values: which question of a prompt counts, how a response is split into items, the gold agreement's empty case,
the decoding of token lists, and the regenerated shipped files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import REPO
from stages import toydata
from stages.gold import check_gold_prompts, gold_agreement, gold_scores


@pytest.fixture(scope="module")
def tok():
    from stages.models import train_tokenizer

    return train_tokenizer(["spell cat", "c a t", "repeat moon 3 times", "moon moon", "tell me a story"] * 5,
                           vocab_size=300, min_frequency=1)


def test_the_last_question_wins_by_position_in_the_whole_text_not_in_its_line() -> None:
    """"spell cat" at column 7 of line 1 and "count from 1 to 2" at column 0 of line 2: the count is the later
    question (offset 17 > 7), whatever the columns."""
    prompt = "please spell cat\ncount from 1 to 2"
    assert toydata.solve(prompt) == ["1", "2"]
    assert toydata.gold_reward(prompt, "1 2") == 1.0
    assert toydata.gold_reward(prompt, "c a t") == 0.0


def test_a_response_is_split_on_any_whitespace() -> None:
    """Items are whitespace-separated: a trailing newline or a double space is no item of its own."""
    assert toydata.gold_reward("spell cat", "c a t\n") == 1.0
    assert toydata.gold_reward("count from 1 to 3", "1\n2  3") == 1.0
    assert toydata.gold_reward("count from 1 to 3", " 1 2\t9 ") == pytest.approx(2 / 3)


def test_held_out_tolerates_surrounding_whitespace_and_unknown_words() -> None:
    """A question padded with whitespace is still recognised (red = WORDS[0], 0 + 5 divisible by 5); a word
    outside WORDS is simply not held out (no ValueError from WORDS.index)."""
    assert toydata.held_out("  repeat red 5 times\n") is True
    assert toydata.held_out("repeat zebra 5 times") is False
    assert toydata.held_out("repeat red 5 times please") is False


def test_gold_agreement_without_a_differing_pair_is_nan_and_zero() -> None:
    """Only equal-gold pairs (or none at all): no pair to judge, so (nan, 0), not a 0 % agreement."""
    for groups in ([], [[(1.0, 0.5), (2.0, 0.5)]], [[(3.0, 1.0)]]):
        agreement, pairs = gold_agreement(groups)
        assert math.isnan(agreement) and pairs == 0
    assert gold_agreement([[(1.0, 0.5), (2.0, 0.5)], [(2.0, 1.0), (1.0, 0.0)]]) == (1.0, 1)


def test_check_gold_prompts_on_no_prompts_neither_refuses_nor_warns(tok) -> None:
    """An empty prompt list (nothing to judge) is not "none of the 0 prompts asks one"."""
    warned: list[str] = []
    check_gold_prompts("toy", tok, [], "p.jsonl", warned.append)
    assert warned == []


def test_gold_scores_judge_decoded_prompt_then_response_without_special_tokens(tok) -> None:
    """gold_scores decodes each (prompt, response) pair, dropping special tokens from both: "c a t<eos>" reads
    "c a t" (1.0, not 2/3 with "t<|endoftext|>" as last item); "moon moon" for 3 times is 2/3; a response
    judged as if it were the prompt would score 0."""
    prompts = [tok("spell cat")["input_ids"], [tok.eos_token_id] + tok("repeat moon 3 times")["input_ids"]]
    responses = [tok("c a t")["input_ids"] + [tok.eos_token_id], tok("moon moon")["input_ids"] + [tok.eos_token_id]]
    assert gold_scores("toy", tok, prompts, responses) == pytest.approx([1.0, 2 / 3])


def test_regenerating_the_shipped_files_reproduces_them_byte_for_byte(tmp_path: Path) -> None:
    """`python -m stages.toydata DIR` writes exactly the committed configs/tiny/data files (same JSON text, one
    row a line), not only the same rows."""
    toydata.main([str(tmp_path)])
    for name in toydata.SHIPPED:
        assert (tmp_path / name).read_bytes() == (REPO / "configs" / "tiny" / "data" / name).read_bytes(), name
