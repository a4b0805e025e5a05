"""Supervised fine-tuning: causal-LM loss on assistant tokens only.

One optimizer step = gradient_accumulation_steps micro-batches on every rank. The loss is the mean NLL over
all trained tokens of the whole global batch (not a mean of per-micro-batch means):

    loss = sum_{ranks, micro-batches, trained tokens} -log p(token) / N_global

Reads top to bottom: data -> tokenizer -> model/engine -> (resume) -> steps (train, log, eval, save) -> final.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stages import __version__
from stages.checkpoint import load_latest_checkpoint, publish_final, remove_stale_temporaries, save_checkpoint
from stages.config import SFTConfig
from stages.data import (
    IGNORE,
    BadRowLog,
    Conversation,
    DataReport,
    TokenRows,
    corpus_texts,
    load_conversations,
    tokenize_conversations,
)
from stages.distributed import DistInfo, all_reduce_sum, barrier, run_on_main, seed_everything, setup_distributed
from stages.engine import build_deepspeed_config, initialize_engine
from stages.errors import DataError, RlhfError
from stages.lm import collate, lm_forward, shifted_nll_sum, trained_tokens
from stages.metrics import MetricsLogger, TrainProgress, print_summary, read_metrics, say
from stages.models import build_causal_lm, prepare_tokenizer


# --------------------------------------------------------------------------------------------- batching
class EpochSampler:
    """Global batch for optimizer step s: epoch e = s // S, slice k = s % S of a permutation of all rows seeded
    with seed + e (S = rows // global_batch; the last partial batch of an epoch is dropped). Depends only on s,
    so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n_rows: int, global_batch: int, seed: int) -> None:
        self.n, self.global_batch, self.seed = n_rows, global_batch, seed
        self.steps_per_epoch = n_rows // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()


