"""One rank's own failure ends every rank of the run at once, also under a launcher that leaves them running.

A rank that fails on its own (a full disk, a GPU out of memory, a checkpoint write only rank 0 does, a bug)
exits; the others sit in their next collective. DeepSpeed's launcher and torchrun then kill them, but under
`srun` without `--kill-on-bad-exit`, or a node's NCCL ranks (which do not notice a peer's death), they wait for
the collective's timeout (30 minutes), holding the job's GPUs. So a failing rank first writes its rank under
FAILED_KEY in the run's TCP store (the process group's rendezvous, MASTER_ADDR:MASTER_PORT); every rank has a
watcher thread asking for that key once a second (its own connection; one small request), which prints one
line, runs the cleanup the stuck main thread would have done on its way out (`on_stop`) and ends its process
with exit code 1. The watch ends with the stage (`stop_watch`). It is not started where the launcher itself ends
every rank when one fails (`launcher_stops_the_others`: torchrun; DeepSpeed's launcher with every rank on one
node), whose own report of the first failure it would otherwise blur.

Errors every rank raises together (a config or data error, an agreed NaN stop, a SIGTERM stop) are not
announced: each rank ends on its own. Nor is a lost peer (another rank's failure, which it announced itself, or
a process killed outright: a SIGKILL announces nothing).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterator

#: the store key a failing rank sets (to its rank)
FAILED_KEY = "rlhf/failed"
#: how many ranks have seen FAILED_KEY (each other rank's watcher adds 1, the failing rank 1 for itself): the
#: failing rank waits for the world size before exiting, since rank 0's process usually hosts the store and
#: takes it with it
SEEN_KEY = "rlhf/failed-seen"
#: how long a failing rank waits for the others to have read its failure, at least (normally within one poll)
LINGER_S = 5.0
#: how often a watcher asks the store (one small request; a failure is noticed within this time), at most; a
#: run of more than POLL_RANKS ranks asks less often, so that rank 0's store answers at most POLL_RANKS a second
POLL_S, POLL_RANKS = 1.0, 256
#: how long a watcher that has seen a failure waits before ending its process: the failing rank reads the count
#: meanwhile (were rank 0 to end at once, the store would be gone, and asking it prints a C++ warning and stack),
#: then waits twice as long before it ends itself, so that the others end first (not on a collective broken by
#: its exit: "lost contact")
GRACE_S = 0.3

_own_failure = threading.Event()  # set while this rank reports its own failure: its watcher then stays quiet
_stop = threading.Event()  # set by stop_watch
_store_gone = threading.Event()  # set when the watcher found the store gone: nobody to tell any more
_watchers: list[threading.Thread] = []  # this process's watcher while it watches (start_watch to stop_watch)
_on_stop: list[Callable[[], None]] = []


def _address() -> tuple[str, int] | None:
    """(host, port) of the run's TCP store (that of the process group's rendezvous: MASTER_ADDR, MASTER_PORT),
    or None when they are not set."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    return (host, int(port)) if host and port.isdigit() else None


def _client(timeout: timedelta) -> Any:
    """A new connection to the run's TCP store."""
    import torch.distributed as tdist

    host, port = _address() or ("", 0)
    return tdist.TCPStore(host, port, is_master=False, timeout=timeout)


