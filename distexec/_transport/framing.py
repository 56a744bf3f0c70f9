"""Length-prefixed messages over a blocking stream socket.

Layer: L1 transport. Imports: stdlib, distexec.errors, distexec._config.

A message on the wire::

    header   32 bytes  !BBHIQQQ  tag, flags, nbufs, seq, body_len, response_id, notify_id
    lengths  8 bytes x nbufs     the length of each out-of-band buffer
    body     body_len bytes      the pickled message (opaque here)
    buffers  nbufs frames        pickle protocol 5 out-of-band buffers, never copied into the body
    [mac]    32 bytes            only when flags & FLAG_MAC (reserved for per-frame integrity)

``seq`` and the MAC flag are reserved so that per-frame integrity can arrive without a new
wire. Every announced length is checked against the cap before a byte is allocated.
"""

from __future__ import annotations

import mmap
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .. import _config
from ..errors import FrameTooLargeError, ProtocolError

HEADER = struct.Struct("!BBHIQQQ")
HEADER_SIZE = HEADER.size  # 32
FLAG_MAC = 0x01
_LEN = struct.Struct("!Q")

#: Buffers at least this big are received into huge-page-backed anonymous memory.
_MMAP_THRESHOLD = 1 << 20
_STAGING = 1 << 18


class FrameSocket(Protocol):
    def sendall(self, data: bytes | memoryview, /) -> None: ...
    def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> int: ...
    def recv_into(self, buf: memoryview, nbytes: int = 0, /) -> int: ...


@dataclass(slots=True)
class Frame:
    """One received message: its header fields, body and out-of-band buffers."""

    tag: int
    flags: int
    seq: int
    response_id: int
    notify_id: int
    body: memoryview
    buffers: list[memoryview]


def alloc(n: int) -> memoryview:
    """Writable memory for *n* received bytes, without page-by-page zero-filling for large *n*."""
    if n >= _MMAP_THRESHOLD:
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)  # shared anonymous memory gets no THP
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # pragma: no cover - kernel without THP
            pass
        return memoryview(m)
    return memoryview(bytearray(n))


def pack(
    tag: int,
    response_id: int,
    notify_id: int,
    body: bytes,
    buffers: Sequence[memoryview] = (),
    seq: int = 0,
) -> list[bytes | memoryview]:
    """The pieces of one message, ready for :func:`send_parts`."""
    n = len(buffers)
    head = HEADER.pack(tag, 0, n, seq, len(body), response_id, notify_id)
    if not n:
        return [head + body]
    lens = struct.pack(f"!{n}Q", *(b.nbytes for b in buffers))
    return [head + lens + body, *buffers]


def send_parts(sock: FrameSocket, parts: Sequence[bytes | memoryview]) -> None:
    """Write all *parts* in order, gathering them into as few system calls as possible."""
    if len(parts) == 1:
        sock.sendall(parts[0])
        return
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views[:512])
        while sent:
            first = views[0]
            if sent >= first.nbytes:
                sent -= first.nbytes
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0
        while views and views[0].nbytes == 0:
            views.pop(0)


class FrameReader:
    """Reads whole messages from one socket through a reusable staging buffer.

    Small messages cost one ``recv_into``; large bodies and buffers are received straight
    into their final memory.
    """

    __slots__ = ("_buf", "_end", "_max", "_sock", "_start", "_view")

    def __init__(self, sock: FrameSocket, max_frame: int | None = None) -> None:
        self._sock = sock
        self._buf = bytearray(_STAGING)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._max = _config.MAX_FRAME_BYTES if max_frame is None else max_frame

    def _fill(self, n: int) -> None:
        """Make at least *n* (≤ staging size) bytes available at ``_start``."""
        if self._end - self._start >= n:
            return
        if self._start + n > len(self._buf):
            avail = self._end - self._start
            self._view[:avail] = self._view[self._start : self._end]
            self._start, self._end = 0, avail
        while self._end - self._start < n:
            got = self._sock.recv_into(self._view[self._end :])
            if not got:
                raise EOFError("connection closed by peer")
            self._end += got

    def _read_into(self, dest: memoryview) -> None:
        """Fill *dest* completely: first from the staging buffer, then from the socket."""
        n = dest.nbytes
        have = min(n, self._end - self._start)
        if have:
            dest[:have] = self._view[self._start : self._start + have]
            self._start += have
        while have < n:
            got = self._sock.recv_into(dest[have:])
            if not got:
                raise EOFError("connection closed by peer in the middle of a message")
            have += got

    def _take(self, n: int) -> memoryview:
        if n <= len(self._buf):
            self._fill(n)
            # Copy out: the staging buffer is reused by the next read.
            out = memoryview(bytes(self._view[self._start : self._start + n]))
            self._start += n
            return out
        dest = alloc(n)
        self._read_into(dest)
        return dest

    def read(self) -> Frame:
        """Read one message. Raises ``EOFError`` on a clean close, ``ProtocolError`` on garbage."""
        self._fill(HEADER_SIZE)
        tag, flags, nbufs, seq, body_len, rid, nid = HEADER.unpack_from(self._buf, self._start)
        self._start += HEADER_SIZE
        if nbufs > _config.MAX_BUFFERS:
            raise ProtocolError(f"message announces {nbufs} buffers (cap {_config.MAX_BUFFERS})")
        if body_len > self._max:
            raise FrameTooLargeError(
                f"message body of {body_len} bytes exceeds the cap of {self._max}"
            )
        lens: tuple[int, ...] = ()
        if nbufs:
            self._fill(8 * nbufs)
            lens = struct.unpack_from(f"!{nbufs}Q", self._buf, self._start)
            self._start += 8 * nbufs
            for n in lens:
                if n > self._max:
                    raise FrameTooLargeError(f"buffer of {n} bytes exceeds the cap of {self._max}")
        body = self._take(body_len)
        buffers = [self._take(n) for n in lens]
        if flags & FLAG_MAC:
            self._take(32)  # integrity is not negotiated yet; see the module docstring
        return Frame(tag, flags, seq, rid, nid, body, buffers)

    def read_exact(self, n: int) -> bytes:
        """Read exactly *n* raw bytes (handshake use, before framing starts)."""
        if n > len(self._buf):
            raise ProtocolError(f"pre-frame read of {n} bytes is too large")
        self._fill(n)
        out = bytes(self._view[self._start : self._start + n])
        self._start += n
        return out


def tune(sock: socket.socket) -> None:
    """Socket options for request/response traffic: no Nagle delay, keepalive on."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
