"""stages/peer_watch.py: one rank's own failure ends the other ranks at once, through the run's TCP store."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as tdist

from stages import peer_watch
from stages.errors import CheckpointError, ConfigError, DataError, NonFinite
from stages.runtime import free_port
from stages.stop import Stopped

FAILED, SEEN = peer_watch.FAILED_KEY, peer_watch.SEEN_KEY


@pytest.fixture
def store(monkeypatch):
    """A TCP store hosted by this test (as rank 0's process hosts the run's), MASTER_ADDR/PORT pointing at it."""
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    host = tdist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30))
    yield host
    peer_watch.stop_watch()


def test_a_rank_stuck_for_good_ends_with_one_line_when_another_rank_announces_its_failure(store, tmp_path):
    """The child stands for rank 1 waiting in a collective that never returns (its main thread sleeps): once rank 0
    writes its failure into the store, rank 1 says so in one line, runs the cleanup registered with `on_stop`
    (the main thread's own way out is stuck) and exits 1, and counts itself as having seen it (the failing rank
    waits for that before exiting with the store)."""
    done = tmp_path / "cleaned"
    code = ("import time; from pathlib import Path; from stages import peer_watch; peer_watch.start_watch(1, 2); "
            f"cm = peer_watch.on_stop(lambda: Path({str(done)!r}).write_text('yes')); cm.__enter__(); "
            "print('watching', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "watching\n"
        store.set(FAILED, "0")
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 1, err
    assert err == ("error (rank 1): stopping: rank 0 of this run failed (its own error says why); this process would "
                   "otherwise wait for it until the collective timeout\n")
    assert store.add(SEEN, 0) == 1 and done.read_text() == "yes"


def test_the_failing_rank_waits_until_the_others_have_read_it_and_its_own_watcher_stays_quiet(store):
    ended: list[int] = []
    watcher = peer_watch.start_watch(0, 3, end=ended.append, poll=0.05)

    def peer_reads(after: float) -> None:  # what another rank's watcher does once it sees the key
        time.sleep(after)
        reader = tdist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
        reader.wait([FAILED])
        reader.add(SEEN, 1)

    for after in (0.2, 0.6):
        threading.Thread(target=peer_reads, args=(after,), daemon=True).start()
    start = time.monotonic()
    peer_watch.announce_failure(0, 3, linger=20)
    waited = time.monotonic() - start
    assert store.get(FAILED) == b"0" and store.add(SEEN, 0) == 3  # both others' watchers and itself
    assert 0.6 + 2 * peer_watch.GRACE_S <= waited < 10  # until both others read it, not the whole linger
    watcher.join(timeout=10)  # this rank's own watcher stopped, quietly
    assert not watcher.is_alive() and ended == []

    store.set(SEEN, "0")  # no other rank reads it (they are gone): the failing rank gives up after `linger`
    start = time.monotonic()
    peer_watch.announce_failure(0, 3, linger=0.5)
    assert 0.5 <= time.monotonic() - start < 5


def test_a_process_that_does_not_watch_announces_nothing(store):
    """One rank, or an error before the process group exists: nothing is written (nor waited for)."""
    assert peer_watch.start_watch(0, 1) is None
    start = time.monotonic()
    peer_watch.announce_failure(0, 1)
    assert time.monotonic() - start < 1 and not store.check([FAILED])


def test_a_stopped_watch_leaves_at_once_and_announces_nothing_more(store):
    """The stage ended (`stop_watch`, also at exit): the watcher leaves without waiting for its next poll, and a
    failure after that is not announced."""
    ended: list[int] = []
    watcher = peer_watch.start_watch(1, 2, end=ended.append, poll=600)
    time.sleep(0.2)
    start = time.monotonic()
    peer_watch.stop_watch()
    assert not watcher.is_alive() and time.monotonic() - start < 5
    peer_watch.announce_failure(1, 2)
    assert not store.check([FAILED]) and ended == []


def test_a_watching_process_ends_normally_with_exit_code_0_and_says_nothing(monkeypatch):
    """Rank 0 of a finished run, which hosts the store its own watcher asks, exits as it would without one: a
    watcher blocked inside the store's C++ client when the interpreter ended aborted it (exit code 134,
    "terminate called without an active exception")."""
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    code = (f"import datetime, time, torch.distributed as d; s = d.TCPStore('127.0.0.1', {port}, is_master=True, "
            "timeout=datetime.timedelta(seconds=30)); from stages import peer_watch; peer_watch.start_watch(0, 2); "
            "time.sleep(0.5)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]


def test_no_watch_where_the_launcher_ends_every_rank_itself_and_fewer_polls_on_many_ranks(store, monkeypatch):
    """torchrun and a one-node DeepSpeed launch end the other ranks themselves (and report the first failure:
    a watcher's earlier exit blurred it); DeepSpeed over pdsh ends only a node's own ranks: watched."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert peer_watch.start_watch(1, 2) is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert peer_watch.start_watch(1, 2) is None  # DeepSpeed's launch.py with both ranks
    watcher = peer_watch.start_watch(1, 4, poll=0.05)  # 2 of 4 ranks on this node
    assert watcher is not None
    peer_watch.stop_watch()
    assert [peer_watch.poll_interval(n) for n in (2, 256, 512, 2048)] == [1.0, 1.0, 2.0, 8.0]


def test_when_the_store_host_ends_the_watcher_ends_quietly_and_nothing_is_announced_to_it(monkeypatch, capfd):
    """Rank 0's process, which hosts the store, ends first: at the end of a finished run the others' watchers
    must not stop them (nor print anything); after a crash, a rank failing then does not try the store (torch's
    client retried for 11 s, printing C++ stacks), whether its watcher saw the store go or the port is closed."""
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    code = (f"import sys, datetime, torch.distributed as d; s = d.TCPStore('127.0.0.1', {port}, is_master=True, "
            "timeout=datetime.timedelta(seconds=30)); print('up', flush=True); sys.stdin.readline()")
    host = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline() == "up\n"
        ended: list[int] = []
        watcher = peer_watch.start_watch(1, 2, end=ended.append, poll=0.05)
        time.sleep(0.3)
        host.communicate("\n", timeout=30)  # the host ends
        watcher.join(timeout=30)
        assert not watcher.is_alive() and ended == []
        start = time.monotonic()
        peer_watch.announce_failure(1, 2)
        assert time.monotonic() - start < 1
        peer_watch._store_gone.clear()  # a closed port is refused before any try, too
        peer_watch.announce_failure(1, 2)
        assert time.monotonic() - start < 2 and capfd.readouterr().err == ""
    finally:
        host.kill()
        peer_watch.stop_watch()


def test_only_a_ranks_own_failure_is_announced(monkeypatch):
    """Errors every rank raises together end each rank by themselves; a lost peer is another rank's failure."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    own = (CheckpointError("could not write checkpoint-00000004"), torch.OutOfMemoryError("CUDA out of memory"),
           ValueError("a bug"), RuntimeError("CUDA error: an illegal memory access"))
    shared = (ConfigError("train.lr"), DataError("row 3"), NonFinite("loss"), Stopped(15, 3, None), KeyboardInterrupt(),
              SystemExit(1), RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert all(peer_watch.owns_failure(exc) for exc in own)
    assert not any(peer_watch.owns_failure(exc) for exc in shared)
