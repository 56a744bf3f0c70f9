"""Remote references: :class:`Future` and :class:`RemoteChannel`, and the client side of
distributed reference counting.

Layer: L4 refs. Imports: L0-L3, _refstore.

A ``Future`` is a ``concurrent.futures.Future`` whose value lives on process ``where``; its
completion is pushed to the process that made it (and to any process it was passed to), so
``concurrent.futures.wait``, ``as_completed`` and ``asyncio.wrap_future`` work without
polling. Small values come along with that notice; large ones stay with their owner until
someone fetches them. A ``RemoteChannel`` is a handle to a channel living on ``where``.

Both can be passed to any process, as arguments or results. A Future whose value is already
here travels *with its value*, untracked. Any other handle travels as a reference: the
sender registers a transfer token with the owner first (see ``_refstore``), the receiver
claims it, and a process that receives the same reference twice gets the same object back.
Handles that die tell their owner through an ordered queue that finalizers only append to;
a flusher thread, or the next call to that owner, sends the changes in order.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import weakref
from queue import SimpleQueue
from typing import Any

from . import _cluster
from ._ids import RRID, Counter, WorkerId
from ._protocol import codec
from ._protocol.messages import RefsMsg
from ._refstore import RefStore, Token, fetch_owned
from .errors import (
    CapturedException,
    ChannelClosedError,
    ClusterError,
    RemoteException,
)

_NOT_HERE = object()  # result placeholder: the value is ready but stays on its owner
_ref_ids = Counter(1)
_token_ids = Counter(1)

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


def _install(g: _cluster.ProcessGroup) -> RefStore:
    s = RefStore(g)
    g.owner_register = s.register
    g.owner_complete = lambda rrid, creator, ok, value: s.complete(rrid, creator, ok, value)
    g.refs_handler = lambda peer, msg: s.handle_refs(peer.pid, msg)
    g.stats_hook = lambda: (len(s), _client_count())
    g.on_peer_lost.append(s.drop_client_everywhere)
    return s


#: Live handles of this process, by rrid: unpickling a ref we hold gives back the same object.
_handles: weakref.WeakValueDictionary[RRID, Any] = weakref.WeakValueDictionary()
_handles_lock = threading.Lock()  # guards: _handles (check-then-insert)


def _client_count() -> int:
    """Handles here that keep a value alive on another process."""
    me = _cluster.group().myid
    return sum(1 for h in list(_handles.values()) if h._claims > 0 and h.where != me)


# -- ordered reference-count traffic -----------------------------------------------------------
# Finalizers and reader threads append (deque.append and SimpleQueue.put are safe there);
# whoever flushes holds _flush_lock, so the changes for each owner leave in the order made.

_ops: collections.deque[tuple[WorkerId, tuple[Any, ...]]] = collections.deque()
_wake: SimpleQueue[None] = SimpleQueue()
_flush_lock = threading.Lock()  # guards: _pending_ops and the order of sends
_pending_ops: dict[WorkerId, list[tuple[Any, ...]]] = collections.defaultdict(list)
_gc_thread: threading.Thread | None = None
_gc_thread_lock = threading.Lock()


def _enqueue(owner: WorkerId, op: tuple[Any, ...]) -> None:
    _ops.append((owner, op))
    _wake.put(None)
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
        _wake.get()
        while not _wake.empty():
            _wake.get_nowait()
        flush()


def flush(owner: WorkerId | None = None) -> None:
    """Send queued reference-count changes (all, or those for *owner*), in order."""
    g = _cluster.group()
    with _flush_lock:
        while _ops:
            o, op = _ops.popleft()
            _pending_ops[o].append(op)
        owners = list(_pending_ops) if owner is None else [owner]
        for o in owners:
            ops = _pending_ops.pop(o, None)
            if not ops:
                continue
            if o == g.myid:
                store().handle_refs(o, RefsMsg(tuple(ops)))
            else:
                g.send_refs(o, RefsMsg(tuple(ops)))


def _call_owner(where: WorkerId, fn: Any, *args: Any) -> Any:
    """Call *fn* on the owner, after every queued change for it (so a claim precedes a use)."""
    flush(where)
    g = _cluster.group()
    return g.call_fetch(where, fn, args, {})


# -------------------------------------------------------------------- transfers


def _new_token() -> Token:
    return (_cluster.group().myid, _token_ids.next())


def _register_transfer(where: WorkerId, rrid: RRID) -> Token | None:
    """Before a handle leaves this process: make its owner keep the value for the receiver.

    Returns None if the owner no longer keeps it (its value is on its way to us).
    """
    g = _cluster.group()
    token = _new_token()
    if where == g.myid:
        kept = store().add_token(rrid, token, g.myid)
    else:
        kept = _call_owner(where, _sys_add_token, rrid, token, g.myid)
    return token if kept else None


def _undo_transfer(reduced: tuple[Any, ...]) -> None:
    """The message carrying a reduced handle was never sent: its owner may forget the token."""
    rebuild, (where, rrid, token, *_) = reduced
    if rebuild is not _rebuild_settled:
        _drop_token(where, rrid, token)


def _drop_token(where: WorkerId, rrid: RRID, token: Token) -> None:
    if where == _cluster.group().myid:
        store().drop_token(rrid, token)
    else:
        _enqueue(where, ("drop_token", rrid, token))


def _sys_add_token(rrid: RRID, token: Token, sender: WorkerId) -> bool:
    return store().add_token(rrid, token, sender)


def _claim(handle: Any, token: Token, watch: bool) -> None:
    """This process now holds one more count of *handle* (claiming *token* at its owner)."""
    handle._claims += 1
    g = _cluster.group()
    if handle.where == g.myid:
        store().claim(handle.rrid, token, g.myid, watch=False)
    else:
        _enqueue(handle.where, ("claim", handle.rrid, token, watch))


def _interned(rrid: RRID) -> Any:  # Future | RemoteChannel | None
    return _handles.get(rrid)


def _rebuild_future(where: WorkerId, rrid: RRID, token: Token) -> Future:
    """Unpickle a tracked Future handle."""
    with _handles_lock:
        h: Future | None = _interned(rrid)
        if h is None:
            h = Future._handle(where, rrid)
            _handles[rrid] = h
            fresh = True
        else:
            fresh = False
    if h.done() and h._result is not _NOT_HERE:
        _drop_token(where, rrid, token)  # we have its value: the owner need not keep it for us
        return h
    g = _cluster.group()
    if fresh and where != g.myid:
        # Before the claim goes out: its owner may answer it with the value at once, and a
        # DoneMsg for an rrid nobody awaits is dropped.
        g.await_from(where, rrid, h)
    _claim(h, token, watch=fresh)
    if fresh and where == g.myid:
        store().watch_local(rrid, h)
    return h


def _rebuild_settled(where: WorkerId, rrid: RRID, ok: bool, value: object) -> Future:
    """Unpickle a Future that travelled with its value (or its failure): untracked."""
    with _handles_lock:
        h: Future | None = _interned(rrid)
        if h is None:
            h = Future._handle(where, rrid)
            _handles[rrid] = h
    h._complete(ok, value, True, 0)
    return h


def _rebuild_channel(where: WorkerId, rrid: RRID, token: Token) -> RemoteChannel:
    with _handles_lock:
        h: RemoteChannel | None = _interned(rrid)
        if h is None:
            h = RemoteChannel._handle(where, rrid)
            _handles[rrid] = h
    _claim(h, token, watch=False)
    return h


def _release(handle: Any) -> None:
    """A handle dies (or has its own copy now): give all its counts back to the owner."""
    n = handle._claims
    if n <= 0:
        return
    handle._claims = 0
    _enqueue(handle.where, ("del", handle.rrid, n))


# -------------------------------------------------------------------- Future


class Future(cf.Future):  # type: ignore[type-arg]
    """A write-once value that lives on process ``where``; Julia's ``Future``.

    ``Future(pid=None)`` makes an empty Future whose value will live on *pid* (default: this
    process); :meth:`put` sets it once, from any process. ``remotecall`` returns Futures
    already under way. It works with ``concurrent.futures.wait``/``as_completed``,
    ``asyncio.wrap_future``, and ``await``. It can be passed to other processes.
    """

    def __init__(self, pid: WorkerId | None = None) -> None:
        super().__init__()
        g = _cluster.group()
        self.where: WorkerId = g.myid if pid is None else int(pid)
        self.rrid = RRID(g.myid, _ref_ids.next())
        self._claims = 0  # counts this process holds on the owner for this handle
        self._pull_lock = threading.Lock()
        self._pull_error: BaseException | None = None
        self._in_store = False  # a local Future whose value the store also keeps
        if self.where != g.myid:
            # Julia's Future(pid): the value will be put on *pid*; we hold a count there.
            g.check_pid(self.where)
            _call_owner(self.where, _sys_register, self.rrid, g.myid)
            self._claims = 1
            g.await_from(self.where, self.rrid, self)
        with _handles_lock:
            _handles[self.rrid] = self

    @classmethod
    def _handle(cls, where: WorkerId, rrid: RRID) -> Future:
        """A handle to an existing remote value (made when one is unpickled)."""
        self = cls.__new__(cls)
        cf.Future.__init__(self)
        self.where = where
        self.rrid = rrid
        self._claims = 0
        self._pull_lock = threading.Lock()
        self._pull_error = None
        self._in_store = False
        return self

    @classmethod
    def _for_call(cls, pid: WorkerId) -> Future:
        """The Future of a ``remotecall`` to *pid*: the owner counts us once."""
        self = cls.__new__(cls)
        cf.Future.__init__(self)
        g = _cluster.group()
        self.where = pid
        self.rrid = RRID(g.myid, _ref_ids.next())
        self._claims = 1 if pid != g.myid else 0
        self._pull_lock = threading.Lock()
        self._pull_error = None
        self._in_store = False
        with _handles_lock:
            _handles[self.rrid] = self
        return self

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

    # -- pickling: with the value if we have it, else as a tracked reference
    def __reduce__(self) -> tuple[Any, ...]:
        return codec.reduce_once(self, self._reduce, _undo_transfer)  # type: ignore[no-any-return]

    def _reduce(self) -> tuple[Any, ...]:
        with self._condition:
            state, result, exc = self._state, self._result, self._exception
        if state == "FINISHED" and result is not _NOT_HERE:
            if exc is not None:
                return (_rebuild_settled, (self.where, self.rrid, False, exc))
            return (_rebuild_settled, (self.where, self.rrid, True, result))
        if self.where == _cluster.group().myid:
            self._publish()
        token = _register_transfer(self.where, self.rrid)
        if token is None:
            # The owner already sent us the value (it is in flight): send it along instead.
            from . import _config

            exc = self.exception(timeout=_config.worker_timeout())
            if exc is not None:
                return (_rebuild_settled, (self.where, self.rrid, False, exc))
            return (_rebuild_settled, (self.where, self.rrid, True, self.result()))
        return (_rebuild_future, (self.where, self.rrid, token))

    def _publish(self) -> None:
        """A Future owned here is about to be shared: let the store keep (and serve) it."""
        with self._condition:
            if self._in_store:
                return
            self._in_store = True
        s = store()
        s.register(self.rrid, _cluster.group().myid)
        self._claims += 1
        self.add_done_callback(_publish_done)

    # -- completion, called by the cluster's reader or a local runner
    def _complete(self, ok: bool, value: object, inline: bool, dropped: int = 0) -> None:
        # *dropped*: counts the owner gave up for us when it sent this (-1: all; it is gone).
        if dropped:
            self._claims = 0 if dropped < 0 else max(0, self._claims - dropped)
        try:
            if not ok:
                self.set_exception(value)  # type: ignore[arg-type]
            elif inline:
                self.set_result(value)
            else:
                self.set_result(_NOT_HERE)
        except cf.InvalidStateError:
            pass  # cancelled or already set

    def result(self, timeout: float | None = None) -> Any:
        """The value, pulling it from its owner the first time if it stayed there."""
        if not self.done():
            _cluster.before_block()  # a link's reader waiting: its answer may come on that link
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
            release, self._claims = self._claims, 0
            try:
                if self.where == g.myid:
                    ok, value = fetch_owned(store(), self.rrid, g.myid, release)
                else:
                    ok, value = _call_owner(self.where, _sys_fetch_ref, self.rrid, g.myid, release)
            except BaseException as exc:
                self._pull_error = exc  # the owner let go of it: this answer is final
                raise
            if not ok:
                self._pull_error = value  # type: ignore[assignment]
                raise value  # type: ignore[misc]
            self._result = value
            return value

    def __del__(self) -> None:
        if getattr(self, "_claims", 0) > 0:
            _release(self)

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
        """Set the value; a Future is set only once, from whichever process.

        Julia: ``put!(f::Future, v)``.
        """
        g = _cluster.group()
        if self.where != g.myid:
            if self.done():
                raise ClusterError(f"Future {self.rrid} can be set only once")
            try:
                _call_owner(self.where, _sys_put_future, self.rrid, value)
            except RemoteException as exc:
                if isinstance(exc.captured.ex, ClusterError):
                    raise exc.captured.ex from exc
                raise
            # The owner pushes the value back to us like any completion.
            return self
        with self._condition:
            if self._state not in ("PENDING", "RUNNING"):
                raise ClusterError(f"Future {self.rrid} can be set only once")
        if self._in_store or store().lookup(self.rrid) is not None:
            _sys_put_future(self.rrid, value)
        try:
            self.set_result(value)
        except cf.InvalidStateError:
            raise ClusterError(f"Future {self.rrid} can be set only once") from None
        return self

    def take(self) -> None:
        raise TypeError("take() is for channels; a Future is read with fetch()")

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self).__await__()


def _publish_done(fut: cf.Future[Any]) -> None:
    assert isinstance(fut, Future)
    exc = fut.exception()
    s = store()
    rv = s.lookup(fut.rrid)
    if rv is not None and rv.ready:
        return
    if exc is not None:
        s.complete(fut.rrid, -1, False, exc)
    else:
        s.complete(fut.rrid, -1, True, fut._result)


def _sys_fetch_ref(rrid: RRID, client: WorkerId, release: int) -> tuple[bool, object]:
    """On the owner: the stored value of *rrid* as ``(ok, value)``."""
    return fetch_owned(store(), rrid, client, release)


def _sys_register(rrid: RRID, client: WorkerId) -> None:
    """On the owner: *client* made ``Future(owner)``; count it and tell it when it is set."""
    s = store()
    s.register(rrid, client)
    s.watch(rrid, client)


def _sys_put_future(rrid: RRID, value: object) -> None:
    s = store()
    rv = s.lookup(rrid)
    if rv is not None and rv.ready:
        raise ClusterError(f"Future {rrid} can be set only once")
    local = _interned(rrid)
    s.complete(rrid, -1, True, value)
    if local is not None and isinstance(local, Future) and not local.done():
        local._complete(True, value, True, 0)


def run_local(fut: Future, fn: Any, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    """Run a call aimed at this very process and complete *fut* the way a remote one would."""
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        fut._complete(False, RemoteException(fut.where, CapturedException.capture(exc)), True, 0)
        return
    fut._complete(True, value, True, 0)


# -------------------------------------------------------------------- RemoteChannel


class RemoteChannel:
    """A handle, usable from every process, to a channel that lives on process ``where``.

    Julia: ``RemoteChannel(pid)`` (a ``Channel(1)`` made on *pid* at once) and
    ``RemoteChannel(f, pid)`` (*factory* builds it on *pid* now; it may return any object
    with the channel methods). ``put`` blocks while the channel is full and ``take`` while it
    is empty, without holding up other calls on the owner.
    """

    __slots__ = ("__weakref__", "_claims", "rrid", "where")

    def __init__(self, factory: Any = None, pid: WorkerId | None = None) -> None:
        g = _cluster.group()
        if pid is None and isinstance(factory, int) and not isinstance(factory, bool):
            factory, pid = None, factory  # RemoteChannel(pid)
        if factory is not None and not callable(factory):
            raise TypeError("RemoteChannel(factory, pid): factory must be callable")
        self.where: WorkerId = g.myid if pid is None else g.check_pid(pid)
        self.rrid = RRID(g.myid, _ref_ids.next())
        self._claims = 0
        if self.where == g.myid:
            store().register_channel(self.rrid, g.myid, factory)
        else:
            _call_owner(self.where, _sys_chan_register, self.rrid, g.myid, factory)
        self._claims = 1
        with _handles_lock:
            _handles[self.rrid] = self

    @classmethod
    def _handle(cls, where: WorkerId, rrid: RRID) -> RemoteChannel:
        self = cls.__new__(cls)
        self.where, self.rrid, self._claims = where, rrid, 0
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return codec.reduce_once(self, self._reduce, _undo_transfer)  # type: ignore[no-any-return]

    def _reduce(self) -> tuple[Any, ...]:
        token = _register_transfer(self.where, self.rrid)
        if token is None:
            raise ClusterError(f"{self!r} is no longer known on its owner")
        return (_rebuild_channel, (self.where, self.rrid, token))

    def __repr__(self) -> str:
        return f"<RemoteChannel where={self.where} rrid={self.rrid}>"

    def __del__(self) -> None:
        if getattr(self, "_claims", 0) > 0:
            _release(self)

    def _op(self, op: str, *args: Any) -> Any:
        g = _cluster.group()
        if self.where == g.myid:
            return _chan_op(self.rrid, op, args)
        try:
            return _call_owner(self.where, _sys_chan_op, self.rrid, op, args)
        except RemoteException as exc:
            inner = exc.captured.ex
            if isinstance(inner, (ChannelClosedError, TimeoutError)):
                raise inner from exc
            raise

    def put(self, value: Any, timeout: float | None = None) -> RemoteChannel:
        """Put *value* into the channel, waiting while it is full; returns the channel.

        Julia: ``put!(rr, v)`` ("Return the first argument").
        """
        self._op("put", value, timeout)
        return self

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return an item, waiting while it is empty. Julia: ``take!(rr)``."""
        return self._op("take", timeout)

    def fetch(self, timeout: float | None = None) -> Any:
        """Return the next item without removing it. Julia: ``fetch(rr)``."""
        return self._op("fetch", timeout)

    def isready(self) -> bool:
        """Whether an item is waiting (asks the owner). Julia: ``isready(rr)``."""
        return bool(self._op("isready"))

    def wait(self, timeout: float | None = None) -> None:
        """Wait until an item is available. Julia: ``wait(rr)``."""
        self._op("wait", timeout)

    def close(self) -> None:
        """Close the channel: puts fail, takes drain what is left. Julia: ``close(rr)``."""
        self._op("close")

    def __iter__(self) -> Any:
        while True:
            try:
                yield self.take()
            except ChannelClosedError:
                return


