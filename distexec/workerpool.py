"""Worker pools: WorkerPool, CachingPool, default_worker_pool, remote.

Layer: L7 pools. Imports: L0-L6.

A pool hands out idle workers and takes them back. A worker that dies or is removed leaves
every pool it was in; new workers join the default pool once they are connected. The
``remotecall`` family accepts a pool wherever it takes a pid: it borrows a worker for the
length of the call. ``CachingPool`` ships each function (with all its closure captures)
once per worker and refers to it by a token after that.
"""

from __future__ import annotations

import abc
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import _cluster, _heartbeat, _timeouts
from ._ids import MASTER, WorkerId
from .errors import ClusterError

_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_pools_lock = threading.Lock()  # guards: _pools


class AbstractWorkerPool(abc.ABC):
    """What every pool offers (Julia's ``AbstractWorkerPool``)."""

    @abc.abstractmethod
    def push(self, pid: WorkerId) -> None:
        """Add worker *pid* to the pool, idle. Julia: ``push!(pool, pid)``."""

    @abc.abstractmethod
    def put(self, pid: WorkerId) -> None:
        """Give a borrowed worker back. Julia: ``put!(pool, pid)``."""

    @abc.abstractmethod
    def take(self, timeout: float | None = None) -> WorkerId:
        """Borrow an idle worker, waiting for one. Julia: ``take!(pool)``."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of workers in the pool (idle or not)."""

    @abc.abstractmethod
    def isready(self) -> bool:
        """Whether a worker is idle now."""

    @abc.abstractmethod
    def workers(self) -> list[WorkerId]:
        """The pool's workers, sorted."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until a worker is idle. Julia: ``wait(pool)``."""
        pid = self.take(timeout)
        self.put(pid)

    # Each call through a pool goes through these, so subclasses can change what is sent.
    def _prepare_fn(self, fn: Callable[..., Any], pid: WorkerId) -> Callable[..., Any]:
        return fn


