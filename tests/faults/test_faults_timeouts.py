"""Hangs become errors (study A6, A7): task timeouts, cancelling running calls, heartbeats.

Timeouts run at test scale (a second or so); detection times are printed.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import signal
import time

import helpers
import psutil
import pytest
from faultkit import healthy

import distexec as dx
from distexec import _heartbeat

pytestmark = pytest.mark.timeout(180)


def gil_sleep(seconds: float) -> None:
    """A C call that holds the GIL (PyDLL does not release it): no Python code runs."""
    ctypes.PyDLL(None).sleep(int(seconds))


def busy(seconds: float) -> float:
    """Pure Python: interruptible, and the worker still answers heartbeats meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


HANGS = [
    pytest.param(time.sleep, id="time.sleep (releases the GIL)"),
    pytest.param(gil_sleep, id="GIL-holding C call"),
]


@pytest.mark.parametrize("hang", HANGS)
def test_executor_task_timeout_kills_and_replaces(hang: object, no_leaked_workers: None) -> None:
    """A6: Executor(task_timeout=t): the hung call fails with TaskTimeoutError at about t;
    its worker is killed and replaced; calls that shared the worker run again elsewhere."""
    t = 1.0
    with dx.DistributedExecutor(2, task_timeout=t) as ex:
        healthy(ex)
        replaced = ex.statistics().replaced_workers
        t0 = time.monotonic()
        hung = ex.submit(hang, 1000)
        others = [ex.submit(busy, 0.2) for _ in range(6)]
        with pytest.raises(dx.TaskTimeoutError) as info:
            hung.result(timeout=60)
        failed_at = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError) and info.value.timeout == t
        assert [f.result(timeout=60) for f in others] == [0.2] * 6
        healthy(ex)
        replaced_at = time.monotonic() - t0
        s = ex.statistics()
        print(
            f"{hang.__name__}: TaskTimeoutError at {failed_at:.2f} s (timeout {t} s), "
            f"worker replaced by {replaced_at:.2f} s; requeued {s.requeued}"
        )
        assert s.timed_out == 1 and s.replaced_workers == replaced + 1
        assert failed_at < t + 5


def test_result_timeout_leaves_the_call_running(no_leaked_workers: None) -> None:
    """A6, the other knob: fut.result(timeout=) raises TimeoutError and the call goes on."""
    with dx.DistributedExecutor(1) as ex:
        fut = ex.submit(helpers.sleep_and_return, 1.0)
        with pytest.raises(cf.TimeoutError):
            fut.result(timeout=0.1)
        assert not fut.done()
        assert fut.result(timeout=30) == 1.0


def _hang_on_first_attempt(x: int) -> int:
    if x == 3 and dx.remotecall_fetch(helpers.next_attempt, 1, ("hang", x)) == 1:
        gil_sleep(1000)
    return x * x


def test_pmap_timeout_retries_elsewhere(no_leaked_workers: None) -> None:
    """A6: pmap(timeout=t, retry_delays=...) kills the hung worker and retries the element
    on another one; the result is complete and in order."""
    helpers.reset_attempts()
    pids = dx.addprocs(3)
    try:
        pool = dx.WorkerPool(pids)
        t0 = time.monotonic()
        got = dx.pmap(_hang_on_first_attempt, range(12), pool=pool, timeout=1.0, retry_delays=[0])
        print(f"pmap with one hung element: {time.monotonic() - t0:.2f} s (timeout 1 s)")
        assert got == [x * x for x in range(12)]
        assert len(pool.workers()) == 2  # the hung worker was killed and left the pool
    finally:
        dx.rmprocs([p for p in pids if p in dx.workers()])


def test_pmap_timeout_without_retries_raises(no_leaked_workers: None) -> None:
    helpers.reset_attempts()
    pids = dx.addprocs(2)
    try:
        pool = dx.WorkerPool(pids)
        with pytest.raises(dx.TaskTimeoutError):
            dx.pmap(_hang_on_first_attempt, range(6), pool=pool, timeout=1.0)
        got = dx.pmap(
            _hang_on_first_attempt,
            range(6),
            pool=dx.WorkerPool(pool.workers()),
            timeout=1.0,
            on_error=lambda e: type(e).__name__,
        )
        assert got == [x * x for x in range(6)]  # attempt 2 of element 3 does not hang
    finally:
        dx.rmprocs([p for p in pids if p in dx.workers()])


def _keywords(*, timeout: object = None, task_timeout: object = None) -> tuple[object, object]:
    return timeout, task_timeout


