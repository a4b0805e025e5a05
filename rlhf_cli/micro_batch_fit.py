"""--fit-micro-batch (`rlhf sft|train-rm|ppo`, and `rlhf pipeline` for each training stage): train.micro_batch_size
becomes the largest whose estimated peak (stages/memory.py) fits each GPU, with the same rows per optimizer step,
or, resuming a run, the one that run trained with. The choice is made in the launching process (a worker of the
user's own launcher makes it itself, from --gpu-memory only) and written into the resolved config as `--set`
overrides would be, so the workers, the run's record and a later resume all see it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from rlhf_cli.gpu_memory import FIT_FLAG, estimate_quietly, gpu_memory_for
from stages.errors import ConfigError
from stages.memory import GIB, USABLE_FRACTION, fit_choice, micro_batch_choices, micro_batch_keys, per_rank_batch
from stages.runtime import chosen_accelerator

#: a placeholder micro-batch for PPO's first load when the config's does not divide train.mini_batch_size
#: (`load_to_fit`): 1 divides every mini-batch, and the fit replaces it
DIVIDES_ANY = "train.micro_batch_size=1"

#: the raw DeepSpeed JSON keys that would contradict a fitted micro-batch (stages/engine.py: OWNED_KEYS)
RAW_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def fit_gpu(num_gpus: int | None, hostfile: Path | None, gpu_memory: float | None,
            own_launcher: bool) -> tuple[int, str]:
    """The GPU figure the fit is made for (`gpu_memory_for`); in a worker of the user's own launcher (torchrun,
    srun) only --gpu-memory, so that every rank chooses alike. ConfigError without one."""
    if own_launcher and gpu_memory is None:
        raise ConfigError(f"{FIT_FLAG} in a worker of your own launcher (torchrun, srun) needs --gpu-memory GIB: "
                          "every rank must choose the same micro-batch size")
    gpu = gpu_memory_for(num_gpus, hostfile, gpu_memory)
    if gpu is None:
        why = ("a --hostfile run's workers use other nodes' GPUs" if hostfile is not None else "no CUDA GPU here"
               if chosen_accelerator(os.environ) != "cuda" else "nvidia-smi did not give it")
        raise ConfigError(f"{FIT_FLAG} needs the memory of each GPU ({why}): give --gpu-memory GIB")
    return gpu


def load_to_fit(load: Callable[[list[str]], Any], stage: str, fit: bool) -> tuple[Any, bool]:
    """load([]) — or, for PPO with the fit, whose micro-batch it will choose among the divisors of
    train.mini_batch_size, load([DIVIDES_ANY]) when the config's own does not divide it (or any other error
    the first load raised and the second does not) — and whether the placeholder was needed."""
    try:
        return load([]), False
    except ConfigError as first:
        if not (fit and stage == "ppo"):
            raise
        try:
            return load([DIVIDES_ANY]), True
        except ConfigError:
            raise first from None  # (the config's own error, not one about the placeholder)


def recorded_micro_batch(out_dir: Path, cfg: Any) -> dict[str, int] | None:
    """`micro_batch_keys` of the run in out_dir — the record (resolved_config.yaml) of its newest complete
    checkpoint, else output_dir's own when the run is complete (final/) — when that split gives the rows per
    optimizer step `cfg` asks for (`per_rank_batch`); None otherwise (no such run, or another batch)."""
    from stages.checkpoint import complete_checkpoints, read_recorded, run_record

    found = complete_checkpoints(out_dir)
    if not found and not (out_dir / "final").is_dir():
        return None
    record = run_record(out_dir, found[-1][1] if found else None)  # the one a resume compares (resume_changes)
    tree = read_recorded(record) if record is not None else None
    train = tree.get("train") if isinstance(tree, dict) else None
    micro = train.get("micro_batch_size") if isinstance(train, dict) else None
    if not isinstance(micro, int) or micro not in micro_batch_choices(cfg):
        return None
    keys = micro_batch_keys(cfg, micro)
    accumulation = keys.get("train.gradient_accumulation_steps")
    return keys if accumulation in (None, train.get("gradient_accumulation_steps", 1)) else None


def choose_micro_batch(cfg: Any, world: int, gpu: tuple[int, str], kept_from: Path | None = None,
                       placeholder: bool = False) -> tuple[dict[str, int], str] | None:
    """The config keys (`micro_batch_keys`) and a line saying what was chosen: the run's in `kept_from` when it
    has one of the same rows per step (`recorded_micro_batch`: a resume continues as it ran), else the largest
    of `micro_batch_choices` whose estimated peak fits a GPU of gpu[0] bytes, or 1 (the smallest) when none fits
    (`fit_choice`). None when no estimate can be made (`estimate_quietly`). `placeholder`: cfg's micro-batch is DIVIDES_ANY's, not the config's (`load_to_fit`). ConfigError when a raw DeepSpeed JSON
    sets a batch key (RAW_BATCH_KEYS) that the choice would contradict."""
    from stages.engine import load_raw_deepspeed

    raw = load_raw_deepspeed(cfg.deepspeed.config)
    if any(key in raw for key in RAW_BATCH_KEYS):
        given = ", ".join(key for key in RAW_BATCH_KEYS if key in raw)
        raise ConfigError(f"{FIT_FLAG}: deepspeed.config sets {given}, which the chosen micro-batch would "
                          "contradict; leave the batch sizes to the YAML's train keys")
    t, (rows, keys) = cfg.train, per_rank_batch(cfg)
    same = f"the same {rows} rows per rank per optimizer step ({keys})"
    was = "(the config's does not divide train.mini_batch_size)" if placeholder else str(t.micro_batch_size)
    kept = recorded_micro_batch(kept_from, cfg) if kept_from is not None else None
    if kept is not None:
        split = ", ".join(f"{k} {v}" for k, v in kept.items())
        return kept, (f"{FIT_FLAG}: {split}, as the run in {kept_from} trained with: a resume continues as it ran "
                      f"({same}; --allow-config-change fits it again)")
    est = estimate_quietly(cfg, world)
    if est is None:
        return None
    micro, fitted = fit_choice(est, gpu[0])
    chosen = micro_batch_keys(cfg, micro)
    now: dict[str, Any] = {"train.micro_batch_size": was, "train.gradient_accumulation_steps":
                           getattr(t, "gradient_accumulation_steps", None)}
    change = ", ".join(f"{k} {now[k]} -> {v}" for k, v in chosen.items()).replace(", train.", ", ")
    if not placeholder and chosen["train.micro_batch_size"] == t.micro_batch_size:
        change = f"train.micro_batch_size {t.micro_batch_size} kept"
    peak, usable = est["peak_at_micro_batch"][micro] / GIB, USABLE_FRACTION * gpu[0] / GIB
    room = f"{usable:.3f} GiB ({USABLE_FRACTION:.0%} of {gpu[0] / GIB:.3f} GiB per GPU, {gpu[1]})"
    why = (f"the largest micro-batch whose estimated peak, {peak:.3f} GiB, fits in {room}" if fitted else
           f"no micro-batch fits in {room}: at 1 the estimated peak is {peak:.3f} GiB")
    return chosen, f"{FIT_FLAG}: {change}: {why}; {same}"


#: the pipeline plan's line for a stage whose model an earlier stage has yet to train
LATER = (f"{FIT_FLAG}: chosen when the stage starts, from the config.json of its model, which an earlier stage is "
         "to train")

NO_ESTIMATE = (f"{FIT_FLAG}: no memory estimate can be made for this config (a model's config.json is missing or "
               "unreadable — a hub model not in the local cache, an earlier stage's output not written yet — or "
               "its architecture cannot be built); set train.micro_batch_size yourself")


def as_overrides(keys: dict[str, int], placeholder: bool) -> tuple[list[str], dict[str, str]]:
    """`choose_micro_batch`'s keys as `--set` overrides, after DIVIDES_ANY when the config was loaded with it
    (`load_to_fit`: the config's own micro-batch does not validate), and the flags that name FIT_FLAG in their
    errors (see `load_config`'s `flags`)."""
    return ([DIVIDES_ANY] if placeholder else []) + [f"{k}={v}" for k, v in keys.items()], dict.fromkeys(keys, FIT_FLAG)
