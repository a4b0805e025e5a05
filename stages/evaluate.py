"""`rlhf eval`: a policy on evaluation prompts, judged by the reward model (and a gold judge on the toy task),
against a baseline policy (e.g. the SFT model it started from).

For each prompt the policy (and the baseline) samples one response with the same seed; then per model

    reward      mean RM score (read at an EOS as in PPO: appended to a response cut at max_new_tokens or
                ended on another stop token)
    gold        mean gold reward (data.gold_reward, e.g. the toy task's)
    kl          mean over responses of sum_t [log pi(y_t) - log pi_ref(y_t)] on the policy's own samples
                (a sampled estimate of KL(pi || pi_ref) per response; pi_ref = --reference, else the baseline;
                both at the generation temperature with generation.logprobs_at_temperature; none with greedy
                decoding, generation.top_k 1 (`rlhf eval --greedy`): its responses are no samples of pi)
    length      mean response tokens (the stop token included); cap_share: share cut at max_new_tokens
    repetition  mean share of repeated n-grams (monitor.ngram)

and the win-rate of the policy against the baseline, prompt by prompt:

    win_rate = (wins + ties / 2) / prompts        judged by the RM score, and by the gold reward

(two identical responses are a tie whatever their scores, which the RM may put a float-noise apart in batches
of other widths; a prompt with a non-finite score on either side is left out and counted as `nonfinite`).

Single process; the GPU when there is one. Writes a JSON file (and the samples as JSONL next to it).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from stages.config import PRECISION_DTYPES, ModelConfig, output_file
from stages.data import BadRowLog
from stages.errors import CheckpointError
from stages.eval_settings import EvalSettings, held_out_source
from stages.gold import check_gold_prompts, gold_scores
from stages.metrics import json_safe, say
from stages.model_paths import resolve_model_dir
from stages.models import check_architecture, load_tokenizer, not_local_hint
from stages.ppo.ending import RewardEnding, ending_for
from stages.ppo.prompts import held_out_sha256, load_prompts
from stages.ppo.rollout import (left_pad, logprob_temperature, raw_scores, repetition_rate, response_lists,
                                response_logprobs, sample)
from stages.rendering import check_rendering
from stages.trainer import split_holdout


#: response tokens per LM-head block for the KL's log-probs (see response_logprobs)
LOGPROB_CHUNK = 4096


def recorded_settings(s: EvalSettings, precision: str) -> dict[str, Any]:
    """How an evaluation sampled and scored, as eval.json records it (two eval.json files of one policy can then
    be told apart): the prompts (data section; `held_out`: the validation share of data.train), how many, the
    batch size (it changes the samples), the seed, the precision, the n-gram of the repetition metric and every
    generation setting."""
    return {"data": s.data.model_dump(mode="json"), "held_out": list(s.held_out) if s.held_out else None,
            "num_prompts": s.num_prompts, "batch_size": s.batch_size, "seed": s.seed, "precision": precision,
            "ngram": s.ngram, "generation": s.generation.model_dump(mode="json")}


@dataclass
class Generated:
    """One model's responses to the prompts, with their scores."""

    responses: list[list[int]]
    truncated: list[bool]
    reward: list[float]
    gold: list[float] | None
    kl: list[float] | None = None


def _tokenizer(path: str, what: str) -> Any:
    try:
        return load_tokenizer(path)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, tokenizers' own parse errors, ...
        raise CheckpointError(f"cannot load the tokenizer of {what} {path}{not_local_hint(path)}: "
                              f"{type(exc).__name__}: {exc}") from None


