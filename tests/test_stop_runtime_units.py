"""Unit checks of stages/stop.py (stop signals, the stop file) and stages/runtime.py (signal forwarding to a
child, atomic writes, the accelerator choice), called directly: no training, no launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import torch

from stages import runtime, stop
from stages.runtime import call_forwarding_signals

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def signals_restored() -> Iterator[None]:
    """SIGTERM / SIGINT / SIGHUP handlers and stop's state as they were before the test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    stop.disarm()
    stop._state["previous"].clear()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def fake_reduce(monkeypatch) -> list[list[float]]:
    """`requested`'s all-reduce replaced: each call returns the next queued counts (other ranks' signals), or
    this rank's own when the queue is empty."""
    import stages.distributed

    queued: list[list[float]] = []

    def reduce(values: list[float], device: torch.device) -> torch.Tensor:
        return torch.tensor(queued.pop(0) if queued else values, dtype=torch.float64)

    monkeypatch.setattr(stages.distributed, "all_reduce_sum", reduce)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv(stop.STOP_FILE_VAR, raising=False)
    return queued


CPU = torch.device("cpu")


# --- stages/stop.py ---------------------------------------------------------------------------------------------

def test_stopped_says_where_the_checkpoint_is_and_exits_128_plus_the_signal(monkeypatch) -> None:
    from stages.errors import PIPELINE_STAGE_VAR, resume_with

    monkeypatch.delenv(PIPELINE_STAGE_VAR, raising=False)
    err = stop.Stopped(signal.SIGTERM, 5, Path("/runs/a/checkpoint-00000005"))
    assert str(err) == "stopped by SIGTERM after step 5: saved checkpoint-00000005 in /runs/a; continue with --resume"
    assert err.exit_code == 143
    monkeypatch.setenv(PIPELINE_STAGE_VAR, "1")  # a stage `rlhf pipeline` runs: the pipeline resumes it, not --resume
    err = stop.Stopped(signal.SIGTERM, 5, Path("/runs/a/checkpoint-00000005"))
    assert str(err).endswith("in /runs/a; continue by running the pipeline again")
    assert resume_with("monitor.action=warn") == ("by running the pipeline again with monitor.action=warn in "
                                                  "a `set:` list of the pipeline file (the stage's, or the PPO run's) or "
                                                  "in the stage's config")
    monkeypatch.delenv(PIPELINE_STAGE_VAR)
    err = stop.Stopped(signal.SIGINT, 2, None, "iteration")
    assert str(err) == "stopped by SIGINT after iteration 2: no checkpoint written (train.checkpoints: false)"
    assert err.exit_code == 130 and stop.STOPPED_CODES == (143, 130)