def rank_micro_batches(indices: Sequence[int], rank: int, world: int, micro: int, accum: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch laid out as [accum][world][micro]."""
    return [list(indices[(m * world + rank) * micro:(m * world + rank + 1) * micro]) for m in range(accum)]


def split_holdout(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, eval): a seeded random `fraction` of rows held out (at least one row each side)."""
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    if n_eval < 1:
        raise DataError(f"cannot hold out an eval split from {len(rows)} row(s); set data.eval or eval_fraction: 0")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# --------------------------------------------------------------------------------------------- steps
def train_step(engine: Any, batches: list[dict[str, torch.Tensor]], dist: DistInfo) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the global token-mean loss.

    DeepSpeed divides gradients by gradient_accumulation_steps (G) and averages them over W ranks, so each
    micro-batch's backward gets nll_sum * W * G / N_global, which makes the update the gradient of the
    global token mean."""
    local = [sum(trained_tokens(b["labels"]) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)]
    n_trained, n_tokens = all_reduce_sum(local, dist.device).tolist()
    scale = dist.world_size * len(batches) / max(n_trained, 1.0)
    nll_total = torch.zeros((), dtype=torch.float64, device=dist.device)
    grad_norm = None
    for i, batch in enumerate(batches):
        nll = shifted_nll_sum(lm_forward(engine, batch), batch["labels"])
        engine.backward(nll * scale)
        if i == len(batches) - 1:
            grad_norm = unsharded_grad_norm(engine)
        engine.step()
        nll_total += nll.detach().double()
    loss = float(all_reduce_sum(nll_total.reshape(1), dist.device)[0]) / max(n_trained, 1.0)
    reported = engine.get_global_grad_norm()
    if reported is not None:
        grad_norm = reported
    out = {"loss": loss, "tokens": n_tokens, "trained_tokens": n_trained}
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


def unsharded_grad_norm(engine: Any) -> float | None:
    """Global L2 norm of the (already rank-averaged) gradients before clipping, for ZeRO stage 0, where
    DeepSpeed does not report it; None for ZeRO 1-3 (DeepSpeed reports it after the step)."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


@torch.no_grad()
def evaluate(engine: Any, rows: TokenRows, micro: int, dist: DistInfo, pad_id: int) -> dict[str, float]:
    """Token-mean NLL and perplexity exp(NLL) over the whole eval set. Rows are dealt round-robin to ranks;
    every rank runs the same number of forwards (short ranks run a row with no trained token), which ZeRO-3
    needs."""
    engine.eval()
    per_rank = math.ceil(len(rows) / dist.world_size)
    mine = list(range(dist.rank, len(rows), dist.world_size))
    mine += [-1] * (per_rank - len(mine))
    nll, count = 0.0, 0.0
    for start in range(0, per_rank, micro):
        chunk = []
        for i in mine[start:start + micro]:
            row = rows[max(i, 0)]
            chunk.append(row if i >= 0 else {**row, "labels": [IGNORE] * len(row["labels"])})
        batch = collate(chunk, pad_id, dist.device)
        nll += float(shifted_nll_sum(lm_forward(engine, batch), batch["labels"]))
        count += trained_tokens(batch["labels"])
    engine.train()
    total_nll, total_count = all_reduce_sum([nll, count], dist.device).tolist()
    loss = total_nll / max(total_count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": total_count}


# --------------------------------------------------------------------------------------------- data
def load_sft_data(
    cfg: SFTConfig, out: Path, dist: DistInfo
) -> tuple[Any, TokenRows, TokenRows | None, dict[str, DataReport]]:
    """Rows -> (tokenizer, train rows, eval rows, {"train": report, "eval": report}). The tokenizer is trained
    here for from_config models."""
    logs = {"train": BadRowLog(), "eval": BadRowLog()}
    train_convs: list[tuple[Conversation, str]] = load_conversations(cfg.data.train, cfg.data, logs["train"])
    eval_convs = None
    if cfg.data.eval is not None:
        eval_convs = load_conversations(cfg.data.eval, cfg.data, logs["eval"])
    elif cfg.data.eval_fraction > 0:
        train_convs, eval_convs = split_holdout(train_convs, cfg.data.eval_fraction, cfg.seed)
    tokenizer = prepare_tokenizer(cfg.model, out, dist, lambda: corpus_texts(train_convs), cfg.data.chat_template)
    reports = {}
    for split, log in logs.items():
        reports[split] = DataReport(skipped_rows=log.total, skipped_by_reason=dict(log.reasons))
    train_rows = tokenize_conversations(train_convs, tokenizer, cfg.data, reports["train"])
    eval_rows = tokenize_conversations(eval_convs, tokenizer, cfg.data, reports["eval"]) if eval_convs else None
    if eval_rows is None:
        del reports["eval"]
    return tokenizer, train_rows, eval_rows, reports


def describe_report(split: str, report: DataReport) -> str:
    skipped = ""
    if report.skipped_rows:
        reasons = "; ".join(f"{k}: {v}" for k, v in report.skipped_by_reason.items())
        skipped = f", skipped {report.skipped_rows} bad row(s) ({reasons})"
    packed = f", packed into {report.packed_rows} rows" if report.packed_rows is not None else ""
    return (
        f"{split} data: {report.examples} examples{packed}; {report.tokens:,} tokens ({report.trained_tokens:,} "
        f"trained); truncated: {report.prompt_truncated} prompts (left), {report.response_truncated} responses "
        f"(right){skipped}"
    )


# --------------------------------------------------------------------------------------------- run
def run(cfg: SFTConfig, resume: bool = False, prepare: Callable[[], None] | None = None) -> Path:
    """Train; returns the path of the final HF checkpoint (`output_dir/final`). `prepare` (output-directory
    checks, when no `rlhf` process did them before launching) runs on rank 0 first."""
    dist = setup_distributed()
    out = Path(cfg.output_dir)
    if prepare is not None:
        run_on_main(prepare, dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    barrier()
    seed_everything(cfg.seed)
    tokenizer, train_rows, eval_rows, reports = load_sft_data(cfg, out, dist)

    tc = cfg.train
    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * dist.world_size
    sampler = EpochSampler(len(train_rows), global_batch, cfg.seed)
    if sampler.steps_per_epoch == 0:
        raise DataError(
            f"{len(train_rows)} training rows is fewer than one global batch of {global_batch} "
            f"(micro_batch_size {tc.micro_batch_size} x accumulation {tc.gradient_accumulation_steps} x "
            f"{dist.world_size} ranks)"
        )
    total = tc.max_steps or max(1, math.ceil(tc.epochs * sampler.steps_per_epoch))

    ds_config = build_deepspeed_config(tc, cfg.deepspeed, dist.world_size, dist.device.type == "cuda")
    model = build_causal_lm(cfg.model, tokenizer, cfg.deepspeed.precision, ds_config, cfg.seed)
    engine = initialize_engine(model, ds_config, tc, total)
    seed_everything(cfg.seed + dist.rank)  # dropout etc. differ per rank; data order has its own generator

    for split, report in reports.items():
        say(dist.is_main, describe_report(split, report))
    if dist.is_main:
        body = {split: asdict(report) for split, report in reports.items()}
        (out / "data_report.json").write_text(json.dumps(body, indent=2), encoding="utf-8")
    if eval_rows is not None and len(eval_rows) == 0:
        say(dist.is_main, "[yellow]warning: no usable eval example; evaluation is off[/]")
        eval_rows = None

    start, tokens_seen = 0, 0.0
    if resume:
        state = load_latest_checkpoint(engine, out, dist)
        if state is None:
            say(dist.is_main, f"resume: no complete checkpoint in {out}; starting from step 0")
        else:
            start, tokens_seen = int(state["step"]), float(state.get("tokens_seen", 0.0))
            if state.get("global_batch") != global_batch:
                say(
                    dist.is_main,
                    f"[yellow]warning: the checkpoint was trained with global batch {state.get('global_batch')}, "
                    f"this run uses {global_batch}; the data order will differ[/]"
                )
            say(dist.is_main, f"resumed from step {start} ({out})")
    metrics = MetricsLogger(out, dist.is_main, cfg.logging.tensorboard, resume_step=start if resume else None)
    meta = {"stage": "sft", "rlhf_version": __version__, "model": cfg.model.name_or_path or "from_config"}
    progress = TrainProgress(dist.is_main, total, start, "sft", print_every=cfg.logging.log_every)

    def save(step: int) -> None:
        state = {"step": step, "tokens_seen": tokens_seen, "global_batch": global_batch, "total_steps": total}
        path = save_checkpoint(engine, tokenizer, out, step, state, dist, tc.save_total_limit, meta)
        metrics.event(step, "checkpoint", path=str(path))

    pad_id = tokenizer.pad_token_id
    eval_micro = tc.eval_micro_batch_size or tc.micro_batch_size
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        micro = rank_micro_batches(
            sampler.indices(step), dist.rank, dist.world_size, tc.micro_batch_size, tc.gradient_accumulation_steps
        )
        batches = [collate([train_rows[i] for i in mb], pad_id, dist.device) for mb in micro]
        stats = train_step(engine, batches, dist)
        done = step + 1
        if not math.isfinite(stats["loss"]):
            raise RlhfError(
                f"non-finite loss ({stats['loss']}) at step {done}; stopping without saving. "
                f"The last complete checkpoint in {out} is intact (resume with --resume)."
            )
        tokens_seen += stats["tokens"]
        elapsed = time.perf_counter() - t0
        row = {
            "train/loss": stats["loss"],
            "train/lr": lr,
            "train/epoch": done / sampler.steps_per_epoch,
            "train/tokens_per_s": stats["tokens"] / elapsed,
            "train/tokens_seen": tokens_seen,
        }
        if "grad_norm" in stats:
            row["train/grad_norm"] = stats["grad_norm"]
        if done % cfg.logging.log_every == 0 or done == total:
            metrics.log(done, row)
        progress.update(done, {"loss": stats["loss"], "lr": row["train/lr"], "tok/s": row["train/tokens_per_s"]})
        if eval_rows is not None and (done == total or (tc.eval_every and done % tc.eval_every == 0)):
            ev = evaluate(engine, eval_rows, eval_micro, dist, pad_id)
            metrics.log(done, ev)
            progress.print(f"step {done}: eval loss {ev['eval/loss']:.4f}  perplexity {ev['eval/perplexity']:.2f}")
        if done == total or (tc.save_every and done % tc.save_every == 0):
            save(done)
    progress.close()
    final = publish_final(out, total, dist)
    metrics.event(total, "final", path=str(final))
    metrics.close()
    if dist.is_main:
        print_summary("rlhf sft", read_metrics(out / "metrics.jsonl"), final)
    return final
