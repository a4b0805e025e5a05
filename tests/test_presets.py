"""The shipped GPU presets (configs/qwen2.5-0.5b, configs/qwen2.5-1.5b, configs/llama-7b-8gpu) and the cluster
scripts (scripts/run_pipeline.sh, scripts/slurm_pipeline.sh): every pipeline passes `rlhf pipeline --dry-run`
offline and wires the stages' model paths, every stage config validates as its stage, and the scripts build the
commands they promise. Nothing here downloads or trains anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROCESS_GROUP_VARS, REPO, run_cli
from rlhf_cli.config_loader import load_config
from stages.config import PipelineConfig
from stages.pipeline import plan

CONFIGS = REPO / "configs"
SCRIPTS = REPO / "scripts"
PRESETS = ["qwen2.5-0.5b", "qwen2.5-1.5b", "llama-7b-8gpu"]
STAGES = {"sft": "sft", "rm": "train-rm", "ppo": "ppo"}
PIPELINES = sorted(CONFIGS.rglob("pipeline.yaml"))
HUB_MODELS = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
              "llama-7b-8gpu": "meta-llama/Llama-2-7b-hf"}


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Offline, with an empty HF home and an endpoint nothing answers: any hub access would fail or leave files."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}


def plan_lines(stdout: str) -> dict[str, str]:
    """`label (action): command` lines of the printed plan, by label."""
    lines = {}
    for line in stdout.splitlines():
        label, sep, rest = line.partition(": ")
        if sep and " -m rlhf_cli " in rest:
            lines[label.strip().split(" (", 1)[0]] = rest
    return lines


def expected_runs(pipeline: Path) -> list[tuple[str, str]]:
    cfg = load_config("pipeline", pipeline)
    assert isinstance(cfg, PipelineConfig)
    return [(r.label, r.stage) for r in plan(cfg)]


# ----------------------------------------------------------------------------------------- pipelines
def test_every_preset_folder_is_complete():
    for name in PRESETS:
        folder = CONFIGS / name
        assert {p.name for p in folder.glob("*.yaml")} >= {"sft.yaml", "rm.yaml", "ppo.yaml", "pipeline.yaml"}, name
    assert (CONFIGS / "llama-7b-8gpu" / "hostfile.example").is_file()
    assert {CONFIGS / name / "pipeline.yaml" for name in PRESETS} <= set(PIPELINES)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_pipeline_dry_run_prints_a_wired_plan(pipeline, tmp_path):
    env = offline_env(tmp_path)
    result = run_cli("pipeline", "--config", str(pipeline), "--dry-run", env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run: every config is valid" in result.stdout
    lines = plan_lines(result.stdout)
    runs = expected_runs(pipeline)
    assert list(lines) == [label for label, _ in runs]  # one line per stage, in order
    out = Path(load_config("pipeline", pipeline).output_dir)
    for label, stage in runs:
        line = lines[label]
        assert f"-m rlhf_cli {stage} --config " in line
        assert f"output_dir={out / label}" in line
        if stage == "train-rm":
            assert f"model.name_or_path={out / 'sft'}" in line
        if stage == "ppo":
            assert f"model.name_or_path={out / 'sft'}" in line
            assert f"reward_model.name_or_path={out / 'rm'}" in line
    assert not Path(env["HF_HOME"]).exists(), "a dry run touched the Hugging Face cache"
    sft = load_config("sft", pipeline.parent / "sft.yaml").model
    if sft.name_or_path:  # offline, the hub model is not in the (empty) cache: the SFT stage would stop first
        assert f"warning: pipeline stage sft: model.name_or_path {sft.name_or_path}: no such local folder" in \
            " ".join(result.stderr.split()), result.stderr


def test_llama_pipeline_dry_run_multi_node(tmp_path):
    """The 7B preset's documented launches: 8 GPUs, and 2 nodes from the example hostfile."""
    folder = CONFIGS / "llama-7b-8gpu"
    hostfile = folder / "hostfile.example"
    result = run_cli("pipeline", "--config", str(folder / "pipeline.yaml"), "--num-gpus", "8",
                     "--hostfile", str(hostfile), "--dry-run", env=offline_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = plan_lines(result.stdout)
    assert list(lines) == ["sft", "rm", "ppo-max"]
    for line in lines.values():
        assert "--num-gpus 8" in line and f"--hostfile {hostfile.resolve()}" in line
    # a stage shows the DeepSpeed launcher command it would run on the two hosts
    result = run_cli("sft", "--config", str(folder / "sft.yaml"), "--num-gpus", "8", "--hostfile", str(hostfile),
                     "--dry-run", env=offline_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deepspeed.launcher.runner" in result.stdout and f"--hostfile {hostfile.resolve()}" in result.stdout


def test_hostfile_example_lists_two_8_gpu_nodes():
    from rlhf_cli.launcher import hostfile_slots

    assert hostfile_slots(CONFIGS / "llama-7b-8gpu" / "hostfile.example") == {"node1": 8, "node2": 8}


# ----------------------------------------------------------------------------------------- stage configs
def load_stage(folder: str, stem: str):
    """A preset's stage config as its stage validates it; earlier stages' outputs need not exist yet."""
    path = CONFIGS / folder / f"{stem}.yaml"
    not_yet = {"model.name_or_path", "reward_model.name_or_path"} if stem != "sft" else set()
    return load_config(STAGES[stem], path, not_yet=not_yet)


@pytest.mark.parametrize("folder", PRESETS)
@pytest.mark.parametrize("stem", list(STAGES))
def test_stage_config_validates_with_header(folder, stem):
    cfg = load_stage(folder, stem)
    assert cfg.deepspeed.precision == "bf16"
    assert_header(CONFIGS / folder / f"{stem}.yaml")


def assert_header(path: Path) -> None:
    """The file opens with a comment giving the command that runs it, what it reads and writes, and memory/time."""
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))])
    rel = path.relative_to(REPO).as_posix()
    assert f"rlhf {'pipeline' if path.stem == 'pipeline' else ''}".strip() in header and rel in header, path
    for word in ("Reads", "Writes", "Memory"):
        assert word in header, (path, word)