def test_a_second_ctrl_c_stops_at_once_from_exactly_2_s_after_the_first(monkeypatch, signals_restored) -> None:
    """The handler itself (not only the launcher's StopFileRequest): a SIGINT 1.9 s after the first is ignored,
    one 2.0 s after it ("at least 2 s") raises KeyboardInterrupt; a SIGINT after a SIGTERM never does, and the
    first signal stays the one recorded."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    stop.arm()
    stop._handler(signal.SIGINT, None)
    clock[0] = 101.9
    stop._handler(signal.SIGINT, None)
    assert stop.received() == signal.SIGINT
    clock[0] = 102.0
    with pytest.raises(KeyboardInterrupt):
        stop._handler(signal.SIGINT, None)
    stop.disarm()

    stop.arm()
    clock[0] = 200.0
    stop._handler(signal.SIGTERM, None)
    clock[0] = 260.0
    try:
        stop._handler(signal.SIGINT, None)  # a Ctrl-C a minute after a scheduler's SIGTERM: still the graceful stop
    except KeyboardInterrupt:
        pytest.fail("a SIGINT after a SIGTERM stopped at once")
    assert stop.received() == signal.SIGTERM
    assert not stop.stops_at_once(signal.SIGTERM, 0.0, signal.SIGINT, 60.0)
    assert not stop.stops_at_once(signal.SIGINT, 0.0, signal.SIGTERM, 60.0)
    assert stop.stops_at_once(signal.SIGINT, 0.0, signal.SIGINT, 2.0)


def test_disarm_forgets_the_signal_and_sigterm_then_ends_the_process_as_before() -> None:
    """After disarm() a default-handled SIGTERM kills the process again (-15), it is not swallowed."""
    code = ("import os, signal, sys, time\n"
            "from stages import stop\n"
            "stop.arm()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert stop.received() == signal.SIGTERM\n"
            "stop.disarm()\n"
            "assert stop.received() == 0, stop.received()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(3)\n"
            "sys.exit(3)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == -signal.SIGTERM, res.stderr


def test_disarm_forgets_a_recorded_signal(signals_restored) -> None:
    stop.arm()
    stop._handler(signal.SIGTERM, None)
    assert stop.received() == signal.SIGTERM
    stop.disarm()
    assert stop.received() == 0


def test_arming_twice_keeps_the_original_handler_to_go_back_to(signals_restored) -> None:
    """A second arm() (the next stage's training loop in the same process) must not record stop's own handler as
    the one to go back to: disarmed, SIGINT is Python's KeyboardInterrupt again (not endless recursion)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop.arm()
    stop.disarm()
    stop.arm()
    stop.disarm()
    with pytest.raises(KeyboardInterrupt):
        stop._handler(signal.SIGINT, None)


def test_arm_outside_the_main_thread_changes_nothing(signals_restored) -> None:
    before = {sig: signal.getsignal(sig) for sig in stop.SIGNALS}
    errors: list[BaseException] = []

    def arm() -> None:
        try:
            stop.arm()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=arm)
    thread.start()
    thread.join()
    assert errors == [] and not stop._state["armed"]
    assert {sig: signal.getsignal(sig) for sig in stop.SIGNALS} == before


def test_requested_tells_once_per_arm_only_on_rank_0_and_prefers_sigterm(capsys, monkeypatch, fake_reduce,
                                                                         signals_restored) -> None:
    stop.arm()
    stop._handler(signal.SIGTERM, None)
    assert stop.requested(CPU) == signal.SIGTERM and stop.requested(CPU) == signal.SIGTERM
    assert capsys.readouterr().out == "received SIGTERM: saving a checkpoint, then stopping\n"
    stop.disarm()
    stop.arm()  # the next training loop in this process tells its own stop
    stop._handler(signal.SIGINT, None)
    assert stop.requested(CPU) == signal.SIGINT
    assert capsys.readouterr().out == "received SIGINT: saving a checkpoint, then stopping\n"
    stop.disarm()

    stop.arm()
    fake_reduce.append([1.0, 1.0])  # one rank got SIGTERM, another SIGINT: SIGTERM wins
    assert stop.requested(CPU) == signal.SIGTERM
    fake_reduce.append([0.0, 2.0])
    stop.disarm()
    stop.arm()
    assert stop.requested(CPU) == signal.SIGINT  # another rank's signal is this rank's too
    capsys.readouterr()
    stop.disarm()

    stop.arm()
    monkeypatch.setenv("RANK", "1")
    stop._handler(signal.SIGTERM, None)
    assert stop.requested(CPU) == signal.SIGTERM and capsys.readouterr().out == ""  # rank 0 tells


def test_requested_survives_a_terminal_that_is_gone(monkeypatch, fake_reduce, signals_restored) -> None:
    def gone(*args: Any, **kwargs: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stop, "print", gone, raising=False)
    stop.arm()
    stop._handler(signal.SIGINT, None)
    assert stop.requested(CPU) == signal.SIGINT


def test_the_stop_file_is_read_by_local_rank_0_and_anything_odd_in_it_means_sigterm(tmp_path, monkeypatch,
                                                                                     fake_reduce) -> None:
    path = tmp_path / ".rlhf-stop"
    monkeypatch.setenv(stop.STOP_FILE_VAR, str(path))
    monkeypatch.delenv("LOCAL_RANK")
    assert stop.file_request() == 0  # no file yet
    path.write_text("2\n")
    assert stop.file_request() == signal.SIGINT  # LOCAL_RANK unset: a one-process run reads it
    assert stop.requested(CPU) == signal.SIGINT
    for text, expected in (("15", 15), ("9\n", 15), ("stop\n", 15), ("", 15)):
        path.write_text(text)
        assert stop.file_request() == expected, text
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert stop.file_request() == 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    stop.write_request(path, signal.SIGINT)
    assert path.read_text() == "2\n" and stop.file_request() == signal.SIGINT
    assert not (tmp_path / ".tmp-.rlhf-stop").exists()


