"""Unit pins found by a mutation audit of stages/faults.py, stages/ppo/prompts.py and stages/bench_trl.py: what
the existing tests reach only through minute-long CLI runs (or not at all), checked in-process on CPU in seconds."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from stages import faults
from stages.errors import ConfigError, RlhfError
from stages.models import train_tokenizer


# ============================================================================================== faults
@pytest.fixture
def rank0(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Rank 0 of a run, with no fault planned and no RLHF_FAULT_RANK."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(faults.ENV, raising=False)
    monkeypatch.delenv(faults.RANK_ENV, raising=False)
    return monkeypatch


@pytest.fixture
def sent(rank0: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (pid, signal) pairs stages.faults sends, recorded instead of sent."""
    calls: list[tuple[int, int]] = []
    rank0.setattr(faults.os, "kill", lambda pid, sig: calls.append((pid, sig)))
    return calls


def test_an_empty_rlhf_fault_plans_nothing(rank0: pytest.MonkeyPatch) -> None:
    """`RLHF_FAULT=` (set, but empty, as `RLHF_FAULT= rlhf sft` leaves it) is no fault, not a bad spec."""
    rank0.setenv(faults.ENV, "")
    assert faults.planned("kill", 1) is False


def test_spaces_around_the_comma_separated_faults_are_allowed(rank0: pytest.MonkeyPatch) -> None:
    """`kill@3, nan-loss@5` (a space after the comma) plans both faults."""
    rank0.setenv(faults.ENV, " kill@3, nan-loss@5 ")
    assert faults.planned("kill", 3) and faults.planned("nan-loss", 5)
    assert not faults.planned("nan-loss", 3)


def test_a_bad_step_is_refused_even_when_another_fault_is_asked_for(rank0: pytest.MonkeyPatch) -> None:
    """`kill@soon` is a ConfigError (one error line) naming that item (in quotes) whatever fault the caller asks
    about, and an item after a good one is named alone, not the whole spec."""
    rank0.setenv(faults.ENV, "kill@soon")
    with pytest.raises(ConfigError, match="'kill@soon' is not name@step"):  # (one error line, no traceback)
        faults.planned("nan-loss", 3)
    rank0.setenv(faults.ENV, "kill@3,explode@4")
    with pytest.raises(ConfigError, match=r"^RLHF_FAULT: 'explode@4' is not name@step with name one of kill, "):
        faults.planned("nan-loss", 9)


def test_every_documented_fault_name_is_accepted(rank0: pytest.MonkeyPatch) -> None:
    """Each name of the module docstring parses (nan-reward included, which only `rlhf ppo` reads)."""
    for name in ("kill", "kill-save", "enospc-save", "sigterm", "sigint", "nan-loss", "nan-reward", "oom"):
        rank0.setenv(faults.ENV, f"{name}@2")
        assert faults.planned(name, 2) and not faults.planned(name, 1), name


def test_maybe_kill_sends_sigkill_for_the_named_fault_only(rank0: pytest.MonkeyPatch,
                                                           sent: list[tuple[int, int]]) -> None:
    """kill-save@4 SIGKILLs this process at checkpoint 4 (and not at the `kill` point of step 4)."""
    rank0.setenv(faults.ENV, "kill-save@4")
    faults.maybe_kill("kill", 4)
    assert sent == []
    faults.maybe_kill("kill-save", 4)
    assert sent == [(faults.os.getpid(), signal.SIGKILL)]


@pytest.mark.parametrize("spec, want", [("sigterm@2", [signal.SIGTERM]), ("sigint@2", [signal.SIGINT]),
                                        ("sigint@2,sigterm@2", [signal.SIGTERM, signal.SIGINT]), ("sigint@3", [])])
def test_maybe_signal_sends_the_planned_signal(rank0: pytest.MonkeyPatch, sent: list[tuple[int, int]], spec: str,
                                               want: list[int]) -> None:
    """sigterm@N sends SIGTERM, sigint@N SIGINT, to this process after step N (both when both are planned)."""
    rank0.setenv(faults.ENV, spec)
    faults.maybe_signal(2)
    assert sent == [(faults.os.getpid(), sig) for sig in want]


