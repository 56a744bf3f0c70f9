"""Turn messages into frames and back: cloudpickle, protocol 5, large buffers out of band.

Layer: L2 protocol. Imports: stdlib, cloudpickle (lazily), distexec.errors, messages,
transport.framing.
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from .. import _config
from .._transport import framing
from ..errors import SerializationError
from . import byvalue, messages, names
from .messages import MSG_TYPES, CallMsg, Message

#: Buffers smaller than this stay in the pickle stream: a frame of their own costs more.
OOB_MIN_BYTES = 64 * 1024


def dumps(obj: object, call: bool = False) -> tuple[bytes, list[memoryview]]:
    """Pickle *obj*, returning the stream and its out-of-band buffers.

    The C pickler goes first: it is three times faster than cloudpickle and gives the same
    bytes for everything importable. Its output is kept unless it names ``__main__`` (or a
    module registered for pickling by value), the one case where pickling by reference would
    not work on the other side; anything else cloudpickle handles (lambdas, local classes)
    makes the C pickler fail. Then the functions of ``__main__`` in it (lambdas and closures
    too) are replaced by their cached pickles (:mod:`byvalue`), if they all have one and
    nothing else needs cloudpickle; otherwise cloudpickle pickles the whole of it by value.

    *call*: *obj* is a call's fields (``encode`` of a :class:`CallMsg`), whose function
    slot may then hold the function's cached pickle itself (``decode`` knows it by its type).

    Raises:
        SerializationError: *obj* cannot be pickled; the original error is the cause.
    """
    ctx = _Pickling()
    outer = getattr(_local, "ctx", None)  # a reduce may itself call a peer (and pickle)
    _local.ctx = ctx
    try:
        return _dumps(obj, call)
    except BaseException:
        ctx.abandon()
        raise
    finally:
        _local.ctx = outer


class _Pickling:
    """What one :func:`dumps` call has reduced so far, across its two pickling passes.

    Reducing a Future or RemoteChannel has an effect elsewhere (its owner is told to keep the
    value for the receiver). The C pass and the cloudpickle pass must then reduce each handle
    to the same thing, once; and if the message is never sent, the effect must be undone.
    """

    __slots__ = ("memo", "undo")

    def __init__(self) -> None:
        # Made by the first handle reduced: most messages carry none, and every dumps() makes
        # one of these.
        self.memo: dict[int, tuple[object, Any]] | None = None
        self.undo: list[Callable[[], None]] | None = None

    def abandon(self) -> None:
        undo, self.undo = self.undo, None
        for fn in undo or ():
            try:
                fn()
            except Exception:  # pragma: no cover - undo is best effort (a peer may be gone)
                pass


_local = threading.local()


def reduce_once(obj: object, make: Callable[[], Any], undo: Callable[[Any], None]) -> Any:
    """``make()`` the first time *obj* is reduced in the current :func:`dumps`, the same
    value again after that; ``undo(value)`` runs if that message is never sent
    (see :func:`abandon`). Outside :func:`dumps` (plain ``pickle.dumps``) it just makes."""
    ctx: _Pickling | None = getattr(_local, "ctx", None)
    if ctx is None:
        return make()
    if ctx.memo is None or ctx.undo is None:
        ctx.memo, ctx.undo = {}, []
    hit = ctx.memo.get(id(obj))
    if hit is not None:
        return hit[1]
    value = make()
    ctx.memo[id(obj)] = (obj, value)  # holding *obj* keeps its id from being reused meanwhile
    ctx.undo.append(lambda: undo(value))
    return value


def _dumps(obj: object, call: bool = False) -> tuple[bytes, list[memoryview]]:
    buffers: list[memoryview] = []

    def keep_out_of_band(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        buffers.append(raw)
        return False

    main = _main_call(obj, call)
    if main is None:  # the common case: everything pickles by reference
        try:
            body = pickle.dumps(obj, 5, buffer_callback=keep_out_of_band)
        except (Exception, SystemExit):  # a __reduce__ that exits: user code failing to pickle
            pass  # a lambda or a closure of __main__, or something only cloudpickle can do
        else:
            if _BY_VALUE_MARK not in body and _PIPE_MARK not in body and not _by_value_modules():
                return body, buffers
        buffers.clear()
    elif main is not _UNCACHED and not _by_value_modules():
        # A call of a __main__ function with a cached pickle: the C pickler, as is, with
        # the function swapped for its pickle, if nothing else in the call names __main__.
        swapped, blob = main
        try:
            body = pickle.dumps(swapped, 5, buffer_callback=keep_out_of_band)
        except (Exception, SystemExit):
            pass
        else:
            if body.count(_BY_VALUE_MARK) == blob.count(_BY_VALUE_MARK) and _PIPE_MARK not in body:
                return body, buffers
        buffers.clear()
    if main is not _UNCACHED and (cached := _dumps_cached(obj, keep_out_of_band)) is not None:
        return cached, buffers
    buffers.clear()
    try:
        out = io.BytesIO()
        _cloud_pickler()(out, protocol=5, buffer_callback=keep_out_of_band).dump(obj)
        body = out.getvalue()
    except (Exception, SystemExit) as exc:
        raise SerializationError(
            f"cannot pickle {_describe(obj)}: {type(exc).__name__}: {exc}"
        ) from exc
    return body, buffers


_BY_VALUE_MARK = b"__main__"
#: The C pickler pickles a multiprocessing Connection as its descriptor's number, which in
#: another process is some other file: a body that names the class goes the slow way, where
#: the connection is reduced properly (see _MPReducers).
_PIPE_MARK = b"multiprocessing.connection"


#: A call of a __main__ function that has no cached pickle (yet).
_UNCACHED: tuple[object, bytes] = (None, b"")


class _Pickled:
    """A by-value function in a message, as its cached pickle (see :mod:`byvalue`)."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self) -> tuple[Callable[[bytes], Any], tuple[bytes]]:
        return byvalue.load, (self.blob,)


