"""The GPU-memory side of a stage command: the memory estimate's fit to the GPUs (`--gpu-memory`, else
nvidia-smi's figure), printed by --dry-run and as a warning before a run that will not fit, and the one error a
rank out of GPU memory prints (what it was doing, torch's message, the fit, what lowers the memory).
--fit-micro-batch's choice: rlhf_cli/micro_batch_fit.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from rlhf_cli.launcher import gpu_memory as gpu_memory_of
from rlhf_cli.output import err, out
from stages.memory import (GIB, estimate, fit_choice, fit_verdict, fits, format_estimate, format_fit, memory_advice,
                           micro_batch_choices)
from stages.runtime import chosen_accelerator

#: the flag that sets train.micro_batch_size to the largest that fits (rlhf_cli/micro_batch_fit.py)
FIT_FLAG = "--fit-micro-batch"


def gib_per_gpu(value: float | None) -> float | None:
    """--gpu-memory's check: a finite number of GiB above 0."""
    if value is not None and not 0 < value < 1e6:  # (also refuses nan and inf)
        raise typer.BadParameter(f"GiB of memory per GPU: a number above 0 and below 1e6 (got {value})")
    return value


def gpu_memory_for(num_gpus: int | None, hostfile: Path | None, gpu_memory: float | None) -> tuple[int, str] | None:
    """Bytes per GPU for the memory estimate's fit and where the figure comes from: --gpu-memory, else (a run
    on this node's CUDA GPUs) nvidia-smi's for the GPUs its ranks use; None otherwise (a --hostfile run's
    workers use other nodes' GPUs)."""
    if gpu_memory is not None:
        return int(gpu_memory * GIB), "--gpu-memory"
    if hostfile is not None or chosen_accelerator(os.environ) != "cuda":
        return None
    found = gpu_memory_of(num_gpus)
    return (found, "nvidia-smi, this node's GPUs") if found else None


def estimate_quietly(cfg: Any, world: int) -> dict[str, Any] | None:
    """The memory estimate with the peak at every `micro_batch_choices`; None when it cannot be made (no
    config.json) or fails (a remote-code config, say): it informs, and never stops a run or its error (only
    --fit-micro-batch, which needs it, is refused without it)."""
    try:
        return estimate(cfg, world, micro_batch_choices(cfg))
    except Exception:  # noqa: BLE001 - see above
        return None


def fit_report(est: dict[str, Any], cfg: Any, gpu: tuple[int, str]) -> str:
    """`format_fit`, and `memory_advice` when the peak does not fit."""
    over = not fits(est["total"], gpu[0])
    return format_fit(est, cfg, *gpu) + (f"\n  what lowers it: {memory_advice(cfg)}" if over else "")


def stage_memory_line(label: str, cfg: Any, processes: int, gpu: tuple[int, str] | None, stand_ins: list[str],
                      chosen_at_start: bool = False) -> str:
    """A stage's line of `rlhf pipeline --dry-run`: its estimated peak per rank (`estimate_quietly`) at its
    train.micro_batch_size, whose earlier stages' model architecture it assumed (`stages.pipeline.estimate_configs`),
    and, with a GPU figure (`gpu`: bytes, source), whether the peak fits it (`fit_verdict`). `chosen_at_start`: a
    stage whose micro-batch --fit-micro-batch chooses when it starts (its model is still to be trained, or it is
    retrained): the peak at the micro-batch it would choose from this config (`fit_choice`), said to be chosen
    again then."""
    assumed = (f" (with the model architecture of {' and '.join(stand_ins)}, which this run trains first)"
               if stand_ins else "")
    est = estimate_quietly(cfg, processes)
    at_start = f"; {FIT_FLAG} chooses its micro-batch when the stage starts" if chosen_at_start else ""
    if est is None:
        return f"{label}: {format_estimate(None).removeprefix('memory estimate: ')}{assumed}{at_start}"
    micro, peak, which = cfg.train.micro_batch_size, est["total"], ""
    if chosen_at_start and gpu is not None:
        micro, fitted = fit_choice(est, gpu[0])
        which, peak = ", the largest that fits" if fitted else ", the smallest (none fits)", est["peak_at_micro_batch"][micro]
        at_start = f"; {FIT_FLAG} chooses it again when the stage starts, from the config.json its model has then"
    line = f"{label}: peak {peak / GIB:.3f} GiB per rank at micro-batch {micro}{which}{assumed}"
    return line + (f"; {fit_verdict(peak, gpu[0])}" if gpu is not None else "") + at_start


def report_memory(cfg: Any, processes: int, num_gpus: int | None, hostfile: Path | None, gpu_memory: float | None,
                  dry_run: bool) -> None:
    """A dry run: the memory estimate and, when the GPUs' memory is known (`gpu_memory_for`), its fit. A run:
    only a warning, when the GPUs' memory is known and the peak does not fit (nothing is estimated without a GPU
    figure: it takes a second or so)."""
    gpu = gpu_memory_for(num_gpus, hostfile, gpu_memory)
    if not (dry_run or gpu):
        return
    est = estimate_quietly(cfg, processes)
    if dry_run:
        out.print(format_estimate(est), highlight=False)
        if est is not None and gpu is not None:
            out.print(fit_report(est, cfg, gpu), highlight=False)
    elif est is not None and gpu is not None and not fits(est["total"], gpu[0]):
        err.print(f"[yellow]warning: the memory estimate ({est['total'] / GIB:.3f} GiB per rank; --dry-run lists "
                  f"it) exceeds the GPUs' memory: expect CUDA out of memory\n{escape(fit_report(est, cfg, gpu))}[/]",
                  highlight=False)


def out_of_memory_message(exc: BaseException, cfg: Any, gpu_memory: float | None) -> str:
    """What a rank out of GPU memory prints: what it was doing (a checkpoint's save or load says so), torch's
    message, the memory estimate's fit to this rank's GPU (its total memory; --gpu-memory in a run without a
    launcher that never used CUDA) and what lowers the memory."""
    import torch

    from stages.errors import WHILE_ATTR

    gpu = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "this rank's GPU"
    elif gpu_memory is not None:
        gpu = int(gpu_memory * GIB), "--gpu-memory"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    est = estimate_quietly(cfg, world) if cfg is not None and gpu is not None else None
    during = getattr(exc, WHILE_ATTR, None)
    lines = [f"out of GPU memory{f' while {during}' if during else ''}: {str(exc).strip() or type(exc).__name__}"]
    if est is not None and gpu is not None:
        lines.append(format_fit(est, cfg, *gpu))
    if cfg is not None:
        lines.append(f"What lowers it: {memory_advice(cfg)}")
    lines.append("`--dry-run --gpu-memory GIB` estimates any change; --debug shows the traceback")
    return "\n".join(lines)
