"""DistributedExecutor: a ``concurrent.futures.Executor`` on distexec workers.

Layer: L9. Imports: L0-L8.

A drop-in for ``ProcessPoolExecutor``: the same signature, checks and messages, and
futures that work with ``wait``, ``as_completed``, ``asyncio.wrap_future`` and
``loop.run_in_executor`` (and can be awaited). What it adds:

* a worker that dies fails only the futures it was running (``WorkerLostError``, a
  ``BrokenProcessPool``); the executor starts a replacement and goes on
  (``break_on_worker_death=True`` restores CPython's whole-pool breakage);
* ``retry_delays``/``retry_check`` re-run a failed call on another worker;
* ``pool=`` runs on workers that already exist (``addprocs``, SSH hosts) and leaves them be;
* lambdas and closures can be submitted (cloudpickle).

``mp_context`` is accepted and ignored: workers are always fresh interpreters started by
distexec (like the ``spawn`` start method), whatever the context says.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import heapq
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import _base
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from . import _api, _cluster
from ._ids import WorkerId
from ._remotecall import remotecall_fetch
from .errors import (
    ProcessExitedException,
    RemoteException,
    RemoteTraceback,
    UnpicklableRemoteError,
    WorkerDiedError,
    WorkerLostError,
)
from .pmap import _run_batch
from .retry import validate_delays
from .workerpool import AbstractWorkerPool

#: Calls sent ahead per worker, so a worker never waits for its next task.
_DEPTH = 2

_global_shutdown = False


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True
    for ex in list(_live_executors):
        ex._at_interpreter_exit()


_live_executors: weakref.WeakSet[DistributedExecutor] = weakref.WeakSet()
threading._register_atexit(_python_exit)  # type: ignore[attr-defined]  # as CPython's executors do


class ExecutorFuture(cf.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` that can also be awaited directly."""

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self).__await__()


@dataclass(frozen=True, slots=True)
class ExecutorStatistics:
    """What an executor is doing now (``DistributedExecutor.statistics()``)."""

    live_workers: int
    pending: int
    running: int
    completed: int
    failed: int
    retried: int
    replaced_workers: int
    owned_refs: int
    client_refs: int
    workers: int


