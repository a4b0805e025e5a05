"""Faults injected into real `rlhf sft` runs (RLHF_FAULT, stages/faults.py) and the pieces that handle them:
kill -9 at a random step and in the middle of a checkpoint write, SIGTERM (one process and two DeepSpeed
processes), NaN losses (stop / skip), a full disk and a real write error during a save, and resuming another
stage's run. RELIABILITY.md maps each fault to its test. The step a fault hits is drawn at random
(RLHF_TEST_SEED fixes it); assertion messages name it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import REPO, cli_command, cli_env, invoke_cli, run_cli, tiny_engine, tiny_sft_dict, write_yaml
from rlhf_cli.launcher import LAUNCHER_STOP_NOTE
from stages.metrics import read_metrics

RNG = random.Random(os.environ.get("RLHF_TEST_SEED"))
STEPS, EVERY = 8, 2
DROPOUT = ("--set", "model.from_config.attention_dropout=0.2")  # draws random numbers: only exact RNG resume matches


def _config(root: Path, **train) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_sft_dict(root, max_steps=STEPS, save_every=EVERY, save_total_limit=10, eval_every=4, **train)
    return write_yaml(root / "sft.yaml", cfg)


def _sft(config: Path, *args: str, fault: str | None = None, expect: int | None = 0, **kw):
    env = {"RLHF_FAULT": fault} if fault else None
    res = run_cli("sft", "--config", str(config), *DROPOUT, *args, env=env, **kw)
    if expect is not None:
        assert res.returncode == expect, f"fault {fault}: rc {res.returncode}\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
    return res


def curve(out: Path) -> list[tuple]:
    """Every metric row but events and timing: what an uninterrupted run and a resumed one must share."""
    return [tuple((k, v) for k, v in sorted(r.items()) if k not in ("time", "train/tokens_per_s"))
            for r in read_metrics(out / "metrics.jsonl") if "event" not in r]


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def no_traceback(res: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in res.stdout + res.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted-and-resumed run must reproduce (8 steps, checkpoints every 2)."""
    root = tmp_path_factory.mktemp("reference")
    _sft(_config(root))
    return root / "out"


def test_kill9_mid_checkpoint_write_then_resume_matches_uninterrupted(tmp_path, reference):
    step = RNG.choice(range(2 * EVERY, STEPS + 1, EVERY))  # a save step past the first checkpoint
    config = _config(tmp_path)
    res = _sft(config, fault=f"kill-save@{step}", expect=-signal.SIGKILL)
    out = tmp_path / "out"
    half = out / f".tmp-checkpoint-{step:08d}"
    assert half.is_dir() and not (half / "COMPLETE").exists(), f"kill-save@{step}: {sorted(os.listdir(out))}"
    assert not (out / "final").exists()
    res = _sft(config, "--resume")
    assert f"resumed from step {step - EVERY}" in res.stdout, f"kill-save@{step}"
    assert not half.exists()  # the half-written copy is cleared, never loaded
    assert curve(out) == curve(reference), f"kill-save@{step}"
    assert same_weights(out / "final", reference / "final")


def test_sigterm_or_sigint_saves_a_checkpoint_exits_128_plus_signal_and_resume_matches(tmp_path, reference):
    step, sig = RNG.randrange(1, STEPS), RNG.choice([signal.SIGTERM, signal.SIGINT])
    config = _config(tmp_path)
    res = _sft(config, fault=f"{sig.name.lower()}@{step}", expect=128 + sig)
    out = tmp_path / "out"
    assert f"stopped by {sig.name} after step {step}: saved checkpoint-{step:08d}" in res.stderr, res.stderr
    assert res.stdout.count(f"received {sig.name}") == 1
    assert no_traceback(res) and (out / f"checkpoint-{step:08d}" / "COMPLETE").is_file()
    assert not (out / "final").exists()
    res = _sft(config, "--resume")
    assert f"resumed from step {step}" in res.stdout
    assert curve(out) == curve(reference), f"{sig.name}@{step}"
    assert same_weights(out / "final", reference / "final")


def test_a_damaged_newest_checkpoint_is_passed_over_and_resume_still_matches(tmp_path, reference):
    """A checkpoint marked COMPLETE whose engine state is damaged afterwards (a truncated file: a crash before
    the OS wrote it, a bad disk): --resume says so, loads the previous one and reproduces the uninterrupted run."""
    step = RNG.randrange(2 * EVERY + 1, STEPS)
    config = _config(tmp_path)
    _sft(config, fault=f"sigterm@{step}", expect=128 + signal.SIGTERM)
    out = tmp_path / "out"
    (state,) = (out / f"checkpoint-{step:08d}" / "ds" / "state").glob("*model_states.pt")
    state.write_bytes(state.read_bytes()[:1000])
    res = _sft(config, "--resume")
    assert f"cannot load checkpoint {out / f'checkpoint-{step:08d}'}" in res.stdout, f"damaged @{step}"
    previous = (step - 1) // EVERY * EVERY  # the newest checkpoint before the damaged one
    assert f"resumed from step {previous}" in res.stdout, f"damaged @{step}"
    assert f"kept as checkpoint-{step:08d}.damaged" in res.stdout
    assert curve(out) == curve(reference), f"damaged @{step}"
    assert same_weights(out / "final", reference / "final")
    assert (out / f"checkpoint-{step:08d}.damaged" / "COMPLETE").is_file()  # kept for a look, never loaded
    assert sorted(p.name for p in out.glob("checkpoint-*[0-9]")) == [  # (an even step's written anew)
        f"checkpoint-{s:08d}" for s in range(EVERY, STEPS + 1, EVERY)]


def test_resume_refuses_a_changed_config_or_process_count_unless_allowed(tmp_path):
    """The checkpoint keeps the config that wrote it; --resume compares: a changed value or process count is
    refused (exit 2, nothing touched) and listed; --allow-config-change continues with a warning listing it;
    logging keys are free to change. A checkpoint past the (shortened) run's end is refused, not published."""
    config = _config(tmp_path)
    _sft(config, fault="sigterm@3", expect=128 + signal.SIGTERM)
    out = tmp_path / "out"
    saved = (out / "resolved_config.yaml").read_text()
    assert (out / "checkpoint-00000003" / "resolved_config.yaml").read_text() == saved
    # refused before anything starts: in this process (the same code, without a fresh interpreter's imports; the
    # process's one error line without a traceback is what test_fuzz and test_config's subprocess refusals check)
    res = invoke_cli("sft", "--config", str(config), *DROPOUT, "--resume", "--set", "train.lr=0.002")
    assert res.exit_code == 2, res.output
    assert "this run differs from the one that wrote" in res.stderr and "train.lr: 0.003 -> 0.002" in res.stderr, res.stderr
    assert "--allow-config-change" in res.stderr
    assert (out / "resolved_config.yaml").read_text() == saved  # nothing touched
    res = invoke_cli("sft", "--config", str(config), *DROPOUT, "--resume", "--num-gpus", "2")
    assert res.exit_code == 2 and "processes: 1 -> 2" in res.stderr, res.output
    res = _sft(config, "--resume", "--allow-config-change", "--set", "train.max_steps=2", expect=2)
    assert "the newest checkpoint in" in res.stderr and "is at step 3, past this run's last step 2" in res.stderr
    assert "resumed from" not in res.stdout  # refused before it is said
    assert not (out / "final").exists()
    # refused once started: the record it wrote for itself is put back as the checkpoint keeps it
    assert (out / "resolved_config.yaml").read_text() == saved
    assert (out / "inputs.json").read_bytes() == (out / "checkpoint-00000003" / "inputs.json").read_bytes()
    res = _sft(config, "--resume", "--allow-config-change", "--set", "train.lr=0.002", "--set", "logging.log_every=2")
    assert "warning: resuming with changes (--allow-config-change): train.lr: 0.003 -> 0.002" in res.stderr
    assert "log_every" not in res.stderr and "resumed from step 3" in res.stdout
    assert (out / "final" / "config.json").is_file()


