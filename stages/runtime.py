"""Light process-environment helpers (no torch import at module load, so the CLI starts fast)."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

from stages.errors import ConfigError


#: what a worker of a launcher has (torchrun and DeepSpeed's launcher set all five); DeepSpeed's init_distributed,
#: missing any, looks for MPI instead
PROCESS_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_worker_env(env: dict[str, str] | os._Environ | None = None) -> None:
    """A ConfigError when WORLD_SIZE is set (what makes a process a launcher's worker to stages.distributed) but
    not all of PROCESS_GROUP_VARS are: a WORLD_SIZE left by an `export` or a job system otherwise ended in
    DeepSpeed's MPI discovery (a traceback: no module named mpi4py) after the output directory was prepared.
    Checked by the CLI before anything, and by stages.distributed.setup_distributed for every other caller."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return  # one process: stages.distributed sets all five itself
    missing = [name for name in PROCESS_GROUP_VARS if not env.get(name)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={env['WORLD_SIZE']} is set, as in a worker of a launcher, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: unset WORLD_SIZE to run as one process (--num-gpus N "
            f"starts rlhf's own launch), or start the workers with a launcher that sets all of "
            f"{', '.join(PROCESS_GROUP_VARS)} (torchrun, deepspeed)")


def free_port() -> int:
    """A TCP port that is free right now on this host (for a single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` under a temporary name beside it (`.tmp-NAME`), then rename it into place: a reader
    sees the old file or the whole new one, never half of it; the temporary file is removed when the write
    fails."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def call_forwarding_signals(
    cmd: Sequence[str], env: dict[str, str] | None = None, targets: Callable[[Any], list[Any]] | None = None,
    request: Callable[[int], bool] | None = None,
) -> int:
    """Run `cmd` in a session of its own and return its exit code (128 + s when a signal s killed it, as a shell
    reports it, e.g. before the child's own handlers were installed). SIGTERM / SIGINT / SIGHUP received meanwhile
    are sent on to `targets(proc)` (default: the child itself; the child's whole process group when `targets`
    finds nothing, e.g. workers not started yet or on other nodes behind pdsh), and this process keeps waiting:
    a Ctrl-C or a closed terminal reaches the child once, through here. The training processes save and stop
    on SIGTERM / SIGINT (stages/stop.py) and end on SIGHUP as they would have in the terminal's process group.
    Signals this process ignores (nohup) are not forwarded. `request(signum)`, when given, is asked first: True
    means it passed the signal on another way (a multi-node run's stop file), and nothing is sent."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        if request is not None and request(signum):
            return
        found = targets(proc) if targets is not None else [proc]
        if not found:
            try:
                os.killpg(proc.pid, signum)
            except OSError:
                pass
        for target in found:
            try:
                target.send_signal(signum)
            except (OSError, psutil.Error):  # already gone
                pass

    main = threading.current_thread() is threading.main_thread()
    forwarded = [sig for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, forward) for sig in forwarded} if main else {}
    try:
        code = proc.wait()
        return 128 - code if code < 0 else code  # killed by signal s (-s): the shell's 128 + s
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def package_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def missing_accelerator(env: dict[str, str] | os._Environ) -> str | None:
    """"cpu" when DS_ACCELERATOR is unset and no CUDA device is present (DeepSpeed's CPU accelerator), else None."""
    return "cpu" if "DS_ACCELERATOR" not in env and not cuda_available() else None


def chosen_accelerator(env: dict[str, str] | os._Environ) -> str:
    """The accelerator DeepSpeed's workers will use: DS_ACCELERATOR when set, else "cpu" without a CUDA device,
    else "cuda"."""
    return env.get("DS_ACCELERATOR") or missing_accelerator(env) or "cuda"


def import_deepspeed_as_workers_would() -> None:
    """Import DeepSpeed in the launching process (a dry run's checks and memory estimate read its helpers) with the
    accelerator its workers get (`missing_accelerator`, which the launch command adds), set for the import only:
    DeepSpeed picks its accelerator once, at import, and otherwise guesses the CPU one with a warning. os.environ
    is left as it was."""
    accelerator = missing_accelerator(os.environ)
    if accelerator is not None:
        os.environ["DS_ACCELERATOR"] = accelerator
    try:
        importlib.import_module("deepspeed")
    finally:
        if accelerator is not None:
            del os.environ["DS_ACCELERATOR"]


def select_accelerator_env(env: dict[str, str] | os._Environ | None = None) -> None:
    """Pick DeepSpeed's CPU accelerator when no CUDA device is present (unless DS_ACCELERATOR is set)."""
    env = os.environ if env is None else env
    accelerator = missing_accelerator(env)
    if accelerator is not None:
        env["DS_ACCELERATOR"] = accelerator