def test_maybe_disk_full_raises_enospc_at_its_step_only(rank0: pytest.MonkeyPatch) -> None:
    """enospc-save@3 is an OSError with errno ENOSPC in save 3; kill-save@3 is no disk error."""
    rank0.setenv(faults.ENV, "enospc-save@3")
    faults.maybe_disk_full(2)
    with pytest.raises(OSError) as info:
        faults.maybe_disk_full(3)
    assert info.value.errno == errno.ENOSPC
    rank0.setenv(faults.ENV, "kill-save@3")
    faults.maybe_disk_full(3)


def test_maybe_out_of_memory_raises_torchs_error_at_its_step_only(rank0: pytest.MonkeyPatch) -> None:
    rank0.setenv(faults.ENV, "oom@3")
    faults.maybe_out_of_memory(2)
    with pytest.raises(torch.OutOfMemoryError, match="^CUDA out of memory"):
        faults.maybe_out_of_memory(3)


def test_maybe_poison_keeps_the_graph_and_poisons_only_the_named_fault(rank0: pytest.MonkeyPatch) -> None:
    """nan-reward@2 poisons the value handed under that name (not under nan-loss); the poisoned value still
    back-propagates to what it was computed from (its first element NaN, the others' gradient 1)."""
    rank0.setenv(faults.ENV, "nan-reward@2")
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    value = w * 1.0
    assert faults.maybe_poison("nan-loss", 2, value) is value
    poisoned = faults.maybe_poison("nan-reward", 2, value)
    assert torch.isnan(poisoned[0]) and poisoned[1:].tolist() == [2.0, 3.0]
    poisoned[1:].sum().backward()
    assert w.grad is not None and w.grad.tolist() == [0.0, 1.0, 1.0]


# =========================================================================================== bench_trl
# run_trl against a stand-in for TRL 0.23.1 (its PPOConfig, PPOTrainer and ppo_trainer.batch_generation): what
# run_trl hands TRL and how it reads TRL's timings, with scripted clock readings; no TRL, models or GPU needed.
# (The real TRL run is tests/test_bench.py::test_bench_trl_runs_trls_ppo_trainer_on_the_same_workload_and_compares.)
class _FakeTrl:
    """trl, trl.trainer and trl.trainer.ppo_trainer as run_trl uses them. Each training step generates (advancing
    the clock by gen[i]) then updates (by upd[i]); the number of steps is TRL's: ceil(total_episodes / (per-device
    batch x gradient accumulation x mini-batches))."""

    def __init__(self, gen: list[float], upd: list[float], width: int | None = None, steps: int | None = None,
                 accelerator: str | None = None) -> None:
        self.now, self.gen, self.upd, self.width = 0.0, gen, upd, width
        self.n_steps, self.accelerator = steps, accelerator  # (a TRL that ran other steps / ignored the env)
        self.config: dict[str, Any] = {}
        self.trainer: dict[str, Any] = {}
        self.trl = ModuleType("trl")
        self.trl.__version__ = "0.23.1"
        self.trainer_pkg, self.ppo_trainer = ModuleType("trl.trainer"), ModuleType("trl.trainer.ppo_trainer")
        self.trl.trainer, self.trainer_pkg.ppo_trainer = self.trainer_pkg, self.ppo_trainer
        fake = self

        def batch_generation(model: Any, queries: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, None]:
            width = fake.width if fake.width is not None else fake.config["response_length"]
            fake.now += fake.gen[len(fake.steps)]
            return torch.zeros(queries.shape[0], queries.shape[1] + width), None

        def ppo_config(**kwargs: Any) -> SimpleNamespace:
            fake.config = kwargs
            return SimpleNamespace(**kwargs)

        class PPOTrainer:
            def __init__(self, **kwargs: Any) -> None:
                fake.trainer = dict(kwargs, env=os.environ.get("ACCELERATE_MIXED_PRECISION"),
                                    generation=fake.ppo_trainer.batch_generation)
                self.accelerator = SimpleNamespace(
                    mixed_precision=fake.accelerator or os.environ.get("ACCELERATE_MIXED_PRECISION"))

            def train(self) -> None:
                a, callbacks = fake.trainer["args"], fake.trainer["callbacks"]
                batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.num_mini_batches
                for cb in callbacks:
                    cb.on_train_begin()
                steps = math.ceil(a.total_episodes / batch) if fake.n_steps is None else fake.n_steps
                for _ in range(steps):
                    fake.ppo_trainer.batch_generation(None, torch.zeros(batch, 12, dtype=torch.long), 8, 0, None)
                    fake.now += fake.upd[len(fake.steps)]
                    fake.steps.append(fake.now)
                    for cb in callbacks:
                        cb.on_step_end()

        self.steps: list[float] = []
        self.original_generation = batch_generation
        self.ppo_trainer.batch_generation = batch_generation
        self.trl.PPOConfig, self.trl.PPOTrainer = ppo_config, PPOTrainer