def test_nan_loss_stops_before_the_update_or_is_skipped(tmp_path, reference):
    """on_nonfinite: stop ends the run before the poisoned update; skip drops it and counts it, and a run stopped
    after the skipped step resumes with the count (train/skipped_micro_batches) where it was."""
    step = RNG.randrange(EVERY + 1, STEPS)
    config = _config(tmp_path / "stop")
    res = _sft(config, fault=f"nan-loss@{step}", expect=1)
    assert f"non-finite loss at step {step}" in res.stderr and "train.on_nonfinite: skip" in res.stderr
    assert no_traceback(res)
    out = tmp_path / "stop" / "out"
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert saved == [f"checkpoint-{s:08d}" for s in range(EVERY, step, EVERY)], f"nan-loss@{step}: {saved}"
    assert not (out / "final").exists()

    config = _config(tmp_path / "skip", on_nonfinite="skip")
    _sft(config, fault=f"nan-loss@{step}")
    rows = {r["step"]: r for r in read_metrics(tmp_path / "skip" / "out" / "metrics.jsonl") if "train/loss" in r}
    assert rows[step]["train/grad_norm"] == 0.0  # the poisoned micro-batch (the whole step here) trained nothing
    assert rows[step]["train/skipped_micro_batches"] == 1.0 and rows[STEPS]["train/skipped_micro_batches"] == 1.0
    before = {r["step"]: r["train/loss"] for r in read_metrics(reference / "metrics.jsonl") if "train/loss" in r}
    assert rows[step - 1]["train/loss"] == before[step - 1]  # identical up to the poisoned step
    assert rows[step]["train/loss"] == "nan"  # no micro-batch of the step trained: no loss to log
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "skip" / "out" / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

    stop_at = RNG.randrange(step, STEPS)
    config = _config(tmp_path / "resumed", on_nonfinite="skip")
    _sft(config, fault=f"nan-loss@{step},sigterm@{stop_at}", expect=128 + signal.SIGTERM)
    _sft(config, "--resume")
    resumed = tmp_path / "resumed" / "out"
    assert curve(resumed) == curve(tmp_path / "skip" / "out"), f"nan-loss@{step}, sigterm@{stop_at}"


def test_a_skipped_micro_batch_is_left_out_of_the_logged_loss(process_group, monkeypatch, host_reads):
    """train.on_nonfinite: skip with 2 micro-batches, the first poisoned (nan-loss): the step's logged loss is
    the token mean of the second alone, where it used to include the skipped one's NLL."""
    from stages.lm import collate, shifted_nll_sum
    from stages.sft import train_step
    from stages.trainer import LossGuard

    engine, _ = tiny_engine(weight_decay=0.0)  # (a step with zero gradients then leaves the weights as they are)
    engine.module.eval()  # no dropout: the second micro-batch's loss is computable here
    rows = [{"input_ids": ids, "labels": ids} for ids in ([1, 5, 9, 3, 7], [2, 4, 6], [8, 8, 1, 2], [3, 9])]
    batches = [collate(rows[:2], 0, torch.device("cpu")), collate(rows[2:], 0, torch.device("cpu"))]
    with torch.no_grad():
        second = batches[1]
        logits = engine.module(input_ids=second["input_ids"], attention_mask=second["attention_mask"]).logits
        want = float(shifted_nll_sum(logits, second["labels"])) / int((second["labels"][:, 1:] != -100).sum())
    monkeypatch.setenv("RLHF_FAULT", "nan-loss@3")
    guard = LossGuard("loss", 3, "skip")
    host_reads.clear()
    out = train_step(engine, batches, process_group, guard)
    assert guard.dropped == [0] and out["loss"] == pytest.approx(want, rel=1e-5)
    # reads back to the host (each a GPU sync): the step's counts, the guard's flag per micro-batch, the
    # logged sums -- none per metric or per micro-batch count (ZeRO-1 here: DeepSpeed reports the norm)
    assert sum(host_reads.values()) == 1 + len(batches) + 1, host_reads
    assert out["trained_tokens"] == 4 + 2 + 3 + 1  # the step's tokens, trained or not


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    step = RNG.choice(range(2 * EVERY, STEPS + 1, EVERY))
    config = _config(tmp_path)
    res = _sft(config, fault=f"enospc-save@{step}", expect=1)
    out = tmp_path / "out"
    assert f"could not write checkpoint-{step:08d}" in res.stderr and "No space left on device" in res.stderr
    assert f"checkpoint-{step - EVERY:08d}, is intact" in res.stderr, res.stderr
    assert no_traceback(res) and not list(out.glob(".tmp-*")) and not (out / "final").exists()
    assert (out / f"checkpoint-{step - EVERY:08d}" / "COMPLETE").is_file()


def test_a_failed_save_on_two_ranks_is_told_by_the_rank_that_failed(tmp_path, monkeypatch):
    """`_save_failure`, per rank of a two-process run whose checkpoint write failed: only local rank 0 removes the
    partial copy (rank 1 removing it made rank 0's write fail with a missing directory, whose misleading error
    came first); a lost peer is raised as it is (the CLI's "lost contact" line); a write into a folder another
    process removed says so, not "No such file"."""
    from stages.checkpoint import _save_failure
    from stages.distributed import DistInfo
    from stages.errors import CheckpointError

    monkeypatch.setenv("WORLD_SIZE", "2")
    cpu = torch.device("cpu")
    rank0, rank1 = DistInfo(0, 0, 2, cpu), DistInfo(1, 1, 2, cpu)
    tmp = tmp_path / ".tmp-checkpoint-00000004"
    full = OSError(28, "No space left on device")

    tmp.mkdir()
    err = _save_failure(full, tmp, "checkpoint-00000004", tmp_path, rank1)
    assert isinstance(err, CheckpointError) and "No space left on device" in str(err)
    assert tmp.is_dir()  # rank 0 may still be writing into it
    assert "the partial copy (.tmp-checkpoint-00000004) is left to this node's first process, or the next run, to " \
        "remove" in str(err)
    err = _save_failure(full, tmp, "checkpoint-00000004", tmp_path, rank0)
    assert "No space left on device" in str(err) and "partial copy is removed" in str(err) and not tmp.exists()

    tmp.mkdir()
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29501")
    assert _save_failure(lost, tmp, "checkpoint-00000004", tmp_path, rank1) is lost and not tmp.exists()

    missing = RuntimeError(f"Parent directory {tmp}/rng does not exist.")
    err = _save_failure(missing, tmp, "checkpoint-00000004", tmp_path, rank1)
    assert "removed while this process wrote into it, by another process" in str(err), err
    assert "does not exist" not in str(err)


@pytest.mark.slow
def test_one_ranks_own_failure_stops_the_others_under_a_launcher_that_does_not(tmp_path):
    """Two workers started as `srun` starts them (each on its own, RANK and the rest set; nothing kills one when
    the other fails). A first run ends normally (both exit 0). Its resume, with another max_steps and lr, has
    rank 1's checkpoint write fail: rank 0, waiting for it in a collective, stops with one line naming rank 1
    (stages/peer_watch.py; NCCL ranks on one node would otherwise wait for the collective's timeout, and these
    gloo ones said "lost contact" once rank 1's process had gone), and puts back the run's record (the resolved
    config of its checkpoint: the failed attempt trained nothing), as its main thread would have on its way out."""
    from stages.runtime import free_port

    def two_workers(*args: str, **env: str) -> list[tuple[int, str]]:
        port = str(free_port())
        workers = [subprocess.Popen(cli_command("sft", "--config", str(config), *args), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env({
                                        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                                        **env}))
                   for rank in (0, 1)]
        try:
            said = [worker.communicate(timeout=300)[1] for worker in workers]
        finally:
            for worker in workers:
                worker.kill()
        return [(worker.returncode, text) for worker, text in zip(workers, said)]

    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_dict(tmp_path, max_steps=1, save_every=1))
    assert two_workers() == [(0, ""), (0, "")]  # (no C++ warning from the watchers at the end)
    out = tmp_path / "out"
    record = (out / "resolved_config.yaml").read_text()
    (rank0, said0), (rank1, said1) = two_workers("--resume", "--allow-config-change", "--set", "train.max_steps=3",
                                                 "--set", "train.lr=0.001", RLHF_FAULT="enospc-save@2",
                                                 RLHF_FAULT_RANK="1")
    assert (rank0, rank1) == (1, 1), said0 + said1
    assert "error (rank 1): could not write checkpoint-00000002" in said1 and "No space left on device" in said1
    assert said0.strip().splitlines()[-1] == (
        "error (rank 0): stopping: rank 1 of this run failed (its own error says why); this process would otherwise "
        "wait for it until the collective timeout"), said0
    assert "lost contact" not in said0 and "Traceback" not in said0 + said1
    assert (out / "resolved_config.yaml").read_text() == record  # not the attempt's max_steps 3, lr 0.001
    # nothing that looks complete; the partial copy is left, as a kill -9 leaves it, for the next run to remove
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-00000001"]
    assert not list(out.glob(".tmp-*/COMPLETE"))


