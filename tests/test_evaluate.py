"""`rlhf eval` (stages/evaluate.py): the per-model summary, the win-rate's non-finite filter, the embedding-row
check, and runs against the session's tiny pipeline (the KL reference, per-sample scores, the gold win-rate)."""

from __future__ import annotations

import json

import pytest

from stages.evaluate import Generated, summarize, win_rate


def test_summary_counts_the_stop_token_in_the_length_and_uses_its_ngram():
    """Responses [3 4 3 4 3] and [6 6] that stopped (their stop token counts: lengths 6 and 3) and [5] cut at
    max_new_tokens (length 1): length 10 / 3, cap_share 1 / 3; repetition with ngram 2: [3 4 3 4 3] has 4
    bigrams, 2 distinct (0.5), the others none repeated: 1 / 6 (ngram 3 would give 1 / 9); reward, gold and kl
    are plain means."""
    gen = Generated(responses=[[3, 4, 3, 4, 3], [5], [6, 6]], truncated=[False, True, False], reward=[1.0, 2.0, 3.0],
                    gold=[0.0, 1.0, 1.0], kl=[0.5, 1.5, 1.0])
    assert summarize(gen, 2) == pytest.approx({"reward": 2.0, "length": 10 / 3, "cap_share": 1 / 3,
                                               "repetition": 1 / 6, "gold": 2 / 3, "kl": 1.0})


def test_a_non_finite_baseline_score_leaves_its_prompt_out_too():
    """The baseline's NaN (or inf) score, not only the policy's, leaves a prompt out: 1 win of 1 judged prompt."""
    assert win_rate([1.0, 0.0], [0.5, float("nan")]) == {"win_rate": 1.0, "wins": 1.0, "ties": 0.0, "losses": 0.0,
                                                         "nonfinite": 1}
    assert win_rate([1.0, 0.0], [0.5, float("inf")])["nonfinite"] == 1


def test_a_model_with_fewer_embedding_rows_than_the_policys_tokens_is_refused(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from stages.errors import CheckpointError
    from stages.evaluate import _load_lm

    GPT2LMHeadModel(GPT2Config(vocab_size=63, n_embd=8, n_layer=1, n_head=2, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="has 63 embedding rows for the policy tokenizer's 64 tokens"):
        _load_lm(str(tmp_path), torch.float32, torch.device("cpu"), 64)
    assert _load_lm(str(tmp_path), torch.float32, torch.device("cpu"), 63).get_input_embeddings().weight.shape[0] == 63


def test_eval_against_a_baseline_takes_it_as_the_kl_reference(pipeline_run, tmp_path):
    """--baseline without --reference: the baseline is the KL reference (the README's pi_ref); against the
    policy itself the KL is exactly 0."""
    from rlhf_cli.eval_options import eval_settings
    from stages.evaluate import evaluate

    root = pipeline_run[0].parent / "runs"
    s = eval_settings(root / "ppo-max", root / "ppo-max" / "resolved_config.yaml", num_prompts=4, max_new_tokens=4,
                      baseline=str(root / "ppo-max"))
    res = evaluate(s, None)
    assert res["reference"] == str(root / "ppo-max") and res["policy_metrics"]["kl"] == 0.0


def test_eval_samples_carry_each_prompts_own_scores_and_a_gold_win_rate(pipeline_run, tmp_path):
    """Against the SFT baseline with the toy gold judge: eval.samples.jsonl holds each prompt's own RM and gold
    scores (their means are the summary's), and the gold win-rate is there beside the RM's."""
    import statistics

    from rlhf_cli.eval_options import eval_settings
    from stages.evaluate import evaluate

    root = pipeline_run[0].parent / "runs"
    s = eval_settings(root / "ppo-max", root / "ppo-max" / "resolved_config.yaml", num_prompts=6, max_new_tokens=6,
                      baseline=str(root / "sft"), gold="toy")
    res = evaluate(s, tmp_path / "ev.json")
    rows = [json.loads(line) for line in (tmp_path / "ev.samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for side in ("policy", "baseline"):
        assert statistics.fmean(r[f"{side}_reward"] for r in rows) == pytest.approx(res[f"{side}_metrics"]["reward"])
        assert statistics.fmean(r[f"{side}_gold"] for r in rows) == pytest.approx(res[f"{side}_metrics"]["gold"])
    assert len({r["policy_reward"] for r in rows}) > 1
    assert res["win_rate_gold"]["nonfinite"] == 0 and 0.0 <= res["win_rate_gold"]["win_rate"] <= 1.0
