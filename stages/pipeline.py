"""`rlhf pipeline`: SFT -> reward model -> PPO run(s) -> eval -> report, each stage's output feeding the next.

    output_dir/sft        rlhf sft        (model: the SFT config's)
    output_dir/rm         rlhf train-rm   model.name_or_path = output_dir/sft
    output_dir/<run>      rlhf ppo        model.name_or_path = output_dir/sft, reward_model.name_or_path = output_dir/rm
                                          (one per ppo_runs entry and seed: <name> or <name>-seed<S>)
    output_dir/<run>/eval.json            rlhf eval of the run's final (or best, eval.policy) policy against
                                          output_dir/sft
    output_dir/report/    rlhf report over the PPO runs
    output_dir/summary.md (and .json)     the summary table printed at the end

Each stage (and each `rlhf eval`) runs as its own `rlhf` process (so the launcher options apply to a stage, and a
crash leaves the pipeline's own process to report it). A stage whose output holds a complete final/ is skipped
unless `force`; one that holds a partial run resumes from its newest checkpoint. Before a stage starts, the
checkpoint it receives is checked: a causal LM with its tokenizer (pad and EOS set) from SFT, a one-label sequence
classifier sharing the SFT vocabulary from the RM.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape

from stages.config import PIPELINE_SUMMARY_FILES, PIPELINE_WIRING, PipelineConfig, set_key
from stages.errors import PIPELINE_STAGE_VAR, CheckpointError, ConfigError, RlhfError
from stages.runtime import call_forwarding_signals
from stages.stop import STOPPED_CODES, killed_note


@dataclass
class StageRun:
    """One `rlhf <stage>` process of the pipeline."""

    label: str  # sft, rm, or a PPO run's folder name
    stage: str  # sft | train-rm | ppo
    config: Path
    out: Path
    overrides: list[str]
    preset: str | None = None
    not_yet: set[str] = field(default_factory=set)  # path keys naming outputs of earlier stages


def plan(cfg: PipelineConfig) -> list[StageRun]:
    """The stage processes, in order, with the wiring overrides (absolute paths)."""
    root = Path(cfg.output_dir)
    sft, rm = root / "sft", root / "rm"
    runs = [
        StageRun("sft", "sft", Path(cfg.sft.config), sft, [f"output_dir={sft}", *cfg.sft.set]),
        StageRun("rm", "train-rm", Path(cfg.rm.config), rm,
                 [f"output_dir={rm}", f"model.name_or_path={sft}", *cfg.rm.set], not_yet={"model.name_or_path"}),
    ]
    wired = [f"model.name_or_path={sft}", f"reward_model.name_or_path={rm}"]
    for r in cfg.ppo_runs or [None]:
        name, preset, extra, seeds = ("ppo", None, [], []) if r is None else (r.name, r.preset, r.set, r.seeds)
        for seed in seeds or [None]:
            label = name if seed is None else f"{name}-seed{seed}"
            out = root / label
            # a run's own preset replaces the ppo stage's `set: [ppo.preset=...]`, as it replaces the PPO config's
            shared = [x for x in cfg.ppo.set if preset is None or set_key(x) != "ppo.preset"]
            sets = [f"output_dir={out}", *wired, *shared, *extra] + ([] if seed is None else [f"seed={seed}"])
            runs.append(StageRun(label, "ppo", Path(cfg.ppo.config), out, sets, preset,
                                 {"model.name_or_path", "reward_model.name_or_path"}))
    return runs


def override_flags(run: StageRun) -> dict[str, str]:
    """`load_config`'s flags for the keys of `run`'s overrides, so that an error there names the pipeline, not
    --set: the keys the pipeline itself sets (PIPELINE_WIRING; a stage's own `set` list may not give them), and
    every other one, which a `set:` list of the pipeline (or a run's `seeds:`) gave."""
    wired = {key: f"the pipeline ({said})" for key, said in PIPELINE_WIRING.items()
             if key == "output_dir" or key in run.not_yet}
    return {set_key(item): "a set: list of the pipeline" for item in run.overrides} | wired


#: each stage's `--check-data` (module:function(cfg, world_size)): its data read as its run reads it, nothing
#: written; SFT's and the RM's return (tokenizer, rendering record), what their runs hand on
DATA_CHECKS = {"sft": "stages.sft:check_data", "train-rm": "stages.reward:check_data",
               "ppo": "stages.ppo.trainer:check_data"}


def check_data(stage: str, cfg: Any, world_size: int) -> Any:
    """Run `stage`'s data check (DATA_CHECKS) on `cfg` for `world_size` ranks."""
    import importlib

    module, func = DATA_CHECKS[stage].split(":")
    return getattr(importlib.import_module(module), func)(cfg, world_size)


def check_pipeline_data(actions: list[StageAction], world_size: int, load: Callable[[StageRun, list[str]], Any],
                        heading: Callable[[str], None], scratch: Path) -> None:
    """`rlhf pipeline --check-data`: every stage's data check, in order (`load(run, overrides)` gives its
    config). A stage that reads the output of an earlier stage the pipeline will (re)train — any action but
    "skip" in `actions`, as `stage_actions` decided for the run — reads a stand-in folder in `scratch`
    instead, holding what that stage's check returned: the tokenizer its run would save and the rendering record
    it would write. So the RM's pairs and PPO's prompts are tokenized, and PPO's rendering checked, as they will
    be; nothing is written to the pipeline's folders. An error names its stage, and a stage output for a
    stand-in's path."""
    stand_ins: dict[str, str] = {}  # the output folder of a stage still to be trained -> its stand-in
    for act in actions:
        run = act.run
        heading(f"{run.label}: data check")
        overrides = [_stand_in(item, stand_ins) for item in run.overrides]
        try:
            handed = check_data(run.stage, load(run, overrides), world_size)
        except RlhfError as exc:
            text = str(exc)
            for out, folder in stand_ins.items():
                text = text.replace(folder, f"{out} (which this run trains first: what it would hand on)")
            raise type(exc)(f"pipeline stage {run.label}: {text}") from None
        if run.stage != "ppo" and act.action != "skip":
            tokenizer, rendering = handed
            folder = scratch / run.label
            tokenizer.save_pretrained(str(folder))
            (folder / "rlhf_checkpoint.json").write_text(json.dumps({"rendering": rendering}), encoding="utf-8")
            stand_ins[str(run.out)] = str(folder)


def _stand_in(override: str, stand_ins: dict[str, str]) -> str:
    """`key=value` with a value that names a stand-in's stage output replaced by the stand-in.

    >>> _stand_in("model.name_or_path=/r/sft", {"/r/sft": "/tmp/s/sft"}), _stand_in("seed=3", {})
    ('model.name_or_path=/tmp/s/sft', 'seed=3')
    """
    key, _, value = override.partition("=")
    return f"{key}={stand_ins[value]}" if value in stand_ins else override


def will_train(run: StageRun, force: bool, upstream_retrained: bool) -> bool:
    """Whether the pipeline (re)trains `run` rather than skipping it: `force`, an earlier SFT or RM stage
    (re)trained in this pipeline run (`upstream_retrained`), or its output not complete."""
    return force or upstream_retrained or not is_complete(run.out, run.stage)


def is_complete(out: Path, stage: str) -> bool:
    """A stage's output is complete once final/ is published (it is renamed into place when whole) and, for
    PPO, final_critic/ too (published after final/)."""
    parts = ("final", "final_critic") if stage == "ppo" else ("final",)
    return all((out / part / "config.json").is_file() for part in parts)


def stage_command(run: StageRun, launch: list[str], resume: bool, overwrite: bool) -> list[str]:
    """The `rlhf <stage>` command line of `run`."""
    cmd = [sys.executable, "-m", "rlhf_cli", run.stage, "--config", str(run.config)]
    for item in run.overrides:
        cmd += ["--set", item]
    if run.preset:
        cmd += ["--preset", run.preset]
    if not resume:  # it only qualifies a resume
        launch = [a for a in launch if a != "--allow-config-change"]
    return cmd + launch + (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])


# --------------------------------------------------------------------------------------------- hand-off
def _load_handoff(path: Path, what: str) -> tuple[Any, Any]:
    from transformers import AutoConfig

    from stages.models import load_tokenizer

    final = path / "final"
    try:
        return AutoConfig.from_pretrained(final), load_tokenizer(str(final))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what} output {final} does not load: {exc}") from None