def _limit_file_size() -> None:
    """A real write error: files may not grow past 64 KiB (the checkpoint's weights are bigger); SIGXFSZ
    ignored, so the write fails with EFBIG instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_real_write_error_during_the_first_save_leaves_nothing_that_looks_valid(tmp_path):
    config = _config(tmp_path)
    res = run_cli("sft", "--config", str(config), "--set", "train.max_steps=2", preexec_fn=_limit_file_size)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "could not write checkpoint-00000002" in res.stderr, res.stderr  # torch.save: RuntimeError (EFBIG)
    assert "No earlier complete checkpoint exists" in res.stderr and no_traceback(res)
    out = tmp_path / "out"
    assert not list(out.glob(".tmp-*")) and not list(out.glob("checkpoint-*")) and not (out / "final").exists()


def test_resuming_another_stage_s_run_is_refused(tmp_path, reference):
    rm = {"output_dir": str(reference), "model": {"name_or_path": str(reference / "final")},
          "data": {"train": str(REPO / "configs" / "tiny" / "data" / "rm.jsonl")}}
    config = str(write_yaml(tmp_path / "rm.yaml", rm))
    res = run_cli("train-rm", "--config", config, "--resume")
    assert res.returncode == 2 and "holds a `rlhf sft` run" in res.stderr, res.stderr
    # without --resume: the refusal names the other stage and does not advise the --resume refused above
    res = run_cli("train-rm", "--config", config, "--dry-run")
    assert res.returncode == 2 and "already holds a `rlhf sft` run (" in res.stderr, res.stderr
    assert "which `rlhf train-rm` cannot continue" in res.stderr and "--resume" not in res.stderr, res.stderr
    assert (reference / "final").is_dir()  # untouched


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_saves_on_both_ranks_and_exits_143(tmp_path):
    """What a scheduler does before pre-emption: SIGTERM to the `rlhf` process of a 2-process DeepSpeed run
    (ZeRO-2). It forwards the signal to both workers, which agree on a step, save together and exit 143.
    On the way, rank 1's loss of step 2 is NaN with on_nonfinite: skip: that micro-batch is dropped on both
    ranks alike (ZeRO-2 needs the same backward everywhere), so step 2 has a gradient of exactly zero."""
    config = _config(tmp_path, on_nonfinite="skip")
    out = tmp_path / "out"
    env = cli_env({"RLHF_FAULT": "nan-loss@2", "RLHF_FAULT_RANK": "1"})
    cmd = cli_command("sft", "--config", str(config), "--num-gpus", "2", "--set", "deepspeed.zero_stage=2",
                      "--set", "train.max_steps=400", "--set", "train.save_every=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for = RNG.randrange(2, 5)
    deadline = time.monotonic() + 400
    rows: list[dict] = []
    while time.monotonic() < deadline and proc.poll() is None and len(rows) < wait_for:
        time.sleep(0.2)
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] if (out / "metrics.jsonl").is_file() else []
    assert len(rows) >= wait_for, proc.communicate()[1][-3000:] if proc.poll() is not None else "no progress"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stdout[-3000:] + stderr[-3000:]
    assert stderr.count("stopped by SIGTERM after step") == 1 and "Traceback" not in stdout + stderr, stderr
    # DeepSpeed's launcher logs the workers' 143 as an [ERROR] (if it stops doing so, the note should go)
    assert "exits with return code = 143" in stdout and " ".join(stderr.split()).endswith(LAUNCHER_STOP_NOTE)
    step = int(stderr.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert wait_for <= step < 400
    ckpt = out / f"checkpoint-{step:08d}"
    assert (ckpt / "COMPLETE").is_file() and not (out / "final").exists()
    ds = ckpt / "ds" / "state"
    assert len(list(ds.glob("*optim_states.pt"))) == 2, sorted(p.name for p in ds.iterdir())  # both ranks' shards
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r}
    assert rows[1]["train/skipped_micro_batches"] == 0.0 and rows[2]["train/skipped_micro_batches"] == 1.0
    assert rows[2]["train/grad_norm"] == 0.0 and rows[3]["train/grad_norm"] > 0


# --------------------------------------------------------------------------------------------- units
def test_fault_specs_fire_on_their_rank_only(monkeypatch):
    """(A bad spec's refusal: tests/test_faults_prompts_units.py.)"""
    from stages import faults

    monkeypatch.setenv(faults.ENV, "kill@3,nan-loss@5")
    monkeypatch.setenv("RANK", "0")
    assert faults.planned("nan-loss", 5) and not faults.planned("nan-loss", 4) and not faults.planned("kill", 5)
    monkeypatch.setenv(faults.RANK_ENV, "1")
    assert not faults.planned("nan-loss", 5)
    monkeypatch.setenv("RANK", "1")
    assert faults.planned("nan-loss", 5)
    poisoned = faults.maybe_poison("nan-loss", 5, torch.ones(3))
    assert math.isnan(poisoned[0]) and poisoned[1:].tolist() == [1.0, 1.0]


class _Engine:
    """Records what optimizer_step hands to DeepSpeed (world size 1, ZeRO 0)."""

    def __init__(self, param: torch.nn.Parameter, norm: float | None = None) -> None:
        self.param, self.losses, self.steps, self.norm = param, [], 0, norm
        self.module = torch.nn.ParameterList([param])

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(float(loss.detach()))
        loss.backward()

    def step(self) -> None:
        self.steps += 1

    def zero_optimization_stage(self) -> int:
        return 0

    def get_global_grad_norm(self) -> float | None:
        return self.norm


def test_loss_guard_stops_before_backward_or_skips_with_an_exactly_zero_gradient(process_group):
    # process_group: world size 1, so the agreement between ranks is a no-op
    from stages.errors import NonFinite
    from stages.trainer import LossGuard, optimizer_step

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def loss(batch: float) -> torch.Tensor:
        return (w * batch).sum() * torch.tensor(batch)  # batch = nan -> NaN loss that depends on w

    engine = _Engine(w)
    with pytest.raises(NonFinite, match="non-finite loss at step 7 .micro-batch 2 of 3"):
        optimizer_step(engine, [1.0, float("nan"), 1.0], loss, LossGuard("loss", 7, "stop"))
    assert engine.losses == [3.0] and engine.steps == 1  # the bad micro-batch never reached backward

    w.grad = None
    engine, guard = _Engine(w), LossGuard("loss", 7, "skip")
    optimizer_step(engine, [float("nan"), 2.0], loss, guard)
    assert guard.skipped == 1 and engine.losses == [0.0, 12.0] and engine.steps == 2
    assert w.grad.tolist() == [4.0, 4.0]  # d/dw of the good micro-batch only: 2 * 2 per element

    with pytest.raises(NonFinite, match="non-finite gradient norm"):
        optimizer_step(_Engine(w, norm=float("inf")), [1.0], loss, LossGuard("critic loss", 2))


def test_stop_signal_is_recorded_once_and_agreed_then_signals_behave_as_before(capsys, process_group):
    from stages import stop

    dist = process_group
    before = signal.getsignal(signal.SIGINT)
    stop.arm()
    try:
        assert stop.requested(dist.device) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat right away is ignored
        assert stop.received() == signal.SIGTERM and stop.requested(dist.device) == signal.SIGTERM
        assert stop.requested(dist.device) == signal.SIGTERM  # asked every step: told once
        assert capsys.readouterr().out.count("received SIGTERM") == 1
    finally:
        stop.disarm()
    with pytest.raises(KeyboardInterrupt):  # disarmed: SIGINT is Python's KeyboardInterrupt again
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    signal.signal(signal.SIGINT, before)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup or a wrapper that ignores it
    stop.arm()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received() == 0 and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        stop.disarm()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    err = stop.Stopped(signal.SIGINT, 3, Path("/x/checkpoint-00000003"))
    assert err.exit_code == 130 and "stopped by SIGINT after step 3: saved checkpoint-00000003 in /x" in str(err)
    assert str(stop.Stopped(signal.SIGTERM, 6, None, "iteration")).startswith("stopped by SIGTERM after iteration 6: ")


def test_wrong_kind_of_checkpoint_is_refused_before_loading(tmp_path):
    from stages.errors import CheckpointError
    from stages.models import check_architecture

    rm, lm = tmp_path / "rm", tmp_path / "lm"
    for path, body in ((rm, {"architectures": ["Qwen2ForSequenceClassification"], "id2label": {"0": "LABEL_0"}}),
                       (lm, {"architectures": ["Qwen2ForCausalLM"]})):
        path.mkdir()
        (path / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="is a Qwen2ForSequenceClassification .a reward model., not a causal LM"):
        check_architecture(str(rm), "causal_lm", False)
    with pytest.raises(CheckpointError, match="is a Qwen2ForCausalLM, not a one-label sequence classifier"):
        check_architecture(str(lm), "reward", True)
    check_architecture(str(lm), "reward", False)  # train-rm starts from a causal LM: allowed
    check_architecture(str(rm), "reward", True)
    (lm / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        check_architecture(str(lm), "causal_lm", False)


def test_a_checkpoint_is_fsynced_before_it_is_marked_complete_and_renamed(tmp_path, fsynced, process_group):
    """Every file of the checkpoint (engine state, RNG, HF weights, trainer state, COMPLETE) is fsynced before
    the rename that publishes it, and the output directory after it (so the rename itself is durable)."""
    from stages.checkpoint import save_checkpoint

    engine, tokenizer = tiny_engine()
    synced = fsynced
    out = tmp_path / "out"
    out.mkdir()
    path = save_checkpoint(engine, tokenizer, out, 1, {}, process_group, 2, {"stage": "sft"})
    tmp = str(out / ".tmp-checkpoint-00000001")
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    before_rename = {s[len(tmp) + 1:] for s in synced if s.startswith(tmp + "/")}
    assert files <= before_rename, sorted(files - before_rename)
    assert {"COMPLETE", "trainer_state.json", "rng/rank0.pt", "hf/model.safetensors"} <= files
    assert synced[-1] == str(out)  # the directory holding the renamed checkpoint, last


def test_shard_checks_find_a_damaged_or_missing_file_of_one_rank(tmp_path):
    """What each rank checks before DeepSpeed loads: its own shards and the shared files open (a legacy-format
    file only needs to be non-empty), and no rank lacks a shard another rank has for itself."""
    from stages.checkpoint import missing_shards, shard_problems

    state = tmp_path / "ds" / "state"
    state.mkdir(parents=True)
    (tmp_path / "rng").mkdir()
    for rank in (0, 1):
        torch.save({"w": torch.ones(3)}, state / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"rng": rank}, tmp_path / "rng" / f"rank{rank}.pt")
    torch.save({"m": torch.ones(2)}, state / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=False)
    shard = "ds/state/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    found = [shard_problems(tmp_path, r) for r in (0, 1)]
    assert found == [(None, [shard]), (None, [shard])] and missing_shards(tmp_path, found) == [None, None]
    assert shard_problems(tmp_path, 2) == (None, [])  # a rank the checkpoint never had: no RNG file, no shard
    assert missing_shards(tmp_path, found + [(None, [])])[2] == (
        f"cannot load checkpoint {tmp_path}: ds/state/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt: missing")
    one = state / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    one.write_bytes(one.read_bytes()[:100])
    problem, _ = shard_problems(tmp_path, 1)
    assert problem.startswith(f"cannot load checkpoint {tmp_path}: ds/state/{one.name}: RuntimeError")
    assert shard_problems(tmp_path, 0)[0] is None  # rank 0 never reads rank 1's shard
    (tmp_path / "rng" / "rank0.pt").write_bytes(b"")
    assert "rng/rank0.pt" in shard_problems(tmp_path, 0)[0]
    (tmp_path / "rng" / "rank0.pt").unlink()  # a missing RNG state is damage when the writing run had that rank
    assert shard_problems(tmp_path, 0, saved_world=1)[0] == (
        f"cannot load checkpoint {tmp_path}: rng/rank0.pt: FileNotFoundError: missing")
    assert shard_problems(tmp_path, 2, saved_world=2) == (None, [])  # a rank the writing run did not have
    # hf/, which final/ is published from (a resume of a finished run published a truncated model.safetensors)
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    save_file({"w": torch.ones(64)}, str(tmp_path / "hf" / "model.safetensors"))
    assert shard_problems(tmp_path, 2)[0] is None
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    assert shard_problems(tmp_path, 2)[0].startswith(
        f"cannot load checkpoint {tmp_path}: hf/model.safetensors: SafetensorError: Error while deserializing header")


def test_non_finite_weights_are_found_on_a_zero3_partition_too():
    from stages.checkpoint import nonfinite_parameter

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert nonfinite_parameter(model) == "1.bias"
    model[1].bias.ds_tensor = torch.zeros(1)  # ZeRO-3: the local partition is what this rank checks
    assert nonfinite_parameter(model) is None


def test_every_test_reliability_md_cites_exists():
    """RELIABILITY.md names a test for each fault: each `file.py::name` (and each bare `test_*` after one, which
    lives in the same file) must be a test function there."""
    import re

    text = (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    cited = 0
    for cell in re.findall(r"\|([^|]*`test_[^|]*)\|\s*$", text, flags=re.M):
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", cell):
            current = file or current
            assert current, f"{name}: no file named before it in {cell!r}"
            body = (REPO / "tests" / current).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", body, flags=re.M), f"RELIABILITY.md cites {current}::{name}"
            cited += 1
    assert cited >= 20


def sigterm_me_when(ready: Path, times: int = 1) -> None:
    """SIGTERM to this (test) process, `times` times 0.1 s apart, as soon as the file `ready` exists (from a
    thread: the main thread is meanwhile waiting for the child that will create it)."""
    import threading

    def run() -> None:
        while not ready.exists():
            time.sleep(0.05)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)

    threading.Thread(target=run, daemon=True).start()


def test_signals_reach_the_child_once_and_its_exit_code_comes_back(tmp_path):
    """What `rlhf pipeline` and the launcher wrapper do: the child runs in its own session (a terminal's Ctrl-C
    reaches it only through us), SIGTERM received here is forwarded, and the child's exit code is returned."""
    from stages.runtime import call_forwarding_signals

    ready = tmp_path / "ready"
    got = tmp_path / "got"
    child = (  # counts the SIGTERMs it receives for 1 s after the first, then exits 143
        "import signal, sys, time, pathlib\n"
        "n = []\n"
        "signal.signal(signal.SIGTERM, lambda s, f: n.append(s))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "while not n: time.sleep(0.01)\n"
        "time.sleep(1)\n"
        f"pathlib.Path({str(got)!r}).write_text(str(len(n)))\n"
        "sys.exit(143)\n"
    )

    sigterm_me_when(ready)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert call_forwarding_signals([sys.executable, "-c", child]) == 143
    assert time.monotonic() - started < 30 and signal.getsignal(signal.SIGTERM) is before
    assert got.read_text() == "1"  # forwarded once; the child's own session kept it out of our group's signals
    # a child killed by the signal itself (before its handlers exist): 128 + s, as a shell says, not -s
    assert call_forwarding_signals([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]) == 143


def test_a_multi_node_run_is_stopped_through_its_stop_file_and_the_launcher_is_not_signalled(tmp_path):
    """A --hostfile run's workers sit behind pdsh/ssh on other nodes, and DeepSpeed's runner, signalled, kills
    them all 30 s later: SIGTERM received by `rlhf` is written to the stop file instead, which every rank reads
    after each step as if signalled. A stand-in launcher here: it must get no signal, must not see the stale
    request an earlier run left, and exits 128 + the number it reads, as the ranks do after saving."""
    from rlhf_cli.launcher import launch_env, run_launcher

    stop_file, ready, got = tmp_path / ".rlhf-stop", tmp_path / "ready", tmp_path / "got"
    stop_file.write_text("2\n")  # left by a killed earlier run
    env = launch_env(1, stop_file)
    child = (
        "import signal, sys, time, pathlib\n"
        "from stages.stop import file_request\n"
        "n = []\n"
        "signal.signal(signal.SIGTERM, lambda s, f: n.append(s))\n"
        "stale = file_request()\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "end = time.monotonic() + 20\n"
        "while not file_request() and time.monotonic() < end: time.sleep(0.01)\n"
        "time.sleep(0.5)\n"
        f"pathlib.Path({str(got)!r}).write_text(f'{{stale}} {{len(n)}} {{file_request()}}')\n"
        "sys.exit(128 + file_request())\n"
    )

    sigterm_me_when(ready, times=2)  # a repeat changes nothing
    assert run_launcher([sys.executable, "-c", child], env) == 143
    assert got.read_text() == "0 0 15"  # no stale request, no signal, the stop file's SIGTERM
    assert not stop_file.exists()  # (a later run does not stop at once)


def test_stop_file_requests_reach_every_rank_and_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch,
                                                                             process_group):
    from rlhf_cli.launcher import StopFileRequest
    from stages import stop

    path = tmp_path / ".rlhf-stop"
    monkeypatch.setenv(stop.STOP_FILE_VAR, str(path))
    assert stop.requested(process_group.device) == 0
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    request = StopFileRequest(path)
    assert request(signal.SIGINT) and path.read_text() == "2\n"
    assert stop.requested(process_group.device) == signal.SIGINT  # as if this rank had got it
    clock[0] += 1.0
    assert request(signal.SIGINT)  # within 2 s: a repeat (a scheduler's, a shaky finger)
    clock[0] += 1.5
    assert not request(signal.SIGINT)  # the user's second Ctrl-C: forwarded as usual, stopping at once
    assert not StopFileRequest(path)(signal.SIGHUP) and not path.exists()  # a new request object clears it
    path.mkdir()  # unreadable now (a shared filesystem's passing error): no request, read again next step
    assert stop.file_request() == 0
    path.rmdir()
    path.write_text("15\n")
    monkeypatch.setenv("LOCAL_RANK", "1")  # read by each node's local rank 0 only; `requested` shares it
    assert stop.file_request() == 0


