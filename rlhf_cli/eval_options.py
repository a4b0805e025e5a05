"""`rlhf eval`'s options resolved over a PPO config into the settings stages.evaluate runs with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlhf_cli.config_loader import format_validation_error, load_config
from stages.config import GenerationConfig, PPODataConfig
from stages.engine import PRECISION_DTYPES
from stages.errors import CheckpointError, ConfigError
from stages.evaluate import EvalSettings
from stages.models import resolve_model_dir


def eval_settings(policy: Path, config: Path | None = None, reward_model: str | None = None,
                  prompts: Path | None = None, baseline: str | None = None, reference: str | None = None,
                  gold: str | None = None, num_prompts: int | None = None, max_new_tokens: int | None = None,
                  temperature: float | None = None, seed: int | None = None, batch_size: int = 32) -> EvalSettings:
    """The options over the values of a PPO config (when `config` is given; a run's resolved_config.yaml works
    too): its reward_model, data (data.eval, else data.train), generation, gold judge, seed, precision and
    monitor n-gram. An option given explicitly wins."""
    try:  # a policy that is not there is a usage error (exit 2), like any missing input
        resolve_model_dir(str(policy))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    data_fields: dict[str, object] = {}
    gen_fields: dict[str, object] = {}
    cfg_seed, dtype, ngram = 0, "float32", 3
    if config is not None:
        # eval never loads the config's policy; its reward model and prompts only when not given here
        unused = {"model.name_or_path"} | ({"reward_model.name_or_path"} if reward_model else set()) | (
            {"data.train", "data.eval"} if prompts is not None else set())
        cfg = load_config("ppo", config, [], not_yet=unused)
        reward_model = reward_model or cfg.reward_model.name_or_path
        data_fields = cfg.data.model_dump(exclude={"train", "eval", "eval_fraction", "ptx"})
        data_fields["train"] = cfg.data.eval or cfg.data.train
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
    gen_fields |= {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature)) if v is not None}
    data, generation = _validated(PPODataConfig, data_fields), _validated(GenerationConfig, gen_fields)
    return EvalSettings(policy=str(policy), reward_model=str(reward_model), data=data, generation=generation,
                        baseline=baseline, reference=reference, num_prompts=num_prompts, batch_size=batch_size,
                        seed=cfg_seed if seed is None else seed, ngram=ngram, dtype=dtype)


def _validated(schema: Any, fields: dict[str, object]) -> Any:
    """`schema` built from `fields`; a bad value is a one-line ConfigError naming the key."""
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(schema, exc, "(rlhf eval's options over the config)")) from None