@pytest.mark.parametrize("folder", PRESETS)
def test_pipeline_headers(folder):
    assert_header(CONFIGS / folder / "pipeline.yaml")
    if folder == "llama-7b-8gpu":
        header = (CONFIGS / folder / "pipeline.yaml").read_text()
        assert "rlhf pipeline --config configs/llama-7b-8gpu/pipeline.yaml --num-gpus 8" in header
        assert "--hostfile" in header


@pytest.mark.parametrize("folder", PRESETS)
def test_presets_read_hub_ids_and_chain_their_outputs(folder):
    """Hub ids stay strings (nothing is looked up); the standalone configs hand outputs on like the pipeline."""
    sft, rm, ppo = (load_stage(folder, s) for s in STAGES)
    assert sft.model.name_or_path == HUB_MODELS[folder]
    for cfg in (sft, rm, ppo):
        assert cfg.data.train.path == "Anthropic/hh-rlhf" and cfg.data.format == "hh"
        assert cfg.data.eval is not None and cfg.data.eval.path == "Anthropic/hh-rlhf"
    assert Path(rm.model.name_or_path) == Path(sft.output_dir)
    assert Path(ppo.model.name_or_path) == Path(sft.output_dir)
    assert Path(ppo.reward_model.name_or_path) == Path(rm.output_dir)
    # the RM sees whole PPO episodes: prompt budget + response cap fit in its max_length
    assert ppo.data.max_prompt_length + ppo.generation.max_new_tokens <= rm.data.max_length
    pipe = load_config("pipeline", CONFIGS / folder / "pipeline.yaml")
    assert Path(sft.output_dir) == Path(pipe.output_dir) / "sft" and Path(rm.output_dir) == Path(pipe.output_dir) / "rm"
    assert [r.preset for r in pipe.ppo_runs] == ["ppo-max"]


@pytest.mark.parametrize("folder", PRESETS)
def test_ppo_presets_use_ppo_max(folder):
    from stages.ppo.presets import PRESETS as TRICKS

    ppo = load_stage(folder, "ppo")
    assert ppo.ppo.preset == "ppo-max"
    for key in ("kl_coef", "reward_norm", "reward_clip", "value_clip", "critic_pretrain_steps", "lam"):
        assert getattr(ppo.ppo, key) == TRICKS["ppo-max"][f"ppo.{key}"], key
    t = ppo.train
    assert t.rollout_batch_size % t.mini_batch_size == 0 and t.mini_batch_size % t.micro_batch_size == 0


def test_seven_b_preset_is_zero3_with_checkpointing():
    for stem in STAGES:
        cfg = load_stage("llama-7b-8gpu", stem)
        assert cfg.deepspeed.zero_stage == 3 and cfg.model.gradient_checkpointing, stem
    ppo = load_stage("llama-7b-8gpu", "ppo")
    assert ppo.deepspeed.frozen_zero_stage == 3 and ppo.deepspeed.frozen_stage == 3
    assert ppo.reward_model.gradient_checkpointing
    # per rank on 8 GPUs: the paper's buffer of 128 rollouts in mini-batches of 32
    assert ppo.train.rollout_batch_size * 8 == 128 and ppo.train.mini_batch_size * 8 == 32


