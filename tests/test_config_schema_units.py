"""Unit pins of stages/config.py's schema (mutation audit): bounds, defaults the docs state, cross-field checks,
derived properties and the path helpers, checked on the pydantic sections directly (no files, no models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stages.config import (
    BenchConfig,
    DataSource,
    DeepSpeedConfig,
    GenerationConfig,
    ModelConfig,
    MonitorConfig,
    PipelineConfig,
    PPOAlgoConfig,
    PPOConfig,
    PPODataConfig,
    PPODeepSpeedConfig,
    PPORun,
    PPOTrainConfig,
    SFTConfig,
    SFTDataConfig,
    TokenizerTrainConfig,
    TrainConfig,
    check_architecture,
    could_be_hub_id,
    is_default_at,
    resolve_one,
)
from stages.errors import ConfigError


def _ppo(**sections: Any) -> PPOConfig:
    """A minimal PPOConfig (hub ids: nothing is resolved or loaded) with `sections` on top."""
    base: dict[str, Any] = {"output_dir": "out", "model": {"name_or_path": "gpt2"},
                            "reward_model": {"name_or_path": "gpt2"}, "data": {"train": "p.jsonl"}}
    return PPOConfig(**(base | sections))


def _sft(**sections: Any) -> SFTConfig:
    """A minimal SFTConfig on a hub model with `sections` on top."""
    base: dict[str, Any] = {"output_dir": "out", "model": {"name_or_path": "gpt2"}, "data": {"train": "d.jsonl"}}
    return SFTConfig(**(base | sections))


def _pipeline(**keys: Any) -> PipelineConfig:
    """A minimal PipelineConfig (stage config paths are not resolved here) with `keys` on top."""
    base: dict[str, Any] = {"output_dir": "out", "sft": {"config": "sft.yaml"}, "rm": {"config": "rm.yaml"},
                            "ppo": {"config": "ppo.yaml"}}
    return PipelineConfig(**(base | keys))


# ----------------------------------------------------------------------------------------- bounds
def test_tokenizer_train_vocab_size_starts_at_300() -> None:
    """model.tokenizer_train.vocab_size: 300 is the smallest accepted (256 bytes + specials + merges)."""
    assert TokenizerTrainConfig(vocab_size=300).vocab_size == 300
    with pytest.raises(ValidationError, match="greater than or equal to 300"):
        TokenizerTrainConfig(vocab_size=299)


def test_eval_fraction_is_below_one_and_max_length_at_least_two() -> None:
    """data.eval_fraction 1.0 (nothing left to train on) and data.max_length 1 are refused; 0 and 2 are not."""
    assert SFTDataConfig(train="d.jsonl", eval_fraction=0.0, max_length=2).eval_fraction == 0.0
    with pytest.raises(ValidationError, match="eval_fraction"):
        SFTDataConfig(train="d.jsonl", eval_fraction=1.0)
    with pytest.raises(ValidationError, match="max_length"):
        SFTDataConfig(train="d.jsonl", max_length=1)


def test_train_bounds_epochs_betas_warmup_and_checkpoints_kept() -> None:
    """train.epochs 0, a beta of 1, warmup_ratio over 1 and save_total_limit 0 are refused."""
    for bad in ({"epochs": 0}, {"adam_betas": (1.0, 0.95)}, {"adam_betas": (0.9, 1.0)}, {"warmup_ratio": 1.5},
                {"save_total_limit": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            TrainConfig(**bad)
    assert TrainConfig(warmup_ratio=1.0, adam_betas=(0.0, 0.0), epochs=0.5).warmup_ratio == 1.0


def test_ppo_bounds_policy_clip_gamma_and_lam() -> None:
    """ppo.policy_clip is in (0, 1): 1 is refused; gamma and lam are in [0, 1]: 1 is fine, 1.5 is not."""
    assert PPOAlgoConfig(gamma=1.0, lam=1.0, policy_clip=0.99).policy_clip == 0.99
    for bad in ({"policy_clip": 1.0}, {"gamma": 1.5}, {"lam": 1.5}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            PPOAlgoConfig(**bad)


def test_monitor_shares_are_fractions() -> None:
    """monitor.max_cap_share and max_repetition over 1 are refused; max_length_ratio over 1 is not."""
    assert MonitorConfig(max_cap_share=1.0, max_repetition=1.0, max_length_ratio=3.0).max_cap_share == 1.0
    for key in ("max_cap_share", "max_repetition"):
        with pytest.raises(ValidationError, match=key):
            MonitorConfig(**{key: 1.01})


def test_bench_peaks_are_positive_and_warmup_may_be_zero() -> None:
    """bench peak_tflops / peak_bandwidth_tbs of 0 are refused; warmup 0 (no untimed iteration) is allowed."""
    cfg = BenchConfig.model_construct()  # no workload: its architecture would need transformers
    cfg.warmup = 0
    assert cfg.warmup == 0
    for key in ("peak_tflops", "peak_bandwidth_tbs", "warmup"):
        with pytest.raises(ValidationError, match=key):
            setattr(cfg, key, 0 if key != "warmup" else -1)
    cfg.peak_tflops = 989.5
    assert cfg.peak_tflops == 989.5


# ----------------------------------------------------------------------------------------- defaults in the docs
def test_defaults_are_the_ones_readme_and_ppo_max_state() -> None:
    """The schema defaults README's tables state (train, generation as the paper samples, PPO batches and lrs,
    monitor thresholds as PPO-MAX.md's examples)."""
    t = TrainConfig()
    assert (t.epochs, t.micro_batch_size, t.lr, t.adam_betas, t.adam_eps, t.lr_scheduler, t.warmup_ratio,
            t.min_lr_ratio, t.gradient_clipping, t.save_total_limit, t.on_nonfinite) == (
        1.0, 4, 1e-5, (0.9, 0.95), 1e-8, "cosine", 0.03, 0.0, 1.0, 2, "stop")
    g = GenerationConfig()
    assert (g.max_new_tokens, g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.on_truncation,
            g.truncation_penalty, g.min_new_tokens, g.cache) == (128, 0.8, 0.9, 0, 1.1, "eos", 1.0, 0, "static")
    p = PPOTrainConfig()
    assert (p.iterations, p.rollout_batch_size, p.mini_batch_size, p.micro_batch_size, p.logprob_chunk,
            p.policy_lr, p.critic_lr, p.lr_scheduler, p.warmup_ratio, p.sample_every, p.samples_shown) == (
        100, 8, 8, 4, 4096, 5e-7, 1.5e-6, "constant", 0.0, 10, 4)
    m = MonitorConfig()
    assert (m.action, m.max_cap_share, m.max_length_ratio, m.max_kl, m.max_repetition, m.ngram, m.kl_estimator) == (
        "warn", 0.5, 2.0, 0.1, 0.5, 3, "k1")
    d = PPODataConfig(train="p.jsonl")
    assert (d.max_prompt_length, d.ptx_max_length, d.eval_fraction, d.rendering_check) == (256, 512, 0.05, "error")
    s = SFTDataConfig(train="d.jsonl")
    assert (s.max_length, s.eval_fraction, s.add_eos, s.train_on, s.on_bad_row) == (512, 0.05, True, "all_turns",
                                                                                     "error")
    assert TokenizerTrainConfig().vocab_size == 512 and DeepSpeedConfig().precision == "bf16"