def _load_lm(path: str, dtype: torch.dtype, device: torch.device, tokens: int) -> torch.nn.Module:
    """The causal LM at `path`, which must have an embedding row for each of the policy's `tokens` ids."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(path), dtype=dtype)  # kind checked by evaluate
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, SafetensorError (truncated file), ...
        raise CheckpointError(f"cannot load a causal LM from {path}{not_local_hint(path)}: "
                              f"{type(exc).__name__}: {exc}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < tokens:
        raise CheckpointError(f"{path} has {rows} embedding rows for the policy tokenizer's {tokens} tokens")
    return model.to(device).eval()


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], s: EvalSettings, tok: Any, reward: Any,
             stop_ids: list[int], ending: RewardEnding, device: torch.device,
             reference: torch.nn.Module | None = None) -> Generated:
    """Sample one response per prompt (seeded), score it with the RM and the gold judge; with `reference`, also
    each response's sum over its sampled tokens (the stop token included) of log pi - log pi_ref."""
    torch.manual_seed(s.seed)
    out = Generated([], [], [], [] if s.data.gold_reward else None, [] if reference is not None else None)
    for b in range(0, len(prompts), s.batch_size):
        batch = prompts[b:b + s.batch_size]
        ids, mask = left_pad(batch, tok.pad_token_id, device)
        roll = sample(model, ids, mask, s.generation, stop_ids, tok.pad_token_id, len(tok),
                      prompt_capacity=s.data.max_prompt_length)
        full_ids, full_mask = roll.sequences()
        out.reward += raw_scores(s.generation, reward, full_ids, full_mask, roll.truncated, ending).tolist()
        responses = response_lists(roll, stop_ids)
        out.responses += responses
        out.truncated += roll.truncated.tolist()
        if out.gold is not None:
            out.gold += gold_scores(s.data.gold_reward or "", tok, batch, responses)
        if out.kl is not None:
            width = roll.prompt_width
            lp_args = dict(chunk_tokens=LOGPROB_CHUNK, temperature=logprob_temperature(s.generation),
                           vocab=roll.vocab_size, held=roll.held)
            lp, _ = response_logprobs(model, full_ids, full_mask, width, roll.response, **lp_args)
            ref, _ = response_logprobs(reference, full_ids, full_mask, width, roll.response, **lp_args)
            out.kl += ((lp - ref) * roll.response_mask).sum(1).tolist()
    return out


def win_rate(mine: list[float], theirs: list[float], same: list[bool] | None = None) -> dict[str, Any]:
    """(wins + ties / 2) / n with the win, tie and loss shares, over the n prompts whose two scores are finite
    (`nonfinite`: how many were left out; every share None when none is left). A prompt whose two responses
    are identical (`same`) is a tie whatever its scores.

    >>> win_rate([1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0])
    {'win_rate': 0.625, 'wins': 0.5, 'ties': 0.25, 'losses': 0.25, 'nonfinite': 0}
    >>> win_rate([1.0, float("nan"), 0.3000001], [0.0, 0.5, 0.3], same=[False, False, True])
    {'win_rate': 0.75, 'wins': 0.5, 'ties': 0.5, 'losses': 0.0, 'nonfinite': 1}
    """
    same = same or [False] * len(mine)
    pairs = [(a, b, eq) for a, b, eq in zip(mine, theirs, same) if math.isfinite(a) and math.isfinite(b)]
    n, left_out = len(pairs), len(mine) - len(pairs)
    if not n:
        return {"win_rate": None, "wins": None, "ties": None, "losses": None, "nonfinite": left_out}
    ties = sum(eq or a == b for a, b, eq in pairs)
    wins = sum(a > b and not eq for a, b, eq in pairs)
    return {"win_rate": (wins + ties / 2) / n, "wins": wins / n, "ties": ties / n, "losses": (n - wins - ties) / n,
            "nonfinite": left_out}


def summarize(gen: Generated, ngram: int) -> dict[str, float]:
    """Means over the prompts of one model's responses."""
    out = {
        "reward": statistics.fmean(gen.reward),
        "length": statistics.fmean(len(r) + (0 if cut else 1) for r, cut in zip(gen.responses, gen.truncated)),
        "cap_share": statistics.fmean(float(c) for c in gen.truncated),
        "repetition": statistics.fmean(repetition_rate(r, ngram) for r in gen.responses),
    }
    if gen.gold is not None:
        out["gold"] = statistics.fmean(gen.gold)
    if gen.kl is not None:
        out["kl"] = statistics.fmean(gen.kl)
    return out


