"""The raw floor: pickled messages over one socket, and the worker that answers them.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib only, because this file also runs
as a script (``python dxb_echo.py tcp 127.0.0.1 PORT`` or ``python dxb_echo.py unix PATH``): the
worker connects back to the driver and answers requests until the driver closes the connection.

Wire format, one message::

    u64 body length | u32 buffer count n | n x u64 buffer length | body | buffer 1 | ... | buffer n

The body is pickle protocol 5. Buffers are the out-of-band ``PickleBuffer`` s that pickle's
``buffer_callback`` set aside (numpy arrays): they go out with ``socket.sendmsg`` straight from
the array's memory and come in with ``recv_into`` into fresh memory, an anonymous private
``mmap`` advised ``MADV_HUGEPAGE`` for anything of 2 MiB or more. Small messages go out with one
``sendall`` and come in through a persistent staging buffer, usually one ``recv_into`` each.

A request is ``(op, fn, payload)`` with *fn* pickled by reference: ``CALL`` answers
``fn(payload)``, ``MAP`` answers ``[fn(x) for x in payload]``. A reply is ``(True, value)`` or
``(False, "Type: message")``.
"""

from __future__ import annotations

import contextlib
import mmap
import pickle
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

CALL = 0
MAP = 1

_HEAD = struct.Struct("<QI")
_BUFLEN = struct.Struct("<Q")
#: Bytes read ahead from the socket; a larger message body is read into its own buffer.
STAGING_BYTES = 1 << 18
#: Buffers at least this large are received into huge-page-advised anonymous memory.
HUGEPAGE_MIN_BYTES = 1 << 21
_IOV_MAX = 512


def alloc_buffer(n: int) -> memoryview:
    """Return *n* writable bytes to receive into: huge-page-advised ``mmap`` if large.

    ``bytearray(n)`` zero-fills and takes a 4 KiB page fault per page; a private anonymous
    mapping advised ``MADV_HUGEPAGE`` faults in 2 MiB pages as ``recv_into`` writes them.
    """
    if n < HUGEPAGE_MIN_BYTES:
        return memoryview(bytearray(n))
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        # Without transparent huge pages, plain pages still avoid bytearray's zero-fill.
        with contextlib.suppress(OSError):
            mm.madvise(advice)
    return memoryview(mm)


def sendmsg_all(sock: socket.socket, parts: Sequence[Any]) -> None:
    """Send every part in order with as few ``sendmsg`` calls as the kernel allows."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            first = views[0]
            if sent >= first.nbytes:
                sent -= first.nbytes
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0


class Chan:
    """One end of a connection that carries whole pickled messages.

    Not thread-safe: one thread sends and receives.
    """

    __slots__ = ("_buf", "_end", "_start", "_view", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(STAGING_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def send(self, obj: object) -> None:
        """Pickle *obj* (protocol 5, buffers out of band) and send it as one message."""
        oob: list[pickle.PickleBuffer] = []
        body = pickle.dumps(obj, protocol=5, buffer_callback=oob.append)
        if not oob:
            self.sock.sendall(_HEAD.pack(len(body), 0) + body)
            return
        raws = [b.raw() for b in oob]
        head = _HEAD.pack(len(body), len(raws)) + b"".join(_BUFLEN.pack(r.nbytes) for r in raws)
        sendmsg_all(self.sock, [head, body, *raws])

    def recv(self) -> object:
        """Receive one message and unpickle it. Raises ``EOFError`` if the peer closed."""
        body, buffers = self.recv_frame()
        return pickle.loads(body, buffers=buffers)

    def recv_frame(self) -> tuple[Any, list[memoryview]]:
        """Receive one message without unpickling it: ``(body, out-of-band buffers)``.

        With no buffers the body may be a view into the staging buffer, valid until the next
        receive.
        """
        self._fill(_HEAD.size)
        body_len, nbufs = _HEAD.unpack_from(self._buf, self._start)
        self._start += _HEAD.size
        lens = []
        for _ in range(nbufs):
            self._fill(_BUFLEN.size)
            lens.append(_BUFLEN.unpack_from(self._buf, self._start)[0])
            self._start += _BUFLEN.size
        if body_len <= STAGING_BYTES:
            self._fill(body_len)
            body: Any = self._view[self._start : self._start + body_len]
            self._start += body_len
            if nbufs:
                body = bytes(body)  # reading the buffers below reuses the staging buffer
        else:
            body = bytearray(body_len)
            self._read_into(memoryview(body))
        buffers = []
        for n in lens:
            dest = alloc_buffer(n)
            self._read_into(dest)
            buffers.append(dest)
        if self._start == self._end:
            self._start = self._end = 0
        return body, buffers

    def close(self) -> None:
        """Close the socket; safe to call more than once."""
        self.sock.close()

    def _fill(self, n: int) -> None:
        """Make at least *n* (at most ``STAGING_BYTES``) bytes available from ``_start``."""
        avail = self._end - self._start
        if avail >= n:
            return
        if self._start + n > STAGING_BYTES:
            self._buf[:avail] = self._buf[self._start : self._end]
            self._start, self._end = 0, avail
        while self._end - self._start < n:
            got = self.sock.recv_into(self._view[self._end :])
            if not got:
                raise EOFError("peer closed the connection")
            self._end += got

    def _read_into(self, dest: memoryview) -> None:
        """Fill *dest*: first from what is staged, then straight from the socket."""
        n = dest.nbytes
        staged = min(self._end - self._start, n)
        if staged:
            dest[:staged] = self._view[self._start : self._start + staged]
            self._start += staged
        pos = staged
        while pos < n:
            got = self.sock.recv_into(dest[pos:])
            if not got:
                raise EOFError("peer closed the connection")
            pos += got


def serve(chan: Chan) -> None:
    """Answer requests on *chan* until the peer closes it."""
    while True:
        try:
            body, buffers = chan.recv_frame()
        except EOFError:
            return
        try:
            op, fn, payload = pickle.loads(body, buffers=buffers)
            value = fn(payload) if op == CALL else list(map(fn, payload))
            reply: tuple[bool, object] = (True, value)
        except Exception as exc:  # report to the driver and keep serving
            reply = (False, f"{type(exc).__name__}: {exc}")
        del body, buffers
        chan.send(reply)


def connect(argv: Sequence[str]) -> socket.socket:
    """Connect to ``tcp HOST PORT`` or ``unix PATH``."""
    if argv[0] == "tcp":
        sock = socket.create_connection((argv[1], int(argv[2])))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    if argv[0] == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(argv[1])
        return sock
    raise SystemExit(f"dxb_echo: unknown address family {argv[0]!r}: use 'tcp' or 'unix'")


def main(argv: Sequence[str] | None = None) -> int:
    """Connect back to the driver and serve it."""
    args = list(sys.argv[1:] if argv is None else argv)
    chan = Chan(connect(args))
    try:
        serve(chan)
    finally:
        chan.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