def test_worker_pool_task_timeout(no_leaked_workers: None) -> None:
    """WorkerPool(task_timeout=): every call through the pool is bounded; the user's own
    keyword arguments (even called timeout) still reach the function untouched."""
    pids = dx.addprocs(3)
    try:
        pool = dx.WorkerPool(pids, task_timeout=1.0)
        assert pool.remotecall_fetch(_keywords, timeout=7, task_timeout=8) == (7, 8)
        assert dx.remotecall_fetch(_keywords, pool, timeout=9) == (9, None)
        t0 = time.monotonic()
        with pytest.raises(dx.TaskTimeoutError):
            pool.remotecall_fetch(time.sleep, 1000)
        print(f"pool.remotecall_fetch timed out after {time.monotonic() - t0:.2f} s")
        fut = dx.remotecall(gil_sleep, pool, 1000)
        with pytest.raises(dx.TaskTimeoutError):
            fut.result(timeout=60)
        assert len(pool.workers()) == 1  # both hung workers were killed and left the pool
        assert dx.remotecall_wait(abs, pool, -1).fetch() == 1
        copy = __import__("pickle").loads(__import__("pickle").dumps(pool))
        assert copy.task_timeout == 1.0
    finally:
        dx.rmprocs([p for p in pids if p in dx.workers()])


# -------------------------------------------------------------------------- cancel()


def test_cancel_a_running_call_interrupts_it(no_leaked_workers: None) -> None:
    """cancel() on a RUNNING future: True, cancelled at once, the Python call is
    interrupted, the worker lives, and a call that shared the worker still completes."""
    with dx.DistributedExecutor(1, cancel_grace=5.0) as ex:
        ospid = ex.submit(os.getpid).result(timeout=30)
        fut = ex.submit(busy, 1000)
        other = ex.submit(busy, 0.5)
        helpers.wait_until(fut.running, timeout=30, what="the call to start")
        t0 = time.monotonic()
        assert fut.cancel() is True
        assert fut.cancelled() and fut.done()
        with pytest.raises(cf.CancelledError):
            fut.result(timeout=1)
        assert cf.wait([fut], timeout=1).done == {fut}
        assert other.result(timeout=30) == 0.5  # hit by the interrupt too: run again
        helpers.wait_until(lambda: ex.statistics().running == 0, timeout=30, what="it to stop")
        print(f"cancelled running call stopped after {time.monotonic() - t0:.2f} s")
        assert ex.submit(os.getpid).result(timeout=30) == ospid  # the same worker
        assert ex.statistics().replaced_workers == 0


def test_cancel_an_uninterruptible_call_kills_the_worker(no_leaked_workers: None) -> None:
    """A call in a C call ignores the interrupt: after cancel_grace its worker is killed
    and replaced."""
    with dx.DistributedExecutor(1, cancel_grace=0.5) as ex:
        ospid = ex.submit(os.getpid).result(timeout=30)
        fut = ex.submit(gil_sleep, 1000)
        helpers.wait_until(fut.running, timeout=30, what="the call to start")
        t0 = time.monotonic()
        assert fut.cancel()
        helpers.wait_until(lambda: not psutil.pid_exists(ospid), timeout=30, what="the kill")
        print(f"uninterruptible cancelled call: worker killed after {time.monotonic() - t0:.2f} s")
        healthy(ex, 1)
        assert ex.submit(os.getpid).result(timeout=30) != ospid
        assert ex.statistics().replaced_workers == 1


def test_cancel_before_start_is_plain(no_leaked_workers: None) -> None:
    with dx.DistributedExecutor(1) as ex:
        first = ex.submit(helpers.sleep_and_return, 0.5)
        queued = [ex.submit(abs, -i) for i in range(10)]
        cancelled = [f for f in queued if f.cancel()]
        assert first.result(timeout=30) == 0.5
        for f in queued:
            assert f.cancelled() if f in cancelled else f.result(timeout=30) >= 0
        assert ex.statistics().replaced_workers == 0


# -------------------------------------------------------------------------- heartbeats


