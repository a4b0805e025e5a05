"""Reward-model training on preference pairs.

For a pair (prompt x, chosen y+, rejected y-) with rewards r+ = r(x, y+), r- = r(x, y-) read at the last real
token, and an optional required margin m (a data column; 0 otherwise):

    pair loss    = -log sigmoid(r+ - r- - m)                        (mean over the global batch's pairs)
    + lm_coef     * NLL of the chosen response tokens               (mean over the global batch's tokens)
    + center_coef * (r+ + r-)^2                                     (mean over pairs; keeps rewards centred)

Chosen and rejected rows go through the model in one forward pass ([chosen..., rejected...]).
Reads top to bottom: data -> tokenizer -> model/engine -> (resume) -> steps (train, log, eval, save) -> final.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from stages.checkpoint import checkpoint_name
from stages.config import RMConfig, RMLossConfig
from stages.data import IGNORE, BadRowLog, DataReport, corpus_texts, count_in_train
from stages.distributed import ONE_PROCESS, DistInfo, all_reduce_sum, gather_floats
from stages.lm import collate, step_counts, trained_token_count
from stages.metrics import say
from stages.models import default_template_caution, ensure_distinct_pad, prepare_tokenizer
from stages.pairs import PairRows, indexed_columns_caution, load_pairs, pair_key, tokenize_pairs
from stages.rendering import data_rendering
from stages.reward_model import REWARD_STATS_FILE, build_reward_model
from stages.trainer import (LossGuard, due, kept_sum, open_run, optimizer_step, print_data_check, split_holdout, start_training,
                            write_data_reports)


# --------------------------------------------------------------------------------------------- loss
def pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair -log sigmoid(r+ - r- - m) = softplus(-(r+ - r- - m)) (numerically stable).

    >>> round(float(pair_loss(torch.tensor([1.0]), torch.tensor([1.0]))[0]), 4)  # log 2
    0.6931
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return F.softplus(-diff)


def center_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair (r+ + r-)^2: zero when the pair's rewards are symmetric around 0."""
    return (r_chosen + r_rejected) ** 2


def accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with r+ > r- (a tie counts as wrong)."""
    return float((r_chosen > r_rejected).double().mean())


# --------------------------------------------------------------------------------------------- batching
def collate_pairs(rows: PairRows, idx: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of B pairs as 2B right-padded rows [chosen_1..B, rejected_1..B]; `lm_labels` keeps the chosen
    response labels only (rejected rows all IGNORE); `margin` [B]."""
    chosen = [rows.chosen[i] for i in idx]
    rejected = [{**rows.rejected[i], "labels": [IGNORE] * rows.rejected.tokens(i)} for i in idx]
    batch = collate(chosen + rejected, pad_id, device)
    batch["lm_labels"] = batch.pop("labels")
    batch["margin"] = torch.tensor([rows.margins[i] for i in idx], dtype=torch.float32, device=device)
    return batch


def reward_forward(engine: Any, batch: dict[str, torch.Tensor], with_lm: bool) -> tuple[torch.Tensor, ...]:
    """(r_chosen [B], r_rejected [B], chosen-response NLL sum or None) of a collate_pairs batch."""
    labels = batch["lm_labels"] if with_lm else None
    rewards, nll = engine(batch["input_ids"], batch["attention_mask"], lm_labels=labels)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:], nll


