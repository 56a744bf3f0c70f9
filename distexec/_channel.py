"""A local, thread-safe channel: Julia's ``Channel{Any}(sz)``.

The backing store of Futures, RemoteChannels and worker pools. Buffered channels keep
their items in a deque; an unbuffered one (``size=0``) is a rendezvous in which every
``put`` is matched with one ``take``, in arrival order on both sides.

Layer: L0 leaf. Imports: stdlib, distexec.errors.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from distexec.errors import ChannelClosedError, ClusterError

__all__ = ["Channel"]


class _Waiter:
    """A ``put`` or ``take`` blocked on an unbuffered channel, waiting for its partner.

    The partner fills ``value`` (for a taker), sets ``done`` and notifies ``cond``, all
    under the channel's lock, so a hand-off is atomic: a value is either with exactly one
    taker or still with its putter.
    """

    __slots__ = ("cond", "done", "value")

    def __init__(self, lock: threading.Lock, value: Any = None) -> None:
        self.cond = threading.Condition(lock)
        self.done = False
        self.value = value


class Channel:
    """A FIFO channel between threads, closable, with blocking ``put`` and ``take``.

    Julia: ``Channel{Any}(sz)``; ``put!`` is :meth:`put`, ``take!`` is :meth:`take`, and
    :meth:`fetch`, :meth:`isready`, :meth:`wait`, :meth:`close`, :meth:`isopen` keep their
    names. Iterating takes items until the channel is closed and drained.

    Args:
        size: How many items it buffers. ``0`` (the default, as in Julia) is unbuffered:
            ``put`` returns only once a ``take`` has received the value. ``math.inf`` or
            ``None`` is unbounded.

    Every blocking method takes ``timeout``: ``None`` waits as long as needed, a number
    of seconds raises ``TimeoutError`` when it runs out, and ``0`` (or less) never waits:
    the call succeeds if it can right now, else raises ``TimeoutError``. A call that
    times out has no effect.

    Closing (Julia's ``close(c)``): ``put`` then raises ``ChannelClosedError``; items
    already buffered can still be taken, after which ``take``, ``fetch`` and ``wait``
    raise ``ChannelClosedError``. Calls blocked at close time wake up and raise; so does
    a ``put`` waiting for a taker on an unbuffered channel (its value is not delivered).
    ``close(exc)`` records *exc* as the ``__cause__`` of those errors, and iteration then
    ends by raising instead of stopping quietly, so a consumer learns that the producer
    failed (Julia's ``close(c, excp)``, as done by ``bind(c, task)``).

    The channel is a context manager that closes it on exit.
    """

    def __init__(self, size: int | float | None = 0) -> None:
        if size is None:
            size = math.inf
        if isinstance(size, bool) or not (isinstance(size, int) or size == math.inf):
            raise TypeError(f"Channel size must be an int, math.inf or None, got {size!r}")
        if size < 0:
            raise ValueError(
                f"Channel size must be either 0, a positive integer or Inf, not {size}"
            )
        self._size: int | float = size
        self._state_lock = threading.Lock()
        # guards: _items, _closed, _close_exc, _putters, _takers and the conditions below.
        self._items: deque[Any] = deque()  # buffered channels only
        self._closed = False
        self._close_exc: BaseException | None = None
        # Buffered channels: takers wait for an item, putters for a free slot.
        self._not_empty = threading.Condition(self._state_lock)
        self._not_full = threading.Condition(self._state_lock)
        # Both kinds: fetch() and wait() wait for an item without consuming it.
        self._readable = threading.Condition(self._state_lock)
        # Unbuffered channels: blocked puts (holding their values) and blocked takes.
        # At most one of the two is non-empty at any time.
        self._putters: deque[_Waiter] = deque()
        self._takers: deque[_Waiter] = deque()

    @property
    def size(self) -> int | float:
        """The buffer size: an int, ``0`` for unbuffered, or ``math.inf``."""
        return self._size

    @property
    def is_open(self) -> bool:
        """Whether the channel is still open (``put`` is allowed)."""
        return not self._closed

    def isopen(self) -> bool:
        """Julia: ``isopen(c)``. The same as :attr:`is_open`."""
        return not self._closed

    def put(self, value: Any, /, timeout: float | None = None) -> Any:
        """Append *value*, waiting while the channel is full; return *value*.

        Julia: ``put!(c, v)``. On an unbuffered channel, wait until a ``take`` has
        received *value*.

        Raises:
            ChannelClosedError: The channel is closed, or was closed while waiting.
            TimeoutError: *timeout* ran out; *value* was not added.
        """
        deadline = _deadline(timeout)
        with self._state_lock:
            if self._closed:
                raise self._closed_error("put")
            if self._size == 0:
                return self._put_unbuffered(value, deadline)
            while len(self._items) >= self._size:
                self._wait(self._not_full, deadline, "put", "for a free slot")
                if self._closed:
                    raise self._closed_error("put")
            self._items.append(value)
            self._not_empty.notify()
            self._readable.notify_all()
            return value

    def _put_unbuffered(self, value: Any, deadline: float | None) -> Any:
        if self._takers:
            taker = self._takers.popleft()
            taker.value, taker.done = value, True
            taker.cond.notify()
            return value
        if _expired(deadline):  # do not show an offer nobody can take
            raise self._timeout_error("put", "for a taker")
        me = _Waiter(self._state_lock, value)
        self._putters.append(me)
        self._readable.notify_all()
        try:
            while not me.done:
                if self._closed:
                    raise self._closed_error("put")
                self._wait(me.cond, deadline, "put", "for a taker")
        finally:
            if not me.done:  # timed out, closed or interrupted: withdraw the offer
                _discard(self._putters, me)
        return value

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return the first item, waiting while there is none.

        Julia: ``take!(c)``.

        Raises:
            ChannelClosedError: The channel is closed and empty, or was closed while
                waiting.
            TimeoutError: *timeout* ran out; nothing was removed.
        """
        deadline = _deadline(timeout)
        with self._state_lock:
            if self._size == 0:
                return self._take_unbuffered(deadline)
            while not self._items:
                if self._closed:
                    raise self._closed_error("take")
                self._wait(self._not_empty, deadline, "take", "for an item")
            value = self._items.popleft()
            self._not_full.notify()
            return value

    def _take_unbuffered(self, deadline: float | None) -> Any:
        if self._putters:
            putter = self._putters.popleft()
            putter.done = True
            putter.cond.notify()
            return putter.value
        if self._closed:
            raise self._closed_error("take")
        if _expired(deadline):
            raise self._timeout_error("take", "for a putter")
        me = _Waiter(self._state_lock)
        self._takers.append(me)
        try:
            while not me.done:
                if self._closed:
                    raise self._closed_error("take")
                self._wait(me.cond, deadline, "take", "for a putter")
        finally:
            if not me.done:
                _discard(self._takers, me)
        return me.value

    def fetch(self, timeout: float | None = None) -> Any:
        """Return the first item without removing it, waiting while there is none.

        Julia: ``fetch(c)``; like Julia, not supported on an unbuffered channel.

        Raises:
            ChannelClosedError: The channel is closed and empty.
            TimeoutError: *timeout* ran out.
            ClusterError: The channel is unbuffered (``size=0``).
        """
        if self._size == 0:
            raise ClusterError("`fetch` is not supported on an unbuffered Channel.")
        deadline = _deadline(timeout)
        with self._state_lock:
            self._wait_readable(deadline, "fetch")
            return self._items[0]

    def wait(self, timeout: float | None = None) -> None:
        """Wait until an item is available (:meth:`isready` is true).

        Julia: ``wait(c)``. On an unbuffered channel: until a ``put`` is waiting.

        Raises:
            ChannelClosedError: The channel is closed and nothing is available.
            TimeoutError: *timeout* ran out.
        """
        deadline = _deadline(timeout)
        with self._state_lock:
            self._wait_readable(deadline, "wait")

    def _wait_readable(self, deadline: float | None, op: str) -> None:
        while not self._n_avail():
            if self._closed:
                raise self._closed_error(op)
            self._wait(self._readable, deadline, op, "for an item")

    def isready(self) -> bool:
        """Whether a ``take`` would find an item now (racy by nature).

        Julia: ``isready(c)``. On an unbuffered channel: whether a ``put`` is waiting.
        """
        return self._n_avail() > 0

    def isempty(self) -> bool:
        """Julia: ``isempty(c)``; ``not isready()``. Never consumes an item."""
        return self._n_avail() == 0

    def n_avail(self) -> int:
        """How many items could be taken now without waiting (racy by nature).

        Julia: ``Base.n_avail(c)``: buffered items, or waiting puts if unbuffered.
        """
        return self._n_avail()

    def _n_avail(self) -> int:
        return len(self._items) if self._size else len(self._putters)

    def close(self, exc: BaseException | None = None) -> None:
        """Close the channel; closing again does nothing.

        Julia: ``close(c)`` and ``close(c, excp)``. *exc*, if given with the first close,
        becomes the ``__cause__`` of every ``ChannelClosedError`` raised afterwards.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._close_exc = exc
            for cond in (self._not_empty, self._not_full, self._readable):
                cond.notify_all()
            for waiter in (*self._putters, *self._takers):
                waiter.cond.notify()
            # Pending puts are withdrawn: takes on a closed channel must not receive them.
            self._putters.clear()
            self._takers.clear()

    def __iter__(self) -> Iterator[Any]:
        """Take items until the channel is closed and drained.

        Julia: ``for x in c``. Ends quietly after a plain ``close()``; after
        ``close(exc)`` it raises ``ChannelClosedError`` from *exc* once drained.
        """
        while True:
            try:
                value = self.take()
            except ChannelClosedError:
                if self._close_exc is None:
                    return
                raise
            yield value

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if not self._closed else "closed"
        return f"<Channel size={self._size} len={self._n_avail()} {state}>"

    # Called with _state_lock held.

    def _wait(self, cond: threading.Condition, deadline: float | None, op: str, what: str) -> None:
        """Wait on *cond* once, or raise ``TimeoutError`` if *deadline* has passed.

        Callers loop, re-checking their condition before calling again, so a wake-up
        that races with the deadline is never lost.
        """
        if deadline is None:
            cond.wait()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout_error(op, what)
        cond.wait(min(remaining, threading.TIMEOUT_MAX))

    def _timeout_error(self, op: str, what: str) -> TimeoutError:
        return TimeoutError(f"{op} on {self._describe()}: timed out waiting {what}")

    def _closed_error(self, op: str) -> ChannelClosedError:
        if op == "put":
            message = f"put on a closed channel ({self._describe()})"
        else:
            message = f"{op} on a closed and empty channel ({self._describe()})"
        if self._close_exc is not None:
            message += f"; it was closed with {self._close_exc!r}"
        error = ChannelClosedError(message)
        if self._close_exc is not None:
            error.__cause__ = self._close_exc
        return error

    def _describe(self) -> str:
        state = "open" if not self._closed else "closed"
        return f"Channel size={self._size} len={self._n_avail()} {state}"


def _deadline(timeout: float | None) -> float | None:
    if timeout is None or timeout == math.inf:
        return None
    return time.monotonic() + timeout


def _expired(deadline: float | None) -> bool:
    return deadline is not None and deadline <= time.monotonic()


def _discard(waiters: deque[_Waiter], waiter: _Waiter) -> None:
    with contextlib.suppress(ValueError):  # close() already cleared the queue
        waiters.remove(waiter)