class _FakeModel:
    """What from_pretrained was called with (the stand-in for a loaded model)."""

    def __init__(self, path: str, kwargs: dict[str, Any]) -> None:
        self.path, self.kwargs = path, kwargs


def _fake_auto() -> type:
    """A stand-in for AutoModelFor*: from_pretrained records its arguments in a new _FakeModel."""

    class Auto:
        @staticmethod
        def from_pretrained(path: str, **kwargs: Any) -> _FakeModel:
            return _FakeModel(path, kwargs)
    return Auto


@pytest.fixture
def trl_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[_FakeTrl, Any, Any]]:
    """A function (gen, upd, prompts=8, micro=4, ds_precision="fp32", **fake) -> (fake TRL installed, bench
    config, PPO config): 3 prompt rows, warm-up 1 + 3 timed iterations, 12-token prompts, 16 new tokens each."""
    import transformers

    import stages.bench
    import stages.bench_trl as bench_trl
    import stages.models
    from stages.config import PPODataConfig

    tok = train_tokenizer(["hello world", "the lazy dog", "a b c"], vocab_size=300, min_frequency=1)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello world", "the lazy dog", "a b c")))
    monkeypatch.setattr(stages.models, "load_tokenizer", lambda path: tok)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", _fake_auto())
    monkeypatch.setattr(transformers, "AutoModelForSequenceClassification", _fake_auto())
    monkeypatch.setattr(stages.bench, "device_info", lambda device: {"device": "cpu"})
    monkeypatch.setattr(bench_trl, "peak_memory_gib", lambda device: {"perf/peak_host_rss_gib": 1.5})
    monkeypatch.setattr(bench_trl, "reset_peak_memory", lambda device: None)

    def make(gen: list[float], upd: list[float], prompts: int = 8, micro: int = 4, ds_precision: str = "fp32",
             **kwargs: Any) -> tuple[_FakeTrl, Any, Any]:
        fake = _FakeTrl(gen, upd, **kwargs)
        for name, module in (("trl", fake.trl), ("trl.trainer", fake.trainer_pkg),
                             ("trl.trainer.ppo_trainer", fake.ppo_trainer)):
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(bench_trl, "clock", lambda device: fake.now)
        spec = {"prompts": prompts, "prompt_length": 12, "new_tokens": 16}
        workload = SimpleNamespace(**spec, model_dump=lambda mode: dict(spec))
        cfg = SimpleNamespace(name="tiny", seed=3, output_dir=str(tmp_path / "out"), workload=workload, warmup=1,
                              iterations=3)
        ppo = SimpleNamespace(model=SimpleNamespace(dtype="auto"), deepspeed=SimpleNamespace(precision=ds_precision),
                              train=SimpleNamespace(micro_batch_size=micro), data=PPODataConfig(train=str(rows)))
        return fake, cfg, ppo
    return make


CPU = torch.device("cpu")
GEN, UPD = [9.0, 1.0, 2.0, 6.0], [1.0, 1.0, 2.0, 1.0]  # per iteration 10, 2, 4, 7 s; generation 9, 1, 2, 6 s


