"""Unit tests of rlhf_cli/app.py's run_stage flow (worker paths, per-rank error printing, launcher exit codes, the
launcher's environment) and of the PPO trick table, in-process (typer's CliRunner) with the launcher and the
training function replaced: nothing trains, nothing launches."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO, TINY_SFT, invoke_cli

TINY_PPO = REPO / "configs" / "tiny" / "ppo.yaml"


def _worker_env(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, launched: bool) -> None:
    """This process as rank `rank` of `world` workers, of rlhf's own launcher (`launched`) or of torchrun's."""
    for name in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "PYTHON_RLHF_LAUNCHED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    if launched:
        monkeypatch.setenv("PYTHON_RLHF_LAUNCHED", "1")


def _not_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "PYTHON_RLHF_LAUNCHED", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)


def _sft_args(out: Path, *extra: str) -> tuple[str, ...]:
    return ("sft", "-c", str(TINY_SFT), "--set", f"output_dir={out}", *extra)


@pytest.mark.parametrize("rank, locked", [(0, [".rlhf.workers.lock"]), (1, [])])
def test_a_launched_worker_trains_under_the_workers_lock_on_rank_0_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, locked: list[str]) -> None:
    """A worker of rlhf's own launcher trains with no preparation (prepare=None); only rank 0 holds the workers'
    lock of output_dir (so that a new run there is refused while the workers train)."""
    import stages.checkpoint as checkpoint
    from rlhf_cli import app

    _worker_env(monkeypatch, rank, 2, launched=True)
    locks: list[tuple[Path, str]] = []
    trained: list[tuple[Any, ...]] = []

    @contextlib.contextmanager
    def fake_lock(out_dir: Path, name: str = "x") -> Iterator[None]:
        locks.append((out_dir, name))
        yield

    monkeypatch.setattr(checkpoint, "run_lock", fake_lock)
    monkeypatch.setattr(app, "_train_here", lambda stage, cfg, resume, prepare: trained.append(
        (stage, cfg.output_dir, resume, prepare)))
    res = invoke_cli(*_sft_args(tmp_path / "o", "--resume"))
    assert res.exit_code == 0, res.output
    assert trained == [("sft", str(tmp_path / "o"), True, None)]
    assert locks == [(tmp_path / "o", name) for name in locked]


def test_a_worker_of_another_launcher_prepares_output_dir_for_world_size_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun (no rlhf mark) the preparation handed to the trainer prints the config, locks output_dir
    and prepares it for WORLD_SIZE processes (the process count a --resume compares with)."""
    import stages.checkpoint as checkpoint
    from rlhf_cli import app

    _worker_env(monkeypatch, 0, 3, launched=False)
    prepared: list[tuple[Path, bool, bool, str, int]] = []

    def fake_prepare(out_dir: Path, text: str, resume: bool, overwrite: bool, stage: str, processes: int,
                     allow: bool) -> list[str]:
        prepared.append((out_dir, resume, overwrite, stage, processes))
        return []

    def fake_train(stage: str, cfg: Any, resume: bool, prepare: Any) -> None:
        assert prepare is not None
        prepare()

    monkeypatch.setattr(checkpoint, "prepare_output_dir", fake_prepare)
    monkeypatch.setattr(app, "_train_here", fake_train)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--overwrite"))
    assert res.exit_code == 0, res.output
    assert prepared == [(tmp_path / "o", False, True, "sft", 3)]
    assert "rlhf sft: resolved config" in res.stdout
    assert (tmp_path / "o" / ".rlhf.lock").exists()  # the run's lock, taken before the preparation


@pytest.mark.parametrize("rank, world, error, code, printed", [
    (1, 2, "config", 2, ""),  # every rank raises it: rank 0 prints it
    (0, 2, "config", 2, "error: bad value here"),
    (1, 2, "checkpoint", 1, "error (rank 1): bad value here"),  # one rank's own: printed with its rank
    (0, 1, "checkpoint", 1, "error: bad value here"),  # a one-process run: no rank to name
])
def test_errors_are_printed_once_or_by_the_rank_that_hit_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, world: int, error: str, code: int,
        printed: str) -> None:
    """An every-rank error (ConfigError, exit 2) is printed by rank 0 alone; a rank's own (CheckpointError,
    exit 1) by the rank that raised it, naming it where there are several."""
    from rlhf_cli import app
    from stages.errors import CheckpointError, ConfigError

    _worker_env(monkeypatch, rank, world, launched=True)
    exc = ConfigError if error == "config" else CheckpointError

    def fail(*args: Any) -> None:
        raise exc("bad value here")

    monkeypatch.setattr(app, "_train_here", fail)
    res = invoke_cli(*_sft_args(tmp_path / "o"))
    assert res.exit_code == code and " ".join(res.stderr.split()) == printed, res.output


def test_debug_raises_the_error_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--debug: the RlhfError reaches the caller (a traceback) instead of one error line."""
    from rlhf_cli import app
    from stages.errors import CheckpointError

    _worker_env(monkeypatch, 0, 2, launched=True)
    boom = CheckpointError("no shard")

    def fail(*args: Any) -> None:
        raise boom

    monkeypatch.setattr(app, "_train_here", fail)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--debug"))
    assert res.exception is boom and "error" not in res.stderr


def test_ctrl_c_is_exit_130_and_the_signal_handlers_are_disarmed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt out of training: `interrupted`, exit 130; stop.disarm() runs however run_stage ends."""
    from rlhf_cli import app
    from stages import stop

    _not_a_worker(monkeypatch)
    disarmed: list[bool] = []
    monkeypatch.setattr(stop, "disarm", lambda: disarmed.append(True))

    def interrupt(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "_train_here", interrupt)
    res = invoke_cli(*_sft_args(tmp_path / "o"))
    assert res.exit_code == 130 and "interrupted" in res.stderr and disarmed == [True], res.output


