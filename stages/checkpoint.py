"""Output directories and checkpoints.

Layout of a stage's output directory:
    resolved_config.yaml      the config this run used (all paths absolute); each checkpoint keeps a copy, which
                              `--resume` compares with the resuming run's (resume_changes)
    inputs.json               fingerprints of the files and folders that config names (stages/fingerprint.py);
                              each checkpoint keeps a copy too, compared the same way
    .rlhf.lock                flock'ed while a run uses the directory (run_lock)
    .rlhf.workers.lock        flock'ed by rank 0 of the processes an `rlhf` launcher started (run_lock)
    metrics.jsonl, tensorboard/, data_report.json
    tokenizer/                (from_config runs) the tokenizer trained for this run
    checkpoint-00000040/      resumable: ds/ (DeepSpeed engine: weights, optimizer, scheduler), rng/ (per rank),
                              hf/ (HF checkpoint at that step), trainer_state.json, COMPLETE
    final/                    HF checkpoint of the finished run (what the next stage loads)

Every checkpoint is written under `.tmp-<name>` and renamed when complete; a directory without COMPLETE is
never loaded. Before writing, every rank checks its weights are finite (a NaN never reaches a checkpoint); a
write that fails (full disk, read-only or vanished filesystem) removes the half-written directory and raises
CheckpointError saying which complete checkpoint is still there.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from rich.markup import escape
from safetensors import safe_open

from stages import faults
from stages.config import refuse_file
from stages.runtime import atomic_write_text
from stages.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    peer_lost,
    rng_state,
    set_rng_state,
)
from stages.errors import CheckpointError, ConfigError, is_out_of_memory, resume_with, while_doing
from stages.metrics import say
from stages.perf import PROFILE_PREFIX

CHECKPOINT_PREFIX = "checkpoint-"
RUN_ARTIFACTS = (
    "final", "final_critic", "best", "metrics.jsonl", "samples.jsonl", "tensorboard", "tokenizer", "data_report.json",
    "resolved_config.yaml", "inputs.json",
)
#: what `rlhf eval` (and the pipeline's evaluation) writes beside a stage's final/ by default: stale once final/
#: is replaced, so a new final/ (and a fresh start) removes it
EVALUATION_FILES = ("eval.json", "eval.samples.jsonl", "eval.settings.json")
RUN_ARTIFACTS += EVALUATION_FILES


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete resumable checkpoint, oldest first."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name.startswith(CHECKPOINT_PREFIX) and (p / "COMPLETE").is_file():
                try:
                    found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
                except ValueError:
                    continue
    return sorted(found)


def previous_run_contents(out_dir: Path) -> list[str]:
    """Names in `out_dir` showing that a run already trained there: checkpoints, final/, metrics rows."""
    if not out_dir.is_dir():
        return []
    names = []
    for p in sorted(out_dir.iterdir()):
        if p.name.startswith(CHECKPOINT_PREFIX) or p.name == "final":
            names.append(p.name)
        elif p.name == "metrics.jsonl" and p.stat().st_size > 0:
            names.append(p.name)
    return names


def cleared_by_fresh_start(p: Path) -> bool:
    """Whether `clear_run` deletes this entry of an output directory."""
    return p.name.startswith((CHECKPOINT_PREFIX, ".tmp-", PROFILE_PREFIX)) or p.name in RUN_ARTIFACTS


def run_files(out_dir: Path) -> list[Path]:
    """The entries of an output directory that `clear_run` deletes (`cleared_by_fresh_start`), sorted."""
    return sorted(p for p in out_dir.iterdir() if cleared_by_fresh_start(p)) if out_dir.is_dir() else []


def clear_run(out_dir: Path) -> None:
    """Remove everything this tool writes into an output directory (before a fresh start there)."""
    for p in run_files(out_dir):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


LOCK_NAME = ".rlhf.lock"
#: held by rank 0 of the worker processes an `rlhf` launcher started: a launcher killed with kill -9 leaves its
#: workers training, and its own lock went with it
WORKERS_LOCK_NAME = ".rlhf.workers.lock"
ORPHANED = "worker processes of a run whose rlhf command has ended"


def acquire_run_lock(out_dir: Path, name: str = LOCK_NAME) -> Any:
    """An exclusive advisory lock (flock) on out_dir/`name`, held while the returned file stays open (closing it,
    or the process ending, kill -9 included, releases it): a second `rlhf` run there (a job requeued while the
    first still runs, a command started twice) is refused at once (ConfigError naming the holder) instead of
    clearing or loading the first one's checkpoints mid-write; so is one while workers of an earlier run still
    hold .rlhf.workers.lock (their launcher was killed). A filesystem without flock (some network mounts) runs
    unlocked, with a warning."""
    import fcntl
    import socket

    ensure_dir(out_dir)
    try:
        fh = open(out_dir / name, "a+", encoding="utf-8")  # noqa: SIM115 - held by the caller
    except OSError as exc:
        raise ConfigError(f"output_dir {out_dir}: cannot write {name} there ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise in_use_error(out_dir, holder) from None
    except OSError as exc:  # ENOLCK / EOPNOTSUPP: no locking here
        if name == LOCK_NAME:
            say(True, f"[yellow]warning: output_dir {escape(str(out_dir))}: its filesystem refuses file locks "
                      f"({exc.strerror or exc}): nothing stops a second rlhf run from using it at the same time[/]")
        return fh
    if name == LOCK_NAME and (workers := lock_holder(out_dir / WORKERS_LOCK_NAME)) is not None:
        fh.close()
        raise in_use_error(out_dir, f"{workers}: {ORPHANED}")
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return fh


def in_use_error(out_dir: Path, holder: str) -> ConfigError:
    return ConfigError(f"output_dir {out_dir} is in use by another rlhf run ({holder}); wait for it to end, "
                       "stop it, or point output_dir elsewhere")


def lock_holder(path: Path) -> str | None:
    """Who holds the flock on `path` (the text its holder wrote there), or None when nothing does (no such
    file, or no locking on this filesystem); takes nothing and writes nothing."""
    import fcntl

    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:  # no lock file (or unreadable): nothing holds it that we could tell
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        except OSError:
            return None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def check_run_lock(out_dir: Path) -> None:
    """`acquire_run_lock`'s refusals without taking a lock or writing anything (--dry-run)."""
    if (holder := lock_holder(out_dir / LOCK_NAME)) is not None:
        raise in_use_error(out_dir, holder)
    if (workers := lock_holder(out_dir / WORKERS_LOCK_NAME)) is not None:
        raise in_use_error(out_dir, f"{workers}: {ORPHANED}")


