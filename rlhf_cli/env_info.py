"""`rlhf env`: what a bug report needs to know about this machine."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhf_cli import __version__

PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "tokenizers", "accelerate", "pydantic", "typer", "rich",
            "trl", "flash-attn")


def _version(dist: str) -> str:
    from stages.runtime import package_version

    return package_version(dist) or "not installed"


def collect_env() -> dict[str, Any]:
    """Versions and devices as a flat dict: versions as strings ("not installed"), counts as numbers, yes/no as
    booleans (so `rlhf env --json` reads as typed JSON)."""
    info: dict[str, Any] = {
        "rlhf": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for name in PACKAGES:
        info[name] = _version(name)
    try:
        import torch

        info["cuda (torch build)"] = torch.version.cuda or "none (CPU build)"
        info["cuda available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpus"] = ", ".join(  # (the memory: what --gpu-memory's default reads, through nvidia-smi)
                f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB)"
                for i in range(torch.cuda.device_count())
            )
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            info["bf16 supported"] = torch.cuda.is_bf16_supported()
        info["cpu threads"] = torch.get_num_threads()
    except Exception as exc:  # a broken torch install is exactly what this command must report
        info["torch error"] = repr(exc)
    return info


def print_env(info: dict[str, Any], as_json: bool, console: Console) -> None:
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title="rlhf environment", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)