@pytest.mark.parametrize("code, said", [
    (1, "rlhf sft: the launcher exited with code 1"),
    (130, "rlhf sft: stopped by a signal (exit code 130)"),
    (143, "rlhf sft: stopped by a signal (exit code 143)"),
])
def test_the_launchers_exit_code_is_the_commands_and_is_explained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, said: str) -> None:
    """A failed launch exits with the launcher's code; a clean stop by SIGINT/SIGTERM (128 + signal) is said as
    such, not as a failure."""
    from rlhf_cli import app

    _not_a_worker(monkeypatch)
    monkeypatch.setattr(app, "run_launcher", lambda cmd, env: code)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--num-gpus", "2"))
    stderr = " ".join(res.stderr.split())
    assert res.exit_code == code and said in stderr, res.output
    assert ("the launcher exited" in stderr) is (code == 1)
    # DeepSpeed's launcher logs a clean stop's 143 as an [ERROR]: the last line says the stop was as asked
    assert ("saved and stopped as asked, which DeepSpeed's launcher logs as an [ERROR]" in stderr) is (code != 1)


@pytest.mark.parametrize("hosts", [False, True])
def test_the_stop_file_goes_to_the_launcher_only_for_a_hostfile_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosts: bool) -> None:
    """Multi-node (--hostfile) workers watch output_dir/.rlhf-stop (absolute path, for the other nodes); a
    one-node launch has none. Each launch carries rlhf's mark for its workers."""
    from rlhf_cli import app

    _not_a_worker(monkeypatch)
    seen: list[dict[str, str]] = []

    def launcher(cmd: list[str], env: dict[str, str]) -> int:
        seen.append(env)
        return 0

    monkeypatch.setattr(app, "run_launcher", launcher)
    monkeypatch.setattr(app, "is_complete", lambda out_dir, stage: True)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    out = tmp_path / "o"
    res = invoke_cli(*_sft_args(out, *(["--hostfile", str(hostfile)] if hosts else ["--num-gpus", "2"])))
    assert res.exit_code == 0 and len(seen) == 1, res.output
    assert seen[0]["PYTHON_RLHF_LAUNCHED"] == "1"
    assert seen[0].get("PYTHON_RLHF_STOP_FILE") == (str((out / ".rlhf-stop").resolve()) if hosts else None)


def _ppo_cfg(*overrides: str, preset: str | None = "vanilla") -> Any:
    """The tiny PPO config (model paths pointed at an existing folder: nothing loads them) with `overrides`."""
    from rlhf_cli.config_loader import load_config

    here = str(REPO / "configs")
    return load_config("ppo", TINY_PPO, [f"model.name_or_path={here}", f"reward_model.name_or_path={here}",
                                         *overrides], preset=preset)


def test_describe_tricks_marks_what_differs_from_the_preset() -> None:
    """One row per key of the preset (vanilla: 18 ppo.* keys), `*` and the preset's value where they differ."""
    from stages.ppo.trainer import describe_tricks

    lines = describe_tricks(_ppo_cfg("ppo.reward_scaling=true", "ppo.reward_clip=0.5")).splitlines()
    assert lines[0] == "PPO tricks (preset vanilla; * = differs from the preset):"
    assert len(lines) == 1 + 18  # scaling is on: no note on a clip of raw scores
    assert "  * ppo.reward_scaling             True   (preset: False)" in lines
    assert "  * ppo.reward_clip                0.5   (preset: 0.0)" in lines
    assert "    ppo.kl_coef                    0.0" in lines and "    ppo.reward_norm                False" in lines


@pytest.mark.parametrize("overrides, note", [
    ((), False),  # no clip at all
    (("ppo.reward_clip=0.5",), True),  # a clip of the raw scores
    (("ppo.reward_clip=0.5", "ppo.reward_norm=true"), False),
    (("ppo.reward_clip=0.5", "ppo.reward_scaling=true"), False),
])
def test_describe_tricks_notes_a_clip_of_raw_reward_model_scores(overrides: tuple[str, ...], note: bool) -> None:
    """The note appears only for reward_clip > 0 with neither reward_norm nor reward_scaling."""
    from stages.ppo.trainer import describe_tricks

    text = describe_tricks(_ppo_cfg(*overrides))
    expected = ("  note: ppo.reward_clip 0.5 clips the raw reward-model scores (reward_norm and reward_scaling are off): "
                "size it against the RM's score spread (reward_stats.json)")
    assert (text.splitlines()[-1] == expected) is note and ("note:" in text) is note, text


def _ppo_args(tmp_path: Path, *extra: str) -> tuple[str, ...]:
    """`rlhf ppo` on the tiny config, its policy and reward model stand-in folders of the right kinds."""
    import json

    for name, arch in (("sft", "LlamaForCausalLM"), ("rm", "LlamaForSequenceClassification")):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": [arch], "num_labels": 1}))
    return ("ppo", "-c", str(TINY_PPO), "--set", f"output_dir={tmp_path / 'p'}", "--set",
            f"model.name_or_path={tmp_path / 'sft'}", "--set", f"reward_model.name_or_path={tmp_path / 'rm'}", *extra)