def check_policy_handoff(path: Path) -> None:
    """The SFT output: a causal LM whose tokenizer has EOS and pad ids within the embedding."""
    config, tok = _load_handoff(path, "SFT")
    arch = (config.architectures or ["?"])[0]
    if not arch.endswith("ForCausalLM"):
        raise CheckpointError(f"SFT output {path}/final is a {arch}, not a causal LM")
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise CheckpointError(f"SFT output {path}/final: its tokenizer has no EOS or pad token")
    vocab = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
    if len(tok) > vocab:
        raise CheckpointError(f"SFT output {path}/final: tokenizer has {len(tok)} tokens, the model {vocab} embeddings")


def check_reward_handoff(path: Path, sft: Path) -> None:
    """The RM output: a one-label sequence classifier whose vocabulary is the SFT model's."""
    from stages.ppo.models import check_tokenizers

    config, rm_tok = _load_handoff(path, "reward model")
    arch = (config.architectures or ["?"])[0]
    if not arch.endswith("ForSequenceClassification") or config.num_labels != 1:
        raise CheckpointError(f"reward model output {path}/final is a {arch} with {config.num_labels} labels, "
                              "not a one-label sequence classifier (rlhf train-rm writes one)")
    _, sft_tok = _load_handoff(sft, "SFT")
    check_tokenizers(sft_tok, rm_tok, str(path / "final"))


