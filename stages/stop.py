"""Graceful stop on SIGTERM / SIGINT: finish the current step, save a checkpoint, exit non-zero.

Cluster schedulers send SIGTERM some time before they pre-empt or cancel a job; Ctrl-C sends SIGINT. While a
training loop runs (between `arm()` and `disarm()`), the first such signal is only recorded (the handler does
no I/O). After every step all ranks agree on whether any of them got one (`requested`, one tiny all-reduce,
which also prints the notice once), so they save the same checkpoint together and then raise `Stopped`, which
the CLI turns into a message and exit code 128 + signal (143 for SIGTERM, 130 for SIGINT). Repeats of the
signal are ignored (a scheduler may signal every process of the job, and DeepSpeed's launcher forwards what
it gets), except a second SIGINT at least 2 s after the first: a user pressing Ctrl-C again stops at once
(KeyboardInterrupt, no checkpoint). A signal set to be ignored (`nohup`, a scheduler's wrapper) stays ignored.
SIGHUP is not handled: a closed terminal ends the run as before (run long jobs under nohup, tmux or a scheduler).

Ranks on other nodes (a `--hostfile` run, started over pdsh/ssh) are out of reach of the launching `rlhf`
process's signals, and DeepSpeed's own runner, signalled, kills every node's workers 30 s later: there, `rlhf`
writes the signal's number to a stop file in output_dir (a shared filesystem, as the checkpoints need) instead,
and every rank's `requested` reads it as if it had received that signal (`STOP_FILE_VAR`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.errors import RlhfError, resume_with

if TYPE_CHECKING:
    import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)  # also the order of precedence between ranks
#: exit codes of a run that a signal stopped (143: SIGTERM, 130: SIGINT, also an immediate second Ctrl-C)
STOPPED_CODES = tuple(128 + int(sig) for sig in SIGNALS)
#: the stop file's path, for every rank (DeepSpeed's runner passes PYTHON* variables on to every node)
STOP_FILE_VAR = "PYTHON_RLHF_STOP_FILE"
_state: dict[str, Any] = {"armed": False, "signum": 0, "at": 0.0, "previous": {}, "told": False}


class Stopped(RlhfError):
    """A stop signal ended the run after a checkpoint was saved; exit code 128 + the signal number."""

    every_rank = True

    def __init__(self, signum: int, step: int, checkpoint: Path | None, unit: str = "step") -> None:
        name = signal.Signals(signum).name
        if checkpoint is not None:
            where = f"saved {checkpoint.name} in {checkpoint.parent}; continue {resume_with()}"
        else:
            where = "no checkpoint written (train.checkpoints: false)"
        super().__init__(f"stopped by {name} after {unit} {step}: {where}")
        self.exit_code = 128 + signum


#: signals that kill a training process outright (the out-of-memory killer, a crash in native code, a job limit)
KILLING = (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
           signal.SIGTERM)


def killed_note(code: int) -> str:
    """" (probably a process killed by SIGKILL ...)" when an exit code reads as a process dead of a signal it
    could not handle (KILLING), else "". DeepSpeed's launch.py exits with the dead worker's return code, -s,
    which reaches us as 256 - s (241: SIGTERM, 247: SIGKILL); a shell or torchrun reports 128 + s. (128 +
    SIGTERM / SIGINT, STOPPED_CODES, is our own workers' clean stop; 255 is also ssh's and pdsh's failure, so
    SIGHUP is not among the signals read.)

    >>> killed_note(241), killed_note(139), killed_note(1), killed_note(143), killed_note(255)
    (' (probably a process killed by SIGTERM)', ' (probably a process killed by SIGSEGV)', '', '', '')
    >>> killed_note(247).startswith(" (probably a process killed by SIGKILL: the kernel's out-of-memory killer")
    True
    """
    if code in STOPPED_CODES:
        return ""
    for signum in (256 - code if 192 < code < 256 else 0, code - 128 if 128 < code <= 192 else 0):
        if signum in KILLING:
            why = (": the kernel's out-of-memory killer sends it (see `dmesg`), as does a job's time or memory limit"
                   if signum == signal.SIGKILL else "")
            return f" (probably a process killed by {signal.Signals(signum).name}{why})"
    return ""


def _handler(signum: int, frame: Any) -> None:
    if not _state["armed"]:
        previous = _state["previous"].get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        if previous == signal.SIG_IGN:
            return
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    now = time.monotonic()
    if not _state["signum"]:
        _state["signum"], _state["at"] = signum, now
    elif stops_at_once(_state["signum"], _state["at"], signum, now):
        raise KeyboardInterrupt


def stops_at_once(first: int, at: float, signum: int, now: float) -> bool:
    """Whether `signum`, received at `now` after a first stop signal `first` at `at`, means stop at once: a user's
    second Ctrl-C, SIGINT after a SIGINT at least 2 s earlier (a faster repeat is a scheduler's or a shaky
    finger's, and is ignored like a repeated SIGTERM)."""
    return signum == signal.SIGINT == first and now - at >= 2.0


def arm() -> None:
    """Record stop signals from now on (main thread only; elsewhere signals keep their handlers; an ignored
    signal stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current == signal.SIG_IGN:
            continue
        if current is not _handler:
            _state["previous"][sig] = current
            signal.signal(sig, _handler)
    _state.update(armed=True, signum=0, at=0.0, told=False)


def disarm() -> None:
    """Signals behave as before `arm()` again (a recorded, unhandled signal is forgotten)."""
    _state.update(armed=False, signum=0)


def received() -> int:
    """The signal this process recorded (0: none)."""
    return int(_state["signum"])


def file_request() -> int:
    """The signal number a launcher wrote to the stop file (STOP_FILE_VAR), 0 while there is none (SIGTERM for a
    file with anything else in it). Read by each node's local rank 0 only (`requested` shares it with every
    rank; a worker that sees one GPU of its own runs as LOCAL_RANK 0, `distributed.device_index`, and reads it
    too); a file that cannot be read right now (a shared filesystem's passing error) counts as none, and is
    read again after the next step."""
    path = os.environ.get(STOP_FILE_VAR)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return 0
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return 0
    return int(text) if text in {str(int(sig)) for sig in SIGNALS} else int(signal.SIGTERM)


def write_request(path: Path, signum: int) -> None:
    """Ask every rank watching `path` to stop as on `signum` (atomic_write_text: no rank reads a half-written
    file)."""
    from stages.runtime import atomic_write_text

    atomic_write_text(path, f"{int(signum)}\n")


def requested(device: torch.device) -> int:
    """The stop signal any rank recorded (SIGTERM before SIGINT), 0 for none; rank 0 says so once. Collective:
    every rank calls it at the same point of every step."""
    from stages.distributed import all_reduce_sum

    mine = received() or file_request()
    counts = all_reduce_sum([float(mine == sig) for sig in SIGNALS], device).tolist()
    signum = next((int(sig) for sig, n in zip(SIGNALS, counts) if n), 0)
    if signum and not _state["told"] and os.environ.get("RANK", "0") == "0":
        _state["told"] = True
        try:
            print(f"received {signal.Signals(signum).name}: saving a checkpoint, then stopping", flush=True)
        except OSError:  # no terminal left to tell
            pass
    return signum