def test_run_trl_times_the_iterations_after_warmup_and_reports_their_medians(trl_setup: Callable[..., Any],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up 1 + 3 timed iterations of 8 prompts x 16 new tokens: per iteration 10, 2, 4, 7 s (generation 9, 1,
    2, 6 s) -> median of 2, 4, 7 = 4 s per iteration, of 1, 2, 6 = 2 s generation; the rates follow."""
    from stages.bench_trl import run_trl

    fake, cfg, ppo = trl_setup(GEN, UPD)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    r = run_trl(cfg, Path("/w"), ppo, CPU, "bf16-mixed")
    assert (r["benchmark"], r["workload"], r["trl"], r["precision"]) == ("trl-ppo", "tiny", "0.23.1", "bf16-mixed")
    assert r["workload_spec"] == {"prompts": 8, "prompt_length": 12, "new_tokens": 16} and r["device"] == "cpu"
    assert r["per_iteration_s"] == [10.0, 2.0, 4.0, 7.0] and r["generation_per_iteration_s"] == [9.0, 1.0, 2.0, 6.0]
    assert (r["iterations_timed"], r["warmup"], r["seconds_per_iteration"], r["generation_s"]) == (3, 1, 4.0, 2.0)
    assert (r["generation_share"], r["samples_per_s"], r["generated_tokens_per_s"]) == (0.5, 2.0, 32.0)
    assert (r["peak_memory_gib"], r["peak_memory_kind"]) == (1.5, "peak_host_rss_gib")
    assert (r["new_tokens"], r["micro_batch_size"], r["rollout_forward_batch_size"]) == (16, 4, 8)
    assert (r["weights_dtype"], r["mixed_precision"]) == ("float32", "bf16")
    # TRL was handed: micro-batches of 4, 2 accumulated = the one mini-batch of 8; 4 iterations of 8 episodes
    c = fake.config
    assert (c["per_device_train_batch_size"], c["gradient_accumulation_steps"], c["num_mini_batches"],
            c["num_ppo_epochs"], c["total_episodes"], c["local_rollout_forward_batch_size"]) == (4, 2, 1, 1, 32, 8)
    assert (c["response_length"], c["stop_token"], c["stop_token_id"], c["missing_eos_penalty"]) == (
        16, None, None, None)
    assert (c["seed"], c["bf16"], c["use_cpu"], c["output_dir"]) == (3, True, True, str(Path(cfg.output_dir) / "trl"))
    # the models: policy and reference from policy/, reward and value from rm/ (one label), four distinct copies
    t = fake.trainer
    models = [t["model"], t["ref_model"], t["reward_model"], t["value_model"]]
    assert len({id(m) for m in models}) == 4
    assert [(m.path, m.kwargs) for m in models] == [
        ("/w/policy", {"dtype": torch.float32}), ("/w/policy", {"dtype": torch.float32}),
        ("/w/rm", {"num_labels": 1, "dtype": torch.float32}), ("/w/rm", {"num_labels": 1, "dtype": torch.float32})]
    # one row more per iteration than the run takes, cycling through the 3 prompts
    ids = t["train_dataset"]["input_ids"]
    assert len(ids) == 8 * 5 and ids[3] == ids[0] and ids[4] == ids[1] and ids[0] != ids[1] != ids[2] != ids[0]
    # TRL's Accelerator saw bf16; afterwards the environment and TRL's batch_generation are as before
    assert t["env"] == "bf16" and "ACCELERATE_MIXED_PRECISION" not in os.environ
    assert t["generation"] is not fake.original_generation
    assert fake.ppo_trainer.batch_generation is fake.original_generation


@pytest.mark.parametrize("precision, ds, dtype, mixed", [("auto", "bf16", torch.bfloat16, "no"),
                                                         ("auto", "fp32", torch.float32, "no"),
                                                         ("bf16", "fp32", torch.bfloat16, "no"),
                                                         ("fp32", "bf16", torch.float32, "no")])
def test_run_trl_precisions_set_the_weights_dtype_and_autocast(trl_setup: Callable[..., Any],
                                                               monkeypatch: pytest.MonkeyPatch, precision: str,
                                                               ds: str, dtype: torch.dtype, mixed: str) -> None:
    """auto loads the workload's dtype (its deepspeed.precision's), bf16 / fp32 force the weights' dtype; none of
    them autocasts; an ACCELERATE_MIXED_PRECISION set before the run is put back after it."""
    from stages.bench_trl import run_trl

    fake, cfg, ppo = trl_setup(GEN, UPD, ds_precision=ds)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    r = run_trl(cfg, Path("/w"), ppo, CPU, precision)
    assert fake.trainer["model"].kwargs == {"dtype": dtype} and r["weights_dtype"] == str(dtype).split(".")[1]
    assert (fake.trainer["env"], r["mixed_precision"], fake.config["bf16"]) == (mixed, mixed, False)
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "fp16"


def test_run_trl_micro_batch_is_capped_at_the_prompts_and_must_divide_them(trl_setup: Callable[..., Any]) -> None:
    """micro_batch_size 16 for 8 prompts runs micro-batches of 8 (one, no accumulation); 3 does not divide 8."""
    from stages.bench_trl import run_trl

    fake, cfg, ppo = trl_setup(GEN, UPD, micro=16)
    assert run_trl(cfg, Path("/w"), ppo, CPU)["micro_batch_size"] == 8
    assert (fake.config["per_device_train_batch_size"], fake.config["gradient_accumulation_steps"]) == (8, 1)
    fake, cfg, ppo = trl_setup(GEN, UPD, micro=3)
    with pytest.raises(ValueError, match=r"^workload\.prompts \(8\) must be a multiple of the micro-batch size \(3\)$"):
        run_trl(cfg, Path("/w"), ppo, CPU)


def test_run_trl_refuses_rollouts_shorter_than_new_tokens(trl_setup: Callable[..., Any]) -> None:
    """Rows that stopped early (15 of the 16 new tokens) make no comparable timing: refused, saying so."""
    from stages.bench_trl import run_trl

    fake, cfg, ppo = trl_setup(GEN, UPD, width=15)
    with pytest.raises(ValueError, match=r"^TRL ran 4 iterations of \[15\] new tokens, expected 4 of 16$"):
        run_trl(cfg, Path("/w"), ppo, CPU)
    assert fake.ppo_trainer.batch_generation is fake.original_generation


def test_run_trl_refuses_a_run_of_another_number_of_iterations(trl_setup: Callable[..., Any]) -> None:
    """A TRL that made 3 optimizer steps where warm-up 1 + 3 timed were asked for: refused, not timed."""
    from stages.bench_trl import run_trl

    fake, cfg, ppo = trl_setup(GEN, UPD, steps=3)
    with pytest.raises(ValueError, match=r"^TRL ran 3 iterations of \[16\] new tokens, expected 4 of 16$"):
        run_trl(cfg, Path("/w"), ppo, CPU)


def test_run_trl_reports_the_mixed_precision_trls_accelerator_ran_with(trl_setup: Callable[..., Any]) -> None:
    """bf16-mixed asked for but TRL's Accelerator ran without autocast (the env not read): the result says "no",
    what ran, not what was asked."""
    from stages.bench_trl import run_trl

    fake, cfg, ppo = trl_setup(GEN, UPD, accelerator="no")
    r = run_trl(cfg, Path("/w"), ppo, CPU, "bf16-mixed")
    assert (r["precision"], r["mixed_precision"], fake.trainer["env"]) == ("bf16-mixed", "no", "bf16")


def test_run_trl_without_trl_says_which_version_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TRL installed: an error naming the pip command, not Python's own message; a TRL whose PPO trainer does
    not import (one written for another transformers: TRL imports its trainers lazily) says so, with the
    version the benchmark is written for."""
    from stages.bench_trl import run_trl

    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(RlhfError, match=r"^rlhf bench trl needs TRL: pip install trl==0\.23\.1$"):
        run_trl(SimpleNamespace(), Path("/w"), SimpleNamespace(), CPU)
    for name, module in (("trl", ModuleType("trl")), ("trl.trainer", ModuleType("trl.trainer")),
                         ("trl.trainer.ppo_trainer", None)):
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(RlhfError, match=r"^TRL does not import here \(ModuleNotFoundError: import of "
                                        r"trl\.trainer\.ppo_trainer halted; None in sys\.modules\); rlhf bench "
                                        r"trl is written for trl==0\.23\.1$"):
        run_trl(SimpleNamespace(), Path("/w"), SimpleNamespace(), CPU)


