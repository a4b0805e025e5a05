"""Units of stages/sft.py and stages/trainer.py pinned by a mutation audit: each test kills mutants that survived
the suite's fast tests -- train_step's logged loss with no trained token or every micro-batch skipped and the
norm it reports, evaluation's mode, single-token and huge-loss evaluation, the eval split of eval_fraction 0,
the data report line, a hold-out from one row, `kept` across a guard's earlier steps, the ZeRO-0 norm over
several parameters, Run's step logging / stop-signal save / finish / resume counters, the cross-rank
non-finite flag, and an in-process sft.run's eval, save and profiler schedule (~10 s on one CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import GradOnlyEngine, tiny_sft_dict
from stages import sft, trainer
from stages.data import DataReport, TokenRows
from stages.distributed import ONE_PROCESS
from stages.lm import collate
from stages.trainer import LossGuard

CPU = torch.device("cpu")


class FixedLogits(torch.nn.Module):
    """A 'causal LM' over a 2-token vocabulary whose logits are [0, -gap] at every position (token 1 has
    probability 1 / (1 + e^gap)); one trainable bias so it has a parameter and a gradient."""

    def __init__(self, gap: float) -> None:
        super().__init__()
        self.gap = gap
        self.bias = torch.nn.Parameter(torch.zeros(2))
        self.modes: list[bool] = []  # `training` at each forward

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        self.modes.append(self.training)
        base = torch.tensor([0.0, -self.gap]).expand(*input_ids.shape, 2)
        return SimpleNamespace(logits=base + self.bias)


class Zero1Engine(GradOnlyEngine):
    """GradOnlyEngine as ZeRO stage 1 whose DeepSpeed reports no norm (as for a step fp16's scaler skipped)."""

    def zero_optimization_stage(self) -> int:
        return 1


def _one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-reduces of a one-rank process group (the identity), without starting one."""
    for module in (sft, trainer):
        monkeypatch.setattr(module, "all_reduce_sum", lambda v, d: v)


# --------------------------------------------------------------------------------------------- train_step
def test_a_step_without_trained_tokens_logs_loss_0_and_one_with_every_micro_batch_skipped_logs_nan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No trained token in the step (all labels IGNORE): loss 0.0, a finite figure (a NaN would stop the run in
    log_step). Every micro-batch skipped as non-finite (train.on_nonfinite: skip): loss NaN, which log_step lets
    through because the guard skipped."""
    _one_rank(monkeypatch)
    model = FixedLogits(gap=math.log(3.0))
    untrained = [collate([{"input_ids": [0, 1, 1], "labels": [-100, -100, -100]}], 0, CPU)]
    out = sft.train_step(GradOnlyEngine(model, 1), untrained, ONE_PROCESS)
    assert (out["loss"], out["trained_tokens"], out["tokens"]) == (0.0, 0.0, 3.0)

    monkeypatch.setenv("RLHF_FAULT", "nan-loss@4")  # poisons micro-batch 0 of step 4: the only one
    trained = [collate([{"input_ids": [0, 1, 1], "labels": [-100, 1, 1]}], 0, CPU)]
    guard = LossGuard("loss", 4, "skip")
    out = sft.train_step(GradOnlyEngine(model, 1), trained, ONE_PROCESS, guard)
    assert guard.dropped == [0] and out["trained_tokens"] == 2.0 and math.isnan(out["loss"])


def test_a_step_whose_engine_reports_no_norm_logs_none_and_zero0_logs_the_computed_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ZeRO 1-3 DeepSpeed reports the norm; when it reports none the step's stats carry no grad_norm
    (rather than None, which the metrics log cannot average). Under ZeRO-0 it is computed: one trained token
    of p(1) = 1/4 (gap log 3): d NLL / d bias = softmax - onehot = [3/4, -3/4], norm 3/4 * sqrt(2)."""
    _one_rank(monkeypatch)
    batch = [collate([{"input_ids": [0, 1], "labels": [-100, 1]}], 0, CPU)]
    out = sft.train_step(Zero1Engine(FixedLogits(math.log(3.0)), 1), batch, ONE_PROCESS)
    assert "grad_norm" not in out and out["loss"] == pytest.approx(math.log(4.0))
    out = sft.train_step(GradOnlyEngine(FixedLogits(math.log(3.0)), 1), batch, ONE_PROCESS)
    assert out["grad_norm"] == pytest.approx(0.75 * math.sqrt(2.0), rel=1e-6)


# --------------------------------------------------------------------------------------------- evaluate
def _rows(*examples: tuple[list[int], list[int]]) -> TokenRows:
    rows = TokenRows(with_positions=False)
    for ids, labels in examples:
        rows.append(ids, labels)
    return rows


def test_evaluation_runs_in_eval_mode_and_hands_the_model_back_in_training_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dropout off during evaluation, back on after it: the training steps that follow train with dropout."""
    _one_rank(monkeypatch)
    model = FixedLogits(gap=0.0)
    model.train()
    sft.evaluate(GradOnlyEngine(model, 1), _rows(([0, 1], [-100, 1]), ([1, 0], [-100, 0])), 1, ONE_PROCESS, 0)
    assert model.modes == [False, False] and model.training


def test_evaluation_of_one_trained_token_and_a_huge_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """One trained token of probability 1 / (1 + e^1000): eval loss 1000 (its NLL over 1 token, not halved),
    perplexity capped at e^50 (exp(1000) overflows a float: the run would die at its evaluation)."""
    _one_rank(monkeypatch)
    ev = sft.evaluate(GradOnlyEngine(FixedLogits(gap=1000.0), 1), _rows(([0, 1], [-100, 1])), 4, ONE_PROCESS, 0)
    assert ev == {"eval/loss": pytest.approx(1000.0), "eval/perplexity": pytest.approx(math.exp(50.0)),
                  "eval/tokens": 1.0}


# --------------------------------------------------------------------------------------------- data
def _tiny_cfg(tmp_path: Path, n_rows: int, **data: Any) -> Any:
    """The tiny SFT config over the first `n_rows` rows of its data, with `data` settings."""
    from stages.config import SFTConfig

    cfg = tiny_sft_dict(tmp_path)
    lines = Path(cfg["data"]["train"]).read_text().splitlines()[:n_rows]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg["data"].update(train=str(tmp_path / "train.jsonl"), **data)
    return SFTConfig.model_validate(cfg)


def test_eval_fraction_0_holds_out_nothing_and_reports_no_eval_split(tmp_path: Path) -> None:
    """data.eval_fraction: 0 and no data.eval: all 20 rows train, no eval rows, and the data report has no eval
    entry (no "eval data: 0 examples" line, no empty split in data_report.json); 0.1 holds out 2 of 20."""
    from stages.sft import load_sft_data

    _, train, evals, reports = load_sft_data(_tiny_cfg(tmp_path, 20, eval_fraction=0.0), tmp_path / "o", ONE_PROCESS,
                                             save=False)
    assert (len(train), evals, list(reports)) == (20, None, ["train"])
    _, train, evals, reports = load_sft_data(_tiny_cfg(tmp_path, 20, eval_fraction=0.1), tmp_path / "o", ONE_PROCESS,
                                             save=False)
    assert (len(train), len(evals), list(reports), reports["eval"].examples) == (18, 2, ["train", "eval"], 2)


def test_data_report_line_names_each_count_in_its_place() -> None:
    report = DataReport(examples=7, tokens=12345, trained_tokens=678, prompt_truncated=2, response_truncated=3,
                        packed_rows=0)
    assert sft.describe_report("eval", report) == (
        "eval data: 7 examples, packed into 0 rows; 12,345 tokens (678 trained); truncated: 2 prompts (left), "
        "3 responses (right)")
    assert sft.describe_report("train", DataReport(examples=1, tokens=5, trained_tokens=4)) == (
        "train data: 1 examples; 5 tokens (4 trained); truncated: 0 prompts (left), 0 responses (right)")


# --------------------------------------------------------------------------------------------- trainer units
def test_a_holdout_from_one_row_is_a_data_error() -> None:
    """One row cannot be split into a training row and an eval row: a DataError, not an empty eval split."""
    from stages.errors import DataError

    with pytest.raises(DataError, match=r"cannot hold out an eval split from 1 row\(s\)"):
        trainer.split_holdout(["only"], 0.5, seed=0)
    assert trainer.split_holdout(["a", "b"], 0.01, seed=0)[0] in (["a"], ["b"])  # 2 rows: one each side


def test_kept_leaves_out_only_the_skips_since_the_given_point() -> None:
    """A guard that spans several optimizer steps (PPO's update) skipped micro-batch 2 of an earlier step and
    micro-batch 0 of this one (dropped [2, 0], this step's skips start at 1): only value 0 is left out."""
    guard = LossGuard("loss", 1, "skip", skipped=2, dropped=[2, 0])
    assert trainer.kept(["a", "b", "c"], guard, since=1) == ["b", "c"]
    assert trainer.kept(["a", "b", "c"], guard) == ["b"]
    assert trainer.kept(["a", "b"], None) == ["a", "b"]


def test_zero0_grad_norm_is_the_l2_norm_over_all_parameters() -> None:
    """Two parameters with gradients [3] and [0, 4]: the global norm is 5 (sqrt(9 + 16)), not 3 + 4; a
    parameter without a gradient is left out."""
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (1, 2, 3))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([0.0, 4.0])
    module = torch.nn.ParameterList([a, b, c])
    engine = GradOnlyEngine(module, 1)
    assert float(trainer.unsharded_grad_norm(engine)) == pytest.approx(5.0)
    assert trainer.unsharded_grad_norm(Zero1Engine(module, 1)) is None