def launcher_stops_the_others(world_size: int) -> bool:
    """Whether the launcher that started this process ends every rank of the run when one fails: torchrun (its
    agents end the whole group; TORCHELASTIC_RUN_ID set), DeepSpeed's launcher with every rank on this node (one
    launch.py, which kills the rest: LOCAL_SIZE = WORLD_SIZE; over pdsh, each node's ends only its own)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("LOCAL_SIZE") == str(world_size)


def poll_interval(world_size: int) -> float:
    """Seconds between a watcher's requests: POLL_S, or world_size / POLL_RANKS when longer (rank 0's store then
    answers POLL_RANKS requests a second)."""
    return max(POLL_S, world_size / POLL_RANKS)


def start_watch(rank: int, world_size: int, end: Callable[[int], None] = os._exit,
                poll: float | None = None) -> threading.Thread | None:
    """Watch for another rank's failure (the daemon thread returned, which asks the store every `poll` seconds,
    by default `poll_interval`), in a run of more than one process whose store is at
    MASTER_ADDR:MASTER_PORT and whose launcher does not end the others itself (else None). `end` ends this
    process (os._exit: the main thread may be inside a collective that never returns)."""
    if world_size < 2 or launcher_stops_the_others(world_size) or _address() is None:
        return None
    poll = poll_interval(world_size) if poll is None else poll
    _own_failure.clear()
    _stop.clear()
    _store_gone.clear()
    watcher = threading.Thread(target=_watch, args=(rank, end, poll), name="rlhf-peer-watch", daemon=True)
    watcher.start()
    _watchers.append(watcher)
    atexit.register(stop_watch)
    return watcher


def stop_watch(timeout: float = 10.0) -> None:
    """Stop watching (the stage ended, one way or another) and wait for the watcher to leave: a thread inside the
    store's C++ client when the interpreter ends aborts the process (exit code 134), and a store whose host
    (rank 0) has ended prints a warning when asked."""
    _stop.set()
    while _watchers:
        _watchers.pop().join(timeout)


@contextlib.contextmanager
def on_stop(fn: Callable[[], None]) -> Iterator[None]:
    """Inside: a watcher ending this process for another rank's failure first runs `fn` (best effort): the
    cleanup the main thread, stuck in a collective, would have done on its way out."""
    _on_stop.append(fn)
    try:
        yield
    finally:
        _on_stop.remove(fn)


def _watch(rank: int, end: Callable[[int], None], poll: float) -> None:
    try:
        store = _client(timedelta(seconds=5))  # (below stop_watch's wait: never inside it at the end)
        while True:
            if not _reachable(5.0):  # (first: asking a store whose host has died prints a C++ warning and stack)
                raise ConnectionError("the store is gone")
            if store.check([FAILED_KEY]):
                break
            if _stop.wait(poll):
                return
        if _own_failure.is_set():  # this rank failed too: its own error is being said (and counted as seen)
            return
        failed = store.get(FAILED_KEY).decode()
        store.add(SEEN_KEY, 1)
    except Exception:  # noqa: BLE001 - the store is gone: its host process ended (a finished run, or rank 0 died)
        _store_gone.set()
        return
    sys.stderr.write(f"error (rank {rank}): stopping: rank {failed} of this run failed (its own error says why); "
                     "this process would otherwise wait for it until the collective timeout\n")
    sys.stderr.flush()
    sys.stdout.flush()
    for fn in reversed(_on_stop):
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort: the process ends anyway
            pass
    time.sleep(GRACE_S)
    end(1)


def owns_failure(exc: BaseException) -> bool:
    """Whether `exc`, ending this rank, is its own failure, for the others to hear of: not an error every rank
    raises together (RlhfError.every_rank), a lost peer, an interrupt or an exit."""
    from stages.distributed import peer_lost
    from stages.errors import RlhfError

    if isinstance(exc, (KeyboardInterrupt, SystemExit)) or peer_lost(exc):
        return False
    return not (isinstance(exc, RlhfError) and exc.every_rank)


def announce_failure(rank: int, world_size: int, linger: float | None = None) -> None:
    """Tell the other ranks (their watchers) that this rank failed, and wait up to `linger` seconds (default
    LINGER_S, or two polls when longer) until every rank has seen it (this one counts itself; its own watcher
    stops), then GRACE_S x 2 for the others to end first. Does nothing in a process that does not watch (one
    rank, no process group yet, or a stage that has ended) or when the store is gone (its host, rank 0, has
    ended: the torch client would retry for seconds, printing C++ stacks); this rank's error is still said and
    raised."""
    linger = max(LINGER_S, 2 * poll_interval(world_size)) if linger is None else linger
    if not _watchers or _store_gone.is_set() or not _reachable(linger):
        return
    _own_failure.set()
    _stop.set()
    try:
        store = _client(timedelta(seconds=linger))
        store.set(FAILED_KEY, str(rank))
        seen, deadline = store.add(SEEN_KEY, 1), time.monotonic() + linger
        while seen < world_size and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = store.add(SEEN_KEY, 0)
    except Exception:  # noqa: BLE001 - best effort: the store's host may have ended already
        return
    if seen >= world_size:
        time.sleep(2 * GRACE_S)


def _reachable(timeout: float) -> bool:
    """Whether the store's port takes a connection (a plain socket: no retries, no C++ warnings)."""
    address = _address()
    if address is None:
        return False
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return False
    return True
