"""Deciding whether to run in this process or under the `deepspeed` launcher, and building its command.

With --num-gpus N > 1, --num-nodes M > 1 or a hostfile, and when this process was not itself started by a
launcher, the CLI re-executes itself as

    python -m deepspeed.launcher.runner [--hostfile F] [--num_nodes M] [--num_gpus N] --master_port P
        --log_level error|warning --no_local_rank --module rlhf_cli <stage> --config <output_dir>/resolved_config.yaml
        [--resume]

so every worker reads the same resolved config. Without CUDA the workers use DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import psutil

from rlhf_cli.config_loader import read_user_text
from stages.runtime import call_forwarding_signals, chosen_accelerator, free_port, missing_accelerator
from stages.errors import ConfigError
from stages.stop import SIGNALS, STOP_FILE_VAR, stops_at_once, write_request


def inside_launcher(env: dict[str, str] | None = None) -> bool:
    """True in a worker started by deepspeed/torchrun (they set LOCAL_RANK and WORLD_SIZE)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def check_not_a_bare_srun_task(env: dict[str, str] | None = None) -> None:
    """A ConfigError in one of several tasks of an `srun` step that sets none of the process-group variables
    (`srun -n 16 rlhf sft ...`): each task would take itself for a whole one-process run, 15 of them stopping
    on the output directory's lock while one trained on a single GPU."""
    env = os.environ if env is None else env
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if inside_launcher(env) or not tasks.isdigit() or int(tasks) <= 1:
        return
    raise ConfigError(
        f"this is task {env.get('SLURM_PROCID', '?')} of {tasks} of an srun step, but RANK/LOCAL_RANK/WORLD_SIZE/"
        "MASTER_ADDR/MASTER_PORT are not set: run one task per job (`srun -n 1 rlhf ... --num-gpus N`, or "
        "--hostfile for several nodes), or have each task export those variables (from SLURM_PROCID, "
        "SLURM_LOCALID, SLURM_STEP_NUM_TASKS and the first node's address); in an interactive shell of a "
        "several-task step (`srun -n 8 --pty bash`), `unset SLURM_STEP_NUM_TASKS` first")


def check_launch_options(num_gpus: int | None, num_nodes: int | None, hostfile: Path | None,
                         env: dict[str, str] | None = None) -> None:
    """In a worker of another launcher (torchrun, srun with the variables), --num-gpus / --num-nodes /
    --hostfile start no launch: given for another process count than the launcher's WORLD_SIZE, a ConfigError
    (they were silently ignored, the run training on the launcher's count)."""
    env = os.environ if env is None else env
    if not inside_launcher(env) or (num_gpus, num_nodes, hostfile) == (None, None, None):
        return
    asked, have = world_size(num_gpus, num_nodes, hostfile), env["WORLD_SIZE"]
    if str(asked) != have.strip():
        raise ConfigError(f"--num-gpus / --num-nodes / --hostfile ask for {asked} process(es), but this process is "
                          f"a worker of another launcher (torchrun, srun, ...) that started WORLD_SIZE={have}: that "
                          "launcher's options set the process count; leave these out")


def launched_by_rlhf(env: dict[str, str] | None = None) -> bool:
    """True in a worker that `rlhf` itself launched (it already prepared the output directory)."""
    env = os.environ if env is None else env
    return env.get(LAUNCHED_MARK) == "1"


#: set by `rlhf` for the workers it launches. Named with a PYTHON prefix because DeepSpeed's multi-node runner
#: (pdsh) forwards to the other nodes only variables with certain prefixes (deepspeed.launcher.runner.EXPORT_ENVS)
#: or listed in .deepspeed_env; without it, workers on every node would take the "user's own launcher" path and
#: prepare the output directory a second time
LAUNCHED_MARK = "PYTHON_RLHF_LAUNCHED"
#: a --hostfile run's stop file, in output_dir (see StopFileRequest)
STOP_FILE = ".rlhf-stop"
#: said after the workers' clean stop (exit 128 + signal), which DeepSpeed's launcher logs as
#: "[ERROR] [launch.py:...:sigkill_handler] [...] exits with return code = 143"
LAUNCHER_STOP_NOTE = ("the workers saved and stopped as asked, which DeepSpeed's launcher logs as an [ERROR] with "
                      "their exit code all the same")