class _Item:
    """One submitted call: its future, its pickled message, and where it runs."""

    __slots__ = ("args", "cid", "exe", "fn", "future", "kwargs", "parts", "pid", "retry", "started")

    def __init__(
        self,
        exe: DistributedExecutor,
        future: cf.Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.exe = exe
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.cid = 0
        self.parts: list[bytes | memoryview] | None = None
        self.pid: WorkerId = 0
        self.retry: tuple[Iterator[float], Any] | None = None  # delays left, check state
        self.started = False  # RUNNING already (a retry): dispatch leaves its state alone

    def set(self, ok: bool, value: object) -> None:  # Sink: runs on a reader thread
        self.exe._completed(self, ok, value)


class DistributedExecutor(cf.Executor):
    """Run calls on distexec workers through the ``concurrent.futures`` interface.

    Args:
        max_workers: local workers to start (default: one per usable CPU). Ignored with *pool*.
        mp_context: accepted for compatibility and ignored (workers are always fresh
            interpreters; there is nothing to fork).
        initializer, initargs: run once on each worker before its first task (replacements too).
        max_tasks_per_child: recycle a worker after this many tasks; its replacement is
            started first, so the queue never stalls.
        pool: run on these existing workers (a pool or a list of pids) and leave them running.
        retry_delays, retry_check: retry failed calls (see :func:`distexec.retry.retry`).
        task_timeout: reserved for per-call deadlines (not enforced yet).
        break_on_worker_death: a worker's death breaks the whole executor, as CPython's does.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        *,
        pool: AbstractWorkerPool | Iterable[WorkerId] | None = None,
        retry_delays: Iterable[float] = (),
        retry_check: Callable[[Any, BaseException], Any] | None = None,
        task_timeout: float | None = None,
        break_on_worker_death: bool = False,
    ) -> None:
        if max_workers is None:
            from loky import cpu_count

            max_workers = max(1, int(cpu_count()))
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._retry_delays = validate_delays(retry_delays)
        self._retry_check = retry_check
        self._task_timeout = task_timeout
        self._break_on_death = break_on_worker_death
        self._g = _cluster.group()

        self._lock = threading.RLock()  # guards: everything below
        self._queue: collections.deque[_Item] = collections.deque()
        self._running: dict[int, _Item] = {}  # cid -> item
        self._slots: dict[WorkerId, int] = {}  # worker -> calls in flight (dispatchable workers)
        self._tasks_done: dict[WorkerId, int] = {}
        self._retiring: set[WorkerId] = set()
        self._owned: set[WorkerId] = set()
        self._retry_heap: list[tuple[float, int, _Item]] = []
        self._retry_seq = itertools.count()
        self._shutdown = False
        self._broken: str | bool = False
        self._started = False
        self._events = threading.Condition(self._lock)
        self._manager: threading.Thread | None = None
        self._want_workers = 0
        self._counts = collections.Counter[str]()
        self._idle = threading.Condition(self._lock)

        if pool is not None:
            pids = pool.workers() if isinstance(pool, AbstractWorkerPool) else list(pool)
            if not pids:
                raise ValueError("pool has no workers")
            self._given = pids
            self._max_workers = len(pids)
        else:
            self._given = None
        _live_executors.add(self)
        self._g.on_peer_lost.append(self._peer_lost_hook)

    # ------------------------------------------------------------------ public API

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return a future for its result."""
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _global_shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        future: cf.Future[Any] = ExecutorFuture()
        item = _Item(self, future, fn, args, kwargs)
        try:
            item.cid, item.parts = self._g.prepare_call(fn, args, kwargs)
        except BaseException as exc:
            future.set_exception(exc)
            return future
        with self._lock:
            if self._shutdown:  # shutdown raced with us
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._counts["submitted"] += 1
            self._queue.append(item)
            if not self._started:
                self._start()
            self._dispatch_locked()
        return future

    submit.__doc__ = cf.Executor.submit.__doc__

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        on_error: Callable[[BaseException], Any] | None = None,
    ) -> Iterator[Any]:
        """Like ``Executor.map``: results in order, lazily; ``chunksize`` elements per message.

        ``buffersize`` (as in Python 3.14) bounds how many chunks are submitted ahead of the
        consumer, so an endless input is fine. ``on_error`` replaces a failed element's
        value with ``on_error(exc)`` instead of raising it.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        star = len(iterables) != 1
        # zip stops at the shortest input, as Executor.map does
        source: Iterator[Any] = zip(*iterables, strict=False) if star else iter(iterables[0])
        if chunksize == 1:
            chunks: Iterator[list[Any]] = ([x] for x in source)
        else:
            chunks = iter(lambda: list(itertools.islice(source, chunksize)), [])

        def submit_chunk(chunk: list[Any]) -> cf.Future[Any]:
            if chunksize == 1:
                return self.submit(fn, *chunk[0]) if star else self.submit(fn, chunk[0])
            return self.submit(_run_batch, fn, chunk, star)

        if buffersize is None:
            fs = collections.deque(submit_chunk(c) for c in chunks)
            pending: Iterator[list[Any]] = iter(())
        else:
            fs = collections.deque(submit_chunk(c) for c in itertools.islice(chunks, buffersize))
            pending = chunks

        def results() -> Iterator[Any]:
            try:
                while fs:
                    fut = fs.popleft()
                    for nxt in itertools.islice(pending, 1):
                        fs.append(submit_chunk(nxt))
                    remaining = None if end_time is None else end_time - time.monotonic()
                    if chunksize == 1:
                        try:
                            yield _result(fut, remaining)
                        except BaseException as exc:
                            if on_error is None or isinstance(exc, cf.TimeoutError):
                                raise
                            yield on_error(exc)
                        continue
                    values, errors = _result(fut, remaining)
                    for i, v in enumerate(values):
                        if errors is not None and i in errors:
                            exc = _translate(errors[i])
                            if on_error is None:
                                raise exc
                            yield on_error(exc)
                        else:
                            yield v
            finally:
                for f in fs:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what has not started; stop owned workers."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    item = self._queue.popleft()
                    item.future.cancel()
                for _, _, item in self._retry_heap:
                    item.future.cancel()
                self._retry_heap.clear()
            self._events.notify_all()
            manager = self._manager
        if wait:
            if manager is not None and manager is not threading.current_thread():
                manager.join()
            elif manager is None:
                self._stop_workers()

    shutdown.__doc__ = cf.Executor.shutdown.__doc__

    def statistics(self) -> ExecutorStatistics:
        """Workers, queued and running calls, and the process-wide ref counts."""
        s = self._g.statistics()
        with self._lock:
            return ExecutorStatistics(
                live_workers=len(self._slots),
                pending=len(self._queue) + len(self._retry_heap),
                running=len(self._running),
                completed=self._counts["completed"],
                failed=self._counts["failed"],
                retried=self._counts["retried"],
                replaced_workers=self._counts["replaced"],
                owned_refs=s.owned_refs,
                client_refs=s.client_refs,
                workers=s.workers,
            )

    def workers(self) -> list[WorkerId]:
        """The pids this executor runs calls on."""
        with self._lock:
            return sorted(self._slots)

    def __repr__(self) -> str:
        with self._lock:
            state = "broken" if self._broken else "shutdown" if self._shutdown else "running"
            return (
                f"<DistributedExecutor {state} workers={sorted(self._slots)} "
                f"pending={len(self._queue)} running={len(self._running)}>"
            )

    # ------------------------------------------------------------------ dispatching

    def _start(self) -> None:
        self._started = True
        if self._given is not None:
            for pid in self._given:
                self._slots[pid] = 0
        else:
            self._want_workers = self._max_workers
        self._manager = threading.Thread(target=self._manage, name="distexec-executor", daemon=True)
        self._manager.start()

    def _dispatch_locked(self) -> None:
        """Send queued calls, each to the least busy worker with a free slot."""
        queue, slots = self._queue, self._slots
        while queue and not self._broken:
            pid, n = -1, _DEPTH
            for p, k in slots.items():
                if k < n and p not in self._retiring:
                    pid, n = p, k
                    if k == 0:
                        break
            if pid < 0:
                return
            item = queue.popleft()
            if not item.started:
                if not item.future.set_running_or_notify_cancel():
                    continue
                item.started = True
            slots[pid] = n + 1
            item.pid = pid
            self._running[item.cid] = item
            assert item.parts is not None
            self._g.send_call(pid, item.cid, item.parts, item)

    def _completed(self, item: _Item, ok: bool, value: object) -> None:
        with self._lock:
            self._running.pop(item.cid, None)
            pid = item.pid
            if pid in self._slots:
                self._slots[pid] -= 1
            done = self._tasks_done[pid] = self._tasks_done.get(pid, 0) + 1
            if (
                self._max_tasks is not None
                and done >= self._max_tasks
                and pid in self._owned
                and pid not in self._retiring
            ):
                self._retiring.add(pid)
                self._want_workers += 1
                self._events.notify_all()
            if not ok and self._should_retry(item, value):  # type: ignore[arg-type]
                self._dispatch_locked()
                return
            if ok:
                self._counts["completed"] += 1
            else:
                self._counts["failed"] += 1
            self._dispatch_locked()
            if pid in self._retiring and self._slots.get(pid) == 0:
                self._events.notify_all()
            if not self._running and not self._queue:
                self._idle.notify_all()
        if ok:
            item.future.set_result(value)
        else:
            item.future.set_exception(_translate(value))  # type: ignore[arg-type]
        item.parts = None

    def _should_retry(self, item: _Item, exc: BaseException) -> bool:
        if self._shutdown and isinstance(exc, ProcessExitedException):
            return False
        delays, check_state = item.retry or (iter(self._retry_delays), None)
        delay = next(delays, None)
        if delay is None:
            return False
        if self._retry_check is not None:
            try:
                verdict = self._retry_check(check_state, _translate(exc))
            except Exception:
                return False
            if isinstance(verdict, tuple) and len(verdict) == 2:
                check_state, verdict = verdict
            if not verdict:
                return False
        item.retry = (delays, check_state)
        self._counts["retried"] += 1
        heapq.heappush(self._retry_heap, (time.monotonic() + delay, next(self._retry_seq), item))
        self._events.notify_all()
        return True

    # ------------------------------------------------------------------ the manager thread

    def _manage(self) -> None:
        """Start and replace workers, release retries, and wind down at shutdown."""
        try:
            while True:
                with self._lock:
                    now = time.monotonic()
                    while self._retry_heap and self._retry_heap[0][0] <= now:
                        _, _, item = heapq.heappop(self._retry_heap)
                        self._requeue(item)
                    self._dispatch_locked()
                    self._reap_retired_locked()
                    want = self._want_workers
                    if (
                        self._shutdown
                        and not self._queue
                        and not self._running
                        and (not self._retry_heap)
                    ):
                        break
                    if self._broken:
                        self._fail_all_locked()
                        if self._shutdown:
                            break
                    if want <= 0:
                        wait = None
                        if self._retry_heap:
                            wait = max(0.0, self._retry_heap[0][0] - time.monotonic())
                        self._events.wait(wait if wait is not None else 1.0)
                        continue
                    self._want_workers = 0
                if not self._broken:
                    self._add_workers(want)
        finally:
            self._stop_workers()

    def _requeue(self, item: _Item) -> None:
        """A retry goes out as a new call (new id); its future stays RUNNING."""
        item.cid, item.parts = self._g.prepare_call(item.fn, item.args, item.kwargs)
        self._queue.appendleft(item)

    def _add_workers(self, n: int) -> None:
        try:
            pids = _api.add_private_workers(n)
        except BaseException as exc:
            with self._lock:
                self._broken = f"could not start workers: {exc}"
                self._events.notify_all()
            return
        for pid in pids:
            if self._initializer is not None:
                try:
                    remotecall_fetch(self._initializer, pid, *self._initargs)
                except BaseException as exc:
                    _base.LOGGER.critical("Exception in initializer:", exc_info=exc)
                    with self._lock:
                        self._owned.add(pid)
                        self._broken = (
                            "A child process terminated abruptly, the process pool is not "
                            "usable anymore (its initializer failed)"
                        )
                        self._events.notify_all()
                    return
        with self._lock:
            for pid in pids:
                self._owned.add(pid)
                self._slots[pid] = 0
            self._dispatch_locked()

    def _reap_retired_locked(self) -> None:
        done = [p for p in self._retiring if self._slots.get(p, 0) == 0]
        for pid in done:
            self._retiring.discard(pid)
            self._slots.pop(pid, None)
            self._owned.discard(pid)
            threading.Thread(target=_quiet_rmprocs, args=(pid,), daemon=True).start()

    def _fail_all_locked(self) -> None:
        err = BrokenProcessPool(self._broken)
        items = list(self._queue) + [i for _, _, i in self._retry_heap]
        self._queue.clear()
        self._retry_heap.clear()
        for item in items:
            if item.started or item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_exception(err)
                except cf.InvalidStateError:
                    pass

    def _peer_lost_hook(self, pid: WorkerId) -> None:
        with self._lock:
            if pid not in self._slots:
                return
            del self._slots[pid]
            self._retiring.discard(pid)
            if pid in self._owned:
                self._owned.discard(pid)
                if self._break_on_death:
                    self._broken = (
                        "A process in the process pool was terminated abruptly while the "
                        "future was running or pending."
                    )
                elif not self._shutdown:
                    self._want_workers += 1
                    self._counts["replaced"] += 1
            self._events.notify_all()

    def _stop_workers(self) -> None:
        with self._lock:
            owned = sorted(self._owned)
            self._owned.clear()
            for pid in owned:
                self._slots.pop(pid, None)
        if owned:
            _quiet_rmprocs(*owned)
        try:
            self._g.on_peer_lost.remove(self._peer_lost_hook)
        except ValueError:
            pass

    def _at_interpreter_exit(self) -> None:
        with self._lock:
            self._shutdown = True
            self._events.notify_all()


def _quiet_rmprocs(*pids: WorkerId) -> None:
    try:
        _api.rmprocs(*pids)
    except Exception:
        pass


def _result(fut: cf.Future[Any], timeout: float | None) -> Any:
    return fut.result(timeout)


def _translate(exc: BaseException) -> BaseException:
    """The exception an executor's future raises for a failure (CPython's convention)."""
    if isinstance(exc, RemoteException):
        original = exc.captured.ex
        if not isinstance(original, UnpicklableRemoteError):
            original.__cause__ = RemoteTraceback(f'\n"""\n{exc.captured.tb_text}"""')
        return original
    if isinstance(exc, ProcessExitedException) and not isinstance(exc, WorkerLostError):
        return WorkerDiedError(
            f"{exc} (the call it was running failed; the executor goes on with the others)",
            pid=exc.pid,
        )
    return exc


def _cpu_count() -> int:
    return os.cpu_count() or 1
