"""DistributedExecutor: a ``concurrent.futures.Executor`` on distexec workers.

Layer: L9. Imports: L0-L8.

A drop-in for ``ProcessPoolExecutor``: the same signature, checks and messages, and
futures that work with ``wait``, ``as_completed``, ``asyncio.wrap_future`` and
``loop.run_in_executor`` (and can be awaited). What it adds:

* a worker that dies fails only the futures it was running (``WorkerLostError``, a
  ``BrokenProcessPool``); the executor starts a replacement and goes on
  (``break_on_worker_death=True`` restores CPython's whole-pool breakage);
* ``retry_delays``/``retry_check`` re-run a failed call on another worker;
* ``task_timeout`` fails a call that runs too long with ``TaskTimeoutError`` and kills and
  replaces its worker (a thread cannot be stopped; a process can);
* ``cancel()`` stops a running call too: it is interrupted, and its worker is killed and
  replaced if it is still running ``cancel_grace`` seconds later (see ``ExecutorFuture``);
* other calls that were running on a worker the executor killed (for a timeout or a
  cancel) are not failed: they run again elsewhere, like calls that had not been sent;
* ``pool=`` runs on workers that already exist (``addprocs``, SSH hosts) and leaves them be;
* lambdas and closures can be submitted (cloudpickle).

Workers are always fresh interpreters started by distexec (like the ``spawn`` start method),
whatever ``mp_context`` says; its start method only sets when they start, as it does for
``ProcessPoolExecutor``: all at the first submit with ``fork``, else one per submit that finds
no worker idle.

Code (and CPython's own tests) that reads ``ProcessPoolExecutor``'s private state finds the
same names here, with the same meaning: ``_processes`` ({OS pid: process handle} of the
workers the executor owns, the same dict for the executor's whole life), ``_max_workers``,
``_mp_context`` (the context given, else ``spawn``: what the workers are),
``_executor_manager_thread`` (a real thread, which ends once the executor is shut down or
garbage collected), ``_call_queue`` (the calls not yet sent; ``join_thread()`` waits until
everything has been sent) and ``_broken`` (``False``, or why the executor is broken).
As with ``ProcessPoolExecutor``, an executor that is dropped without ``shutdown()`` finishes
what was submitted, then stops its workers.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import heapq
import itertools
import multiprocessing
import os
import socket
import subprocess
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import _base
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

from . import _api, _cluster, _config, _timeouts
from ._cluster import ExitReason
from ._ids import WorkerId
from ._remotecall import remotecall_fetch
from ._transport.framing import FLAG_WAIT, flagged
from .errors import (
    ProcessExitedException,
    RemoteException,
    UnpicklableRemoteError,
    WorkerDiedError,
    WorkerLostError,
)
from .pmap import _run_batch
from .retry import validate_delays
from .workerpool import AbstractWorkerPool

_SPIN = _config.SPIN_SECONDS

#: Calls in flight per worker, so a worker never waits for its next task ...
_DEPTH = 2
#: ... and for a function whose calls take less than _SHORT_CALL seconds each (measured):
#: one call's round trip then costs more than the call, and more in flight keep the worker
#: busy. A worker that finishes last is then late by at most (_DEEP - 1) short calls. Each
#: function is measured on its own, so long calls submitted after many short ones are not
#: sent four at a time (a worker lost then takes four with it, and the others go idle while
#: it works through them).
_DEEP = 4
_SHORT_CALL = 0.0005
#: A sample is capped at this (one pause must not count as long calls) and a function not
#: measured yet starts there: about ten short calls make it short.
_LONG_CALL = 4 * _SHORT_CALL
#: How many functions' durations are remembered (the oldest are forgotten).
_KINDS = 256
#: A future's states that mean cancelled (read without its lock: the hot path takes none,
#: and a cancel racing with it is caught where the future is settled).
_CANCELLED = (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED)

_global_shutdown = False


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True
    for ex in list(_live_executors):
        ex._at_interpreter_exit()


_live_executors: weakref.WeakSet[DistributedExecutor] = weakref.WeakSet()
threading._register_atexit(_python_exit)  # type: ignore[attr-defined]  # as CPython's executors do


class _OnFirstUse:
    """A future's attribute made when first read (a non-data descriptor: from then on the
    instance's own attribute shadows it). ``dict.setdefault`` is atomic, so two threads
    reading it first at once still share one object."""

    __slots__ = ("make", "name")

    def __init__(self, name: str, make: Callable[[], object]) -> None:
        self.name = name
        self.make = make

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.setdefault(self.name, self.make())


class ExecutorFuture(cf.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` that can also be awaited directly.

    ``cancel()`` works on a running call too, where ``ProcessPoolExecutor``'s returns
    ``False``: the future is cancelled at once (``cancel()`` returns ``True``, ``result()``
    raises ``CancelledError``, ``wait`` and ``as_completed`` count it done), the call gets a
    ``KeyboardInterrupt`` on its worker, and if it is still running ``cancel_grace`` seconds
    later (a C call that never returns to Python) the worker is killed and replaced. The
    interrupt reaches every call running on that worker at that moment; the executor runs the
    others again elsewhere, so they are not lost (they may run twice).
    """

    _dx_item: _Item | None = None  # the call behind this future, while the executor has it

    # cf.Future makes these in __init__; here a future makes them when first used. A map
    # over many elements holds many queued futures, and each of these would be up to eight
    # more objects for every garbage collection to go through while they wait (measured:
    # 13 tracked objects per queued call, collections taking a third of map's time).
    _condition = _OnFirstUse("_condition", threading.Condition)
    _waiters = _OnFirstUse("_waiters", list)
    _done_callbacks = _OnFirstUse("_done_callbacks", list)

    def __init__(self) -> None:  # cf.Future.__init__ but for the attributes above
        self._state = _base.PENDING
        self._result = None
        self._exception = None

    def cancel(self) -> bool:
        item = self._dx_item
        if item is None:
            return super().cancel()
        for _ in range(2):  # a PENDING future may start between the two looks
            with self._condition:
                running = self._state == _base.RUNNING
                if running:
                    self._state = _base.CANCELLED_AND_NOTIFIED
                    for waiter in self._waiters:
                        waiter.add_cancelled(self)
                    self._condition.notify_all()
            if running:
                self._invoke_callbacks()  # type: ignore[attr-defined]
                item.exe._cancel_running(item)
                return True
            if super().cancel():
                return True
            if self._state != _base.RUNNING:
                return False
        return False

    def result(self, timeout: float | None = None) -> Any:
        if timeout is None and self._state == _base.RUNNING:
            self._read_answer()
        return super().result(timeout)

    result.__doc__ = cf.Future.result.__doc__

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if timeout is None and self._state == _base.RUNNING:
            self._read_answer()
        return super().exception(timeout)

    exception.__doc__ = cf.Future.exception.__doc__

    def _read_answer(self) -> None:
        """If the call is in flight on a quiet link, read that link on this thread for as
        long as messages keep coming within ``DISTEXEC_SPIN_US``: a short call's answer then
        reaches its caller without a thread hand-off (``ProcessGroup.read_briefly``)."""
        item = self._dx_item
        if item is None or not _SPIN:
            return
        exe, cid, pid = item.exe, item.cid, item.pid
        running = exe._running
        if pid and running.get(cid) is item:
            exe._g.read_briefly(
                pid, lambda: self._state == _base.RUNNING and running.get(cid) is item
            )

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
    timed_out: int = 0  # calls failed with TaskTimeoutError (their workers were killed)
    requeued: int = 0  # calls sent again because the executor killed their worker, or unsent