# ============================================================================================= prompts
PROMPT_TEXTS = ["hello world, how are you?", "the quick brown fox jumps over the lazy dog", "a b c d e f g h i j k"]


@pytest.fixture(scope="module")
def tok() -> Any:
    """A byte-level BPE tokenizer with DEFAULT_CHAT_TEMPLATE's role markers, trained in-process."""
    return train_tokenizer(PROMPT_TEXTS, vocab_size=300, min_frequency=1)


def _rows(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_auto_format_chosen_on_the_first_row_holds_for_the_rest(tmp_path: Path, tok: Any) -> None:
    """format auto reads row 1 as `prompt`; a `messages` row 2 is then a bad row whose error says where the
    choice was made (not silently read as another format)."""
    from stages.config import PPODataConfig
    from stages.data import BadRowLog
    from stages.errors import DataError
    from stages.ppo.prompts import load_prompts

    path = _rows(tmp_path / "p.jsonl", [{"prompt": "hello world"}, {"messages": [{"role": "user", "content": "a b"}]}])
    data = PPODataConfig(train=path)
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: missing key 'prompt' (keys present: messages) "
                                                  f"(data.format auto: read as 'prompt', the format of {path} row 1)")):
        load_prompts(data.train, data, tok, BadRowLog())


def test_a_messages_prompt_of_only_an_assistant_turn_is_a_bad_row(tmp_path: Path, tok: Any) -> None:
    """[assistant] leaves no turn once its final assistant turn is dropped: a bad row (skipped), not a crash."""
    from stages.config import PPODataConfig
    from stages.data import BadRowLog
    from stages.ppo.prompts import load_prompts

    path = _rows(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]},
                                        {"messages": [{"role": "user", "content": "a b"}]}])
    data = PPODataConfig(train=path, on_bad_row="skip")
    log = BadRowLog()
    prompts = load_prompts(data.train, data, tok, log)
    assert [tok.decode(p) for p in prompts.ids] == ["<|user|>\na b<|endoftext|><|assistant|>\n"]
    assert log.total == 1 and list(log.reasons) == ["a prompt must end with a user turn"]


