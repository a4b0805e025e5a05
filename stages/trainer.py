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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.markup import escape

from stages import faults, stop
from stages.checkpoint import load_latest_checkpoint, publish_final, remove_stale_temporaries, save_checkpoint
from stages.config import TrainConfig
from stages.data import DataReport
from stages.distributed import DistInfo, all_reduce_sum, barrier, run_on_main, seed_everything, setup_distributed
from stages.errors import ConfigError, DataError, NonFinite, resume_with
from stages.metrics import MetricsLogger, TrainProgress, print_summary, read_metrics, say
from stages.models import auto_tokenizer_difference
from stages.perf import StepProfiler


# --------------------------------------------------------------------------------------------- data order
class EpochSampler:
    """Global batch for optimizer step s: epoch e = s // S, slice k = s % S of a permutation of all rows seeded
    with seed + e (S = rows // global_batch; the last partial batch of an epoch is dropped: `left_out` rows,
    other ones each epoch). Depends only on s, so a resumed run sees exactly the batches an uninterrupted one
    would."""

    def __init__(self, n_rows: int, global_batch: int, seed: int) -> None:
        self.n, self.global_batch, self.seed = n_rows, global_batch, seed
        self.steps_per_epoch = n_rows // global_batch
        self.left_out = n_rows - self.steps_per_epoch * global_batch
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


#: a share of the rows left out of every epoch (the partial last batch) above which the run warns
DROPPED_WARN = 0.1


def describe_plan(plan: StepPlan, unit: str, world_size: int) -> str:
    """The step plan in one line, with the rows each epoch leaves out: its shuffle's rows past the last full
    global batch (other rows in each epoch, as each epoch shuffles anew)."""
    sampler = plan.sampler
    left = f"; each epoch leaves out {sampler.left_out} {unit} past its last full batch" if sampler.left_out else ""
    return (f"steps: {plan.total} optimizer steps of {plan.global_batch} {unit} ({sampler.steps_per_epoch} "
            f"per epoch over {sampler.n} {unit}, {world_size} rank(s){left})")


def dropped_warning(plan: StepPlan, unit: str) -> str | None:
    """A warning when the partial last batch is more than DROPPED_WARN of the rows: each epoch then trains on
    noticeably fewer rows than it reads (train.epochs counts passes of full global batches)."""
    dropped, n_rows = plan.sampler.left_out, plan.sampler.n
    if dropped <= DROPPED_WARN * n_rows:
        return None
    return (f"warning: {dropped} of {n_rows} training {unit} ({dropped / n_rows:.0%}) are left out of each epoch (the "
            f"partial last batch of {plan.global_batch}); a global batch that divides the data, or more data, "
            "trains on all of them")


# --------------------------------------------------------------------------------------------- one step
@dataclass
class LossGuard:
    """What `optimizer_step` does with a micro-batch whose loss is NaN or infinite on any rank. The check runs
    before that micro-batch's backward, so a bad loss never reaches the weights:
      stop: raise NonFinite (the optimizer step is not taken; the last complete checkpoint is intact);
      skip: drop micro-batch i on every rank when any rank's is bad, and count it in `skipped`: its graph
            (which may hold NaNs anywhere) is never back-propagated; `zero_loss` is, on all ranks alike (ZeRO-2
            lays gradients into its reduce buckets in the order the hooks fire, so every rank must run the same
            backward), giving every parameter a gradient of exactly 0 (ZeRO 0-2; refused with ZeRO-3). The
            other micro-batches of the step still train; the optimizer still steps (Adam moments decay).
    A non-finite gradient norm after the step (finite losses, overflowing gradients) stops the run, since the
    weights may already be damaged, except under fp16, where DeepSpeed's loss scaler skipped the step itself.
    """

    what: str
    step: int
    mode: str = "stop"
    skipped: int = 0
    dropped: list[int] = field(default_factory=list)  # the micro-batch indices skipped (the same on every rank)


def kept(values: list[Any], guard: LossGuard | None, since: int = 0) -> list[Any]:
    """`values` (one per micro-batch of a step) without those of the micro-batches `guard` skipped: what a
    step's logged means are taken over (`since`: the guard's skips before this step, when it spans several)."""
    dropped = set(guard.dropped[since:]) if guard is not None else set()
    return [v for i, v in enumerate(values) if i not in dropped]