# --------------------------------------------------------------------------------------------- run (in process)
def test_an_in_process_run_logs_evaluates_and_saves_on_its_schedule(
    tmp_path: Path, process_group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sft.run, 3 steps, eval_every 2 with eval micro-batches of 5, save_every 0: train rows for steps 1-3 with
    lr and grad_norm, evaluations after steps 2 and 3 (the last; of 5 rows per forward), one checkpoint (step 3,
    the final one); a half-written checkpoint left by a killed run is removed first; the profiler stops at
    the end of each step's training work, before its evaluation."""
    from stages.config import SFTConfig
    from stages.metrics import read_metrics

    micros: list[int] = []
    order: list[str] = []  # the profiler's calls and the evaluations, in order
    real_evaluate = sft.evaluate

    def evaluate(e: Any, rows: TokenRows, micro: int, d: Any, pad: int) -> dict[str, float]:
        micros.append(micro)
        order.append("eval")
        return real_evaluate(e, rows, micro, d, pad)

    class Profiler:
        def __init__(self, *args: Any) -> None:
            pass

        def begin(self, step: int) -> None:
            order.append(f"begin {step}")

        def close(self) -> None:
            order.append("close")

        def __enter__(self) -> "Profiler":
            return self

        def __exit__(self, *exc: object) -> None:
            order.append("exit")

    monkeypatch.setattr(sft, "evaluate", evaluate)
    monkeypatch.setattr(trainer, "StepProfiler", Profiler)
    cfg = SFTConfig.model_validate(tiny_sft_dict(tmp_path, max_steps=3, eval_every=2, save_every=0,
                                                 micro_batch_size=4, eval_micro_batch_size=5))
    out = Path(cfg.output_dir)
    (out / ".tmp-checkpoint-00000009").mkdir(parents=True)  # half-written by a killed run: removed at the start
    final = sft.run(cfg)
    assert not list(out.glob(".tmp-*"))
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["train/lr"] > 0 and r["train/grad_norm"] > 0 for r in train)
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 3] and micros == [5, 5]
    # each step's profile ends with its training work, before its evaluation
    assert order == ["begin 1", "close", "begin 2", "close", "eval", "begin 3", "close", "eval", "exit"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000003"]
    assert json.loads((final / "rlhf_checkpoint.json").read_text())["step"] == 3

    # an eval split none of whose rows was usable (each response cut away, data.on_bad_row: skip): evaluation
    # is off, said once, and eval_every is said to do nothing
    said: list[str] = []
    for module in (sft, trainer):
        monkeypatch.setattr(module, "say", lambda enabled, text: said.append(text))
    real_load = sft.load_sft_data

    def no_usable_eval(*args: Any, **kwargs: Any) -> tuple[Any, TokenRows, TokenRows, dict[str, DataReport]]:
        tokenizer, train_rows, _, reports = real_load(*args, **kwargs)
        return tokenizer, train_rows, TokenRows(with_positions=False), reports

    monkeypatch.setattr(sft, "load_sft_data", no_usable_eval)
    second = tiny_sft_dict(tmp_path / "b", max_steps=2, eval_every=1, micro_batch_size=4)
    sft.run(SFTConfig.model_validate(second))
    assert any("no usable eval example; evaluation is off" in s for s in said), said
    assert any("train.eval_every is 1 but there is no eval split" in s for s in said), said
    assert not [r for r in read_metrics(Path(second["output_dir"]) / "metrics.jsonl") if "eval/loss" in r]


# --------------------------------------------------------------------------------------------- Run (units)
class Recorder:
    """Stands in for MetricsLogger and TrainProgress: what was logged, which events, progress updates."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        self.events: list[tuple[int, str]] = []
        self.updates: list[tuple[int, dict[str, float]]] = []
        self.closed = 0

    def log(self, step: int, row: dict[str, float]) -> None:
        self.rows[step] = row

    def event(self, step: int, name: str, **_: Any) -> None:
        self.events.append((step, name))

    def update(self, step: int, shown: dict[str, float]) -> None:
        self.updates.append((step, shown))

    def close(self) -> None:
        self.closed += 1


def _run(tmp_path: Path, rec: Recorder, *, skipped: int = 0, tokens_seen: float = 0.0, start: int = 0,
         log_every: int = 1, **train: Any) -> Any:
    """A Run over 8 rows in global batches of 2 (4 steps per epoch) and total `max_steps` (default 5)."""
    from stages.config import TrainConfig

    tc = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=1, **{"max_steps": 5, **train})
    return trainer.Run("sft", tmp_path, ONE_PROCESS, tc, trainer.plan_steps(8, tc, 1, 0), object(), None, rec, rec,
                       start, tokens_seen, {}, log_every, None, skipped=skipped)


def test_log_step_counts_skips_lets_a_skipped_nan_through_and_logs_on_its_cadence(tmp_path: Path) -> None:
    """on_nonfinite: skip, log_every 2 over 5 steps, 3 micro-batches skipped before (resumed), 100 tokens seen:
    step 1 skips its only micro-batch (loss NaN: no stop), step 2 trains 30 tokens in 3 s. Logged: steps 2, 4
    and 5 (the last); at step 2: 10 tokens/s (this step's), 140 tokens seen, 4 skipped micro-batches in all."""
    rec = Recorder()
    run = _run(tmp_path, rec, skipped=3, tokens_seen=100.0, log_every=2, on_nonfinite="skip")
    run.log_step(1, {"train/loss": math.nan}, 10.0, 1.0, {}, LossGuard("loss", 1, "skip", skipped=1, dropped=[0]))
    run.log_step(2, {"train/loss": 2.0}, 30.0, 3.0, {"loss": 2.0}, LossGuard("loss", 2, "skip"))
    for done in (3, 4, 5):
        run.log_step(done, {"train/loss": 1.0}, 6.0, 1.0, {}, LossGuard("loss", done, "skip"))
    assert sorted(rec.rows) == [2, 4, 5]
    row = rec.rows[2]
    assert (row["train/tokens_per_s"], row["train/tokens_seen"], row["train/skipped_micro_batches"]) == (10.0, 140.0,
                                                                                                       4.0)
    assert rec.updates[1] == (2, {"loss": 2.0, "tok/s": 10.0})


def test_log_step_stops_on_a_nan_loss_and_logs_no_skip_count_without_skip_mode(tmp_path: Path) -> None:
    """on_nonfinite: stop (the default): a NaN loss is NonFinite at once; a finite step's row has no
    train/skipped_micro_batches (nothing is ever skipped)."""
    from stages.errors import NonFinite

    rec = Recorder()
    run = _run(tmp_path, rec)
    run.log_step(1, {"train/loss": 1.5}, 4.0, 1.0, {}, LossGuard("loss", 1))
    assert "train/skipped_micro_batches" not in rec.rows[1]
    with pytest.raises(NonFinite, match=r"non-finite loss \(nan\) at step 2"):
        run.log_step(2, {"train/loss": math.nan}, 4.0, 1.0, {}, LossGuard("loss", 2))


def test_begin_profiles_the_one_based_step(tmp_path: Path) -> None:
    """Run.begin(step) (0-based) starts the profiler for step + 1 (logging.profile_step counts from 1) and gives
    this rank's micro-batches: 2 of 1 row each with accumulation 2."""
    from stages.config import TrainConfig

    begun: list[int] = []
    tc = TrainConfig(micro_batch_size=1, gradient_accumulation_steps=2, max_steps=3)
    plan = trainer.plan_steps(4, tc, 1, 0)
    run = trainer.Run("sft", tmp_path, ONE_PROCESS, tc, plan, object(), None, Recorder(), Recorder(), 0, 0.0, {}, 1,
                      SimpleNamespace(begin=begun.append))
    batches = run.begin(2)
    assert begun == [3] and [len(b) for b in batches] == [1, 1]
    assert sum(batches, []) == plan.sampler.indices(2)


def test_a_stop_signal_saves_now_and_ends_the_run_after_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_every 0 over 5 steps: step 1 saves only because a SIGTERM arrived; the checkpoint gets the run's
    counters (skipped included: a resumed run goes on counting), then the run ends with stop.Stopped."""
    import signal

    from stages import stop

    saved: list[tuple[int, dict[str, Any]]] = []
    monkeypatch.setattr(trainer, "save_checkpoint",
                        lambda engine, tok, out, done, counters, *a, **k: saved.append((done, counters))
                        or out / f"checkpoint-{done:08d}")
    monkeypatch.setattr(trainer.stop, "requested", lambda device: 0)
    rec = Recorder()
    run = _run(tmp_path, rec, skipped=2, tokens_seen=7.0, save_every=0)
    assert not run.should_save(1)
    monkeypatch.setattr(trainer.stop, "requested", lambda device: int(signal.SIGTERM))
    assert run.should_save(1)
    with pytest.raises(stop.Stopped):
        run.save(1)
    assert saved == [(1, {"tokens_seen": 7.0, "global_batch": 2, "total_steps": 5, "skipped": 2})]
    assert rec.events == [(1, "checkpoint"), (1, "stopped")]


def test_finish_publishes_the_last_steps_checkpoint_of_a_resumed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run resumed at step 2 of 5 publishes step 5's checkpoint as final (its total, not where it started)."""
    published: list[int] = []
    monkeypatch.setattr(trainer, "publish_final", lambda out, step, dist: published.append(step) or out / "final")
    monkeypatch.setattr(trainer, "print_summary", lambda *a: None)
    monkeypatch.setattr(trainer, "read_metrics", lambda path: [])
    rec = Recorder()
    assert _run(tmp_path, rec, start=2).finish() == tmp_path / "final"
    assert published == [5] and rec.events == [(5, "final")]


def test_a_bad_loss_on_another_rank_stops_this_one_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-finite flag is summed over ranks: this rank's loss is finite, another rank's is not (the
    all-reduce adds 1): the step stops here as well, before this rank's backward, naming 1 rank."""
    from stages.errors import NonFinite

    monkeypatch.setattr(trainer, "all_reduce_sum", lambda v, d: v + 1)
    model = FixedLogits(gap=0.0)
    backwards: list[float] = []
    engine = GradOnlyEngine(model, 1)
    engine.backward = lambda loss: backwards.append(float(loss))  # type: ignore[method-assign]
    with pytest.raises(NonFinite, match=r"micro-batch 1 of 1, 1 rank\(s\)"):
        trainer.optimizer_step(engine, [0], lambda b: model.bias.sum() + 1.0, LossGuard("loss", 1))
    assert backwards == []


def test_resume_restores_the_checkpoints_counters_and_warns_of_another_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_training(resume=True) from a checkpoint at step 2 (55 tokens seen, 3 micro-batches skipped, global
    batch 32): the run starts at 2 with those counters, and says that its global batch (16) differs; the
    dropped-rows warning (76 rows in global batches of 16: 12 left out of each epoch, 15.8 %) is said on a
    fresh start only."""
    from stages import engine as engines
    from stages.config import SFTConfig

    said: list[str] = []
    monkeypatch.setattr(trainer, "say", lambda enabled, text: said.append(text))
    monkeypatch.setattr(engines, "initialize_engine", lambda *a: object())
    monkeypatch.setattr(trainer, "load_latest_checkpoint", lambda *a, **k: {
        "step": 2, "tokens_seen": 55.0, "skipped": 3, "global_batch": 32})
    cfg = SFTConfig.model_validate(tiny_sft_dict(tmp_path, max_steps=4, micro_batch_size=16))
    out = tmp_path / "out"
    out.mkdir()
    run = trainer.start_training(cfg, "sft", ONE_PROCESS, out, None, 76, lambda ds: None, resume=True)
    run.metrics.close()
    assert (run.start, run.tokens_seen, run.skipped) == (2, 55.0, 3)
    assert any("global batch 32, this run uses 16" in s for s in said), said
    assert not any("left out of each epoch" in s for s in said), said
    said.clear()
    run = trainer.start_training(cfg, "sft", ONE_PROCESS, out, None, 76, lambda ds: None, resume=False)
    run.metrics.close()
    assert run.start == 0 and any("12 of 76 training rows" in s for s in said), said


def test_packing_is_refused_once_the_built_model_turns_out_to_be_of_an_unsafe_type(
    tmp_path: Path, process_group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose type is known only once built (a hub or local model) and is one packing cannot separate
    (OPT): sft.run stops with the ConfigError before any engine or step."""
    from stages.config import SFTConfig
    from stages.errors import ConfigError

    monkeypatch.setattr(sft, "build_causal_lm", lambda *a: SimpleNamespace(config=SimpleNamespace(model_type="opt")))
    data = tiny_sft_dict(tmp_path, max_steps=1, micro_batch_size=4)
    data["data"]["packing"] = True
    with pytest.raises(ConfigError, match="data.packing: true is not supported for opt models"):
        sft.run(SFTConfig.model_validate(data))
