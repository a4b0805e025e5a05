"""stages/pairs.py and stages/lm.py unit edges, hand-computed: each test pins a mutant of the module that survived
tests/test_pairs.py, test_data*.py, test_fuzz.py, test_ending.py, test_reward_model.py and test_training_loop.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stages.config import DataSource, RMDataConfig
from stages.data import IGNORE, BadRow, BadRowLog
from stages.pairs import IdenticalPair, PreferencePair, detect_pair_format, load_pairs, parse_pair, split_hh_pair


def _rm(**kw: Any) -> RMDataConfig:
    return RMDataConfig(train="x.jsonl", **kw)


def _write(tmp_path: Path, rows: list[dict[str, Any]], name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


USER = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "A"}
B = {"role": "assistant", "content": "B"}


# ----------------------------------------------------------------------------------------- pairs.py: parsing
def test_hh_prompt_may_be_a_marker_at_position_zero() -> None:
    """A shared prefix whose only "\\n\\nAssistant:" marker starts the text is still the prompt (rfind gives 0)."""
    assert split_hh_pair("\n\nAssistant: A", "\n\nAssistant: B") == ("\n\nAssistant:", " A", " B")


def test_sides_that_differ_right_after_a_human_marker_differ_in_a_human_turn() -> None:
    """The shared prefix ends exactly at "\n\nHuman:" (no space after the colon): the sides differ in a human
    turn, not in an answer, and are refused."""
    c = "\n\nHuman: hi\n\nAssistant: ok\n\nHuman:X?\n\nAssistant: A"
    r = "\n\nHuman: hi\n\nAssistant: ok\n\nHuman:Y?\n\nAssistant: A"
    with pytest.raises(BadRow, match="human turn"):
        split_hh_pair(c, r)


def test_pairs_format_allows_an_empty_prompt() -> None:
    """README: in the pairs format an empty prompt is allowed (an empty response is a bad row)."""
    pair = parse_pair({"prompt": "", "chosen": "a", "rejected": "b"}, "pairs", _rm())
    assert pair == PreferencePair((("user", ""),), (("assistant", "a"),), (("assistant", "b"),), "raw_pr")


def test_messages_with_a_null_prompt_take_the_shared_leading_messages() -> None:
    """A prompt column holding null reads as no prompt column: the messages both sides share are the prompt."""
    pair = parse_pair({"prompt": None, "chosen": [USER, A], "rejected": [USER, B]}, "messages", _rm())
    assert pair == PreferencePair((("user", "hi"),), (("assistant", "A"),), (("assistant", "B"),), "chat")


def test_a_prompt_only_one_side_repeats_is_a_bad_row() -> None:
    """Only one side repeating the prompt messages (the other answers its first turn otherwise): the sides hold
    neither the prompt's start nor all its turns, a bad row (it was read with the prompt twice on both sides)."""
    prompt = [USER, A]
    more = {"role": "user", "content": "more"}
    c = {"role": "assistant", "content": "C"}
    with pytest.raises(BadRow, match="neither begin with 'prompt' nor hold its turns"):
        parse_pair({"prompt": prompt, "chosen": [USER, A, more, c], "rejected": [USER, B]}, "messages", _rm())


def test_identical_message_responses_are_an_identical_pair(tmp_path: Path) -> None:
    """Equal responses beside a prompt column carry no preference: IdenticalPair, counted by load_pairs."""
    row = {"prompt": "q", "chosen": [A], "rejected": [A]}
    with pytest.raises(IdenticalPair):
        parse_pair(row, "messages", _rm())
    path = _write(tmp_path, [row, {"prompt": "q", "chosen": [A], "rejected": [B]}])
    loaded = load_pairs(DataSource(path=str(path)), _rm(), BadRowLog())
    assert len(loaded.pairs) == 1 and loaded.identical == 1


def test_a_side_that_continues_past_the_other_is_a_bad_row_not_a_crash() -> None:
    """Sides equal until one ends, the other going on with a user turn: a BadRow naming that message, no crash."""
    more = {"role": "user", "content": "more"}
    with pytest.raises(BadRow, match=r"differ in a user/system turn, not in a response \(message 2: user\)"):
        parse_pair({"chosen": [USER, A], "rejected": [USER, A, more, B]}, "messages", _rm())


def test_auto_detection_names_both_expected_keys_when_one_is_missing() -> None:
    """A record lacking 'rejected' is refused by detection itself, which names both keys and data.columns."""
    want = r"expected keys 'chosen' and 'rejected' \(keys present: chosen, prompt\); set data.columns"
    with pytest.raises(BadRow, match=want):
        detect_pair_format({"prompt": "p", "chosen": "a"}, _rm())


# ----------------------------------------------------------------------------------------- lm.py
def test_collate_pads_packed_rows_right_with_positions_restarting_at_zero() -> None:
    """Packed rows: ids right-padded with pad_id, labels IGNORE, the padding's positions 0, 1, ... (its own block)."""
    from stages.lm import collate

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, 6, IGNORE, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9], "labels": [IGNORE], "position_ids": [0]}]
    batch = collate(rows, 3, torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 3, 3, 3]]
    assert batch["labels"].tolist() == [[IGNORE, 6, IGNORE, 8], [IGNORE] * 4]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_trained_token_count_uses_the_shifted_labels() -> None:
    """Position 0 predicts nothing: a label there is not counted, as in shifted_nll_sum."""
    from stages.lm import trained_token_count

    labels = torch.tensor([[5, IGNORE, 7], [IGNORE, 8, 9]])
    assert int(trained_token_count(labels)) == 3  # 7; 8, 9 (not the 5 at position 0)


def test_step_counts_count_attended_tokens_not_padding() -> None:
    """[trained positions, attended tokens] over micro-batches: padding is neither."""
    from stages.lm import collate, step_counts

    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4], "labels": [IGNORE]}]
    batches = [collate(rows, 0, torch.device("cpu")), collate(rows[:1], 0, torch.device("cpu"))]
    counts = step_counts(batches)
    assert counts.dtype == torch.float64 and counts.tolist() == [4.0, 7.0]  # trained 2 + 2; tokens 3 + 1 + 3
