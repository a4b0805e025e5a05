"""The `rlhf` command (Typer). Each stage command loads and validates its YAML config, prints it, then trains
in this process or re-executes itself under the `deepspeed` launcher."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

import typer
from rich.markup import escape
from rich.syntax import Syntax

from rlhf_cli import __version__
from rlhf_cli.config_loader import derived_values, dump_config, load_config, replaced_stage_sets
from rlhf_cli.gpu_memory import gib_per_gpu, gpu_memory_for, out_of_memory_message, report_memory, stage_memory_line
from rlhf_cli.micro_batch_fit import (FIT_FLAG, LATER, NO_ESTIMATE, as_overrides, choose_micro_batch, fit_gpu,
                                      load_to_fit)
from rlhf_cli.output import err, fail, hide_flag_types, out, print_error
from rlhf_cli.launcher import (
    LAUNCHER_STOP_NOTE,
    STOP_FILE,
    check_launch_options,
    check_not_a_bare_srun_task,
    format_command,
    inside_launcher,
    launch_command,
    launch_env,
    launched_by_rlhf,
    local_processes,
    needs_launcher,
    run_launcher,
    world_size,
)
from stages import faults, stop
from stages.pipeline import is_complete
from stages.errors import ConfigError, RlhfError, is_out_of_memory
from stages.runtime import check_worker_env, import_deepspeed_as_workers_would

app = typer.Typer(
    name="rlhf",
    help="RLHF pipeline: supervised fine-tuning, reward model, PPO with the PPO-max tricks (DeepSpeed).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

hide_flag_types()

#: stage name -> "module:function" that trains it inside a process (imported only when needed)
STAGE_RUNNERS = {"sft": "stages.sft:run", "train-rm": "stages.reward:run", "ppo": "stages.ppo.trainer:run"}

# ----------------------------------------------------------------------------- common options (every stage)
ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Stage YAML config. Relative paths in it resolve against its folder.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override a config value: key.path=value (YAML value; repeatable; wins over the file). "
        "Relative paths given here resolve against the current directory.",
        show_default="no overrides",
    ),
]
NumGpusOpt = Annotated[
    Optional[int],
    typer.Option("--num-gpus", min=1, help="Processes (GPUs) per node.", show_default="1, or the hostfile's slots"),
]
NumNodesOpt = Annotated[
    Optional[int],
    typer.Option("--num-nodes", min=1, help="Nodes to use from --hostfile.", show_default="every host in --hostfile, else 1"),
]
HostfileOpt = Annotated[
    Optional[Path],
    typer.Option("--hostfile", help="DeepSpeed hostfile ('hostname slots=N' per line) for multi-node runs.",
                 show_default="this machine only"),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved config, the launch command and a memory estimate, and make "
                 "the run's checks that only read (output_dir, --resume, model kinds, DeepSpeed JSON, the first 20 rows "
                 "of each data file); write nothing, train nothing.", show_default="off")
]
GpuMemoryOpt = Annotated[
    Optional[float], typer.Option(
        "--gpu-memory", callback=gib_per_gpu, metavar="GIB", help="Memory of each GPU in GiB, for the memory "
        "estimate's fit (--dry-run: does the peak fit, and the largest train.micro_batch_size that does; a run warns "
        "before launching when it does not).",
        show_default="nvidia-smi's figure for this node's GPUs, if any (none for a --hostfile run)")
]
FitMicroBatchOpt = Annotated[
    bool, typer.Option(FIT_FLAG, help="Set train.micro_batch_size to the largest whose estimated peak fits 90 % of "
                       "each GPU's memory (--gpu-memory, else nvidia-smi's figure), with the same rows per optimizer "
                       "step (PPO: a divisor of train.mini_batch_size; SFT/RM: gradient_accumulation_steps adjusted); "
                       "1 when none fits. Printed, and kept in the run's resolved config; --resume keeps its run's "
                       "(with --allow-config-change it fits again).", show_default="off")
]
CheckDataOpt = Annotated[
    bool, typer.Option("--check-data", help="A --dry-run that also reads every data row as the run would: parsed, "
                 "tokenized (a from_config model's tokenizer trained in memory), checked (bad rows name their file "
                 "and row); prints the run's data report and step plan. Writes nothing.", show_default="off")
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue from the newest complete checkpoint in output_dir (fresh start if none).",
        show_default="off",
    ),
]
AllowChangeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-config-change",
        help="With --resume: continue even though the config, the contents of a file or folder it reads, or the "
        "process count differs from the run that wrote the checkpoint (the changes are listed; without this flag "
        "they stop the run; another process count stays refused under ZeRO-1/2/3).",
        show_default="off",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Delete what an earlier run wrote in output_dir first (checkpoints, metrics, final/, "
        "tensorboard/, its trained tokenizer).", show_default="off"
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.", show_default="off")]


def _version(value: bool) -> None:
    if value:
        out.print(f"rlhf {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """RLHF pipeline: supervised fine-tuning, reward model, PPO with the PPO-max tricks (DeepSpeed)."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_stage(
    stage: str,
    config: Path,
    overrides: list[str],
    num_gpus: int | None,
    num_nodes: int | None,
    hostfile: Path | None,
    dry_run: bool,
    resume: bool,
    overwrite: bool,
    debug: bool,
    preset: str | None = None,
    allow_changes: bool = False,
    flags: dict[str, str] | None = None,
    check_data: bool = False,
    gpu_memory: float | None = None,
    fit_micro_batch: bool = False,
) -> None:
    """Validate, print, then train here or under the launcher. Errors: message, no traceback, exit code.
    `flags`: override keys a command-line flag set (key -> "--flag"), named in their errors. `check_data`: a dry
    run that also reads the data (stages/pipeline.py: DATA_CHECKS). `gpu_memory`: GiB per GPU for the memory
    estimate's fit (`report_memory`); a worker out of GPU memory says what fits (`out_of_memory_message`).
    `fit_micro_batch`: the config's train.micro_batch_size replaced by the largest that fits, or on --resume by
    its run's (`choose_micro_batch`)."""
    def warn_changes(changes: list[str]) -> None:
        if changes:
            listed = escape("; ".join(changes))
            err.print(f"[yellow]warning: resuming with changes (--allow-config-change): {listed}[/]",
                      highlight=False)

    def show_config() -> None:
        out.rule(f"rlhf {stage}: resolved config")
        out.print(Syntax(text, "yaml", background_color="default", word_wrap=True))
        derived = derived_values(cfg)
        if derived:
            out.print(f"null above, derived: {'; '.join(derived)}", highlight=False)

    def prepare(processes: int) -> None:
        warn_changes(prepare_output_dir(out_dir, text, resume, overwrite, stage, processes, allow_changes))

    dry_run = dry_run or check_data
    cfg = None  # (for the out-of-memory message)
    if allow_changes and not resume and not inside_launcher():
        err.print("[yellow]warning: --allow-config-change has no effect without --resume[/]", highlight=False)
    try:
        check_not_a_bare_srun_task()
        check_worker_env()
        faults.planned_faults()  # (a misspelt RLHF_FAULT now, not at the first step)
        check_launch_options(num_gpus, num_nodes, hostfile)
        if inside_launcher() and dry_run:  # torchrun/srun's workers would otherwise each train
            raise ConfigError("--dry-run and --check-data run in one process: start them without a launcher "
                              "(torchrun, deepspeed; they print the launch command they would use)")
        cfg, placeholder = load_to_fit(lambda extra: load_config(stage, config, overrides + extra, preset=preset,
                                                                 flags=flags), stage, fit_micro_batch)
        # (stages.checkpoint imports torch: after the config's own checks, so that a config error is said at once)
        from stages.checkpoint import (WORKERS_LOCK_NAME, acquire_run_lock, check_output_dir, check_run_lock,
                                       prepare_output_dir, refuse_request, run_files, run_lock)
        processes = _world() if inside_launcher() else world_size(num_gpus, num_nodes, hostfile)
        if (dry_run or fit_micro_batch) and not inside_launcher():  # (their estimate reads DeepSpeed's helpers)
            import_deepspeed_as_workers_would()
        if fit_micro_batch:  # (a resume keeps the micro-batch its run trained with)
            found = choose_micro_batch(cfg, processes, fit_gpu(num_gpus, hostfile, gpu_memory, inside_launcher()),
                                       Path(cfg.output_dir) if resume and not allow_changes else None, placeholder)
            if found is None:
                raise ConfigError(NO_ESTIMATE)
            sets, named = as_overrides(found[0], placeholder)
            cfg = load_config(stage, config, overrides + sets, preset=preset, flags={**(flags or {}), **named})
            if _rank() == 0:
                out.print(escape(found[1]), highlight=False)
        out_dir = Path(cfg.output_dir)
        text = dump_config(cfg)
        if inside_launcher():
            # a worker: of our launcher (the output directory is ready and locked), or of the user's own
            # (torchrun, srun, ...), in which case rank 0 locks it and prepares it first
            if launched_by_rlhf():
                # rank 0 holds the workers' lock: should the launching `rlhf` die by kill -9 (its lock going with
                # it), a new run there is still refused while these processes train
                with run_lock(out_dir, WORKERS_LOCK_NAME) if _rank() == 0 else contextlib.nullcontext():
                    _train_here(stage, cfg, resume, None)
                return
            held = []  # the lock, taken inside rank 0's preparation (whose errors reach every rank) for the run

            def lock_and_prepare() -> None:
                show_config()
                held.append(acquire_run_lock(out_dir))
                prepare(int(os.environ["WORLD_SIZE"]))

            with record_kept_on_failure(out_dir, resume and _rank() == 0):
                _train_here(stage, cfg, resume, lock_and_prepare)
            return
        show_config()
        cmd = env = None
        if needs_launcher(num_gpus, num_nodes, hostfile):
            cmd = launch_command(stage, out_dir / "resolved_config.yaml", num_gpus, num_nodes, hostfile, resume)
            env = launch_env(local_processes(num_gpus, hostfile), out_dir / STOP_FILE if hostfile else None)
        where = format_command(cmd, env) if cmd else "this process (single rank, no launcher)"
        out.print(f"[bold]launch:[/] {escape(where)}", highlight=False, soft_wrap=True)  # ([...] of a --set list)
        from stages.models import check_stage_models
        from stages.sniff import sniff_data

        refuse_uncached_models(stage, cfg, dry_run)
        check_stage_models(stage, cfg)  # a model folder of the wrong kind: one clear error before any launch
        sniff_data(stage, cfg)  # and data of another stage's kind (or format/columns matching no row)
        if _fp16_without_gpu(cfg, num_nodes, hostfile):  # DeepSpeed's CPU accelerator has no fp16
            text_fp16 = "deepspeed.precision: fp16 needs a GPU, and this machine has none; use bf16 or fp32 here"
            if not dry_run:
                raise ConfigError(text_fp16)
            err.print(f"[yellow]warning: {text_fp16} (a run on this machine would be refused)[/]", highlight=False)
        if dry_run:  # every check the run makes before its work that only reads, then the estimate
            _check_deepspeed_json(stage, cfg, processes)
            check_run_lock(out_dir)
            plan = check_output_dir(out_dir, text, resume, overwrite, stage, processes, allow_changes)
            warn_changes(plan.changes)
            if resume and plan.checkpoint is not None:
                out.print(f"resume: from {plan.checkpoint}", highlight=False)
            elif resume and not (out_dir / "final").exists():
                out.print("resume: no complete checkpoint here; the run would start fresh", highlight=False)
            elif overwrite and (found := [p.name for p in run_files(out_dir)]):
                out.print(f"overwrite: the run would first delete what rlhf wrote in {out_dir}: {', '.join(found)}",
                          highlight=False, soft_wrap=True)  # (a path not broken over lines)

            if stage == "ppo":  # the trick table the run prints at start: which keys differ from the preset
                from stages.ppo.trainer import describe_tricks

                out.print(describe_tricks(cfg), highlight=False)
            report_memory(cfg, processes, num_gpus, hostfile, gpu_memory, dry_run=True)
            if check_data:
                from stages.pipeline import check_data as read_data

                out.rule(f"rlhf {stage}: data check")
                read_data(stage, cfg, processes)
            out.print("dry run: nothing trained")
            return
        refuse_request(out_dir, resume, overwrite)  # before the lock creates output_dir
        report_memory(cfg, processes, num_gpus, hostfile, gpu_memory, dry_run=False)
        with run_lock(out_dir), record_kept_on_failure(out_dir, resume):
            prepare(processes)
            if cmd is None:
                _train_here(stage, cfg, resume, None)
                return
            code = run_launcher(cmd, env or {})
            if code == 0 and publishes_final(cfg) and hostfile is None and not is_complete(out_dir, stage):
                # DeepSpeed's runner exits 0 when a launch process was killed by a signal (it passes on positive
                # codes only): success without a published final/. (Not for --hostfile runs: this node's view of a
                # shared filesystem may lag the node that published it.)
                err.print(f"[red]rlhf {stage}: the launcher exited with code 0 but {escape(str(out_dir))} has no "
                          "complete final/ (a launcher process killed by a signal reports success); treated as a "
                          "failure[/]")
                code = 1
            if code in stop.STOPPED_CODES:  # the workers' clean stop, which they have said (and how to continue)
                err.print(f"rlhf {stage}: stopped by a signal (exit code {code}); {escape(LAUNCHER_STOP_NOTE)}",
                          highlight=False)
            elif code != 0:
                err.print(f"[red]rlhf {stage}: the launcher exited with code {code}{escape(stop.killed_note(code))}[/]")
            raise typer.Exit(code)  # (a failure's through record_kept_on_failure)
    except RlhfError as exc:
        if debug:
            raise
        # every rank reads the same config and data, so those errors are printed once; others may be one
        # rank's own (a missing shard, a full disk) and are printed, with the rank, by whichever rank hit them
        if not exc.every_rank and _world() > 1:
            print_error(exc, f"rank {_rank()}")
        elif _rank() == 0:
            print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except RuntimeError as exc:
        from stages.distributed import peer_lost

        if not debug and is_out_of_memory(exc):
            print_error(out_of_memory_message(exc, cfg, gpu_memory), f"rank {_rank()}" if _world() > 1 else "")
            raise typer.Exit(1) from None
        if debug or not peer_lost(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        print_error(f"lost contact with another process of this run, which has probably failed (its own error, "
                    f"or the launcher's line on how it ended, says why; --debug shows this traceback): {first}",
                    f"rank {_rank()}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        raise typer.Exit(130) from None
    finally:
        stop.disarm()  # an in-process run that failed leaves the signal handlers as they were


@contextlib.contextmanager
def record_kept_on_failure(out_dir: Path, resumed: bool) -> Iterator[None]:
    """Around a `resumed` run: when it fails (an error, a non-zero exit), put output_dir's resolved_config.yaml
    and inputs.json back as its newest complete checkpoint keeps them (stages/checkpoint.py:
    restore_run_record), so an attempt refused after its start (a checkpoint past the run's last step) or
    failed before saving leaves no record of a config that trained nothing there — also when another rank's
    failure ends this process from its watcher thread (stages/peer_watch.py: `on_stop`)."""
    from stages.checkpoint import restore_run_record
    from stages.peer_watch import on_stop

    try:
        with on_stop(lambda: restore_run_record(out_dir)) if resumed else contextlib.nullcontext():
            yield
    except BaseException as exc:
        if resumed and not (isinstance(exc, typer.Exit) and exc.exit_code == 0):
            restore_run_record(out_dir)
        raise


def refuse_uncached_models(stage: str, cfg: Any, dry_run: bool, where: str = "") -> None:
    """Offline, a model that is neither a local folder nor in the hub cache (a path typo reads as a hub id):
    a ConfigError before anything launches; a warning in a dry run."""
    from stages.models import uncached_stage_models

    for missing in uncached_stage_models(stage, cfg):
        if not dry_run:
            raise ConfigError(f"{where}{missing}")
        err.print(f"[yellow]warning: {escape(where + missing)} (a run would stop here)[/]", highlight=False)


def publishes_final(cfg: Any) -> bool:
    """Whether a finished run of `cfg` leaves a final/ (PPO's train.checkpoints: false writes none)."""
    return getattr(getattr(cfg, "train", None), "checkpoints", True) is not False


def _fp16_without_gpu(cfg: Any, num_nodes: int | None, hostfile: Path | None) -> bool:
    """fp16 asked of a run on this machine (no hostfile, one node) while it has no CUDA device."""
    if cfg.deepspeed.precision != "fp16" or hostfile or (num_nodes or 1) > 1:
        return False
    import torch

    return not torch.cuda.is_available()


def _check_deepspeed_json(stage: str, cfg: Any, world_size: int) -> None:
    """Build the DeepSpeed JSON the run would (without a GPU's settings), so a `deepspeed.config` that
    contradicts the YAML (train_batch_size, micro-batch, accumulation) is a dry-run error too."""
    from stages.engine import build_deepspeed_config

    if stage == "ppo":
        from stages.ppo.models import engine_train_config

        for lr in (cfg.train.policy_lr, cfg.train.critic_lr):  # the policy's engine and the critic's
            build_deepspeed_config(engine_train_config(cfg, lr), cfg.deepspeed, world_size, False)
    else:
        build_deepspeed_config(cfg.train, cfg.deepspeed, world_size, False)


def _train_here(stage: str, cfg: object, resume: bool, prepare: Callable[[], None] | None) -> None:
    """Run the stage in this process; a failure of this rank's own is first told to the run's other ranks,
    which then stop too (stages/peer_watch.py) rather than wait for it in a collective."""
    module, func = STAGE_RUNNERS[stage].split(":")
    from stages.peer_watch import announce_failure, owns_failure, stop_watch

    try:
        getattr(importlib.import_module(module), func)(cfg, resume=resume, prepare=prepare)
    except BaseException as exc:
        if owns_failure(exc):
            announce_failure(_rank(), _world())
        raise
    finally:
        stop_watch()


# ----------------------------------------------------------------------------- stage commands
def _stage_command(stage: str, doc: str) -> None:
    """Register `rlhf STAGE` with the common options."""

    def command(
        config: ConfigOpt,
        set_: SetOpt = None,
        num_gpus: NumGpusOpt = None,
        num_nodes: NumNodesOpt = None,
        hostfile: HostfileOpt = None,
        dry_run: DryRunOpt = False,
        check_data: CheckDataOpt = False,
        gpu_memory: GpuMemoryOpt = None,
        fit_micro_batch: FitMicroBatchOpt = False,
        resume: ResumeOpt = False,
        allow_config_change: AllowChangeOpt = False,
        overwrite: OverwriteOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        run_stage(stage, config, set_ or [], num_gpus, num_nodes, hostfile, dry_run, resume, overwrite, debug,
                  allow_changes=allow_config_change, check_data=check_data, gpu_memory=gpu_memory,
                  fit_micro_batch=fit_micro_batch)

    command.__doc__ = doc
    command.__name__ = stage.replace("-", "_")
    app.command(name=stage)(command)


_stage_command(
    "sft",
    """Supervised fine-tuning: causal-LM loss on the assistant tokens of demonstrations.

    Writes output_dir/final (a Hugging Face causal LM), resumable checkpoint-*/ directories, metrics.jsonl and TensorBoard logs. Example: [bold]rlhf sft --config configs/tiny/sft.yaml --num-gpus 2[/]
    """,  # noqa: E501 - one line per help paragraph (rich keeps line breaks)
)
_stage_command(
    "train-rm",
    """Reward model: -log sigmoid(r_chosen - r_rejected) on preference pairs, reward read at the last token.

    Starts from an SFT output directory, a hub/local model or from_config. Writes output_dir/final (loads with AutoModelForSequenceClassification, num_labels=1) with reward_stats.json (the eval reward mean/std: the RM's score scale), resumable checkpoint-*/ directories, metrics.jsonl (accuracy, margin, reward mean/std/min/max) and TensorBoard logs. Example: [bold]rlhf train-rm --config configs/tiny/rm.yaml[/]
    """,  # noqa: E501
)


def _ppo_command() -> None:
    """Register `rlhf ppo`: the common options, --ppo-max / --preset, and one flag per PPO-max trick
    (stages/ppo/presets.py: TRICK_FLAGS), each turned into a `--set`-style override that wins over the file."""
    import inspect

    from stages.ppo.presets import PRESET_NAMES, PRESETS, TRICK_FLAGS, flag_overrides

    preset_keys = {key for values in PRESETS.values() for key in values}

    def command(**kwargs: object) -> None:
        common = ("config", "set_", "num_gpus", "num_nodes", "hostfile", "dry_run", "resume", "overwrite", "debug",
                  "allow_config_change", "check_data", "gpu_memory", "fit_micro_batch")
        c = {k: kwargs.pop(k) for k in common}
        ppo_max, preset = kwargs.pop("ppo_max"), kwargs.pop("preset")
        if ppo_max and preset not in (None, "ppo-max"):
            print_error(f"--ppo-max contradicts --preset {preset}")
            raise typer.Exit(2)
        flags = {f.name: kwargs[f.name.replace("-", "_")] for f in TRICK_FLAGS}
        overrides = list(c["set_"] or []) + flag_overrides(flags)  # type: ignore[arg-type]
        run_stage("ppo", c["config"], overrides, c["num_gpus"], c["num_nodes"], c["hostfile"],  # type: ignore[arg-type]
                  c["dry_run"], c["resume"], c["overwrite"], c["debug"], "ppo-max" if ppo_max else preset,  # type: ignore[arg-type]
                  allow_changes=c["allow_config_change"], check_data=c["check_data"],  # type: ignore[arg-type]
                  gpu_memory=c["gpu_memory"], fit_micro_batch=c["fit_micro_batch"],  # type: ignore[arg-type]
                  flags={f.key: f"--{f.name}" for f in TRICK_FLAGS if flags[f.name] is not None})

    def panel(f: object) -> dict[str, object]:
        shown = "config, else preset" if f.key in preset_keys else "config"  # type: ignore[attr-defined]
        return {"help": f"{f.help} [{f.key}]", "show_default": shown, "rich_help_panel": "PPO tricks"}  # type: ignore[attr-defined]

    def opt(name: str, annotation: object, default: object = None) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    params = [
        opt("config", ConfigOpt, inspect.Parameter.empty), opt("set_", SetOpt), opt("num_gpus", NumGpusOpt),
        opt("num_nodes", NumNodesOpt), opt("hostfile", HostfileOpt), opt("dry_run", DryRunOpt, False),
        opt("check_data", CheckDataOpt, False), opt("gpu_memory", GpuMemoryOpt),
        opt("fit_micro_batch", FitMicroBatchOpt, False),
        opt("resume", ResumeOpt, False), opt("allow_config_change", AllowChangeOpt, False),
        opt("overwrite", OverwriteOpt, False), opt("debug", DebugOpt, False),
        opt("ppo_max", Annotated[bool, typer.Option("--ppo-max", help="Same as --preset ppo-max.", show_default="off",
                                                     rich_help_panel="PPO tricks")], False),
        opt("preset", Annotated[Optional[Literal[PRESET_NAMES]], typer.Option(  # type: ignore[valid-type]
            "--preset", help="Trick preset; fills every trick the config leaves unset.",
            show_default="the config's ppo.preset, else vanilla", rich_help_panel="PPO tricks")]),
    ]
    for f in TRICK_FLAGS:
        pname = f.name.replace("-", "_")
        if f.kind is bool:
            option = typer.Option(f"--{f.name}/--no-{f.name}", **panel(f))
            params.append(opt(pname, Annotated[Optional[bool], option]))
        elif isinstance(f.kind, tuple):
            params.append(opt(pname, Annotated[Optional[Literal[f.kind]], typer.Option(f"--{f.name}", **panel(f))]))
        else:
            params.append(opt(pname, Annotated[Optional[f.kind], typer.Option(f"--{f.name}", **panel(f))]))  # type: ignore[valid-type]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = "ppo"
    command.__doc__ = """PPO with the PPO-max tricks: policy from an SFT checkpoint, critic and reward from a reward model.

    Every trick is a config key under ppo: and a flag; a preset (vanilla, moss-release, ppo-max; --ppo-max) fills the keys the config leaves unset, explicit keys and flags win, and the resolved set is printed and saved. Writes output_dir/final (the policy, a Hugging Face causal LM), final_critic/, best/ (best validation reward while the collapse monitor is quiet), resumable checkpoint-*/ directories, metrics.jsonl, samples.jsonl and TensorBoard logs. Example: [bold]rlhf ppo --config configs/tiny/ppo.yaml --ppo-max[/]
    """  # noqa: E501
    app.command(name="ppo")(command)


_ppo_command()


@app.command(name="eval")
def eval_(
    policy: Annotated[Path, typer.Argument(metavar="POLICY", help="Policy checkpoint: a HF causal LM directory or a stage output directory.")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", exists=True, dir_okay=False, help="A PPO config: its reward_model, data (data.eval, else "
        "the validation share rlhf ppo held out of data.train; with data.eval_fraction 0, data.train), generation, "
        "gold reward and seed are the defaults of the options below.",
        show_default="none")] = None,
    reward_model: Annotated[Optional[str], typer.Option("--reward-model", help="Reward model directory.",
                                                         show_default="the config's")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", exists=True, help="Prompt file (JSONL/JSON/CSV/Parquet; "
                       "the formats of rlhf ppo).",
                       show_default="the config's data.eval, else data.train's validation share")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Policy to compare with (win-rates), e.g. "
                                                    "the SFT model.", show_default="none")] = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Reference policy for the KL.",
                                                     show_default="the baseline")] = None,
    gold: Annotated[Optional[Literal["toy"]], typer.Option("--gold", help="Gold judge (toy task).",
                                                           show_default="the config's data.gold_reward")] = None,
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", min=1, help="Use the first N prompts.",
                                                       show_default="all")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Most tokens sampled per "
                              "response.", show_default="the config's, else 128")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature (> 0).", show_default="the config's, else 0.8")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding: the most likely token at each step "
                      "(generation.top_k 1, after the repetition penalty); no KL then: greedy responses are no "
                      "samples of the policy.", show_default="off")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (the same for both policies).",
                                                show_default="the config's, else 0")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per generation batch.")] = 32,
    precision: Annotated[Optional[Literal["fp32", "bf16", "fp16"]], typer.Option(
        "--precision", help="dtype of the models (bf16 halves their memory: a 7B policy, baseline and RM on one GPU).",
        show_default="the config's deepspeed.precision, else fp32")] = None,
    out_file: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Results JSON (samples go beside it as "
                        "*.samples.jsonl); needed when POLICY is no local folder.", show_default="POLICY/eval.json")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a data.* or generation.* key of the PPO config schema: key.path=value (YAML value; "
        "repeatable; wins over --config and the options above), e.g. data.on_bad_row=skip, generation.top_p=1.",
        show_default="none")] = None,
    debug: DebugOpt = False,
) -> None:
    """Evaluate a policy on evaluation prompts: mean RM reward, gold reward (toy task), KL to a reference, length, repetition, and win-rates against a baseline judged by the RM and by gold.

    Example: [bold]rlhf eval runs/tiny/ppo --config configs/tiny/ppo.yaml --baseline runs/tiny/sft[/]
    """  # noqa: E501
    from rlhf_cli.eval_options import eval_settings
    from stages.config import output_file

    try:
        out_path = output_file(out_file, "eval.json")  # (a str: a trailing "/" is seen)
        settings = eval_settings(policy, config, reward_model, prompts, baseline, reference, gold, num_prompts,
                                 max_new_tokens, temperature, seed, batch_size, set_ or [], precision, greedy)
        if out_path is None and not policy.expanduser().is_dir():  # never create a folder named like a typo
            raise ConfigError(f"POLICY {policy}: no such directory here (a hub model needs --out: the results "
                              "go beside a local policy by default)")
        from stages.evaluate import evaluate, print_results  # (torch: seconds, after the checks above)

        out_path = out_path or (policy / "eval.json")
        results = evaluate(settings, out_path)
        print_results(results, out)
        out.print(f"results: {out_path} (samples: {out_path.with_suffix('.samples.jsonl')})", highlight=False)
    except RlhfError as exc:
        fail(exc, debug)
    except RuntimeError as exc:
        if debug or not is_out_of_memory(exc):
            raise
        print_error(f"out of GPU memory: {str(exc).strip()}\nWhat lowers it: a smaller --batch-size (now {batch_size}; "
                    "rlhf pipeline: eval.batch_size), the prompts sampled and scored at once; --precision bf16 (the "
                    "policy, baseline and reward model in 16-bit); --debug shows the traceback")
        raise typer.Exit(1) from None