# --------------------------------------------------------------------------------------------- steps
def train_step(
    engine: Any, batches: list[dict[str, torch.Tensor]], dist: DistInfo, loss_cfg: RMLossConfig,
    guard: LossGuard | None = None,
) -> dict[str, float]:
    """One optimizer step; returns global means over the step's pairs (and chosen-response tokens).

    DeepSpeed divides gradients by accumulation steps G and averages over W ranks, so a micro-batch's
    backward gets (sum of pair terms) * W * G / N_pairs + lm_coef * NLL_sum * W * G / N_tokens. The logged means
    are over the micro-batches trained: one skipped as non-finite (train.on_nonfinite: skip) is left out (NaN when
    all were); the others' gradients keep their 1 / N share, so such a step is that much smaller."""
    with_lm = loss_cfg.lm_coef > 0
    counts = step_counts(batches, "lm_labels")
    local = torch.cat([counts.new_full((1,), float(sum(len(b["margin"]) for b in batches))), counts])
    n_pairs, n_lm, n_tokens = all_reduce_sum(local, dist.device).tolist()  # the step's one read before the forwards
    k = dist.world_size * len(batches)
    # per micro-batch: pair loss, lm nll, centring, correct, margin, reward sum (r+ and r-), pairs, lm tokens
    rows: list[torch.Tensor] = []

    def micro_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        r_c, r_r, nll = reward_forward(engine, batch, with_lm)
        pl = pair_loss(r_c, r_r, batch["margin"]).sum()
        total = pl * k / n_pairs
        cl = center_loss(r_c, r_r).sum() if loss_cfg.center_coef > 0 else pl.new_zeros(())
        total = total + loss_cfg.center_coef * cl * k / n_pairs
        if nll is not None:
            total = total + loss_cfg.lm_coef * nll * k / max(n_lm, 1.0)
        with torch.no_grad():
            rows.append(torch.stack([
                pl, nll if nll is not None else pl.new_zeros(()), cl, (r_c > r_r).sum(), (r_c - r_r).sum(),
                r_c.sum() + r_r.sum(), pl.new_full((), float(len(batch["margin"]))),
                trained_token_count(batch["lm_labels"]).to(pl.dtype),
            ]).double())  # (on the device: new_full, not new_tensor, which would copy from the host and wait)
        return total

    grad_norm = optimizer_step(engine, batches, micro_loss, guard)
    sums = kept_sum(rows, guard, 8, dist.device)  # a micro-batch skipped as non-finite is left out of the means
    pl, nll, cl, correct, margin, reward, kept_pairs, kept_lm = all_reduce_sum(sums, dist.device).tolist()
    per_pair = kept_pairs or math.nan  # (every micro-batch of the step skipped: NaN means)
    out = {
        "pair_loss": pl / per_pair,
        "accuracy": correct / per_pair,
        "margin": margin / per_pair,
        "reward_mean": reward / (2 * per_pair),
        "tokens": n_tokens,
        "pairs": n_pairs,
    }
    out["loss"] = out["pair_loss"]
    if with_lm:
        out["lm_loss"] = nll / max(kept_lm, 1.0)
        out["loss"] += loss_cfg.lm_coef * out["lm_loss"]
    if loss_cfg.center_coef > 0:
        out["center_loss"] = cl / per_pair
        out["loss"] += loss_cfg.center_coef * out["center_loss"]
    if grad_norm is not None:
        out["grad_norm"] = grad_norm
    return out


@torch.no_grad()
def score_pairs(engine: Any, rows: PairRows, micro: int, dist: DistInfo, pad_id: int) -> tuple[list[float], ...]:
    """(r_chosen, r_rejected, margins) of every pair, on every rank. Pairs are dealt round-robin; every rank
    runs the same number of forwards (ZeRO-3 needs that), short ranks scoring a stand-in pair they discard."""
    engine.eval()
    per_rank = math.ceil(len(rows) / dist.world_size)
    mine = list(range(dist.rank, len(rows), dist.world_size))
    real = len(mine)
    mine += [0] * (per_rank - real)
    chosen: list[float] = []
    rejected: list[float] = []
    for start in range(0, per_rank, micro):
        r_c, r_r, _ = reward_forward(engine, collate_pairs(rows, mine[start:start + micro], pad_id, dist.device), False)
        chosen += r_c.tolist()
        rejected += r_r.tolist()
    engine.train()
    margins = [rows.margins[i] for i in mine[:real]]
    return gather_floats(chosen[:real]), gather_floats(rejected[:real]), gather_floats(margins)


def reward_metrics(chosen: list[float], rejected: list[float], margins: list[float], prefix: str) -> dict[str, float]:
    """Accuracy, mean margin r+ - r-, mean pair loss, and mean/std/min/max over all 2N rewards."""
    r_c, r_r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    both = torch.cat([r_c, r_r])
    return {
        f"{prefix}/loss": float(pair_loss(r_c, r_r, torch.tensor(margins, dtype=torch.float64)).mean()),
        f"{prefix}/accuracy": accuracy(r_c, r_r),
        f"{prefix}/margin": float((r_c - r_r).mean()),
        f"{prefix}/chosen_reward": float(r_c.mean()),
        f"{prefix}/rejected_reward": float(r_r.mean()),
        f"{prefix}/reward_mean": float(both.mean()),
        f"{prefix}/reward_std": float(both.std(unbiased=False)),
        f"{prefix}/reward_min": float(both.min()),
        f"{prefix}/reward_max": float(both.max()),
        f"{prefix}/pairs": float(len(chosen)),
    }