def test_a_limit_reads_only_the_first_usable_prompts_and_counts_over_them(tmp_path: Path, tok: Any) -> None:
    """`limit` (rlhf eval --num-prompts): the first N usable prompts; a bad row among them is skipped and counted,
    the rows after them are not read (row 5's error and row 4's cut never show), and `cut` counts the N only."""
    from stages.config import PPODataConfig
    from stages.data import BadRowLog
    from stages.errors import DataError
    from stages.ppo.prompts import load_prompts

    long = " ".join(["a b"] * 40)
    path = _rows(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": ""}, {"prompt": long}, {"prompt": long},
                                        {"messages": "not a prompt row"}])
    data = PPODataConfig(train=path, on_bad_row="skip", max_prompt_length=8)
    log = BadRowLog()
    read = load_prompts(data.train, data, tok, log, limit=2)
    assert len(read.ids) == 2 and read.cut == 1 and len(read.ids[1]) == 8 and log.total == 1
    everything = load_prompts(data.train, data, tok, BadRowLog())
    assert len(everything.ids) == 3 and everything.cut == 2
    # a broken line right after the limit's last prompt is never read, under on_bad_row error too
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": "b c"}\nnot json\n', encoding="utf-8")
    strict = PPODataConfig(train=str(broken), on_bad_row="error")
    log = BadRowLog()
    assert len(load_prompts(strict.train, strict, tok, log, limit=2).ids) == 2 and log.total == 0
    with pytest.raises(DataError, match="row 3: invalid JSON"):
        load_prompts(strict.train, strict, tok, BadRowLog(), limit=3)