class _WorkerProcess:
    """One worker process of an executor, as ``ProcessPoolExecutor._processes`` holds its
    ``multiprocessing.Process`` objects: ``pid`` (the OS pid), ``is_alive()``, ``join()``,
    ``terminate()``, ``kill()``, ``exitcode``. ``worker_id`` is its distexec pid."""

    __slots__ = ("_popen", "worker_id")

    def __init__(self, worker_id: WorkerId, popen: subprocess.Popen[bytes]) -> None:
        self.worker_id = worker_id
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def name(self) -> str:
        return f"distexec-worker-{self.worker_id}"

    @property
    def exitcode(self) -> int | None:
        """``None`` while it runs; its exit status, or ``-signal``, once it has exited."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        """Wait until the process exits, or *timeout* seconds."""
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        """SIGTERM; the executor sees the worker die (and replaces it, or breaks)."""
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()

    def __repr__(self) -> str:
        code = self.exitcode
        state = "started" if code is None else f"stopped exitcode={code}"
        return f"<_WorkerProcess {self.name} pid={self.pid} {state}>"


class _CallQueue:
    """``ProcessPoolExecutor._call_queue``'s counterpart: the calls submitted and not yet
    sent to a worker. There is no feeder thread (calls are sent as they are dispatched), so
    ``join_thread()`` waits for the thread that sends the last of them, the manager thread,
    which ends once the executor is shut down and its work is done. Holds no reference to
    the executor, so it does not keep a dropped executor alive."""

    def __init__(self, queue: collections.deque[_Item]) -> None:
        self._queue = queue
        self._thread: threading.Thread | None = None

    def qsize(self) -> int:
        return len(self._queue)

    def empty(self) -> bool:
        return not self._queue

    def close(self) -> None:
        """Nothing to close: the executor's shutdown stops sending."""

    def join_thread(self) -> None:
        """Wait until the executor has sent every call it will send (its manager has ended)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


def _start_method(mp_context: Any) -> str:
    """The start method ``ProcessPoolExecutor`` would use with *mp_context* (None: the
    default one), found without fixing the default context as asking it would."""
    if mp_context is not None:
        return str(mp_context.get_start_method(allow_none=False))
    method = multiprocessing.get_start_method(allow_none=True)
    return method if method is not None else multiprocessing.get_all_start_methods()[0]


def _kind_of(fn: Callable[..., Any], args: tuple[Any, ...]) -> object:
    """What a call's duration is remembered by: its function's code (for a batch of
    ``map``, the mapped function's), or the type of any other callable."""
    if fn is _run_batch and args:
        fn = args[0]
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    if isinstance(fn, types.FunctionType):
        return fn.__code__
    return type(fn)


_AF_UNIX = getattr(socket, "AF_UNIX", None)


class _Item:
    """One submitted call: its future, its pickled message, and where it runs."""

    __slots__ = (
        "args",
        "cid",
        "exe",
        "fn",
        "future",
        "kind",
        "kwargs",
        "parts",
        "pid",
        "retry",
        "sent",
        "started",
    )

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
        self.kind = _kind_of(fn, args)
        self.cid = 0
        self.parts: list[bytes | memoryview] | None = None
        self.pid: WorkerId = 0
        self.retry: tuple[Iterator[float], Any] | None = None  # delays left, check state
        self.started = False  # RUNNING already (a retry): dispatch leaves its state alone
        self.sent = 0  # times dispatched: a deadline belongs to one dispatch

    #: Its future's ``result()`` may read the link itself (see ``cluster.Reply``).
    caller_waits = True

    def set(self, ok: bool, value: object) -> None:  # Sink: runs on a reader thread
        self.exe._completed(self, ok, value)


class DistributedExecutor(cf.Executor):
    """Run calls on distexec workers through the ``concurrent.futures`` interface.

    Args:
        max_workers: local workers to start (default: one per usable CPU). Ignored with *pool*.
        mp_context: workers are always fresh interpreters, whatever it says; only its start
            method counts, as in ``ProcessPoolExecutor``: with ``fork`` (Linux's default
            before Python 3.14) all ``max_workers`` workers start at the first submit, with
            ``spawn`` or ``forkserver`` one starts per submit that finds no worker idle.
        initializer, initargs: run once on each worker before its first task (replacements too).
        max_tasks_per_child: recycle a worker after this many tasks; its replacement is
            started first, so the queue never stalls.
        pool: run on these existing workers (a pool or a list of pids) and leave them running.
        retry_delays, retry_check: retry failed calls (see :func:`distexec.retry.retry`).
        task_timeout: seconds a call may run (from when it is sent to its worker); past it
            the call fails with ``TaskTimeoutError`` and its worker is killed and replaced.
            ``None`` (the default): no limit, and no timer at all on the way of a call. With
            *pool* a ``WorkerPool`` with its own ``task_timeout``, that one is the default.
        break_on_worker_death: a worker's death breaks the whole executor, as CPython's does.
        cancel_grace: seconds a cancelled running call has to stop after its interrupt
            before its worker is killed and replaced.
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
        cancel_grace: float = 5.0,
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
        # What the workers are, whatever was asked: fresh interpreters, as with spawn.
        self._mp_context: BaseContext = (
            mp_context if mp_context is not None else multiprocessing.get_context("spawn")
        )
        # As ProcessPoolExecutor: workers on demand unless the start method is fork.
        self._on_demand = pool is None and _start_method(mp_context) != "fork"
        self._idle_credits = 0  # calls finished and not yet matched by a submit (on demand)
        self._starting = 0  # workers the manager thread is starting
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._retry_delays = validate_delays(retry_delays)
        self._retry_check = retry_check
        if task_timeout is None and pool is not None:
            task_timeout = getattr(pool, "task_timeout", None)
        self._task_timeout = _timeouts.check_timeout(task_timeout, "task_timeout")
        self._cancel_grace = _timeouts.check_timeout(cancel_grace, "cancel_grace") or 5.0
        self._break_on_death = break_on_worker_death
        self._g = _cluster.group()

        self._lock = threading.RLock()  # guards: everything below
        self._queue: collections.deque[_Item] = collections.deque()
        self._running: dict[int, _Item] = {}  # cid -> item
        self._slots: dict[WorkerId, int] = {}  # worker -> calls in flight (dispatchable workers)
        # Seconds a call of each kind (_kind_of) takes on a busy worker (moving averages),
        # and the kinds measured short: up to _DEEP of those in flight per worker.
        self._call_times: dict[object, float] = {}
        self._short: set[object] = set()
        self._done_at: dict[WorkerId, float] = {}  # worker -> when its last call finished
        self._tasks_done: dict[WorkerId, int] = {}
        self._retiring: set[WorkerId] = set()
        self._owned: set[WorkerId] = set()
        self._retry_heap: list[tuple[float, int, _Item]] = []
        self._queued_started = 0  # started (RUNNING) items still in _queue
        self._retry_seq = itertools.count()
        self._shutdown = False
        self._broken: str | bool = False
        self._started = False
        self._events = threading.Condition(self._lock)
        self._manager: threading.Thread | None = None
        self._want_workers = 0
        self._counts = collections.Counter[str]()
        self._idle = threading.Condition(self._lock)
        # Timeouts and cancels: (when, seq, "timeout" | "cancel", item, its dispatch number),
        # pruned lazily: an entry whose dispatch is over is skipped when it comes due.
        self._deadlines: list[tuple[float, int, str, _Item, int]] = []
        self._deadline_seq = itertools.count()
        self._killing: set[WorkerId] = set()  # killed by us: their other calls run again
        self._hit: set[int] = set()  # call ids an interrupt for a cancel also reached
        self._unstarted: set[int] = set()  # call ids a dead worker is known not to have begun
        self._dead: set[WorkerId] = set()  # found gone while sending; the lost-hook follows
        self._retirers: list[threading.Thread] = []  # removing retired workers (max_tasks)
        self._sending: _Item | None = None  # the call being handed to send_call
        # ProcessPoolExecutor's names for its state (see the module docstring); one dict for
        # the executor's life, so a reference taken early sees every worker it ever owned.
        self._procs: dict[int, _WorkerProcess] = {}  # OS pid -> handle, owned workers
        self._os_pids: dict[WorkerId, int] = {}
        self._call_queue = _CallQueue(self._queue)
        self._hook: Callable[[WorkerId], None] | None = None  # our on_peer_lost entry

        if pool is not None:
            pids = pool.workers() if isinstance(pool, AbstractWorkerPool) else list(pool)
            if not pids:
                raise ValueError("pool has no workers")
            self._given: list[int] | None = pids
            self._max_workers = len(pids)
        else:
            self._given = None
        _live_executors.add(self)

    # ------------------------------------------------------------------ public API

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return a future for its result."""
        # Looks without the lock: shutdown is checked again under it, and a call queued as
        # the executor breaks fails with the others queued.
        if self._broken:
            raise BrokenProcessPool(self._broken)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        future = ExecutorFuture()
        item = _Item(self, future, fn, args, kwargs)
        future._dx_item = item
        try:
            item.cid, item.parts = self._g.prepare_call(fn, args, kwargs, ordered=True)
        except BaseException as exc:
            future.set_exception(exc)
            if not (self._started or self._on_demand):
                with self._lock:  # the first submit starts all the workers, whatever its fate
                    if not (self._started or self._shutdown):
                        self._start()
            return future
        with self._lock:
            if self._shutdown:  # shutdown raced with us
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._counts["submitted"] += 1
            self._queue.append(item)
            if not self._started:
                self._start()
            if self._on_demand:
                self._adjust_locked()
            self._dispatch_locked()
        return future

    submit.__doc__ = cf.Executor.submit.__doc__

    def map(
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

        # Only a buffered map submits more as it goes, so only then does the iterator hold
        # the executor (an unbuffered one must not keep a dropped executor alive).
        refill: Callable[[list[Any]], cf.Future[Any]] | None = None
        if buffersize is None:
            fs = collections.deque(submit_chunk(c) for c in chunks)
        else:
            fs = collections.deque(submit_chunk(c) for c in itertools.islice(chunks, buffersize))
            refill = submit_chunk
        del submit_chunk

        def results() -> Iterator[Any]:
            try:
                # No local keeps a future or a value while we yield: the caller's reference
                # is the only one (CPython's issue #14406).
                while fs:
                    if refill is not None:
                        for nxt in itertools.islice(chunks, 1):
                            fs.append(refill(nxt))
                    remaining = None if end_time is None else end_time - time.monotonic()
                    if chunksize == 1:
                        try:
                            yield _result(fs.popleft(), remaining)
                        except BaseException as exc:
                            if on_error is None or isinstance(exc, cf.TimeoutError):
                                raise
                            yield on_error(exc)
                        continue
                    values, errors = _result(fs.popleft(), remaining)
                    values.reverse()
                    if errors is None:  # the common case: nothing to look up per element
                        while values:
                            yield values.pop()
                        continue
                    i = 0
                    while values:
                        if errors is not None and i in errors:
                            values.pop()
                            failure = _translate(errors[i])
                            if on_error is None:
                                raise failure
                            yield on_error(failure)
                        else:
                            yield values.pop()
                        i += 1
            finally:
                for f in fs:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what has not started; stop owned workers."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                # Calls already counted as running (PPE's call queue, retries) still run.
                keep: collections.deque[_Item] = collections.deque()
                while self._queue:
                    item = self._queue.popleft()
                    if item.started:
                        keep.append(item)
                    else:
                        item.future.cancel()
                self._queue.extend(keep)
            self._events.notify_all()
            manager = self._manager
        if wait:
            if manager is not None and manager is not threading.current_thread():
                manager.join()
                with self._lock:  # as ProcessPoolExecutor does: a joined thread is let go
                    if self._manager is manager:
                        self._manager = None
                        self._call_queue._thread = None
                    retirers, self._retirers = self._retirers, []
                for retirer in retirers:  # workers retired for max_tasks_per_child
                    retirer.join()
                if self._given is None:  # our own workers are gone: maybe the last ones
                    _api.quiesce()
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
                timed_out=self._counts["timed_out"],
                requeued=self._counts["requeued"],
            )

    def workers(self) -> list[WorkerId]:
        """The pids this executor runs calls on."""
        with self._lock:
            return sorted(self._slots)

    @property
    def _processes(self) -> dict[int, _WorkerProcess]:
        """``ProcessPoolExecutor._processes``: {OS pid: process} of the workers this executor
        owns, one dict for its whole life. ``ProcessPoolExecutor`` starts a worker inside
        ``submit()``; here the manager thread starts it just after, so reading this waits
        for the starts already asked for (at most ``DISTEXEC_WORKER_TIMEOUT``)."""
        if threading.current_thread() is not self._manager:
            deadline = time.monotonic() + _config.worker_timeout()
            with self._events:
                while (self._want_workers or self._starting) and not (
                    self._broken or self._shutdown
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._events.wait(min(left, 0.5))
        return self._procs

    @property
    def _executor_manager_thread(self) -> threading.Thread | None:
        """The thread that starts, replaces and stops the workers (``None`` before the first
        submit, and once ``shutdown(wait=True)`` has joined it); it ends once the executor is
        shut down, or dropped, and its work is done."""
        return self._manager

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
        elif not self._on_demand:
            self._want_workers = self._max_workers
        # The cluster and the manager thread hold the executor weakly: one that is dropped
        # without shutdown() is collected once its work is done, and then stops its workers.
        events = self._events
        ref = weakref.ref(self, lambda _: _notify(events))
        self._hook = _weak_hook(ref)
        self._g.on_peer_lost.append(self._hook)
        stop = _stopper(self._lock, self._owned, self._slots, self._g, self._hook)
        self._manager = threading.Thread(
            target=_manage, args=(ref, events, stop), name="distexec-executor", daemon=True
        )
        self._call_queue._thread = self._manager
        self._manager.start()

    def _adjust_locked(self) -> None:
        """On demand: start one more worker for this submit, unless a worker went idle since
        the last one (a call finished) or there are ``max_workers`` already."""
        if self._idle_credits:
            self._idle_credits -= 1
            return
        have = len(self._owned) - len(self._retiring) + self._starting + self._want_workers
        if have < self._max_workers:
            self._want_workers += 1
            self._events.notify_all()

    def _dispatch_locked(self) -> None:
        """Send queued calls, each to the least busy worker with a free slot."""
        queue, slots = self._queue, self._slots
        while queue and not self._broken:
            pid, n = -1, _DEEP if queue[0].kind in self._short else _DEPTH
            for p, k in slots.items():
                if k < n and p not in self._retiring:
                    if self._max_tasks is not None and (
                        self._tasks_done.get(p, 0) + k >= self._max_tasks
                    ):
                        continue  # its remaining tasks are all in flight already
                    pid, n = p, k
                    if k == 0:
                        break
            if pid < 0:
                self._reserve_locked()
                return
            item = queue.popleft()
            if item.started:
                self._queued_started -= 1
            if not item.started:
                fut = item.future
                # (_reserve_locked may have seen it cancelled already: asking twice raises)
                if (
                    fut._state == _base.CANCELLED_AND_NOTIFIED
                    or not fut.set_running_or_notify_cancel()
                ):
                    fut._dx_item = None  # type: ignore[attr-defined]
                    continue
                item.started = True
            elif item.future._state in _CANCELLED:  # cancelled while it waited to run again
                item.future._dx_item = None  # type: ignore[attr-defined]
                continue
            slots[pid] = n + 1
            item.pid = pid
            item.sent += 1
            self._running[item.cid] = item
            if self._task_timeout is not None:
                self._arm_locked(time.monotonic() + self._task_timeout, "timeout", item)
            parts = item.parts
            assert parts is not None
            if n == 0 and _SPIN:  # nothing else in flight to it: a caller may wait for this
                parts = flagged(parts, FLAG_WAIT)
            self._sending = item  # a failure reported during send_call: it never left
            self._g.send_call(pid, item.cid, parts, item)
            self._sending = None

    def _reserve_locked(self) -> None:
        """ProcessPoolExecutor's call queue: up to ``max_workers + 1`` calls count as running
        as soon as they are submitted, even before a worker is free (so, as there, they can
        no longer be cancelled, and ``shutdown(cancel_futures=True)`` lets them run)."""
        budget = self._max_workers + 1 - self._queued_started
        if budget <= 0:
            return
        for item in self._queue:
            if item.started or item.future._state in _CANCELLED:  # (asked once only)
                continue
            if item.future.set_running_or_notify_cancel():
                item.started = True
                self._queued_started += 1
                budget -= 1
                if budget == 0:
                    return

    def _measured(self, kind: object, took: float) -> None:
        """A call of *kind* took *took* seconds: update its average, and whether it is short."""
        times = self._call_times
        average = times.get(kind, _LONG_CALL)
        average += (took - average) * 0.125
        if kind not in times and len(times) >= _KINDS:
            oldest = next(iter(times))
            del times[oldest]
            self._short.discard(oldest)
        times[kind] = average
        if average < _SHORT_CALL:
            self._short.add(kind)
        else:
            self._short.discard(kind)

    def _completed(self, item: _Item, ok: bool, value: object) -> None:
        with self._lock:
            if self._running.pop(item.cid, None) is None:
                return  # settled already
            pid = item.pid
            if pid in self._slots:
                busy = self._slots[pid] = self._slots[pid] - 1
                now = time.monotonic()
                last = self._done_at.get(pid)
                self._done_at[pid] = now
                if busy and last is not None:
                    # It went on with a call that was waiting there: the time since its last
                    # one finished is one call's (plus any wait for it, so never less).
                    # Capped, so that one pause (a collection, a preemption) does not count
                    # as long calls; three long calls in a row do.
                    self._measured(item.kind, min(now - last, _LONG_CALL))
            hit = False
            if self._hit:
                hit = item.cid in self._hit
                self._hit.discard(item.cid)
            cancelled = item.future._state in _CANCELLED
            if not ok and not cancelled and self._lost_by_us(item, value, hit):
                self._counts["requeued"] += 1
                self._queue.appendleft(item)  # its worker is gone: the same call id is free
                self._dispatch_locked()
                return
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
            if self._idle_credits < len(self._owned):
                self._idle_credits += 1
            self._dispatch_locked()
            if pid in self._retiring and self._slots.get(pid) == 0:
                self._events.notify_all()
            if not self._running and not self._queue:
                self._idle.notify_all()
                if self._shutdown:
                    self._events.notify_all()  # the manager thread winds down now
        item.future._dx_item = None  # type: ignore[attr-defined]
        item.parts = None
        if cancelled:
            return
        try:
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(_translate(value))  # type: ignore[arg-type]
        except cf.InvalidStateError:
            pass  # cancelled just now

    def _lost_by_us(self, item: _Item, value: object, hit: bool) -> bool:
        """Whether a failed call should simply run again: it never reached its worker, its
        dead worker had not begun it, or the executor itself killed or interrupted that
        worker for another call."""
        pid = item.pid
        if isinstance(value, ProcessExitedException):
            if pid in self._slots:  # gone: send nothing more there (its lost-hook follows)
                del self._slots[pid]
                self._dead.add(pid)
            if self._unstarted:
                unstarted = item.cid in self._unstarted
                self._unstarted.discard(item.cid)
                if unstarted:
                    return True
            return item is self._sending or pid in self._killing
        return (
            hit
            and isinstance(value, RemoteException)
            and value.captured.type_name == "KeyboardInterrupt"
        )

    # ------------------------------------------------------------------ timeouts and cancels

    def _arm_locked(self, when: float, kind: str, item: _Item) -> None:
        heap = self._deadlines
        entry = (when, next(self._deadline_seq), kind, item, item.sent)
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self._events.notify_all()  # the manager thread sleeps until the first deadline
        elif len(heap) > 4 * len(self._running) + 1024:
            self._deadlines = [e for e in heap if e[2] == "cancel" or self._current(e[3], e[4])]
            heapq.heapify(self._deadlines)

    def _current(self, item: _Item, sent: int) -> bool:
        """Whether *item* is still running in its *sent*-th dispatch."""
        return item.sent == sent and self._running.get(item.cid) is item

    def _expire_deadlines(self) -> None:
        """On the manager thread: kill the workers of calls past their timeout, and of
        cancelled calls past their grace."""
        kills: dict[WorkerId, tuple[str, str, dict[int, BaseException]]] = {}
        with self._lock:
            now = time.monotonic()
            heap = self._deadlines
            while heap and heap[0][0] <= now:
                _, _, kind, item, sent = heapq.heappop(heap)
                if not self._current(item, sent):
                    continue  # finished, or running again (a new dispatch, a new deadline)
                pid, cid = item.pid, item.cid
                if pid in self._killing:
                    # Being killed already, for the call that expired first there: this one
                    # may only have starved behind it, so it runs again elsewhere.
                    continue
                if kind == "timeout":
                    timeout = self._task_timeout or 0.0
                    reason, err = _timeouts.timeout_reason(
                        pid, timeout, _timeouts.describe_call(item.fn), call_id=cid
                    )
                    self._counts["timed_out"] += 1
                    kills[pid] = (str(reason), "timeout", {cid: err})
                else:
                    kills[pid] = (
                        f"a cancelled call was still running {self._cancel_grace:g} s "
                        "after its interrupt",
                        "cancelled",
                        {},
                    )
                self._killing.add(pid)
        for pid, (text, kind, errors) in kills.items():
            reason = ExitReason(text, kind=kind, call_errors=errors)
            if not _timeouts.kill_worker(pid, reason):
                with self._lock:
                    self._killing.discard(pid)

    def _cancel_running(self, item: _Item) -> None:
        """``cancel()`` of a RUNNING future: interrupt its call, and arm the grace period."""
        with self._lock:
            if self._running.get(item.cid) is not item:
                return  # not on a worker now (waiting to run again): it will not be sent
            pid = item.pid
            self._hit.update(cid for cid, other in self._running.items() if other.pid == pid)
            self._arm_locked(time.monotonic() + self._cancel_grace, "cancel", item)
        try:
            _api.interrupt(pid)
        except Exception:
            pass  # the worker is gone: the call is over anyway

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

    def _plan_locked(self) -> int | float | None:
        """One round of the manager thread, under the lock: release retries, send what can
        be sent, retire workers. Returns how many workers to start (an int > 0), how long to
        wait for the next event (a float; the caller waits without letting go of the lock
        in between, so no notification is lost), or ``None`` to stop."""
        now = time.monotonic()
        while self._retry_heap and self._retry_heap[0][0] <= now:
            _, _, item = heapq.heappop(self._retry_heap)
            self._requeue(item)
        self._dispatch_locked()
        self._reap_retired_locked()
        want = self._want_workers
        if self._shutdown and not self._queue and not self._running and not self._retry_heap:
            return None
        if self._broken:
            self._fail_all_locked()
            if self._shutdown:
                return None
        if want > 0 and not self._broken:
            self._want_workers = 0
            self._starting += want
            return want
        self._want_workers = 0 if self._broken else want
        wait = 1.0
        if self._retry_heap:
            wait = min(wait, max(0.0, self._retry_heap[0][0] - now))
        if self._deadlines:
            if not self._running:
                self._deadlines.clear()  # all stale (and they hold calls, so the executor)
            else:
                wait = min(wait, max(0.0, self._deadlines[0][0] - now))
        return wait

    def _idle_locked(self) -> bool:
        """Nothing queued, running or waiting to retry: the manager may let go of us."""
        return not (self._queue or self._running or self._retry_heap or self._want_workers)

    def _requeue(self, item: _Item) -> None:
        """A retry goes out as a new call (new id); its future stays RUNNING."""
        item.cid, item.parts = self._g.prepare_call(item.fn, item.args, item.kwargs, ordered=True)
        self._queue.appendleft(item)
        self._queued_started += 1

    def _add_workers(self, n: int) -> None:
        try:
            pids = _api.add_private_workers(n)
        except BaseException as exc:
            with self._lock:
                self._starting -= n
                self._broken = f"could not start workers: {exc}"
                self._events.notify_all()
            return
        with self._lock:
            self._starting -= n
            self._owned.update(pids)  # ours from now on, so shutdown removes them all
            for pid in pids:
                self._register_process_locked(pid)
            self._events.notify_all()  # (for _processes)
        # (Local workers have this process's multiprocessing authkey, as multiprocessing's
        # children do: LocalManager hands it over with the cookie.)
        for pid in pids:
            if self._initializer is not None:
                try:
                    remotecall_fetch(_run_initializer, pid, self._initializer, self._initargs)
                except ProcessExitedException:
                    continue  # it died, not its initializer: it is replaced like any other
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
                if pid not in self._owned:
                    continue  # lost meanwhile, and its lost-hook has replaced it
                peer = self._g.peer(pid)
                if peer is None or peer.state is _cluster.PeerState.TERMINATED:
                    self._lost_locked(pid)  # lost before it was ours: its hook passed it by
                else:
                    self._slots[pid] = 0
            self._dispatch_locked()

    def _register_process_locked(self, pid: WorkerId) -> None:
        """Put worker *pid*'s process in ``_processes`` (local workers: all we start)."""
        peer = self._g.peer(pid)
        popen = peer.config.process if peer is not None and peer.config is not None else None
        if isinstance(popen, subprocess.Popen):
            self._os_pids[pid] = popen.pid
            self._procs[popen.pid] = _WorkerProcess(pid, popen)

    def _unregister_process_locked(self, pid: WorkerId) -> None:
        """Worker *pid* is no longer ours to use (retired, or gone): it leaves ``_processes``,
        as an exited worker leaves ``ProcessPoolExecutor``'s."""
        ospid = self._os_pids.pop(pid, None)
        if ospid is not None:
            self._procs.pop(ospid, None)

    def _reap_retired_locked(self) -> None:
        done = [p for p in self._retiring if self._slots.get(p, 0) == 0]
        for pid in done:
            self._retiring.discard(pid)
            self._slots.pop(pid, None)
            self._owned.discard(pid)
            self._unregister_process_locked(pid)
            retirer = threading.Thread(
                target=_quiet_rmprocs, args=(pid,), name=f"distexec-retire-{pid}", daemon=True
            )
            self._retirers = [t for t in self._retirers if t.is_alive()]
            self._retirers.append(retirer)
            retirer.start()

    def _fail_all_locked(self) -> None:
        err = BrokenProcessPool(self._broken)
        items = list(self._queue) + [i for _, _, i in self._retry_heap]
        self._queue.clear()
        self._queued_started = 0
        self._retry_heap.clear()
        for item in items:
            if item.started or item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_exception(err)
                except cf.InvalidStateError:
                    pass

    def _peer_lost_hook(self, pid: WorkerId) -> None:
        with self._lock:
            # _killing keeps *pid* (pids are never reused): this hook runs before the calls
            # that were on it fail, and _lost_by_us must still see that we killed it.
            found_dead = pid in self._dead
            self._dead.discard(pid)
            # (an owned worker without slots is still starting: _add_workers has it)
            if pid not in self._slots and not found_dead and pid not in self._owned:
                return
            self._find_unstarted_locked(pid)
            self._lost_locked(pid)

    def _find_unstarted_locked(self, pid: WorkerId) -> None:
        """Worker *pid* is gone, its calls not failed yet: mark those it cannot have begun.

        A worker runs its calls one at a time, in the order they were sent, and begins the
        next once its answer to the last is written (see ``_turns``). On an AF_UNIX link a
        written answer is read before the EOF, however the worker died: so of the calls
        still unanswered only the oldest can have run, and the others run again elsewhere.
        Over TCP an answer written just before the death can be lost with the connection
        (a reset discards it), so there every unanswered call fails as before."""
        peer = self._g.peer(pid)
        conn = None if peer is None else peer.conn
        if conn is None or getattr(conn.sock, "family", None) != _AF_UNIX:
            return
        oldest = True
        for cid, item in self._running.items():  # in the order they were sent
            if item.pid == pid:
                if not oldest:
                    self._unstarted.add(cid)
                oldest = False

    def _lost_locked(self, pid: WorkerId) -> None:
        """Worker *pid* is gone: stop using it, and replace it if it was ours."""
        self._slots.pop(pid, None)
        self._done_at.pop(pid, None)
        self._retiring.discard(pid)
        if pid in self._owned:
            self._owned.discard(pid)
            self._unregister_process_locked(pid)
            if self._break_on_death:
                self._broken = (
                    "A process in the process pool was terminated abruptly while the "
                    "future was running or pending."
                )
            elif not self._shutdown or self._queue or self._retry_heap:
                # (after shutdown too, while work that must finish is waiting)
                self._want_workers += 1
                self._counts["replaced"] += 1
        elif self._given is not None and not self._slots and not self._broken:
            # Workers of a given pool are not replaced: with the last one gone, what waits
            # would wait forever. It fails instead, and so does any later submit.
            self._broken = (
                f"every worker of the executor's pool is gone (the last was worker {pid}); "
                "the calls that had not run cannot run"
            )
        self._events.notify_all()

    def _stop_workers(self) -> None:
        if self._hook is None:  # never started: no workers, no hook
            return
        _stopper(self._lock, self._owned, self._slots, self._g, self._hook)()

    def _at_interpreter_exit(self) -> None:
        # As ProcessPoolExecutor does at exit: finish the work already submitted.
        self.shutdown(wait=True)


def _manage(
    ref: weakref.ref[DistributedExecutor], events: threading.Condition, stop: Callable[[], None]
) -> None:
    """The manager thread: start and replace workers, release retries, and wind down at
    shutdown. It holds its executor only while the executor has work: an idle executor
    that nobody else holds is collected, and then this stops its workers, as
    ``ProcessPoolExecutor``'s manager thread does when its executor is collected."""
    exe = ref()
    try:
        while exe is not None:
            if exe._deadlines:
                exe._expire_deadlines()  # kills workers: outside the lock
            with events:
                step = exe._plan_locked()
                if step is None:
                    return
                if isinstance(step, float):
                    if exe._idle_locked():
                        exe = None  # (the executor may be collected right here)
                        if ref() is None:
                            return
                        events.wait(step)
                        exe = ref()
                    else:
                        events.wait(step)
                    continue
            exe._add_workers(step)
    finally:
        if exe is not None:
            exe._stop_workers()
        else:
            stop()


def _run_initializer(initializer: Callable[..., object], initargs: tuple[Any, ...]) -> None:
    """On a worker: run the executor's initializer. A failure is logged there too, as
    ``ProcessPoolExecutor``'s worker logs it, if the worker's logging goes somewhere (an
    initializer may have pointed it at a queue); the caller logs it in any case."""
    try:
        initializer(*initargs)
    except BaseException:
        if _base.LOGGER.hasHandlers():
            _base.LOGGER.critical("Exception in initializer:", exc_info=True)
        raise


def _notify(events: threading.Condition) -> None:
    with events:
        events.notify_all()


def _weak_hook(ref: weakref.ref[DistributedExecutor]) -> Callable[[WorkerId], None]:
    """An ``on_peer_lost`` hook that does not keep the executor alive."""

    def hook(pid: WorkerId) -> None:
        exe = ref()
        if exe is not None:
            exe._peer_lost_hook(pid)

    return hook


def _stopper(
    lock: threading.RLock,
    owned: set[WorkerId],
    slots: dict[WorkerId, int],
    g: _cluster.ProcessGroup,
    hook: Callable[[WorkerId], None],
) -> Callable[[], None]:
    """Stop the workers an executor owns and unhook it from the cluster; needs only the
    executor's parts, so it also runs after the executor itself was collected."""

    def stop() -> None:
        with lock:
            pids = sorted(owned)
            owned.clear()
            for pid in pids:
                slots.pop(pid, None)
        if pids:
            _quiet_rmprocs(*pids)
        try:
            g.on_peer_lost.remove(hook)
        except ValueError:
            pass

    return stop


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
            # CPython's own type, so code (and tests) checking for it see what they expect.
            tb = f'\n"""\n{exc.captured.tb_text}"""'
            original.__cause__ = _RemoteTraceback(tb)  # type: ignore[arg-type]
        return original
    if isinstance(exc, ProcessExitedException) and not isinstance(exc, WorkerLostError):
        return WorkerDiedError(
            f"{exc} (the call it was running failed; the executor goes on with the others)",
            pid=exc.pid,
        )
    return exc


def _cpu_count() -> int:
    return os.cpu_count() or 1