def test_ppo_algo_schema_defaults_are_the_vanilla_preset() -> None:
    """Every PPOAlgoConfig default equals the vanilla preset (PPO-MAX.md's vanilla column), so a config built
    without a preset (tests, tools) runs vanilla PPO too."""
    from stages.ppo.presets import PRESETS

    algo = PPOAlgoConfig()
    for key, value in PRESETS["vanilla"].items():
        section, name = key.split(".")
        assert section == "ppo" and getattr(algo, name) == value, key
    assert (algo.kl_coef, algo.lam, algo.gamma, algo.policy_clip, algo.value_clip, algo.grad_clip) == (
        0.0, 0.95, 1.0, 0.2, 0.0, 1.0)


# ----------------------------------------------------------------------------------------- cross-field checks
def test_tokenizer_train_is_refused_beside_a_tokenizer_or_a_loaded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """model.tokenizer_train counts only for from_config without model.tokenizer: refused with a tokenizer given
    or with name_or_path; accepted for a bare from_config (architecture check stubbed: no transformers)."""
    monkeypatch.setattr("stages.config.check_architecture", lambda arch: None)
    arch = {"model_type": "llama"}
    assert ModelConfig(from_config=arch, tokenizer_train={"vocab_size": 600}).tokenizer_train.vocab_size == 600
    for source in ({"from_config": arch, "tokenizer": "gpt2"}, {"name_or_path": "gpt2"}):
        with pytest.raises(ValidationError, match="tokenizer_train: a tokenizer is trained only for a from_config"):
            ModelConfig(**source, tokenizer_train={"vocab_size": 600})


