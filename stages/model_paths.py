"""Where a model named in a config (a model, reward model or tokenizer `name_or_path`) is loaded from: a stage
run's folder stands for its final/ checkpoint, a checkpoint-N folder for its hf/; anything else as given (a
folder of its own, or a Hugging Face hub id). Path checks only (no torch: a missing model is said at once)."""

from __future__ import annotations

from pathlib import Path

from stages.config import could_be_hub_id
from stages.errors import CheckpointError

#: the folder inside a model folder without config.json that a model is loaded from: a stage run's final/ HF
#: checkpoint, a checkpoint-N folder's hf/ (its ds/ engine states beside it are not the model)
MODEL_SUBFOLDERS = ("final", "hf")


def model_folder(path: Path) -> Path:
    """The folder a model given as `path` is loaded from: `path` itself when it holds config.json, else the first
    of MODEL_SUBFOLDERS inside it that does, else `path`."""
    if not (path / "config.json").exists():
        for inner in MODEL_SUBFOLDERS:
            if (path / inner / "config.json").exists():
                return path / inner
    return path


def resolve_model_dir(name_or_path: str) -> str:
    """A stage output directory stands for its `final/` HF checkpoint, a checkpoint folder for its `hf/`;
    anything else is used as given. A name that can only be a path (not `could_be_hub_id`: absolute, starting
    with `.` or `~`, more than one `/`, ...) must exist: CheckpointError otherwise, not the hub's complaint
    about a malformed repo id."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() and not (p / "config.json").exists():
        if (inner := model_folder(p)) != p:  # a stage run's folder, a checkpoint-N folder
            return str(inner)
        if any((p / marker).exists() for marker in ("resolved_config.yaml", "metrics.jsonl")):
            raise CheckpointError(f"model {name_or_path}: a stage run without final/ (not finished; finish it "
                                  "with --resume, or point at a checkpoint's model)")
    if name_or_path and not p.exists() and not could_be_hub_id(name_or_path):
        raise CheckpointError(f"model {name_or_path}: no such file or directory")
    return str(p) if name_or_path.startswith("~") else name_or_path