def test_a_full_disk_while_logging_metrics_is_one_clear_error(tmp_path, monkeypatch):
    from stages.errors import RlhfError
    from stages.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.log(1, {"train/loss": 1.0})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(RlhfError, match=r"cannot append to .*metrics.jsonl at step 2: \[Errno 28\] No space left"):
        logger.log(2, {"train/loss": 0.5})


@pytest.mark.parametrize("name, key", [("metrics.jsonl", "step"), ("samples.jsonl", "iteration")])
def test_resume_trims_a_log_past_the_checkpoint_and_a_line_cut_by_a_crash(tmp_path, name, key):
    """What a run killed mid-write leaves (rows after its last checkpoint, then half a row) is trimmed on
    resume from iteration 2: the metrics log (MetricsLogger) and PPO's samples.jsonl (keep_rows_upto) alike;
    before, samples.jsonl's cut line stopped the resumed PPO run with a JSONDecodeError."""
    from stages.metrics import MetricsLogger, keep_rows_upto

    path = tmp_path / name
    rows = [json.dumps({key: i, "x": i / 2}) for i in (1, 2, 2, 3)]
    path.write_text("\n".join(rows) + "\n" + rows[3][:9], encoding="utf-8")
    if name == "metrics.jsonl":
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=2)
    else:
        keep_rows_upto(path, key, 2)
    assert path.read_text(encoding="utf-8") == "\n".join(rows[:3]) + "\n"
    assert not list(tmp_path.glob(".tmp-*"))  # written through a temporary file, renamed over it