#: the hostfile DeepSpeed's runner reads when given none (deepspeed.launcher.runner.DLTS_HOSTFILE): where it
#: exists, a launch without --hostfile would become a multi-node one over ssh, unlike what rlhf counted
DS_DEFAULT_HOSTFILE = Path("/job/hostfile")


def needs_launcher(num_gpus: int | None, num_nodes: int | None, hostfile: Path | None) -> bool:
    return (num_gpus or 1) > 1 or (num_nodes or 1) > 1 or hostfile is not None


def hostfile_slots(hostfile: Path) -> dict[str, int]:
    """Parse DeepSpeed's hostfile format: one `hostname slots=N` per line, `#` comments."""
    if not hostfile.is_file():
        raise ConfigError(f"--hostfile: file not found: {hostfile}")
    hosts: dict[str, int] = {}
    text = read_user_text(hostfile, "--hostfile")
    if text.startswith("\ufeff"):
        raise ConfigError(f"{hostfile} begins with a byte-order mark, which DeepSpeed's runner reads as part of "
                          "the first host's name; save the file without it (as UTF-8 without BOM)")
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise ConfigError(f"{hostfile} line {lineno}: expected 'hostname slots=N', got {line!r}")
        if parts[0] in hosts:
            raise ConfigError(f"{hostfile} line {lineno}: host {parts[0]} is listed twice")
        try:
            hosts[parts[0]] = int(parts[1][len("slots="):])
        except ValueError:
            raise ConfigError(f"{hostfile} line {lineno}: slots must be an integer, got {parts[1]!r}") from None
        if hosts[parts[0]] < 1:
            raise ConfigError(f"{hostfile} line {lineno}: slots must be at least 1, got {parts[1]!r}")
    if not hosts:
        raise ConfigError(f"{hostfile}: no hosts listed")
    return hosts


def launch_command(
    stage: str,
    resolved_config: Path,
    num_gpus: int | None,
    num_nodes: int | None,
    hostfile: Path | None,
    resume: bool,
    master_port: int | None = None,
) -> list[str]:
    """The exact command that starts the workers (run with `launch_env`)."""
    if (num_nodes or 1) > 1 and hostfile is None:
        raise ConfigError("--num-nodes > 1 needs --hostfile (DeepSpeed's format: one 'hostname slots=N' per line)")
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        slots = hostfile_slots(hostfile)
        if (num_nodes or 0) > len(slots):
            raise ConfigError(f"--num-nodes {num_nodes} but {hostfile} lists {len(slots)} host(s)")
        short = {host: n for host, n in list(slots.items())[: num_nodes or None] if n < (num_gpus or 0)}
        if short:  # the runner gives every host --num_gpus workers whatever its slots say
            listed = ", ".join(f"{host} slots={n}" for host, n in short.items())
            raise ConfigError(f"--num-gpus {num_gpus} (workers per host) but {hostfile} gives {listed}; DeepSpeed's "
                              "runner would start that many there anyway: lower --num-gpus, raise those hosts' "
                              "slots=, or leave --num-gpus out to use each host's slots")
        cmd += ["--hostfile", str(hostfile.resolve())]  # (the printed line may be run from another folder)
        if num_nodes is not None:
            cmd += ["--num_nodes", str(num_nodes)]
    elif DS_DEFAULT_HOSTFILE.is_file():  # no --hostfile means this node only: a path that is no file says so
        cmd += ["--hostfile", os.devnull]
    if num_gpus is not None or hostfile is None:  # (CUDA_VISIBLE_DEVICES names GPUs, none on a CPU run)
        this_node_gpus = hostfile is None and chosen_accelerator(os.environ) == "cuda"
        cmd += gpu_selection(num_gpus or 1, visible_gpu_ids() if this_node_gpus else [], hostfile is None)
    if hostfile is None:  # single node: a free port avoids clashes with other jobs on this host
        cmd += ["--master_port", str(master_port or free_port())]
    else:
        if master_port is not None or os.environ.get("MASTER_PORT"):  # multi-node: the user's port, else 29500
            cmd += ["--master_port", str(master_port or os.environ["MASTER_PORT"])]
        if os.environ.get("MASTER_ADDR"):  # else the runner's guess: the first address `hostname -I` lists
            cmd += ["--master_addr", os.environ["MASTER_ADDR"]]
    # on one node the runner's only warning is "Unable to find hostfile, will proceed with ... local resources
    # only" (on every run); its errors, and a worker's own output, still show
    level = "warning" if hostfile is not None else "error"
    cmd += ["--log_level", level, "--no_local_rank", "--module", "rlhf_cli", stage, "--config", str(resolved_config)]
    if resume:
        cmd.append("--resume")
    return cmd


