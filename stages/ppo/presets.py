"""PPO presets (PPO-MAX.md, "The tricks and the presets") and the command-line flag of every trick.

Precedence, lowest first: schema default < preset < YAML file < `--set key=value` < trick flag. A preset only
fills keys that the file, `--set` and the flags leave unset; the resolved config (saved as
resolved_config.yaml) then holds every value explicitly, so re-reading it gives the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.config import as_bool

PRESET_NAMES = ("vanilla", "moss-release", "ppo-max")
DEFAULT_PRESET = "vanilla"

_COMMON: dict[str, Any] = {
    "ppo.kl_coef": 0.0,
    "ppo.kl_estimator": "k1",
    "ppo.reward_scaling": False,
    "ppo.reward_norm": False,
    "ppo.reward_clip": 0.0,
    "ppo.adv_norm": False,
    "ppo.adv_clip": 0.0,
    "ppo.policy_clip": 0.2,
    "ppo.value_clip": 0.0,
    "ppo.critic_init": "reward_model",
    "ppo.critic_pretrain_steps": 0,
    "ppo.grad_clip": 1.0,
    "ppo.gamma": 1.0,
    "ppo.lam": 0.95,
    "ppo.entropy_coef": 0.0,
    "ppo.ptx_coef": 0.0,
    "ppo.ref_importance_sampling": False,
    "ppo.ppo_epochs": 1,
}

#: dotted key -> value, per preset (the table of PPO-MAX.md; learning rates from the same table).
PRESETS: dict[str, dict[str, Any]] = {
    "vanilla": dict(_COMMON),
    "moss-release": _COMMON | {
        "ppo.kl_coef": 0.01,
        "ppo.reward_scaling": True,
        "ppo.value_clip": 0.2,
        "train.policy_lr": 5e-7,
        "train.critic_lr": 1.5e-6,
        "train.warmup_ratio": 0.1,
    },
    "ppo-max": _COMMON | {
        "ppo.kl_coef": 0.05,
        "ppo.reward_norm": True,
        "ppo.reward_clip": 0.8,
        "ppo.value_clip": 0.2,
        "ppo.critic_pretrain_steps": 20,
        "ppo.lam": 0.9,
        "train.policy_lr": 5e-7,
        "train.critic_lr": 1.65e-6,
    },
}


@dataclass(frozen=True)
class TrickFlag:
    """One command-line flag: `--name VALUE` (or `--name/--no-name` for booleans) setting `key`."""

    name: str
    key: str
    kind: type | tuple[str, ...]  # float, int, bool, or the allowed choices
    help: str


TRICK_FLAGS: tuple[TrickFlag, ...] = (
    TrickFlag("kl-coef", "ppo.kl_coef", float, "beta of the token-level KL penalty"),
    TrickFlag("kl-estimator", "ppo.kl_estimator", ("k1", "k3"), "KL estimator per token"),
    TrickFlag("reward-scaling", "ppo.reward_scaling", bool, "divide scores by their running std"),
    TrickFlag("reward-norm", "ppo.reward_norm", bool, "normalise scores by their running mean/std"),
    TrickFlag("reward-clip", "ppo.reward_clip", float, "clip transformed scores to [-delta, delta]; 0 = off"),
    TrickFlag("adv-norm", "ppo.adv_norm", bool, "whiten advantages per mini-batch"),
    TrickFlag("adv-clip", "ppo.adv_clip", float, "clip advantages to [-c, c]; 0 = off"),
    TrickFlag("policy-clip", "ppo.policy_clip", float, "PPO clip epsilon"),
    TrickFlag("value-clip", "ppo.value_clip", float, "value-loss clip c; 0 = off"),
    TrickFlag("critic-init", "ppo.critic_init", ("reward_model", "policy"), "critic initialisation"),
    TrickFlag("critic-pretrain-steps", "ppo.critic_pretrain_steps", int, "critic-only iterations first"),
    TrickFlag("grad-clip", "ppo.grad_clip", float, "global gradient-norm clip; 0 = off"),
    TrickFlag("gamma", "ppo.gamma", float, "GAE discount"),
    TrickFlag("lam", "ppo.lam", float, "GAE lambda"),
    TrickFlag("entropy-coef", "ppo.entropy_coef", float, "entropy bonus weight"),
    TrickFlag("ptx-coef", "ppo.ptx_coef", float, "PTX (pretraining LM) loss weight; needs data.ptx"),
    TrickFlag("ref-importance-sampling", "ppo.ref_importance_sampling", bool, "PPO ratio against the reference"),
    TrickFlag("ppo-epochs", "ppo.ppo_epochs", int, "passes over each rollout batch"),
    TrickFlag("iterations", "train.iterations", int, "PPO iterations, after the critic-only ones"),
    TrickFlag("rollout-batch-size", "train.rollout_batch_size", int, "prompts per rank per iteration"),
    TrickFlag("mini-batch-size", "train.mini_batch_size", int, "rollouts per rank per optimizer step"),
    TrickFlag("policy-lr", "train.policy_lr", float, "policy learning rate"),
    TrickFlag("critic-lr", "train.critic_lr", float, "critic learning rate"),
    TrickFlag("warmup-ratio", "train.warmup_ratio", float, "share of optimizer steps warming up"),
)


def _lookup(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _assign(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b]... = value, creating missing mappings; nothing when a section on the way is not a mapping
    (`ppo: [..]`, `train: 5`): validation then names that section."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            return
    node[last] = value


def _on(value: Any) -> bool:
    """Whether a config value reads as a true bool ("true", "yes", 1, ...: config.as_bool, pydantic's reading);
    one that reads as no bool is not on (validation names it)."""
    try:
        return as_bool(value)
    except ValueError:
        return False


#: keys of which at most one may be on (PPOAlgoConfig checks it): a config that turns one on keeps the preset
#: from turning on the other
ALTERNATIVES = {"ppo.reward_scaling": "ppo.reward_norm", "ppo.reward_norm": "ppo.reward_scaling"}


def fill_preset(data: dict[str, Any], preset: str | None) -> list[str]:
    """Set `ppo.preset` (the command line's `preset` wins over the file's, default vanilla) and fill every
    preset key the raw config `data` leaves unset (absent, or null: `kl_coef:` with no value), in place. Returns
    the keys the preset filled."""
    found, in_file = _lookup(data, "ppo.preset")
    name = preset or (in_file if found and in_file else DEFAULT_PRESET)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    _assign(data, "ppo.preset", name)
    filled = []
    for key, value in PRESETS[name].items():
        if _lookup(data, key)[1] is None:
            other = ALTERNATIVES.get(key)
            found, given = _lookup(data, other) if other is not None else (False, None)
            if found and _on(given):
                value = False  # the config turned the alternative on: it wins over the preset's choice
            _assign(data, key, value)
            filled.append(key)
    return filled


def flag_overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` overrides (YAML values) for the trick flags that were given (name -> value; None = unset)."""
    import json

    by_name = {f.name: f for f in TRICK_FLAGS}
    return [f"{by_name[name].key}={json.dumps(value)}" for name, value in values.items() if value is not None]
