"""Light process-environment helpers (no torch import at module load, so the CLI starts fast)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port that is free right now on this host (for a single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def missing_accelerator(env: dict[str, str] | os._Environ) -> str | None:
    """"cpu" when DS_ACCELERATOR is unset and no CUDA device is present (DeepSpeed's CPU accelerator), else None."""
    return "cpu" if "DS_ACCELERATOR" not in env and not cuda_available() else None


def select_accelerator_env(env: dict[str, str] | os._Environ | None = None) -> None:
    """Pick DeepSpeed's CPU accelerator when no CUDA device is present (unless DS_ACCELERATOR is set)."""
    env = os.environ if env is None else env
    accelerator = missing_accelerator(env)
    if accelerator is not None:
        env["DS_ACCELERATOR"] = accelerator
