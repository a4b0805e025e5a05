"""Fault injection for the reliability tests (RELIABILITY.md): off unless RLHF_FAULT is set.

RLHF_FAULT is a comma-separated list of `name@step`; each fault fires once, on the rank given by
RLHF_FAULT_RANK (default 0), when the training loop reaches that optimizer step / PPO iteration (1-based):

    kill@N          SIGKILL this process right after step N (before its metrics row and checkpoint)
    kill-save@N     SIGKILL this process in the middle of writing checkpoint N (engine state written,
                    HF weights and COMPLETE not yet)
    enospc-save@N   raise OSError(ENOSPC) in the middle of writing checkpoint N (a full disk)
    sigterm@N       send SIGTERM to this process after step N (what a scheduler does before pre-emption)
    sigint@N        send SIGINT to this process after step N (Ctrl-C)
    nan-loss@N      the loss of step N's first micro-batch becomes NaN
    nan-reward@N    the reward-model score of one rollout of PPO iteration N becomes NaN
    oom@N           raise torch.OutOfMemoryError (a CUDA allocation that failed) in step N's first micro-batch

Example: RLHF_FAULT=kill-save@4 rlhf sft --config c.yaml
"""

from __future__ import annotations

import errno
import os
import signal
from typing import TYPE_CHECKING

from stages.errors import ConfigError

if TYPE_CHECKING:  # (torch is imported where a fault needs it: `rlhf --help` imports this module)
    import torch

ENV, RANK_ENV = "RLHF_FAULT", "RLHF_FAULT_RANK"
NAMES = ("kill", "kill-save", "enospc-save", "sigterm", "sigint", "nan-loss", "nan-reward", "oom")


def planned_faults() -> list[tuple[str, int]]:
    """RLHF_FAULT's (name, step) items ([] when unset or empty); a ConfigError naming the first bad item. `rlhf`
    reads it before any work (`run_stage`), so that a misspelt fault is one error line at once."""
    spec = os.environ.get(ENV)
    found = []
    for item in spec.split(",") if spec else ():
        fault, _, at = item.strip().partition("@")
        if fault not in NAMES or not at.isdigit():
            raise ConfigError(f"{ENV}: {item!r} is not name@step with name one of {', '.join(NAMES)}")
        found.append((fault, int(at)))
    return found


def planned(name: str, step: int) -> bool:
    """True when RLHF_FAULT asks for fault `name` at `step` on this rank."""
    if os.environ.get("RANK", "0") != os.environ.get(RANK_ENV, "0"):
        return False
    return (name, step) in planned_faults()


def maybe_kill(name: str, step: int) -> None:
    """SIGKILL this process (no handler, no cleanup: a node dying) when fault `name` is planned at `step`."""
    if planned(name, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(step: int) -> None:
    """Send SIGTERM / SIGINT to this process after `step` when `sigterm@step` / `sigint@step` is planned."""
    for name, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        if planned(name, step):
            os.kill(os.getpid(), sig)


def maybe_disk_full(step: int) -> None:
    if planned("enospc-save", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def maybe_out_of_memory(step: int) -> None:
    """Raise what a failed CUDA allocation raises when `oom@step` is planned."""
    if planned("oom", step):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (RLHF_FAULT oom)")


def maybe_poison(name: str, step: int, value: torch.Tensor) -> torch.Tensor:
    """`value` with a NaN added to its first element when fault `name` is planned at `step` (graph kept)."""
    if not planned(name, step):
        return value
    import torch

    hole = torch.zeros_like(value)
    hole.view(-1)[0] = float("nan")
    return value + hole