def visible_gpu_ids() -> list[str]:
    """The GPU indices CUDA_VISIBLE_DEVICES lists, up to its first invalid entry as CUDA reads it ([] when unset,
    empty or hiding every GPU: -1); GPUs named by UUID (`GPU-…`, a unique prefix as CUDA takes it) are turned
    into their indices with nvidia-smi. A MIG instance, or a UUID nvidia-smi cannot place, is a ConfigError:
    DeepSpeed's runner selects GPUs by index only, and would otherwise drop the variable and start ranks on
    GPUs 0..N-1."""
    ids: list[str] = []
    for d in (d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")):
        if not (d.isdigit() or d.startswith(("GPU-", "MIG-"))):
            break  # as CUDA reads it: an invalid entry (-1, NoDevFiles, "") hides it and all after it
        ids.append(d)
    if all(d.isdigit() for d in ids):
        return ids
    known = gpu_uuids()
    out = []
    for d in ids:
        found = [index for index, uuid in known.items() if uuid.startswith(d)] if not d.isdigit() else [d]
        if len(found) != 1 or d.startswith("MIG-"):
            raise ConfigError(
                f"CUDA_VISIBLE_DEVICES names {d!r}, which rlhf cannot hand to DeepSpeed's runner (it selects GPUs "
                "by index, and drops CUDA_VISIBLE_DEVICES); give the GPUs' indices (nvidia-smi -L lists them), or "
                "start the workers with your own launcher (torchrun, srun)")
        out.append(found[0])
    return out


def nvidia_smi(fields: str, units: bool = True) -> list[list[str]]:
    """This node's GPUs, one row of `nvidia-smi --query-gpu=FIELDS` values each (stripped; lines without every
    field, such as a warning, passed over); [] without nvidia-smi or when it fails. It creates no CUDA context:
    the launching process never touches the GPUs its workers use. units=False: numbers without their units."""
    import subprocess

    form = "csv,noheader" if units else "csv,noheader,nounits"
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", f"--format={form}"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    width = fields.count(",") + 1
    rows = ([v.strip() for v in line.split(",")] for line in res.stdout.splitlines()) if res.returncode == 0 else ()
    return [row for row in rows if len(row) == width]


def gpu_uuids() -> dict[str, str]:
    """index -> UUID of this node's GPUs, from nvidia-smi ({} without it)."""
    return {index: uuid for index, uuid in nvidia_smi("index,uuid")}


def gpus_named_by_uuid() -> bool:
    """Whether CUDA_VISIBLE_DEVICES names a GPU by UUID (`GPU-…`): `visible_gpu_ids` then gives nvidia-smi's
    indices, which are PCI-bus order."""
    return any(d.strip().startswith("GPU-") for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(","))


def numbered_as_nvidia_smi() -> bool:
    """Whether a GPU index means the same GPU to CUDA as to nvidia-smi: nvidia-smi numbers a node's GPUs in
    PCI-bus order, CUDA (CUDA_DEVICE_ORDER unset or FASTEST_FIRST) fastest first — the same order on a node of
    one GPU model, maybe not on one that mixes models. So: with CUDA_DEVICE_ORDER=PCI_BUS_ID, or GPUs named by
    UUID (whose workers rlhf's launch runs with PCI_BUS_ID, `launch_env`)."""
    return os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or gpus_named_by_uuid()


def gpu_memory(num_gpus: int | None) -> int | None:
    """Bytes of memory of the smallest GPU a run of `num_gpus` (1 if None) ranks on this node uses — the first of
    CUDA_VISIBLE_DEVICES's GPUs, else GPUs 0, 1, ... —, from nvidia-smi; None without it (or a GPU it does not
    list, or a MIG instance in CUDA_VISIBLE_DEVICES). On a node whose GPUs differ in memory, unless an index
    means the same GPU to CUDA as to nvidia-smi (`numbered_as_nvidia_smi`), the smallest of all its GPUs (None
    when nvidia-smi cannot tell one's memory)."""
    rows = nvidia_smi("index,memory.total", units=False)
    mib = {index: int(total) for index, total in rows if total.isdigit()}
    try:
        visible = visible_gpu_ids()
    except ConfigError:
        return None
    used = (visible or [str(i) for i in range(num_gpus or 1)])[: num_gpus or 1]
    if any(index not in mib for index in used):
        return None
    if len({total for _, total in rows}) > 1 and not numbered_as_nvidia_smi():
        used = [index for index, _ in rows]  # which of them CUDA's indices name is not known here
        if len(mib) < len(used):
            return None
    return min(mib[index] for index in used) * 2**20


def gpu_selection(count: int, visible: list[str], this_node: bool = True) -> list[str]:
    """The runner's arguments for `count` GPUs of this node: the first `count` of CUDA_VISIBLE_DEVICES's ids
    (`--include localhost:4,5`) when it lists some, since DeepSpeed's runner, given --num_gpus, drops
    CUDA_VISIBLE_DEVICES and starts ranks on GPUs 0..count-1 (someone else's, on a shared node); else
    `--num_gpus count`. More than it lists, or (when it is unset, for a run on `this_node`, with CUDA) than
    nvidia-smi finds, is a ConfigError (the runner would start the extra ranks anyway, each failing with a CUDA
    error). A multi-node run's nodes are not this one: their GPUs are not counted here."""
    if not visible:
        present = gpu_uuids() if this_node and chosen_accelerator(os.environ) == "cuda" else {}
        if present and count > len(present):
            raise ConfigError(f"--num-gpus {count} but nvidia-smi finds {len(present)} GPU(s) on this node")
        return ["--num_gpus", str(count)]
    if count > len(visible):
        raise ConfigError(f"--num-gpus {count} but CUDA_VISIBLE_DEVICES={','.join(visible)} makes {len(visible)} "
                          "GPU(s) visible")
    return ["--include", "localhost:" + ",".join(visible[:count])]


def local_processes(num_gpus: int | None, hostfile: Path | None) -> int:
    """Workers per node: --num-gpus, else the largest slot count in the hostfile, else 1."""
    if num_gpus is not None:
        return num_gpus
    return max(hostfile_slots(hostfile).values()) if hostfile is not None else 1


def world_size(num_gpus: int | None, num_nodes: int | None, hostfile: Path | None) -> int:
    """The processes a run has, as DeepSpeed's runner counts them: without a hostfile --num-gpus (1 if not
    given); with one, over its first --num-nodes hosts (all by default), --num-gpus each when given, else each
    host's own slots (hosts may differ)."""
    if hostfile is None:
        return num_gpus or 1
    slots = list(hostfile_slots(hostfile).values())[: num_nodes or None]
    return sum(num_gpus or n for n in slots)


def launch_env(num_procs: int, stop_file: Path | None = None) -> dict[str, str]:
    """Variables added for the launcher: the mark that rlhf launched it, the CPU accelerator when there is no
    CUDA, OpenMP threads shared between the local workers (unless OMP_NUM_THREADS is set), for a multi-node
    run the stop file every rank watches (`stages.stop.STOP_FILE_VAR`; absolute: the other nodes read it), and
    for a single-node CUDA run whose CUDA_VISIBLE_DEVICES names GPUs by UUID CUDA_DEVICE_ORDER=PCI_BUS_ID: the
    runner is given their nvidia-smi indices (`visible_gpu_ids`), PCI-bus order, which CUDA's default order
    (fastest first) need not match on a node mixing GPU models."""
    added = {LAUNCHED_MARK: "1"}
    if stop_file is not None:
        added[STOP_FILE_VAR] = str(stop_file.resolve())
    elif chosen_accelerator(os.environ) == "cuda" and gpus_named_by_uuid():
        added["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    accelerator = missing_accelerator(os.environ)
    if accelerator is not None:
        added["DS_ACCELERATOR"] = accelerator
    if chosen_accelerator(os.environ) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        added["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, num_procs)))
    return added


def format_command(cmd: list[str], env: dict[str, str]) -> str:
    """The command as a shell line, with the variables it runs under in front, LAUNCHED_MARK aside: a copy of the
    line run by hand (in a requeue script, say) then starts workers of the user's own launch, whose rank 0 locks
    and prepares the output directory (`--resume`'s checks, `--overwrite`), which the mark would have skipped."""
    return shlex.join([f"{k}={v}" for k, v in env.items() if k != LAUNCHED_MARK] + cmd)


def run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher and return its exit code (the first failing worker's); then remove the shared-memory
    buffers its workers left on this host (`remove_shm_buffers`).

    The launcher runs in a session of its own, so a Ctrl-C in the terminal reaches this process only.
    SIGTERM / SIGINT received here are forwarded to this host's workers themselves (DeepSpeed's launcher,
    given the signal, would SIGKILL them 30 s later, perhaps mid-checkpoint); they save a checkpoint and exit
    with 128 + the signal number (stages/stop.py), which becomes this command's exit code. A multi-node run's
    workers (behind pdsh/ssh) get it through the stop file in `env` instead (`StopFileRequest`)."""
    stop_file = env.get(STOP_FILE_VAR)
    request = StopFileRequest(Path(stop_file)) if stop_file else None
    try:
        return call_forwarding_signals(cmd, {**os.environ, **env}, lambda proc: worker_processes(proc.pid), request)
    finally:
        if request is not None:
            request.path.unlink(missing_ok=True)
        if "--master_port" in cmd:
            remove_shm_buffers(int(cmd[cmd.index("--master_port") + 1]))


class StopFileRequest:
    """A multi-node run's way to pass SIGTERM / SIGINT on: the first is written to the stop file every rank
    reads after each step (stages.stop.file_request), and the ranks save and exit 128 + signal as if signalled.
    A repeated SIGTERM changes nothing; a second SIGINT at least 2 s after the first, or SIGHUP, is left to the
    usual forwarding (the launcher's process group: DeepSpeed's runner then stops every node at once). A request
    an earlier run left behind is removed when this one starts."""

    def __init__(self, path: Path) -> None:
        self.path, self.first, self.at = path, 0, 0.0
        path.unlink(missing_ok=True)

    def __call__(self, signum: int) -> bool:
        if signum not in SIGNALS:
            return False
        now = time.monotonic()
        if not self.first:
            self.first, self.at = signum, now
            try:
                write_request(self.path, signum)
            except OSError as exc:  # no way to reach the other nodes' ranks gently: the usual forwarding
                print(f"rlhf: could not write the stop file {self.path} ({exc}); stopping the workers", flush=True)
                return False
            return True
        return not stops_at_once(self.first, self.at, signum, now)


def worker_processes(launcher_pid: int) -> list["psutil.Process"]:
    """The training processes under the launcher started as `launcher_pid`: the children of DeepSpeed's
    runner / launch processes that are not such processes themselves. Their own children (inductor's compile
    workers, data-loader workers) are left out: a forwarded signal would kill them under a worker that is
    still finishing its step and checkpoint."""
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    launchers, others = {launcher_pid}, []
    for child in children:
        try:
            if any("deepspeed.launcher" in part for part in child.cmdline()):
                launchers.add(child.pid)
            else:
                others.append((child, child.ppid()))
        except psutil.Error:
            continue
    return [child for child, parent in others if parent in launchers]


#: where DeepSpeed's CPU accelerator keeps its shared-memory all-reduce buffers
SHM_DIR = Path("/dev/shm")


def remove_shm_buffers(port: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Delete `deepspeed_allreduce_buffer_<i>_<addr>_<port>_<rank>` files of the run that used `port`.

    DeepSpeed's CPU accelerator (shm all-reduce between local ranks) creates one such file per rank (about
    70 MB each with the default buffer) and never unlinks it; /dev/shm is RAM, so every multi-process CPU run
    used to leave ~140 MB of memory behind until the host ran out. Returns the files removed."""
    removed = []
    for f in shm_dir.glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            f.unlink()
            removed.append(f)
        except OSError:  # another user's, or already gone
            pass
    return removed