# --------------------------------------------------------------------------------------------- summary
def _series(metrics_file: Path, *keys: str) -> dict[str, list[float]]:
    """Each key's logged values in order (event rows left out), read from one pass over metrics.jsonl."""
    from stages.metrics import read_metrics

    rows = read_metrics(metrics_file) if metrics_file.is_file() else []
    return {k: [float(r[k]) for r in rows if k in r and "event" not in r] for k in keys}


def summary(cfg: PipelineConfig, runs: list[StageRun]) -> dict[str, Any]:
    """SFT eval loss, RM pair accuracy, and per PPO run: RM reward, gold reward, KL, length and win-rates of the
    evaluated policy (final/, or best/: eval.policy; "policy" says which) against the SFT model (from eval.json
    when the pipeline's evaluation wrote it, `pipeline_eval`; otherwise — none, or an `rlhf eval` run by hand into
    that file — first and last validation of metrics.jsonl, final)."""
    root = Path(cfg.output_dir)
    loss = _series(root / "sft" / "metrics.jsonl", "eval/loss")["eval/loss"]
    acc = _series(root / "rm" / "metrics.jsonl", "eval/accuracy")["eval/accuracy"]
    out: dict[str, Any] = {"sft_eval_loss": loss[-1] if loss else None, "rm_accuracy": acc[-1] if acc else None,
                           "ppo": {}}
    for run in runs:
        if run.stage != "ppo":
            continue
        made = pipeline_eval(run)
        if made is not None:
            ev = json.loads((run.out / "eval.json").read_text(encoding="utf-8"))
            before, after = ev.get("baseline_metrics", {}), ev["policy_metrics"]
            row = {k: (before.get(k), after.get(k)) for k in ("reward", "gold", "length", "repetition")}
            row["kl"] = (0.0, after["kl"]) if "kl" in after else (None, None)  # (none from greedy responses)
            row["win_rate_rm"] = ev.get("win_rate_rm", {}).get("win_rate")
            row["win_rate_gold"] = ev.get("win_rate_gold", {}).get("win_rate")
            row["policy"] = recorded_policy(made)
            row["source"] = evaluation_source(made)
        else:
            names = {"reward": "eval/reward", "gold": "eval/gold", "length": "eval/response_length",
                     "kl": "eval/kl"}  # every one the validation's (objective/kl is the training rollouts')
            series = _series(run.out / "metrics.jsonl", *names.values())
            row = {k: (v[0], v[-1]) if (v := series[m]) else (None, None) for k, m in names.items()}
            row["policy"], row["source"] = "final", evaluation_source(None)
        out["ppo"][run.label] = row
    return out


def evaluation_source(made: dict[str, Any] | None) -> str:
    """Where a PPO run's summary row comes from: the pipeline's evaluation, with the settings it was made with
    (`pipeline_eval`), or, without one, the run's own validation."""
    if made is None:
        return "its validation in metrics.jsonl (first -> last)"
    how = "greedy" if made.get("greedy") else f"seed {made.get('seed')}"
    return f"rlhf eval of its {recorded_policy(made)}/ against SFT ({made.get('num_prompts') or 'all'} prompts, {how})"