def test_resuming_a_finished_run_logs_its_final_event_once(tmp_path):
    """A finished run resumed from its last checkpoint (step 4) publishes final/ again: the earlier "final" event
    at that step is dropped, the other rows of step 4 (its checkpoint event, its metrics) are kept."""
    from stages.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 4, "train/loss": 0.5}, {"step": 4, "event": "checkpoint", "path": "c"},
            {"step": 4, "event": "final", "path": "f"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=4)
    logger.event(4, "final", path="f")
    assert [(r["step"], r.get("event")) for r in read_metrics(path)] == [(4, None), (4, "checkpoint"), (4, "final")]


def test_rng_state_round_trip_and_each_rank_restores_its_own_gpus_generator(monkeypatch):
    """Python, numpy and torch draw the same after a restore. A GPU rank saves and restores its own device's
    generator only (cuda:3 here, faked: no GPU needed), so a resume that sees the GPUs otherwise (one per
    process) restores the right one; a checkpoint of every visible GPU's state (before 2026-12-04) gives the
    device its own entry."""
    import random

    import numpy as np

    from stages.distributed import rng_state, set_rng_state

    cpu = torch.device("cpu")
    state = rng_state(cpu)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state, cpu)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first and "cuda_device" not in state
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, device: calls.append((st, device.index)))
    gpu = torch.device("cuda", 3)
    saved = rng_state(gpu)
    assert saved["cuda_device"] == "state of cuda:3"
    set_rng_state(saved, torch.device("cuda", 0))  # resumed with one visible GPU per process
    set_rng_state({**state, "cuda": ["s0", "s1", "s2", "s3"]}, gpu)  # an older checkpoint's list
    set_rng_state({**state, "cuda": ["s0"]}, gpu)  # (its list has no entry for the device: nothing to restore)
    assert calls == [("state of cuda:3", 0), ("s3", 3)]


def test_ppo_rollout_check_finds_a_nan_in_any_row_and_ignores_padding():
    from stages.ppo.trainer import nonfinite_counts, nonfinite_names

    def nonfinite_scores(exp, mask):
        return nonfinite_names(nonfinite_counts(exp, mask).tolist())

    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])  # long, as rollouts keep it
    clean = {"raw": torch.zeros(4), "logp": torch.zeros(4, 3), "ref_logp": torch.zeros(4, 3),
             "values": torch.zeros(4, 3)}
    clean["logp"][1, 2] = float("-inf")  # padding: never read
    assert nonfinite_scores(clean, mask) == []
    clean["values"][3, 1] = float("nan")
    clean["raw"][2] = float("inf")
    assert nonfinite_scores(clean, mask) == ["reward-model score (1 value(s))", "critic value (1 value(s))"]
    one = {k: v[:1] for k, v in clean.items()}
    assert nonfinite_scores(one, mask[:1]) == []  # a rollout batch of one row works too