def test_stopped_worker_is_declared_unresponsive(fast_heartbeat: object) -> None:
    """A7: SIGSTOP a worker with a call in flight: after the heartbeat timeout its calls fail
    with WorkerUnresponsiveError and the process is killed."""
    (pid,) = dx.addprocs(1)
    ospid = dx.remotecall_fetch(os.getpid, pid)
    fut = dx.remotecall(time.sleep, pid, 60)
    before = _heartbeat.statistics().unresponsive
    os.kill(ospid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(dx.WorkerUnresponsiveError) as info:
        fut.fetch(timeout=30)
    elapsed = time.monotonic() - t0
    print(f"SIGSTOPped worker declared unresponsive after {elapsed:.2f} s (timeout 1.5 s)")
    assert isinstance(info.value, dx.WorkerDiedError) and info.value.signal == signal.SIGKILL
    assert "heartbeat" in str(info.value)
    assert _heartbeat.statistics().unresponsive == before + 1
    helpers.wait_until(lambda: not psutil.pid_exists(ospid), timeout=10, what="the kill")
    assert pid not in dx.workers()


def test_stopped_worker_is_found_while_a_large_argument_is_written_to_it(
    fast_heartbeat: _heartbeat.HeartbeatSettings,
) -> None:
    """A7 with a large argument on its way: the write blocks once the stopped worker's
    socket is full, and the heartbeat's ping waits behind it. Over AF_UNIX no kernel timeout
    ends that; the heartbeat sees that no byte has gone out for its timeout (it hung)."""
    (pid,) = dx.addprocs(1)
    ospid = dx.remotecall_fetch(os.getpid, pid)
    os.kill(ospid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(dx.WorkerUnresponsiveError) as info:
        dx.remotecall_fetch(len, pid, bytes(8 << 20))
    elapsed = time.monotonic() - t0
    print(f"stopped worker with 8 MB on its way declared unresponsive after {elapsed:.2f} s")
    assert "took none of the bytes" in str(info.value)
    assert fast_heartbeat.interval is not None
    assert elapsed < fast_heartbeat.timeout + fast_heartbeat.interval + 5
    helpers.wait_until(lambda: not psutil.pid_exists(ospid), timeout=10, what="the kill")


def test_large_transfers_to_a_live_worker_are_no_error(fast_heartbeat: object) -> None:
    """The other side of that check: a worker that takes large arguments and gives large
    results back, while the heartbeat looks every 0.2 s, is never found unresponsive."""
    (pid,) = dx.addprocs(1)
    try:
        before = _heartbeat.statistics().unresponsive
        data = bytes(64 << 20)
        for _ in range(3):
            assert dx.remotecall_fetch(len, pid, data) == len(data)
            assert len(dx.remotecall_fetch(bytes, pid, 64 << 20)) == 64 << 20
        assert _heartbeat.statistics().unresponsive == before
    finally:
        dx.rmprocs(pid)


def test_sigcont_before_the_timeout_is_no_error(fast_heartbeat: object) -> None:
    """A7: a worker stopped for less than the heartbeat timeout is left alone."""
    (pid,) = dx.addprocs(1)
    try:
        ospid = dx.remotecall_fetch(os.getpid, pid)
        before = _heartbeat.statistics().unresponsive
        for _ in range(3):
            os.kill(ospid, signal.SIGSTOP)
            time.sleep(0.4)  # the fault's duration, not a wait for a condition
            os.kill(ospid, signal.SIGCONT)
            assert dx.remotecall_fetch(abs, pid, -1) == 1
        assert _heartbeat.statistics().unresponsive == before
    finally:
        dx.rmprocs(pid)


def test_busy_python_worker_keeps_answering(fast_heartbeat: object) -> None:
    """A worker busy in Python code for longer than the heartbeat timeout still answers."""
    (pid,) = dx.addprocs(1)
    try:
        before = _heartbeat.statistics()
        assert dx.remotecall_fetch(busy, pid, 3.0) == 3.0
        after = _heartbeat.statistics()
        assert after.unresponsive == before.unresponsive
        assert after.pings_sent > before.pings_sent
    finally:
        dx.rmprocs(pid)


def test_gil_holding_call_longer_than_the_timeout_is_unresponsive(fast_heartbeat: object) -> None:
    """The documented limit: a C call that holds the GIL past the heartbeat timeout looks
    like a hang (raise the timeout, or turn heartbeats off, for such work)."""
    (pid,) = dx.addprocs(1)
    with pytest.raises(dx.WorkerUnresponsiveError):
        dx.remotecall_fetch(gil_sleep, pid, 60)
    assert pid not in dx.workers()


def test_heartbeat_thread_ends_with_the_last_worker(fast_heartbeat: object) -> None:
    (pid,) = dx.addprocs(1)
    helpers.wait_until(lambda: _heartbeat.statistics().running, timeout=10, what="the thread")
    dx.rmprocs(pid)
    if not [p for p in dx.workers() if p != 1]:
        helpers.wait_until(
            lambda: not _heartbeat.statistics().running, timeout=10, what="the thread to end"
        )


def test_configure_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        _heartbeat.configure(interval=0)
    with pytest.raises(ValueError):
        _heartbeat.configure(timeout=-1)
    with pytest.raises(ValueError):
        dx.DistributedExecutor(1, task_timeout=0)
    with pytest.raises(TypeError):
        dx.WorkerPool([], task_timeout="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dx.pmap(abs, [1], timeout=-1)


def _pool_call_from_a_worker(other: int) -> str:
    pool = dx.WorkerPool([other], task_timeout=1.0)
    try:
        pool.remotecall_fetch(time.sleep, 1000)
    except dx.TaskTimeoutError as exc:
        return type(exc).__name__
    return "no timeout"


def test_worker_pool_task_timeout_on_a_worker(no_leaked_workers: None) -> None:
    """A pool with a task timeout used on a worker: the call fails there with
    TaskTimeoutError and pid 1 kills the hung worker (only pid 1 holds the process)."""
    a, b = dx.addprocs(2)
    try:
        ospid = dx.remotecall_fetch(os.getpid, b)
        assert dx.remotecall_fetch(_pool_call_from_a_worker, a, b) == "TaskTimeoutError"
        helpers.wait_until(lambda: not psutil.pid_exists(ospid), timeout=30, what="the kill")
        helpers.wait_until(lambda: b not in dx.workers(), timeout=30, what="b to leave")
    finally:
        dx.rmprocs([p for p in (a, b) if p in dx.workers()])
