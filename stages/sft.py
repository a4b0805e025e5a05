"""Supervised fine-tuning: causal-LM loss on assistant tokens only.

One optimizer step = gradient_accumulation_steps micro-batches on every rank. The loss is the mean NLL over
all trained tokens of the whole global batch (not a mean of per-micro-batch means):

    loss = sum_{ranks, micro-batches, trained tokens} -log p(token) / N_global

Reads top to bottom: data -> tokenizer -> model/engine -> (resume) -> steps (train, log, eval, save) -> final.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from stages.config import SFTConfig
from stages.data import (
    IGNORE,
    BadRowLog,
    Conversation,
    DataReport,
    TokenRows,
    corpus_texts,
    count_in_train,
    load_conversations,
    tokenize_conversations,
)
from stages.distributed import ONE_PROCESS, DistInfo, all_reduce_sum
from stages.lm import collate, lm_forward, shifted_nll_sum, step_counts, trained_token_count
from stages.metrics import say
from stages.models import build_causal_lm, check_packing, default_template_caution, prepare_tokenizer
from stages.rendering import data_rendering
from stages.trainer import (LossGuard, due, kept_sum, open_run, optimizer_step, print_data_check, split_holdout, start_training,
                            write_data_reports)


# --------------------------------------------------------------------------------------------- steps
def train_step(
    engine: Any, batches: list[dict[str, torch.Tensor]], dist: DistInfo, guard: LossGuard | None = None
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the global token-mean loss.

    DeepSpeed divides gradients by gradient_accumulation_steps (G) and averages them over W ranks, so each
    micro-batch's backward gets nll_sum * W * G / N_global, which makes the update the gradient of the
    global token mean. The logged loss is the token mean over the micro-batches trained: one skipped as
    non-finite (train.on_nonfinite: skip) is left out of it (NaN when all were); the others' gradients keep
    their 1 / N_global share, so such a step is that much smaller."""
    n_trained, n_tokens = all_reduce_sum(step_counts(batches), dist.device).tolist()  # one read before the forwards
    scale = dist.world_size * len(batches) / max(n_trained, 1.0)
    rows: list[torch.Tensor] = []  # per micro-batch: NLL sum, trained tokens (on the device)

    def micro_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nll = shifted_nll_sum(lm_forward(engine, batch), batch["labels"])
        rows.append(torch.stack([nll.detach().double(), trained_token_count(batch["labels"]).double()]))
        return nll * scale

    grad_norm = optimizer_step(engine, batches, micro_loss, guard)
    nll_sum, n_kept = all_reduce_sum(kept_sum(rows, guard, 2, dist.device), dist.device).tolist()
    loss = nll_sum / n_kept if n_kept else (0.0 if not n_trained else math.nan)
    out = {"loss": loss, "tokens": n_tokens, "trained_tokens": n_trained}
    if grad_norm is not None:
        out["grad_norm"] = grad_norm
    return out


