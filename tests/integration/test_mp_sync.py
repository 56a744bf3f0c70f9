"""multiprocessing's locks, semaphores, conditions and events as call arguments.

Pickled alone they insist on process inheritance, but one made for the spawn or forkserver
start method is a named POSIX semaphore that any process of the machine can open. distexec
sends them by that name, so a worker blocks on the very semaphore the caller releases. One
made for fork has no name left: sending it fails at once, saying why, and sends nothing.
"""

from __future__ import annotations

import multiprocessing
import time

import helpers
import pytest

import distexec as dx
from distexec import DistributedExecutor

pytestmark = pytest.mark.timeout(60)

METHODS = [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


def _acquire(lock: object, timeout: float) -> bool:
    return lock.acquire(timeout=timeout)  # type: ignore[attr-defined,no-any-return]


def _wait_for(cond: object, event: object) -> bool:
    with cond:  # type: ignore[attr-defined]
        event.set()  # type: ignore[attr-defined]  # now waiting (the lock is held until wait)
        return cond.wait(timeout=20)  # type: ignore[attr-defined,no-any-return]


def _set(event: object) -> None:
    event.set()  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_blocks_on_the_callers_semaphore(cluster: list[int], method: str) -> None:
    ctx = multiprocessing.get_context(method)
    sem = ctx.Semaphore(0)
    fut = dx.remotecall(sem.acquire, cluster[0])  # the C object's method: pickled by name too
    time.sleep(0.3)
    assert not fut.isready()  # it waits on this very semaphore ...
    sem.release()
    assert fut.fetch() is True  # ... and this release reached it
    sem.release()
    assert dx.remotecall_fetch(_acquire, cluster[1], sem, 10) is True
    assert not sem.acquire(timeout=0.05)  # the worker took it: one semaphore, not a copy


@pytest.mark.parametrize("method", METHODS)
def test_a_lock_held_here_is_held_there(cluster: list[int], method: str) -> None:
    ctx = multiprocessing.get_context(method)
    for lock in (ctx.Lock(), ctx.RLock(), ctx.BoundedSemaphore(1)):
        lock.acquire()
        assert dx.remotecall_fetch(_acquire, cluster[0], lock, 0.2) is False
        lock.release()
        assert dx.remotecall_fetch(_acquire, cluster[0], lock, 10) is True


@pytest.mark.parametrize("method", METHODS)
def test_a_condition_and_an_event_cross_processes(cluster: list[int], method: str) -> None:
    ctx = multiprocessing.get_context(method)
    cond, waiting = ctx.Condition(), ctx.Event()
    fut = dx.remotecall(_wait_for, cluster[0], cond, waiting)
    assert waiting.wait(20)  # set on the worker, seen here
    with cond:  # acquirable once the worker waits (its wait released the lock)
        cond.notify_all()
    assert fut.fetch() is True  # notified from here, on the worker
    done = ctx.Event()
    dx.remotecall_fetch(_set, cluster[1], done)
    assert done.is_set()


def test_one_made_for_fork_is_refused_with_the_reason(cluster: list[int]) -> None:
    sem = multiprocessing.get_context("fork").Semaphore(1)
    with pytest.raises(dx.SerializationError, match="made for the fork start method"):
        dx.remotecall_fetch(_acquire, cluster[0], sem, 1)
    with pytest.raises(dx.SerializationError, match="made for the fork start method"):
        dx.remotecall(sem.acquire, cluster[0])
    assert dx.remotecall_fetch(helpers.identity, cluster[0], "still here") == "still here"


def test_reading_processes_waits_for_the_workers_being_started() -> None:
    """ProcessPoolExecutor starts a worker inside submit(); here the manager thread starts it
    just after, and ``_processes`` waits for it, so the count after submit() is the same."""
    spawn = multiprocessing.get_context("spawn")  # workers on demand, as with spawn there
    sem = spawn.Semaphore(0)
    with DistributedExecutor(max_workers=4, mp_context=spawn) as ex:
        futures = [ex.submit(_acquire, sem, 30) for _ in range(3)]  # each holds a worker
        assert len(ex._processes) == 3
        for _ in futures:
            sem.release()
        assert [f.result(timeout=30) for f in futures] == [True] * 3


def test_a_fork_executor_starts_its_workers_even_if_the_first_call_fails() -> None:
    """With the fork start method the first submit starts every worker, as it does for
    ProcessPoolExecutor, even when that call cannot be pickled."""
    sem = multiprocessing.get_context("fork").Semaphore(0)
    with DistributedExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as ex:
        fut = ex.submit(_acquire, sem, 1)
        with pytest.raises(dx.SerializationError, match="fork start method"):
            fut.result(timeout=30)
        assert len(ex._processes) == 2
        assert ex.submit(abs, -3).result(timeout=30) == 3