@contextlib.contextmanager
def run_lock(out_dir: Path, name: str = LOCK_NAME) -> Iterator[None]:
    """`acquire_run_lock` for the duration of the block (`name`: WORKERS_LOCK_NAME for the workers' own)."""
    fh = acquire_run_lock(out_dir, name)
    try:
        yield
    finally:
        fh.close()


def remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written checkpoints left by a killed run."""
    for p in out_dir.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def run_stage_of(out_dir: Path) -> str | None:
    """The stage ("sft", "train-rm", "ppo") that wrote the newest checkpoint or final/ in `out_dir`, if known."""
    candidates = [path / "hf" for _, path in reversed(complete_checkpoints(out_dir))] + [out_dir / "final"]
    for hf in candidates:
        try:
            return str(json.loads((hf / "rlhf_checkpoint.json").read_text(encoding="utf-8"))["stage"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


#: config keys that may change between a run and its resumption without changing what it trains (output_dir:
#: a run's directory may be moved or copied and resumed there; monitor.*: the collapse monitor only watches,
#: warns, vetoes best/ and stops — a run it stopped is resumed with monitor.action: warn)
RESUME_FREE_KEYS = ("output_dir", "logging.", "train.save_every", "train.save_total_limit", "train.sample_every",
                    "monitor.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested mapping."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def config_changes(before: dict[str, Any], after: Any, stage: str | None = None,
                   moved: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """"key: old -> new" for each config value that differs (RESUME_FREE_KEYS aside). With the `stage`, a key the
    earlier config does not have (one a newer rlhf added) is no change when its value now is the schema's
    default: the earlier run ran without it, i.e. as the default does. A path whose input only `moved`
    (fingerprint.moved_inputs: another path, the same contents; list items as key[i]) is no change either. A
    section null on one side (`data.eval: null`) and set on the other is one line, the whole section
    (`data.eval: None -> {'path': '/d/eval.jsonl', ...}`), not one per key."""
    from stages.config import CONFIG_SCHEMAS, is_default_at

    schema = CONFIG_SCHEMAS.get(stage or "")
    old, new = _flat(before), _flat(after)

    def added_at_default(key: str) -> bool:
        return key not in old and schema is not None and is_default_at(schema, key, new[key])

    def only_moved(key: str) -> bool:
        a, b = old.get(key), new.get(key)
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return all(x == y or f"{key}[{i}]" in moved for i, (x, y) in enumerate(zip(a, b)))
        return key in moved

    # a section null on one side (`data.eval: null`) and set on the other: one line, the whole section
    nulls = {key for side, other in ((old, new), (new, old)) for key, value in side.items()
             if value is None and key not in other and any(k.startswith(key + ".") for k in other)}
    whole = {key: (_at(before, key), _at(after, key)) for key in nulls}
    old, new = {**old, **{k: a for k, (a, _) in whole.items()}}, {**new, **{k: b for k, (_, b) in whole.items()}}
    return [f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}" for key in sorted(old.keys() | new.keys())
            if not key.startswith(RESUME_FREE_KEYS) and old.get(key, "(unset)") != new.get(key, "(unset)")
            and not any(key.startswith(n + ".") for n in nulls) and not added_at_default(key) and not only_moved(key)]


def _at(tree: Any, key: str) -> Any:
    """The value at dotted `key` of a nested mapping (None where it has none)."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _input_keys(stage: str | None) -> Callable[[str], bool] | None:
    """Whether a dotted key of a `stage` config is one its run reads from (InputPath / HubOrPath fields of the
    stage's schema); None without a stage."""
    import re

    from stages.config import CONFIG_SCHEMAS, path_kind_at

    schema = CONFIG_SCHEMAS.get(stage or "")
    if schema is None:
        return None
    return lambda key: path_kind_at(schema, re.sub(r"\[\d+\]$", "", key)) in ("input", "hub_or_path")


def run_inputs(out_dir: Path, config: Any, stage: str | None) -> dict[str, dict[str, str]]:
    """Fingerprints of the files and folders a `stage` run's resolved config (its YAML text, or that parsed) names
    at its input-path keys (stages/fingerprint.py), those inside its own output_dir aside; {} without a stage."""
    import yaml

    from stages.fingerprint import input_fingerprints

    reads = _input_keys(stage)
    if reads is None:
        return {}
    inside = str(out_dir.resolve()) + os.sep
    found = input_fingerprints(yaml.safe_load(config) if isinstance(config, str) else config, reads)
    return {k: v for k, v in found.items() if not (v["path"] + os.sep).startswith(inside)}


