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


def test_greedy_eval_takes_the_most_likely_token_and_reports_no_kl(pipeline_run, tmp_path):
    """--greedy: each response is the policy's most likely continuation (checked against a plain argmax loop
    over the model, one unpadded prompt at a time, the repetition penalty on the response's own tokens), the
    same under another seed; no KL is reported and the baseline is not taken as a reference. The policy is a
    random-init model of the PPO policy's shape (the trained one answers in two tokens; this one runs to the cap)."""
    import dataclasses

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_cli.eval_options import eval_settings
    from stages.data import BadRowLog
    from stages.evaluate import evaluate
    from stages.model_paths import resolve_model_dir
    from stages.models import load_tokenizer
    from stages.ppo.models import stop_token_ids
    from stages.ppo.prompts import load_prompts

    root = pipeline_run[0].parent / "runs"
    trained = resolve_model_dir(str(root / "ppo-max"))
    tok = load_tokenizer(trained)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained)).eval()
    model.save_pretrained(tmp_path / "random")
    tok.save_pretrained(tmp_path / "random")
    s = eval_settings(tmp_path / "random", root / "ppo-max" / "resolved_config.yaml", num_prompts=3,
                      max_new_tokens=12, baseline=str(root / "sft"), greedy=True)
    assert (s.generation.top_k, s.generation.repetition_penalty) == (1, 1.1)
    res = evaluate(s, tmp_path / "a.json")
    assert res["decoding"] == "greedy" and "reference" not in res
    assert "kl" not in res["policy_metrics"] and "reward" in res["baseline_metrics"]
    evaluate(dataclasses.replace(s, seed=s.seed + 1), tmp_path / "b.json")
    rows = [json.loads(line) for line in (tmp_path / "a.samples.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line) for line in (tmp_path / "b.samples.jsonl").read_text().splitlines()]

    stops = stop_token_ids(model, tok, s.generation.stop_token_ids)
    prompts, _, _ = load_prompts(s.data.train, s.data, tok, BadRowLog(), set(), limit=3)
    lengths = []
    for prompt, row in zip(prompts, rows):
        ids, response = list(prompt), []
        while len(response) < 12 and not (response and response[-1] in stops):
            with torch.no_grad():
                z = model(torch.tensor([ids])).logits[0, -1, :len(tok)].clone()
            for t in set(response):  # the penalty: positive scores divided by it, the others multiplied
                z[t] = z[t] / 1.1 if z[t] > 0 else z[t] * 1.1
            if len(response) < s.generation.min_new_tokens:
                z[[t for t in stops if t < len(tok)]] = float("-inf")
            response.append(int(z.argmax()))
            ids.append(response[-1])
        assert row["policy"] == tok.decode(response, skip_special_tokens=True), (row, response)
        lengths.append(len(response))
    assert max(lengths) >= 6, lengths  # (a check of more than a token or two)