# --------------------------------------------------------------------------------------------- data
def load_rm_data(cfg: RMConfig, out: Path, dist: DistInfo, save: bool = True
                 ) -> tuple[Any, bool, PairRows, PairRows | None, dict]:
    """Pairs -> (tokenizer, whether a pad token was added to it, train pairs, eval pairs, reports); a from_config
    model's tokenizer is trained here (and saved in `out`, unless `save` is False: see `prepare_tokenizer`)."""
    data = cfg.data
    logs = {"train": BadRowLog(), "eval": BadRowLog()}
    train = load_pairs(data.train, data, logs["train"])
    held = load_pairs(data.eval, data, logs["eval"]) if data.eval is not None else None
    train_pairs, eval_pairs = train.pairs, (held.pairs if held is not None else None)
    if eval_pairs is None and data.eval_fraction > 0:
        train_pairs, eval_pairs = split_holdout(train_pairs, data.eval_fraction, cfg.seed)
    usable = {"train": len(train.pairs), "eval": len(held.pairs) if held is not None else 0}  # (before a share)
    identical = {"train": train.identical, "eval": held.identical if held is not None else 0}
    duplicates = {"train": train.duplicates, "eval": held.duplicates if held is not None else 0}

    def texts() -> Any:
        return corpus_texts((p.conversation(side), w) for p, w in train_pairs for side in ("chosen", "rejected"))

    tokenizer = prepare_tokenizer(cfg.model, out, dist, texts, data.chat_template, save)
    added = ensure_distinct_pad(tokenizer)
    reports: dict[str, DataReport] = {}
    rows: dict[str, PairRows] = {}
    for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
        if pairs is None:
            continue
        report = DataReport.from_log(logs[split], usable[split])
        report.identical_pairs = identical[split]
        report.duplicate_pairs = duplicates[split]
        if split == "eval":
            report.in_train = count_in_train(map(pair_key, (p for p, _ in train_pairs)),
                                             map(pair_key, (p for p, _ in pairs)))
        rows[split] = tokenize_pairs(pairs, tokenizer, data, report)
        reports[split] = report
    cautions = (indexed_columns_caution(data.columns.chosen, data.columns.rejected),
                default_template_caution(tokenizer, [style for r in reports.values() for style in r.styles]))
    reports["train"].cautions += filter(None, cautions)
    return tokenizer, added, rows["train"], rows.get("eval"), reports


def say_added_pad(added: bool, enabled: bool) -> None:
    """The start-up line of a run (or data check) whose tokenizer `ensure_distinct_pad` grew."""
    if added:
        say(enabled, "the tokenizer had no pad token of its own (none, or its EOS); added a distinct <|pad|> "
                     "(embedding grown by 1)")


def describe_pairs(split: str, report: DataReport) -> str:
    cut, full = report.context_cut_pairs, report.no_room_pairs  # (stages.pairs.ContextCut, NoRoom)
    cut_note = f", {cut} pair(s) differing before the final turn that max_length cut into (raise it)" if cut else ""
    cut_note += (f", {full} pair(s) whose kept context left no room for a response (raise max_length, or lower "
                 "max_prompt_length)") if full else ""
    repeats = report.prompt_repeats
    repeat_note = (f"; {repeats} pair(s) whose chosen and rejected both begin with the prompt text (read twice: give "
                   "the responses alone)") if repeats else ""
    return (
        f"{split} data: {report.examples} pairs; {report.tokens:,} tokens; dropped {report.identical_pairs} "
        f"identical pair(s) ({report.identical_after_truncation} made so by max_length) and "
        f"{report.duplicate_pairs} duplicate(s){cut_note}; truncated: {report.prompt_truncated} prompts "
        f"(left), {report.response_truncated} responses (right){repeat_note}{report.notes()}"
    )


def check_data(cfg: RMConfig, world_size: int) -> tuple[Any, dict[str, Any]]:
    """`rlhf train-rm --check-data`: read, parse and tokenize every pair as the run would, print the data report
    the run prints (pairs, tokens, identical and duplicate pairs dropped, truncations, skipped rows by reason) and
    its step plan; write nothing. A bad row (data.on_bad_row: error) is the run's DataError, naming file and row.
    Returns what the run would hand on (`rlhf pipeline --check-data`): its tokenizer and rendering record."""
    tokenizer, added_pad, train_rows, _, reports = load_rm_data(cfg, Path(cfg.output_dir), ONE_PROCESS, save=False)
    say_added_pad(added_pad, True)
    print_data_check(reports, describe_pairs, len(train_rows), cfg.train, world_size, cfg.seed, "pairs", "pairs")
    return tokenizer, data_rendering(reports["train"].styles, tokenizer, cfg.data)


