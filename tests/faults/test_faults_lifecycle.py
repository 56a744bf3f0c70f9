"""Nothing leaked (study E1, E6, E7, E8): many pending futures, every way of ending workers,
removing a busy worker, and shutting down with work queued.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import helpers
import psutil
import pytest
from faultkit import live_children

import distexec as dx

pytestmark = pytest.mark.timeout(180)


def gil_sleep(seconds: float) -> None:
    ctypes.PyDLL(None).sleep(int(seconds))


def _gone(ospids: list[int]) -> bool:
    for p in ospids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
        return False  # a zombie counts as left behind
    return True


def _end_by_shutdown() -> list[int]:
    ex = dx.DistributedExecutor(2)
    ospids = list(ex.map(lambda _: os.getpid(), range(20)))
    ex.shutdown()
    return ospids


def _end_by_with() -> list[int]:
    with dx.DistributedExecutor(2) as ex:
        return list(ex.map(lambda _: os.getpid(), range(20)))


def _end_by_rmprocs() -> list[int]:
    pids = dx.addprocs(2)
    ospids = [dx.remotecall_fetch(os.getpid, p) for p in pids]
    dx.rmprocs(pids)
    return ospids


def _end_deaf_worker(tmp: pathlib.Path) -> list[int]:
    """A worker that ignores SIGTERM and cannot hear the exit message (a GIL-holding call
    keeps its reader from running): rmprocs escalates to SIGKILL."""
    (tmp / "sitecustomize.py").write_text(
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    )
    (pid,) = dx.addprocs(1, env={"PYTHONPATH": str(tmp)})
    ospid = dx.remotecall_fetch(os.getpid, pid)
    dx.remote_do(gil_sleep, pid, 60)
    dx.rmprocs(pid)
    return [ospid]


ENDINGS: list[tuple[str, Callable[..., list[int]]]] = [
    ("executor.shutdown()", _end_by_shutdown),
    ("leaving a with block", _end_by_with),
    ("rmprocs()", _end_by_rmprocs),
    ("rmprocs() of a worker deaf to exit and SIGTERM", _end_deaf_worker),
]


@pytest.mark.parametrize(("name", "end"), ENDINGS, ids=[n for n, _ in ENDINGS])
def test_no_child_or_zombie_left(
    name: str, end: Callable[..., list[int]], tmp_path: pathlib.Path
) -> None:
    """E6: after each way of ending workers, none of them is left, not even as a zombie."""
    before = {p.pid for p in live_children()}
    t0 = time.monotonic()
    ospids = end(tmp_path) if end is _end_deaf_worker else end()
    helpers.wait_until(lambda: _gone(ospids), timeout=15, what="the workers to be gone")
    print(f"{name}: every worker gone {time.monotonic() - t0:.2f} s after it began")
    helpers.wait_until(
        lambda: not ({p.pid for p in live_children()} - before),
        timeout=5,
        what="no new child or zombie",
    )


MASTER = """
import os, sys, time
import distexec as dx
pids = dx.addprocs(2)
ex = dx.DistributedExecutor(2)
own = set(ex.map(lambda _: os.getpid(), range(20)))
print(" ".join(str(dx.remotecall_fetch(os.getpid, p)) for p in pids), *own, flush=True)
time.sleep(120)
"""


def test_master_sigkill_leaves_no_orphan() -> None:
    """E6: SIGKILL the master itself: its workers (addprocs and executor-owned) exit within
    5 s (PR_SET_PDEATHSIG, and EOF on their stdin)."""
    master = subprocess.Popen(
        [sys.executable, "-c", MASTER],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
    )
    try:
        assert master.stdout is not None
        ospids = [int(x) for x in master.stdout.readline().split()]
        assert len(ospids) == 4 and all(psutil.pid_exists(p) for p in ospids)
        t0 = time.monotonic()
        master.kill()
        master.wait(10)
        helpers.wait_until(lambda: _gone(ospids), timeout=10, what="the orphaned workers")
        elapsed = time.monotonic() - t0
        print(f"master SIGKILLed: its 4 workers gone after {elapsed:.2f} s (target <= 5 s)")
        assert elapsed < 10
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(10)


def test_rmprocs_of_a_busy_worker(no_leaked_workers: None) -> None:
    """E7: rmprocs while a call runs there: that call fails with ClusterClosedError (we
    closed it, it did not die), the other worker's call is untouched, the worker leaves
    every pool, and rmprocs(waitfor=0.001) raises yet the removal completes."""
    a, b = dx.addprocs(2)
    pool = dx.WorkerPool([a, b])
    busy = dx.remotecall(time.sleep, a, 30)
    other = dx.remotecall(helpers.sleep_and_return, b, 0.3)
    with pytest.raises(dx.ClusterError):
        dx.rmprocs(a, waitfor=0.001)
    helpers.wait_until(lambda: a not in dx.workers(), timeout=30, what="the removal")
    with pytest.raises(dx.ClusterClosedError):
        busy.fetch(timeout=30)
    assert other.fetch(timeout=30) == 0.3
    assert pool.workers() == [b]
    dx.rmprocs(b)


def _remove_after(pid: int, seconds: float) -> None:
    time.sleep(seconds)  # the fault's timing, not a wait for a condition
    dx.rmprocs(pid)


def test_rmprocs_during_batched_pmap_with_one_retry(no_leaked_workers: None) -> None:
    """E7 with batches and a single retry: the elements of the removed worker's batches
    fail with ClusterClosedError and run again, on another worker, not on the removed one
    (which the map's own list of workers still held: the retry was spent there)."""
    for round_ in range(3):
        pids = dx.addprocs(3)
        t = threading.Thread(target=_remove_after, args=(pids[round_], 0.3))  # mid-map
        t.start()
        try:
            out = dx.pmap(
                lambda x: (time.sleep(0.008), x * x)[1],
                range(300),
                batch_size=5,
                retry_delays=[0.0],
            )
            assert out == [x * x for x in range(300)]
        finally:
            t.join(60)
            dx.rmprocs([p for p in pids if p in dx.workers()])


def test_rmprocs_during_pmap_with_retries(no_leaked_workers: None) -> None:
    """E7: a worker removed in the middle of a pmap with retry_delays: its elements run
    again on the other workers; the output is exact."""
    pids = dx.addprocs(3)
    for p in pids:
        dx.remotecall_fetch(helpers.reset_runs, p)
    pool = dx.WorkerPool(pids)

    def remove_one() -> None:
        helpers.wait_until(
            lambda: len(dx.remotecall_fetch(helpers.runs, pids[0])) >= 100,
            timeout=60,
            what="the worker to be busy",
        )
        dx.rmprocs(pids[0])

    t = threading.Thread(target=remove_one)
    t.start()
    try:
        n = 3000
        out = dx.pmap(
            helpers.square_failing_once,
            range(n),
            [frozenset()] * n,
            pool=pool,
            retry_delays=[0.01] * 3,
        )
        assert out == [x * x for x in range(n)]
    finally:
        t.join(60)
        dx.rmprocs([p for p in pids if p in dx.workers()])
    assert pids[0] not in pool.workers()


def test_ten_thousand_pending_futures(no_leaked_workers: None) -> None:
    """E1: 10,000 calls submitted at once to 2 workers: the submit loop does not block,
    every result is right, as_completed yields each future once; master RSS growth shown."""
    me = psutil.Process()
    with dx.DistributedExecutor(2) as ex:
        ex.submit(abs, 1).result(timeout=60)
        rss0 = me.memory_info().rss
        t0 = time.monotonic()
        fs = [ex.submit(pow, i, 2) for i in range(10_000)]
        submit_s = time.monotonic() - t0
        seen = [f.result() for f in cf.as_completed(fs, timeout=120)]
        total_s = time.monotonic() - t0
        grown = (me.memory_info().rss - rss0) / (1 << 20)
        assert sorted(seen) == sorted(i * i for i in range(10_000))
        assert len(set(map(id, cf.as_completed(fs)))) == 10_000
        print(
            f"10,000 pending futures: submit loop {submit_s:.2f} s (target < 2 s), "
            f"all done {total_s:.2f} s, master RSS {grown:+.1f} MiB (target < 50)"
        )
        more = [ex.submit(helpers.sleep_and_return, 0.01) for _ in range(1000)]
        cancelled = sum(f.cancel() for f in more[10:])
        assert cancelled > 0
        assert all(f.cancelled() or f.result(timeout=60) == 0.01 for f in more)


def test_shutdown_without_wait_cancels_the_queue_at_once(no_leaked_workers: None) -> None:
    """E8: shutdown(wait=False, cancel_futures=True) with 10,000 pending returns at once and
    cancels what had not started; the executor's thread is gone shortly after."""
    ex = dx.DistributedExecutor(2)
    ex.submit(abs, 1).result(timeout=60)
    fs = [ex.submit(helpers.sleep_and_return, 0.001) for _ in range(10_000)]
    t0 = time.monotonic()
    ex.shutdown(wait=False, cancel_futures=True)
    returned = time.monotonic() - t0
    cancelled = sum(f.cancelled() for f in fs)
    print(
        f"shutdown(wait=False, cancel_futures=True): {returned * 1000:.1f} ms, "
        f"{cancelled} cancelled"
    )
    assert returned < 2.0
    assert cancelled >= 9_000  # the rest had started (or finished) before the call
    helpers.wait_until(lambda: all(f.done() for f in fs), timeout=60, what="the rest")
    assert all(f.cancelled() or f.result() == 0.001 for f in fs)
    helpers.wait_until(
        lambda: not [t for t in threading.enumerate() if t.name == "distexec-executor"],
        timeout=30,
        what="the executor's thread to end",
    )
