"""Julia's macros as functions: spawnat, fetchfrom, everywhere, distributed, sync, async_, clear.

Layer: L6 API (beside ``_api``). Imports: L0-L5, ``_api``, ``_syncscope``.

=================================  ==============================================
Julia                              distexec
=================================  ==============================================
``@spawnat p expr``                ``spawnat(p, fn, *args, **kwargs)``
``@spawnat :any expr``, ``@spawn`` ``spawnat("any", fn, ...)``, ``spawn(fn, ...)``
``@fetchfrom p expr``, ``@fetch``  ``fetchfrom(p, fn, ...)``, ``fetchfrom("any", ...)``
``@everywhere [procs] expr``       ``everywhere(fn_or_source, *args, procs=None)``, ``@everywhere``
``@distributed [red] for x in R``  ``distributed(R, reducer=None)(body)``
``@sync``, ``@async``              ``with sync():``, ``async_(fn, ...)``
``clear!(syms, pids; mod)``        ``clear(names, pids=None, module="__main__")``
``timedwait(cb, secs; pollint)``   ``timedwait(cb, secs, pollint=0.1)``
=================================  ==============================================

A macro captures an expression; a function takes a callable and its arguments. What Julia
finds lexically (the tasks an ``@sync`` waits for), this module finds through a context
variable (:mod:`distexec._syncscope`): every ``remotecall`` started while a ``sync()`` block
is active in the same thread, however deep in the call stack, belongs to that block.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import contextvars
import ctypes
import functools
import itertools
import linecache
import os
import pickle
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from . import _cluster, _syncscope, refs
from ._api import interrupt, myid, procs, workers
from ._ids import MASTER, WorkerId
from ._remotecall import remotecall, remotecall_fetch
from ._runner import _set_async_exc
from .errors import CapturedException, RemoteException, SerializationError

if TYPE_CHECKING:
    from .workerpool import AbstractWorkerPool

__all__ = [
    "Task",
    "async_",
    "clear",
    "distributed",
    "everywhere",
    "fetchfrom",
    "nextproc",
    "spawn",
    "spawnat",
    "splitrange",
    "sync",
    "timedwait",
]

T = TypeVar("T")
R = TypeVar("R")

# ------------------------------------------------------------------------------ helpers


def _check_callable(fn: object, what: str = "a callable") -> None:
    if not callable(fn):
        raise TypeError(f"expected {what}, got {type(fn).__name__}")


def _check_pid(pid: object) -> WorkerId:
    return _cluster.group().check_pid(pid)


def _capture_here(exc: BaseException) -> RemoteException:
    """A failure of this very process, wrapped as a remote one would be."""
    wrapped = RemoteException(myid(), CapturedException.capture(exc))
    wrapped.__cause__ = exc
    return wrapped


def _pending_pids(items: Iterable[object], me: WorkerId, out: set[WorkerId]) -> None:
    """The remote pids still working on *items*; interrupts local ``async_`` threads."""
    for item in list(items):
        if not isinstance(item, cf.Future) or item.done():
            continue
        if isinstance(item, refs.Future):
            if item.where != me:
                out.add(item.where)
        elif isinstance(item, Task):
            item._interrupt()
            _pending_pids(item._children, me, out)


def _interrupt_pending(items: Iterable[object]) -> None:
    """Ctrl-C while waiting: interrupt what is still running for *items* (best effort).

    Remote calls are interrupted per process (``interrupt(pid)`` hits every call running
    there, Julia's granularity); that is possible from pid 1 only. ``async_`` threads get a
    ``KeyboardInterrupt`` of their own. Calls running on this process's call threads
    (a ``remotecall`` to ``myid()``) are left to finish.
    """
    me = myid()
    pids: set[WorkerId] = set()
    try:
        _pending_pids(items, me, pids)
    except Exception:  # pragma: no cover - never mask the KeyboardInterrupt
        return
    if me != MASTER:
        return
    for pid in sorted(pids):
        try:
            interrupt(pid)
        except Exception:
            pass  # the worker is gone already: nothing left to interrupt


def _wait_all(futs: Sequence[cf.Future[Any]]) -> list[BaseException | None]:
    """Wait for every future; their exceptions in order. Ctrl-C interrupts the rest."""
    out: list[BaseException | None] = []
    try:
        for f in futs:
            try:
                out.append(f.exception())
            except cf.CancelledError as exc:
                out.append(exc)
    except KeyboardInterrupt:
        _interrupt_pending(futs)
        raise
    return out


def _group(message: str, excs: Sequence[BaseException]) -> BaseExceptionGroup[BaseException]:
    # ExceptionGroup when every member is an Exception (the usual case); BaseExceptionGroup
    # when one is a KeyboardInterrupt (an interrupted async_ task).
    return BaseExceptionGroup(message, list(excs))


# ------------------------------------------------------------------------------ Task


class Task(cf.Future):  # type: ignore[type-arg]
    """A local task: what ``async_`` and ``distributed`` (without a reducer) return.

    Julia: the ``Task`` of ``@async``. A ``concurrent.futures.Future``, plus Julia's
    ``fetch()``, ``wait()`` and ``isready()``. ``fetch`` raises the task's own exception
    (Julia wraps it in a ``TaskFailedException``; here it comes as it was raised). A task
    that failed and was never waited for says so on stderr when it is garbage-collected
    (Julia's ``errormonitor``).
    """

    _ids = itertools.count(1)

    def __init__(self, name: str = "task") -> None:
        super().__init__()
        self.name = name
        self._ident: int | None = None  # the thread running it (async_), for Ctrl-C
        self._ident_lock = threading.Lock()  # guards: _ident
        self._children: tuple[cf.Future[Any], ...] = ()
        self._retrieved = False

    def __repr__(self) -> str:
        with self._condition:
            state = self._state.lower()
        return f"<Task {self.name!r} state={state}>"

    def result(self, timeout: float | None = None) -> Any:
        self._retrieved = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._retrieved = True
        return super().exception(timeout)

    def fetch(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value; raise its exception. Julia: ``fetch(t)``."""
        return self.result(timeout)

    def wait(self, timeout: float | None = None) -> Task:
        """Wait for the task to finish; raise its exception if it failed. Julia: ``wait(t)``."""
        exc = self.exception(timeout)
        if exc is not None:
            raise exc
        return self

    def isready(self) -> bool:
        """Whether the task has finished (Julia: ``istaskdone(t)``); never blocks."""
        return self.done()

    def _interrupt(self) -> None:
        with self._ident_lock:
            if self._ident is not None:
                _set_async_exc(self._ident, ctypes.py_object(KeyboardInterrupt))

    def __del__(self) -> None:
        try:
            if self._state == "FINISHED" and self._exception is not None and not self._retrieved:
                _cluster._log(
                    f"{self!r} failed and nothing waited for it: "
                    f"{type(self._exception).__name__}: {self._exception}"
                )
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _gather(futs: Sequence[cf.Future[Any]], name: str) -> Task:
    """A Task that finishes when all *futs* have; fails with a group of their failures."""
    task = Task(name)
    task._children = tuple(futs)
    task.set_running_or_notify_cancel()
    if not futs:
        task.set_result(None)
        return task
    remaining = [len(futs)]
    lock = threading.Lock()  # guards: remaining

    def one_done(_: cf.Future[Any]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if not last:
            return
        errors = []
        for f in futs:
            try:
                exc = f.exception(0)
            except cf.CancelledError as cancelled:
                exc = cancelled
            if exc is not None:
                errors.append(exc)
        if errors:
            task.set_exception(
                _group(f"{name}: {len(errors)} of {len(futs)} chunks failed", errors)
            )
        else:
            task.set_result(None)

    for f in futs:
        f.add_done_callback(one_done)
    return task


# ------------------------------------------------------------------------------ spawnat


_next_idx = itertools.count()  # next() on a count is atomic under the GIL


def nextproc() -> WorkerId:
    """The worker ``spawnat("any", ...)`` uses next: round robin over ``workers()``.

    Julia: ``Distributed.nextproc()``, a process-global counter, no load balancing. With no
    workers it is 1.
    """
    ws = workers()
    return ws[next(_next_idx) % len(ws)]


def _resolve(p: WorkerId | str | Any) -> Any:
    if isinstance(p, str):
        if p == "any":
            return nextproc()
        raise ValueError(f"a process id or 'any' expected, not {p!r}")
    if hasattr(p, "remotecall_fetch") and not isinstance(p, int):
        return p  # a WorkerPool: remotecall borrows a worker from it
    return _check_pid(p)  # remotecall_fetch alone would take True or 1.0 for pid 1


def spawnat(
    p: WorkerId | Literal["any"] | AbstractWorkerPool,
    fn: Callable[..., Any],
    /,
    *args: Any,
    **kwargs: Any,
) -> refs.Future:
    """Start ``fn(*args, **kwargs)`` on process *p* and return its :class:`Future` at once.

    Julia: ``@spawnat p expr``; ``spawnat("any", fn)`` is ``@spawnat :any expr`` and picks
    the next worker round robin (:func:`nextproc`). *p* may also be a ``WorkerPool``, as
    ``remotecall`` allows. Inside ``with sync():`` the block waits for it.

    Raises:
        ValueError: *p* is not a process of the group, nor ``"any"``.
        ProcessExitedException: *p* has been removed or died.
        SerializationError: *fn* or an argument does not pickle; nothing was sent.
    """
    return remotecall(fn, _resolve(p), *args, **kwargs)


def spawn(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> refs.Future:
    """Deprecated: use ``spawnat("any", fn, ...)``. Julia: ``@spawn expr`` (deprecated in 1.3)."""
    warnings.warn(
        'spawn(fn, ...) is deprecated, use spawnat("any", fn, ...) (as Julia deprecated @spawn)',
        DeprecationWarning,
        stacklevel=2,
    )
    return remotecall(fn, nextproc(), *args, **kwargs)


def fetchfrom(
    p: WorkerId | Literal["any"] | AbstractWorkerPool,
    fn: Callable[..., R],
    /,
    *args: Any,
    **kwargs: Any,
) -> R:
    """Run ``fn(*args, **kwargs)`` on process *p* and return its value.

    Julia: ``@fetchfrom p expr``; ``fetchfrom("any", fn)`` is Julia's ``@fetch expr``.

    Raises:
        RemoteException: *fn* raised there (also when *p* is this process).
        ValueError: *p* is not a process of the group, nor ``"any"``.
    """
    return remotecall_fetch(fn, _resolve(p), *args, **kwargs)


# ------------------------------------------------------------------------------ sync, async_


class SyncBlock:
    """One ``with sync():`` block; ``tasks`` lists what it has collected so far."""

    __slots__ = ("_scope", "_token")

    def __init__(self) -> None:
        self._scope = _syncscope.SyncScope()
        self._token: object = None

    @property
    def tasks(self) -> tuple[object, ...]:
        """The Futures and Tasks started in the block, in the order they started."""
        return tuple(self._scope.items)

    def __repr__(self) -> str:
        return f"<sync tasks={len(self._scope.items)}>"

    def __enter__(self) -> SyncBlock:
        if self._token is not None:
            raise RuntimeError("a sync() block cannot be entered twice; call sync() again")
        self._token = _syncscope.enter(self._scope)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        _syncscope.leave(self._token)
        items = self._scope.items
        if exc is not None and not isinstance(exc, Exception):
            # Ctrl-C (or SystemExit) in the body: stop what we started, do not wait.
            if isinstance(exc, KeyboardInterrupt):
                _interrupt_pending(items)
            return False
        failures: list[BaseException] = []
        try:
            i = 0
            while i < len(items):  # async_ tasks may register more while we wait
                item = items[i]
                i += 1
                try:
                    err = item.exception()  # type: ignore[attr-defined]
                except cf.CancelledError as cancelled:
                    err = cancelled
                if err is not None:
                    failures.append(err)
        except KeyboardInterrupt:
            _interrupt_pending(items)
            raise
        if exc is not None:
            others = [f for f in failures if f is not exc]
            if others:
                exc.add_note(
                    f"while this propagated out of a sync() block, {len(others)} of its "
                    f"{len(items)} tasks failed too: "
                    + "; ".join(f"{type(f).__name__}: {_first_line(f)}" for f in others[:5])
                )
            return False
        if failures:
            raise _group(f"sync: {len(failures)} of {len(items)} tasks failed", failures)
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def sync() -> SyncBlock:
    """A block that, on exit, waits for every task started inside it.

    Julia: ``@sync``. Collected are the Futures of ``spawnat``, ``remotecall`` and
    ``remotecall_wait`` and the Tasks of ``distributed`` (without a reducer) and ``async_``
    started in the block, also from functions it calls, in the same thread (``async_``
    tasks started in the block count as the same thread). ``remotecall_fetch`` and
    ``remote_do`` return nothing to wait for. Blocks nest: the inner one waits for its own.

    Failures raise, after everything finished, as one ``ExceptionGroup`` (Julia's
    ``CompositeException``) of the tasks' exceptions in start order (``RemoteException``
    for remote calls). If the body itself raises, the block still waits for its tasks and
    then lets the body's exception through, with a note naming the tasks that failed too
    (Julia's ``@sync`` does not wait then; here nothing outlives the block). Ctrl-C in the
    body or while waiting interrupts the remote calls still running (``interrupt`` of their
    processes, from pid 1) and the ``async_`` threads, and raises ``KeyboardInterrupt`` at
    once.

    Example::

        with dx.sync():
            for p in dx.workers():
                dx.spawnat(p, work, p)
    """
    return SyncBlock()


_async_ids = itertools.count(1)


def async_(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Task:
    """Run ``fn(*args, **kwargs)`` in a new thread of this process and return its Task.

    Julia: ``@async expr``. Inside ``with sync():`` the block waits for it; the thread runs
    in a copy of the caller's context, so remote calls it starts belong to that block too.
    Threads are daemons: a program that exits does not wait for them.
    """
    _check_callable(fn)
    task = Task(getattr(fn, "__qualname__", type(fn).__name__))
    task.set_running_or_notify_cancel()
    ctx = contextvars.copy_context()

    def run() -> None:
        me = threading.get_ident()
        try:
            try:
                with task._ident_lock:
                    task._ident = me
                value = ctx.run(fn, *args, **kwargs)
            finally:
                with task._ident_lock:
                    task._ident = None
                    _set_async_exc(me, ctypes.py_object())  # NULL: drop a late interrupt
        except BaseException as exc:
            task.set_exception(exc)
        else:
            task.set_result(value)

    _syncscope.register(task)
    threading.Thread(target=run, name=f"distexec-async-{next(_async_ids)}", daemon=True).start()
    return task


# ------------------------------------------------------------------------------ distributed


def splitrange(first: int, last: int, np: int) -> list[range]:
    """Split ``first..last`` (inclusive) into *np* contiguous chunks, as ``@distributed`` does.

    Julia: ``Distributed.splitrange(first, last, np)``. ``each, extras = divmod(n, np)``; the
    first ``extras`` chunks get one more; with fewer items than *np* there are only as many
    chunks as items. Chunks come as ``range`` objects (Julia's ``lo:hi`` is
    ``range(lo, hi + 1)``).
    """
    if np < 1:
        raise ValueError(f"splitrange needs at least one chunk, got np={np}")
    each, extras = divmod(last - first + 1, np)
    nchunks = np if each > 0 else extras
    chunks = []
    lo = first
    for _ in range(nchunks):
        hi = lo + each - 1
        if extras > 0:
            hi += 1
            extras -= 1
        chunks.append(range(lo, hi + 1))
        lo = hi + 1
    return chunks


def _as_sequence(iterable: object) -> Sequence[Any]:
    tp = type(iterable)
    if isinstance(iterable, Mapping) or not (hasattr(tp, "__len__") and hasattr(tp, "__getitem__")):
        raise TypeError(
            "distributed() splits a sized, sliceable sequence (a range, list, tuple, array); "
            f"got {tp.__name__}. Materialise it first, e.g. distributed(list(it))"
        )
    return iterable  # type: ignore[return-value]


def _pfor_chunk(body: Callable[[Any], Any], chunk: Sequence[Any]) -> None:
    for x in chunk:
        body(x)


def _preduce_chunk(
    reducer: Callable[[Any, Any], Any], body: Callable[[Any], Any], chunk: Sequence[Any]
) -> Any:
    it = iter(chunk)
    ac = body(next(it))
    for x in it:
        ac = reducer(ac, body(x))
    return ac


@overload
def distributed(
    iterable: Sequence[T], reducer: None = None
) -> Callable[[Callable[[T], Any]], Task]: ...
@overload
def distributed(
    iterable: Sequence[T], reducer: Callable[[R, R], R]
) -> Callable[[Callable[[T], R]], R]: ...
def distributed(iterable: Sequence[Any], reducer: Callable[[Any, Any], Any] | None = None) -> Any:
    """A parallel for loop over *iterable*: ``distributed(R, reducer)(body)``.

    Julia: ``@distributed [reducer] for x in R; body; end``. *R* is split into one
    contiguous chunk per worker (:func:`splitrange`); each chunk travels to its worker as a
    slice, so a ``range`` costs nothing to send.

    With a *reducer*, chunk *i* runs on ``workers()[i]``, which folds it from the left with
    no initial value (``ac = body(R[lo]); ac = reducer(ac, body(x))`` for the rest); the
    caller then reduces the partial results in chunk order and returns the value (so a
    non-commutative reducer is fine). It blocks; the first failing chunk (in chunk order)
    raises its ``RemoteException``. An empty *R* raises ``ValueError`` (nothing to start
    the fold from, as Julia).

    Without one it returns at once with a :class:`Task` (chunks go round robin, as
    ``spawnat("any")``); ``with sync():`` waits for it, ``task.wait()`` too, and its failure
    is an ``ExceptionGroup`` of the chunks' ``RemoteException``s. Unwaited failures are
    reported on stderr, not raised (Julia's behaviour).

    With no workers everything runs on pid 1. Works as a decorator::

        @dx.distributed(range(1, 11), operator.add)
        def total(i):
            return i * i          # total == 385

    Raises:
        TypeError: *iterable* is not a sized, sliceable sequence (a generator, a set):
            materialise it with ``list(...)``.
    """
    seq = _as_sequence(iterable)

    def run(body: Callable[[Any], Any]) -> Any:
        _check_callable(body, "a loop body (a callable of one argument)")
        if reducer is None:
            return _pfor(body, seq)
        return _preduce(reducer, body, seq)

    return run


def _pfor(body: Callable[[Any], Any], seq: Sequence[Any]) -> Task:
    n = len(seq)
    chunks = splitrange(0, n - 1, len(workers())) if n else []
    with _syncscope.suspended():
        futs = [spawnat("any", _pfor_chunk, body, seq[c.start : c.stop]) for c in chunks]
    task = _gather(futs, "distributed loop")
    _syncscope.register(task)
    return task


def _preduce(
    reducer: Callable[[Any, Any], Any], body: Callable[[Any], Any], seq: Sequence[Any]
) -> Any:
    _check_callable(reducer, "a reducer (a callable of two arguments)")
    n = len(seq)
    if n == 0:
        raise ValueError(
            "distributed: cannot reduce an empty collection: there is no initial value "
            "(Julia: reducing over an empty collection is not allowed)"
        )
    ws = workers()
    chunks = splitrange(0, n - 1, len(ws))
    with _syncscope.suspended():
        futs = [
            remotecall(_preduce_chunk, ws[i], reducer, body, seq[c.start : c.stop])
            for i, c in enumerate(chunks)
        ]
    try:
        partials = [f.result() for f in futs]
    except KeyboardInterrupt:
        _interrupt_pending(futs)
        raise
    return functools.reduce(reducer, partials)


# ------------------------------------------------------------------------------ everywhere

_source_ids = itertools.count(1)


def _source_name() -> str:
    return f"<everywhere {myid()}.{next(_source_ids)}>"


def _exec_source(source: str, filename: str, want_value: bool = False) -> Any:
    """Run *source* in ``__main__`` of this process; with *want_value*, return the value of
    a final expression statement (as the REPL shows it)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns = sys.modules["__main__"].__dict__
    tree = ast.parse(source, filename, "exec")
    last: ast.Expression | None = None
    if want_value and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body[-1].value)
        del tree.body[-1]
    exec(compile(tree, filename, "exec"), ns)
    if last is not None:
        return eval(compile(last, filename, "eval"), ns)
    return None


def _run_blob(blob: bytes) -> Any:
    fn, args, kwargs = pickle.loads(blob)
    return fn(*args, **kwargs)


def _define_blob(blob: bytes) -> None:
    _install_in_main(pickle.loads(blob))


def _install_in_main(fn: types.FunctionType) -> None:
    """Bind a by-value copy of *fn* in this process's ``__main__``, resolving its globals there.

    Names it uses that ``__main__`` lacks are defined from the values that came with it
    (modules are imported); names ``__main__`` already has are kept, as when Julia evaluates
    the definition in each process's ``Main`` (except the worker's own functions, which
    a worker's ``__main__`` holds from its start).
    """
    ns = sys.modules["__main__"].__dict__
    for k, v in fn.__globals__.items():
        dunder = k.startswith("__") and k.endswith("__")
        if not dunder and (k not in ns or _is_worker_internal(ns[k])):
            ns[k] = v
    ns[fn.__name__] = _rebind(fn, ns, "__main__")


_WORKER_FILE = os.path.join("distexec", "worker.py")


def _is_worker_internal(value: object) -> bool:
    """A function of ``distexec.worker`` itself, found in a worker's ``__main__``.

    A worker runs as ``python -m distexec.worker``, so its ``__main__`` starts out holding
    the worker's own ``main``, ``parse_args``, ...; a user's ``main`` must win over those.
    """
    return isinstance(value, types.FunctionType) and value.__code__.co_filename.endswith(
        _WORKER_FILE
    )


def _rebind(fn: types.FunctionType, ns: dict[str, Any], module: str) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    new.__dict__.update(fn.__dict__)
    new.__module__ = module
    return new


def _dumps(obj: object, what: str) -> bytes:
    import cloudpickle

    try:
        return cloudpickle.dumps(obj, protocol=5)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(f"everywhere: {what} does not pickle: {exc}") from exc


def _called_as_decorator(fn: object, frame: types.FrameType | None) -> bool:
    """Whether ``everywhere(fn)`` is ``@everywhere`` over a ``def`` (rather than a call).

    Decided by the caller's source line: a decorator line starts with ``@``. Without source
    (an interactive prompt, ``exec``), a ``def`` not yet bound under its own name where it
    is being defined is taken for a decorated one.
    """
    if frame is None:
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    if line:
        return line.lstrip().startswith("@")
    if not isinstance(fn, types.FunctionType) or fn.__name__ == "<lambda>":
        return False
    if fn.__code__.co_filename != frame.f_code.co_filename:
        return False
    name = fn.__name__
    return frame.f_locals.get(name) is not fn and frame.f_globals.get(name) is not fn


def _targets(procs_arg: int | Iterable[int] | None) -> tuple[list[WorkerId], bool]:
    """(pids, single): the processes to run on, and whether *procs* was one int."""
    if procs_arg is None:
        return procs(), False
    if isinstance(procs_arg, bool):
        raise TypeError("procs must be a pid or an iterable of pids, not a bool")
    if isinstance(procs_arg, int):
        return [_check_pid(procs_arg)], True
    if isinstance(procs_arg, (str, bytes)):
        raise TypeError(f"procs must be a pid or an iterable of pids, not {procs_arg!r}")
    return [_check_pid(p) for p in procs_arg], False


def _run_on(
    pids: list[WorkerId],
    run_here: Callable[[], Any],
    remote_fn: Callable[..., Any],
    remote_args: tuple[Any, ...],
    what: str,
) -> None:
    """Run once per occurrence of each pid: here first (in order), then the others
    concurrently; failures raise as one ExceptionGroup of RemoteExceptions."""
    me = myid()
    failures: list[BaseException] = []
    for p in pids:
        if p == me:
            try:
                run_here()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                failures.append(_capture_here(exc))
    futs: list[refs.Future] = []
    try:
        with _syncscope.suspended():
            for p in pids:
                if p != me:
                    try:
                        futs.append(remotecall(remote_fn, p, *remote_args))
                    except SerializationError:
                        raise
                    except Exception as exc:  # the worker died since it was checked
                        failures.append(exc)
        failures.extend(e for e in _wait_all(futs) if e is not None)
    except KeyboardInterrupt:
        _interrupt_pending(futs)
        raise
    if failures:
        raise _group(f"{what}: {len(failures)} of {len(pids)} runs failed", failures)


def everywhere(
    fn_or_source: Callable[..., Any] | str | None = None,
    /,
    *args: Any,
    procs: int | Iterable[int] | None = None,
    **kwargs: Any,
) -> Any:
    """Run code on every process, or (as ``@everywhere``) define a function on every process.

    Julia: ``@everywhere [procs] expr``. Forms:

    * ``everywhere("import json; x = 1")``: Python source, run in ``__main__`` of each
      process (so ``import`` happens everywhere and names are defined there). It is compiled
      here first: a ``SyntaxError`` raises before anything is sent.
    * ``everywhere(fn, *args, **kwargs)``: call ``fn(*args, **kwargs)`` on each process.
    * ``@everywhere`` over a ``def`` (or ``@everywhere(procs=[...])``): define the function,
      by value, in ``__main__`` of each process, so later calls can name it there
      (``remotecall_fetch(lambda: __main__.f(3), w)``, ``everywhere("y = f(3)")``). On the
      other processes its globals resolve in their ``__main__``: names missing there are
      defined from the caller's values, names already there are kept. On this process the
      function itself is bound. Returns the function. Whether ``everywhere(fn)`` is this form
      is read off the caller's source line (a decorator line starts with ``@``); to *run*
      a function from a decorator-like line, write ``everywhere(lambda: fn())``.

    *procs* defaults to ``procs()`` at the time of the call, pid 1 included. This process
    runs first (so its imports and definitions are in place before anyone else's), once per
    occurrence of its pid; then the others run concurrently, once per occurrence (Julia runs
    duplicates repeatedly too). The list form returns ``None`` and raises one
    ``ExceptionGroup`` of ``RemoteException``s when any run failed; a failure on this
    process is wrapped as ``RemoteException(myid(), ...)`` too, so every member says where
    it happened (Julia uses ``TaskFailedException`` for the local one). ``procs=p`` (one
    int) is Julia's ``remotecall_eval(Main, p, ex)``: it returns the value (of the source's
    last expression, or of ``fn``) and raises a plain ``RemoteException``.

    Workers added later do not get earlier definitions (as in Julia); there is no replay:
    run it again with ``procs=new_pids``.

    Raises:
        SyntaxError: *source* does not compile (nothing ran).
        SerializationError: *fn* or its arguments do not pickle (nothing ran).
        ExceptionGroup: some runs failed (list form).
        RemoteException: the run failed (``procs=p``).
        ValueError: a pid in *procs* is unknown.
    """
    if fn_or_source is None:
        if args or kwargs:
            raise TypeError("everywhere(): arguments given but no function or source")
        return lambda fn: _define_everywhere(fn, procs)
    if isinstance(fn_or_source, str):
        if args or kwargs:
            raise TypeError("everywhere(source) takes no arguments; use everywhere(fn, *args)")
        return _eval_everywhere(fn_or_source, procs)
    _check_callable(fn_or_source, "a callable or Python source text")
    if not args and not kwargs and _called_as_decorator(fn_or_source, sys._getframe(1)):
        return _define_everywhere(fn_or_source, procs)
    return _run_everywhere(fn_or_source, args, kwargs, procs)


def _eval_everywhere(source: str, procs_arg: int | Iterable[int] | None) -> Any:
    filename = _source_name()
    compile(source, filename, "exec")  # SyntaxError here, before anything is sent
    pids, single = _targets(procs_arg)
    if single:
        return remotecall_fetch(_exec_source, pids[0], source, filename, True)
    _run_on(
        pids,
        lambda: _exec_source(source, filename),
        _exec_source,
        (source, filename),
        "everywhere",
    )
    return None


def _run_everywhere(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    procs_arg: int | Iterable[int] | None,
) -> Any:
    pids, single = _targets(procs_arg)
    if single:
        return remotecall_fetch(fn, pids[0], *args, **kwargs)
    me = myid()
    blob = (
        _dumps((fn, args, kwargs), "the function or its arguments")
        if any(p != me for p in pids)
        else b""
    )
    _run_on(pids, lambda: fn(*args, **kwargs), _run_blob, (blob,), "everywhere")
    return None


def _define_everywhere(fn: Any, procs_arg: int | Iterable[int] | None) -> Any:
    if not isinstance(fn, types.FunctionType) or fn.__name__ == "<lambda>":
        raise TypeError(
            "@everywhere defines a function made with def (put it above any other "
            f"decorator); got {type(fn).__name__}. For other objects use everywhere(source)"
        )
    pids, single = _targets(procs_arg)
    me = myid()
    main_ns = sys.modules["__main__"].__dict__
    if any(p != me for p in pids):
        blob = _dumps(_rebind(fn, fn.__globals__, "__main__"), f"function {fn.__qualname__}")
    else:
        blob = b""

    def here() -> None:
        main_ns[fn.__name__] = fn

    if single:
        if pids[0] == me:
            here()
        else:
            remotecall_fetch(_define_blob, pids[0], blob)
        return fn
    _run_on(pids, here, _define_blob, (blob,), "everywhere")
    return fn


# ------------------------------------------------------------------------------ clear


def _clear_here(names: tuple[str, ...], module: str) -> None:
    import importlib

    mod = sys.modules.get(module) or importlib.import_module(module)
    for name in names:
        if hasattr(mod, name):
            setattr(mod, name, None)


def clear(
    names: str | Iterable[str],
    pids: int | Iterable[int] | None = None,
    module: str | types.ModuleType = "__main__",
) -> None:
    """Set each global in *names* that exists in *module* to ``None`` on each of *pids*.

    Julia: ``clear!(syms, pids=workers(); mod=Main)``, which frees what those globals held
    (``@everywhere`` data, shipped globals). *pids* defaults to ``workers()`` (``[1]`` with
    no workers); names that are not defined are skipped. Failures raise as one
    ``ExceptionGroup`` of ``RemoteException``s.
    """
    wanted = (names,) if isinstance(names, str) else tuple(names)
    for n in wanted:
        if not isinstance(n, str) or not n.isidentifier():
            raise ValueError(f"clear: {n!r} is not a global name")
    modname = module.__name__ if isinstance(module, types.ModuleType) else module
    if not isinstance(modname, str):
        raise TypeError("module must be a module or a module name")
    if pids is None:
        targets = workers()
    elif isinstance(pids, int) and not isinstance(pids, bool):
        targets = [pids]
    else:
        targets = list(pids)  # type: ignore[arg-type]
    targets = [_check_pid(p) for p in targets]
    _run_on(targets, lambda: _clear_here(wanted, modname), _clear_here, (wanted, modname), "clear")


# ------------------------------------------------------------------------------ timedwait


def timedwait(
    testcb: Callable[[], object],
    secs: float,
    pollint: float = 0.1,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> Literal["ok", "timed_out"]:
    """Poll ``testcb()`` every *pollint* seconds until it is true or *secs* have passed.

    Julia: ``timedwait(testcb, timeout; pollint=0.1)``. Returns ``"ok"`` or
    ``"timed_out"``. It checks once at once, then after each *pollint*. An exception from
    *testcb* propagates: current Julia does the same (old Julia documented an ``:error``
    result but threw the exception anyway), so ``"error"`` is never returned. *clock* and
    *sleep* are for tests.

    Raises:
        ValueError: *pollint* is under a millisecond (Julia's ``ArgumentError``).
    """
    if not pollint >= 1e-3:
        raise ValueError(f"pollint must be at least 1 millisecond, got {pollint}")
    start = clock()
    if testcb():
        return "ok"
    while True:
        sleep(pollint)
        if testcb():
            return "ok"
        if clock() - start > secs:
            return "timed_out"
