"""multiprocessing's locks, semaphores, conditions, events, pipes and queues as call arguments.

Pickled alone they insist on process inheritance, but one made for the spawn or forkserver
start method is a named POSIX semaphore that any process of the machine can open. distexec
sends them by that name, so a worker blocks on the very semaphore the caller releases. One
made for fork has no name left: sending it fails at once, saying why, and sends nothing.
A pipe's descriptor goes through multiprocessing's resource sharer, which serves processes
that hold the master's multiprocessing authkey: local workers get it, as multiprocessing's
children do.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import threading
import time
from concurrent.futures.process import BrokenProcessPool

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


def _send(conn: object, value: object) -> str:
    conn.send(value)  # type: ignore[attr-defined]
    return "sent"


def _put(queue: object, value: object) -> str:
    queue.put(value)  # type: ignore[attr-defined]
    return "put"


def _a_pipe_end() -> object:
    a, b = multiprocessing.get_context("spawn").Pipe()
    b.send("made on the worker")
    return a


def _take_all(queue: object, n: int) -> list[object]:
    out = []
    for _ in range(n):
        out.append(queue.get(timeout=20))  # type: ignore[attr-defined]
        queue.task_done()  # type: ignore[attr-defined]
    return out


def test_a_pipe_end_crosses_both_ways(cluster: list[int]) -> None:
    a, b = multiprocessing.Pipe()  # the default (fork) context: a pipe has no semaphore
    assert dx.remotecall_fetch(_send, cluster[0], b, {"n": 1}) == "sent"
    assert a.recv() == {"n": 1}  # written by the worker into our pipe
    for i in range(3):  # the same end again, to either worker: a fresh descriptor each time
        dx.remotecall_fetch(_send, cluster[i % 2], b, i)
    assert [a.recv() for _ in range(3)] == [0, 1, 2]
    mine = dx.remotecall_fetch(_a_pipe_end, cluster[1])
    assert mine.recv() == "made on the worker"


@pytest.mark.parametrize("method", METHODS)
def test_queues_cross_processes(cluster: list[int], method: str) -> None:
    ctx = multiprocessing.get_context(method)
    q, sq = ctx.Queue(), ctx.SimpleQueue()
    assert dx.remotecall_fetch(_put, cluster[0], q, "to the queue") == "put"
    assert q.get(timeout=20) == "to the queue"
    assert dx.remotecall_fetch(_put, cluster[1], sq, "to the simple queue") == "put"
    assert sq.get() == "to the simple queue"
    jq = ctx.JoinableQueue()
    for i in range(3):
        jq.put(i)
    assert dx.remotecall_fetch(_take_all, cluster[0], jq, 3) == [0, 1, 2]
    done = threading.Thread(target=jq.join)
    done.start()
    done.join(20)
    assert not done.is_alive()  # the worker's task_done() counted here


def test_a_message_that_fails_to_pickle_gives_its_descriptors_back() -> None:
    from multiprocessing import resource_sharer

    from distexec._protocol import codec

    _a, b = multiprocessing.Pipe()
    sharer = resource_sharer._resource_sharer  # type: ignore[attr-defined]
    offered = len(sharer._cache)
    with pytest.raises(dx.SerializationError):
        codec.dumps((b, threading.Lock()))  # the lock fails after the pipe was reduced
    assert len(sharer._cache) == offered  # the pipe's duplicate was taken back and closed


def _log_and_fail(queue: object) -> None:
    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.handlers.QueueHandler(queue))  # type: ignore[arg-type]
    logger.setLevel("CRITICAL")
    logger.propagate = False
    raise ValueError("the initializer failed")


def test_an_initializer_logs_its_failure_on_its_worker() -> None:
    """As ProcessPoolExecutor's worker does: an initializer that points the
    ``concurrent.futures`` logger at a queue finds its own failure there."""
    spawn = multiprocessing.get_context("spawn")
    log = spawn.Queue()
    ex = DistributedExecutor(
        max_workers=1, mp_context=spawn, initializer=_log_and_fail, initargs=(log,)
    )
    try:
        with pytest.raises(BrokenProcessPool):
            ex.submit(abs, -1).result(timeout=30)
        record = log.get(timeout=20)
        assert "ValueError: the initializer failed" in record.getMessage()
    finally:
        ex.shutdown(wait=True)


def _add_to(shared: object, key: str) -> int:
    shared[key] = 42  # type: ignore[index]
    return len(shared)  # type: ignore[arg-type]


def test_a_managers_proxy_works_in_a_worker(cluster: list[int]) -> None:
    """A local worker has the master's multiprocessing authkey, as multiprocessing's
    children do, so a Manager's proxy connects back to its manager from there."""
    with multiprocessing.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        assert dx.remotecall_fetch(_add_to, cluster[0], shared, "from a worker") == 1
        assert dict(shared) == {"from a worker": 42}


def _forget_the_authkey() -> None:
    import os

    from distexec import _config

    _config.mp_authkey = None
    multiprocessing.current_process().authkey = os.urandom(32)


def test_a_pipe_for_a_worker_without_the_authkey_fails_saying_why(
    no_leaked_workers: None,
) -> None:
    """As a worker on another host: it cannot fetch the descriptor, and says why."""
    (w,) = dx.addprocs(1)
    try:
        dx.remotecall_fetch(_forget_the_authkey, w)
        _a, b = multiprocessing.Pipe()
        with pytest.raises(dx.RemoteException, match="reaches only local workers"):
            dx.remotecall_fetch(_send, w, b, 1)
        assert dx.remotecall_fetch(helpers.identity, w, "still serving") == "still serving"
    finally:
        dx.rmprocs(w)


def _rebuild_from_a_sharer_out_of_reach() -> str:
    from multiprocessing import resource_sharer

    from distexec._protocol import codec

    dup = resource_sharer.DupFd.__new__(resource_sharer.DupFd)
    dup._id = ("/nonexistent/pymp-elsewhere/listener-1", 1)  # another host's sharer
    try:
        codec._rebuild_connection(dup, True, True)
    except RuntimeError as exc:
        return str(exc)
    return "rebuilt"


def test_a_pipe_for_a_worker_that_cannot_reach_the_sharer_fails_saying_why(
    cluster: list[int],
) -> None:
    """As a worker on another host, whose filesystem lacks the sender's sharer socket: the
    same words as a refused authkey, with the cause, not a bare FileNotFoundError."""
    said = dx.remotecall_fetch(_rebuild_from_a_sharer_out_of_reach, cluster[0])
    assert "reaches only local workers" in said
    assert "cannot reach the sender's resource sharer" in said
    assert "FileNotFoundError" in said