def _main_call(obj: object, call: bool = False) -> tuple[object, bytes] | None:
    """For a call (``(fn, args, ...)``) of a function of ``__main__``, directly or through a
    wrapper that gets it as its first argument (``_run_batch``, for batches): the call with
    the function swapped for its cached pickle, and that pickle; ``_UNCACHED`` if it has
    none (yet: then cloudpickle takes the whole call). None for anything else. In a call's
    own function slot (*call*) the pickle goes as it is, not wrapped in a reduce."""
    if type(obj) is not tuple or not obj:
        return None
    if _is_main(obj[0]):
        blob = byvalue.blob_for(obj[0])
        if blob is None:
            return _UNCACHED
        return ((blob if call else _Pickled(blob)), *obj[1:]), blob
    args = obj[1] if len(obj) > 1 else None
    if type(args) is not tuple or not args or not _is_main(args[0]):
        return None
    blob = byvalue.blob_for(args[0])
    if blob is None:
        return _UNCACHED
    return (obj[0], (_Pickled(blob), *args[1:]), *obj[2:]), blob


def _is_main(fn: object) -> bool:
    return type(fn) is types.FunctionType and fn.__module__ == "__main__"


class _Uncached(Exception):
    """A function of ``__main__`` has no cached pickle (yet): cloudpickle the message."""


class _MPReducers:
    """Reduces multiprocessing's locks, semaphores and conditions by the name of their
    semaphores, which another process on this machine opens (``sem_open``); and its pipes
    (``Connection``) and queues by passing their file descriptors.

    Pickled alone they insist on process inheritance (``assert_spawning``): a multiprocessing
    child gets them as it is spawned. A worker here is no child of multiprocessing, but the
    named semaphore is the same object for any process that opens it, which is all that
    inheritance gives the spawn and forkserver start methods. One made for fork has no name
    (its name is unlinked at once): that one is refused, with the reason. A pipe's
    descriptor goes through multiprocessing's resource sharer (a local socket that passes
    descriptors to a process holding this process's multiprocessing authkey, as local
    workers do), as multiprocessing itself sends one to a running process.
    """

    _table: dict[Any, Any] | None = None
    _chained: collections.ChainMap[Any, Any] | None = None

    @classmethod
    def with_copyreg(cls) -> collections.ChainMap[Any, Any]:
        """The table in front of ``copyreg``'s (a live view: later registrations count)."""
        if cls._chained is None:
            base: Any = copyreg.dispatch_table
            cls._chained = collections.ChainMap(cls.table(), base)
        return cls._chained

    @classmethod
    def table(cls) -> dict[Any, Any]:
        if cls._table is None:
            import importlib
            import multiprocessing.synchronize as sync

            semlocks = (sync.Lock, sync.RLock, sync.Semaphore, sync.BoundedSemaphore)
            table: dict[Any, Any] = dict.fromkeys(semlocks, _reduce_semlock)
            table[sync.Condition] = _reduce_condition
            import multiprocessing.connection as mpc
            import multiprocessing.queues as mpq

            table[mpc.Connection] = _reduce_connection
            for queue in (mpq.Queue, mpq.JoinableQueue, mpq.SimpleQueue):
                table[queue] = _reduce_queue
            # Its methods (``sem.acquire`` is the C object's) pickle the C object itself.
            table[importlib.import_module("_multiprocessing").SemLock] = _reduce_c_semlock
            cls._table = table
        return cls._table


