"""The parts of a training stage's run that every stage shares: process set-up, the data order, resume,
the eval/save schedule, the non-finite check and the end of the run.

Each stage's `run` calls these in order and keeps its own step loop visible:
    dist, out = open_run(...); ...data...; run = start_training(...)
    for step in range(run.start, run.total): ...train step...; run.log_step(...); ...eval...; run.save(...)
    return run.finish()
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stages.checkpoint import load_latest_checkpoint, publish_final, remove_stale_temporaries, save_checkpoint
from stages.config import TrainConfig
from stages.data import DataReport
from stages.distributed import DistInfo, barrier, run_on_main, seed_everything, setup_distributed
from stages.errors import DataError, RlhfError
from stages.metrics import MetricsLogger, TrainProgress, print_summary, read_metrics, say


# --------------------------------------------------------------------------------------------- data order
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


@dataclass
class StepPlan:
    sampler: EpochSampler
    global_batch: int
    total: int

    def micro_batches(self, step: int, dist: DistInfo, tc: TrainConfig) -> list[list[int]]:
        """Row indices of this rank's micro-batches for optimizer step `step`."""
        return rank_micro_batches(
            self.sampler.indices(step), dist.rank, dist.world_size, tc.micro_batch_size, tc.gradient_accumulation_steps
        )


def plan_steps(n_rows: int, tc: TrainConfig, world_size: int, seed: int, unit: str = "rows") -> StepPlan:
    """Global batch = micro_batch_size x gradient_accumulation_steps x ranks; total steps = max_steps or
    ceil(epochs x steps per epoch)."""
    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * world_size
    sampler = EpochSampler(n_rows, global_batch, seed)
    if sampler.steps_per_epoch == 0:
        raise DataError(
            f"{n_rows} training {unit} is fewer than one global batch of {global_batch} "
            f"(micro_batch_size {tc.micro_batch_size} x accumulation {tc.gradient_accumulation_steps} x "
            f"{world_size} ranks)"
        )
    total = tc.max_steps or max(1, math.ceil(tc.epochs * sampler.steps_per_epoch))
    return StepPlan(sampler, global_batch, total)


# --------------------------------------------------------------------------------------------- one step
def optimizer_step(engine: Any, batches: list[Any], micro_loss: Callable[[Any], torch.Tensor]) -> float | None:
    """One optimizer step: `engine.backward(micro_loss(b))` for every micro-batch b (DeepSpeed steps the
    optimizer after the last one). Returns the global gradient norm before clipping, when known."""
    grad_norm = None
    for i, batch in enumerate(batches):
        engine.backward(micro_loss(batch))
        if i == len(batches) - 1:
            grad_norm = unsharded_grad_norm(engine)
        engine.step()
    reported = engine.get_global_grad_norm()
    if reported is not None:
        grad_norm = reported
    return None if grad_norm is None else float(grad_norm)


def unsharded_grad_norm(engine: Any) -> float | None:
    """Global L2 norm of the (already rank-averaged) gradients before clipping, for ZeRO stage 0, where
    DeepSpeed does not report it; None for ZeRO 1-3 (DeepSpeed reports it after the step)."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


# --------------------------------------------------------------------------------------------- run frame
def open_run(output_dir: str, seed: int, prepare: Callable[[], None] | None) -> tuple[DistInfo, Path]:
    """Start the process group, let rank 0 prepare the output directory (when no `rlhf` process did before
    launching) and clear half-written checkpoints, then seed every rank alike."""
    dist = setup_distributed()
    out = Path(output_dir)
    if prepare is not None:
        run_on_main(prepare, dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    barrier()
    seed_everything(seed)
    return dist, out


def write_data_reports(out: Path, reports: dict[str, DataReport], dist: DistInfo, describe: Callable[..., str]) -> None:
    """Print each split's report and save them all as data_report.json."""
    for split, report in reports.items():
        say(dist.is_main, describe(split, report))
    if dist.is_main:
        body = {split: asdict(report) for split, report in reports.items()}
        (out / "data_report.json").write_text(json.dumps(body, indent=2), encoding="utf-8")


def resume_from(engine: Any, out: Path, dist: DistInfo, global_batch: int) -> dict[str, Any]:
    """Load the newest complete checkpoint; its trainer state, or {"step": 0} when there is none."""
    state = load_latest_checkpoint(engine, out, dist)
    if state is None:
        say(dist.is_main, f"resume: no complete checkpoint in {out}; starting from step 0")
        return {"step": 0}
    if state.get("global_batch") != global_batch:
        say(
            dist.is_main,
            f"[yellow]warning: the checkpoint was trained with global batch {state.get('global_batch')}, "
            f"this run uses {global_batch}; the data order will differ[/]",
        )
    say(dist.is_main, f"resumed from step {state['step']} ({out})")
    return state


