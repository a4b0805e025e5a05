"""What `rlhf eval` compares and how it samples (rlhf_cli.eval_options builds it from the command line and a PPO
config; stages.evaluate runs it). Plain data: no torch, so that eval's option errors are said at once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stages.config import GenerationConfig, PPODataConfig


@dataclass
class EvalSettings:
    """What `rlhf eval` compares and how it samples."""

    policy: str
    reward_model: str
    data: PPODataConfig
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    baseline: str | None = None
    reference: str | None = None
    num_prompts: int | None = None
    batch_size: int = 32
    seed: int = 0
    ngram: int = 3
    dtype: str = "float32"
    #: (data.eval_fraction, seed) of a PPO config without data.eval: the validation share `rlhf ppo` held out of
    #: data.train's prompts is evaluated, not the prompts it trained on; None: data.train's prompts as they are
    held_out: tuple[float, int] | None = None
    #: (sha256, data_report.json) of the share the PPO run held out (`run_share`): a --set data.* that changes
    #: which rows are usable, or data.eval_fraction, moves the share, which the evaluation then says
    run_share: tuple[str, str] | None = None


def held_out_of(data: PPODataConfig, seed: int) -> tuple[float, int] | None:
    """`EvalSettings.held_out` of a PPO config's data section and seed: (data.eval_fraction, seed) when it has no
    data.eval and eval_fraction > 0, so `rlhf ppo` held a share of data.train out (stages.ppo.trainer
    load_ppo_data); else None."""
    return (data.eval_fraction, seed) if data.eval is None and data.eval_fraction > 0 else None


def run_share(output_dir: str) -> tuple[str, str] | None:
    """(sha256, report path) of the validation share the PPO run in `output_dir` held out of data.train, as its
    data_report.json records it (eval.held_out_sha256, stages.ppo.prompts `held_out_sha256`); None without a
    record (no run there yet, a run from before it was kept, a file that cannot be read)."""
    path = Path(output_dir) / "data_report.json"
    try:
        digest = json.loads(path.read_text(encoding="utf-8"))["eval"]["held_out_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (digest, str(path)) if isinstance(digest, str) else None


def held_out_source(source: str, fraction: float, seed: int) -> str:
    """How `rlhf eval` and the pipeline's plan name the validation share of `source` (data.train) that `rlhf ppo`
    held out: split_holdout with data.eval_fraction and the config's seed."""
    return f"the validation share of {source} (data.eval_fraction {fraction:g}, seed {seed})"


def evaluated_prompts(data: PPODataConfig, seed: int) -> str:
    """Which prompts `rlhf eval --config` of a PPO config (data section `data`, `seed`) evaluates: data.eval's;
    without it the validation share of data.train (`held_out_source`) when data.eval_fraction > 0; else
    data.train's own, the prompts the run trains on."""
    if data.eval is not None:
        return f"data.eval {data.eval.path}"
    share = held_out_of(data, seed)
    if share:
        return held_out_source(f"data.train {data.train.path}", *share)
    return f"data.train {data.train.path} (data.eval_fraction 0: the prompts it trains on)"