def kept_sum(rows: list[torch.Tensor], guard: LossGuard | None, size: int, device: torch.device) -> torch.Tensor:
    """The sum of a step's per-micro-batch float64 metric vectors over the micro-batches `guard` kept (zeros of
    `size` when it kept none), left on the device for the step's one all-reduce and read."""
    trained = kept(rows, guard)
    return torch.stack(trained).sum(0) if trained else torch.zeros(size, dtype=torch.float64, device=device)


def optimizer_step(
    engine: Any, batches: list[Any], micro_loss: Callable[[Any], torch.Tensor], guard: LossGuard | None = None
) -> float | None:
    """One optimizer step: `engine.backward(micro_loss(b))` for every micro-batch b (DeepSpeed steps the
    optimizer after the last one), each loss checked by `guard` first. Returns the global gradient norm before
    clipping, when known (None for a step fp16's loss scaler skipped)."""
    grad_norm = None
    for i, batch in enumerate(batches):
        loss = micro_loss(batch)
        if guard is not None:
            if i == 0:
                faults.maybe_out_of_memory(guard.step)
                loss = faults.maybe_poison("nan-loss", guard.step, loss)
            bad = float(all_reduce_sum((~torch.isfinite(loss).all()).reshape(1), loss.device)[0])  # one host read
            if bad and guard.mode == "stop":
                raise NonFinite(
                    f"non-finite {guard.what} at step {guard.step} (micro-batch {i + 1} of {len(batches)}, "
                    f"{int(bad)} rank(s)); stopped before the optimizer step, nothing saved (continuing "
                    f"{resume_with()} starts from the newest complete checkpoint, if there is one; or set "
                    "train.on_nonfinite: skip)"
                )
            if bad:
                guard.skipped += 1
                guard.dropped.append(i)
                loss = zero_loss(engine.module)
        engine.backward(loss)
        if i == len(batches) - 1:
            grad_norm = unsharded_grad_norm(engine)
        engine.step()
    reported = engine.get_global_grad_norm()
    if reported is not None:
        grad_norm = reported
    if fp16_enabled(engine) and not engine.was_step_applied():
        return None  # fp16's loss scaler found an overflow and skipped the step (its norm is inf: not a figure)
    if grad_norm is None:
        return None
    norm = float(grad_norm)  # (ZeRO-0's norm is a device tensor until here: read once, after the step)
    if not math.isfinite(norm) and guard is not None:
        raise NonFinite(
            f"non-finite gradient norm ({norm}) of the {guard.what} at step {guard.step}; the "
            "weights may be damaged, so nothing more is saved (resume from the last complete checkpoint)"
        )
    return norm


def fp16_enabled(engine: Any) -> bool:
    """Whether `engine` trains in fp16 with DeepSpeed's loss scaler (False for an engine without the method)."""
    return bool(getattr(engine, "fp16_enabled", lambda: False)())


def fp16_skipped_steps(engine: Any) -> float | None:
    """How many optimizer steps fp16's loss scaler has skipped for an overflow so far (DeepSpeed's count, kept in
    its checkpoints; the LR schedule does not advance on them); None without fp16."""
    if not fp16_enabled(engine):
        return None
    return float(getattr(engine, "skipped_steps", 0))


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """0 x (the sum of every trainable parameter): a loss whose gradient is exactly zero for each of them
    (d/dp of 0 * sum(p) = 0 whatever p holds), touching no activation."""
    params = [p for p in module.parameters() if p.requires_grad]
    return sum((p.sum(dtype=torch.float32) * 0.0 for p in params),  # (float32: an fp16 sum may overflow to inf)
               torch.zeros((), device=params[0].device if params else None))


def unsharded_grad_norm(engine: Any) -> torch.Tensor | None:
    """Global L2 norm of the (already rank-averaged) gradients before clipping, for ZeRO stage 0, where
    DeepSpeed does not report it (a device tensor: not read back here); None for ZeRO 1-3 (DeepSpeed reports
    it after the step)."""
    if engine.zero_optimization_stage() != 0:
        return None
    # each gradient's norm in float32, one upcast copy at a time (a list of all the copies held 4 N bytes more)
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
             for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