# ----------------------------------------------------------------------------------------- scripts
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="needs bash")
#: variables the scripts read; removed so the host's values do not leak into the tests
SCRIPT_VARS = ("NUM_GPUS", "GPUS_PER_NODE", "RLHF", "DRY_RUN", "DS_ENV_FILE", "RLHF_JOB_DIR", "OMP_NUM_THREADS",
               "CUDA_VISIBLE_DEVICES",
               "SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "SLURM_CPUS_ON_NODE", "SLURM_SUBMIT_DIR")


def run_script(name: str, *args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    full.update({"RLHF": f"{sys.executable} -m rlhf_cli", "TMPDIR": str(tmp_path), "COLUMNS": "200",
                 "PYTHONUNBUFFERED": "1", **offline_env(tmp_path), **env})
    for var in PROCESS_GROUP_VARS:
        full.pop(var, None)
    return subprocess.run([BASH, str(SCRIPTS / name), *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=300)


def stub_scontrol(tmp_path: Path) -> Path:
    """A `scontrol` that expands any node list to two hosts, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text('#!/bin/sh\n[ "$1" = show ] && [ "$2" = hostnames ] || exit 1\nprintf "gpu-a01\\ngpu-a02\\n"\n')
    stub.chmod(0o755)
    return bin_dir


@needs_bash
@pytest.mark.parametrize("name", ["run_pipeline.sh", "slurm_pipeline.sh"])
def test_scripts_parse(name):
    path = SCRIPTS / name
    result = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.access(path, os.X_OK)


@needs_bash
def test_slurm_script_builds_the_hostfile(tmp_path):
    slurm = {"PATH": f"{stub_scontrol(tmp_path)}{os.pathsep}{os.environ['PATH']}",
             "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_ID": "4242", "HF_HOME": "/shared/hf"}
    config = "configs/llama-7b-8gpu/pipeline.yaml"
    home = tmp_path / "home"  # a ~/.deepspeed_env, which DeepSpeed reads only without DS_ENV_FILE
    home.mkdir()
    (home / ".deepspeed_env").write_text("WANDB_API_KEY=abc\n\nLD_LIBRARY_PATH=/opt/x=1\n")
    result = run_script("slurm_pipeline.sh", config, "--force", env={**slurm, "DRY_RUN": "1", "HOME": str(home)},
                        tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job_dir = tmp_path / "rlhf-slurm-4242"
    hostfile = job_dir / "hostfile"
    assert hostfile.read_text() == "gpu-a01 slots=8\ngpu-a02 slots=8\n"
    command = result.stdout.strip().splitlines()[-1]
    assert f"pipeline --config {config}" in command
    assert f"--hostfile {hostfile}" in command and "--num-gpus 8" in command and command.endswith("--force")
    # the workers on the other node get the Hugging Face settings through DeepSpeed's environment file
    env_lines = (job_dir / "deepspeed_env").read_text().splitlines()
    assert env_lines[:2] == ["WANDB_API_KEY=abc", "LD_LIBRARY_PATH=/opt/x=1"] and "HF_HOME=/shared/hf" in env_lines

    # without DRY_RUN the real CLI runs; its own --dry-run shows every stage launched on the two hosts
    result = run_script("slurm_pipeline.sh", config, "--dry-run", env=slurm, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = plan_lines(result.stdout)
    assert list(lines) == ["sft", "rm", "ppo-max"]
    assert all(f"--hostfile {hostfile}" in line and "--num-gpus 8" in line for line in lines.values())

    result = run_script("slurm_pipeline.sh", config, env={**slurm, "DRY_RUN": "1", "GPUS_PER_NODE": "4"},
                        tmp_path=tmp_path)
    assert result.returncode == 0 and "--num-gpus 4" in result.stdout
    assert hostfile.read_text() == "gpu-a01 slots=4\ngpu-a02 slots=4\n"
    assert "MASTER_ADDR=gpu-a01;" in result.stderr  # the rendezvous: the first node, by name
    # the launch shape is the allocation's: an option that sets it is refused, not silently stacked
    result = run_script("slurm_pipeline.sh", config, "--num-gpus", "2", env={**slurm, "DRY_RUN": "1"}, tmp_path=tmp_path)
    assert result.returncode == 2 and "--num-gpus is set from the allocation" in result.stderr
    result = run_script("slurm_pipeline.sh", "--help", env={}, tmp_path=tmp_path)
    assert result.returncode == 0 and "GPUS_PER_NODE" in result.stdout and "SBATCH" not in result.stdout


@needs_bash
def test_slurm_script_refuses_outside_an_allocation(tmp_path):
    result = run_script("slurm_pipeline.sh", env={"DRY_RUN": "1"}, tmp_path=tmp_path)
    assert result.returncode == 2 and "SLURM_JOB_NODELIST" in result.stderr


@needs_bash
def test_run_pipeline_script(tmp_path):
    config = "configs/qwen2.5-0.5b/pipeline.yaml"
    result = run_script("run_pipeline.sh", config, "--force", env={"DRY_RUN": "1", "NUM_GPUS": "4"}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"pipeline --config {config} --num-gpus 4 --force" in result.stdout
    # an explicit --num-gpus wins over NUM_GPUS and is not doubled
    result = run_script("run_pipeline.sh", config, "--num-gpus", "2", env={"DRY_RUN": "1", "NUM_GPUS": "4"},
                        tmp_path=tmp_path)
    assert result.stdout.count("--num-gpus") == 1 and "--num-gpus 2" in result.stdout
    # the GPUs CUDA_VISIBLE_DEVICES lists (what this job may use), not every GPU of the node
    result = run_script("run_pipeline.sh", config, env={"DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": "0,1"}, tmp_path=tmp_path)
    assert "--num-gpus 2" in result.stdout
    # OMP_NUM_THREADS = cores / processes per node, also for an explicit --num-gpus (it used to count 1 there)
    show = tmp_path / "show-threads"
    show.write_text("#!/bin/sh\necho \"$OMP_NUM_THREADS\"\n")
    show.chmod(0o755)
    cores = len(os.sched_getaffinity(0))
    for args, env, per_node in ((("--num-gpus", "3"), {}, 3), (("--num-gpus=3",), {}, 3),
                                ((), {"CUDA_VISIBLE_DEVICES": "0,1"}, 2), ((), {"NUM_GPUS": "1"}, 1)):
        result = run_script("run_pipeline.sh", config, *args, env={"RLHF": str(show), **env}, tmp_path=tmp_path)
        assert result.stdout.split() == [str(max(1, cores // per_node))], (args, env, result.stderr)
    # the real CLI through the script
    result = run_script("run_pipeline.sh", config, "--dry-run", env={"NUM_GPUS": "1"}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(plan_lines(result.stdout)) == ["sft", "rm", "ppo-max"]
    # usage errors
    assert run_script("run_pipeline.sh", env={}, tmp_path=tmp_path).returncode == 2
    missing = run_script("run_pipeline.sh", "configs/nope.yaml", env={}, tmp_path=tmp_path)
    assert missing.returncode == 2 and "config not found" in missing.stderr
    for bad in ("abc", "0"):  # NUM_GPUS: a whole number of at least 1 (where it is used)
        res = run_script("run_pipeline.sh", config, env={"DRY_RUN": "1", "NUM_GPUS": bad}, tmp_path=tmp_path)
        assert res.returncode == 2 and f"NUM_GPUS must be a whole number of at least 1, got '{bad}'" in res.stderr
    res = run_script("run_pipeline.sh", config, "--num-gpus", "2", env={"DRY_RUN": "1", "NUM_GPUS": "all"}, tmp_path=tmp_path)
    assert res.returncode == 0 and "--num-gpus 2" in res.stdout
    res = run_script("run_pipeline.sh", config, env={"DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": ""}, tmp_path=tmp_path)
    assert res.returncode == 0 and "--num-gpus" not in res.stdout  # set but empty: no GPU for this job
    res = run_script("run_pipeline.sh", config, "--hostfile", "h", env={"DRY_RUN": "1", "NUM_GPUS": "2"}, tmp_path=tmp_path)
    assert "--num-gpus" not in res.stdout and "NUM_GPUS=2 not passed on" in res.stderr
    res = run_script("run_pipeline.sh", "--help", env={}, tmp_path=tmp_path)
    assert res.returncode == 0 and "DRY_RUN=1" in res.stdout  # the whole header, its Environment section too


def test_preset_yaml_is_plain_mapping():
    """Every new YAML parses to a mapping (no tabs, no duplicate-key surprises from hand editing)."""
    for name in PRESETS:
        for path in (CONFIGS / name).glob("*.yaml"):
            assert "\t" not in path.read_text(), path
            assert isinstance(yaml.safe_load(path.read_text()), dict), path