class WorkerPool(AbstractWorkerPool):
    """A set of workers, each handed out to one caller at a time (Julia's ``WorkerPool``).

    Pickled to another process, a pool arrives there as a pool over the same workers with
    its own idle bookkeeping.

    ``task_timeout`` (seconds) bounds every call made through the pool (``remotecall``,
    ``remotecall_fetch``, ``remotecall_wait``, and ``pmap`` over it): a call that runs longer
    fails with ``TaskTimeoutError`` and its worker is killed, so it leaves the pool. The
    user's own keyword arguments still reach the function untouched. ``remote_do`` gets
    nothing back, so it is not timed.
    """

    def __init__(self, pids: Iterable[WorkerId] = (), *, task_timeout: float | None = None) -> None:
        self._cond = threading.Condition()  # guards: _members, _idle
        self._members: dict[WorkerId, None] = {}
        self._idle: deque[WorkerId] = deque()
        self._is_default = False
        self.task_timeout = _timeouts.check_timeout(task_timeout, "task_timeout")
        for pid in pids:
            self.push(pid)
        with _pools_lock:
            _pools.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self._members),), {"task_timeout": self.task_timeout})

    def __repr__(self) -> str:
        with self._cond:
            return f"<{type(self).__name__} workers={sorted(self._members)} idle={len(self._idle)}>"

    def push(self, pid: WorkerId) -> None:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"a worker id must be an int, not {type(pid).__name__}")
        with self._cond:
            if pid in self._members:
                return
            self._members[pid] = None
            self._idle.append(pid)
            self._cond.notify()

    def put(self, pid: WorkerId) -> None:
        with self._cond:
            if pid in self._members and pid not in self._idle:
                self._idle.append(pid)
                self._cond.notify()

    def _discard(self, pid: WorkerId) -> None:
        with self._cond:
            if self._members.pop(pid, 0) is None:
                try:
                    self._idle.remove(pid)
                except ValueError:
                    pass
                self._cond.notify_all()

    def take(self, timeout: float | None = None) -> WorkerId:
        """Borrow an idle worker. An empty default pool lends pid 1 (the master), as Julia does.

        Raises:
            ClusterError: the pool has no workers at all.
            TimeoutError: none became idle within *timeout*.
        """
        g = _cluster.group()
        with self._cond:
            while True:
                while self._idle:
                    pid = self._idle.popleft()
                    if pid == g.myid or not g.is_removed(pid):
                        return pid
                    self._members.pop(pid, None)  # it died: drop it here as well
                if not self._members:
                    if self._is_default:
                        return g.myid
                    raise ClusterError("No active worker available in pool")
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"no idle worker in {self!r} within {timeout} s")

    def __len__(self) -> int:
        return len(self._members)

    def isready(self) -> bool:
        with self._cond:
            return bool(self._idle) or (self._is_default and not self._members)

    def workers(self) -> list[WorkerId]:
        with self._cond:
            return sorted(self._members)

    def live_workers(self) -> list[WorkerId]:
        """The pool's workers that are still connected (what pmap schedules on)."""
        g = _cluster.group()
        return [p for p in self.workers() if p == g.myid or not g.is_removed(p)]

    # -- the remotecall family through a pool (called from distexec._remotecall)
    def remotecall(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        from ._remotecall import remotecall

        pid = self.take()
        try:
            fut = remotecall(self._prepare_fn(fn, pid), pid, *args, **kwargs)
        except BaseException:
            self.put(pid)
            raise
        fut.add_done_callback(lambda _: self.put(pid))
        timeout = self.task_timeout
        if timeout is not None and pid != _cluster.group().myid:
            entry = _timeouts.pool_deadlines.add(
                timeout, lambda: _expire_future(fut, pid, timeout, fn)
            )
            fut.add_done_callback(lambda _: _timeouts.pool_deadlines.cancel(entry))
        return fut

    def remotecall_fetch(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        from ._remotecall import remotecall_fetch

        pid = self.take()
        try:
            timeout = self.task_timeout
            if timeout is None or pid == _cluster.group().myid:
                return remotecall_fetch(self._prepare_fn(fn, pid), pid, *args, **kwargs)
            if not callable(fn):
                raise TypeError(f"expected a callable to run remotely, got {type(fn).__name__}")
            return _timeouts.call_fetch(pid, self._prepare_fn(fn, pid), args, kwargs, timeout)
        finally:
            self.put(pid)

    def remotecall_wait(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fut = self.remotecall(fn, *args, **kwargs)
        fut.wait()
        return fut

    def remote_do(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        from ._remotecall import remote_do

        pid = self.take()
        try:
            remote_do(self._prepare_fn(fn, pid), pid, *args, **kwargs)
        finally:
            self.put(pid)


def _expire_future(fut: Any, pid: WorkerId, timeout: float, fn: Callable[..., Any]) -> None:
    """A pool call's task timeout passed: kill its worker; the Future gets TaskTimeoutError."""
    if fut.done():
        return
    reason, _ = _timeouts.timeout_reason(
        pid, timeout, _timeouts.describe_call(fn), rrid=getattr(fut, "rrid", None)
    )
    _timeouts.kill_worker(pid, reason)


# ---------------------------------------------------------------------------- CachingPool

_tokens = itertools.count(1)
#: On a worker: token -> function shipped once by a CachingPool.
_fn_cache: dict[tuple[int, int], Callable[..., Any]] = {}


def _cache_register(key: tuple[int, int], fn: Callable[..., Any]) -> Callable[..., Any]:
    _fn_cache[key] = fn
    return fn


def _cache_lookup(key: tuple[int, int]) -> Callable[..., Any]:
    try:
        return _fn_cache[key]
    except KeyError:
        raise ClusterError(
            f"function {key} is no longer cached here (its CachingPool was cleared)"
        ) from None


def _cache_drop(keys: list[tuple[int, int]]) -> None:
    for key in keys:
        _fn_cache.pop(key, None)


_cache_drop.distexec_system = True  # type: ignore[attr-defined]


class _Ship:
    """Pickles as "register this function under *key*"; unpickling (on the worker's reader
    thread, in message order) stores it, so later calls can refer to it by key."""

    __slots__ = ("fn", "key")

    def __init__(self, key: tuple[int, int], fn: Callable[..., Any]) -> None:
        self.key, self.fn = key, fn

    def __reduce__(self) -> tuple[Any, ...]:
        return (_cache_register, (self.key, self.fn))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class _Ref:
    """Pickles as "the function cached under *key*"."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (_cache_lookup, (self.key,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _cache_lookup(self.key)(*args, **kwargs)


class CachingPool(WorkerPool):
    """A WorkerPool that ships each function once per worker (Julia's ``CachingPool``).

    Worth it for closures over large data: 100 calls of a closure capturing a 50 MB array
    move those 50 MB once per worker. ``clear()`` forgets the shipped functions everywhere.
    """

    def __init__(self, pids: Iterable[WorkerId] = (), *, task_timeout: float | None = None) -> None:
        super().__init__(pids, task_timeout=task_timeout)
        self._cache_lock = threading.Lock()  # guards: _shipped
        # id(fn) -> (fn, key, pids that have it); fn is kept alive so its id stays unique.
        self._shipped: dict[int, tuple[Callable[..., Any], tuple[int, int], set[WorkerId]]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (CachingPool, (list(self._members),), {"task_timeout": self.task_timeout})

    def _prepare_fn(self, fn: Callable[..., Any], pid: WorkerId) -> Callable[..., Any]:
        if pid == _cluster.group().myid:
            return fn
        with self._cache_lock:
            entry = self._shipped.get(id(fn))
            if entry is None:
                entry = self._shipped[id(fn)] = (fn, (_cluster.group().myid, next(_tokens)), set())
            _, key, have = entry
            if pid in have:
                return _Ref(key)
            have.add(pid)
        return _Ship(key, fn)

    def clear(self) -> None:
        """Forget every shipped function, here and on the workers. Julia: ``clear!(pool)``."""
        from ._remotecall import remote_do

        with self._cache_lock:
            shipped, self._shipped = self._shipped, {}
        by_pid: dict[WorkerId, list[tuple[int, int]]] = {}
        for _, key, have in shipped.values():
            for pid in have:
                by_pid.setdefault(pid, []).append(key)
        g = _cluster.group()
        for pid, keys in by_pid.items():
            if not g.is_removed(pid):
                try:
                    remote_do(_cache_drop, pid, keys)
                except Exception:
                    pass

    def _discard(self, pid: WorkerId) -> None:
        super()._discard(pid)
        with self._cache_lock:
            for _, _, have in self._shipped.values():
                have.discard(pid)


# ---------------------------------------------------------------------------- default pool

_default: WorkerPool | None = None
_default_lock = threading.Lock()


def default_worker_pool() -> WorkerPool:
    """The pool of all workers, which new workers join once connected.

    Julia: ``default_worker_pool()``. Empty, it lends pid 1 so that calls still run. On a
    worker it is a pool over the workers that pid 1's default pool holds.
    """
    global _default
    with _default_lock:
        if _default is None:
            g = _cluster.group()
            pool = WorkerPool(
                p for p in g.procs() if p != MASTER and not getattr(g.peer(p), "private", False)
            )
            pool._is_default = True
            _default = pool
        return _default


def _on_peer_joined(pid: WorkerId) -> None:
    if pid == MASTER:
        return
    g = _cluster.group()
    peer = g.peer(pid)
    pool = _default
    if pool is not None and g.myid == MASTER and not (peer is not None and peer.private):
        pool.push(pid)


def _on_peer_lost(pid: WorkerId) -> None:
    with _pools_lock:
        pools = list(_pools)
    for pool in pools:
        pool._discard(pid)


def remote(fn: Callable[..., Any], pool: AbstractWorkerPool | None = None) -> Callable[..., Any]:
    """A function that runs *fn* on a worker of *pool* and returns its value.

    Julia: ``remote([pool], f)``; default pool: :func:`default_worker_pool`.
    """
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")

    def call(*args: Any, **kwargs: Any) -> Any:
        p = pool if pool is not None else default_worker_pool()
        return p.remotecall_fetch(fn, *args, **kwargs)  # type: ignore[attr-defined]

    call.__name__ = f"remote({getattr(fn, '__name__', 'fn')})"
    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


_cluster.group().on_peer_joined.append(_on_peer_joined)
_cluster.group().on_peer_lost.append(_on_peer_lost)
_heartbeat.install()  # pid 1 pings its workers and kills those that stop answering