def _fmt(value: Any, digits: int = 3) -> str:
    """A number to `digits` places; n/a for None, a non-finite float, or what eval.json writes for one ("nan",
    "inf": strict JSON has no NaN)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _run_label(label: str, row: dict[str, Any]) -> str:
    """A PPO run's name in the summary, with " (best/)" when its best/ policy was the one evaluated."""
    return f"{label} (best/)" if row.get("policy") == "best" else label


def _run_cells(row: dict[str, Any], digits: int, arrow: str, slash: str) -> list[str]:
    """before -> after of reward, gold, KL and length, then the win-rates (RM / gold) of one PPO run."""
    cells = [f"{_fmt(row[k][0], digits)}{arrow}{_fmt(row[k][1], digits)}" for k in ("reward", "gold", "kl", "length")]
    return cells + [f"{_fmt(row.get('win_rate_rm'), digits)}{slash}{_fmt(row.get('win_rate_gold'), digits)}"]


def summary_markdown(s: dict[str, Any]) -> str:
    """The summary as Markdown: the SFT and RM lines, then one table row per PPO run (before -> after)."""
    lines = [f"- SFT eval loss: {_fmt(s['sft_eval_loss'])}", f"- RM pair accuracy: {_fmt(s['rm_accuracy'])}", "",
             "| PPO run | RM reward | gold reward | KL | length | win-rate vs SFT (RM / gold) |",
             "|---|---|---|---|---|---|"]
    for label, row in s["ppo"].items():
        lines.append(f"| {_run_label(label, row)} | " + " | ".join(_run_cells(row, 3, " → ", " / ")) + " |")
    lines += ["", *(f"- {label}: {row['source']}" for label, row in s["ppo"].items())]
    return "\n".join(lines) + "\n"


def print_summary_table(s: dict[str, Any], console: Any) -> None:
    """SFT and RM on one line, then a table: one row per PPO run, SFT policy -> PPO policy."""
    from rich.table import Table

    console.print(f"[bold]SFT[/] eval loss {_fmt(s['sft_eval_loss'])}   [bold]RM[/] pair accuracy "
                  f"{_fmt(s['rm_accuracy'])}", highlight=False)
    table = Table(title="PPO on the eval prompts: SFT policy → PPO policy",
                  caption="\n".join(f"{label}: {row['source']}" for label, row in s["ppo"].items()))
    for col in ("run", "RM reward", "gold reward", "KL", "length", "win vs SFT\nRM/gold"):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=col != "run")  # (names wrap)
    for label, row in s["ppo"].items():
        table.add_row(_run_label(label, row), *_run_cells(row, 2, "→", "/"))
    console.print(table)


# --------------------------------------------------------------------------------------------- run
def stage_config_changes(out: Path, resolved: str | None, stage: str | None = None) -> list[str]:
    """How the config a stage would run with now (`resolved`, its resolved YAML) differs from the one its
    complete output was trained with (out/resolved_config.yaml), and which files and folders it reads changed
    contents since (out/inputs.json against their fingerprints now: an edited data file, or an SFT / reward
    model retrained under the same path by an earlier, interrupted pipeline run); an input that only moved (a
    pipeline output_dir moved or copied whole: the same fingerprint at another path) is no change; [] when
    unknown."""
    import yaml

    from stages.checkpoint import read_recorded, recorded_changes, run_inputs

    if resolved is None:
        return []
    before = read_recorded(out / "resolved_config.yaml")
    if not isinstance(before, dict):
        return []
    recorded = out / "inputs.json"  # (an output older than inputs.json: its config only; nothing to hash)
    now = yaml.safe_load(resolved)
    inputs = run_inputs(out, now, stage) if stage is not None and recorded.is_file() else None
    return recorded_changes(before, recorded, now, inputs, stage)