# --- stages/runtime.py ------------------------------------------------------------------------------------------

def test_atomic_write_text_keeps_the_old_file_and_no_temporary_when_the_rename_fails(tmp_path, monkeypatch) -> None:
    path = tmp_path / "state.json"
    runtime.atomic_write_text(path, "old")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        runtime.atomic_write_text(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def _signal_me_when(ready: Path, sig: int) -> None:
    """Send `sig` to this process once `ready` exists (a thread: the main one is waiting on the child)."""
    def run() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), sig)

    threading.Thread(target=run, daemon=True).start()


def _child(ready: Path, linger: float = 1.5, code: int = 0) -> list[str]:
    """A child that touches `ready`, lives `linger` s with default signal handling, then exits `code`."""
    return [sys.executable, "-c", f"import pathlib, sys, time; pathlib.Path({str(ready)!r}).touch(); "
                                  f"time.sleep({linger}); sys.exit({code})"]


def test_the_child_runs_in_a_session_of_its_own_and_its_exit_code_comes_back(tmp_path) -> None:
    out = tmp_path / "sid"
    code = f"import os, pathlib, sys; pathlib.Path({str(out)!r}).write_text(str(os.getsid(0) == os.getpid())); sys.exit(3)"
    assert call_forwarding_signals([sys.executable, "-c", code]) == 3
    assert out.read_text() == "True"  # a terminal's Ctrl-C reaches it only through us
    assert call_forwarding_signals([sys.executable, "-c", "pass"]) == 0


def test_a_request_that_passed_the_signal_on_means_nothing_is_sent(tmp_path, signals_restored) -> None:
    ready = tmp_path / "ready"
    asked: list[int] = []
    sent: list[Any] = []

    def request(signum: int) -> bool:
        asked.append(signum)
        return True

    _signal_me_when(ready, signal.SIGTERM)
    assert call_forwarding_signals(_child(ready), targets=lambda proc: sent.append(proc) or [proc],
                                   request=request) == 0  # the child was not signalled: it exited on its own
    assert asked == [signal.SIGTERM] and sent == []


def test_sighup_is_forwarded_and_an_ignored_signal_is_not(tmp_path, signals_restored) -> None:
    got: list[int] = []
    signal.signal(signal.SIGHUP, lambda s, f: got.append(s))  # this process survives a SIGHUP either way
    ready = tmp_path / "ready"
    _signal_me_when(ready, signal.SIGHUP)
    assert call_forwarding_signals(_child(ready, linger=20)) == 128 + signal.SIGHUP
    assert got == []  # forwarded, not handled here

    ready.unlink()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    _signal_me_when(ready, signal.SIGHUP)
    child = (f"import pathlib, signal, sys, time; got = []; signal.signal(signal.SIGHUP, lambda s, f: got.append(s)); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(1.5); sys.exit(7 if got else 0)")
    assert call_forwarding_signals([sys.executable, "-c", child]) == 0  # not forwarded (exit 7 if it was)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_a_target_that_is_already_gone_is_passed_over(tmp_path, signals_restored) -> None:
    class Gone:
        def send_signal(self, signum: int) -> None:
            raise psutil.NoSuchProcess(12345)

    ready = tmp_path / "ready"
    _signal_me_when(ready, signal.SIGTERM)
    assert call_forwarding_signals(_child(ready), targets=lambda proc: [Gone()]) == 0