def evaluate(s: EvalSettings, out_file: Path | None = None) -> dict[str, Any]:
    """Run the evaluation; returns (and writes to `out_file` with samples beside it) the results."""

    from stages.checkpoint import ensure_dir
    from stages.distributed import quiet_libraries
    from stages.ppo.models import build_reward, check_tokenizers, stop_token_ids

    quiet_libraries()
    is_greedy = s.generation.greedy
    reference = None if is_greedy else s.reference  # no KL from greedy responses: none is loaded
    policy_dir, rm_dir = resolve_model_dir(s.policy), resolve_model_dir(s.reward_model)  # a missing path: its error
    check_architecture(policy_dir, "causal_lm", False, "POLICY")  # each model's kind, before anything is written
    check_architecture(rm_dir, "reward", True, "--reward-model")
    for path, what in ((s.baseline, "--baseline"), (reference, "--reference")):
        if path:
            check_architecture(resolve_model_dir(path), "causal_lm", False, what)
    if out_file is not None:  # before minutes of sampling, not after
        ensure_dir(output_file(str(out_file), "eval.json").parent, "--out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, s.dtype)
    tok, rm_tok = (_tokenizer(policy_dir, "POLICY"), _tokenizer(rm_dir, "--reward-model"))
    if s.data.chat_template is not None:  # (as rlhf ppo renders with it: over the tokenizer's own)
        tok.chat_template = s.data.chat_template
    check_tokenizers(tok, rm_tok, s.reward_model)
    for path, what in ((s.baseline, "--baseline"), (reference, "--reference")):
        if path:  # fed the policy's token ids (and the baseline's responses decoded with its tokenizer)
            check_tokenizers(tok, _tokenizer(resolve_model_dir(path), what), path, what,
                             "compare models that share the policy's tokenizer (its SFT model, say)")
    styles: set[str] = set()
    log = BadRowLog()
    rows: list[tuple[int, int]] = []
    prompts, cut, _ = load_prompts(s.data.train, s.data, tok, log, styles,
                                   limit=None if s.held_out else s.num_prompts, rows=rows)
    source = str(s.data.train.path)

    def warn(text: str) -> None:
        say(True, f"[yellow]{escape(text)}[/]")

    if s.held_out:  # (the PPO run's validation prompts: the seeded share of all of data.train's, as it split them)
        fraction, split_seed = s.held_out
        _, prompts = split_holdout(prompts, fraction, split_seed)
        prompts = prompts[:s.num_prompts] if s.num_prompts else prompts
        source = held_out_source(source, fraction, split_seed)
        say(True, f"prompts: {len(prompts)} of {escape(source)}, which rlhf ppo held out of its training")
        if s.run_share and s.run_share[0] != held_out_sha256(rows, fraction, split_seed):
            warn(f"warning: this is not the share rlhf ppo held out: data.train's usable rows or data.eval_fraction "
                 f"differ from those its run split with ({s.run_share[1]}), so prompts it trained on may be among "
                 "these (a --set data.* that changes which rows are read, say data.format, data.columns or "
                 "data.on_bad_row, moves the share, as does data.eval_fraction; data.max_prompt_length does not)")

    if s.num_prompts and s.num_prompts > len(prompts):
        warn(f"{s.num_prompts} prompts asked (--num-prompts), {len(prompts)} usable in {source}: all of them "
             "are evaluated")
    if log.total or cut:  # (data.on_bad_row: skip) rows the evaluation leaves out, and prompts it shortens
        among = "data.train's prompts (before the validation share was taken)" if s.held_out else (
            f"the {len(prompts)} evaluated")
        warn(f"prompts: {log.total} bad row(s) skipped{log.summary()}; {cut} of {among} cut to "
             f"data.max_prompt_length ({s.data.max_prompt_length} tokens)")

    if s.data.gold_reward:
        check_gold_prompts(s.data.gold_reward, tok, prompts, source, warn)
    models = {"POLICY": policy_dir, "the reward model": rm_dir} | (
        {"--baseline": resolve_model_dir(s.baseline)} if s.baseline else {})
    check_rendering(s.data.rendering_check, styles, tok, models, warn, reader="rlhf eval",
                    content_special_tokens=s.data.content_special_tokens)
    precision = next(k for k, v in PRECISION_DTYPES.items() if v == s.dtype)
    reward = build_reward(ModelConfig(name_or_path=s.reward_model), rm_tok, precision, {}, s.seed).to(device).eval()
    policy = _load_lm(s.policy, dtype, device, len(tok))
    stop_ids = stop_token_ids(policy, tok, s.generation.stop_token_ids)
    ending = ending_for(rm_dir, s.data.rm_add_eos, tok, stop_ids, styles, warn, lambda line: say(True, line))
    results: dict[str, Any] = {"policy": s.policy, "baseline": s.baseline, "reward_model": s.reward_model,
                               "prompts": len(prompts), "seed": s.seed,
                               "decoding": "greedy" if is_greedy else "sampled",
                               "skipped_rows": dict(log.reasons),
                               "cut_prompts": cut, "settings": recorded_settings(s, precision)}
    if s.reference and reference is None:
        warn(f"--reference {s.reference} ignored: greedy decoding (generation.top_k 1) makes no samples of the "
             "policy, so no KL is estimated")
    ref_path = None if is_greedy else reference or s.baseline
    ref_model = _load_lm(ref_path, dtype, device, len(tok)) if ref_path else None
    mine = generate(policy, prompts, s, tok, reward, stop_ids, ending, device, ref_model)
    if ref_path:
        results["reference"] = ref_path
    results["policy_metrics"] = summarize(mine, s.ngram)
    theirs = None
    if s.baseline:
        base = ref_model if ref_path and s.baseline == ref_path else _load_lm(s.baseline, dtype, device, len(tok))
        theirs = generate(base, prompts, s, tok, reward, stop_ids, ending, device)
        results["baseline_metrics"] = summarize(theirs, s.ngram)
        same = [a == b and x == y for a, b, x, y in zip(mine.responses, theirs.responses, mine.truncated,
                                                         theirs.truncated)]
        results["win_rate_rm"] = win_rate(mine.reward, theirs.reward, same)
        if mine.gold is not None and theirs.gold is not None:
            results["win_rate_gold"] = win_rate(mine.gold, theirs.gold, same)
        for judge in ("rm", "gold"):
            left_out = results.get(f"win_rate_{judge}", {}).get("nonfinite")
            if left_out:
                warn(f"{left_out} prompt(s) with a non-finite {judge} score left out of the {judge} win-rate")
    if out_file is not None:
        out_file.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        with out_file.with_suffix(".samples.jsonl").open("w", encoding="utf-8") as fh:
            for i, p in enumerate(prompts):
                row = {"prompt": tok.decode(p, skip_special_tokens=False),
                       "policy": tok.decode(mine.responses[i], skip_special_tokens=True), "policy_reward": mine.reward[i]}
                if mine.gold is not None:
                    row["policy_gold"] = mine.gold[i]
                if theirs is not None:
                    row |= {"baseline": tok.decode(theirs.responses[i], skip_special_tokens=True),
                            "baseline_reward": theirs.reward[i]}
                    if theirs.gold is not None:
                        row["baseline_gold"] = theirs.gold[i]
                fh.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
    return results


def print_results(results: dict[str, Any], console: Any) -> None:
    """A table metric | policy | baseline, then the win-rates."""
    from rich.table import Table

    how = "greedy" if results.get("decoding") == "greedy" else f"seed {results['seed']}"
    table = Table(title=f"rlhf eval: {results['prompts']} prompts ({how})")
    table.add_column("metric")
    table.add_column("policy", justify="right")
    has_base = "baseline_metrics" in results
    if has_base:
        table.add_column("baseline", justify="right")
    for key, value in results["policy_metrics"].items():
        row = [key, f"{value:.4f}"]
        if has_base:
            other = results["baseline_metrics"].get(key)
            row.append("" if other is None else f"{other:.4f}")
        table.add_row(*row)
    for judge in ("rm", "gold"):
        wr = results.get(f"win_rate_{judge}")
        if wr and wr["win_rate"] is not None:
            table.add_row(f"win-rate vs baseline ({judge}; ties {wr['ties']:.2f})", f"{wr['win_rate']:.3f}", "")
        elif wr:
            table.add_row(f"win-rate vs baseline ({judge}; every score non-finite)", "n/a", "")
    console.print(table)