@pytest.mark.parametrize("key", ["vocab_size", "pad_token_id", "eos_token_id", "bos_token_id"])
def test_every_from_config_key_the_tokenizer_sets_is_refused(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """from_config.vocab_size and the pad/eos/bos ids (the tokenizer's when the model is built) are refused."""
    monkeypatch.setattr("stages.config.check_architecture", lambda arch: None)
    with pytest.raises(ValidationError, match=rf"from_config\.{key}: set from the tokenizer"):
        ModelConfig(from_config={"model_type": "llama", key: 1})


def test_max_prompt_length_must_be_below_max_length_and_its_default_is_half() -> None:
    """max_prompt_length == max_length is refused (nothing left for a response); prompt_budget defaults to
    max_length // 2 (101 -> 50) and is the given value when set."""
    with pytest.raises(ValidationError, match=r"max_prompt_length \(64\) must be smaller than max_length \(64\)"):
        SFTDataConfig(train="d.jsonl", max_length=64, max_prompt_length=64)
    assert SFTDataConfig(train="d.jsonl", max_length=101).prompt_budget == 50
    assert SFTDataConfig(train="d.jsonl", max_length=64, max_prompt_length=63).prompt_budget == 63


def test_split_or_subset_of_a_local_file_is_refused_whatever_the_suffix_case() -> None:
    """subset on a local file, and split on DATA.JSONL (an upper-case suffix), are refused; on a hub id both are
    fine."""
    with pytest.raises(ValidationError, match="d.jsonl is a local file"):
        DataSource(path="d.jsonl", subset="en")
    with pytest.raises(ValidationError, match="DATA.JSONL is a local file"):
        DataSource(path="DATA.JSONL", split="test")
    assert DataSource(path="org/set", split="test", subset="en").subset == "en"


def test_offload_optimizer_needs_a_zero_stage() -> None:
    """deepspeed.offload_optimizer with zero_stage 0 is refused; with 1 it is fine."""
    with pytest.raises(ValidationError, match=r"offload_optimizer needs zero_stage 1, 2 or 3 \(got 0\)"):
        DeepSpeedConfig(offload_optimizer=True)
    assert DeepSpeedConfig(offload_optimizer=True, zero_stage=1).offload_optimizer


def test_skip_is_refused_only_with_zero3_in_sft_and_ppo() -> None:
    """train.on_nonfinite: skip with ZeRO-3 is refused (SFT/RM and PPO alike); ZeRO-2 is fine."""
    assert _sft(train={"on_nonfinite": "skip"}, deepspeed={"zero_stage": 2}).deepspeed.zero_stage == 2
    assert _ppo(train={"on_nonfinite": "skip"}, deepspeed={"zero_stage": 2}).deepspeed.zero_stage == 2
    with pytest.raises(ValidationError, match="ZeRO-3's partitioned parameters"):
        _sft(train={"on_nonfinite": "skip"}, deepspeed={"zero_stage": 3})
    with pytest.raises(ValidationError, match="ZeRO-3's partitioned parameters"):
        _ppo(train={"on_nonfinite": "skip"}, deepspeed={"zero_stage": 3})


def test_rendering_check_off_as_yaml_reads_it() -> None:
    """data.rendering_check: off (YAML's false) means "off", not another choice."""
    assert PPODataConfig(train="p.jsonl", rendering_check=False).rendering_check == "off"


def test_min_new_tokens_may_equal_max_new_tokens_and_compile_sampling_needs_compile() -> None:
    """min_new_tokens == max_new_tokens (fixed-length responses, as the benchmarks run) is allowed, one more is
    not; compile_sampling without compile is refused."""
    assert GenerationConfig(min_new_tokens=16, max_new_tokens=16).min_new_tokens == 16
    with pytest.raises(ValidationError, match=r"min_new_tokens \(17\) exceeds max_new_tokens \(16\)"):
        GenerationConfig(min_new_tokens=17, max_new_tokens=16)
    with pytest.raises(ValidationError, match="compile_sampling needs compile: true"):
        GenerationConfig(compile_sampling=True)
    with pytest.raises(ValidationError, match="compile needs cache: static"):
        GenerationConfig(compile=True, cache="dynamic")


def test_reward_scaling_and_norm_are_alternatives() -> None:
    """ppo.reward_scaling and ppo.reward_norm together are refused; either alone is fine."""
    assert PPOAlgoConfig(reward_scaling=True).reward_scaling and PPOAlgoConfig(reward_norm=True).reward_norm
    with pytest.raises(ValidationError, match="reward_scaling and reward_norm are alternatives"):
        PPOAlgoConfig(reward_scaling=True, reward_norm=True)


def test_ppo_batches_divide_and_the_message_names_both_sizes() -> None:
    """rollout_batch_size must be a multiple of mini_batch_size, and mini of micro; each message gives both."""
    with pytest.raises(ValidationError, match=r"rollout_batch_size \(12\) must be a multiple of mini_batch_size \(8\)"):
        PPOTrainConfig(rollout_batch_size=12, mini_batch_size=8, micro_batch_size=4)
    with pytest.raises(ValidationError, match=r"mini_batch_size \(8\) must be a multiple of micro_batch_size \(3\)"):
        PPOTrainConfig(rollout_batch_size=8, mini_batch_size=8, micro_batch_size=3)
    assert PPOTrainConfig(rollout_batch_size=16, mini_batch_size=8, micro_batch_size=2).rollout_batch_size == 16


def test_frozen_stage_follows_zero_stage_unless_given() -> None:
    """deepspeed.frozen_stage: 3 when zero_stage is 3, else 0; an explicit frozen_zero_stage wins."""
    assert [PPODeepSpeedConfig(zero_stage=s).frozen_stage for s in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert PPODeepSpeedConfig(zero_stage=3, frozen_zero_stage=0).frozen_stage == 0
    assert PPODeepSpeedConfig(zero_stage=0, frozen_zero_stage=3).frozen_stage == 3


def test_frozen_offload_needs_a_frozen_zero3_default_or_given() -> None:
    """frozen_offload_param is fine with zero_stage 3 (frozen stage 3 by default) and refused with frozen 0."""
    assert PPODeepSpeedConfig(zero_stage=3, frozen_offload_param=True).frozen_offload_param
    assert PPODeepSpeedConfig(frozen_zero_stage=3, frozen_offload_param=True).frozen_offload_param
    with pytest.raises(ValidationError, match="frozen_offload_param needs frozen_zero_stage: 3"):
        PPODeepSpeedConfig(zero_stage=3, frozen_zero_stage=0, frozen_offload_param=True)


def test_any_ptx_coef_needs_ptx_data() -> None:
    """ppo.ptx_coef > 0 (however small) without data.ptx is refused; with it, or at 0, it is fine."""
    with pytest.raises(ValidationError, match=r"ppo.ptx_coef > 0 needs data.ptx"):
        _ppo(ppo={"ptx_coef": 0.1})
    assert _ppo(ppo={"ptx_coef": 0.1}, data={"train": "p.jsonl", "ptx": "s.jsonl"}).ppo.ptx_coef == 0.1


# ----------------------------------------------------------------------------------------- pipeline
def test_a_run_name_is_one_folder_name() -> None:
    """ppo_runs[].name with a '/' (a folder below another) or a space is refused."""
    for bad in ("a/b", "a b"):
        with pytest.raises(ValidationError, match="name"):
            PPORun(name=bad)
    assert PPORun(name="max_0.2-x").name == "max_0.2-x"


def test_run_folders_are_unique_and_not_a_stage_or_the_report() -> None:
    """A run named report (the report's folder), and a run `a` with seed 1 beside a run `a-seed1`, are refused;
    `a` with seeds 1 and 2 beside `a1` is fine."""
    with pytest.raises(ValidationError, match="sft/rm/report/summary.json/summary.md/./..: report"):
        _pipeline(ppo_runs=[{"name": "report"}])
    with pytest.raises(ValidationError, match=r"\.\.: a-seed1 \["):
        _pipeline(ppo_runs=[{"name": "a", "seeds": [1]}, {"name": "a-seed1"}])
    assert len(_pipeline(ppo_runs=[{"name": "a", "seeds": [1, 2]}, {"name": "a1"}]).ppo_runs) == 2


def test_a_stage_set_may_not_change_what_the_pipeline_wires() -> None:
    """rm.set model.name_or_path, and ppo.set reward_model={...} (a mapping above a wired key), are refused."""
    with pytest.raises(ValidationError, match=r"rm.set: model.name_or_path sets model.name_or_path"):
        _pipeline(rm={"config": "rm.yaml", "set": ["model.name_or_path=x"]})
    with pytest.raises(ValidationError, match=r"ppo.set: reward_model sets reward_model.name_or_path"):
        _pipeline(ppo={"config": "ppo.yaml", "set": ["reward_model={name_or_path: x}"]})
    assert _pipeline(ppo={"config": "ppo.yaml", "set": ["reward_model.dtype=float32"]}).ppo.set


def test_a_runs_set_seed_is_refused_only_beside_its_own_seeds() -> None:
    """`set: [seed=3]` in a run without seeds (an empty list) is that run's seed, not a contradiction."""
    assert _pipeline(ppo_runs=[{"name": "a", "seeds": [], "set": ["seed=3"]}]).ppo_runs[0].set == ["seed=3"]
    with pytest.raises(ValidationError, match=r"ppo_runs\[0\].set: seed is set by the run's seeds"):
        _pipeline(ppo_runs=[{"name": "a", "seeds": [1], "set": ["seed=3"]}])


# ----------------------------------------------------------------------------------------- paths and defaults
def test_a_file_suffix_is_no_hub_id() -> None:
    """could_be_hub_id: `data.jsonl`, `org/model.safetensors` are local files; `gpt2`, `org/model` hub ids."""
    assert [could_be_hub_id(v) for v in ("data.jsonl", "org/model.safetensors", "gpt2", "org/model")] == [
        False, False, True, True]


def test_resolve_one_refuses_a_blank_or_missing_input(tmp_path: Path) -> None:
    """resolve_one: a blank value is an empty path (not the folder itself); a missing input names its key."""
    with pytest.raises(ConfigError, match=r"^output_dir: empty path$"):
        resolve_one("  ", "output", tmp_path, "output_dir")
    with pytest.raises(ConfigError, match=r"^deepspeed.config: file does not exist: .*nope.json$"):
        resolve_one("nope.json", "input", tmp_path, "deepspeed.config")
    assert resolve_one("new", "output", tmp_path, "output_dir") == str(tmp_path.resolve() / "new")


def test_a_set_key_marks_only_its_own_path_and_those_below_it(tmp_path: Path) -> None:
    """resolve_paths: `--set out=...` resolves `out` against the current folder; `out_old`, a longer key it
    prefixes without a dot, stays the file's (resolved against its folder, its error unmarked)."""
    from stages.config import InputPath, OutputPath, Section, resolve_paths

    class TwoPaths(Section):
        out: OutputPath
        out_old: InputPath

    base, cwd = tmp_path / "cfg", tmp_path / "cwd"
    cfg = TwoPaths(out="o", out_old="missing.json")
    with pytest.raises(ConfigError, match=r"^out_old: file does not exist: .*cfg/missing\.json$"):
        resolve_paths(cfg, base, {"out"}, cwd)
    (base / "here.json").parent.mkdir()
    (base / "here.json").write_text("{}")
    cfg = TwoPaths(out="o", out_old="here.json")
    resolve_paths(cfg, base, {"out"}, cwd)
    assert (cfg.out, cfg.out_old) == (str(cwd.resolve() / "o"), str(base.resolve() / "here.json"))


def test_is_default_at_compares_a_section_default_as_a_mapping() -> None:
    """is_default_at: a whole section at its default (as a resolved config's mapping) is the default; a leaf
    too; another value is not."""
    assert is_default_at(SFTConfig, "model.tokenizer_train", {"vocab_size": 512, "min_frequency": 2})
    assert is_default_at(SFTConfig, "train.gradient_clipping", 1.0)
    assert not is_default_at(SFTConfig, "model.tokenizer_train", {"vocab_size": 600, "min_frequency": 2})
    assert not is_default_at(SFTConfig, "output_dir", "out")  # required: no default


# ----------------------------------------------------------------------------------------- architecture check
class _TinyConfig:
    """A stand-in transformers config class (no RoPE): knows hidden_size (alias n_embd), refuses an odd one with
    a two-line error as transformers' validators do."""

    attribute_map = {"n_embd": "hidden_size"}

    def __init__(self, hidden_size: int = 8, **kwargs: Any) -> None:
        if hidden_size % 2:
            raise ValueError("Validation error for field 'hidden_size':\n  \nValueError: odd hidden_size")
        self.hidden_size = hidden_size

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "tiny", "hidden_size": self.hidden_size}


class _TinyRopeConfig(_TinyConfig):
    """The stand-in with RoPE, as transformers 5 writes it: one rope_parameters mapping."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "model_type": "tinyrope", "rope_parameters": {"rope_theta": 1e4}}


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' config registry replaced by {"tiny": _TinyConfig, "tinyrope": _TinyRopeConfig} (no
    transformers import)."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "transformers.models.auto.configuration_auto",
                        types.SimpleNamespace(CONFIG_MAPPING={"tiny": _TinyConfig, "tinyrope": _TinyRopeConfig}))


def test_check_architecture_takes_the_legacy_rope_spellings(tiny_registry: None) -> None:
    """rope_theta / rope_scaling (legacy spellings transformers converts; hub Llama/Qwen configs write them) pass
    the key check of a RoPE model; a misspelt key is refused naming the closest valid one."""
    check_architecture({"model_type": "tinyrope", "rope_theta": 1e6, "rope_scaling": None, "n_embd": 8})
    with pytest.raises(ValueError, match=r"^from_config\.hiden_size: not a tiny config key; closest valid key: "
                                         r"from_config\.hidden_size$"):
        check_architecture({"model_type": "tiny", "hiden_size": 8})


def test_check_architecture_error_says_the_cause_alone(tiny_registry: None) -> None:
    """The config class's own refusal is quoted without huggingface_hub's wrapping ("Validation error for field
    'x':" and the exception class's name): the reason alone."""
    with pytest.raises(ValueError, match=r"^from_config: tiny rejects it: odd hidden_size$"):
        check_architecture({"model_type": "tiny", "hidden_size": 7})


# ----------------------------------------------------------------------------------------- bugs it found (fixed)
def test_a_run_may_not_be_named_like_the_pipelines_summary_files() -> None:
    """A run folder named like a file the pipeline writes at its top level (summary.json, summary.md) is refused."""
    for name in ("summary.json", "summary.md"):
        with pytest.raises(ValidationError, match="ppo_runs"):
            _pipeline(ppo_runs=[{"name": name}])


def test_is_default_at_takes_a_yaml_list_for_a_tuple_default() -> None:
    """train.adam_betas [0.9, 0.95] as a resolved config holds it is the default (0.9, 0.95)."""
    assert is_default_at(SFTConfig, "train.adam_betas", [0.9, 0.95])


def test_rope_theta_is_refused_for_a_model_without_rope(tiny_registry: None) -> None:
    """from_config.rope_theta / rope_scaling for a config class that has no RoPE (gpt2, opt) are refused as
    unknown keys (they were accepted for every model type and then ignored)."""
    for key in ("rope_theta", "rope_scaling"):
        with pytest.raises(ValueError, match=rf"from_config\.{key}: not a tiny config key"):
            check_architecture({"model_type": "tiny", key: 1e4})


def test_derived_values_name_each_null_key_the_run_derives_with_its_value(tmp_path: Path) -> None:
    """Printed under the resolved config (whose nulls do not say what the run uses): SFT/RM's max_prompt_length
    (max_length // 2) and eval micro-batch, PPO's scoring micro-batch; a key set is not listed."""
    from conftest import REPO
    from rlhf_cli.config_loader import derived_values, load_config

    tiny = REPO / "configs" / "tiny"
    sft = load_config("sft", tiny / "sft.yaml", ["data.max_length=100", "train.micro_batch_size=3"])
    assert derived_values(sft) == ["data.max_prompt_length 50 (max_length // 2)",
                                   "train.eval_micro_batch_size 3 (micro_batch_size)"]
    rm = load_config("train-rm", tiny / "rm.yaml", [f"model.name_or_path={tmp_path}", "data.max_prompt_length=7",
                                                    "train.eval_micro_batch_size=2"])
    assert derived_values(rm) == []
    ppo = load_config("ppo", tiny / "ppo.yaml", [f"model.name_or_path={tmp_path}",
                                                 f"reward_model.name_or_path={tmp_path}", "train.micro_batch_size=2"])
    assert derived_values(ppo) == ["train.forward_batch_size 2 (micro_batch_size)"]
    ppo = load_config("ppo", tiny / "ppo.yaml", [f"model.name_or_path={tmp_path}",
                                                 f"reward_model.name_or_path={tmp_path}", "train.forward_batch_size=4"])
    assert derived_values(ppo) == []