def _semlock_state(sl: Any, what: str) -> tuple[object, ...]:
    import sys

    if sl.name is None or sys.platform == "win32":
        raise RuntimeError(
            f"a multiprocessing {what} made for the fork start method can only be shared "
            "with forked children; make it with multiprocessing.get_context('spawn') or "
            "'forkserver' to pass it to a worker"
        )
    return (sl.handle, sl.kind, sl.maxvalue, sl.name)


def _reduce_semlock(obj: Any) -> Any:
    return _restore, (type(obj), _semlock_state(obj._semlock, type(obj).__name__))


def _reduce_c_semlock(obj: Any) -> Any:
    return type(obj)._rebuild, _semlock_state(obj, "lock or semaphore")


def _reduce_condition(obj: Any) -> Any:
    state = (obj._lock, obj._sleeping_count, obj._woken_count, obj._wait_semaphore)
    return _restore, (type(obj), state)


def _reduce_connection(conn: Any) -> Any:
    from multiprocessing import reduction

    _config.install_mp_authkey()  # the resource sharer serves holders of this process's key
    # Once per message however often it is pickled, and given back if the message is not.
    dup = reduce_once(conn, lambda: reduction.DupFd(conn.fileno()), _unshare)
    return _rebuild_connection, (dup, conn.readable, conn.writable)