def test_replace_dir_swaps_and_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    from stages.checkpoint import replace_dir

    target, new = tmp_path / "final", tmp_path / ".tmp-final"
    target.mkdir()
    (target / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        replace_dir(new, target)
    assert (target / "w").read_text() == "old" and not (tmp_path / ".tmp-final-old").exists()
    monkeypatch.setattr(os, "replace", real)
    replace_dir(new, target)
    assert (target / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_resume_takes_lr_weight_decay_betas_and_eps_from_the_config_not_the_checkpoint(tmp_path, process_group):
    """The optimizer's state dict carries its hyperparameters and the LR scheduler's its base LRs; a resume
    (--allow-config-change) runs with the new config's, each group's LR = new base x lr_factor(step), and an
    unchanged config loads exactly the values that were saved."""
    from stages.checkpoint import load_latest_checkpoint, save_checkpoint
    from stages.engine import lr_factor

    schedule = dict(lr=3e-3, warmup_steps=2, lr_scheduler="linear", min_lr_ratio=0.1)
    engine, tokenizer = tiny_engine(10, **schedule)
    batch = torch.randint(0, 64, (1, 8))
    for _ in range(3):
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()
    saved = [dict(g, params=None) for g in engine.optimizer.param_groups]
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(engine, tokenizer, out, 3, {}, process_group, 1, {"stage": "sft"})

    same, _ = tiny_engine(10, **schedule)
    assert load_latest_checkpoint(same, out, process_group)["step"] == 3
    assert [dict(g, params=None) for g in same.optimizer.param_groups] == saved
    assert saved[0]["lr"] == 3e-3 * lr_factor(3, 10, 2, "linear", 0.1) and saved[0]["weight_decay"] == 0.0

    changed, _ = tiny_engine(10, **{**schedule, "lr": 1e-3}, weight_decay=0.1, adam_betas=(0.8, 0.9), adam_eps=1e-6)
    load_latest_checkpoint(changed, out, process_group)
    decay, no_decay = changed.optimizer.param_groups
    expected = 1e-3 * lr_factor(3, 10, 2, "linear", 0.1)
    assert decay["lr"] == no_decay["lr"] == expected and changed.lr_scheduler.base_lrs == [1e-3, 1e-3]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6
    assert changed.optimizer.state[decay["params"][0]]["exp_avg"].abs().sum() > 0  # the moments did load
    changed.backward(changed(input_ids=batch, labels=batch).loss)
    changed.step()
    assert decay["lr"] == 1e-3 * lr_factor(4, 10, 2, "linear", 0.1)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_resume_takes_the_gradient_clip_from_the_config_not_the_checkpoint(tmp_path, process_group, zero_stage):
    """DeepSpeed's ZeRO-1/2 optimizer saves its clip_grad and restores it on load: a resume that changes
    train.gradient_clipping (or a checkpoint written when 0 did not reach DeepSpeed, which then clipped at 1.0)
    would clip as before. The config's clip is put back (the optimizer's clip_grad: what its step reads)."""
    from stages.checkpoint import load_latest_checkpoint, save_checkpoint
    from stages.config import DeepSpeedConfig

    ds = DeepSpeedConfig(zero_stage=zero_stage, precision="bf16")
    engine, tokenizer = tiny_engine(10, ds, gradient_clipping=1.0)
    batch = torch.randint(0, 64, (1, 8))
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(engine, tokenizer, out, 1, {}, process_group, 1, {"stage": "sft"})
    for clip in (0.0, 0.5, 1.0):
        resumed, _ = tiny_engine(10, ds, gradient_clipping=clip)
        load_latest_checkpoint(resumed, out, process_group)
        assert resumed.optimizer.clip_grad == clip
        resumed.backward(resumed(input_ids=batch, labels=batch).loss)
        resumed.step()


def test_pruning_keeps_the_checkpoint_just_written_and_a_failed_deletion_is_a_warning(tmp_path, monkeypatch):
    """train.save_total_limit counts the new checkpoint first: a higher-step checkpoint left from before a
    resume cannot push it out; a deletion that fails is reported, not raised (the new checkpoint is whole)."""
    from stages import checkpoint
    from stages.checkpoint import prune_checkpoints

    for step in (20, 40, 80, 60):
        (tmp_path / f"checkpoint-{step:08d}").mkdir()
        (tmp_path / f"checkpoint-{step:08d}" / "COMPLETE").write_text("ok\n")
    newest = tmp_path / "checkpoint-00000060"
    prune_checkpoints(tmp_path, newest, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000060", "checkpoint-00000080"]
    prune_checkpoints(tmp_path, newest, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000060"]

    (tmp_path / "checkpoint-00000040").mkdir()
    (tmp_path / "checkpoint-00000040" / "COMPLETE").write_text("ok\n")
    said: list[str] = []

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    prune_checkpoints(tmp_path, newest, 1, said.append)
    assert len(said) == 1 and "could not delete the old checkpoint checkpoint-00000040" in said[0]
    assert "Permission denied" in said[0] and (tmp_path / "checkpoint-00000040").is_dir()


@pytest.mark.parametrize("zero, refused", [(0, False), (2, True)])
def test_another_process_count_is_refused_under_zero_even_with_allow_config_change(tmp_path, zero, refused):
    """ZeRO-1/2/3 partition the optimizer state per process, and DeepSpeed loads it only on the count that
    wrote it: --allow-config-change does not make that loadable, so it is refused up front, naming the count
    and the weights a new run could start from; ZeRO-0 state loads on any count."""
    import yaml

    from stages.checkpoint import prepare_output_dir
    from stages.errors import ConfigError

    out = tmp_path / "out"
    ckpt = out / "checkpoint-00000004"
    ckpt.mkdir(parents=True)
    text = yaml.safe_dump({"output_dir": str(out), "deepspeed": {"zero_stage": zero}})
    (ckpt / "resolved_config.yaml").write_text(text)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 2}))
    (ckpt / "COMPLETE").write_text("ok\n")
    if not refused:
        assert prepare_output_dir(out, text, True, False, world_size=4, allow_changes=True) == ["processes: 2 -> 4"]
        return
    with pytest.raises(ConfigError) as err:
        prepare_output_dir(out, text, True, False, world_size=4, allow_changes=True)
    assert str(err.value) == (
        f"--resume: checkpoint-00000004 was written by 2 process(es) under ZeRO-2, whose optimizer state is "
        f"partitioned per process; DeepSpeed cannot load it on 4. Resume with 2 process(es), or start a new run "
        f"from its weights (model.name_or_path: {ckpt / 'hf'}, copied out of this output_dir or with another "
        "output_dir: a fresh start here deletes it)")


@pytest.mark.parametrize("before, now, refused", [
    ({"deepspeed": {"precision": "bf16"}}, {"deepspeed": {"precision": "fp32"}},
     "deepspeed.precision: 'bf16' -> 'fp32' (DeepSpeed's optimizer state is laid out for the precision that wrote it)"),
    ({"deepspeed": {"zero_stage": 0}}, {"deepspeed": {"zero_stage": 2}}, "deepspeed.zero_stage: 0 -> 2 (DeepSpeed "
     "loads a checkpoint's optimizer state only at its ZeRO stage, or between ZeRO-1 and 2)"),
    ({"deepspeed": {"zero_stage": 2}}, {"deepspeed": {"zero_stage": 3}}, "deepspeed.zero_stage: 2 -> 3"),
    ({"deepspeed": {"zero_stage": 1}}, {"deepspeed": {"zero_stage": 2}}, None),
    ({"ppo": {"critic_pretrain_steps": 2}}, {"ppo": {"critic_pretrain_steps": 0}},
     "ppo.critic_pretrain_steps: 2 -> 0 (the iterations run were counted as critic-only or not under the old value)"),
    ({"ppo": {"ppo_epochs": 2}}, {"ppo": {"ppo_epochs": 1}}, "ppo.ppo_epochs: 2 -> 1 (the LR schedules count"),
    ({"train": {"rollout_batch_size": 8}}, {"train": {"rollout_batch_size": 16}}, "train.rollout_batch_size: 8 -> 16"),
    ({"train": {"mini_batch_size": 8}}, {"train": {"mini_batch_size": 4}}, "train.mini_batch_size: 8 -> 4"),
    ({"model": {"tokenizer_train": {"vocab_size": 512}}}, {"model": {"tokenizer_train": {"vocab_size": 1024}}},
     "model.tokenizer_train.vocab_size: 512 -> 1024 (the tokenizer trained at the run's start is kept"),
    ({"train": {"lr": 1e-5, "micro_batch_size": 4}}, {"train": {"lr": 2e-5, "micro_batch_size": 2}}, None),
    # a key only one side records (a record older than it): left to the ordinary change list
    ({"deepspeed": {"precision": "bf16"}}, {"deepspeed": {"precision": "bf16", "zero_stage": 2}}, None),
    ({"ppo": {"preset": "ppo-max", "critic_pretrain_steps": 20}},  # a resume without --ppo-max is told to give it
     {"ppo": {"preset": "vanilla", "critic_pretrain_steps": 0}}, "ppo.critic_pretrain_steps: 20 -> 0 (the "
     "iterations run were counted as critic-only or not under the old value). That run used preset ppo-max"),
])
def test_changes_no_resume_can_honour_are_refused_even_with_allow_config_change(tmp_path, before, now, refused):
    """A precision, a ZeRO stage other than between 1 and 2 (DeepSpeed fails inside its loading, which reads as a
    damaged checkpoint), PPO's steps per iteration or critic-only iterations (its LR schedules and the
    critic-only count read the steps taken against the new values: the LR reached 0 early, the policy trained
    too few or too many iterations) and a from_config model's trained tokenizer (kept, not retrained) cannot
    change on --resume; other changes continue with --allow-config-change."""
    import yaml

    from stages.checkpoint import prepare_output_dir
    from stages.errors import ConfigError

    out = tmp_path / "out"
    ckpt = out / "checkpoint-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "resolved_config.yaml").write_text(yaml.safe_dump({"output_dir": str(out), **before}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 1}))
    (ckpt / "COMPLETE").write_text("ok\n")
    text = yaml.safe_dump({"output_dir": str(out), **now})
    if refused is None:
        assert prepare_output_dir(out, text, True, False, world_size=1, allow_changes=True)
        return
    with pytest.raises(ConfigError) as err:
        prepare_output_dir(out, text, True, False, world_size=1, allow_changes=True)
    assert str(err.value).startswith(f"--resume: checkpoint-00000004 cannot be continued with {refused}"), err.value
    import pickle  # (as run_on_main broadcasts it to every rank)

    again = pickle.loads(pickle.dumps(err.value))
    assert (type(again), str(again), again.fixed) == (type(err.value), str(err.value), err.value.fixed)
    assert again.fixed and refused.split(" (")[0] in again.fixed[0]
    assert f"start a new run from its weights (model.name_or_path: {ckpt / 'hf'}" in str(err.value)


def test_a_second_run_on_a_busy_output_dir_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    """While a run holds output_dir (flock on .rlhf.lock, released when its process ends, kill -9 included),
    another `rlhf` run there stops at once with exit 2 and touches nothing; once it is gone, the lock is free."""
    from conftest import invoke_cli
    from stages.checkpoint import LOCK_NAME, run_lock

    config = _config(tmp_path)
    out = tmp_path / "out"
    with _lock_held(out, LOCK_NAME) as pid:
        res = invoke_cli("sft", "--config", str(config), "--resume")
        assert res.exit_code == 2, res.output
        assert f"output_dir {out} is in use by another rlhf run (pid {pid} on " in res.output
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing prepared, nothing cleared
    with run_lock(out):  # the killed holder's lock went with it
        pass


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    """flock refused (ENOLCK: some network mounts): the run goes on, saying that nothing keeps a second run out;
    the workers' own lock says nothing (the command's warning is enough)."""
    import errno
    import fcntl

    from stages.checkpoint import WORKERS_LOCK_NAME, run_lock

    def refuse(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with run_lock(tmp_path / "out"):
        pass
    said = capsys.readouterr().out
    assert "its filesystem refuses file locks (No locks available): nothing stops a second rlhf run" in said, said
    with run_lock(tmp_path / "out", WORKERS_LOCK_NAME):
        pass
    assert capsys.readouterr().out == ""


@contextlib.contextmanager
def _lock_held(out: Path, name: str) -> Iterator[int]:
    """Another process holding out/`name` (run_lock) for the block, killed after it; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from stages.checkpoint import run_lock\n"
        f"with run_lock(Path({str(out)!r}), {name!r}):\n    print('locked', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_workers_whose_launcher_was_killed_still_hold_the_output_dir(tmp_path):
    """An `rlhf` launcher killed with kill -9 takes .rlhf.lock with it while its workers train on: their rank 0
    holds .rlhf.workers.lock, so a new run there (and its --dry-run) is still refused, naming them; a launched
    rank-0 worker takes that lock (checked by the real command: a second rank-0 worker on the same directory
    stops at once)."""
    from conftest import invoke_cli
    from stages.checkpoint import LOCK_NAME, WORKERS_LOCK_NAME, run_lock
    from stages.runtime import free_port

    config = _config(tmp_path)
    out = tmp_path / "out"
    with _lock_held(out, WORKERS_LOCK_NAME) as pid:
        for extra in ((), ("--dry-run",)):
            res = invoke_cli("sft", "--config", str(config), "--resume", *extra)
            assert res.exit_code == 2, res.output
            assert f"in use by another rlhf run (pid {pid} on " in res.output, res.output
            assert "worker processes of a run whose rlhf command has ended" in res.output
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, WORKERS_LOCK_NAME]  # nothing else touched
        env = cli_env({"PYTHON_RLHF_LAUNCHED": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
        res = subprocess.run(cli_command("sft", "--config", str(config)), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2 and f"(pid {pid} on " in res.stderr, res.stderr[-2000:]
    with run_lock(out):
        pass


def test_resume_notices_a_data_file_or_model_folder_changed_under_the_same_path(tmp_path, process_group):
    """Each checkpoint keeps inputs.json, the fingerprints of the files and folders its config reads (a data
    file's sha256, a model folder's names, sizes and times; a stage folder counts as its final/): --resume
    refuses when one changed under the same path and --allow-config-change lists it. Touching a data file
    without changing its bytes, `rlhf eval` writing into the stage folder, or a folder the run writes to (an
    inline DeepSpeed JSON's nvme_path), changes nothing."""
    import yaml

    from stages.checkpoint import prepare_output_dir, save_checkpoint
    from stages.errors import ConfigError

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    sft = tmp_path / "sft"
    (sft / "final").mkdir(parents=True)
    (sft / "final" / "config.json").write_text("{}")
    out = tmp_path / "out"
    swap = tmp_path / "nvme"  # a folder the run writes (DeepSpeed's offload swap): not an input
    swap.mkdir()
    text = yaml.safe_dump({"output_dir": str(out), "data": {"train": {"path": str(data)}},
                           "model": {"name_or_path": str(sft)}, "logging": {"dir": str(tmp_path)},
                           "deepspeed": {"config": {"zero_optimization": {"offload_optimizer": {"nvme_path": str(swap)}}}}})
    prepare_output_dir(out, text, False, False, "sft")
    assert set(json.loads((out / "inputs.json").read_text())) == {"data.train.path", "model.name_or_path"}
    engine, tokenizer = tiny_engine()
    save_checkpoint(engine, tokenizer, out, 1, {}, process_group, 1, {"stage": "sft"})
    assert (out / "checkpoint-00000001" / "inputs.json").read_text() == (out / "inputs.json").read_text()

    os.utime(data, ns=(1, 1))  # the same bytes: not a change
    (sft / "eval.json").write_text("{}")  # beside final/: not what the next stage loads
    (swap / "swap.bin").write_bytes(b"written by the run")
    assert prepare_output_dir(out, text, True, False, "sft", world_size=1) == []
    data.write_text('{"prompt": "a", "response": "c"}\n')
    (sft / "final" / "model.safetensors").write_bytes(b"retrained")
    with pytest.raises(ConfigError) as err:
        prepare_output_dir(out, text, True, False, "sft", world_size=1)
    assert (f"data.train.path ({data}): contents changed; model.name_or_path ({sft}): contents changed"
            in str(err.value)), err.value
    changes = prepare_output_dir(out, text, True, False, "sft", world_size=1, allow_changes=True)
    assert changes == [f"data.train.path ({data}): contents changed", f"model.name_or_path ({sft}): contents changed"]
    # the data file moved (same bytes, another path; a project copied elsewhere): no change. Another file is one
    prepare_output_dir(out, text, False, True, "sft")  # a fresh run over the new contents
    save_checkpoint(engine, tokenizer, out, 1, {}, process_group, 1, {"stage": "sft"})
    moved = tmp_path / "elsewhere" / "train.jsonl"
    moved.parent.mkdir()
    data.rename(moved)
    assert prepare_output_dir(out, text.replace(str(data), str(moved)), True, False, "sft", world_size=1) == []
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "x", "response": "y"}\n')
    with pytest.raises(ConfigError, match=f"data.train.path: '{data}' -> '{other}'"):
        prepare_output_dir(out, text.replace(str(data), str(other)), True, False, "sft", world_size=1)


def test_fingerprints_hash_small_files_whole_and_large_ones_by_size_time_and_edges(tmp_path, monkeypatch):
    import hashlib

    from stages import fingerprint

    small = tmp_path / "small.bin"
    small.write_bytes(b"abc" * 1000)
    assert fingerprint.file_fingerprint(small) == hashlib.sha256(b"abc" * 1000).hexdigest()
    monkeypatch.setattr(fingerprint, "WHOLE_FILE", 100)
    monkeypatch.setattr(fingerprint, "EDGE", 10)
    os.utime(small, ns=(5, 7))
    expected = hashlib.sha256(b"3000 7" + b"abcabcabca" + b"cabcabcabc")  # size, mtime, bytes 0-9, 2990-2999
    assert fingerprint.file_fingerprint(small) == expected.hexdigest()
    middle = bytearray(small.read_bytes())
    middle[1500] = ord("z")  # a large file's middle is not read
    small.write_bytes(bytes(middle))
    os.utime(small, ns=(5, 7))
    assert fingerprint.file_fingerprint(small) == expected.hexdigest()



def test_a_model_folders_fingerprint_covers_the_folder_its_model_loads_from(tmp_path):
    """A stage run counts as its final/ and a checkpoint-N folder as its hf/ (what resolve_model_dir loads): files
    written beside them (eval.json, the ds/ engine states of a later save) do not change it; the model's do."""
    from stages.fingerprint import folder_fingerprint
    from stages.model_paths import resolve_model_dir

    for inner, beside in (("final", "eval.json"), ("hf", "ds/mp_rank_00_model_states.pt")):
        outer = tmp_path / inner / "run"
        (outer / inner).mkdir(parents=True)
        (outer / inner / "config.json").write_text("{}")
        assert resolve_model_dir(str(outer)) == str(outer / inner)
        before = folder_fingerprint(outer)
        assert before == folder_fingerprint(outer / inner)
        (outer / beside).parent.mkdir(parents=True, exist_ok=True)
        (outer / beside).write_bytes(b"x")
        assert folder_fingerprint(outer) == before, beside
        (outer / inner / "model.safetensors").write_bytes(b"w")
        assert folder_fingerprint(outer) != before
    plain = tmp_path / "plain"
    (plain / "hf").mkdir(parents=True)
    (plain / "hf" / "config.json").write_text("{}")
    (plain / "config.json").write_text("{}")  # a model folder of its own: its subfolders are part of it
    before = folder_fingerprint(plain)
    (plain / "hf" / "extra.bin").write_bytes(b"y")
    assert folder_fingerprint(plain) != before

def test_signals_are_forwarded_to_the_launchers_workers_not_to_their_own_children(tmp_path):
    """A fake launcher tree: runner -> launch (both named deepspeed.launcher.*) -> worker -> its own child
    (an inductor compile worker, say). Only the worker gets the forwarded signal: its children must live
    until it has finished its step and checkpoint."""
    import psutil

    from rlhf_cli.launcher import worker_processes

    ready = tmp_path / "ready"

    def spawn(code: str, name: str = "") -> str:  # a python process running `code`, `name` in its argv
        return f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {code!r}] + {[name] if name else []!r})"

    grandchild = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    worker = spawn(grandchild) + "; import time; time.sleep(60)"
    launch = spawn(worker) + "; import time; time.sleep(60)"
    runner = subprocess.Popen([sys.executable, "-c", spawn(launch, "deepspeed.launcher.launch")
                               + "; import time; time.sleep(60)", "deepspeed.launcher.runner"])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = psutil.Process(runner.pid).children(recursive=True)
        assert len(tree) == 3, tree
        (launch_proc,) = [p for p in tree if "deepspeed.launcher.launch" in p.cmdline()]
        (found,) = worker_processes(runner.pid)
        assert found.ppid() == launch_proc.pid and found.children() and not found.children()[0].children()
    finally:
        for proc in psutil.Process(runner.pid).children(recursive=True):
            proc.kill()
        runner.kill()
        runner.wait()


