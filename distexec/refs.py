"""Remote references: :class:`Future` (and the client side of reference counting).

Layer: L4 refs. Imports: L0-L3, _refstore.

A ``Future`` is a ``concurrent.futures.Future`` whose value lives on process ``where``.
Its completion is pushed to the process that made it, so ``concurrent.futures.wait``,
``as_completed`` and ``asyncio.wrap_future`` work without polling. Small values come along
with that notice; large ones stay with their owner until :meth:`Future.fetch` pulls them.
Handles that are dropped unfetched tell the owner through a queue that finalizers only
append to; a flusher thread batches those messages per owner.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import defaultdict
from queue import SimpleQueue
from typing import Any

from . import _cluster
from ._cluster import ProcessGroup
from ._ids import RRID, Counter, WorkerId
from ._protocol.messages import RefsMsg
from ._refstore import RefStore, fetch_owned
from .errors import ClusterError, RemoteException

_NOT_HERE = object()  # result placeholder: the value is ready but stays on its owner
_ref_ids = Counter(1)

# -------------------------------------------------------------------- process-wide state

_STORE: RefStore | None = None
_STORE_LOCK = threading.Lock()


def store() -> RefStore:
    """The values this process owns for remote handles (made and wired on first use)."""
    global _STORE
    s = _STORE
    if s is None:
        with _STORE_LOCK:
            if _STORE is None:
                _STORE = _install(_cluster.group())
            s = _STORE
    return s


def _install(g: ProcessGroup) -> RefStore:
    s = RefStore(g)
    g.owner_register = s.register
    g.owner_complete = lambda rrid, creator, ok, value: s.complete(rrid, creator, ok, value)
    g.refs_handler = lambda peer, msg: s.handle_refs(peer.pid, msg)
    g.stats_hook = lambda: (len(s), _client_count())
    g.on_peer_lost.append(s.drop_client_everywhere)
    return s


# Client handles that still count on an owner: id(handle) is enough, the GC queue does the rest.
_clients_lock = threading.Lock()  # guards: _client_refs
_client_refs: dict[RRID, int] = {}


def _client_count() -> int:
    return len(_client_refs)


def _client_add(rrid: RRID) -> None:
    with _clients_lock:
        _client_refs[rrid] = _client_refs.get(rrid, 0) + 1


def _client_release(rrid: RRID) -> None:
    with _clients_lock:
        n = _client_refs.get(rrid, 0) - 1
        if n > 0:
            _client_refs[rrid] = n
        else:
            _client_refs.pop(rrid, None)


# Finalizers put (owner, rrid, client) here and nothing else; a thread sends the batches.
_gc_queue: SimpleQueue[tuple[WorkerId, RRID, WorkerId] | None] = SimpleQueue()
_gc_thread: threading.Thread | None = None
_gc_thread_lock = threading.Lock()


def _enqueue_del(owner: WorkerId, rrid: RRID, client: WorkerId) -> None:
    _gc_queue.put((owner, rrid, client))
    if _gc_thread is None:
        _start_gc_thread()


def _start_gc_thread() -> None:
    global _gc_thread
    with _gc_thread_lock:
        if _gc_thread is None:
            _gc_thread = threading.Thread(target=_gc_loop, name="distexec-refs", daemon=True)
            _gc_thread.start()


def _gc_loop() -> None:
    while True:
        item = _gc_queue.get()
        batch: dict[WorkerId, list[tuple[RRID, WorkerId]]] = defaultdict(list)
        while item is not None:
            owner, rrid, client = item
            batch[owner].append((rrid, client))
            if _gc_queue.empty():
                break
            item = _gc_queue.get()
        g = _cluster.group()
        for owner, dels in batch.items():
            for rrid, _ in dels:
                _client_release(rrid)
            if owner == g.myid:
                for rrid, client in dels:
                    store().drop(rrid, client)
            else:
                g.send_refs(owner, RefsMsg((), tuple(dels)))
        if item is None and _gc_queue.empty():
            continue


# -------------------------------------------------------------------- Future


class Future(cf.Future):  # type: ignore[type-arg]
    """A write-once value that lives on process ``where``; Julia's ``Future``.

    ``Future(pid=None)`` makes an empty Future whose value will live on *pid* (default: this
    process); :meth:`put` sets it once. ``remotecall`` returns Futures already under way.
    Being a ``concurrent.futures.Future``, it works with ``wait``, ``as_completed`` and
    ``asyncio.wrap_future``, and ``await`` works on it directly.
    """

    def __init__(self, pid: WorkerId | None = None) -> None:
        super().__init__()
        g = _cluster.group()
        self.where: WorkerId = g.myid if pid is None else pid
        self.rrid = RRID(g.myid, _ref_ids.next())
        self._owner_holds = False  # the owner keeps a copy counted for us
        self._pull_lock = threading.Lock()
        self._pull_error: BaseException | None = None

    # Julia field names
    @property
    def whence(self) -> int:
        return self.rrid.whence

    @property
    def id(self) -> int:
        return self.rrid.id

    def __repr__(self) -> str:
        with self._condition:
            state = self._state.lower()
        return f"<Future where={self.where} rrid={self.rrid} state={state}>"

    # -- completion, called by the cluster's reader or a local runner
    def _complete(self, ok: bool, value: object, inline: bool) -> None:
        try:
            if not ok:
                self.set_exception(value)  # type: ignore[arg-type]
            elif inline:
                self.set_result(value)
            else:
                self._owner_holds = True
                _client_add(self.rrid)
                self.set_result(_NOT_HERE)
        except cf.InvalidStateError:
            pass  # cancelled or already set

    def result(self, timeout: float | None = None) -> Any:
        """The value, pulling it from its owner the first time if it stayed there."""
        value = super().result(timeout)
        if value is _NOT_HERE:
            value = self._pull()
        return value

    def _pull(self) -> object:
        with self._pull_lock:
            if self._result is not _NOT_HERE:
                return self._result
            if self._pull_error is not None:
                raise self._pull_error
            g = _cluster.group()
            try:
                ok, value = g.call_fetch(  # type: ignore[misc]
                    self.where, _sys_fetch_ref, (self.rrid, g.myid, True), {}
                )
            except BaseException as exc:
                self._pull_error = exc  # the owner let go of it: this answer is final
                raise
            finally:
                # Asked with release=True: the owner no longer counts us, whatever came back.
                with self._condition:
                    self._owner_holds = False
                _client_release(self.rrid)
            if not ok:
                raise value  # type: ignore[misc]
            self._result = value
            return value

    def __del__(self) -> None:
        if getattr(self, "_owner_holds", False):
            _enqueue_del(self.where, self.rrid, _cluster.group().myid)

    # -- Julia API
    def fetch(self, timeout: float | None = None) -> Any:
        """Wait for the value and return it; cached after the first fetch.

        Julia: ``fetch(f::Future)``. Raises ``RemoteException`` if the call failed there.
        """
        return self.result(timeout)

    def wait(self, timeout: float | None = None) -> Future:
        """Wait until the value is ready (without fetching it); raise if the call failed.

        Julia: ``wait(f::Future)``.
        """
        exc = self.exception(timeout)
        if exc is not None:
            raise exc
        return self

    def isready(self) -> bool:
        """Whether the value is ready (Julia: ``isready(f)``); never blocks."""
        return self.done()

    def is_ready(self) -> bool:
        """Alias of :meth:`isready`."""
        return self.done()

    def put(self, value: object) -> Future:
        """Set the value; a Future is set only once. Julia: ``put!(f::Future, v)``."""
        g = _cluster.group()
        if self.where != g.myid:
            g.call_fetch(self.where, _sys_put_future, (self.rrid, value), {})
        with self._condition:
            if self._state != "PENDING" and self._state != "RUNNING":
                raise ClusterError(f"Future {self.rrid} can be set only once")
            self._result = value
            self._state = "FINISHED"
            for waiter in self._waiters:
                waiter.add_result(self)
            self._condition.notify_all()
        self._invoke_callbacks()
        return self

    def take(self) -> None:
        raise TypeError("take() is for channels; a Future is read with fetch()")

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self).__await__()


def _sys_fetch_ref(rrid: RRID, client: WorkerId, release: bool) -> tuple[bool, object]:
    """On the owner: the stored value of *rrid* as ``(ok, value)``."""
    return fetch_owned(store(), rrid, client, release)


def _sys_put_future(rrid: RRID, value: object) -> None:
    s = store()
    rv = s.lookup(rrid)
    if rv is not None and rv.ready:
        raise ClusterError(f"Future {rrid} can be set only once")
    s.register(rrid, rrid.whence)
    s.complete(rrid, -1, True, value)


def run_local(fut: Future, fn: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    """Run a call aimed at this very process and complete *fut* the way a remote one would."""
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        from .errors import CapturedException

        fut._complete(False, RemoteException(fut.where, CapturedException.capture(exc)), True)
        return
    fut._complete(True, value, True)


for _f in (_sys_fetch_ref, _sys_put_future):
    _f.distexec_system = True  # type: ignore[attr-defined]

# The owner side must be wired before the first message can arrive, on every process.
store()
