"""The `rlhf ppo` config that `rlhf bench ppo` runs for a bench config (stages.bench builds the workload and
times it). Plain dictionaries: no torch, so a bad `ppo:` key of a bench config is said at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.config import BenchConfig


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` on `base`, mapping by mapping; a null section (`ppo.logging: null`, every key commented out)
    adds nothing to the benchmark's own."""
    out = dict(base)
    for k, v in extra.items():
        if v is None and isinstance(out.get(k), dict):
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ppo_config_dict(cfg: BenchConfig, workload: Path) -> dict[str, Any]:
    """The `rlhf ppo` config of the benchmark: the workload's models and prompts, exactly new_tokens per
    response, one rollout batch per iteration, no validation, samples or checkpoints (W1's would be 16 GB), with
    `profile` one more iteration under the profiler (after the critic-only iterations of a `ppo:` key
    ppo.critic_pretrain_steps, and warmup + iterations); then the bench config's `ppo:` keys on top. One PPO
    epoch over one mini-batch of all prompts, in micro-batches of the largest divisor of the prompt count up to
    16 (which the mini-batch must be a multiple of; W1: 16, 40 prompts: 10); scoring forwards of up to 16 rows
    (the last one may be shorter)."""
    w = cfg.workload
    micro = max(d for d in range(1, min(16, w.prompts) + 1) if w.prompts % d == 0)
    runs = cfg.warmup + cfg.iterations
    base = {
        "seed": cfg.seed, "output_dir": str(Path(cfg.output_dir) / "ppo"),
        "model": {"name_or_path": str(workload / "policy")},
        "reward_model": {"name_or_path": str(workload / "rm")},
        "data": {"train": str(workload / "prompts.jsonl"), "eval_fraction": 0.0, "format": "prompt",
                 "max_prompt_length": w.prompt_length},
        "generation": {"max_new_tokens": w.new_tokens, "min_new_tokens": w.new_tokens},
        "ppo": {"preset": "ppo-max", "critic_pretrain_steps": 0, "ppo_epochs": 1},
        "train": {"iterations": runs + cfg.profile, "rollout_batch_size": w.prompts,
                  "mini_batch_size": w.prompts, "micro_batch_size": micro,
                  "forward_batch_size": min(16, w.prompts),
                  "sample_every": 0, "save_every": 0, "checkpoints": False},
        "deepspeed": {"zero_stage": 0},
        "logging": {"tensorboard": False},
    }
    merged = _merge(base, cfg.ppo)
    # iterations 1..critic_only come before the warm-up; a ppo: value of the wrong type is left for validation
    # (rlhf_cli.bench_cmd.check_ppo_section) to name
    critic_only = merged["ppo"].get("critic_pretrain_steps") if isinstance(merged["ppo"], dict) else None
    if isinstance(merged["logging"], dict) and isinstance(critic_only, int) and not isinstance(critic_only, bool):
        merged["logging"].setdefault("profile_step", critic_only + runs + 1 if cfg.profile else 0)
    return merged
