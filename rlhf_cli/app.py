"""The `rlhf` command (Typer). Each stage command loads and validates its YAML config, prints it, then trains
in this process or re-executes itself under the `deepspeed` launcher."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.syntax import Syntax

from rlhf_cli import __version__
from rlhf_cli.config_loader import dump_config, load_config
from rlhf_cli.launcher import format_command, inside_launcher, launch_command, needs_launcher, run_launcher
from stages.errors import ConfigError, RlhfError

app = typer.Typer(
    name="rlhf",
    help="RLHF pipeline: supervised fine-tuning, reward model, PPO with the PPO-max tricks (DeepSpeed).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)

#: stage name -> "module:function" that trains it inside a process (imported only when needed)
STAGE_RUNNERS = {"sft": "stages.sft:run"}

# ----------------------------------------------------------------------------- common options (every stage)
ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Stage YAML config. Relative paths in it resolve against its folder.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="Override a config value: key.path=value (YAML value; repeatable; wins over the file). "
        "Relative paths given here resolve against the current directory.",
        show_default="no overrides",
    ),
]
NumGpusOpt = Annotated[
    Optional[int],
    typer.Option("--num-gpus", min=1, help="Processes (GPUs) per node.", show_default="1, or the hostfile's slots"),
]
NumNodesOpt = Annotated[int, typer.Option("--num-nodes", min=1, help="Nodes to use from --hostfile.")]
HostfileOpt = Annotated[
    Optional[Path],
    typer.Option("--hostfile", help="DeepSpeed hostfile ('hostname slots=N' per line) for multi-node runs.",
                 show_default="this machine only"),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved config and launch command; do not train.", show_default="off")
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue from the newest complete checkpoint in output_dir (fresh start if none).",
        show_default="off",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Delete an earlier run's checkpoints and metrics in output_dir first.", show_default="off"
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


def run_stage(
    stage: str,
    config: Path,
    overrides: list[str],
    num_gpus: int | None,
    num_nodes: int,
    hostfile: Path | None,
    dry_run: bool,
    resume: bool,
    overwrite: bool,
    debug: bool,
) -> None:
    """Validate, print, then train here or under the launcher. Errors: message, no traceback, exit code."""
    try:
        cfg = load_config(stage, config, overrides)
        if inside_launcher():
            _train_here(stage, cfg, resume)
            return
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one")
        out_dir = Path(cfg.output_dir)
        resolved = out_dir / "resolved_config.yaml"
        text = dump_config(cfg)
        out.rule(f"rlhf {stage}: resolved config")
        out.print(Syntax(text, "yaml", background_color="default", word_wrap=True))
        launch = needs_launcher(num_gpus, num_nodes, hostfile)
        cmd = launch_command(stage, resolved, num_gpus, num_nodes, hostfile, resume) if launch else None
        out.print(
            f"[bold]launch:[/] {format_command(cmd)}" if cmd else "[bold]launch:[/] this process (single rank, no launcher)",
            highlight=False,
            soft_wrap=True,
        )
        if dry_run:
            out.print("dry run: nothing trained")
            return
        _prepare_output_dir(out_dir, resolved, text, resume, overwrite)
        if cmd is not None:
            procs = (num_gpus or 1) * num_nodes
            code = run_launcher(cmd, procs)
            if code != 0:
                err.print(f"[red]rlhf {stage}: the launcher exited with code {code}[/]")
            raise typer.Exit(code)
        _train_here(stage, cfg, resume)
    except RlhfError as exc:
        if debug:
            raise
        if _rank() == 0:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        raise typer.Exit(130) from None


def _prepare_output_dir(out_dir: Path, resolved: Path, text: str, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one output_dir; write resolved_config.yaml (the workers read it)."""
    from stages.checkpoint import atomic_write_text, clear_run, previous_run_contents

    found = previous_run_contents(out_dir)
    if found and not resume:
        if not overwrite:
            raise ConfigError(
                f"output_dir {out_dir} already holds a run ({', '.join(found[:4])}); "
                "pass --resume to continue it or --overwrite to replace it"
            )
    if overwrite:
        clear_run(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(resolved, text)


def _train_here(stage: str, cfg: object, resume: bool) -> None:
    module, func = STAGE_RUNNERS[stage].split(":")
    getattr(importlib.import_module(module), func)(cfg, resume=resume)


# ----------------------------------------------------------------------------- stage commands
@app.command()
def sft(
    config: ConfigOpt,
    set_: SetOpt = None,
    num_gpus: NumGpusOpt = None,
    num_nodes: NumNodesOpt = 1,
    hostfile: HostfileOpt = None,
    dry_run: DryRunOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Supervised fine-tuning: causal-LM loss on the assistant tokens of demonstrations.

    Writes output_dir/final (a Hugging Face checkpoint), resumable checkpoint-*/ directories, metrics.jsonl
    and TensorBoard logs. Example: [bold]rlhf sft --config configs/tiny/sft.yaml --num-gpus 2[/]
    """
    run_stage("sft", config, set_ or [], num_gpus, num_nodes, hostfile, dry_run, resume, overwrite, debug)


@app.command()
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Versions of Python, torch, transformers, DeepSpeed, CUDA and the GPUs (paste it into bug reports)."""
    from rlhf_cli.env_info import collect_env, print_env

    info = collect_env()
    print_env(info, as_json, out)


def main() -> None:
    app(prog_name="rlhf")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