def due(done: int, every: int, total: int) -> bool:
    """True after the last step, and every `every` steps (0 = only at the end)."""
    return done == total or (every > 0 and done % every == 0)


def check_finite(name: str, value: float, done: int, out: Path) -> None:
    """Stop before anything is saved when a loss is NaN or infinite."""
    if not math.isfinite(value):
        raise RlhfError(
            f"non-finite {name} ({value}) at step {done}; stopping without saving. "
            f"The last complete checkpoint in {out} is intact (resume with --resume)."
        )


@dataclass
class Run:
    """What a stage's step loop works with once its engine exists (see start_training)."""

    stage: str
    out: Path
    dist: DistInfo
    tc: TrainConfig
    plan: StepPlan
    engine: Any
    tokenizer: Any
    metrics: MetricsLogger
    progress: TrainProgress
    start: int
    tokens_seen: float
    meta: dict[str, Any]
    log_every: int

    @property
    def total(self) -> int:
        return self.plan.total

    def log_step(
        self, done: int, values: dict[str, float], tokens: float, seconds: float, shown: dict[str, float]
    ) -> None:
        """Stop on a non-finite train/loss; add the counters (epoch, tokens/s, tokens seen) to the stage's
        train/* values; log them every log_every steps; advance the progress display with `shown`."""
        check_finite("loss", values["train/loss"], done, self.out)
        self.tokens_seen += tokens
        row = dict(values)
        row |= {
            "train/epoch": done / self.plan.sampler.steps_per_epoch,
            "train/tokens_per_s": tokens / seconds,
            "train/tokens_seen": self.tokens_seen,
        }
        if due(done, self.log_every, self.total):
            self.metrics.log(done, row)
        self.progress.update(done, {**shown, "tok/s": row["train/tokens_per_s"]})

    def save(self, done: int, **hf: Any) -> None:
        """A resumable checkpoint at step `done` (hf: save_checkpoint's hf_module / hf_files)."""
        counters = {"tokens_seen": self.tokens_seen, "global_batch": self.plan.global_batch, "total_steps": self.total}
        path = save_checkpoint(
            self.engine, self.tokenizer, self.out, done, counters, self.dist, self.tc.save_total_limit, self.meta, **hf
        )
        self.metrics.event(done, "checkpoint", path=str(path))

    def finish(self) -> Path:
        """Publish the last checkpoint's HF model as output_dir/final and print the summary table."""
        self.progress.close()
        final = publish_final(self.out, self.total, self.dist)
        self.metrics.event(self.total, "final", path=str(final))
        self.metrics.close()
        if self.dist.is_main:
            print_summary(f"rlhf {self.stage}", read_metrics(self.out / "metrics.jsonl"), final)
        return final


def start_training(
    cfg: Any,
    stage: str,
    dist: DistInfo,
    out: Path,
    tokenizer: Any,
    n_rows: int,
    make_model: Callable[[dict[str, Any]], torch.nn.Module],
    resume: bool,
    unit: str = "rows",
) -> Run:
    """Plan the steps, build the model (`make_model(deepspeed_json)`) and its DeepSpeed engine, seed each rank
    apart (dropout; the data order has its own generator), restore the newest checkpoint when resuming, and
    open the metrics log and progress display."""
    from stages import __version__
    from stages.engine import build_deepspeed_config, initialize_engine

    tc = cfg.train
    plan = plan_steps(n_rows, tc, dist.world_size, cfg.seed, unit)
    ds_config = build_deepspeed_config(tc, cfg.deepspeed, dist.world_size, dist.device.type == "cuda")
    engine = initialize_engine(make_model(ds_config), ds_config, tc, plan.total)
    seed_everything(cfg.seed + dist.rank)
    state = resume_from(engine, out, dist, plan.global_batch) if resume else {"step": 0}
    start = int(state["step"])
    metrics = MetricsLogger(out, dist.is_main, cfg.logging.tensorboard, resume_step=start if resume else None)
    meta = {"stage": stage, "rlhf_version": __version__, "model": cfg.model.name_or_path or "from_config"}
    progress = TrainProgress(dist.is_main, plan.total, start, stage, print_every=cfg.logging.log_every)
    return Run(stage, out, dist, tc, plan, engine, tokenizer, metrics, progress, start,
               float(state.get("tokens_seen", 0.0)), meta, cfg.logging.log_every)