def test_ppo_max_is_preset_ppo_max_and_contradicts_any_other_preset(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--ppo-max alone or with --preset ppo-max runs preset ppo-max; with another --preset: exit 2, one line."""
    _not_a_worker(monkeypatch)
    for extra in (("--ppo-max",), ("--ppo-max", "--preset", "ppo-max")):
        res = invoke_cli(*_ppo_args(tmp_path, "--dry-run", *extra))
        assert res.exit_code == 0 and "PPO tricks (preset ppo-max; * = differs" in res.stdout, res.output
    res = invoke_cli(*_ppo_args(tmp_path, "--dry-run", "--ppo-max", "--preset", "vanilla"))
    assert res.exit_code == 2 and res.stderr.strip() == "error: --ppo-max contradicts --preset vanilla", res.output


def test_a_trick_flag_wins_over_a_set_and_errors_name_whichever_gave_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag is appended after the --set overrides (the last wins); a bad value is named by what gave it: the
    flag only when the flag was given."""
    _not_a_worker(monkeypatch)
    res = invoke_cli(*_ppo_args(tmp_path, "--dry-run", "--set", "ppo.kl_coef=0.1", "--kl-coef", "0.2"))
    said = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "* ppo.kl_coef 0.2 (preset: 0.0)" in said, res.output
    res = invoke_cli(*_ppo_args(tmp_path, "--dry-run", "--set", "ppo.kl_coef=-1"))
    said = " ".join(res.stderr.split())
    assert res.exit_code == 2 and "(got -1) [given with --set]" in said and "--kl-coef" not in said, res.output


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_check_data_is_a_dry_run_that_reads_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     stage: str) -> None:
    """--check-data alone: the dry run's checks, then the data read for the run's process count; nothing
    trains (the training function is never called)."""
    import stages.pipeline as pipeline
    from rlhf_cli import app

    _not_a_worker(monkeypatch)
    read: list[tuple[str, int]] = []
    monkeypatch.setattr(pipeline, "check_data", lambda st, cfg, processes: read.append((st, processes)))
    monkeypatch.setattr(app, "_train_here", lambda *a: pytest.fail("trained"))
    monkeypatch.setattr(app, "run_launcher", lambda *a: pytest.fail("launched"))
    args = _ppo_args(tmp_path) if stage == "ppo" else _sft_args(tmp_path / "o")
    res = invoke_cli(*args, "--check-data", "--num-gpus", "2")
    assert res.exit_code == 0 and read == [(stage, 2)], res.output
    assert res.stdout.rstrip().endswith("dry run: nothing trained")
    assert not (tmp_path / ("p" if stage == "ppo" else "o")).exists()
    read.clear()
    assert invoke_cli(*args, "--dry-run").exit_code == 0 and read == []  # a plain dry run reads no data


@pytest.mark.parametrize("hosts, cuda, code", [
    (False, False, 2),  # fp16 on this machine without a GPU: refused before the launch
    (False, True, 0),  # with a GPU: launched
    (True, False, 0),  # a --hostfile run computes on other machines: launched
])
def test_fp16_is_refused_only_for_a_run_on_this_machine_without_a_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosts: bool, cuda: bool, code: int) -> None:
    """deepspeed.precision fp16: refused (exit 2) where DeepSpeed's CPU accelerator would run it, launched
    otherwise."""
    import torch

    from rlhf_cli import app

    _not_a_worker(monkeypatch)
    launched: list[list[str]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(app, "run_launcher", lambda cmd, env: launched.append(cmd) or 0)
    monkeypatch.setattr(app, "is_complete", lambda out_dir, stage: True)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    where = ["--hostfile", str(hostfile)] if hosts else ["--num-gpus", "2"]
    res = invoke_cli(*_sft_args(tmp_path / "o", *where, "--set", "deepspeed.precision=fp16"))
    said = " ".join(res.stderr.split())
    assert res.exit_code == code and len(launched) == (code == 0), res.output
    assert ("error: deepspeed.precision: fp16 needs a GPU, and this machine has none" in said) is (code == 2)


def test_a_refused_request_creates_no_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume with --overwrite is refused before the run's lock would create output_dir (exit 2)."""
    from rlhf_cli import app

    _not_a_worker(monkeypatch)
    monkeypatch.setattr(app, "_train_here", lambda *a: pytest.fail("trained"))
    res = invoke_cli(*_sft_args(tmp_path / "o", "--resume", "--overwrite"))
    assert res.exit_code == 2 and "--resume and --overwrite contradict each other" in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_report_goes_beside_the_first_run_by_default(tmp_path: Path) -> None:
    """Without --out the plots and report.md go to report/ in the first run's parent folder."""
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.5}\n')
    res = invoke_cli("report", str(run))
    assert res.exit_code == 0 and (tmp_path / "runs" / "report" / "report.md").is_file(), res.output
    assert not (run / "report").exists()


def test_a_dry_resume_of_a_finished_run_does_not_announce_a_fresh_start(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume where a final/ exists but no checkpoint: the run would not start fresh, so the dry run does not
    say it would; with neither, it says so."""
    _not_a_worker(monkeypatch)
    (tmp_path / "o" / "final").mkdir(parents=True)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--dry-run", "--resume"))
    assert res.exit_code == 0 and "resume:" not in res.stdout, res.output
    res = invoke_cli(*_sft_args(tmp_path / "fresh", "--dry-run", "--resume"))
    assert res.exit_code == 0 and "resume: no complete checkpoint here; the run would start fresh" in res.stdout


@pytest.mark.parametrize("how, code", [("launcher", 1), ("in-process", 2), ("launcher", 0)])
def test_a_failed_resume_leaves_the_record_its_checkpoint_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 how: str, code: int) -> None:
    """--resume --allow-config-change rewrites output_dir/resolved_config.yaml and inputs.json for the attempt;
    when it fails (the launcher's non-zero code, an error raised in this process) they are put back as the
    newest checkpoint keeps them; a run that succeeds keeps its own."""
    import json

    from rlhf_cli import app
    from stages.errors import ConfigError

    _not_a_worker(monkeypatch)
    out = tmp_path / "o"
    ck = out / "checkpoint-00000003"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 2 if how == "launcher" else 1}))
    for folder in (ck, out):
        (folder / "resolved_config.yaml").write_text("seed: 99\n")
        (folder / "inputs.json").write_text("{}\n")
    (ck / "COMPLETE").write_text("ok\n")

    def refuse(*args: Any) -> None:
        raise ConfigError("--resume: the newest checkpoint is past this run's last step")

    monkeypatch.setattr(app, "run_launcher", lambda cmd, env: code)
    monkeypatch.setattr(app, "is_complete", lambda out_dir, stage: True)
    monkeypatch.setattr(app, "_train_here", refuse)
    where = ["--num-gpus", "2"] if how == "launcher" else []
    res = invoke_cli(*_sft_args(out, "--resume", "--allow-config-change", *where))
    assert res.exit_code == code, res.output
    record = (out / "resolved_config.yaml").read_text()
    assert (record == "seed: 99\n") is (code != 0), record[:200]
    assert ((out / "inputs.json").read_text() == "{}\n") is (code != 0)


def test_a_pipeline_names_the_stage_whose_hub_model_is_not_cached(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a stage's model that is neither a folder nor in the hub cache: the pipeline's dry run warns and
    its run stops (exit 2, nothing trained), each naming the stage, as the stage's own command names the key."""
    import huggingface_hub.constants
    import yaml

    from rlhf_cli import app

    _not_a_worker(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(app, "run_launcher", lambda *a: pytest.fail("launched"))
    tiny = REPO / "configs" / "tiny"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "runs"),
        "sft": {"config": str(tiny / "sft.yaml"), "set": ["model.from_config=null", "model.name_or_path=outputs/sft"]},
        "rm": {"config": str(tiny / "rm.yaml")}, "ppo": {"config": str(tiny / "ppo.yaml")}}))
    said = "pipeline stage sft: model.name_or_path outputs/sft: no such local folder"
    dry = invoke_cli("pipeline", "-c", str(pipeline), "--dry-run")
    assert dry.exit_code == 0 and f"warning: {said}" in " ".join(dry.stderr.split()), dry.output
    run = invoke_cli("pipeline", "-c", str(pipeline))
    assert run.exit_code == 2 and f"error: {said}" in " ".join(run.stderr.split()), run.output
    assert not (tmp_path / "runs" / "sft").exists()