def _family(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """A child with a grandchild: both write a file when SIGTERM reaches them; the child exits 0."""
    ready, child_got, grand_got = tmp_path / "ready", tmp_path / "child", tmp_path / "grand"
    grand = (f"import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda s, f: (pathlib.Path({str(grand_got)!r}).touch(), sys.exit(0)))\n"
             f"pathlib.Path({str(ready)!r} + '-grand').touch()\n"
             f"time.sleep(10)\n")
    child = (f"import pathlib, signal, subprocess, sys, time\n"
             f"got = []\n"
             f"signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
             f"g = subprocess.Popen([sys.executable, '-c', {grand!r}])\n"
             f"end = time.monotonic() + 20\n"
             f"while not pathlib.Path({str(ready)!r} + '-grand').exists() and time.monotonic() < end: time.sleep(0.02)\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             f"while not got and time.monotonic() < end: time.sleep(0.02)\n"
             f"pathlib.Path({str(child_got)!r}).write_text(str(len(got)))\n"
             f"time.sleep(0.5)\n"
             f"g.kill(); g.wait()\n"
             f"sys.exit(0)\n")
    return [sys.executable, "-c", child], ready, grand_got


def test_signals_go_to_the_child_alone_by_default_and_to_its_group_when_targets_finds_nothing(
        tmp_path, signals_restored) -> None:
    for name, targets, grandchild_gets_it in (("alone", None, False), ("group", lambda proc: [], True)):
        (tmp_path / name).mkdir()
        cmd, ready, grand_got = _family(tmp_path / name)
        _signal_me_when(ready, signal.SIGTERM)
        assert call_forwarding_signals(cmd, targets=targets) == 0
        assert (tmp_path / name / "child").read_text() == "1", name
        assert grand_got.exists() == grandchild_gets_it, name


def test_outside_the_main_thread_the_child_still_runs_and_handlers_stay(tmp_path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call_forwarding_signals([sys.executable, "-c", "import sys; sys.exit(4)"]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert result == [4] and signal.getsignal(signal.SIGTERM) is before


def test_package_version_is_none_for_a_distribution_not_installed() -> None:
    assert runtime.package_version("pytest") == pytest.__version__
    assert runtime.package_version("no-such-distribution-rlhf-test") is None


@pytest.mark.parametrize("given", [None, "xpu"])
def test_deepspeed_is_imported_with_the_workers_accelerator_and_the_environment_kept(monkeypatch, given) -> None:
    """import_deepspeed_as_workers_would: DS_ACCELERATOR is the workers' during the import only (cpu here, no GPU),
    a given one is used and kept, and os.environ is as it was afterwards, also when the import fails."""
    import importlib

    monkeypatch.setattr(runtime, "cuda_available", lambda: False)
    if given is None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    else:
        monkeypatch.setenv("DS_ACCELERATOR", given)
    seen = []
    monkeypatch.setattr(importlib, "import_module", lambda name: seen.append((name, os.environ.get("DS_ACCELERATOR"))))
    runtime.import_deepspeed_as_workers_would()
    assert seen == [("deepspeed", given or "cpu")] and os.environ.get("DS_ACCELERATOR") == given

    def broken(name):
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError):
        runtime.import_deepspeed_as_workers_would()
    assert os.environ.get("DS_ACCELERATOR") == given


@pytest.mark.parametrize("cuda", [False, True])
def test_the_accelerator_is_ds_accelerator_else_cpu_without_cuda_else_cuda(monkeypatch, cuda: bool) -> None:
    monkeypatch.setattr(runtime, "cuda_available", lambda: cuda)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert runtime.chosen_accelerator({}) == ("cuda" if cuda else "cpu")
    assert runtime.chosen_accelerator({"DS_ACCELERATOR": "xpu"}) == "xpu"
    assert runtime.missing_accelerator({"DS_ACCELERATOR": "cuda"}) is None
    env = {"DS_ACCELERATOR": "cuda"}
    runtime.select_accelerator_env(env)
    assert env == {"DS_ACCELERATOR": "cuda"}  # a set DS_ACCELERATOR is left alone, even without a GPU
    env = {}
    runtime.select_accelerator_env(env)
    assert env == ({} if cuda else {"DS_ACCELERATOR": "cpu"}) and "DS_ACCELERATOR" not in os.environ
    runtime.select_accelerator_env()
    assert os.environ.get("DS_ACCELERATOR") == (None if cuda else "cpu")
