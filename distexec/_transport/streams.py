"""A socket-shaped adapter over a pair of byte streams (pipes, a subprocess's stdio, ...).

Layer: L1 transport. Imports: stdlib.

Julia's custom transports hand the cluster an input and an output stream
(``connect(manager, pid, config) -> (instream, outstream)``); the framing layer wants a
socket (``recv_into``, ``sendall``, ``sendmsg``). :class:`StreamSocket` is that bridge.

Streams with a file descriptor are read and written through it (``os.readv``/``os.writev``),
after taking over what their Python buffers already hold, and a read waits in ``poll``
together with a wake-up pipe: :meth:`StreamSocket.close` then ends a read blocked on a peer
that says nothing (closing a buffered file under a blocked reader would wait for its lock,
and closing a bare descriptor does not wake a reader on Linux). Streams without a
descriptor (``io.BytesIO``, custom objects) are used through ``readinto1``/``read1``/``read``
and ``write``/``flush``; closing then cannot interrupt a read in progress.
"""

from __future__ import annotations

import io
import os
import select
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["StreamSocket", "take_buffered"]


def _fd_of(stream: Any) -> int | None:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def take_buffered(stream: Any) -> bytes:
    """What a buffered reader already holds, without blocking (it may hold part of the
    protocol when a line, such as the cookie, was read through it first)."""
    fd = _fd_of(stream)
    if fd is None or not isinstance(stream, io.BufferedIOBase):
        return b""
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        data = stream.read1(1 << 20)
    except BlockingIOError:
        data = b""
    finally:
        os.set_blocking(fd, blocking)
    return data or b""


class StreamSocket:
    """``recv_into``/``sendall``/``sendmsg`` over *instream* and *outstream*.

    Each is a binary stream or a bare file descriptor (an ``int``, then ours to close).
    ``shutdown``/``close`` close *outstream* (the peer reads EOF) and end a pending read here
    with EOF; *instream* is closed once no read is using it. *pending*: bytes that were read
    from *instream* already and come first.
    """

    family = None  # not an inet socket: no TCP options

    def __init__(
        self, instream: Any, outstream: Any, *, name: str = "pipe", pending: bytes = b""
    ) -> None:
        self._in = instream
        self._out = outstream
        self._name = name
        self._in_fd = instream if isinstance(instream, int) else _fd_of(instream)
        self._out_fd = outstream if isinstance(outstream, int) else _fd_of(outstream)
        self._pending = pending
        if self._in_fd is not None and not isinstance(instream, int):
            self._pending += take_buffered(instream)
        if self._out_fd is not None and not isinstance(outstream, int):
            try:
                outstream.flush()  # what was written through the buffer goes first
            except (AttributeError, OSError, ValueError):
                pass
        self._timeout: float | None = None
        self._lock = threading.Lock()  # guards: _closed, _reading, _in_closed
        self._closed = False
        self._reading = False
        self._in_closed = False
        self._wake_r, self._wake_w = os.pipe()
        self._poll: select.poll | None = None
        if self._in_fd is not None:
            self._poll = select.poll()
            self._poll.register(self._in_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            self._poll.register(self._wake_r, select.POLLIN)

    # ------------------------------------------------------------------ socket surface

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def getpeername(self) -> str:
        return self._name

    def fileno(self) -> int:
        return -1 if self._in_fd is None else self._in_fd

    def __repr__(self) -> str:
        return f"<StreamSocket {self._name} {'closed' if self._closed else 'open'}>"

    # ------------------------------------------------------------------ reading

    def recv_into(self, buf: memoryview | bytearray, nbytes: int = 0, /) -> int:
        view = memoryview(buf).cast("B")
        n = nbytes or view.nbytes
        if self._pending:
            k = min(n, len(self._pending))
            view[:k] = self._pending[:k]
            self._pending = self._pending[k:]
            return k
        with self._lock:
            if self._closed:
                return 0
            self._reading = True
        try:
            return self._read(view[:n])
        finally:
            with self._lock:
                self._reading = False
                close_in = self._closed and not self._in_closed
            if close_in:
                self._close_in()

    def _read(self, view: memoryview) -> int:
        if self._poll is None:
            return self._read_stream(view)
        timeout_ms = None if self._timeout is None else max(0, int(self._timeout * 1000))
        events = self._poll.poll(timeout_ms)
        if not events:
            raise TimeoutError(f"no data from {self._name} within {self._timeout:g} s")
        if any(fd == self._wake_r for fd, _ in events):
            return 0  # closed here
        assert self._in_fd is not None
        try:
            return os.readv(self._in_fd, [view])
        except OSError:
            if self._closed:
                return 0
            raise

    def _read_stream(self, view: memoryview) -> int:
        stream = self._in
        if hasattr(stream, "readinto1"):
            return int(stream.readinto1(view) or 0)
        reader = getattr(stream, "read1", None) or stream.read
        data = reader(view.nbytes)
        if not data:
            return 0
        view[: len(data)] = data
        return len(data)

    # ------------------------------------------------------------------ writing

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None:
        view = memoryview(data).cast("B")
        if self._out_fd is None:
            self._out.write(view)
            self._out.flush()
            return
        while view.nbytes:
            k = os.write(self._out_fd, view)
            view = view[k:]

    def sendmsg(self, buffers: Sequence[bytes | bytearray | memoryview], /) -> int:
        if self._out_fd is None:
            total = 0
            for b in buffers:
                self._out.write(b)
                total += memoryview(b).nbytes
            self._out.flush()
            return total
        return os.writev(self._out_fd, buffers)

    # ------------------------------------------------------------------ closing

    def shutdown(self, how: int = 2) -> None:
        self.close()

    def close(self) -> None:
        """Close the output (the peer sees EOF) and end reads here; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._close_out()
        if not reading:
            self._close_in()

    def _close_out(self) -> None:
        try:
            if isinstance(self._out, int):
                os.close(self._out)
            else:
                self._out.close()
        except (OSError, ValueError, AttributeError):
            pass

    def _close_in(self) -> None:
        with self._lock:
            if self._in_closed:
                return
            self._in_closed = True
        for close in (
            (lambda: os.close(self._in)) if isinstance(self._in, int) else self._in.close,
            lambda: os.close(self._wake_r),
            lambda: os.close(self._wake_w),
        ):
            try:
                close()
            except (OSError, ValueError, AttributeError):
                pass
