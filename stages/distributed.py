"""Process-group setup and the few collectives the stages need (all through DeepSpeed's comm layer).

A stage runs either alone (one process, world size 1) or as one of the workers the `deepspeed` launcher
started (RANK / LOCAL_RANK / WORLD_SIZE set). Without CUDA, DeepSpeed's CPU accelerator is selected, so the
same code runs as several CPU processes.
"""

from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from stages.peer_watch import start_watch
from stages.runtime import check_worker_env, free_port, select_accelerator_env


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: this process alone, before (or without) any process group: what `--check-data` loads data as
ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

_INFO: DistInfo | None = None


def setup_distributed() -> DistInfo:
    """Initialise the process group once (idempotent) and return this process's rank and device."""
    global _INFO
    if _INFO is not None:
        return _INFO
    select_accelerator_env()
    quiet_libraries()
    check_worker_env()
    if "WORLD_SIZE" not in os.environ:  # a single process, not started by a launcher: a port free here, not an
        # inherited MASTER_PORT (meant for a multi-node launch; two one-GPU jobs on a node would both bind it)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        index = device_index(local_rank, accel.device_count())
        # DeepSpeed takes LOCAL_RANK for the GPU index (the process group's device, the engine's, ZeRO-3's
        # zero.Init): where they differ it is given the index; this process keeps its node-local rank
        os.environ["LOCAL_RANK"] = str(index)
    init_process_group()
    if accel.device_name() != "cpu":
        accel.set_device(index)
        device = torch.device(accel.device_name(index))
    else:
        device = torch.device("cpu")
    import deepspeed.comm as dist

    _INFO = DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device)
    start_watch(_INFO.rank, _INFO.world_size)  # another rank's own failure ends this one too (stages/peer_watch.py)
    return _INFO


def device_index(local_rank: int, visible: int) -> int:
    """The GPU (index among those this process sees) for the worker with LOCAL_RANK `local_rank`: `local_rank`
    when that many are visible (deepspeed / torchrun: every worker of a node sees all its GPUs); 0 when this
    process sees exactly one (`srun --gpus-per-task=1`, or a launcher giving each worker its own
    CUDA_VISIBLE_DEVICES: LOCAL_RANK 3 then means the node's fourth task, whose one GPU is index 0). Anything
    else is refused, naming both numbers, instead of CUDA's "invalid device ordinal"."""
    if 0 <= local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    listed = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
    from stages.errors import RlhfError

    raise RlhfError(
        f"this worker has LOCAL_RANK={local_rank} but sees {visible} GPU(s){listed}: start at most {visible} "
        "workers on this node, or give each worker one GPU of its own (e.g. srun --gpus-per-task=1)")


#: what the collectives' error says when another rank of the run has died (gloo, NCCL, the TCP store)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited", "failed to recv, got 0 bytes")


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc`, raised in a run of several processes, is a collective failing because another process
    died: that process's own error is the one to read; this one's traceback only buries it."""
    said = str(exc).lower()  # (torch says "Failed to recv" in one place, "failed to recv" in another)
    return isinstance(exc, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1 and \
        any(text.lower() in said for text in PEER_LOST)


#: what DeepSpeed prints on every rank of every run that loads its CPU shared-memory all-reduce op
BUILT_LINE = re.compile(r"DeepSpeed \S+ built successfully\n")


def init_process_group() -> None:
    """deepspeed.init_distributed without the "DeepSpeed ...shm_comm_op built successfully" line it prints on
    every rank of every CPU run (the op is built once, then loaded from the cache); anything else it prints
    passes through, also when it raises."""
    import contextlib
    import io

    import deepspeed

    caught = io.StringIO()
    try:
        with contextlib.redirect_stdout(caught):
            deepspeed.init_distributed(verbose=False)
    finally:
        sys.stdout.write(BUILT_LINE.sub("", caught.getvalue()))


def quiet_libraries() -> None:
    """No per-file progress bars or info chatter from transformers / datasets / DeepSpeed in our output."""
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:  # else quiet_datasets() when data is first read through it (0.4 s of import)
        quiet_datasets()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available():  # every CPU rank: "No CUDA runtime is found, using CUDA_HOME=..." when
        # DeepSpeed loads its CPU ops (on a GPU machine that logger's warnings may matter: kept)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def quiet_datasets() -> None:
    """No progress bars or info chatter from the `datasets` library (imported by the caller)."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()


def barrier() -> None:
    import deepspeed.comm as dist

    dist.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small vector of float64 values over all ranks (one collective)."""
    import deepspeed.comm as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of every rank's integer `value` (one collective; the value itself in one process)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to every rank."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (one collective; small objects)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    boxes: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(boxes, obj)
    return boxes


def gather_floats(values: list[float]) -> list[float]:
    """Every rank's list of floats, concatenated in rank order, on every rank (small lists: eval scores)."""
    return [v for box in gather_objects(list(values)) for v in box]


def run_on_main(fn: Callable[[], None], dist: DistInfo) -> None:
    """Run `fn` on rank 0 only; if it raises an RlhfError, every rank raises it (no rank is left waiting),
    marked `every_rank` (printed once; no rank's own failure)."""
    from stages.errors import RlhfError

    error = None
    if dist.is_main:
        try:
            fn()
        except RlhfError as exc:
            error = exc
    error = broadcast_object(error)
    if error is not None:
        error.every_rank = True
        raise error


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG this process draws from, for exact resume: python, numpy, torch's CPU generator and that of
    its own accelerator `device` (not every visible GPU by position: a resume may see the GPUs otherwise, e.g.
    one per process under srun or torchrun where the deepspeed launcher showed each process all of them)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore `rng_state`'s generators, the accelerator's onto this process's own `device`. A checkpoint written
    before that kept every visible GPU's state ("cuda"): the entry of the device's index is restored."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and (device.index or 0) < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][device.index or 0], device)
