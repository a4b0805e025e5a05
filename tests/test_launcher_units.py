"""rlhf_cli/launcher.py as pure functions: when a run needs DeepSpeed's launcher, the exact command and variables
it gets, hostfile parsing, GPU selection from nvidia-smi, and the stop file's fallbacks (no launch, no DeepSpeed
process; subprocess and the CPU count monkeypatched)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_cli import launcher
from stages.errors import ConfigError
from stages.runtime import check_worker_env
from stages.stop import STOP_FILE_VAR


@pytest.fixture
def no_gpu_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU node: no /job/hostfile, no CUDA_VISIBLE_DEVICES, no inherited MASTER_PORT/MASTER_ADDR."""
    monkeypatch.setattr(launcher, "DS_DEFAULT_HOSTFILE", tmp_path / "missing")
    for name in ("CUDA_VISIBLE_DEVICES", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def test_inside_launcher_needs_both_local_rank_and_world_size() -> None:
    """A leftover LOCAL_RANK alone (a shell that sourced a worker's environment) is no launcher's worker."""
    assert launcher.inside_launcher({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert not launcher.inside_launcher({"LOCAL_RANK": "0"})
    assert not launcher.inside_launcher({"WORLD_SIZE": "2"})
    assert not launcher.inside_launcher({})


def test_only_a_bare_task_of_a_several_task_srun_step_is_refused() -> None:
    """Refused: task 3 of 4 with no process-group variables; not refused: a one-task step, no step, a
    non-numeric count, or a task of a several-task step that has them (the user's script exported them)."""
    with pytest.raises(ConfigError, match="this is task 3 of 4 of an srun step"):
        launcher.check_not_a_bare_srun_task({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"})
    with pytest.raises(ConfigError, match=r"this is task \? of 2 of an srun step"):
        launcher.check_not_a_bare_srun_task({"SLURM_STEP_NUM_TASKS": "2"})
    for env in ({}, {"SLURM_STEP_NUM_TASKS": "1"}, {"SLURM_STEP_NUM_TASKS": ""}, {"SLURM_STEP_NUM_TASKS": "x"},
                {"SLURM_STEP_NUM_TASKS": "4", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}):
        assert launcher.check_not_a_bare_srun_task(env) is None, env


WORKER = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_a_world_size_without_the_rest_of_the_process_group_variables_is_refused() -> None:
    """A stray WORLD_SIZE (an `export`, a job system) used to end in DeepSpeed's MPI discovery (a traceback:
    no mpi4py); the missing variables are named. None of them, or all five, run."""
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE=2 is set, as in a worker of a launcher, but RANK, "
                                          "LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not: unset WORLD_SIZE"):
        check_worker_env({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="but MASTER_PORT is not"):
        check_worker_env({**WORKER, "MASTER_PORT": ""})
    for env in ({}, {"RANK": "0"}, {"LOCAL_RANK": "0", "MASTER_PORT": "1"}, WORKER):
        assert check_worker_env(env) is None, env


def test_launch_options_in_a_worker_of_another_launcher_must_match_its_process_count(tmp_path: Path) -> None:
    """Under torchrun --nproc_per_node 2, `--num-gpus 3` or a hostfile of 2 x 3 slots was silently ignored (2
    ranks trained): refused; the launcher's own count (or no option) runs; outside a launcher nothing is checked."""
    with pytest.raises(ConfigError, match=r"ask for 3 process\(es\), but this process is a worker of another "
                                          "launcher .* WORLD_SIZE=2"):
        launcher.check_launch_options(3, None, None, WORKER)
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=3\nb slots=3\n")
    with pytest.raises(ConfigError, match=r"ask for 6 process"):
        launcher.check_launch_options(None, 2, hosts, WORKER)
    assert launcher.check_launch_options(2, None, None, WORKER) is None
    assert launcher.check_launch_options(None, None, None, WORKER) is None
    assert launcher.check_launch_options(3, None, None, {}) is None


def test_needs_launcher_for_several_gpus_nodes_or_a_hostfile(tmp_path: Path) -> None:
    assert not launcher.needs_launcher(None, None, None) and not launcher.needs_launcher(1, 1, None)
    assert launcher.needs_launcher(2, None, None) and launcher.needs_launcher(None, 2, None)
    assert launcher.needs_launcher(None, None, tmp_path / "hosts")  # even one host of one slot: the runner's ssh
    assert launcher.needs_launcher(1, 1, tmp_path / "hosts")


def test_hostfile_parsing_keeps_order_skips_comments_and_names_the_bad_line(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# the job's nodes\n\nnode-b slots=2  # a small one\n   node-a   slots=8\n")
    assert list(launcher.hostfile_slots(hosts).items()) == [("node-b", 2), ("node-a", 8)]
    for text, said in (
        ("node-a slots=8\nnode-b slots=8 gpus=8\n", "line 2: expected 'hostname slots=N', got 'node-b slots=8 gpus=8'"),
        ("node-a gpus=8\n", "line 1: expected 'hostname slots=N', got 'node-a gpus=8'"),
        ("node-a\n", "line 1: expected 'hostname slots=N', got 'node-a'"),
        ("node-a slots=eight\n", "line 1: slots must be an integer, got 'slots=eight'"),
        ("node-a slots=-1\n", "line 1: slots must be at least 1, got 'slots=-1'"),
    ):
        hosts.write_text(text)
        with pytest.raises(ConfigError) as exc:
            launcher.hostfile_slots(hosts)
        assert str(exc.value) == f"{hosts} {said}"
    hosts.write_text("# every node commented out\n# node-a slots=8\n\n")
    with pytest.raises(ConfigError, match="no hosts listed"):
        launcher.hostfile_slots(hosts)
    with pytest.raises(ConfigError, match="--hostfile: file not found"):
        launcher.hostfile_slots(tmp_path / "nowhere")
    hosts.write_bytes(b"\xef\xbb\xbfnode-a slots=2\n")  # DeepSpeed's runner would read the host '\ufeffnode-a'
    with pytest.raises(ConfigError, match="begins with a byte-order mark"):
        launcher.hostfile_slots(hosts)


def test_the_single_node_launch_command_in_full(tmp_path: Path, no_gpu_env: None) -> None:
    """The given master port, --resume at the end, the runner's error-only log level."""
    config = tmp_path / "resolved_config.yaml"
    cmd = launcher.launch_command("ppo", config, 2, None, None, True, master_port=12345)
    assert cmd == [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                   "12345", "--log_level", "error", "--no_local_rank", "--module", "rlhf_cli", "ppo", "--config",
                   str(config), "--resume"]
    cmd = launcher.launch_command("sft", config, 2, None, None, False)
    assert "--resume" not in cmd and int(cmd[cmd.index("--master_port") + 1]) > 0  # a free port


def test_the_multi_node_launch_command_in_full(tmp_path: Path, no_gpu_env: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --num-gpus each host's own slots (no --num_gpus); a master port given to it is passed on;
    this node's CUDA_VISIBLE_DEVICES says nothing about the other nodes' GPUs."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    config = tmp_path / "c.yaml"
    cmd = launcher.launch_command("rm", config, None, None, hosts, False, master_port=23456)
    assert cmd == [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts), "--master_port",
                   "23456", "--log_level", "warning", "--no_local_rank", "--module", "rlhf_cli", "rm", "--config",
                   str(config)]
    monkeypatch.chdir(tmp_path)  # a relative hostfile is given to the runner absolute: the printed line runs anywhere
    assert launcher.launch_command("rm", config, None, None, Path("hosts"), False)[5] == str(hosts)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    cmd = launcher.launch_command("rm", config, 4, 2, hosts, False)
    assert cmd[cmd.index("--num_gpus") + 1] == "4" and "--include" not in cmd
    assert cmd[cmd.index("--num_nodes") + 1] == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-not-here")  # not looked up for the other nodes
    assert "--num_gpus" in launcher.launch_command("rm", config, 4, None, hosts, False)


def test_an_ambiguous_gpu_uuid_prefix_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA refuses a UUID prefix that matches two GPUs; rlhf must not pick one of them."""
    monkeypatch.setattr(launcher, "gpu_uuids", lambda: {"0": "GPU-ab12-x", "1": "GPU-ab34-y"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ab3,0")
    assert launcher.visible_gpu_ids() == ["1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ab")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES names 'GPU-ab', which rlhf cannot hand"):
        launcher.visible_gpu_ids()


def test_gpu_uuids_reads_nvidia_smi_and_nothing_from_a_failed_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(out: str, code: int):
        def run(cmd, **kwargs):
            calls.append(cmd)
            return subprocess.CompletedProcess(cmd, code, stdout=out, stderr="")
        return run

    monkeypatch.setattr(subprocess, "run", fake("0, GPU-aaaa-1111\n1, GPU-bbbb-2222\n", 0))
    assert launcher.gpu_uuids() == {"0": "GPU-aaaa-1111", "1": "GPU-bbbb-2222"}
    assert calls[-1] == ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"]
    monkeypatch.setattr(subprocess, "run", fake("0, GPU-aaaa-1111\n", 9))  # (a driver/library mismatch, say)
    assert launcher.gpu_uuids() == {}

    def missing(cmd, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert launcher.gpu_uuids() == {}


def test_local_processes_is_the_largest_hosts_slots_without_num_gpus(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=8\nnode-c slots=4\n")
    assert launcher.local_processes(None, hosts) == 8
    assert launcher.local_processes(3, hosts) == 3 and launcher.local_processes(None, None) == 1


def test_launch_env_shares_the_cores_between_the_local_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import runtime

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(STOP_FILE_VAR, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert launcher.launch_env(4) == {launcher.LAUNCHED_MARK: "1", "OMP_NUM_THREADS": "4"}
    assert launcher.launch_env(3)["OMP_NUM_THREADS"] == "5"
    assert launcher.launch_env(32)["OMP_NUM_THREADS"] == "1"  # never 0 (OpenMP's own default)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert "OMP_NUM_THREADS" not in launcher.launch_env(4)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # GPU workers: OpenMP left alone
    assert launcher.launch_env(4) == {launcher.LAUNCHED_MARK: "1"}
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(runtime, "cuda_available", lambda: False)  # no CUDA, none chosen: the CPU accelerator
    assert launcher.launch_env(2) == {launcher.LAUNCHED_MARK: "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "8"}


def test_the_stop_file_is_handed_to_the_workers_as_an_absolute_path(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The other nodes' ranks start in another directory: a relative output_dir's stop file must be resolved."""
    monkeypatch.chdir(tmp_path)
    env = launcher.launch_env(2, Path("out") / launcher.STOP_FILE)
    assert env[STOP_FILE_VAR] == str(tmp_path.resolve() / "out" / ".rlhf-stop")


def test_run_launcher_removes_the_shm_buffers_of_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    ran, removed = [], []
    monkeypatch.setattr(launcher, "call_forwarding_signals", lambda cmd, env, targets, request: ran.append(
        (cmd, env.get("X"), request)) or 3)
    monkeypatch.setattr(launcher, "remove_shm_buffers", lambda port: removed.append(port))
    assert launcher.run_launcher(["python", "--master_port", "4242", "--module", "rlhf_cli"], {"X": "1"}) == 3
    assert removed == [4242] and ran[0][1:] == ("1", None)  # no stop file: plain forwarding
    assert launcher.run_launcher(["python", "--hostfile", "h"], {}) == 3 and removed == [4242]


def test_a_stop_file_that_cannot_be_written_leaves_the_signal_to_the_usual_forwarding(tmp_path: Path,
                                                                                     capsys) -> None:
    path = tmp_path / "no-such-dir" / ".rlhf-stop"
    request = launcher.StopFileRequest(path)
    assert request(signal.SIGTERM) is False and not path.exists()
    assert f"could not write the stop file {path}" in capsys.readouterr().out


def test_cuda_visible_devices_is_read_up_to_its_first_invalid_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """As CUDA reads it: "3,-1,4" makes GPU 3 visible, not 4 (so two GPUs of it are refused)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,-1,4")
    assert launcher.visible_gpu_ids() == ["3"]
    with pytest.raises(ConfigError, match="--num-gpus 2 but CUDA_VISIBLE_DEVICES=3 makes 1 GPU"):
        launcher.gpu_selection(2, launcher.visible_gpu_ids())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 2, 0 ,,1")
    assert launcher.visible_gpu_ids() == ["2", "0"]


def test_the_printed_launch_line_is_shell_quoted_and_leaves_out_the_mark() -> None:
    """A copy of the dry run's line must run as printed: a path with a space stays one word."""
    cmd = ["python", "-m", "deepspeed.launcher.runner", "--config", "/runs/my run/resolved_config.yaml"]
    env = {launcher.LAUNCHED_MARK: "1", "OMP_NUM_THREADS": "4", STOP_FILE_VAR: "/runs/my run/.rlhf-stop"}
    assert launcher.format_command(cmd, env) == (
        f"OMP_NUM_THREADS=4 '{STOP_FILE_VAR}=/runs/my run/.rlhf-stop' python -m deepspeed.launcher.runner "
        "--config '/runs/my run/resolved_config.yaml'")


def test_gpu_memory_is_the_smallest_of_the_gpus_the_ranks_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi's MiB of the GPUs this node's ranks use: GPUs 0..N-1, or CUDA_VISIBLE_DEVICES's first N; the
    smallest of them. None when nvidia-smi fails or does not list a GPU the ranks use, or for a MIG instance.
    On a node mixing GPUs, CUDA's index means nvidia-smi's only in PCI_BUS_ID order, or for a GPU named by UUID;
    else the smallest GPU of the node (None when one's memory is not known)."""
    calls = []
    answer = {"out": "0, 81559\n1, 40960\n2, [N/A]\n", "code": 0}

    def run(cmd, **kwargs):
        calls.append(cmd)
        if "--query-gpu=index,uuid" in cmd:
            return subprocess.CompletedProcess(cmd, 0, stdout="0, GPU-aaaa\n1, GPU-bbbb\n", stderr="")
        return subprocess.CompletedProcess(cmd, answer["code"], stdout=answer["out"], stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert launcher.gpu_memory(None) == launcher.gpu_memory(1) == 81559 * 2**20
    assert calls[-1] == ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"]
    assert launcher.gpu_memory(2) == 40960 * 2**20
    assert launcher.gpu_memory(3) is None  # GPU 2's memory is not known
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert launcher.gpu_memory(1) == 40960 * 2**20
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert launcher.gpu_memory(1) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-abcd")
    assert launcher.gpu_memory(1) is None
    monkeypatch.delenv("CUDA_DEVICE_ORDER")  # fastest first: GPU 0 to CUDA may be nvidia-smi's 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert launcher.gpu_memory(1) is None  # the smallest of the node's GPUs, and GPU 2's is not known
    answer["out"] = "0, 81559\n1, 40960\n"
    assert launcher.gpu_memory(1) == 40960 * 2**20
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")  # a UUID names one GPU whatever the order
    assert launcher.gpu_memory(1) == 81559 * 2**20
    answer["out"] = "0, 81559\n1, 81559\n2, 81559\n"  # one model: the orders agree
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert launcher.gpu_memory(1) == 81559 * 2**20
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    answer["code"] = 9
    assert launcher.gpu_memory(1) is None


def test_gpus_named_by_uuid_are_launched_in_pci_bus_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Their nvidia-smi indices go to the runner: CUDA must number the GPUs as nvidia-smi does (PCI bus)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert launcher.launch_env(2)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "CUDA_DEVICE_ORDER" not in launcher.launch_env(2, Path("out") / launcher.STOP_FILE)  # other nodes
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # CUDA's own indices: left in the user's order
    assert "CUDA_DEVICE_ORDER" not in launcher.launch_env(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a CPU run uses no GPU
    assert "CUDA_DEVICE_ORDER" not in launcher.launch_env(2)