def test_a_new_final_and_a_fresh_start_remove_the_evaluation_of_the_old_policy(tmp_path, process_group):
    """rlhf eval writes eval.json (+ samples, + the pipeline's settings) beside final/ by default; once final/ is
    replaced (a resumed, extended run) or the folder starts afresh they describe another policy: removed.
    A user's own files stay."""
    from stages.checkpoint import EVALUATION_FILES, clear_run, publish_final, save_checkpoint

    engine, tokenizer = tiny_engine()
    out = tmp_path / "out"
    save_checkpoint(engine, tokenizer, out, 1, {}, process_group, 1, {"stage": "sft"})
    for cleared in (lambda: publish_final(out, 1, process_group), lambda: clear_run(out)):
        for name in EVALUATION_FILES:
            (out / name).write_text("{}")
        (out / "notes.txt").write_text("mine")
        cleared()
        assert not [name for name in EVALUATION_FILES if (out / name).exists()] and (out / "notes.txt").exists()
    assert not (out / "final").exists()  # clear_run removed it too


def test_republishing_the_same_final_keeps_its_evaluation(tmp_path, process_group):
    """`--resume` of a finished run publishes its last checkpoint again: final/ is the same model, so an
    eval.json beside it still describes it (it was deleted without a word, though a scheduler may always pass
    --resume); a final/ from another checkpoint still removes it."""
    import shutil

    from stages.checkpoint import EVALUATION_FILES, publish_final, same_tree, save_checkpoint

    engine, tokenizer = tiny_engine(2)
    out = tmp_path / "out"
    for step in (1, 2):
        save_checkpoint(engine, tokenizer, out, step, {}, process_group, 2, {"stage": "sft"})
    publish_final(out, 1, process_group)
    assert same_tree(out / "checkpoint-00000001" / "hf", out / "final")
    for name in EVALUATION_FILES:
        (out / name).write_text("{}")
    publish_final(out, 1, process_group)
    assert all((out / name).exists() for name in EVALUATION_FILES)
    copy = tmp_path / "copy"
    shutil.copytree(out / "final", copy)  # equal bytes without hard links count alike; a changed byte does not
    assert same_tree(out / "final", copy)
    (copy / "rlhf_checkpoint.json").write_text((copy / "rlhf_checkpoint.json").read_text() + " ")
    assert not same_tree(out / "final", copy)
    publish_final(out, 2, process_group)
    assert not any((out / name).exists() for name in EVALUATION_FILES)