def refuse_cleared_inputs(out_dir: Path, config_text: str, stage: str | None) -> None:
    """A fresh start in output_dir deletes what an earlier run wrote there (`clear_run`): an input the config
    names inside one of those (say model.name_or_path: OUTPUT_DIR/checkpoint-N/hf, to restart from a
    checkpoint's weights) would be deleted before the run reads it; a ConfigError naming it instead."""
    import yaml

    from stages.fingerprint import input_paths

    reads = _input_keys(stage)
    if reads is None or not out_dir.is_dir():
        return
    root = out_dir.resolve()
    for key, value in input_paths(yaml.safe_load(config_text), reads).items():
        path = Path(value)
        if path.exists() and path.resolve() == root:  # a stage run's folder, standing for its final/ (a plain
            # model folder, config.json at its top, is read from files a fresh start leaves alone)
            written = sorted(p.name for p in root.iterdir() if cleared_by_fresh_start(p))
            if written and not (root / "config.json").exists():
                raise ConfigError(f"{key} {value} is the output_dir itself, whose run ({', '.join(written[:4])}) a "
                                  "fresh start there deletes first; give this run another output_dir")
            continue
        if not path.exists() or root not in path.resolve().parents:
            continue
        top = root / path.resolve().relative_to(root).parts[0]
        if cleared_by_fresh_start(top):
            raise ConfigError(f"{key} {value} lies in {top}, which a fresh start in output_dir {out_dir} deletes "
                              "(what an earlier run wrote there goes first); copy it out of the output_dir, or "
                              "use another output_dir")