def _chan_op(rrid: RRID, op: str, args: tuple[Any, ...]) -> Any:
    chan = store().channel(rrid)
    if op in ("put", "take", "fetch", "wait"):
        *rest, timeout = args
        if timeout is None:
            return getattr(chan, op)(*rest)
        return getattr(chan, op)(*rest, timeout=timeout)
    return getattr(chan, op)(*args)


def _sys_chan_op(rrid: RRID, op: str, args: tuple[Any, ...]) -> Any:
    result = _chan_op(rrid, op, args)
    return None if op == "put" else result


def _sys_chan_register(rrid: RRID, client: WorkerId, factory: Any) -> None:
    store().register_channel(rrid, client, factory)


def remoteref_id(r: Future | RemoteChannel) -> RRID:
    """The id of a Future or RemoteChannel. Julia: ``remoteref_id(r)``."""
    return r.rrid


def channel_from_id(rrid: RRID) -> Any:
    """The channel object behind a RemoteChannel, on its owner. Julia: ``channel_from_id(id)``.

    Raises:
        ClusterError: this process does not hold it ("Local instance of remote reference
            not found").
    """
    return store().channel(rrid, create=False)


for _f in (
    _sys_fetch_ref,
    _sys_put_future,
    _sys_register,
    _sys_add_token,
    _sys_chan_register,
):
    setattr(_f, "distexec_system", True)  # noqa: B010 - a mark on several function types

# The owner side must be wired before the first message can arrive, on every process.
store()