def test_out_of_gpu_memory_in_a_step_is_one_error_naming_the_micro_batch_that_fits_and_resume_goes_on(tmp_path):
    """A CUDA allocation failing in a training step (RLHF_FAULT oom@N raises torch's OutOfMemoryError there): the
    run warned before it started that the estimate exceeds --gpu-memory, then exits 1 with one error that names
    the largest micro-batch that fits (and the accumulation that keeps the batch), no traceback, no final/; the
    checkpoint before it is intact: --resume --allow-config-change with that micro-batch finishes the run."""
    from rlhf_cli.config_loader import load_config
    from stages.memory import GIB, estimate, micro_batch_choices

    config = _config(tmp_path / "oom")
    cfg = load_config("sft", config, [])
    peaks = estimate(cfg, 1, micro_batch_choices(cfg))["peak_at_micro_batch"]
    fits, larger = sorted(peaks)[-2:]  # the largest divisor below the config's (its own)
    gpu_gib = peaks[fits] / 0.9 / GIB * 1.001  # that one fits, the config's does not
    assert larger == cfg.train.micro_batch_size and peaks[larger] > 0.9 * gpu_gib * GIB
    step = EVERY + 1
    res = _sft(config, "--gpu-memory", f"{gpu_gib:.9f}", fault=f"oom@{step}", expect=1)
    said = " ".join(res.stderr.split())
    accumulation = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps // fits
    assert "warning: the memory estimate (" in said and "expect CUDA out of memory" in said
    assert ("error: out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB (RLHF_FAULT oom)" in said
            and f": {fits} (now {cfg.train.micro_batch_size}), with gradient_accumulation_steps {accumulation} (now "
            f"{cfg.train.gradient_accumulation_steps})" in said), said
    out = tmp_path / "oom" / "out"
    assert no_traceback(res) and not (out / "final").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{EVERY:08d}"]
    res = _sft(config, "--resume", "--allow-config-change", "--gpu-memory", f"{gpu_gib:.9f}", "--set",
               f"train.micro_batch_size={fits}", "--set", f"train.gradient_accumulation_steps={accumulation}")
    assert "warning: the memory estimate" not in res.stderr and (out / "final" / "model.safetensors").is_file()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