# ----------------------------------------------------------------------------- GPU memory: fit and out of memory
def _fitting_micro_batch(out: Path, gpu_gib: float) -> int:
    """The largest micro-batch whose estimated peak fits 90 % of `gpu_gib` for the tiny SFT config (the same
    micro x accumulation)."""
    from rlhf_cli.config_loader import load_config
    from stages.memory import GIB, estimate, micro_batch_choices

    cfg = load_config("sft", TINY_SFT, [f"output_dir={out}"])
    peaks = estimate(cfg, 1, micro_batch_choices(cfg))["peak_at_micro_batch"]
    return max(m for m, peak in peaks.items() if peak <= 0.9 * gpu_gib * GIB)


def test_a_dry_run_fits_the_estimate_to_the_gpus_memory_given_or_found(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--gpu-memory: the fit lines after the estimate, the largest micro-batch that fits named; without it, on a
    machine whose workers use CUDA, nvidia-smi's figure for the GPUs the ranks use; without either, no fit."""
    from rlhf_cli import gpu_memory

    _not_a_worker(monkeypatch)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--dry-run", "--gpu-memory", "0.05"))
    said = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "GPU memory: 0.050 GiB per GPU (--gpu-memory)" in said, res.output
    assert "does not fit" in said and (
        "the largest train.micro_batch_size that fits with the same batch (micro_batch_size x "
        f"gradient_accumulation_steps = 16): {_fitting_micro_batch(tmp_path / 'o', 0.05)} (now 16), with") in said
    monkeypatch.setattr(gpu_memory, "chosen_accelerator", lambda env: "cpu")  # workers on the CPU: no GPU figure
    assert "GPU memory" not in invoke_cli(*_sft_args(tmp_path / "o", "--dry-run")).stdout
    asked: list[int | None] = []
    monkeypatch.setattr(gpu_memory, "chosen_accelerator", lambda env: "cuda")
    monkeypatch.setattr(gpu_memory, "gpu_memory_of", lambda num_gpus: asked.append(num_gpus) or 80 * 2**30)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--dry-run", "--num-gpus", "2"))
    said = " ".join(res.stdout.split())
    assert "GPU memory: 80.000 GiB per GPU (nvidia-smi, this node's GPUs)" in said and " fits (" in said, res.output
    assert asked == [2]


def test_a_run_warns_before_it_starts_when_the_estimate_exceeds_the_gpus_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning comes before training, only when the peak does not fit; with no GPU figure nothing is
    estimated at all (a run on a CPU machine pays nothing for it); an estimate that fails is no error."""
    from rlhf_cli import app, gpu_memory

    _not_a_worker(monkeypatch)
    trained: list[str] = []
    monkeypatch.setattr(app, "_train_here", lambda stage, *a: trained.append(stage))
    res = invoke_cli(*_sft_args(tmp_path / "a", "--gpu-memory", "0.05"))
    said = " ".join(res.stderr.split())
    assert res.exit_code == 0 and trained == ["sft"], res.output
    assert said.startswith("warning: the memory estimate (") and "expect CUDA out of memory" in said
    assert "does not fit" in said and "(now 16)" in said
    res = invoke_cli(*_sft_args(tmp_path / "b", "--gpu-memory", "80"))
    assert res.exit_code == 0 and "warning" not in res.stderr and trained == ["sft"] * 2, res.output
    monkeypatch.setattr(gpu_memory, "chosen_accelerator", lambda env: "cpu")  # workers on the CPU: no GPU figure
    monkeypatch.setattr(gpu_memory, "estimate", lambda *a: pytest.fail("estimated without a GPU figure"))
    assert invoke_cli(*_sft_args(tmp_path / "c")).exit_code == 0 and len(trained) == 3

    def broken(*args: Any) -> None:
        raise RuntimeError("a remote-code config that fails to build")

    monkeypatch.setattr(gpu_memory, "estimate", broken)  # the warning's arithmetic failing never stops the run
    res = invoke_cli(*_sft_args(tmp_path / "d", "--gpu-memory", "0.05"))
    assert res.exit_code == 0 and len(trained) == 4 and "warning" not in res.stderr, res.output


def test_fit_micro_batch_trains_with_the_largest_that_fits_and_the_same_rows_per_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--fit-micro-batch: the run (and its resolved config, which a resume compares) gets the largest micro-batch
    whose estimated peak fits, gradient accumulation keeping micro x accumulation = 16; 16 itself kept on a big
    GPU; 1 when none fits (then the warning). A resume with the flag continues as its run trained, even on
    another GPU (with --allow-config-change it fits again); one without the flag is a config change. A worker of
    the user's own launcher fits for its WORLD_SIZE ranks from --gpu-memory, and without it, or without any GPU
    figure, it is exit 2."""
    import yaml

    from rlhf_cli import app, gpu_memory
    from rlhf_cli.micro_batch_fit import choose_micro_batch as choose

    _not_a_worker(monkeypatch)
    trained: list[Any] = []
    monkeypatch.setattr(app, "_train_here", lambda stage, cfg, *a: trained.append(cfg.train))
    best = _fitting_micro_batch(tmp_path / "a", 0.05)
    assert 1 < best < 16  # (a real choice: neither end)
    res = invoke_cli(*_sft_args(tmp_path / "a", "--gpu-memory", "0.05", "--fit-micro-batch"))
    said = " ".join(res.stdout.split())
    assert res.exit_code == 0 and (trained[-1].micro_batch_size, trained[-1].gradient_accumulation_steps) == (
        best, 16 // best), res.output
    assert (f"--fit-micro-batch: train.micro_batch_size 16 -> {best}, gradient_accumulation_steps 1 -> {16 // best}: "
            "the largest micro-batch whose estimated peak, ") in said
    assert "fits in 0.045 GiB (90% of 0.050 GiB per GPU, --gpu-memory); the same 16 rows per rank" in said
    record = yaml.safe_load((tmp_path / "a" / "resolved_config.yaml").read_text())["train"]
    assert (record["micro_batch_size"], record["gradient_accumulation_steps"]) == (best, 16 // best)
    ck = tmp_path / "a" / "checkpoint-00000003"  # a checkpoint of that run, as a resume finds it
    ck.mkdir()
    for name in ("resolved_config.yaml", "inputs.json"):
        (ck / name).write_bytes((tmp_path / "a" / name).read_bytes())
    (ck / "trainer_state.json").write_text('{"step": 3, "world_size": 1}')
    (ck / "COMPLETE").write_text("ok\n")
    for gib in ("0.05", "80"):
        res = invoke_cli(*_sft_args(tmp_path / "a", "--gpu-memory", gib, "--fit-micro-batch", "--resume"))
        assert res.exit_code == 0 and "warning" not in res.stderr and trained[-1].micro_batch_size == best, res.output
        assert (f"--fit-micro-batch: train.micro_batch_size {best}, train.gradient_accumulation_steps {16 // best}, "
                f"as the run in {tmp_path / 'a'} trained with: a resume continues as it ran") in " ".join(
                    res.stdout.split())
    res = invoke_cli(*_sft_args(tmp_path / "a", "--gpu-memory", "80", "--fit-micro-batch", "--resume",
                                "--allow-config-change"))
    assert res.exit_code == 0 and trained[-1].micro_batch_size == 16, res.output
    assert f"train.micro_batch_size: {best} -> 16" in " ".join(res.stderr.split())  # (the changes' warning)
    res = invoke_cli(*_sft_args(tmp_path / "a", "--resume"))
    assert res.exit_code == 2 and f"train.micro_batch_size: {best} -> 16" in res.stderr and (
        "If that run chose train.micro_batch_size with --fit-micro-batch, give it again") in " ".join(
            res.stderr.split()), res.output
    res = invoke_cli(*_sft_args(tmp_path / "b", "--gpu-memory", "80", "--fit-micro-batch"))
    assert res.exit_code == 0 and "train.micro_batch_size 16 kept" in " ".join(res.stdout.split()), res.output
    assert (trained[-1].micro_batch_size, trained[-1].gradient_accumulation_steps) == (16, 1)
    res = invoke_cli(*_sft_args(tmp_path / "c", "--gpu-memory", "0.001", "--fit-micro-batch"))
    said = " ".join(res.stdout.split())
    assert res.exit_code == 0 and (trained[-1].micro_batch_size, trained[-1].gradient_accumulation_steps) == (1, 16)
    assert "no micro-batch fits in 0.001 GiB" in said and "warning: the memory estimate" in res.stderr, res.output
    launched: list[list[str]] = []  # two ranks: the launching process fits; its workers read the resolved config
    monkeypatch.setattr(app, "run_launcher", lambda cmd, env: launched.append(cmd) or 0)
    monkeypatch.setattr(app, "is_complete", lambda out_dir, stage: True)
    res = invoke_cli(*_sft_args(tmp_path / "e", "--gpu-memory", "0.05", "--fit-micro-batch", "--num-gpus", "2"))
    record = yaml.safe_load((tmp_path / "e" / "resolved_config.yaml").read_text())["train"]
    assert res.exit_code == 0 and "--fit-micro-batch" not in launched[0], res.output
    assert f"train.micro_batch_size 16 -> {record['micro_batch_size']}," in " ".join(res.stdout.split())
    assert record["micro_batch_size"] * record["gradient_accumulation_steps"] == 16 > record["micro_batch_size"]
    monkeypatch.setattr(gpu_memory, "chosen_accelerator", lambda env: "cpu")
    res = invoke_cli(*_sft_args(tmp_path / "d", "--fit-micro-batch", "--dry-run"))
    assert res.exit_code == 2 and ("error: --fit-micro-batch needs the memory of each GPU (no CUDA GPU here): give "
                                   "--gpu-memory GIB") in " ".join(res.stderr.split()), res.output
    _worker_env(monkeypatch, 0, 2, launched=False)
    res = invoke_cli(*_sft_args(tmp_path / "d", "--fit-micro-batch"))
    assert res.exit_code == 2 and "needs --gpu-memory GIB: every rank must choose the same" in " ".join(
        res.stderr.split()), res.output
    worlds: list[int] = []
    monkeypatch.setattr(app, "choose_micro_batch", lambda cfg, world, *a: worlds.append(world) or choose(
        cfg, world, *a))
    res = invoke_cli(*_sft_args(tmp_path / "f", "--fit-micro-batch", "--gpu-memory", "0.05"))
    assert res.exit_code == 0 and worlds == [2] and trained[-1].micro_batch_size * trained[-1].\
        gradient_accumulation_steps == 16, res.output
    assert len(trained) == 7  # (e trained under the launcher)


def test_fit_micro_batch_in_ppo_divides_the_mini_batch_and_needs_an_estimate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PPO: a divisor of train.mini_batch_size (16), no accumulation key, also when the config's micro-batch does
    not divide a mini-batch given on the command line; models whose config.json has no shape (no estimate), or
    a raw DeepSpeed JSON that sets the micro-batch: exit 2 naming the flag."""
    import json

    from transformers import LlamaConfig

    from rlhf_cli import app
    from rlhf_cli.config_loader import load_config
    from stages.memory import GIB, estimate, fits, micro_batch_choices

    _not_a_worker(monkeypatch)
    args = _ppo_args(tmp_path, "--fit-micro-batch")
    res = invoke_cli(*args, "--gpu-memory", "1", "--dry-run")
    assert res.exit_code == 2 and "error: --fit-micro-batch: no memory estimate can be made" in res.stderr, res.output
    for name, arch in (("sft", "LlamaForCausalLM"), ("rm", "LlamaForSequenceClassification")):
        shape = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=32000, num_labels=1, architectures=[arch])
        (tmp_path / name / "config.json").write_text(json.dumps(shape.to_dict()))
    trained: list[Any] = []
    monkeypatch.setattr(app, "_train_here", lambda stage, cfg, *a: trained.append(cfg))
    cfg = load_config("ppo", TINY_PPO, [f"model.name_or_path={tmp_path / 'sft'}",
                                        f"reward_model.name_or_path={tmp_path / 'rm'}"])
    peaks = estimate(cfg, 1, micro_batch_choices(cfg))["peak_at_micro_batch"]
    assert sorted(peaks) == [1, 2, 4, 8, 16]
    gib = (peaks[4] + peaks[8]) / 2 / 0.9 / GIB  # between the peaks at 4 and 8
    assert fits(peaks[4], int(gib * GIB)) and not fits(peaks[8], int(gib * GIB))
    res = invoke_cli(*args, "--gpu-memory", f"{gib:.6f}")
    assert res.exit_code == 0 and trained[-1].train.micro_batch_size == 4, res.output
    assert trained[-1].train.mini_batch_size == 16 and "train.micro_batch_size 16 -> 4:" in " ".join(
        res.stdout.split())
    res = invoke_cli(*args, "--gpu-memory", "80", "--set", "train.mini_batch_size=8")  # 16 does not divide 8
    assert res.exit_code == 0 and (trained[-1].train.micro_batch_size, trained[-1].train.mini_batch_size) == (8, 8)
    assert ("train.micro_batch_size (the config's does not divide train.mini_batch_size) -> 8: the largest" in
            " ".join(res.stdout.split())), res.output
    assert invoke_cli(*args[:-1], "--gpu-memory", "80", "--set", "train.mini_batch_size=8").exit_code == 2
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    res = invoke_cli(*args, "--gpu-memory", "80", "--set", f"deepspeed.config={raw}")
    assert res.exit_code == 2 and ("--fit-micro-batch: deepspeed.config sets train_micro_batch_size_per_gpu, which "
                                   "the chosen micro-batch would contradict") in " ".join(res.stderr.split()), res.output


@pytest.mark.parametrize("error", ["torch", "cuda-library"])
def test_out_of_gpu_memory_is_one_error_saying_what_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         error: str) -> None:
    """torch's OutOfMemoryError (or a CUDA library's "out of memory" RuntimeError): exit 1, no traceback, torch's
    message, the estimate's fit to --gpu-memory and what lowers the memory; a worker of two names its rank (and,
    with no GPU figure there, prints no fit); --debug raises it; any other RuntimeError is not taken for one."""
    import torch

    from rlhf_cli import app
    from stages.memory import memory_advice

    exc: RuntimeError = (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB") if error == "torch"
                         else RuntimeError("CUDA error: out of memory\nCompile with TORCH_USE_CUDA_DSA"))

    def fail(*args: Any) -> None:
        raise exc

    _not_a_worker(monkeypatch)
    monkeypatch.setattr(app, "_train_here", fail)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--gpu-memory", "0.05"))
    said = " ".join(res.stderr.split())
    first = " ".join(str(exc).split())
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"error: out of GPU memory: {first} GPU memory: 0.050 GiB per GPU (--gpu-memory)" in said, said
    assert f": {_fitting_micro_batch(tmp_path / 'o', 0.05)} (now 16), with gradient_accumulation_steps" in said
    from rlhf_cli.config_loader import load_config

    advice = memory_advice(load_config("sft", TINY_SFT, [f"output_dir={tmp_path / 'o'}"]))
    assert said.endswith(f"What lowers it: {advice} `--dry-run --gpu-memory GIB` estimates any change; --debug "
                         "shows the traceback"), said
    _worker_env(monkeypatch, 1, 2, launched=True)
    res = invoke_cli(*_sft_args(tmp_path / "o"))
    said = " ".join(res.stderr.split())
    assert res.exit_code == 1 and said.startswith(f"error (rank 1): out of GPU memory: {first} What lowers it:"), said
    assert invoke_cli(*_sft_args(tmp_path / "o", "--debug")).exception is exc
    exc = RuntimeError("an unrelated failure")
    assert invoke_cli(*_sft_args(tmp_path / "o")).exception is exc


def test_the_out_of_memory_message_says_what_failed_uses_the_ranks_gpu_and_survives_a_failing_estimate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's save marks the error ("while writing checkpoint-…"); a rank that used CUDA takes its own
    GPU's total memory (over --gpu-memory); an estimate that fails leaves the fit out, still one error."""
    import torch

    from rlhf_cli import app, gpu_memory
    from stages.errors import while_doing

    exc = while_doing(torch.OutOfMemoryError("CUDA out of memory."), "writing checkpoint-00000004")

    def fail(*args: Any) -> None:
        raise exc

    _not_a_worker(monkeypatch)
    monkeypatch.setattr(app, "_train_here", fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("Props", (), {"total_memory": (40 + i) * 2**30})())
    res = invoke_cli(*_sft_args(tmp_path / "o", "--gpu-memory", "80"))
    said = " ".join(res.stderr.split())
    assert res.exit_code == 1 and said.startswith("error: out of GPU memory while writing checkpoint-00000004: CUDA "
                                                  "out of memory. GPU memory: 43.000 GiB per GPU (this rank's GPU)"), said

    def broken(*args: Any) -> None:
        raise ImportError("a remote-code config")

    monkeypatch.setattr(gpu_memory, "estimate", broken)
    res = invoke_cli(*_sft_args(tmp_path / "o", "--gpu-memory", "80"))
    said = " ".join(res.stderr.split())
    assert res.exit_code == 1 and "GPU memory:" not in said and "What lowers it: a smaller" in said, said
    assert "Traceback" not in res.stderr


def test_a_ppo_rank_out_of_gpu_memory_also_names_the_rollout_and_scoring_batches(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from rlhf_cli import app

    def fail(*args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    _not_a_worker(monkeypatch)
    monkeypatch.setattr(app, "_train_here", fail)
    res = invoke_cli(*_ppo_args(tmp_path))
    said = " ".join(res.stderr.split())
    assert res.exit_code == 1 and ("a smaller train.forward_batch_size (the scoring forwards) or "
                                   "train.rollout_batch_size (the sampling's KV cache)") in said, said


def test_gpu_memory_must_be_a_positive_finite_number_and_a_hostfile_run_asks_nvidia_smi_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_cli import gpu_memory

    _not_a_worker(monkeypatch)
    for bad in ("0", "-2", "inf", "nan", "1e7"):
        res = invoke_cli(*_sft_args(tmp_path / "o", "--dry-run", "--gpu-memory", bad))
        assert res.exit_code == 2 and "GiB of memory per GPU: a number above 0 and below 1e6" in res.output, bad
    monkeypatch.setattr(gpu_memory, "chosen_accelerator", lambda env: "cuda")
    monkeypatch.setattr(gpu_memory, "gpu_memory_of", lambda num_gpus: pytest.fail("asked this node's GPUs"))
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\n")
    assert gpu_memory.gpu_memory_for(2, hosts, None) is None  # (the workers use other nodes' GPUs)
    assert gpu_memory.gpu_memory_for(2, hosts, 24.0) == (24 * 2**30, "--gpu-memory")


def test_eval_out_of_gpu_memory_is_one_error_naming_its_batch_size_and_the_pipeline_passes_gpu_memory_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rlhf eval (also each of rlhf pipeline's evaluations: an `rlhf eval` process): exit 1, torch's message and
    --batch-size; --debug raises it. The pipeline passes --gpu-memory on to each stage's command."""
    import torch

    import stages.evaluate as evaluate
    import stages.pipeline as pipeline

    _not_a_worker(monkeypatch)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise oom

    import rlhf_cli.eval_options as eval_options

    monkeypatch.setattr(eval_options, "eval_settings", lambda *a: object())
    monkeypatch.setattr(evaluate, "evaluate", fail)
    res = invoke_cli("eval", str(tmp_path), "--batch-size", "12")
    said = " ".join(res.stderr.split())
    assert res.exit_code == 1 and said == ("error: out of GPU memory: CUDA out of memory. Tried to allocate 5.00 GiB "
                                           "What lowers it: a smaller --batch-size (now 12; rlhf pipeline: "
                                           "eval.batch_size), the prompts sampled and scored at once; --precision bf16 "
                                           "(the policy, baseline and reward model in 16-bit); --debug shows the "
                                           "traceback"), res.output
    assert invoke_cli("eval", str(tmp_path), "--debug").exception is oom
    launched: list[list[str]] = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, launch, *args: launched.append(launch))
    res = invoke_cli("pipeline", "-c", str(REPO / "configs" / "tiny" / "pipeline.yaml"), "--set",
                     f"output_dir={tmp_path / 'p'}", "--gpu-memory", "40")
    assert res.exit_code == 0 and launched == [["--gpu-memory", "40.0"]], res.output


def test_the_pipeline_passes_fit_micro_batch_on_and_compares_a_stage_as_it_will_fit_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlhf pipeline --fit-micro-batch`: the flag on each stage's command; the SFT config the pipeline resolves
    (what a complete stage's record is compared with) is the fitted one, and the plan says so; the RM's model
    is yet to be trained: fitted when it starts."""
    import stages.pipeline as pipeline

    _not_a_worker(monkeypatch)
    got: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, launch, force, out, resolved, *a: got.append(
        (launch, resolved)))
    best = _fitting_micro_batch(tmp_path / "x", 0.05)
    res = invoke_cli("pipeline", "-c", str(REPO / "configs" / "tiny" / "pipeline.yaml"), "--set",
                     f"output_dir={tmp_path / 'p'}", "--gpu-memory", "0.05", "--fit-micro-batch")
    said = " ".join(res.stdout.split())
    assert res.exit_code == 0 and got[0][0] == ["--gpu-memory", "0.05", "--fit-micro-batch"], res.output
    assert f"micro_batch_size: {best}\n" in got[0][1]["sft"] and "micro_batch_size: 16\n" not in got[0][1]["sft"]
    assert f"--fit-micro-batch: train.micro_batch_size 16 -> {best}," in said
    assert "rm (trained): " in said and "--fit-micro-batch: chosen when the stage starts" in said
    shapeless = tmp_path / "shapeless"  # a model folder whose config.json the estimate cannot build
    shapeless.mkdir()
    (shapeless / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    res = invoke_cli("pipeline", "-c", str(REPO / "configs" / "tiny" / "pipeline.yaml"), "--set",
                     f"output_dir={tmp_path / 'q'}", "--set",
                     f'sft.set=["model.from_config=null", "model.name_or_path={shapeless}"]', "--gpu-memory", "0.05",
                     "--fit-micro-batch", "--dry-run")
    assert res.exit_code == 2 and "stage sft" in res.stderr and "no memory estimate can be made" in " ".join(
        res.stderr.split()), res.output


def test_a_retrained_stage_is_fitted_afresh_and_a_record_is_kept_only_for_the_same_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline: a complete RM whose SFT is yet to be trained is retrained, so its plan line is not its old
    run's choice but "chosen when the stage starts" (its model's config.json is to be replaced), and its dry-run
    memory line shows what it would choose with SFT's architecture. `recorded_micro_batch`: the
    newest checkpoint's record (else a complete run's), kept only when micro x accumulation is the config's 16."""
    import yaml

    import stages.pipeline as pl
    from rlhf_cli.config_loader import load_config
    from rlhf_cli.micro_batch_fit import recorded_micro_batch
    from stages.memory import GIB, estimate, micro_batch_choices

    _not_a_worker(monkeypatch)
    rm = tmp_path / "p" / "rm"
    (rm / "final").mkdir(parents=True)
    (rm / "final" / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"], "num_labels": 1}')
    (rm / "resolved_config.yaml").write_text(yaml.safe_dump({"train": {"micro_batch_size": 4,
                                                                       "gradient_accumulation_steps": 4}}))
    res = invoke_cli("pipeline", "-c", str(REPO / "configs" / "tiny" / "pipeline.yaml"), "--set",
                     f"output_dir={tmp_path / 'p'}", "--gpu-memory", "0.05", "--fit-micro-batch", "--dry-run")
    said = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "rm (trained afresh" in said, res.output
    assert said.split("rm (trained afresh", 1)[1].split(" ppo-max (")[0].endswith(
        "--fit-micro-batch: chosen when the stage starts, from the config.json of its model, which an earlier stage "
        "is to train")
    # its memory line: estimated with SFT's architecture at the micro-batch the flag would choose for it (here 8,
    # not its record's 4), which the stage chooses again when it starts
    runs = pl.plan(load_config("pipeline", REPO / "configs" / "tiny" / "pipeline.yaml", [f"output_dir={tmp_path / 'p'}"]))
    loaded = {r.label: load_config(r.stage, r.config, r.overrides, preset=r.preset, not_yet=r.not_yet,
                                   flags=pl.override_flags(r)) for r in runs}
    stand_in = pl.estimate_configs([pl.StageAction(r, "train") for r in runs], loaded)["rm"][0]
    peaks = estimate(stand_in, 1, micro_batch_choices(stand_in))["peak_at_micro_batch"]
    best = max(m for m, peak in peaks.items() if peak <= 0.9 * 0.05 * GIB)
    rm_line = said.split(" rm: peak ", 1)[1].split(" ppo-max: peak ", 1)[0]
    assert best == 8 and rm_line == (
        f"{peaks[best] / GIB:.3f} GiB per rank at micro-batch 8, the largest that fits (with the model architecture "
        f"of sft, which this run trains first); fits ({(0.9 * 0.05 * GIB - peaks[best]) / GIB:.3f} GiB to spare); "
        "--fit-micro-batch chooses it again when the stage starts, from the config.json its model has then"), rm_line
    cfg = load_config("sft", TINY_SFT, [f"output_dir={rm}"])  # 16 rows per step
    assert recorded_micro_batch(rm, cfg) == {"train.micro_batch_size": 4, "train.gradient_accumulation_steps": 4}
    (rm / "resolved_config.yaml").write_text("train: {micro_batch_size: 8, gradient_accumulation_steps: 4}\n")
    assert recorded_micro_batch(rm, cfg) is None  # 32 rows: another batch
    ck = rm / "checkpoint-00000002"  # a checkpoint's record wins over output_dir's
    ck.mkdir()
    (ck / "COMPLETE").write_text("ok\n")
    (ck / "trainer_state.json").write_text('{"step": 2}')
    (ck / "resolved_config.yaml").write_text("train: {micro_batch_size: 4, gradient_accumulation_steps: 4}\n")
    assert recorded_micro_batch(rm, cfg) == {"train.micro_batch_size": 4, "train.gradient_accumulation_steps": 4}
    for odd in ("train: 5\n", "seed: 1\n", "[1, 2]\n", "train: {micro_batch_size: '4'}\n", ""):
        (ck / "resolved_config.yaml").write_text(odd)
        assert recorded_micro_batch(rm, cfg) is None, odd


def test_load_to_fit_tries_a_dividing_micro_batch_for_ppo_only_and_keeps_the_configs_own_error() -> None:
    from rlhf_cli.micro_batch_fit import DIVIDES_ANY, load_to_fit
    from stages.errors import ConfigError

    def load(extra: list[str]) -> str:
        if extra != [DIVIDES_ANY]:
            raise ConfigError("mini_batch_size (8) must be a multiple of micro_batch_size (16)")
        return "loaded"

    assert load_to_fit(load, "ppo", True) == ("loaded", True)
    with pytest.raises(ConfigError, match="must be a multiple"):
        load_to_fit(load, "sft", True)  # (SFT/RM keep micro x accumulation: nothing to retry)
    with pytest.raises(ConfigError, match="must be a multiple"):
        load_to_fit(load, "ppo", False)

    def broken(extra: list[str]) -> str:
        raise ConfigError("train: Input should be a mapping" if not extra else "--set train.micro_batch_size: train "
                          "is a int")

    with pytest.raises(ConfigError, match="Input should be a mapping"):
        load_to_fit(broken, "ppo", True)