def partial_stage_changes(out: Path, resolved: str | None, stage: str) -> list[str]:
    """How the config a partial stage would resume with now (`resolved`) and the inputs it names differ from
    those of its newest complete checkpoint: what the stage's own --resume would refuse (`resume_changes`,
    process count aside: the pipeline passes the same launch options to every attempt); [] without a
    checkpoint (the stage starts fresh) or `resolved`. A change no resume can honour (`fixed_changes`) is a
    ConfigError naming the pipeline's ways out."""
    from stages.checkpoint import UnresumableChanges, complete_checkpoints, resume_changes, run_inputs

    if resolved is None or not complete_checkpoints(out):  # (nothing to compare with: no input hashed for it)
        return []
    try:
        return resume_changes(out, resolved, None, run_inputs(out, resolved, stage), stage)[1]
    except UnresumableChanges as exc:
        raise ConfigError(f"pipeline: the partial run in {out} cannot be continued with {'; '.join(exc.fixed)}: "
                          f"delete {out} to train it afresh, or change the config back") from None


def child_failed(what: str, code: int, then: str) -> RlhfError:
    """The pipeline's error for a child process that exited with `code`: stopped by a signal (the pipeline exits
    with the same 128 + s), a config or usage error (2, as the stage: e.g. its output_dir in use by another run,
    which a scheduler's requeue may meet) or failed (exit 1)."""
    how = "was stopped by a signal" if code in STOPPED_CODES else "failed"
    error = RlhfError(f"pipeline: {what} {how} (exit code {code}{killed_note(code)}){then}")
    error.exit_code = code if code in STOPPED_CODES or code == 2 else 1
    return error


@dataclass
class StageAction:
    """What the pipeline does with one stage: "skip" (complete), "resume" (partial output), "train" (nothing
    there yet) or "retrain" (its output is replaced: --force, or an earlier SFT/RM stage is retrained); `kept`:
    the config changes a skipped stage is kept despite (--allow-config-change)."""

    run: StageRun
    action: str
    kept: list[str] = field(default_factory=list)

    def command(self, launch: list[str]) -> list[str]:
        return stage_command(self.run, launch, resume=self.action == "resume", overwrite=self.action == "retrain")


#: the keys of a model section that fix its architecture and vocabulary (what a memory estimate reads of it)
ARCHITECTURE_KEYS = ("name_or_path", "from_config", "tokenizer", "tokenizer_train", "trust_remote_code")


def estimate_configs(actions: list[StageAction], loaded: dict[str, Any]) -> dict[str, tuple[Any, list[str]]]:
    """label -> (config, stand-ins) of each stage the pipeline will train (any action but "skip"), as its memory
    estimate reads it before anything trains. A model section (`model`, PPO's `reward_model`) naming the output
    of an earlier stage that is to be (re)trained, whose config.json is not there yet or is to be replaced, takes
    that stage's architecture (`ARCHITECTURE_KEYS` of its model section, itself so completed: the RM and PPO's
    policy are SFT's architecture, PPO's reward model the RM's) and keeps its own loading settings (dtype,
    attention, gradient checkpointing); stand-ins lists the labels of those earlier stages."""
    planned: dict[Path, tuple[str, Any]] = {}  # output folder of a stage to be trained -> (label, model section)
    result: dict[str, tuple[Any, list[str]]] = {}
    for act in actions:
        if act.action == "skip":  # its output is there: a later stage reads it as it is
            continue
        cfg, update, used = loaded[act.run.label], {}, []
        for key in ("model", "reward_model"):
            section = getattr(cfg, key, None)
            name = getattr(section, "name_or_path", None)
            if name and (earlier := planned.get(Path(name))) is not None:
                update[key] = section.model_copy(update={k: getattr(earlier[1], k) for k in ARCHITECTURE_KEYS})
                used.append(earlier[0])
        cfg = cfg.model_copy(update=update) if update else cfg
        result[act.run.label] = cfg, used
        planned[act.run.out] = act.run.label, cfg.model
    return result