# --------------------------------------------------------------------------------------------- run frame
def open_run(output_dir: str, seed: int, prepare: Callable[[], None] | None) -> tuple[DistInfo, Path]:
    """Start the process group, let rank 0 prepare the output directory (when no `rlhf` process did before
    launching) and clear half-written checkpoints, then seed every rank alike."""
    dist = setup_distributed()
    stop.arm()
    out = Path(output_dir)
    if prepare is not None:
        run_on_main(prepare, dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    barrier()
    seed_everything(seed)
    return dist, out


def say_report(enabled: bool, split: str, report: DataReport, describe: Callable[..., str],
               what: str = "examples", keys: Callable[[str], str] = str) -> None:
    """A split's data report line (`describe`), and its warnings when most examples (`what`) were cut, most rows
    read were skipped as bad rows, or a prompt-part column is not read, and its cautions; `keys` names the config
    keys in each (PPO's PTX rows: `ptx_wording`)."""
    say(enabled, keys(describe(split, report)))
    for warning in (report.cut_warning(what), report.skip_warning(), report.unread_warning(), *report.cautions):
        if warning:
            say(enabled, f"[yellow]warning: {split} data: {escape(keys(warning))}[/]")


def print_data_check(reports: dict[str, DataReport], describe: Callable[..., str], n_rows: int, tc: TrainConfig,
                     world_size: int, seed: int, unit: str, what: str = "examples") -> None:
    """The end of `--check-data` for SFT and the RM: each split's report as the run prints it, then the run's step
    plan for `world_size` ranks (a data set smaller than one global batch is the run's DataError, raised here)."""
    for split, report in reports.items():
        say_report(True, split, report, describe, what)
    plan = plan_steps(n_rows, tc, world_size, seed, unit)
    say(True, describe_plan(plan, unit, world_size))
    warning = dropped_warning(plan, unit)
    if warning:
        say(True, f"[yellow]{warning}[/]")


def write_data_reports(out: Path, reports: dict[str, DataReport], dist: DistInfo, describe: Callable[..., str],
                       what: str = "examples") -> None:
    """Print each split's report (its examples called `what` in the cut warning) and save them all as
    data_report.json."""
    for split, report in reports.items():
        say_report(dist.is_main, split, report, describe, what)
    if dist.is_main:
        body = {split: asdict(report) for split, report in reports.items()}
        (out / "data_report.json").write_text(json.dumps(body, indent=2), encoding="utf-8")


def resume_from(engine: Any, out: Path, dist: DistInfo, global_batch: int, total: int) -> dict[str, Any]:
    """Load the newest complete checkpoint; its trainer state, or {"step": 0} when there is none. A checkpoint
    past the run's `total` steps is refused (check_resume_point) before "resumed from" is said."""
    state = load_latest_checkpoint(engine, out, dist, say=lambda text: say(dist.is_main, text))
    if state is None:
        say(dist.is_main, f"resume: no complete checkpoint in {out}; starting from step 0")
        return {"step": 0}
    check_resume_point(int(state["step"]), total, out)
    if state.get("global_batch") != global_batch:  # (the batch of step s: a function of seed, s and its rows)
        say(dist.is_main, f"[yellow]warning: the checkpoint was trained with global batch {state.get('global_batch')}, "
                          f"this run uses {global_batch}: it continues at step {state['step']} x {global_batch} rows "
                          "into the data order, not where that run stopped, so rows are repeated (a smaller batch) or "
                          "skipped (a larger one) until the epoch ends; keep micro_batch_size x "
                          "gradient_accumulation_steps x processes to continue exactly[/]")
    say(dist.is_main, f"resumed from step {state['step']} ({out})")
    return state


def check_resume_point(start: int, total: int, out: Path, unit: str = "step") -> None:
    """A resumed run must not start past its own end: a checkpoint at step `start` > `total` (fewer steps than
    the run that wrote it: max_steps, epochs or the data changed) is refused rather than a run published as
    final from an older checkpoint."""
    if start > total:
        raise ConfigError(f"--resume: the newest checkpoint in {out} is at {unit} {start}, past this run's last "
                          f"{unit} {total}; raise the run's length to at least {start}, or resume in another way "
                          "(copy the checkpoint you want to a new output_dir)")


def due(done: int, every: int, total: int) -> bool:
    """True after the last step, and every `every` steps (0 = only at the end)."""
    return done == total or (every > 0 and done % every == 0)


def check_finite(name: str, value: float, done: int, out: Path) -> None:
    """Stop before anything is saved when a logged loss is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFinite(
            f"non-finite {name} ({value}) at step {done}; stopping without saving. "
            f"The last complete checkpoint in {out} is intact (resume {resume_with()})."
        )


def end_stopped(signum: int, done: int, checkpoint: Path | None, metrics: MetricsLogger,
                progress: TrainProgress, unit: str = "step") -> None:
    """After the checkpoint a stop signal asked for (None: a run that writes none): close the display and the
    log (a `stopped` event) and raise stop.Stopped, which the CLI turns into its message ("stopped by SIGTERM
    after `unit` N: ...") and exit code 128 + signum."""
    progress.close()
    metrics.event(done, "stopped", signal=signum)
    metrics.close()
    raise stop.Stopped(signum, done, checkpoint, unit)


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
    profiler: StepProfiler
    skipped: int = 0
    stop_signal: int = 0

    @property
    def total(self) -> int:
        return self.plan.total

    def begin(self, step: int) -> list[list[int]]:
        """Start optimizer step `step` (0-based; under the profiler when it is logging.profile_step): the row
        indices of its micro-batches on this rank."""
        self.profiler.begin(step + 1)
        return self.plan.micro_batches(step, self.dist, self.tc)

    def guard(self, step: int) -> LossGuard:
        """The non-finite check for optimizer step `step` (1-based), per train.on_nonfinite."""
        return LossGuard("loss", step, self.tc.on_nonfinite)

    def log_step(
        self, done: int, values: dict[str, float], tokens: float, seconds: float, shown: dict[str, float],
        guard: LossGuard | None = None,
    ) -> None:
        """Stop on a non-finite train/loss (unless `guard` skipped a micro-batch of this step, which makes the
        logged loss NaN); add the counters (epoch, tokens/s, tokens seen, skipped micro-batches) to the stage's
        train/* values; log them every log_every steps; advance the progress display with `shown`."""
        faults.maybe_kill("kill", done)
        faults.maybe_signal(done)
        self.skipped += guard.skipped if guard is not None else 0
        if not (guard is not None and guard.skipped):
            check_finite("loss", values["train/loss"], done, self.out)
        self.tokens_seen += tokens
        row = dict(values)
        row |= {
            "train/epoch": done / self.plan.sampler.steps_per_epoch,
            "train/tokens_per_s": tokens / seconds,
            "train/tokens_seen": self.tokens_seen,
        }
        if self.tc.on_nonfinite == "skip":
            row["train/skipped_micro_batches"] = float(self.skipped)
        overflows = fp16_skipped_steps(self.engine)
        if overflows is not None:
            row["train/fp16_skipped_steps"] = overflows
        if due(done, self.log_every, self.total):
            self.metrics.log(done, row)
        self.progress.update(done, {**shown, "tok/s": row["train/tokens_per_s"]})

    def should_save(self, done: int) -> bool:
        """A checkpoint is due (save_every, the last step) or a stop signal arrived on some rank. Collective:
        every rank calls it once per step."""
        self.stop_signal = stop.requested(self.dist.device)
        return due(done, self.tc.save_every, self.total) or bool(self.stop_signal)

    def save(self, done: int, **hf: Any) -> None:
        """A resumable checkpoint at step `done` (hf: save_checkpoint's hf_module / hf_files); then, when a stop
        signal arrived, end the run (raise stop.Stopped)."""
        counters = {"tokens_seen": self.tokens_seen, "global_batch": self.plan.global_batch, "total_steps": self.total,
                    "skipped": self.skipped}
        path = save_checkpoint(
            self.engine, self.tokenizer, self.out, done, counters, self.dist, self.tc.save_total_limit, self.meta,
            say=lambda text: say(True, text), **hf
        )
        self.metrics.event(done, "checkpoint", path=str(path))
        if self.stop_signal:
            end_stopped(self.stop_signal, done, path, self.metrics, self.progress)

    def finish(self) -> Path:
        """Publish the last checkpoint's HF model as output_dir/final and print the summary table."""
        self.progress.close()
        final = publish_final(self.out, self.total, self.dist)
        warn_if_auto_tokenizer_differs(final, self.dist)
        self.metrics.event(self.total, "final", path=str(final))
        self.metrics.close()
        stop.disarm()
        if self.dist.is_main:
            print_summary(f"rlhf {self.stage}", read_metrics(self.out / "metrics.jsonl"), final)
        return final


def warn_if_auto_tokenizer_differs(final: Path, dist: DistInfo) -> None:
    """A warning when plain transformers would load final/'s tokenizer as another one
    (`auto_tokenizer_difference`), naming the call that loads the one the model was trained with."""
    if dist.is_main and (difference := auto_tokenizer_difference(final)):
        say(True, f"[yellow]warning: {escape(str(final))}: {escape(difference)}. Load its tokenizer with "
                  "PreTrainedTokenizerFast.from_pretrained, as rlhf does (transformers 5 rebuilds this model "
                  "type's tokenizer as its own class whatever tokenizer_config.json names)[/]")


def unused_settings(cfg: Any, total: int, has_eval: bool, unit: str = "step") -> list[str]:
    """Settings a run was given but will not act on, for a warning at its start: `train.eval_every` without an
    eval split (data.eval unset and data.eval_fraction 0), `logging.profile_step` past its last step."""
    notes = []
    if cfg.train.eval_every > 0 and not has_eval:
        notes.append(f"train.eval_every is {cfg.train.eval_every} but there is no eval split (data.eval is unset and "
                     "data.eval_fraction is 0): nothing is evaluated")
    if cfg.logging.profile_step > total:
        notes.append(f"logging.profile_step is {cfg.logging.profile_step}, past the run's last {unit} ({total}): "
                     "nothing is profiled")
    return notes


def warn_unused_settings(cfg: Any, total: int, has_eval: bool, dist: DistInfo, unit: str = "step") -> None:
    """A start-up warning for each of `unused_settings`."""
    for note in unused_settings(cfg, total, has_eval, unit):
        say(dist.is_main, f"[yellow]warning: {escape(note)}[/]")


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
    rendering: dict[str, Any] | None = None,
    has_eval: bool = True,
) -> Run:
    """Plan the steps, build the model (`make_model(deepspeed_json)`) and its DeepSpeed engine, seed each rank
    apart (dropout; the data order has its own generator), restore the newest checkpoint when resuming, and
    open the metrics log and progress display. `rendering` (stages/rendering.py) goes into every saved
    checkpoint's rlhf_checkpoint.json; `has_eval`: whether there is an eval split (`unused_settings`)."""
    from stages import __version__
    from stages.engine import build_deepspeed_config, initialize_engine

    tc = cfg.train
    plan = plan_steps(n_rows, tc, dist.world_size, cfg.seed, unit)
    warning = dropped_warning(plan, unit)
    if warning and not resume:
        say(dist.is_main, f"[yellow]{warning}[/]")
    warn_unused_settings(cfg, plan.total, has_eval, dist)
    ds_config = build_deepspeed_config(tc, cfg.deepspeed, dist.world_size, dist.device.type == "cuda")
    engine = initialize_engine(make_model(ds_config), ds_config, tc, plan.total)
    seed_everything(cfg.seed + dist.rank)
    state = resume_from(engine, out, dist, plan.global_batch, plan.total) if resume else {"step": 0}
    start = int(state["step"])
    metrics = MetricsLogger(out, dist.is_main, cfg.logging.tensorboard, resume_step=start if resume else None)
    meta = {"stage": stage, "rlhf_version": __version__, "model": cfg.model.name_or_path or "from_config",
            "rendering": rendering}
    progress = TrainProgress(dist.is_main, plan.total, start, stage, print_every=cfg.logging.log_every)
    profiler = StepProfiler(cfg.logging.profile_step, out, dist.rank, dist.device)
    return Run(stage, out, dist, tc, plan, engine, tokenizer, metrics, progress, start,
               float(state.get("tokens_seen", 0.0)), meta, cfg.logging.log_every, profiler, int(state.get("skipped", 0)))
