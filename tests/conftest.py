"""Shared test set-up: offline, CPU accelerator, small thread counts, and helpers to run the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:  # (annotations only: torch is imported where a fixture needs it)
    import collections

    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# On pytest-xdist workers (`make test` starts 2) every process computes on one thread: two workers whose
# tests and CLI children each start a thread per core oversubscribe the cores (on 2 cores the suite took 31 min
# of CPU time this way, 57 min with a thread per core).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, which Python keeps and every
# child process inherits; the signal tests send SIGINT to rlhf as a terminal's Ctrl-C would, so it is handled as
# there (Python's handler here, the default in children).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = REPO / "configs" / "tiny" / "sft.yaml"
#: a stage config's `model` for loading data only: a one-layer llama whose tokenizer is trained on the data
ONE_LAYER_MODEL = {"from_config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}}
HH_NAME = "hh-rlhf-harmless-test-400.jsonl"
#: the real HH-RLHF sample lives beside the repository (../shared/data), never inside it
HH_CANDIDATES = [
    Path(os.environ["RLHF_HH_SAMPLE"]) if os.environ.get("RLHF_HH_SAMPLE") else None,
    REPO.parent / "shared" / "data" / HH_NAME,
    Path("/work/shared/data") / HH_NAME,
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not slow to a crawl when other processes hold the cores).
    Modules that want it: pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hh_sample() -> Path:
    """The 400 real HH-RLHF records beside the repository (never copied into it)."""
    for path in HH_CANDIDATES:
        if path is not None and path.is_file():
            return path
    pytest.skip(f"HH-RLHF sample not found (looked at {[str(p) for p in HH_CANDIDATES if p]}; set RLHF_HH_SAMPLE)")


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_sft_dict(tmp_path: Path, **train: Any) -> dict[str, Any]:
    """The shipped tiny SFT config, made absolute and pointed at tmp_path, with a short run by default."""
    cfg = yaml.safe_load(TINY_SFT.read_text())
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["data"]["train"] = str(TINY_SFT.parent / cfg["data"]["train"])
    cfg["train"].update({"max_steps": 30, "eval_every": 0, "save_every": 0, **train})
    cfg["logging"] = {"log_every": 1, "tensorboard": False}
    return cfg


#: modules whose tests (mostly multi-process DeepSpeed launches, 20-90 s each) are queued first when the suite
#: runs on several workers, so that no worker is left with one of them at the end
HEAVY_FIRST = ("test_sft", "test_reliability", "test_reward")


#: files whose tests must run in their file's order in a fresh process, as in a one-process run: test_bench's
#: census of the memory DeepSpeed engines hold counts the process's allocations, which depend on what ran before
#: (on a worker after other tests, a ZeRO-3 update's peak once came out 25 kB, 2.8 %, high). The whole file is one
#: group; with the most tests it is queued first, on a fresh worker.
WHOLE_FILE = ("test_bench",)


def xdist_group(item: pytest.Item) -> str | None:
    """The pytest-xdist group (`--dist loadgroup`) that keeps `item` on the worker holding its expensive fixture:
    its file for a WHOLE_FILE test, "pipeline_run" for every test of the session's tiny pipeline, its file for a
    test with another module-scoped fixture (one_thread excepted: it costs nothing), else None (any worker)."""
    if item.path.stem in WHOLE_FILE:
        return item.path.stem
    if "pipeline_run" in item.fixturenames:
        return "pipeline_run"
    defs = getattr(item, "_fixtureinfo", None)
    for name, fixturedefs in (defs.name2fixturedefs.items() if defs is not None else ()):
        if name != "one_thread" and any(d.scope == "module" for d in fixturedefs):
            return item.path.stem
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA is available. Under pytest-xdist (`make test` runs on 2 workers)
    each test gets its `xdist_group` and the HEAVY_FIRST modules' tests are queued first."""
    import torch

    if getattr(config.option, "loadgroup", False):  # set by pytest-xdist on its workers, which collect the tests
        for item in items:
            group = xdist_group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))
        heavy = {name: i for i, name in enumerate(HEAVY_FIRST)}
        items.sort(key=lambda item: heavy.get(item.path.stem, len(heavy)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def process_group(monkeypatch):
    """This test process as a one-rank process group (DeepSpeed engines in-process), the process-group
    variables it needs set for this test only, so that a later in-process CLI run does not take itself for a
    launched worker."""
    from stages.distributed import setup_distributed
    from stages.runtime import free_port

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, os.environ.get(name, value))
    monkeypatch.setenv("MASTER_PORT", os.environ.get("MASTER_PORT", str(free_port())))
    return setup_distributed()


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on during the test, in order (the calls still happen)."""
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return synced


class GradOnlyEngine:
    """Just enough of a DeepSpeed engine for a stage's train_step on one rank: forward, backward (which, as
    DeepSpeed's, divides by the accumulation steps), no optimizer step: the step's gradient stays in .grad."""

    def __init__(self, module: torch.nn.Module, accumulation: int) -> None:
        self.module, self.accumulation = module, accumulation

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        pass

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()

    def zero_optimization_stage(self) -> int:
        return 0

    def get_global_grad_norm(self) -> None:
        return None


def tiny_engine(steps: int = 1, ds_config: Any = None, **train) -> tuple:
    """An in-process DeepSpeed engine over a one-layer GPT-2 (AdamW, our LR schedule over `steps`; `ds_config`:
    a DeepSpeedConfig, default ZeRO-0 fp32) and a two-word tokenizer: what save_checkpoint / load_latest_checkpoint
    take."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from stages.config import DeepSpeedConfig, TrainConfig
    from stages.engine import build_deepspeed_config, initialize_engine

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")))
    tc = TrainConfig(micro_batch_size=1, max_steps=steps, **train)
    ds = build_deepspeed_config(tc, ds_config or DeepSpeedConfig(), 1, False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    return initialize_engine(model, ds, tc, steps), tokenizer


#: what a launcher (or an in-process stage run's setup_distributed) sets: a CLI run in a process holding them takes
#: itself for a launcher's worker
PROCESS_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """Fail the test that leaves PROCESS_GROUP_VARS changed in this process (an in-process stage run that got as far
    as setting up its process group; the `process_group` fixture sets them for one test only), and restore them:
    otherwise each later in-process CLI run of this worker takes itself for a launcher's worker and is refused."""
    before = {name: os.environ.get(name) for name in PROCESS_GROUP_VARS}
    yield
    changed = sorted(name for name in PROCESS_GROUP_VARS if os.environ.get(name) != before[name])
    for name in changed:
        if before[name] is None:
            del os.environ[name]
        else:
            os.environ[name] = before[name]  # type: ignore[assignment]
    if changed:
        pytest.fail(f"the test left {', '.join(changed)} changed in this process (run the stage in a process of its "
                    "own: run_cli, or set them through the process_group fixture)")


def cli_env(env: dict[str, str] | None = None, drop_env: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment a CLI subprocess gets: ours plus `env`, minus `drop_env` and minus the process-group
    variables an in-process test may have set (RANK, WORLD_SIZE, ...): the CLI is never its worker."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    for name in PROCESS_GROUP_VARS:
        if name not in (env or {}):
            full_env.pop(name, None)
    for name in drop_env:
        full_env.pop(name, None)
    return full_env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_cli", *args]


def run_cli(
    *args: str,
    cwd: Path = REPO,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    drop_env: tuple[str, ...] = (),
    **popen: Any,
) -> subprocess.CompletedProcess:
    """`rlhf ARGS...` in a fresh interpreter (exactly what a user runs); `popen`: more subprocess.run arguments."""
    return subprocess.run(
        cli_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=cli_env(env, drop_env),
        **popen,
    )


def invoke_cli(*args: str, width: int = 200) -> Any:
    """`rlhf ARGS...` in this interpreter (typer's CliRunner: exit_code, stdout, stderr, output) on a terminal
    `width` columns wide, for the commands that stop before any work (dry runs, refused arguments): the same
    code without a fresh interpreter's seconds of imports. `run_cli` where the process itself matters (one
    error line, no traceback, signals)."""
    from typer.testing import CliRunner

    from rlhf_cli.app import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(width)}, terminal_width=width)


def floor_within_rounding(probs: Any, floor: Any, top_p: float, eps: float = 1e-5) -> Any:
    """[B] bool: `floor` [B, 1] is the top-p floor of `probs` [B, V] up to summation rounding `eps`, summed in
    float64: the tokens at least as likely hold top_p (S(v) >= top_p - eps) and those more likely do not
    (S(>v) < top_p + eps). Where the mass passes top_p at a group of tied probabilities (bf16 logits tie often:
    10-20 tokens per group at W1's vocabulary), float32 sums in another order (a GPU's blockwise cumsum, the
    search's masked sums) may put the floor on either side of the group; both sides pass, anything further not."""
    import torch

    p = probs.double()
    kept, above = torch.where(probs >= floor, p, 0).sum(-1), torch.where(probs > floor, p, 0).sum(-1)
    return (kept >= top_p - eps) & (above < top_p + eps)


TINY_DIR = REPO / "configs" / "tiny"


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> tuple[Path, object]:
    """A short tiny pipeline: SFT (60 steps), RM (40 steps), PPO-max (1 critic + 2 policy iterations), eval of
    16 prompts, report. Returns (pipeline.yaml, the CLI result); outputs in its folder's runs/ (sft and rm are
    also the PPO tests' starting points)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    sft = tiny_sft_dict(tmp, max_steps=60)
    sft["logging"] = {"log_every": 20, "tensorboard": False}
    sft["train"].update(eval_every=30)
    cfg = {
        "output_dir": str(tmp / "runs"),
        "sft": {"config": str(write_yaml(tmp / "sft.yaml", sft))},
        "rm": {"config": str(TINY_DIR / "rm.yaml"),
               "set": ["train.max_steps=40", "train.eval_every=20", "logging.tensorboard=false"]},
        "ppo": {"config": str(TINY_DIR / "ppo.yaml"),
                "set": ["train.iterations=2", "ppo.critic_pretrain_steps=1", "train.rollout_batch_size=8",
                        "train.mini_batch_size=8", "train.micro_batch_size=8", "generation.max_new_tokens=12",
                        "train.eval_every=1", "logging.tensorboard=false"]},
        "ppo_runs": [{"name": "ppo-max", "preset": "ppo-max"}],
        "eval": {"num_prompts": 16, "batch_size": 16, "seed": 5},
    }
    path = write_yaml(tmp / "pipeline.yaml", cfg)
    res = run_cli("pipeline", "--config", str(path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return path, res


@pytest.fixture
def host_reads(monkeypatch) -> "collections.Counter[str]":
    """Every value the project's code (stages/) reads from a tensor into Python during the test -- float(),
    int(), bool(), .item(), .tolist() -- and every tensor it indexes with a Python list, counted by
    "file:function". On a GPU each such read waits for all queued work (a host sync), and so does each list
    index (copied to the device by a blocking copy), so a test can bound how often a loop makes one. Reads inside
    libraries (transformers, DeepSpeed) are not counted (test_fastpath's profiler count sees those)."""
    import collections

    import torch

    reads: collections.Counter[str] = collections.Counter()
    ours = str(Path(__file__).resolve().parent.parent / "stages")

    def count(suffix: str = "") -> None:
        caller = sys._getframe(2).f_code
        if caller.co_filename.startswith(ours):
            reads[f"{Path(caller.co_filename).name}:{caller.co_name}{suffix}"] += 1

    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            count()
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # a Python list as an index: copied to the device at each use, a blocking copy (as much a sync as a read)
    for name in ("__getitem__", "__setitem__"):
        real = getattr(torch.Tensor, name)

        def indexed(self, index, *args, _real=real):
            if isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index)):
                count(" (list index)")
            return _real(self, index, *args)

        monkeypatch.setattr(torch.Tensor, name, indexed)
    return reads