def read_recorded(path: Path) -> Any:
    """A config or inputs record a run left (resolved_config.yaml / inputs.json, parsed; YAML reads JSON too),
    None when it is missing or unreadable."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def recorded_changes(before: Any, recorded: Path, now: Any, inputs: dict[str, dict[str, str]] | None,
                     stage: str | None = None) -> list[str]:
    """How a run of config `now` (parsed) reading `inputs` (this run's, see `run_inputs`) differs from the run
    that left config `before` (parsed; not a mapping: no config to compare) and the inputs.json `recorded`:
    `config_changes`, where a path whose input only moved (the same fingerprint at another path) is no change,
    then "key (path): contents changed" for each input whose fingerprint differs (none for a record older than
    inputs.json)."""
    from stages.fingerprint import fingerprint_changes, moved_inputs

    kept = read_recorded(recorded)
    known = isinstance(kept, dict) and inputs is not None
    moved = moved_inputs(kept, inputs) if known else set()  # type: ignore[arg-type]
    changes = config_changes(before, now, stage, moved) if isinstance(before, dict) else []
    return changes + (fingerprint_changes(kept, inputs) if known else [])


def _zero_stage(tree: Any) -> int:
    section = tree.get("deepspeed") if isinstance(tree, dict) else None
    stage = section.get("zero_stage", 0) if isinstance(section, dict) else 0
    return stage if isinstance(stage, int) else 0


#: a PPO run's LR schedules count optimizer steps: iterations x ppo_epochs x (rollout_batch_size // mini_batch_size)
_PPO_STEPS = ("the LR schedules count optimizer steps (iterations x ppo_epochs x rollout_batch_size // "
              "mini_batch_size): the steps taken would be read against another total")
#: config keys (or sections) whose change no resume can honour, --allow-config-change or not: why
FIXED_ON_RESUME = {
    "deepspeed.precision": "DeepSpeed's optimizer state is laid out for the precision that wrote it",
    "ppo.critic_pretrain_steps": "the iterations run were counted as critic-only or not under the old value",
    "ppo.ppo_epochs": _PPO_STEPS, "train.rollout_batch_size": _PPO_STEPS, "train.mini_batch_size": _PPO_STEPS,
    "model.tokenizer_train": "the tokenizer trained at the run's start is kept in output_dir",
}


class UnresumableChanges(ConfigError):
    """A resume refused for changes no resume can honour (`fixed_changes`, in `fixed`): the pipeline words its
    own refusal from them. (`fixed` has a default, so that the error unpickles when broadcast to every rank:
    `run_on_main`; its value comes back with the instance's attributes.)"""

    def __init__(self, message: str, fixed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fixed = list(fixed)


def fixed_changes(before: dict[str, Any], now: Any) -> list[str]:
    """The changes from config `before` to `now` that no resume can honour (FIXED_ON_RESUME; a ZeRO stage other
    than between 1 and 2, whose optimizer states load into each other), "key: old -> new (why)"; a key only one
    side sets (a record older than it) is left to `config_changes`."""
    old, new = _flat(before), _flat(now)
    fixed = [f"{key}: {old[key]!r} -> {new[key]!r} ({why})" for key in sorted(old.keys() & new.keys())
             for prefix, why in FIXED_ON_RESUME.items()
             if (key == prefix or key.startswith(prefix + ".")) and old[key] != new[key]]
    zero = (old.get("deepspeed.zero_stage"), new.get("deepspeed.zero_stage"))
    if None not in zero and zero[0] != zero[1] and set(zero) != {1, 2}:
        fixed.append(f"deepspeed.zero_stage: {zero[0]} -> {zero[1]} (DeepSpeed loads a checkpoint's optimizer "
                     "state only at its ZeRO stage, or between ZeRO-1 and 2)")
    return fixed


def run_record(out_dir: Path, checkpoint: Path | None) -> Path | None:
    """The record (resolved_config.yaml) of the run a resume continues: the checkpoint's copy, else, for
    checkpoints older than that copy (or a complete run, checkpoint None), output_dir's; None when neither is
    there."""
    places = ([checkpoint] if checkpoint is not None else []) + [out_dir]
    return next((p / "resolved_config.yaml" for p in places if (p / "resolved_config.yaml").is_file()), None)


def resume_changes(out_dir: Path, config_text: str, world_size: int | None,
                   inputs: dict[str, dict[str, str]] | None = None,
                   stage: str | None = None) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint and how resuming it with `config_text` on `world_size` processes differs
    from the run that wrote it: "key: old -> new" for each changed config value (RESUME_FREE_KEYS aside; the
    checkpoint's copy of resolved_config.yaml, else, for checkpoints older than that copy, output_dir's),
    "key (path): contents changed" for each file or folder it reads whose fingerprint differs from the one kept
    in the checkpoint's inputs.json (`inputs`: this run's, see `run_inputs`), and "processes: n -> m".
    (None, []) without a checkpoint.

    Another process count is refused outright (ConfigError) under ZeRO-1/2/3, before or now: the checkpoint
    holds each rank's partition of the optimizer state (at ZeRO-3 of the weights too), which DeepSpeed loads
    only on the process count that wrote it, so no --allow-config-change makes it loadable; so are the changes
    `fixed_changes` finds (another precision, ZeRO stage, PPO step count per iteration, ...)."""
    import yaml

    found = complete_checkpoints(out_dir)
    if not found:
        return None, []
    path = found[-1][1]
    now = yaml.safe_load(config_text)
    saved = run_record(out_dir, path)
    before_cfg = read_recorded(saved) if saved is not None else None  # unreadable: nothing to compare with
    changes = recorded_changes(before_cfg, path / "inputs.json", now, inputs, stage)
    before = saved_world_size(path)
    if world_size is not None and before is not None and before != world_size:
        zero = max(_zero_stage(before_cfg), _zero_stage(now))
        if zero >= 1:
            raise ConfigError(f"--resume: {path.name} was written by {before} process(es) under ZeRO-{zero}, whose "
                              f"optimizer state is partitioned per process; DeepSpeed cannot load it on {world_size}. "
                              f"Resume with {before} process(es), or {_new_run_from(path)}")
        changes.append(f"processes: {before} -> {world_size}")
    fixed = fixed_changes(before_cfg, now) if isinstance(before_cfg, dict) else []
    if fixed:
        raise UnresumableChanges(f"--resume: {path.name} cannot be continued with {'; '.join(fixed)}. "
                                 f"{preset_hint(changes)}Resume with the values it was written with, or "
                                 f"{_new_run_from(path)}", fixed)
    return path, changes


def _new_run_from(checkpoint: Path) -> str:
    """The way out of a resume that cannot continue `checkpoint`: a new run from its weights."""
    return (f"start a new run from its weights (model.name_or_path: {checkpoint / 'hf'}, copied out of this "
            "output_dir or with another output_dir: a fresh start here deletes it)")


def preset_hint(changes: list[str]) -> str:
    """What to say when the changes a resume finds include PPO's preset (a command line without the run's
    `--ppo-max` / `--preset`, which then lists every key the preset set): "That run used preset ppo-max
    (--ppo-max or --preset ppo-max, or ppo.preset in its config): give it again. ", or ""."""
    found = next((m for c in changes if (m := re.match(r"ppo\.preset: '([\w-]+)' -> ", c))), None)
    if found is None:
        return ""
    flag = "--ppo-max or " if found[1] == "ppo-max" else ""
    return f"That run used preset {found[1]} ({flag}--preset {found[1]}, or ppo.preset in its config): give it again. "


def fit_hint(changes: list[str]) -> str:
    """What to say when the changes include train.micro_batch_size (a command line without the run's
    `--fit-micro-batch`, whose choice its record holds): "If that run chose it with --fit-micro-batch, give it
    again (it keeps what the run trained with). ", or ""."""
    if not any(c.startswith("train.micro_batch_size:") for c in changes):
        return ""
    return "If that run chose train.micro_batch_size with --fit-micro-batch, give it again (it keeps what the run " \
           "trained with). "


class OutputPlan(NamedTuple):
    """What `check_output_dir` found: the checkpoint a resume continues (None: a fresh start), the changes it
    carries, and the fingerprints of the run's inputs (None when not resuming: nothing to compare them with)."""

    checkpoint: Path | None
    changes: list[str]
    inputs: dict[str, dict[str, str]] | None


def refuse_request(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """The refusals that need no look inside output_dir (made before its lock creates it)."""
    refuse_file(out_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")


def check_output_dir(out_dir: Path, config_text: str, resume: bool, overwrite: bool, stage: str | None = None,
                     world_size: int | None = None, allow_changes: bool = False) -> OutputPlan:
    """The refusals of `prepare_output_dir`, reading only (what `--dry-run` checks too): an output_dir that is a
    file, --resume with --overwrite, resuming another stage's run, resuming with another config, input contents
    or process count (resume_changes) unless `allow_changes`, another process count under ZeRO, and mixing two
    runs in one output_dir (unless resuming, or told to overwrite)."""
    refuse_request(out_dir, resume, overwrite)
    other = run_stage_of(out_dir) if stage is not None else None
    other = other if other != stage else None  # another stage's run, which no --resume of this one continues
    if resume and other is not None:
        raise ConfigError(f"output_dir {out_dir} holds a `rlhf {other}` run; `rlhf {stage} --resume` cannot "
                          "continue it (point output_dir elsewhere, or pass --overwrite to replace it)")
    checkpoint, changes, inputs = None, [], None
    if resume:
        inputs = run_inputs(out_dir, config_text, stage)
        checkpoint, changes = resume_changes(out_dir, config_text, world_size, inputs, stage)
        if changes and not allow_changes:
            raise ConfigError(f"--resume: this run differs from the one that wrote {checkpoint}: {'; '.join(changes)}. "
                              f"{preset_hint(changes)}{fit_hint(changes)}Resuming continues that run exactly only "
                              "with its config and process count; pass --allow-config-change to continue with these "
                              "changes")
    found = previous_run_contents(out_dir)
    if found and not resume and not overwrite:
        contents = ", ".join(found[:4])
        if other is None:
            raise ConfigError(f"output_dir {out_dir} already holds a run ({contents}); pass --resume to continue it "
                              "or --overwrite to replace it")
        raise ConfigError(f"output_dir {out_dir} already holds a `rlhf {other}` run ({contents}), which `rlhf "
                          f"{stage}` cannot continue; point output_dir elsewhere, or pass --overwrite to replace it")
    if not resume or (checkpoint is None and not (out_dir / "final").exists()):  # prepare_output_dir clears it
        refuse_cleared_inputs(out_dir, config_text, stage)
    return OutputPlan(checkpoint, changes, inputs)


def prepare_output_dir(out_dir: Path, config_text: str, resume: bool, overwrite: bool, stage: str | None = None,
                       world_size: int | None = None, allow_changes: bool = False) -> list[str]:
    """Before a run: `check_output_dir`'s refusals; then clear what an earlier attempt left when starting fresh
    (e.g. a tokenizer trained for other data), and write resolved_config.yaml, which the workers read, and
    inputs.json. Returns the changes a resumed run carries."""
    plan = check_output_dir(out_dir, config_text, resume, overwrite, stage, world_size, allow_changes)
    if not resume or (plan.checkpoint is None and not (out_dir / "final").exists()):
        clear_run(out_dir)  # a resume with nothing to resume is a fresh start: no earlier attempt's leftovers
    ensure_dir(out_dir)
    atomic_write_text(out_dir / "resolved_config.yaml", config_text)
    inputs = plan.inputs if plan.inputs is not None else run_inputs(out_dir, config_text, stage)
    atomic_write_text(out_dir / "inputs.json", json.dumps(inputs, indent=2) + "\n")
    return plan.changes


def restore_run_record(out_dir: Path) -> list[str]:
    """After a resumed attempt that failed (a refusal such as a checkpoint past the run's last step, a data
    error, a crash): put back output_dir's resolved_config.yaml and inputs.json, which `prepare_output_dir`
    rewrote for the attempt, as the newest complete checkpoint keeps them. They then describe what output_dir
    holds (its checkpoints and final/, which the pipeline and `rlhf eval` read them for), not an attempt that
    trained nothing. An attempt that saved a checkpoint first leaves them as they are (the newest checkpoint's
    copies are the attempt's own); so does a checkpoint older than those copies. Returns the names put back."""
    found = complete_checkpoints(out_dir)
    if not found:
        return []
    restored = []
    for name in ("resolved_config.yaml", "inputs.json"):
        kept, current = found[-1][1] / name, out_dir / name
        try:
            if kept.is_file() and (not current.is_file() or current.read_bytes() != kept.read_bytes()):
                atomic_write_text(current, kept.read_text(encoding="utf-8"))
                restored.append(name)
        except OSError:
            continue  # (best effort, on the way out of a failed run)
    return restored


def ensure_dir(path: Path, what: str = "output_dir") -> None:
    """mkdir -p `path`, as a ConfigError naming it when that is impossible (a file in the way, a read-only or
    missing parent, no permission) or when it is not writable."""
    refuse_file(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: not writable")


# --------------------------------------------------------------------------------------------- HF save
def gathered_state_dict(model: torch.nn.Module, dist: DistInfo) -> dict[str, torch.Tensor] | None:
    """Full state dict on rank 0 (None elsewhere): parameters and persistent buffers. ZeRO-3 parameters are
    gathered one at a time, so no rank holds more than one full parameter besides rank 0's CPU copy."""
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.is_main else None
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if dist.is_main:
                out[name] = param.detach().cpu().clone()
    if not dist.is_main:
        return None
    persistent_buffers = set(model.state_dict().keys()) - set(params)
    for name, buf in model.named_buffers():
        if name in persistent_buffers:
            out[name] = buf.detach().cpu().clone()
    return out


#: attribute of a model: its config's values as loaded, for the keys training changed (`keep_in_saved_config`)
SAVED_CONFIG_ATTR = "_rlhf_saved_config"


def keep_in_saved_config(model: torch.nn.Module, key: str, value: Any) -> None:
    """Record that `model.config.<key>` is to be saved as `value` (its value as loaded; the first one recorded
    stays) whatever training sets it to (PPO's dropout 0)."""
    model.__dict__.setdefault(SAVED_CONFIG_ATTR, {}).setdefault(key, value)


@contextlib.contextmanager
def config_as_loaded(model: torch.nn.Module) -> Iterator[None]:
    """Inside: the model's config with the values `keep_in_saved_config` recorded; after: as it was."""
    kept = getattr(model, SAVED_CONFIG_ATTR, {})
    now = {key: getattr(model.config, key) for key in kept}
    for key, value in kept.items():
        setattr(model.config, key, value)
    try:
        yield
    finally:
        for key, value in now.items():
            setattr(model.config, key, value)


def save_hf(model: torch.nn.Module, tokenizer: Any, path: Path, dist: DistInfo, meta: dict[str, Any]) -> None:
    """Save a Hugging Face checkpoint (weights as safetensors, config as loaded — `config_as_loaded` —,
    generation config, tokenizer) that `from_pretrained(path)` loads. Collective under ZeRO-3: every rank must
    call it."""
    state = gathered_state_dict(model, dist)
    if dist.is_main:
        with config_as_loaded(model):
            model.save_pretrained(str(path), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        (path / "rlhf_checkpoint.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def publish_final(out_dir: Path, step: int, dist: DistInfo, part: str = "hf", name: str = "final") -> Path:
    """Make `out_dir/<name>` the HF checkpoint saved with checkpoint `step` (its `part` folder; hard links where
    the filesystem allows, copies otherwise), atomically: built under .tmp-<name>, then renamed."""
    source = out_dir / checkpoint_name(step) / part
    tmp, final = out_dir / f".tmp-{name}", out_dir / name
    if dist.is_main:
        if not (source / "config.json").is_file():
            raise CheckpointError(f"cannot publish the final model: {source} is missing")
        if same_tree(source, final):  # a --resume of a finished run: nothing new, and its evaluation still holds
            barrier()
            return final
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp, copy_function=_link_or_copy)
            replace_dir(tmp, final)
            if name == "final":  # an evaluation of the previous final/ no longer describes this one
                for stale in EVALUATION_FILES:
                    (out_dir / stale).unlink(missing_ok=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not publish {final} from {source}: {describe_failure(exc)}. The checkpoint itself is "
                                  f"complete: resume {resume_with()} to publish it") from None
    barrier()
    return final


def same_tree(a: Path, b: Path) -> bool:
    """Whether folder `b` holds exactly folder `a`'s files with the same bytes (hard links to them, or copies)."""
    if not b.is_dir():
        return False
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all(os.path.samefile(a / f, b / f) or filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def replace_dir(new: Path, target: Path) -> None:
    """Make the complete directory `new` be `target`: an existing `target` is set aside (.tmp-<name>-old) until
    the rename succeeded and put back if it failed, so `target` is never missing after an error."""
    old = target.with_name(f".tmp-{target.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------- resumable
def nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """Name of the first parameter of `module` holding a NaN/inf on this rank (its ZeRO-3 partition), or None."""
    for name, param in module.named_parameters():
        local = getattr(param, "ds_tensor", param)
        if local.numel() and not bool(torch.isfinite(local).all()):
            return name
    return None


def save_checkpoint(
    engine: Any,
    tokenizer: Any,
    out_dir: Path,
    step: int,
    state: dict[str, Any],
    dist: DistInfo,
    keep: int,
    meta: dict[str, Any],
    hf_module: torch.nn.Module | None = None,
    hf_files: dict[str, str] | None = None,
    extra: dict[str, tuple[Any, torch.nn.Module, Any]] | None = None,
    say: Callable[[str], None] | None = None,
) -> Path:
    """A resumable checkpoint at `step`: DeepSpeed engine state (all ranks), each rank's RNG, the HF weights and
    `state` (trainer counters). Written under .tmp-, renamed when complete; then only the newest `keep` stay.
    Refused (CheckpointError, nothing written) when a weight is NaN/inf on any rank; an OSError while writing
    removes the half-written directory and becomes a CheckpointError naming the newest complete checkpoint.

    hf_module: the part of engine.module saved as the HF model (default: all of it); hf_files: extra files
    (name -> text) written into hf/; extra: more engines, name -> (engine, HF module, tokenizer), each saved as
    <name>/ds and <name>/hf (PPO's critic); say: where rank 0 reports a failure to prune old checkpoints."""
    name = checkpoint_name(step)
    tmp, final = out_dir / f".tmp-{name}", out_dir / name
    engines = {"model": engine, **{sub: other for sub, (other, _, _) in (extra or {}).items()}}
    bad = {part: nonfinite_parameter(e.module) for part, e in engines.items()}
    bad = {part: p for part, p in bad.items() if p is not None}
    if all_reduce_sum([float(bool(bad))], dist.device)[0]:
        found = "; ".join(f"{part} parameter {p}" for part, p in bad.items()) or "on another rank"
        raise CheckpointError(f"refusing to save {name}: non-finite weights ({found}). {_intact(out_dir)}")
    try:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(tmp / "ds"), tag="state", client_state={"trainer": state})
        torch.save(rng_state(dist.device), tmp / "rng" / f"rank{dist.rank}.pt")
        faults.maybe_kill("kill-save", step)
        faults.maybe_disk_full(step)
        save_hf(hf_module or engine.module, tokenizer, tmp / "hf", dist, {**meta, "step": step})
        for sub, (other, module, other_tok) in (extra or {}).items():
            other.save_checkpoint(str(tmp / sub / "ds"), tag="state", client_state={})
            save_hf(module, other_tok, tmp / sub / "hf", dist, {**meta, "step": step, "part": sub})
        barrier()  # every rank's files written (the RNG states come after DeepSpeed's own barrier)
        if dist.local_rank == 0:
            sync_tree(tmp)  # this node's writes reach the disk before COMPLETE says they did
        barrier()
        if dist.is_main:
            for file, text in (hf_files or {}).items():
                (tmp / "hf" / file).write_text(text, encoding="utf-8")
            for kept in ("resolved_config.yaml", "inputs.json"):  # what --resume compares with
                if (out_dir / kept).is_file():
                    shutil.copy2(out_dir / kept, tmp / kept)
            body = {"step": step, "world_size": dist.world_size, "time": time.time(), **state}
            (tmp / "trainer_state.json").write_text(json.dumps(body, indent=2), encoding="utf-8")
            (tmp / "COMPLETE").write_text("ok\n", encoding="utf-8")
            sync_tree(tmp, only=("trainer_state.json", "COMPLETE", "resolved_config.yaml", "inputs.json", "hf"))
            replace_dir(tmp, final)
            sync_tree(out_dir, only=())
    except Exception as exc:  # noqa: BLE001 - OSError, or torch.save's RuntimeError wrapping a failed write
        raise _save_failure(exc, tmp, name, out_dir, dist) from exc
    if dist.is_main:
        prune_checkpoints(out_dir, final, keep, say)
    barrier()
    return final


def _save_failure(exc: Exception, tmp: Path, name: str, out_dir: Path, dist: DistInfo) -> Exception:
    """What a rank raises when writing checkpoint `name` into `tmp` failed with `exc`, after removing the partial
    copy. Only a node's local rank 0 removes it while the others may still be writing (a rank that removed it
    made the next one's write fail with a missing directory, whose error came first and named the wrong cause),
    or a rank that has lost a peer. A lost peer is raised as it is (the CLI says "lost contact", the dead
    rank's own error says why), and so is running out of GPU memory (the CLI says what fits); a write failing
    because the folder is gone says another process removed it."""
    gone, lost = not tmp.exists(), peer_lost(exc)
    if dist.local_rank == 0 or lost:
        shutil.rmtree(tmp, ignore_errors=True)
    if lost:
        return exc
    if is_out_of_memory(exc):  # (ZeRO-3 gathers whole parameters to save them): the CLI says what fits
        return while_doing(exc, f"writing {name}")
    if gone:
        return CheckpointError(f"could not write {name} in {out_dir}: its partial copy was removed while this "
                               f"process wrote into it, by another process of this run whose write failed (its "
                               f"error says why). {_intact(out_dir)}")
    removed = "is removed" if dist.local_rank == 0 else \
        f"({tmp.name}) is left to this node's first process, or the next run, to remove"
    return CheckpointError(f"could not write {name} in {out_dir}: {describe_failure(exc)}{_free_space(out_dir)}; "
                           f"the partial copy {removed}. {_intact(out_dir)}")


def prune_checkpoints(out_dir: Path, newest: Path, keep: int, say: Callable[[str], None] | None = None) -> None:
    """Delete all complete checkpoints but `newest` (the one just written, always kept) and the `keep` - 1
    highest-step others. Each is renamed to .tmp-<name> first, so a half-deleted one is never loaded. A failure
    here is a warning through `say`: the new checkpoint is complete and the run goes on."""
    others = [path for _, path in complete_checkpoints(out_dir) if path != newest]
    for old in others[:max(0, len(others) - (keep - 1))]:
        doomed = old.with_name(f".tmp-{old.name}")
        try:
            os.replace(old, doomed)
            shutil.rmtree(doomed)
        except OSError as exc:
            if say is not None:
                say(f"[yellow]warning: could not delete the old checkpoint {old.name} "
                    f"(train.save_total_limit {keep}): {describe_failure(exc)}[/]")


def sync_tree(root: Path, only: tuple[str, ...] | None = None) -> None:
    """fsync every file under `root` (or under its entries named in `only`), then the directories themselves,
    so a crash after a checkpoint's rename cannot leave it marked COMPLETE with missing data. Filesystems that
    refuse fsync on a directory are passed over; a file's failed fsync raises (its data did not reach the disk)."""
    tops = [root / name for name in only] if only is not None else [root]
    for top in tops:
        paths = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        for path in paths:
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)  # a failing file fsync is a failed write: it raises
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    for directory in [root, *(p for top in tops if top.is_dir() for p in top.rglob("*") if p.is_dir())]:
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def describe_failure(exc: BaseException) -> str:
    """An exception in one line, with the OS error underneath a library's wrapper when there is one."""
    text = f"{exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if not isinstance(exc, OSError) and isinstance(cause, OSError):
        text += f" ({cause})"
    return text


def _free_space(path: Path) -> str:
    try:
        return f" [{shutil.disk_usage(path).free / 2**30:.1f} GiB free there]"
    except OSError:
        return ""


def _intact(out_dir: Path) -> str:
    """What a user can resume from after a failed save."""
    found = complete_checkpoints(out_dir)
    if not found:
        return "No earlier complete checkpoint exists in this run."
    return f"The newest complete checkpoint, {found[-1][1].name}, is intact (continue from it {resume_with()})."


def load_latest_checkpoint(
    engine: Any, out_dir: Path, dist: DistInfo, extra_engines: dict[str, Any] | None = None, say: Any = None
) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint that loads into `engine` (and each of `extra_engines` from
    <name>/ds) and this rank's RNG. Returns the trainer state saved with it, or None when there is none.

    A damaged checkpoint under COMPLETE is passed over, reported through `say(text)`, on every rank alike. Every
    rank walks rank 0's list of checkpoints; for each, every rank first opens the files it will read
    (`shard_problems`: DeepSpeed's shared files, its own ZeRO shards, its RNG state) and the ranks exchange what
    they found, so a file damaged or missing on one rank only is caught before any rank enters DeepSpeed's
    loading, whose ZeRO-3 path has collectives of its own (a rank that failed inside it would wait in another
    collective than the others); a failure inside the loading itself is agreed on afterwards. When no
    checkpoint loads, the newest one's error is raised (on every rank alike). A fallback to an older checkpoint
    written under another config than this run's says how they differ (`config_since`): --resume's check before
    the launch compared this run with the newest checkpoint only."""
    first_error: CheckpointError | None = None
    passed_over: list[Path] = []
    for step, path in reversed(broadcast_object(complete_checkpoints(out_dir))):
        found = gather_objects(shard_problems(path, dist.rank, saved_world_size(path)))
        errors = missing_shards(path, found)
        damaged = any(errors)  # a file that does not open or is missing; not a failure inside the loading
        if not damaged:
            try:
                client = _load_engine(engine, path / "ds", path)
                if "trainer" not in client:
                    raise CheckpointError(f"checkpoint {path} has no trainer state for this run")
                for sub, other in (extra_engines or {}).items():
                    _load_engine(other, path / sub / "ds", path)
                error = None
            except CheckpointError as exc:
                error = str(exc)
            errors = gather_objects(error)
            if not any(errors):
                state = dict(client["trainer"])
                rng_file = path / "rng" / f"rank{dist.rank}.pt"
                if rng_file.is_file():
                    set_rng_state(torch.load(rng_file, weights_only=False), dist.device)
                if dist.is_main:
                    set_aside(passed_over, say)
                changed = config_since(path, out_dir) if first_error is not None else []
                if changed and say is not None:
                    say(f"[yellow]warning: {path.name} is not the checkpoint --resume compared this run's config "
                        f"with (the newest, which did not load), and this run differs from it: {'; '.join(changed)}[/]")
                return {"step": step, **state}
        rank, reason = next((r, e) for r, e in enumerate(errors) if e)
        reason += f" (rank {rank})" if dist.world_size > 1 else ""
        first_error = first_error or CheckpointError(reason)
        if damaged:
            passed_over.append(path)
        if say is not None:
            say(f"[yellow]warning: {reason}; trying the previous checkpoint[/]")
    if first_error is not None:
        first_error.every_rank = True  # agreed: printed once
        raise first_error
    return None


def config_since(path: Path, out_dir: Path) -> list[str]:
    """`config_changes` from the config that wrote checkpoint `path` (its copy of resolved_config.yaml) to this
    run's (out_dir's): what a resume that fell back past the newest checkpoint continues with that --resume's
    check, made against the newest, did not see. [] when either file is missing or unreadable."""
    before, now = read_recorded(path / "resolved_config.yaml"), read_recorded(out_dir / "resolved_config.yaml")
    if not isinstance(before, dict) or not isinstance(now, dict):
        return []
    return config_changes(before, now, run_stage_of(out_dir))


def saved_world_size(path: Path) -> int | None:
    """The process count of the run that wrote checkpoint `path` (its trainer_state.json), None if unreadable."""
    try:
        value = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def set_aside(paths: list[Path], say: Any = None) -> None:
    """Rename checkpoints a resume passed over as damaged to <name>.damaged: kept for inspection, never loaded
    again and never counted by train.save_total_limit (which would otherwise keep a damaged higher step over
    the checkpoints the resumed run writes). `rlhf --overwrite` deletes them with the rest of a run."""
    for path in paths:
        target = path.with_name(f"{path.name}.damaged")
        try:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
        except OSError as exc:
            if say is not None:
                say(f"[yellow]warning: could not set the damaged {path.name} aside: {describe_failure(exc)}[/]")
            continue
        if say is not None:
            say(f"[yellow]the damaged checkpoint is kept as {target.name} (never loaded)[/]")


def shard_problems(path: Path, rank: int, saved_world: int | None = None) -> tuple[str | None, list[str]]:
    """What rank `rank` finds of checkpoint `path`'s files it reads (DeepSpeed's shared files, its own ZeRO
    shards, its RNG state, the weights of hf/ that final/ is published from): the first that torch.load cannot
    open (truncated, no zip index; `mmap` reads the archive's structure, not the tensors; a file in torch's older
    non-zip format is only checked to be non-empty) or safetensors cannot (its header, and a length that covers it)
    or that is missing (its RNG state, when the run that wrote the checkpoint had `saved_world` > `rank`
    processes) as "file: error", or None; and the names of its own shards with its rank written as `{rank}`, for
    `missing_shards` to compare across ranks."""
    own, file = f"zero_pp_rank_{rank}_", None
    try:
        files = [f for f in sorted(path.rglob("*.pt")) if f.parent.name != "rng" and
                 ("zero_pp_rank_" not in f.name or own in f.name)]
        shards = [str(f.relative_to(path)).replace(own, "zero_pp_rank_{rank}_") for f in files if own in f.name]
        rng = path / "rng" / f"rank{rank}.pt"  # absent when written by a run with fewer processes: the seed's
        if saved_world is not None and rank < saved_world and not rng.exists():
            file = rng
            raise FileNotFoundError("missing")
        for file in files + ([rng] if rng.exists() else []):
            with open(file, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"
            if zipped:
                torch.load(file, map_location="cpu", mmap=True, weights_only=False)
            elif file.stat().st_size == 0:
                raise OSError("empty file")
        for file in sorted(path.rglob("*.safetensors")):  # hf/ (final/ is published from it): header and length
            with safe_open(str(file), "pt"):
                pass
    except Exception as exc:  # noqa: BLE001 - the zip reader's RuntimeError, pickle errors, OSError
        where = f"{file.relative_to(path)}: " if file is not None else ""
        return f"cannot load checkpoint {path}: {where}{type(exc).__name__}: {exc}", []
    return None, shards


def missing_shards(path: Path, found: list[tuple[str | None, list[str]]]) -> list[str | None]:
    """Per rank, from every rank's `shard_problems`: its own problem, else a ZeRO shard that some other rank
    has (for its own rank) and it lacks, else None."""
    expected = {name for problem, names in found if problem is None for name in names}
    out: list[str | None] = []
    for rank, (problem, names) in enumerate(found):
        lacking = sorted(expected - set(names))
        out.append(problem or (f"cannot load checkpoint {path}: {lacking[0].replace('{rank}', str(rank))}: missing"
                               if lacking else None))
    return out


#: AdamW settings a checkpoint's optimizer state carries but the config decides (see `_load_engine`)
OPTIMIZER_SETTINGS = ("weight_decay", "betas", "eps")


def _load_engine(engine: Any, ds_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """Weights, optimizer and LR-scheduler state of one engine; its client state.

    The optimizer's state dict carries its hyperparameters and the scheduler's its base LRs: loaded as they are,
    a resume with --allow-config-change would keep the old train.lr, weight_decay, adam_betas and adam_eps, and
    DeepSpeed's ZeRO-1/2 and 16-bit optimizers restore the gradient clip they were saved with. So the engine's
    own (built from this run's config) are put back after loading, and each group's LR recomputed as base_lr x
    lr_factor(step); with an unchanged config these are the values loaded, bit for bit."""
    scheduler = getattr(engine, "lr_scheduler", None)
    optimizer = getattr(scheduler, "optimizer", None) or getattr(engine, "optimizer", None)
    settings = [{k: group[k] for k in OPTIMIZER_SETTINGS if k in group}
                for group in getattr(optimizer, "param_groups", None) or []]
    base_lrs = list(getattr(scheduler, "base_lrs", []))
    try:
        load_path, client = engine.load_checkpoint(
            str(ds_dir), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as exc:  # DeepSpeed raises assorted types for missing/corrupt shards
        if is_out_of_memory(exc):  # no damage: the CLI says what fits
            raise while_doing(exc, f"loading {checkpoint}")
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {exc}") from None
    if load_path is None or client is None:
        raise CheckpointError(f"checkpoint {checkpoint} has no DeepSpeed state in {ds_dir.name}/ for this run")
    groups = getattr(optimizer, "param_groups", None) or []  # (load_state_dict made new group dicts)
    for group, own in zip(groups, settings):
        group.update(own)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if base_lrs and lambdas is not None and len(base_lrs) == len(groups):
        scheduler.base_lrs = base_lrs
        for group, base, factor in zip(groups, base_lrs, lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]
    if hasattr(getattr(engine, "optimizer", None), "clip_grad"):  # (DeepSpeed's ZeRO-1/2 or 16-bit optimizer)
        engine.optimizer.clip_grad = engine.gradient_clipping()
    from stages.engine import replay_cpu_adam_steps

    replay_cpu_adam_steps(engine)  # (optimizer offload: its beta^t, which no state dict holds)
    return client