def _rebuild_connection(dup: Any, readable: bool, writable: bool) -> object:
    """Fetch the descriptor from the sender's resource sharer (with the master's authkey:
    local workers have it, installed by :func:`loads`) and wrap it, as
    ``multiprocessing.connection`` does."""
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Connection

    try:
        fd = dup.detach()
    except (AuthenticationError, OSError) as exc:
        why = (
            "does not hold that authkey"
            if isinstance(exc, AuthenticationError)
            else "cannot reach the sender's resource sharer (as on another host)"
        )
        raise RuntimeError(
            "a multiprocessing pipe or queue reaches only local workers (LocalManager's, "
            f"which hold the master's multiprocessing authkey); this process {why}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return Connection(fd, readable, writable)


def _unshare(dup: Any) -> None:
    """Close a descriptor offered to the resource sharer for a message never sent."""
    from multiprocessing import resource_sharer

    sharer: Any = resource_sharer._resource_sharer  # type: ignore[attr-defined]
    with sharer._lock:
        entry = sharer._cache.pop(dup._id[1], None)
    if entry is not None:
        entry[1]()


def _reduce_queue(queue: Any) -> Any:
    import multiprocessing.queues

    mpq: Any = multiprocessing.queues  # (typed: the attributes below are not in the stubs)

    if type(queue) is mpq.SimpleQueue:
        state: tuple[object, ...] = (queue._reader, queue._writer, queue._rlock, queue._wlock)
    else:
        state = (
            queue._ignore_epipe,
            queue._maxsize,
            queue._reader,
            queue._writer,
            queue._rlock,
            queue._wlock,
            queue._sem,
            queue._opid,
        )
        if type(queue) is mpq.JoinableQueue:
            state += (queue._cond, queue._unfinished_tasks)
    return _restore, (type(queue), state)


def _restore(cls: Any, state: tuple[object, ...]) -> object:
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


_CloudPickler: type | None = None


def _cloud_pickler() -> type:
    """cloudpickle's pickler, also taking multiprocessing's named semaphores (made once)."""
    global _CloudPickler
    if _CloudPickler is None:
        import collections

        import cloudpickle  # here: a process that never pickles by value never imports it

        base: Any = cloudpickle.CloudPickler.dispatch_table

        class CloudPickler(cloudpickle.CloudPickler):  # type: ignore[misc]
            # (a class attribute, as cloudpickle's own: the C pickler reads it at __init__)
            dispatch_table: ClassVar[Any] = collections.ChainMap(_MPReducers.table(), base)

        _CloudPickler = CloudPickler
    return _CloudPickler


class _CachedPickler(pickle.Pickler):
    """The C pickler, with each function pickled by value (of ``__main__``, or of a module
    registered for it) replaced by its cached pickle."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], bool]):
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self.blobs: list[bytes] = []
        self.dispatch_table = _MPReducers.with_copyreg()

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.FunctionType:
            module = obj.__module__
            if type(module) is str and byvalue.by_value(module):
                blob = byvalue.blob_for(obj)
                if blob is None:
                    raise _Uncached
                self.blobs.append(blob)
                return byvalue.load, (blob,)
        elif _by_value_modules() and isinstance(obj, type) and byvalue.by_value(obj.__module__):
            raise _Uncached  # a class of a module pickled by value ("__main__" is counted)
        return NotImplemented


def _dumps_cached(
    obj: object, buffer_callback: Callable[[pickle.PickleBuffer], bool]
) -> bytes | None:
    """*obj* pickled with the cached pickles of its by-value functions; None if one has none,
    or if something else in it must be pickled by value (a class of ``__main__``, ...)."""
    out = io.BytesIO()
    pickler = _CachedPickler(out, buffer_callback)
    try:
        pickler.dump(obj)
    except (Exception, SystemExit):  # _Uncached, or whatever cloudpickle will report again
        return None
    body = out.getvalue()
    # Each blob is written once (pickle memoizes it); any other "__main__" is something the
    # C pickler named by reference, which the receiver could not import.
    if body.count(_BY_VALUE_MARK) != sum(b.count(_BY_VALUE_MARK) for b in pickler.blobs):
        return None
    return body


_by_value_modules = byvalue.any_registered


def _describe(obj: object) -> str:
    if isinstance(obj, tuple) and obj and callable(obj[0]):
        fn = obj[0]
        return f"the call to {getattr(fn, '__qualname__', repr(fn))!s} (its function or arguments)"
    return f"a {type(obj).__qualname__}"


def loads(body: memoryview | bytes, buffers: Sequence[memoryview] = ()) -> object:
    """Unpickle a body produced by :func:`dumps` (may run arbitrary reduce code: callers catch)."""
    if _config.mp_authkey is not None and _mentions_multiprocessing(body):
        # Rebuilding a Manager's proxy or a pipe asks multiprocessing for this process's
        # authkey: a local worker takes the master's first (see _config.mp_authkey).
        _config.install_mp_authkey()
    return pickle.loads(body, buffers=buffers)


def _mentions_multiprocessing(body: memoryview | bytes) -> bool:
    """Whether *body* may name something of a multiprocessing submodule (True when unsure:
    the cost of a wrong True is one import)."""
    whole: Any = body.obj if type(body) is memoryview else body  # bytes, bytearray or mmap
    try:
        return bool(whole.find(b"multiprocessing.") >= 0)
    except (AttributeError, TypeError):
        return True


def encode(
    msg: Message, response_id: int = 0, notify_id: int = 0, flags: int = 0
) -> list[bytes | memoryview]:
    """Pack *msg* into the parts of one frame (header *flags*: ``framing.FLAG_*``). Pickling
    happens here, outside any send lock.

    A call's function travels by name when it is a module-level one (see :mod:`names`).
    """
    fields: tuple[object, ...]
    if type(msg) is CallMsg:
        ref = names.ref_of(msg.fn)
        if ref is not None and _by_value_modules() and byvalue.by_value(ref.partition(":")[0]):
            ref = None  # its module is registered for pickling by value
        fields = (msg.fn if ref is None else ref, msg.args, msg.kwargs, int(msg.mode), msg.rrid)
        body, buffers = dumps(fields, call=True)
    else:
        body, buffers = dumps(messages.fields(msg))
    return framing.pack(msg.TAG, response_id, notify_id, body, buffers, flags=flags)


_CALL_FIELDS = 5  # fn, args, kwargs, mode, rrid: what encode sends of a CallMsg


def decode(frame: framing.Frame) -> Message:
    """Rebuild the message of *frame*. Raises whatever unpickling raises (callers reply with it)."""
    cls = MSG_TYPES.get(frame.tag)
    if cls is None:
        from ..errors import ProtocolError

        raise ProtocolError(f"unknown message tag {frame.tag}")
    if frame.tag == messages.ExitMsg.TAG:
        return messages.ExitMsg()
    values = loads(frame.body, frame.buffers)
    if not isinstance(values, tuple):
        from ..errors import ProtocolError

        raise ProtocolError(f"message body of tag {frame.tag} is not a tuple")
    if cls is CallMsg:
        if len(values) != _CALL_FIELDS:  # (a ticket is the receiver's own: it never travels)
            from ..errors import ProtocolError

            raise ProtocolError(f"a call carries {len(values)} fields, not {_CALL_FIELDS}")
        fn = values[0]
        if type(fn) is str:  # a module-level function, by name
            values = (names.resolve(fn), *values[1:])
        elif type(fn) is bytes:  # a by-value function, as its cached pickle
            values = (byvalue.load(fn), *values[1:])
    msg: Message = cls(*values)
    return msg