@torch.no_grad()
def evaluate(engine: Any, rows: TokenRows, micro: int, dist: DistInfo, pad_id: int) -> dict[str, float]:
    """Token-mean NLL and perplexity exp(NLL) over the whole eval set. Rows are dealt round-robin to ranks;
    every rank runs the same number of forwards (short ranks run a row with no trained token), which ZeRO-3
    needs."""
    engine.eval()
    per_rank = math.ceil(len(rows) / dist.world_size)
    mine = list(range(dist.rank, len(rows), dist.world_size))
    mine += [-1] * (per_rank - len(mine))
    sums = torch.zeros(2, dtype=torch.float64, device=dist.device)  # NLL sum, trained tokens
    for start in range(0, per_rank, micro):
        chunk = []
        for i in mine[start:start + micro]:
            row = rows[max(i, 0)]
            chunk.append(row if i >= 0 else {**row, "labels": [IGNORE] * len(row["labels"])})
        batch = collate(chunk, pad_id, dist.device)
        sums = sums + torch.stack([shifted_nll_sum(lm_forward(engine, batch), batch["labels"]).double(),
                                   trained_token_count(batch["labels"]).double()])
    engine.train()
    total_nll, total_count = all_reduce_sum(sums, dist.device).tolist()  # (summed on the device: one read)
    loss = total_nll / max(total_count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": total_count}


# --------------------------------------------------------------------------------------------- data
def load_sft_data(
    cfg: SFTConfig, out: Path, dist: DistInfo, save: bool = True
) -> tuple[Any, TokenRows, TokenRows | None, dict[str, DataReport]]:
    """Rows -> (tokenizer, train rows, eval rows, {"train": report, "eval": report}). The tokenizer is trained
    here for from_config models (and saved in `out`, unless `save` is False: see `prepare_tokenizer`)."""
    logs = {"train": BadRowLog(), "eval": BadRowLog()}
    train_convs: list[tuple[Conversation, str]] = load_conversations(cfg.data.train, cfg.data, logs["train"])
    eval_convs = None
    if cfg.data.eval is not None:
        eval_convs = load_conversations(cfg.data.eval, cfg.data, logs["eval"])
    usable = {"train": len(train_convs), "eval": len(eval_convs or [])}  # (before a validation share is held out)
    if cfg.data.eval is None and cfg.data.eval_fraction > 0:
        train_convs, eval_convs = split_holdout(train_convs, cfg.data.eval_fraction, cfg.seed)
    tokenizer = prepare_tokenizer(cfg.model, out, dist, lambda: corpus_texts(train_convs), cfg.data.chat_template,
                                  save)
    reports = {}
    for split, log in logs.items():
        reports[split] = DataReport.from_log(log, usable[split])
    if eval_convs:
        reports["eval"].in_train = count_in_train((c.messages for c, _ in train_convs),
                                                  (c.messages for c, _ in eval_convs))
    train_rows = tokenize_conversations(train_convs, tokenizer, cfg.data, reports["train"])
    eval_rows = tokenize_conversations(eval_convs, tokenizer, cfg.data, reports["eval"]) if eval_convs else None
    styles = [style for report in reports.values() for style in report.styles]  # (an eval file in messages, too)
    reports["train"].cautions += filter(None, [default_template_caution(tokenizer, styles)])
    if eval_rows is None:
        del reports["eval"]
    return tokenizer, train_rows, eval_rows, reports


def describe_report(split: str, report: DataReport) -> str:
    packed = f", packed into {report.packed_rows} rows" if report.packed_rows is not None else ""
    return (
        f"{split} data: {report.examples} examples{packed}; {report.tokens:,} tokens ({report.trained_tokens:,} "
        f"trained); truncated: {report.prompt_truncated} prompts (left), {report.response_truncated} responses "
        f"(right){report.notes()}"
    )


def check_data(cfg: SFTConfig, world_size: int) -> tuple[Any, dict[str, Any]]:
    """`rlhf sft --check-data`: read, parse and tokenize every row as the run would, print the data report the
    run prints (examples, tokens, truncations, skipped rows by reason) and its step plan; write nothing. A bad row
    (with data.on_bad_row: error) is the run's DataError, naming its file and row. Returns what the run would
    hand on (`rlhf pipeline --check-data`): its tokenizer and rendering record."""
    tokenizer, train_rows, _, reports = load_sft_data(cfg, Path(cfg.output_dir), ONE_PROCESS, save=False)
    print_data_check(reports, describe_report, len(train_rows), cfg.train, world_size, cfg.seed, "rows")
    return tokenizer, data_rendering(reports["train"].styles, tokenizer, cfg.data)


# --------------------------------------------------------------------------------------------- run
def run(cfg: SFTConfig, resume: bool = False, prepare: Callable[[], None] | None = None) -> Path:
    """Train; returns the path of the final HF checkpoint (`output_dir/final`). `prepare` (output-directory
    checks, when no `rlhf` process did them before launching) runs on rank 0 first."""
    dist, out = open_run(cfg.output_dir, cfg.seed, prepare)
    tokenizer, train_rows, eval_rows, reports = load_sft_data(cfg, out, dist)

    write_data_reports(out, reports, dist, describe_report)
    if eval_rows is not None and len(eval_rows) == 0:
        say(dist.is_main, "[yellow]warning: no usable eval example; evaluation is off[/]")
        eval_rows = None

    def make_model(ds_config: dict[str, Any]) -> torch.nn.Module:
        model = build_causal_lm(cfg.model, tokenizer, cfg.deepspeed.precision, ds_config, cfg.seed)
        check_packing(model.config.model_type, cfg.data.packing)  # (a hub model's type is known only now)
        return model

    run = start_training(cfg, "sft", dist, out, tokenizer, len(train_rows), make_model, resume,
                         rendering=data_rendering(reports["train"].styles, tokenizer, cfg.data),
                         has_eval=eval_rows is not None)
    engine, tc = run.engine, cfg.train
    pad_id = tokenizer.pad_token_id
    eval_micro = tc.eval_micro_batch_size or tc.micro_batch_size
    with run.profiler:  # writes a profiled step's trace also when it ends in an error
        for step in range(run.start, run.total):
            micro = run.begin(step)
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]
            batches = [collate([train_rows[i] for i in mb], pad_id, dist.device) for mb in micro]
            done = step + 1
            guard = run.guard(done)
            stats = train_step(engine, batches, dist, guard)
            values = {"train/loss": stats["loss"], "train/lr": lr}
            if "grad_norm" in stats:
                values["train/grad_norm"] = stats["grad_norm"]
            shown = {"loss": stats["loss"], "lr": lr}
            run.log_step(done, values, stats["tokens"], time.perf_counter() - t0, shown, guard)
            run.profiler.close()  # a profiled step's training work ends here; not evaluation and checkpoints
            if eval_rows is not None and due(done, tc.eval_every, run.total):
                ev = evaluate(engine, eval_rows, eval_micro, dist, pad_id)
                run.metrics.log(done, ev)
                run.progress.print(f"step {done}: eval loss {ev['eval/loss']:.4f}  "
                                   f"perplexity {ev['eval/perplexity']:.2f}")
            if run.should_save(done):
                run.save(done)
    return run.finish()
