"""What `rlhf eval` compares and how it samples (rlhf_cli.eval_options builds it from the command line and a PPO
config; stages.evaluate runs it). Plain data: no torch, so that eval's option errors are said at once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stages.config import GenerationConfig, PPODataConfig
from stages.errors import ConfigError


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


def results_path(given: str | Path) -> Path:
    """`rlhf eval --out`: the results JSON to write. One that names a folder is a ConfigError: an existing
    folder, or a path written with a trailing "/" (pathlib drops it: a file named like the folder would be
    written)."""
    text = str(given)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        kind = "is" if path.is_dir() else "names"
        raise ConfigError(f"--out {text} {kind} a directory; give the JSON file to write (e.g. {path / 'eval.json'})")
    return path
