"""What `rlhf eval` compares and how it samples (rlhf_cli.eval_options builds it from the command line and a PPO
config; stages.evaluate runs it). Plain data: no torch, so that eval's option errors are said at once."""

from __future__ import annotations

from dataclasses import dataclass, field

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