def test_the_run_records_which_share_it_held_out(tmp_path: Path, tok: Any) -> None:
    """rlhf ppo's data_report.json records a digest of its validation share: where data.train's usable prompts
    came from (the file's index in data.train, row number: the rows split_holdout splits by position),
    data.eval_fraction and the seed. rlhf eval reading the same rows gets the same digest, also when prompts are
    cut otherwise (data.max_prompt_length keeps the rows), and another one when a setting changes which rows are
    usable (on_bad_row: skip over a row it refused), the share or the seed, or which file a row is in."""
    import json

    from stages.config import PPOConfig
    from stages.data import BadRowLog
    from stages.distributed import ONE_PROCESS
    from stages.eval_settings import run_share
    from stages.ppo.prompts import held_out_sha256, load_prompts
    from stages.ppo.trainer import load_ppo_data

    path = _rows(tmp_path / "p.jsonl", [{"prompt": f"a b {i}", "q": f"b {i}" if i % 3 else ""} for i in range(9)])
    cfg = PPOConfig.model_validate({"output_dir": str(tmp_path / "run"), "model": {"name_or_path": "stub/policy"},
                                    "reward_model": {"name_or_path": "stub/rm"},
                                    "data": {"train": path, "eval_fraction": 0.3}, "seed": 7})
    (tmp_path / "run").mkdir()
    load_ppo_data(cfg, tmp_path / "run", ONE_PROCESS, tok)
    recorded = run_share(str(tmp_path / "run"))
    assert recorded == (held_out_sha256([(0, i) for i in range(1, 10)], 0.3, 7),
                        str(tmp_path / "run" / "data_report.json"))

    def digest(**data: Any) -> str:
        rows: list[tuple[int, int]] = []
        again = cfg.data.model_copy(update=data)
        load_prompts(again.train, again, tok, BadRowLog(), rows=rows)
        return held_out_sha256(rows, 0.3, 7)

    assert digest() == digest(max_prompt_length=2) == recorded[0]
    other = cfg.data.columns.model_copy(update={"prompt": "q"})
    assert digest(columns=other, on_bad_row="skip") == held_out_sha256(
        [(0, i + 1) for i in range(9) if i % 3], 0.3, 7)
    rows = [(0, i) for i in range(1, 10)]
    assert len({held_out_sha256(rows, 0.3, 7), held_out_sha256(rows, 0.5, 7), held_out_sha256(rows, 0.3, 8)}) == 3
    # two files of one name: the rows are told apart by the file's place in data.train
    twin = tmp_path / "b"
    twin.mkdir()
    second = _rows(twin / "p.jsonl", [{"prompt": "c d"}])
    from stages.config import DataSource

    for files, want in (([path, second], [(0, i) for i in range(1, 10)] + [(1, 1)]), ([second, path], [(0, 1)] + [
            (1, i) for i in range(1, 10)])):
        rows = []
        load_prompts(DataSource(path=files), cfg.data, tok, BadRowLog(), rows=rows)
        assert rows == want
    rows = []  # (a path written another way, ./p.jsonl, is the same file of data.train)
    load_prompts(DataSource(path=f"{tmp_path}/./p.jsonl"), cfg.data, tok, BadRowLog(), rows=rows)
    assert rows == [(0, i) for i in range(1, 10)]
    assert run_share(str(tmp_path)) is None  # (no run there)
    for record in ({"held_out_of_train": 2}, {"held_out_sha256": None}):  # (a run from before the record)
        (tmp_path / "data_report.json").write_text(json.dumps({"eval": record}))
        assert run_share(str(tmp_path)) is None


def test_an_unknown_prompt_format_names_the_configured_columns_or_is_refused() -> None:
    """A row with none of the configured columns names them (custom names, HH's text column last); a format
    outside prompt/messages/hh is a ValueError naming it."""
    from stages.config import PPODataConfig
    from stages.data import BadRow
    from stages.ppo.prompts import detect_prompt_format, parse_prompt

    data = PPODataConfig(train="x.jsonl", columns={"prompt": "q", "messages": "conv", "text": "dialog"})
    with pytest.raises(BadRow, match=re.escape("keys ['a', 'b']; expected 'conv', 'q' or 'dialog' (HH-RLHF text)")):
        detect_prompt_format({"b": 1, "a": 2}, data)
    assert detect_prompt_format({"dialog": "x"}, data) == "hh"
    with pytest.raises(ValueError, match="^pairs$"):
        parse_prompt({"q": "hi"}, "pairs", data)

