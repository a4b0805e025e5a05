"""`rlhf eval`'s options resolved over a PPO config into the settings stages.evaluate runs with."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from rlhf_cli.config_loader import apply_override, format_validation_error, load_config, parse_override
from stages.config import PRECISION_DTYPES, GenerationConfig, PPODataConfig
from stages.errors import CheckpointError, ConfigError
from stages.eval_settings import EvalSettings, held_out_of, run_share
from stages.model_paths import resolve_model_dir


def eval_settings(policy: Path, config: Path | None = None, reward_model: str | None = None,
                  prompts: Path | None = None, baseline: str | None = None, reference: str | None = None,
                  gold: str | None = None, num_prompts: int | None = None, max_new_tokens: int | None = None,
                  temperature: float | None = None, seed: int | None = None, batch_size: int = 32,
                  overrides: list[str] = [], precision: str | None = None,  # noqa: B006 - read only
                  greedy: bool = False) -> EvalSettings:
    """The options over the values of a PPO config (when `config` is given; a run's resolved_config.yaml works
    too): its reward_model, data (data.eval, else the share of data.train `rlhf ppo` held out for validation,
    `held_out`, or with data.eval_fraction 0 data.train itself), generation, gold judge, seed, precision and
    monitor n-gram (`precision`: fp32 / bf16 / fp16, the models' dtype; else the config's deepspeed.precision,
    else fp32; `greedy`: generation.top_k 1). An option given explicitly wins; `overrides` (--set
    data.*/generation.* key=value) win over both (the prompt file itself is --prompts)."""
    data_fields: dict[str, object] = {}
    gen_fields: dict[str, object] = {}
    cfg_seed, dtype, ngram = 0, "float32", 3
    split_seed: int | None = None  # (the config's seed, when its data.train's validation share is evaluated)
    split_share = None  # (what the run recorded of the share it held out)
    if config is not None:
        # eval never loads the config's policy; its reward model and prompts only when not given here
        unused = {"model.name_or_path"} | ({"reward_model.name_or_path"} if reward_model else set()) | (
            {"data.train", "data.eval"} if prompts is not None else set())
        cfg = load_config("ppo", config, [], not_yet=unused)
        reward_model = reward_model or cfg.reward_model.name_or_path
        data_fields = cfg.data.model_dump(exclude={"train", "eval", "ptx"})
        data_fields["train"] = cfg.data.eval or cfg.data.train
        if prompts is None and cfg.data.eval is None:  # (the share rlhf ppo validated on, not trained on)
            split_seed, split_share = cfg.seed, run_share(str(cfg.output_dir))
        gen_fields = cfg.generation.model_dump()
        cfg_seed, dtype, ngram = cfg.seed, PRECISION_DTYPES[cfg.deepspeed.precision], cfg.monitor.ngram
    if prompts is not None:
        data_fields["train"] = str(prompts.resolve())
    if gold is not None:
        data_fields["gold_reward"] = gold
    if "train" not in data_fields:
        raise ConfigError("rlhf eval needs --prompts (or --config with data)")
    if reward_model is None:
        raise ConfigError("rlhf eval needs --reward-model (or --config with reward_model)")
    for flag, model in (("POLICY", str(policy)), ("--reward-model", reward_model), ("--baseline", baseline),
                        ("--reference", reference)):
        try:  # a model that is not there is a usage error (exit 2), like any missing input
            if model is not None:
                resolve_model_dir(model)
        except CheckpointError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    dtype = PRECISION_DTYPES[precision] if precision is not None else dtype
    gen_fields |= {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature),
                                     ("top_k", 1 if greedy else None)) if v is not None}
    sections = {"data": data_fields, "generation": gen_fields}
    # what the command line gave, for the "[given with ...]" of a refused value
    flags = {key: flag for key, flag, value in (
        ("data.train", "--prompts", prompts), ("data.gold_reward", "--gold", gold),
        ("generation.max_new_tokens", "--max-new-tokens", max_new_tokens),
        ("generation.temperature", "--temperature", temperature),
        ("generation.top_k", "--greedy", greedy or None)) if value is not None}
    for item in overrides:
        parts, value = parse_override(item)
        if parts[0] not in sections or len(parts) < 2 or parts[:2] in (["data", "train"], ["data", "eval"]):
            raise ConfigError(f"--set {item}: rlhf eval takes data.* (not data.train/eval: the prompts are --prompts) "
                              "and generation.* keys")
        apply_override(sections[parts[0]], parts[1:], value)
        flags[".".join(parts)] = "--set"
    checked = _validated(data_fields, gen_fields, flags)
    data, generation = checked.data, checked.generation
    if greedy and not generation.greedy:
        raise ConfigError(f"--greedy decodes with generation.top_k 1; --set generation.top_k={generation.top_k} "
                          "contradicts it: give one of them")
    for name, value in (("num_prompts", num_prompts), ("batch_size", batch_size)):  # (the CLI refuses them too;
        if value is not None and value < 1:  # this says so to a caller from Python)
            raise ConfigError(f"rlhf eval: {name} must be at least 1, got {value}")
    held_out = held_out_of(data, split_seed) if split_seed is not None else None  # (data: the prompts as data.train)
    return EvalSettings(policy=_absolute(str(policy)), reward_model=_absolute(reward_model), data=data,
                        generation=generation, baseline=_absolute(baseline), reference=_absolute(reference),
                        num_prompts=num_prompts, batch_size=batch_size,
                        seed=cfg_seed if seed is None else seed, ngram=ngram, dtype=dtype, held_out=held_out,
                        run_share=split_share if held_out else None)


def _absolute(model: str | None) -> str | None:
    """A local model folder as an absolute path (what eval.json records, whatever the working directory), a hub
    id or None as given.

    >>> _absolute("/no/such/folder"), _absolute(None), _absolute(".") == str(Path.cwd())
    ('/no/such/folder', None, True)
    """
    return str(Path(model).resolve()) if model is not None and Path(model).exists() else model


class _EvalSections(BaseModel):
    """What rlhf eval validates: the PPO config's data and generation sections (keys named data.*, generation.*)."""

    data: PPODataConfig
    generation: GenerationConfig


def _validated(data: dict[str, object], generation: dict[str, object], flags: dict[str, str]) -> _EvalSections:
    """Both sections validated; each bad value is a line of one ConfigError naming its key, and the option that
    gave it (`flags`: key -> "--temperature" or "--set")."""
    try:
        return _EvalSections.model_validate({"data": data, "generation": generation})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(_EvalSections, exc, "(rlhf eval's options over the config)",
                                                  cli_keys=flags, flags=flags)) from None