# --------------------------------------------------------------------------------------------- run
def run(cfg: RMConfig, resume: bool = False, prepare: Callable[[], None] | None = None) -> Path:
    """Train; returns the final HF reward-model checkpoint (`output_dir/final`, with reward_stats.json)."""
    dist, out = open_run(cfg.output_dir, cfg.seed, prepare)
    tokenizer, added_pad, train_rows, eval_rows, reports = load_rm_data(cfg, out, dist)
    say_added_pad(added_pad, dist.is_main)

    write_data_reports(out, reports, dist, describe_pairs, "pairs")
    if eval_rows is not None and len(eval_rows) == 0:
        say(dist.is_main, "[yellow]warning: no usable eval pair; reward statistics will come from the train set[/]")
        eval_rows = None

    def make_model(ds_config: dict[str, Any]) -> torch.nn.Module:
        with_lm = cfg.loss.lm_coef > 0
        precision = cfg.deepspeed.precision
        return build_reward_model(cfg.model, tokenizer, precision, ds_config, cfg.seed, with_lm, added_pad)

    run = start_training(cfg, "train-rm", dist, out, tokenizer, len(train_rows), make_model, resume, unit="pairs",
                         rendering=data_rendering(reports["train"].styles, tokenizer, cfg.data),
                         has_eval=eval_rows is not None)
    engine, tc = run.engine, cfg.train
    pad_id = tokenizer.pad_token_id
    eval_micro = tc.eval_micro_batch_size or tc.micro_batch_size
    last_stats = resumed_stats(out, run.start)
    with run.profiler:  # writes a profiled step's trace also when it ends in an error
        for step in range(run.start, run.total):
            micro = run.begin(step)
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]
            batches = [collate_pairs(train_rows, mb, pad_id, dist.device) for mb in micro]
            done = step + 1
            guard = run.guard(done)
            stats = train_step(engine, batches, dist, cfg.loss, guard)
            values = {f"train/{k}": v for k, v in stats.items() if k not in ("tokens", "pairs")} | {"train/lr": lr}
            shown = {"loss": stats["loss"], "acc": stats["accuracy"], "lr": lr}
            run.log_step(done, values, stats["tokens"], time.perf_counter() - t0, shown, guard)
            run.profiler.close()  # a profiled step's training work ends here; not evaluation and checkpoints
            saving = run.should_save(done)  # also on a stop signal, which must not add an eval row
            scheduled = due(done, tc.save_every, run.total)
            if eval_rows is not None and (scheduled or due(done, tc.eval_every, run.total)):
                ev = reward_metrics(*score_pairs(engine, eval_rows, eval_micro, dist, pad_id), prefix="eval")
                run.metrics.log(done, ev)
                last_stats = _stats_record(ev, "eval", done)
                run.progress.print(
                    f"step {done}: eval accuracy {ev['eval/accuracy']:.4f}  margin {ev['eval/margin']:.3f}  "
                    f"reward mean {ev['eval/reward_mean']:.3f} std {ev['eval/reward_std']:.3f}"
                )
            if saving:
                if eval_rows is None and done == run.total:  # no eval set: the statistics come from the train pairs
                    ev = reward_metrics(*score_pairs(engine, train_rows, eval_micro, dist, pad_id), prefix="train")
                    last_stats = _stats_record(ev, "train", done)
                files = {REWARD_STATS_FILE: json.dumps(last_stats, indent=2)} if last_stats else {}
                run.save(done, hf_module=engine.module.seqcls, hf_files=files)
    return run.finish()


def resumed_stats(out: Path, step: int) -> dict[str, Any] | None:
    """The reward statistics of the checkpoint a run resumes from at `step` (its hf/reward_stats.json: the last
    evaluation's), so that a checkpoint saved before the next evaluation (a stop signal's) carries them too, as
    in the uninterrupted run. None for a fresh run, or a checkpoint saved before any evaluation."""
    path = out / checkpoint_name(step) / "hf" / REWARD_STATS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if step and path.is_file() else None


def _stats_record(metrics: dict[str, float], split: str, step: int) -> dict[str, Any]:
    """What reward_stats.json holds: the reward distribution measured on `split` at `step` (the RM's score
    scale, for the user; PPO normalises with running statistics of its own), from reward_metrics(..., prefix=split)."""
    keys = ("mean", "std", "min", "max")
    record: dict[str, Any] = {k: metrics[f"{split}/reward_{k}"] for k in keys}
    record |= {"accuracy": metrics[f"{split}/accuracy"], "pairs": int(metrics[f"{split}/pairs"])}
    return record | {"split": split, "step": step}