def stage_actions(runs: list[StageRun], force: bool, resolved: dict[str, str] | None = None,
                  allow_changes: bool = False) -> list[StageAction]:
    """Every stage's action, decided before anything trains (the same for the run and its --dry-run). A
    complete stage whose config or inputs changed since it was trained (`resolved`: a stage's label -> the
    config it resolves to now) is a ConfigError, unless `allow_changes`; so is a partial one whose newest
    checkpoint its --resume would refuse (`partial_stage_changes`), here rather than after the stages before
    it have trained. Once SFT or the reward model is (re)trained, every later stage is trained afresh: its
    output, complete or partial, came from the old one."""
    from stages.checkpoint import fit_hint

    actions, upstream_retrained = [], False
    for run in runs:
        if not will_train(run, force, upstream_retrained):
            changes = stage_config_changes(run.out, (resolved or {}).get(run.label), run.stage)
            if changes and not allow_changes:
                raise ConfigError(f"pipeline: stage {run.label} is complete in {run.out}, but its config or inputs "
                                  f"changed since it was trained ({_listed(changes)}); {fit_hint(changes)}delete "
                                  f"{run.out} to retrain it"
                                  f"{' (the stages after it are retrained too)' if run.stage != 'ppo' else ''}, "
                                  "--force to retrain every stage, or --allow-config-change to keep it")
            actions.append(StageAction(run, "skip", changes))
            continue
        earlier = run.out.exists() and any(run.out.iterdir())  # output of an earlier pipeline run
        fresh = force or upstream_retrained
        action = ("retrain" if fresh else "resume") if earlier else "train"
        changes = partial_stage_changes(run.out, (resolved or {}).get(run.label), run.stage) \
            if action == "resume" else []
        if changes and not allow_changes:
            raise ConfigError(f"pipeline: stage {run.label} has a partial run in {run.out} whose newest checkpoint "
                              f"was trained with another config or inputs ({_listed(changes)}); {fit_hint(changes)}"
                              f"delete {run.out} "
                              "to train it afresh, --force to retrain every stage, or --allow-config-change to "
                              "resume it anyway")
        actions.append(StageAction(run, action))
        upstream_retrained = upstream_retrained or run.stage in ("sft", "train-rm")
    return actions


def _listed(changes: list[str]) -> str:
    return "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")


#: how the plan describes each action
ACTION_NOTES = {"skip": "complete, skipped", "resume": "partial output: resumed",
                "train": "trained", "retrain": "trained afresh"}


def run_pipeline(cfg: PipelineConfig, launch: list[str], force: bool, console: Any,
                 resolved: dict[str, str] | None = None, allow_changes: bool = False,
                 actions: list[StageAction] | None = None) -> dict[str, Any]:
    """Run every stage as `stage_actions` decides (skipping complete ones unless `force`; see there), then eval,
    report and the summary. `actions`: that decision when already taken (the CLI prints it first as the plan;
    deciding again would fingerprint every complete stage's inputs a second time)."""
    runs = plan(cfg)
    if actions is None:
        actions = stage_actions(runs, force, resolved, allow_changes)
    root = Path(cfg.output_dir)
    sft = root / "sft"
    for i, act in enumerate(actions, 1):
        run = act.run
        console.rule(f"[bold]pipeline {i}/{len(runs)}: {run.label}[/] ({run.stage} → {run.out})")
        if run.stage == "train-rm":
            check_policy_handoff(sft)
        elif run.stage == "ppo":
            check_reward_handoff(root / "rm", sft)
        if act.kept:
            console.print(f"[yellow]{run.label}: kept although its config changed (--allow-config-change): "
                          f"{escape(_listed(act.kept))}[/]")
        if act.action == "skip":
            console.print(f"complete output in {run.out}: skipped (--force reruns it)")
            continue
        if act.action == "retrain" and not force:
            console.print(f"an earlier stage was retrained: {run.out} is trained afresh")
        # (the stage's own advice on resuming then names the pipeline: stages.errors.resume_with)
        code = call_forwarding_signals(act.command(launch), {**os.environ, PIPELINE_STAGE_VAR: "1"})
        if code != 0:
            mend = "" if code in STOPPED_CODES else "mend what its error above names, then "
            raise child_failed(f"stage {run.label} ({run.stage})", code,
                               f"; its output is in {run.out}; {mend}run the pipeline again to resume it")
    ppo_runs = [r for r in runs if r.stage == "ppo"]
    if cfg.eval.enabled:
        evaluate_runs(cfg, ppo_runs, sft, console)
    if cfg.report:
        from stages.report import write_report

        rep = write_report([r.out for r in ppo_runs], root / "report")
        console.print(f"report: {rep['markdown']}")
    s = summary(cfg, runs)
    as_json, as_markdown = PIPELINE_SUMMARY_FILES
    (root / as_json).write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
    (root / as_markdown).write_text(summary_markdown(s), encoding="utf-8")
    print_summary_table(s, console)
    return s