@contextlib.contextmanager
def stage_errors(config: Path, run: Any) -> Iterator[None]:
    """A ConfigError raised inside, said as one of pipeline `config`'s stage `run`."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"pipeline {config}, stage {run.label} ({run.config} with the pipeline's overrides): "
                          f"{exc}") from None


@app.command()
def pipeline(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (stage config files and output "
                                         "folders). Relative paths in it resolve against its folder.")],
    set_: SetOpt = None,
    num_gpus: NumGpusOpt = None,
    num_nodes: NumNodesOpt = None,
    hostfile: HostfileOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the pipeline and every stage config; print "
                                          "the stage commands and each stage's memory peak per rank; train "
                                          "nothing.", show_default="off")] = False,
    check_data: Annotated[bool, typer.Option("--check-data", help="A --dry-run that also reads every stage's "
                                             "data as its --check-data does, in order; a stage whose input an "
                                             "earlier one will train reads the tokenizer and rendering record that "
                                             "stage would hand on. Give the real run's launcher options.",
                                             show_default="off")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rerun stages whose output is already complete "
                                        "(their old output is replaced).", show_default="off")] = False,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="Let a partial stage resume although its config or process count changed "
        "(passed on to the stage), and keep a complete stage whose config changed.", show_default="off")] = False,
    gpu_memory: Annotated[Optional[float], typer.Option(
        "--gpu-memory", callback=gib_per_gpu, metavar="GIB", help="Memory of each GPU in GiB, passed on to each stage "
        "(its warning before it starts when the memory estimate does not fit).",
        show_default="each stage's own: nvidia-smi's figure for this node's GPUs")] = None,
    fit_micro_batch: Annotated[bool, typer.Option(
        FIT_FLAG, help="Passed on to each training stage: its train.micro_batch_size the largest that fits each "
        "GPU (see rlhf sft --help).", show_default="off")] = False,
    resume: Annotated[bool, typer.Option("--resume", hidden=True)] = False,  # (the stages' flag, refused: see below)
    debug: DebugOpt = False,
) -> None:
    """SFT → reward model → PPO run(s) → eval against SFT → report, each stage's output wired into the next.

    Each stage runs as its own rlhf process with the launcher options given here; a stage whose output_dir holds a complete final/ is skipped (unless --force; refused if its config changed since), a partial one resumes; once SFT or the RM is retrained, the later stages are trained afresh. The hand-off is checked before each stage (causal LM + tokenizer with pad/EOS from SFT; one-label classifier with the same vocabulary from the RM). Ends with a summary table (SFT eval loss, RM accuracy, PPO reward / gold reward / KL before → after), output_dir/summary.md and summary.json, and output_dir/report/. Example: [bold]rlhf pipeline --config configs/tiny/pipeline.yaml[/]
    """  # noqa: E501
    from stages.pipeline import ACTION_NOTES, eval_plan, override_flags, plan, run_pipeline, stage_actions
    from stages.sniff import sniff_data

    try:
        if resume:  # a stage command's flag, which a user may well try here
            raise ConfigError("rlhf pipeline has no --resume: run the same command again, and it resumes by itself "
                              "(a complete stage is skipped, a partial one resumes from its newest checkpoint; "
                              "--force redoes complete stages)")
        check_not_a_bare_srun_task()
        check_worker_env()
        if inside_launcher():  # each worker would run the whole pipeline, its stages' processes joining up
            raise ConfigError("rlhf pipeline starts each stage as a process of its own, launched with its "
                              "--num-gpus / --num-nodes / --hostfile: run it as one process, not under a "
                              "launcher (torchrun, srun -n N)")
        cfg = load_config("pipeline", config, set_ or [])
        for note in replaced_stage_sets(config, set_ or []):
            err.print(f"[yellow]warning: {escape(note)}[/]", highlight=False)
        runs = plan(cfg)
        processes = world_size(num_gpus, num_nodes, hostfile)
        gpu = fit_gpu(num_gpus, hostfile, gpu_memory, own_launcher=False) if fit_micro_batch else None
        resolved = {}  # what each stage will resolve its config to: a complete stage's must not have changed
        loaded: dict[str, Any] = {}
        fit_lines: dict[str, str] = {}
        fit_sets: dict[str, list[str]] = {}  # each stage's --fit-micro-batch choice as --set overrides
        refit: dict[str, Callable[[], Any]] = {}  # the fresh choice, for a stage that will be trained afresh

        def load(run: Any, extra: list[str], named: dict[str, str] | None = None, architecture: bool = True) -> Any:
            return load_config(run.stage, run.config, run.overrides + extra, preset=run.preset, not_yet=run.not_yet,
                               flags={**override_flags(run), **(named or {})}, architecture=architecture)

        # every stage config must validate before anything trains: first all but their from_config architectures
        # (whose check imports transformers: seconds), so that a typo in the last stage's is said at once
        for run in runs:
            with stage_errors(config, run):
                load_to_fit(functools.partial(load, run, architecture=False), run.stage, fit_micro_batch)
        for run in runs:
            with stage_errors(config, run):
                loaded[run.label], placeholder = load_to_fit(functools.partial(load, run), run.stage, fit_micro_batch)
                if gpu is not None and run.stage in STAGE_RUNNERS:  # as the stage will choose it (`run_stage`)
                    out_dir = Path(loaded[run.label].output_dir)  # (a complete stage, or one resumed as it ran)
                    keep = not force and (is_complete(out_dir, run.stage) or not allow_config_change)
                    found = choose_micro_batch(loaded[run.label], processes, gpu, out_dir if keep else None,
                                               placeholder)
                    if found is None and not run.not_yet:
                        raise ConfigError(NO_ESTIMATE)
                    if found is None:
                        fit_sets[run.label] = as_overrides({}, placeholder)[0]
                        fit_lines[run.label] = LATER
                    else:
                        refit[run.label] = functools.partial(choose_micro_batch, loaded[run.label], processes, gpu,
                                                             None, placeholder)
                        fit_sets[run.label], named = as_overrides(found[0], placeholder)
                        loaded[run.label], fit_lines[run.label] = load(run, fit_sets[run.label], named), found[1]
            resolved[run.label] = dump_config(loaded[run.label])
        launch = [str(a) for a in (["--num-gpus", num_gpus] if num_gpus else []) + (["--num-nodes", num_nodes] if
                  num_nodes else []) + (["--hostfile", hostfile.resolve()] if hostfile else []) + (["--debug"] if debug else [])
                  + (["--allow-config-change"] if allow_config_change else [])
                  + (["--gpu-memory", gpu_memory] if gpu_memory is not None else [])
                  + ([FIT_FLAG] if fit_micro_batch else [])]
        out.rule("rlhf pipeline: plan")
        actions = stage_actions(runs, force, resolved, allow_config_change)  # (a changed complete stage: refused)
        for act in actions:
            why = (" (--force)" if force else " (an earlier stage is retrained)") if act.action == "retrain" else ""
            what = ACTION_NOTES[act.action] + why + (" although its config changed" if act.kept else "")
            out.print(f"[bold]{act.run.label}[/] ({what}): " + escape(format_command(act.command(launch), {})),
                      highlight=False, soft_wrap=True)
            if act.action != "skip" and act.run.label in fit_lines:
                line = fit_lines[act.run.label]
                if act.action == "retrain":  # afresh: not as its earlier run trained (its model may be retrained)
                    again = refit[act.run.label]() if act.run.label in refit else None
                    line = again[1] if again else LATER
                out.print(f"  {escape(line)}", highlight=False)
        for line in eval_plan(cfg, actions, loaded):
            out.print(f"[bold]eval[/] {escape(line)}", highlight=False, soft_wrap=True)
        if cfg.report:
            out.print(f"[bold]report[/] {escape(str(Path(cfg.output_dir) / 'report'))} and summary.md", highlight=False)
        if dry_run or check_data:
            later = {a.run.label for a in actions if fit_micro_batch and (a.action == "retrain" or
                                                                          fit_lines.get(a.run.label) == LATER)}
            show_pipeline_memory(actions, loaded, processes,
                                 functools.partial(gpu_memory_for, num_gpus, hostfile, gpu_memory), later)
        for act in actions:  # every stage that will train reads data of its kind: before the first one trains
            if act.action != "skip":  # (an earlier stage's output, wired in, is an absolute path: no hub id)
                refuse_uncached_models(act.run.stage, loaded[act.run.label], dry_run or check_data,
                                       f"pipeline stage {act.run.label}: ")
                try:
                    sniff_data(act.run.stage, loaded[act.run.label])
                except RlhfError as exc:
                    raise type(exc)(f"pipeline stage {act.run.label}: {exc}") from None
        if check_data:
            import tempfile

            from stages.pipeline import check_pipeline_data

            def load_stand_in(run: Any, overrides: list[str]) -> Any:
                return load_config(run.stage, run.config, overrides + fit_sets.get(run.label, []), preset=run.preset,
                                   not_yet=run.not_yet, flags=override_flags(run))

            with tempfile.TemporaryDirectory(prefix="rlhf-check-data-") as scratch:
                check_pipeline_data(actions, processes, load_stand_in, out.rule, Path(scratch))
        if dry_run or check_data:
            out.print(f"dry run: every config is valid{'; the data too' if check_data else ''}; nothing trained")
            return
        run_pipeline(cfg, launch, force, out, resolved, allow_config_change, actions)
    except RlhfError as exc:
        fail(exc, debug)


def show_pipeline_memory(actions: list[Any], loaded: dict[str, Any], processes: int,
                         gpu_figure: Callable[[], tuple[int, str] | None], chosen_at_start: set[str]) -> None:
    """`rlhf pipeline --dry-run`'s memory part: one line per stage to train (`stage_memory_line`), a stage whose
    model an earlier one will write estimated with that one's architecture (`estimate_configs`), with its fit to
    the GPU (`gpu_figure()`, asked only when a stage is to train); for the stages in `chosen_at_start`, whose
    micro-batch --fit-micro-batch chooses when they start, at the micro-batch it would choose from that estimate."""
    from stages.memory import GIB, USABLE_FRACTION
    from stages.pipeline import estimate_configs

    configs = estimate_configs(actions, loaded)
    if not configs:  # every stage complete: nothing will be trained
        return
    out.rule("rlhf pipeline: memory per rank")
    gpu = gpu_figure()
    if gpu is not None:
        out.print(f"GPU memory: {gpu[0] / GIB:.3f} GiB per GPU ({gpu[1]}); a peak may fill {USABLE_FRACTION:.0%} "
                  "of it", highlight=False)
    for label, (cfg, stand_ins) in configs.items():
        line = stage_memory_line(label, cfg, processes, gpu, stand_ins, label in chosen_at_start)
        out.print(escape(line), highlight=False, soft_wrap=True)
    out.print("(arithmetic estimates, see stages/memory.py; a stage's own --dry-run lists their parts and the "
              "micro-batch that fits)", highlight=False)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR", exists=True, file_okay=False, help="Run output directories "
                                                   "(metrics.jsonl); names ending in "
                                                   "-seedN are averaged as one group.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where the PNGs and report.md go.",
                                                    show_default="report/ next to the first run")] = None,
    smooth: Annotated[float, typer.Option("--smooth", min=0.0, max=0.99, help="EMA smoothing of training curves "
                                          "(0 = none).")] = 0.0,
    x_axis: Annotated[str, typer.Option("--x-axis", metavar="policy|iteration", help="PPO curves over `policy` "
                                        "iterations (a run's critic-only iterations, PPO-max's critic pre-training, "
                                        "at x <= 0, so runs line up at the same number of policy updates) or over "
                                        "the logged `iteration`.")] = "policy",
    debug: DebugOpt = False,
) -> None:
    """PNG plots of reward, gold reward, KL, response length, perplexity and clip fractions, overlaying several runs (seeds as mean and min-max band), plus report.md and report.json.

    Example: [bold]rlhf report runs/reproduce/vanilla-seed* runs/reproduce/ppo-max-seed* --out runs/reproduce/report[/]
    """  # noqa: E501
    from stages.report import write_report

    try:
        result = write_report(run_dirs, out_dir or run_dirs[0].resolve().parent / "report", smooth, x_axis)
    except RlhfError as exc:
        fail(exc, debug)
    out.print(f"wrote {len(result['png'])} plots and {result['markdown']}", highlight=False)


from rlhf_cli.bench_cmd import bench_app  # noqa: E402 - registered after the stage commands, listed after them

app.add_typer(bench_app, name="bench")


@app.command()
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.", show_default="off")] = False,
) -> None:
    """Versions of Python, torch, transformers, DeepSpeed, CUDA and the GPUs (paste it into bug reports)."""
    from rlhf_cli.env_info import collect_env, print_env

    info = collect_env()
    print_env(info, as_json, out)


def main() -> None:
    """The `rlhf` command. A usage error (an unknown option, a value out of range) is one `error:` line with a
    pointer to --help, exit 2, like every other error, rather than click's boxed usage text."""
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click import exceptions as cli
    except ImportError:  # pragma: no cover - older typer: click itself
        from click import exceptions as cli  # type: ignore[no-redef]

    try:
        code = app(prog_name="rlhf", standalone_mode=False)
    except getattr(cli, "NoArgsIsHelpError", ()) as exc:  # `rlhf` or a group alone: its help
        exc.show()
        code = exc.exit_code
    except cli.UsageError as exc:
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        print_error(f"{exc.format_message()}{where}")
        code = exc.exit_code
    except cli.ClickException as exc:  # e.g. a file argument that cannot be opened
        print_error(exc.format_message())
        code = exc.exit_code
    except (typer.Abort, getattr(cli, "Abort", typer.Abort)):  # Ctrl-C outside a stage's own handling
        print_error("interrupted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
