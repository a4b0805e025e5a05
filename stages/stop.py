"""Graceful stop on SIGTERM / SIGINT / SIGHUP: finish the current step, save a checkpoint, exit non-zero.

Cluster schedulers send SIGTERM some time before they pre-empt or cancel a job; Ctrl-C sends SIGINT; closing
the terminal sends SIGHUP. While a
training loop runs (between `arm()` and `disarm()`), the first such signal is only recorded. After every step
all ranks agree on whether any of them got one (`requested`, one tiny all-reduce), so they save the same
checkpoint together and then raise `Stopped`, which the CLI turns into a message and exit code 128 + signal
(143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP). Repeats of the signal are ignored (a scheduler may signal every process
of the job, and DeepSpeed's launcher forwards what it gets), except a second SIGINT at least 2 s after the
first: a user pressing Ctrl-C again stops at once (KeyboardInterrupt, no checkpoint).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.errors import RlhfError

if TYPE_CHECKING:
    import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # also the order of precedence between ranks
#: exit codes of a run that a signal stopped after saving (143: SIGTERM, 130: SIGINT, 129: SIGHUP)
STOPPED_CODES = tuple(128 + int(sig) for sig in SIGNALS)
_state: dict[str, Any] = {"armed": False, "signum": 0, "at": 0.0, "previous": {}}


class Stopped(RlhfError):
    """A stop signal ended the run after a checkpoint was saved; exit code 128 + the signal number."""

    every_rank = True

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        where = f"saved {checkpoint.name} in {checkpoint.parent}" if checkpoint else "no checkpoint written"
        super().__init__(f"stopped by {name} after step {step}: {where}; continue with --resume")
        self.exit_code = 128 + signum


def _handler(signum: int, frame: Any) -> None:
    if not _state["armed"]:
        previous = _state["previous"].get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    now = time.monotonic()
    if not _state["signum"]:
        _state["signum"], _state["at"] = signum, now
        if os.environ.get("RANK", "0") == "0":
            print(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(Ctrl-C again to stop at once)", flush=True)
    elif signum == signal.SIGINT and _state["signum"] == signal.SIGINT and now - _state["at"] >= 2.0:
        raise KeyboardInterrupt


def arm() -> None:
    """Record stop signals from now on (main thread only; elsewhere signals keep their handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is not _handler:
            _state["previous"][sig] = current
            signal.signal(sig, _handler)
    _state.update(armed=True, signum=0, at=0.0)


def disarm() -> None:
    """Signals behave as before `arm()` again (a recorded, unhandled signal is forgotten)."""
    _state.update(armed=False, signum=0)


def received() -> int:
    """The signal this process recorded (0: none)."""
    return int(_state["signum"])


def requested(device: torch.device) -> int:
    """The stop signal any rank recorded (SIGTERM before SIGINT before SIGHUP), 0 for none. Collective: every
    rank calls it at the same point of every step."""
    from stages.distributed import all_reduce_sum

    mine = received()
    counts = all_reduce_sum([float(mine == sig) for sig in SIGNALS], device).tolist()
    return next((int(sig) for sig, n in zip(SIGNALS, counts) if n), 0)