def _read_eval_settings(run: StageRun) -> dict[str, Any] | None:
    """A PPO run's eval.settings.json as written, "policy" its folder when they predate eval.policy."""
    try:
        kept = json.loads((run.out / "eval.settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {"policy": str(run.out)} | kept if isinstance(kept, dict) else None


def _sha256(path: Path) -> str | None:
    """`file_fingerprint` of `path` (its sha256), None when it cannot be read."""
    from stages.fingerprint import file_fingerprint

    try:
        return file_fingerprint(path)
    except OSError:
        return None


def evaluated_policy(cfg: PipelineConfig, run: StageRun) -> Path:
    """The policy of a PPO run that eval.policy asks for: the run's folder (its final/), or its best/ when
    eval.policy is best and the run wrote one."""
    best = run.out / "best"
    return best if cfg.eval.policy == "best" and (best / "config.json").is_file() else run.out


def recorded_policy(settings: dict[str, Any]) -> str:
    """Which policy of a PPO run its eval.json judged, as the settings of its evaluation (`pipeline_eval`)
    record: "best" or "final"."""
    policy = settings.get("policy")
    return "best" if isinstance(policy, str) and Path(policy).name == "best" else "final"


def eval_settings_of(cfg: PipelineConfig, sft: Path, policy: Path, run: StageRun) -> dict[str, Any]:
    """What the pipeline's evaluation of `policy` (of PPO `run`) is made with (recorded in eval.settings.json):
    its options, and `eval_inputs`, the contents of what it reads through the run's config."""
    from stages.checkpoint import read_recorded

    record = read_recorded(run.out / "resolved_config.yaml")
    share = validation_share(record)
    return {"seed": cfg.eval.seed, "num_prompts": cfg.eval.num_prompts, "batch_size": cfg.eval.batch_size,
            "baseline": str(sft), "policy": str(policy), "inputs": eval_inputs(run.out, record)} | (
                {"greedy": True} if cfg.eval.greedy else {}) | (  # (absent when off: as written before it existed)
                {"held_out": share} if share else {})  # (likewise: an evaluation of training prompts is redone)


def validation_share(record: Any) -> list[Any] | None:
    """[data.eval_fraction, seed] of a PPO run's resolved config `record` (parsed) without data.eval: `rlhf eval`
    evaluates the share of data.train the run held out for validation (`EvalSettings.held_out`); None otherwise."""
    from stages.config import PPODataConfig

    data = record.get("data") if isinstance(record, dict) else None
    fraction = data.get("eval_fraction", PPODataConfig.model_fields["eval_fraction"].default) if isinstance(
        data, dict) else None
    return [fraction, record.get("seed")] if fraction and data.get("eval") is None else None


def eval_inputs(out: Path, record: Any) -> str | None:
    """One sha256 over the fingerprints of every input a PPO run's resolved config names (`run_inputs`: its
    prompts, reward model, SFT model — the evaluation's baseline —, gold judge, ...), their paths aside (a
    project moved whole reads the same): an evaluation kept beside a stage kept despite changed inputs
    (--allow-config-change) is redone, since it would read the new ones. None without a readable
    resolved_config.yaml (`record`, parsed)."""
    import hashlib

    from stages.checkpoint import run_inputs

    if not isinstance(record, dict):
        return None
    prints = run_inputs(out, record, "ppo")  # key -> {path, sha256}
    contents = {key: fp["sha256"] for key, fp in prints.items()}
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()


def pipeline_eval(run: StageRun) -> dict[str, Any] | None:
    """The settings the pipeline evaluated a PPO run with (its eval.settings.json, `eval_settings_of`) while its
    eval.json is still the file that evaluation wrote (the sha256 recorded beside the settings; an `rlhf eval`
    run by hand into the same file is not); None without them. Only such an eval.json is kept or summarised."""
    kept = _read_eval_settings(run)
    if kept is None or not (run.out / "eval.json").is_file():
        return None
    made = kept.pop("eval_json_sha256", None)  # (settings written before it was recorded: taken as they are)
    return kept if made in (None, _sha256(run.out / "eval.json")) else None


def eval_kept(run: StageRun, settings: dict[str, Any]) -> bool:
    """Whether the run's eval.json stands: the pipeline's own evaluation (`pipeline_eval`) made with `settings`.
    An evaluation without its settings is redone."""
    made = pipeline_eval(run)
    if made is not None:
        made.setdefault("inputs", settings.get("inputs"))  # (settings written before inputs were recorded)
    return made == settings


def eval_plan(cfg: PipelineConfig, actions: list[StageAction], loaded: dict[str, Any] | None = None) -> list[str]:
    """What the evaluation will do for each PPO run, for the plan: "NAME: kept (…)" or "NAME: POLICY against
    SFT, after training" (a stage that trains writes a new policy, whose evaluation is then made afresh), and with
    `loaded` (a run's label -> its PPOConfig) on which prompts (`evaluated_prompts`: data.eval, else the
    validation share of data.train the run holds out)."""
    from stages.eval_settings import evaluated_prompts

    if not cfg.eval.enabled:  # (a stage that trains removes the evaluation of its earlier final/)
        return [f"{act.run.label}: off (eval.enabled false); its summary row from "
                + evaluation_source(pipeline_eval(act.run) if act.action == "skip" else None)
                for act in actions if act.run.stage == "ppo"]
    sft = Path(cfg.output_dir) / "sft"
    lines = []
    for act in actions:
        if act.run.stage != "ppo":
            continue
        policy = evaluated_policy(cfg, act.run)
        if act.action == "skip" and eval_kept(act.run, eval_settings_of(cfg, sft, policy, act.run)):
            lines.append(f"{act.run.label}: kept ({act.run.out / 'eval.json'}, made with these eval settings)")
        else:
            which = "best/ if it writes one, else its final/" if cfg.eval.policy == "best" else "final/"
            ppo = (loaded or {}).get(act.run.label)
            lines.append(f"{act.run.label}: rlhf eval of its {which} against {sft}, "
                         f"{cfg.eval.num_prompts or 'all'} prompt(s), "
                         + ("greedy" if cfg.eval.greedy else f"seed {cfg.eval.seed}")
                         + (f", on {evaluated_prompts(ppo.data, ppo.seed)}" if ppo is not None else ""))
    return lines


def eval_command(cfg: PipelineConfig, run: StageRun, sft: Path, policy: Path) -> list[str]:
    """The `rlhf eval` command line of a PPO run's `policy` (`evaluated_policy`) against the SFT policy (the run's
    resolved config gives the reward model, prompts, generation and gold judge)."""
    cmd = [sys.executable, "-m", "rlhf_cli", "eval", str(policy), "--config", str(run.out / "resolved_config.yaml"),
           "--baseline", str(sft), "--seed", str(cfg.eval.seed), "--batch-size", str(cfg.eval.batch_size),
           "--out", str(run.out / "eval.json")]
    return cmd + (["--num-prompts", str(cfg.eval.num_prompts)] if cfg.eval.num_prompts else []) + (
        ["--greedy"] if cfg.eval.greedy else [])


def evaluate_runs(cfg: PipelineConfig, ppo_runs: list[StageRun], sft: Path, console: Any) -> None:
    """`rlhf eval` of each PPO run's policy (eval.policy) against the SFT model, each as its own process like the
    stages; an evaluation already there is kept when it was made with the same eval settings and policy
    (eval.settings.json)."""
    for run in ppo_runs:
        policy = evaluated_policy(cfg, run)
        settings = eval_settings_of(cfg, sft, policy, run)
        if eval_kept(run, settings):
            continue
        what = "" if policy == run.out else " best/"
        console.rule(f"[bold]eval: {run.label}{what}[/] against {sft}")
        if cfg.eval.policy == "best" and policy == run.out:
            console.print(f"[yellow]{run.label} wrote no best/ (no validation reward chose one): its final/ is "
                          "evaluated[/]", highlight=False)
        cmd = eval_command(cfg, run, sft, policy)
        console.print(escape(shlex.join(cmd)), highlight=False, soft_wrap=True)  # (how to repeat it by hand)
        code = call_forwarding_signals(cmd)
        if code != 0:
            raise child_failed(f"rlhf eval of {run.label}", code, "")
        made = settings | {"eval_json_sha256": _sha256(run.out / "eval.json")}
        (run.out / "eval.settings.json").write_text(json.dumps(made) + "\n", encoding="utf-8")
