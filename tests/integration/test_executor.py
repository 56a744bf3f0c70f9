"""DistributedExecutor: the drop-in for ProcessPoolExecutor, on real workers."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import os
import time
from concurrent.futures.process import BrokenProcessPool

import helpers
import pytest

import distexec as dx
from distexec import DistributedExecutor

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def executor() -> object:
    with DistributedExecutor(max_workers=2) as ex:
        yield ex
        owned = ex.workers()
    from distexec import _cluster

    g = _cluster.group()
    helpers.wait_until(
        lambda: all(g.peer(p).state is _cluster.PeerState.TERMINATED for p in owned),
        what="the executor's workers to be removed",
    )


def test_argument_checks_match_processpoolexecutor() -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        DistributedExecutor(0)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        DistributedExecutor(-1)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        DistributedExecutor(1, initializer=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        DistributedExecutor(1, max_tasks_per_child=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        DistributedExecutor(1, max_tasks_per_child=0)


def test_submit_map_and_errors(executor: DistributedExecutor) -> None:
    assert executor.submit(pow, 2, 5).result(timeout=30) == 32
    assert executor.submit(pow, base=2, exp=3).result(timeout=30) == 8
    assert list(executor.map(abs, [-1, -2, 3])) == [1, 2, 3]
    assert list(executor.map(pow, [2, 3], [2, 2], chunksize=5)) == [4, 9]
    fut = executor.submit(helpers.raise_value_error, "nope")
    with pytest.raises(ValueError, match="nope") as info:
        fut.result(timeout=30)
    assert "raise_value_error" in str(info.value.__cause__)
    it = executor.map(lambda x: 1 // x, [1, 1, 0, 1])
    assert next(it) == 1 and next(it) == 1
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_lambdas_work_here_unlike_processpoolexecutor(executor: DistributedExecutor) -> None:
    k = 3
    assert executor.submit(lambda x: x * k, 5).result(timeout=30) == 15
    with cf.ProcessPoolExecutor(1) as ppe, pytest.raises(Exception):  # noqa: B017 - by version
        ppe.submit(lambda x: x * k, 5).result(timeout=30)


def test_map_with_on_error(executor: DistributedExecutor) -> None:
    got = list(executor.map(lambda x: 1 // x, [1, 0, 2], on_error=lambda e: type(e).__name__))
    assert got == [1, "ZeroDivisionError", 0]
    got = list(executor.map(lambda x: 1 // x, [1, 0, 2], chunksize=2, on_error=lambda e: -1))
    assert got == [1, -1, 0]


def test_map_buffersize_is_lazy(executor: DistributedExecutor) -> None:
    pulled = 0

    def endless() -> object:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    it = executor.map(abs, endless(), buffersize=4)
    assert [next(it) for _ in range(10)] == list(range(10))
    assert pulled <= 10 + 4 + 1
    with pytest.raises(ValueError):
        executor.map(abs, [1], buffersize=0)


def test_map_timeout(executor: DistributedExecutor) -> None:
    it = executor.map(time.sleep, [0, 2], timeout=0.5)
    with pytest.raises(cf.TimeoutError):
        list(it)


def test_futures_with_wait_as_completed_and_asyncio(executor: DistributedExecutor) -> None:
    fs = [executor.submit(pow, i, 2) for i in range(10)]
    _, not_done = cf.wait(fs, timeout=30)
    assert not not_done
    assert sorted(f.result() for f in cf.as_completed(fs)) == [i * i for i in range(10)]

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        a = await loop.run_in_executor(executor, pow, 3, 3)
        b = await asyncio.wrap_future(executor.submit(pow, 2, 2))
        c = await executor.submit(pow, 5, 2)  # awaited directly
        return [a, b, c]

    assert asyncio.run(main()) == [27, 4, 25]


def test_unpicklable_argument_fails_its_future(executor: DistributedExecutor) -> None:
    import pickle
    import threading

    fut = executor.submit(helpers.identity, threading.Lock())
    with pytest.raises(pickle.PicklingError):
        fut.result(timeout=30)
    assert executor.submit(abs, -1).result(timeout=30) == 1


def test_worker_death_fails_only_its_future(executor: DistributedExecutor) -> None:
    slow = [executor.submit(helpers.sleep_and_return, 0.5) for _ in range(2)]
    dead = executor.submit(helpers.die, 7)
    with pytest.raises(dx.WorkerLostError) as info:
        dead.result(timeout=30)
    assert isinstance(info.value, BrokenProcessPool)
    assert "exited with code 7" in str(info.value)
    # The others either finished or, if they shared the dead worker, failed the same way.
    survived = 0
    for f in slow:
        try:
            assert f.result(timeout=30) == 0.5
            survived += 1
        except dx.WorkerLostError:
            pass
    assert survived >= 1
    helpers.wait_until(lambda: executor.statistics().live_workers == 2, timeout=30, what="spare")
    assert executor.submit(abs, -3).result(timeout=30) == 3
    assert executor.statistics().replaced_workers >= 1


def test_break_on_worker_death_breaks_the_pool(no_leaked_workers: None) -> None:
    with DistributedExecutor(2, break_on_worker_death=True) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        with pytest.raises(BrokenProcessPool):
            ex.submit(helpers.die, 1).result(timeout=30)
        helpers.wait_until(lambda: bool(ex._broken), what="broken")
        with pytest.raises(BrokenProcessPool):
            ex.submit(abs, 1)


def test_shutdown_semantics(no_leaked_workers: None) -> None:
    ex = DistributedExecutor(1)
    running = ex.submit(helpers.sleep_and_return, 0.3)
    helpers.wait_until(running.running, timeout=30, what="the first call to start")
    queued = [ex.submit(helpers.sleep_and_return, 0.3) for _ in range(6)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 0.3
    assert any(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(abs, 1)
    ex.shutdown()  # idempotent


def test_shutdown_without_wait_finishes_the_work(no_leaked_workers: None) -> None:
    ex = DistributedExecutor(1)
    fs = [ex.submit(helpers.sleep_and_return, 0.05) for _ in range(3)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30) for f in fs] == [0.05] * 3


def test_initializer_runs_on_every_worker(tmp_path: object, no_leaked_workers: None) -> None:
    def init(tag: str) -> None:
        import builtins

        builtins._dx_tag = tag  # type: ignore[attr-defined]

    def tag() -> str:
        import builtins

        return builtins._dx_tag  # type: ignore[attr-defined,no-any-return]

    with DistributedExecutor(2, initializer=init, initargs=("ready",)) as ex:
        assert set(ex.map(lambda _: tag(), range(20))) == {"ready"}
        ex.submit(helpers.die, 1).exception(timeout=30)  # the replacement is initialized too
        helpers.wait_until(lambda: ex.statistics().replaced_workers == 1, what="replacement")
        assert set(ex.map(lambda _: tag(), range(20))) == {"ready"}


def test_failing_initializer_breaks_the_executor(no_leaked_workers: None) -> None:
    def bad() -> None:
        raise RuntimeError("no init")

    with DistributedExecutor(1, initializer=bad) as ex:
        fut = ex.submit(abs, 1)
        with pytest.raises(BrokenProcessPool):
            fut.result(timeout=30)
        with pytest.raises(BrokenProcessPool):
            ex.submit(abs, 1)


def test_max_tasks_per_child_recycles_workers(no_leaked_workers: None) -> None:
    with DistributedExecutor(1, max_tasks_per_child=3) as ex:
        pids = [ex.submit(os.getpid).result(timeout=30) for _ in range(9)]
    assert len(set(pids)) == 3
    assert pids[:3] == [pids[0]] * 3


def test_retry_delays_rerun_on_another_worker(no_leaked_workers: None) -> None:
    helpers.reset_attempts()
    with DistributedExecutor(2, retry_delays=[0, 0]) as ex:
        f = ex.submit(helpers.square_failing_once, 4, frozenset({4}))
        assert f.result(timeout=30) == 16
        assert ex.statistics().retried == 1


def test_pool_of_existing_workers_is_left_running(cluster: list[int]) -> None:
    with DistributedExecutor(pool=dx.WorkerPool(cluster)) as ex:
        assert set(ex.map(lambda _: dx.myid(), range(20))) <= set(cluster)
    assert set(cluster) <= set(dx.workers())
    assert dx.remotecall_fetch(dx.myid, cluster[0]) == cluster[0]


def test_a_pool_whose_workers_all_died_fails_what_waits(no_leaked_workers: None) -> None:
    """Workers of a given pool are not replaced: once the last is gone, the calls still
    queued (some already counted as running, as ProcessPoolExecutor's call queue does) fail
    at once, and shutdown returns, instead of waiting for a worker that will never come."""
    (w,) = dx.addprocs(1)
    ex = DistributedExecutor(pool=[w])
    try:
        first = ex.submit(helpers.sleep_and_return, 30)
        helpers.wait_until(first.running, timeout=30, what="the first call to start")
        queued = [ex.submit(abs, -i) for i in range(6)]
        dx.remote_do(helpers.die, w, 9)
        with pytest.raises(BrokenProcessPool):
            first.result(timeout=30)
        # The next call was sent ahead to the worker, and is lost with it; the others never
        # left the executor.
        with pytest.raises(BrokenProcessPool):
            queued[0].result(timeout=30)
        for fut in queued[1:]:
            with pytest.raises(BrokenProcessPool, match="every worker of the executor's pool"):
                fut.result(timeout=30)
        with pytest.raises(BrokenProcessPool, match="every worker"):
            ex.submit(abs, 1)
    finally:
        ex.shutdown(wait=True)
        if w in dx.workers():
            dx.rmprocs(w)


def test_executor_workers_stay_out_of_the_default_pool(no_leaked_workers: None) -> None:
    with DistributedExecutor(2) as ex:
        ex.submit(abs, 1).result(timeout=30)
        assert not set(ex.workers()) & set(dx.default_worker_pool().workers())


def test_statistics(executor: DistributedExecutor) -> None:
    executor.submit(abs, 1).result(timeout=30)
    s = executor.statistics()
    assert s.live_workers == 2 and s.running == 0 and s.pending == 0
    assert s.completed >= 1


# --- ProcessPoolExecutor's private names, with their meaning (CPython's own tests read them) --


def test_processes_are_the_owned_workers_by_os_pid(no_leaked_workers: None) -> None:
    with DistributedExecutor(2, max_tasks_per_child=2) as ex:
        processes = ex._processes  # the same dict for the executor's whole life
        assert processes == {} and ex._executor_manager_thread is None
        first = ex.submit(os.getpid).result(timeout=30)
        assert first in processes and len(processes) == 2
        assert all(p.is_alive() and p.exitcode is None for p in processes.values())
        for _ in range(4):  # both workers reach max_tasks_per_child: each is replaced
            ex.submit(os.getpid).result(timeout=30)
        helpers.wait_until(lambda: first not in processes, timeout=30, what="the retirement")
        helpers.wait_until(lambda: len(processes) == 2, timeout=30, what="the replacements")
        held = list(processes.values())
    for p in held:
        p.join(timeout=30)
        assert not p.is_alive() and p.exitcode is not None


def test_terminating_a_process_is_a_worker_death(no_leaked_workers: None) -> None:
    with DistributedExecutor(1) as ex:
        slow = ex.submit(time.sleep, 30)
        helpers.wait_until(lambda: len(ex._processes) == 1, timeout=30, what="the worker")
        [proc] = ex._processes.values()
        # running() is not enough: a call counts as running before it is sent (PPE's call
        # queue), and one that never reached the dead worker just runs on its replacement.
        helpers.wait_until(lambda: ex.statistics().running == 1, timeout=30, what="the send")
        proc.terminate()
        with pytest.raises(BrokenProcessPool):
            slow.result(timeout=30)
        assert ex.submit(abs, -2).result(timeout=30) == 2  # replaced: the pool goes on
        assert proc.pid not in ex._processes


def test_a_worker_killed_while_it_starts_is_replaced_and_its_call_runs(
    no_leaked_workers: None,
) -> None:
    # The initializer holds the worker in its start-up (before it takes calls) long enough
    # to kill it there: the executor used to lose track of it and hang.
    with DistributedExecutor(1, initializer=time.sleep, initargs=(1.0,)) as ex:
        fut = ex.submit(abs, -3)
        helpers.wait_until(lambda: len(ex._processes) == 1, timeout=30, what="the worker")
        [proc] = ex._processes.values()
        proc.kill()
        assert fut.result(timeout=60) == 3
        assert proc.pid not in ex._processes
        assert ex.statistics().replaced_workers == 1


def test_a_dropped_executor_finishes_its_work_then_stops(no_leaked_workers: None) -> None:
    import gc

    ex = DistributedExecutor(2)
    results = ex.map(abs, range(-5, 5))
    manager, processes, calls = ex._executor_manager_thread, ex._processes, ex._call_queue
    assert manager is not None
    del ex
    gc.collect()
    manager.join(timeout=30)
    assert not manager.is_alive()
    for p in processes.values():
        p.join(timeout=30)
        assert not p.is_alive()
    calls.join_thread()
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]


def test_mp_context_is_what_the_workers_are() -> None:
    import multiprocessing

    assert DistributedExecutor(1)._mp_context.get_start_method() == "spawn"
    forkserver = multiprocessing.get_context("forkserver")
    assert DistributedExecutor(1, mp_context=forkserver)._mp_context is forkserver


def test_with_spawn_workers_start_one_per_submit_that_finds_none_idle(
    no_leaked_workers: None,
) -> None:
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    with DistributedExecutor(3, mp_context=spawn) as ex:
        assert [ex.submit(abs, -i).result(timeout=30) for i in range(4)] == [0, 1, 2, 3]
        assert len(ex._processes) == 1  # each call found the first worker idle again
        slow = [ex.submit(time.sleep, 0.5) for _ in range(4)]  # none idle: up to 3
        helpers.wait_until(lambda: len(ex._processes) == 3, timeout=30, what="3 workers")
        cf.wait(slow, timeout=30)
        assert len(ex._processes) == 3
    with DistributedExecutor(3, mp_context=multiprocessing.get_context("fork")) as ex:
        ex.submit(abs, 1).result(timeout=30)
        helpers.wait_until(lambda: len(ex._processes) == 3, timeout=30, what="all up front")


def test_multiprocessing_manager_proxies_reach_the_workers(no_leaked_workers: None) -> None:
    import multiprocessing

    with multiprocessing.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        with DistributedExecutor(1) as ex:
            ex.submit(shared.__setitem__, "k", 7).result(timeout=30)
        assert shared["k"] == 7


def test_executor_futures_make_their_lock_on_first_use() -> None:
    """A queued ExecutorFuture holds no Condition or lists until first used (fewer objects
    for the garbage collector while a long map waits); threads that first touch one at once
    must still share a single Condition, and the standard helpers must work on it."""
    import threading

    from distexec.executor import ExecutorFuture

    # ExecutorFuture.__init__ replaces cf.Future's: a Python that adds an attribute there
    # must fail here, not in a user's program.
    lazy = {"_condition", "_waiters", "_done_callbacks"}
    assert set(vars(cf.Future())) == set(vars(ExecutorFuture())) | lazy
    for _ in range(50):
        fut = ExecutorFuture()
        assert "_condition" not in fut.__dict__
        seen: list[object] = []
        barrier = threading.Barrier(8)

        def touch(f: ExecutorFuture, b: threading.Barrier, out: list[object]) -> None:
            b.wait()
            out.append(f._condition)

        threads = [threading.Thread(target=touch, args=(fut, barrier, seen)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(c) for c in seen}) == 1
    fut = ExecutorFuture()
    done_calls: list[object] = []
    fut.add_done_callback(done_calls.append)
    assert fut.set_running_or_notify_cancel()
    threading.Timer(0.05, fut.set_result, (7,)).start()
    done, _ = cf.wait([fut], timeout=10)
    assert done == {fut} and fut.result() == 7 and done_calls == [fut]
    assert [f.result() for f in cf.as_completed([fut], timeout=10)] == [7]


def _run_in_turn(i: int) -> tuple[int, int]:
    """Record how many executor calls run at once on this worker, and in which order."""
    import builtins

    state = builtins.__dict__.setdefault("_dx_turn_state", {"running": 0, "order": []})
    state["running"] += 1
    overlap = state["running"]
    time.sleep(0.002)  # long enough for the next call, sent ahead, to be waiting
    state["order"].append(i)
    state["running"] -= 1
    return overlap, len(state["order"])


def test_a_worker_runs_the_executors_calls_one_at_a_time_in_order(cluster: list[int]) -> None:
    """Calls are sent ahead to hide the round trip (CallMode.ORDERED); the worker must still
    run them one after another, in the order they were submitted, as a
    ProcessPoolExecutor process does."""
    (w,) = cluster[:1]
    with DistributedExecutor(pool=[w]) as ex:
        results = [f.result(timeout=60) for f in [ex.submit(_run_in_turn, i) for i in range(40)]]
    assert [overlap for overlap, _ in results] == [1] * 40
    assert [position for _, position in results] == sorted(position for _, position in results)
    order = dx.remotecall_fetch(_turn_order, w)
    assert order[-40:] == list(range(40))


def _turn_order() -> list[int]:
    import builtins

    return list(builtins._dx_turn_state["order"])  # type: ignore[attr-defined]


class _Callable:
    def __call__(self, x: int) -> int:
        return x

    def method(self, x: int) -> int:
        return x


def _plain(x: int) -> int:
    return x


def test_calls_are_timed_by_their_function() -> None:
    """What a call's duration is remembered by (``_kind_of``): the function's code, through
    partials, bound methods and ``map``'s batches; the type of other callables."""
    import functools

    from distexec import executor as executor_mod
    from distexec.pmap import _run_batch

    kind = executor_mod._kind_of
    obj = _Callable()
    assert kind(_plain, ()) is _plain.__code__
    assert kind(functools.partial(functools.partial(_plain), 1), ()) is _plain.__code__
    assert kind(obj.method, ()) is _Callable.method.__code__
    assert kind(_run_batch, (_plain, [1, 2], False)) is _plain.__code__
    assert kind(obj, ()) is _Callable
    assert kind(abs, ()) is type(abs)
    lambdas = [lambda x, k=k: x + k for k in range(3)]  # made in a loop: one kind
    assert len({kind(f, ()) for f in lambdas}) == 1


def test_more_calls_go_ahead_only_while_calls_are_short() -> None:
    """Short calls get more of them in flight per worker (a round trip costs more than the
    call). Each function is measured on its own: long calls submitted right after many
    short ones go out one ahead per worker, so a worker that finishes last is never late by
    more than a few short calls, and a worker lost takes at most two calls with it."""
    from distexec import executor as executor_mod

    short = executor_mod._kind_of(abs, ())
    with DistributedExecutor(max_workers=2) as ex:
        assert short not in ex._short  # nothing measured yet
        results = ex.map(abs, range(-20000, 0))
        helpers.wait_until(lambda: short in ex._short, timeout=30, what="more calls in flight")
        assert list(results) == list(range(20000, 0, -1))
        # Long calls right after: not sent four at a time on the short calls' account.
        futures = [ex.submit(helpers.sleep_and_return, 0.2) for _ in range(8)]
        assert max(ex._slots.values()) <= executor_mod._DEPTH
        assert [f.result(timeout=30) for f in futures] == [0.2] * 8
        assert list(ex.map(helpers.sleep_and_return, [0.02] * 12)) == [0.02] * 12
        long = executor_mod._kind_of(helpers.sleep_and_return, ())
        assert ex._call_times[long] >= executor_mod._SHORT_CALL
        assert long not in ex._short and short in ex._short
        # Never more in flight on one worker than the depth allows.
        futures = [ex.submit(helpers.sleep_and_return, 0.2) for _ in range(8)]
        assert max(ex._slots.values()) <= executor_mod._DEPTH
        assert [f.result(timeout=30) for f in futures] == [0.2] * 8


def test_shutdown_returns_when_the_last_call_is_done() -> None:
    """``shutdown(wait=True)`` with calls still running returns once they finish and the
    workers stop, not at the manager thread's next periodic look, a second later (it was
    not told that the last call had finished)."""
    ex = DistributedExecutor(max_workers=2)
    fs = [ex.submit(time.sleep, 0.05) for _ in range(4)]
    helpers.wait_until(lambda: any(f.running() for f in fs), what="calls running")
    started = time.monotonic()
    ex.shutdown(wait=True)
    took = time.monotonic() - started
    assert all(f.done() and f.exception() is None for f in fs)
    assert took < 0.75, f"shutdown took {took:.2f} s for about 0.1 s of calls left"
