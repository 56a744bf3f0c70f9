"""Length-prefixed messages over a blocking stream socket.

Layer: L1 transport. Imports: stdlib, distexec.errors, distexec._config, integrity.

A message on the wire::

    header   32 bytes  !BBHIQQQ  tag, flags, nbufs, seq, body_len, response_id, notify_id
    lengths  8 bytes x nbufs     the length of each out-of-band buffer
    body     body_len bytes      the pickled message (opaque here)
    buffers  nbufs frames        pickle protocol 5 out-of-band buffers, never copied into the body
    [mac]    32 bytes            only when flags & FLAG_MAC

On a link that negotiated per-frame integrity (see :mod:`integrity`) every message has
``FLAG_MAC``, ``seq`` counts that direction's messages from 1, and the MAC (which one:
:mod:`integrity`) covers ``header ‖ lengths ‖ body ‖ buffers``. :func:`pack` leaves
``seq`` 0 and the flag clear; :func:`seal` stamps both in (under the connection's send lock,
where the order of messages is decided) and appends the MAC. Every announced length is
checked against the cap before a byte is allocated, and a MAC is checked before the
message is handed on, so nothing is unpickled from a frame that failed it.
"""

from __future__ import annotations

import hmac
import mmap
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter as _clock
from typing import Protocol

from .. import _config
from ..errors import FrameTooLargeError, ProtocolError
from .integrity import MAC_SIZE, SEQ_MASK, SMALL_MAX, Keyed, keyed

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

Buffer = bytes | bytearray | memoryview  # what may be written

HEADER = struct.Struct("!BBHIQQQ")
HEADER_SIZE = HEADER.size  # 32
FLAG_MAC = 0x01
#: A hint: the sender waits for this message's answer and has nothing else outstanding on
#: the link (a lone call, or the answer to one). Its next message will probably follow soon,
#: so the receiver watches for it a little while before it sleeps (see ``FrameReader.poll``).
FLAG_WAIT = 0x02
_LEN = struct.Struct("!Q")
_FLAGS_AT = 1
_SEQ = struct.Struct("!I")
_SEQ_AT = 4
_NBUFS = struct.Struct("!H")
_NBUFS_AT = 2
#: Sealed messages bigger than this are hashed piece by piece as they are written (and read),
#: so that the receiver's check runs while the sender's goes on, and each piece is hashed
#: while it is still in the cache.
_MAC_STEP = 256 * 1024

#: Buffers at least this big are received into huge-page-backed anonymous memory.
_MMAP_THRESHOLD = 1 << 20
_STAGING = 1 << 18


class FrameWriter(Protocol):
    def sendall(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> int: ...


class FrameSocket(FrameWriter, Protocol):
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
    flags: int = 0,
) -> list[bytes | memoryview]:
    """The pieces of one message, ready for :func:`send_parts`."""
    n = len(buffers)
    head = HEADER.pack(tag, flags, n, seq, len(body), response_id, notify_id)
    if not n:
        return [head + body]
    lens = struct.pack(f"!{n}Q", *(b.nbytes for b in buffers))
    return [head + lens + body, *buffers]


def flagged(parts: list[bytes | memoryview], flags: int) -> list[bytes | memoryview]:
    """*parts* of a packed message with *flags* set in its header (the first part is copied)."""
    first = bytearray(parts[0])
    first[_FLAGS_AT] |= flags
    return [bytes(first), *parts[1:]]


def send_parts(sock: FrameWriter, parts: Sequence[Buffer]) -> None:
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


def seal(parts: Sequence[bytes | memoryview], seq: int, mac: Keyed) -> list[Buffer]:
    """A packed message (from :func:`pack`) with *seq* (its low 32 bits) and ``FLAG_MAC`` in
    its header and its MAC appended. *mac* holds the direction's keyed MACs.

    Nothing of the body or the buffers is copied, except that a small first part is copied
    once with the new header and the MAC appended (one ``sendall``).
    """
    if len(parts) == 1 and len(parts[0]) <= SMALL_MAX:
        return [seal_one(parts[0], seq, mac)]
    first = memoryview(parts[0]).cast("B")
    if not _NBUFS.unpack_from(first, _NBUFS_AT)[0]:
        # No buffers, only split: the receiver goes by the header, so must the MAC.
        whole = b"".join(parts)
        if len(whole) <= SMALL_MAX:
            return [seal_one(whole, seq, mac)]
    head = _sealed_header(first, seq)
    rest = first[HEADER_SIZE:]
    h = mac.large.copy()
    h.update(head)
    h.update(rest)
    for buf in parts[1:]:
        h.update(buf)
    return [bytes(head), rest, *parts[1:], h.digest()]


def seal_one(message: bytes | memoryview, seq: int, mac: Keyed) -> bytearray:
    """:func:`seal` for a one-part message of at most ``SMALL_MAX`` bytes (most are):
    copied once, with the MAC appended, for one ``sendall``."""
    whole = bytearray(message)
    whole[_FLAGS_AT] |= FLAG_MAC
    _SEQ.pack_into(whole, _SEQ_AT, seq & SEQ_MASK)
    h = mac.small.copy()
    h.update(whole)
    whole += h.digest()
    return whole


def _sealed_header(first: memoryview, seq: int) -> bytearray:
    head = bytearray(first[:HEADER_SIZE])
    head[_FLAGS_AT] |= FLAG_MAC
    _SEQ.pack_into(head, _SEQ_AT, seq & SEQ_MASK)
    return head


def send_sealed(
    sock: FrameWriter, parts: Sequence[bytes | memoryview], seq: int, mac: Keyed, size: int
) -> None:
    """:func:`seal` *parts* (*size* bytes) and write them. A large message is hashed and
    written in steps, the MAC last, so the peer hashes what arrived while this side hashes
    the rest; nothing is copied."""
    if size <= _MAC_STEP:
        send_parts(sock, seal(parts, seq, mac))
        return
    first = memoryview(parts[0]).cast("B")
    head = _sealed_header(first, seq)
    h = mac.large.copy()
    h.update(head)
    batch: list[bytes | memoryview] = [bytes(head)]
    pending = HEADER_SIZE
    for part in (first[HEADER_SIZE:], *parts[1:]):
        view = memoryview(part).cast("B")
        for at in range(0, view.nbytes, _MAC_STEP):
            piece = view[at : at + _MAC_STEP]
            h.update(piece)
            batch.append(piece)
            pending += piece.nbytes
            if pending >= _MAC_STEP:
                send_parts(sock, batch)
                batch, pending = [], 0
    batch.append(h.digest())
    send_parts(sock, batch)


def check_sizes(parts: Sequence[bytes | memoryview], cap: int, peer: str) -> None:
    """Raise ``FrameTooLargeError`` if the packed message *parts* has a body or a buffer over
    *cap* (the receiver's), or more buffers than it takes. The sender's check: nothing has
    been written, so the link lives on and only this message's caller hears of it."""
    nbufs = len(parts) - 1
    if nbufs > _config.MAX_BUFFERS:
        raise FrameTooLargeError(
            f"a message of {nbufs} out-of-band buffers exceeds the peer's cap of "
            f"{_config.MAX_BUFFERS} ({peer}); nothing was sent"
        )
    body = memoryview(parts[0]).nbytes - HEADER_SIZE - 8 * nbufs
    if body > cap:
        raise FrameTooLargeError(
            f"a message of {body} pickled bytes exceeds the peer's frame cap of {cap} bytes "
            f"({peer}; its DISTEXEC_MAX_FRAME_BYTES); nothing was sent"
        )
    for buf in parts[1:]:
        n = memoryview(buf).nbytes
        if n > cap:
            raise FrameTooLargeError(
                f"an out-of-band buffer of {n} bytes exceeds the peer's frame cap of {cap} "
                f"bytes ({peer}; its DISTEXEC_MAX_FRAME_BYTES); nothing was sent"
            )


class FrameReader:
    """Reads whole messages from one socket through a reusable staging buffer.

    Small messages cost one ``recv_into``; large bodies and buffers are received straight
    into their final memory. After :meth:`expect_mac` every message must carry a valid MAC
    and the next sequence number, or :meth:`read` raises ``ProtocolError``.
    """

    __slots__ = (
        "_buf",
        "_end",
        "_mac",
        "_mac_key",
        "_max",
        "_misses",
        "_peer",
        "_seq",
        "_skip",
        "_sock",
        "_start",
        "_view",
    )

    def __init__(self, sock: FrameSocket, max_frame: int | None = None) -> None:
        self._sock = sock
        self._buf = bytearray(_STAGING)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._max = _config.MAX_FRAME_BYTES if max_frame is None else max_frame
        self._mac: Keyed | None = None  # set: the link negotiated per-frame integrity
        self._mac_key = b""
        self._seq = 1  # the (64-bit) number of the next message expected
        self._peer = "peer"
        self._misses = 0  # polls in a row that saw nothing: the next few are skipped
        self._skip = 0

    def expect_mac(self, key: bytes, peer: str) -> None:
        """From the next message on, check each one's MAC under *key* and its ``seq``."""
        self._mac_key = key
        self._mac = keyed(key, self._seq)
        self._peer = peer

    @property
    def checks_mac(self) -> bool:
        return self._mac is not None

    def name_peer(self, label: str) -> None:
        """Call the peer *label* in error messages from now on."""
        self._peer = label

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

    def _take_hashed(self, n: int, h: hmac.HMAC) -> memoryview:
        """:meth:`_take`, feeding *h* as the bytes arrive (a large piece in steps, each while
        it is still in the cache)."""
        if n <= len(self._buf):
            out = self._take(n)
            h.update(out)
            return out
        dest = alloc(n)
        have = min(n, self._end - self._start)
        if have:
            dest[:have] = self._view[self._start : self._start + have]
            self._start += have
        hashed = 0
        while have < n:
            got = self._sock.recv_into(dest[have:])
            if not got:
                raise EOFError("connection closed by peer in the middle of a message")
            have += got
            if have - hashed >= _MAC_STEP:
                h.update(dest[hashed:have])
                hashed = have
        h.update(dest[hashed:])
        return dest

    def _check_header(self, nbufs: int, body_len: int) -> None:
        if nbufs > _config.MAX_BUFFERS:
            raise ProtocolError(f"message announces {nbufs} buffers (cap {_config.MAX_BUFFERS})")
        if body_len > self._max:
            raise FrameTooLargeError(
                f"message body of {body_len} bytes exceeds the cap of {self._max}"
            )

    def _lengths(self, nbufs: int) -> tuple[int, ...]:
        self._fill(8 * nbufs)
        lens: tuple[int, ...] = struct.unpack_from(f"!{nbufs}Q", self._buf, self._start)
        for n in lens:
            if n > self._max:
                raise FrameTooLargeError(f"buffer of {n} bytes exceeds the cap of {self._max}")
        return lens

    def read(self) -> Frame:
        """Read one message. Raises ``EOFError`` on a clean close, ``ProtocolError`` on garbage
        (and, on an integrity link, on a bad MAC, a missing one, or a replayed or lost frame)."""
        if self._mac is not None:
            return self._read_sealed(self._mac)
        self._fill(HEADER_SIZE)
        tag, flags, nbufs, seq, body_len, rid, nid = HEADER.unpack_from(self._buf, self._start)
        self._start += HEADER_SIZE
        if nbufs > _config.MAX_BUFFERS:
            raise ProtocolError(f"message announces {nbufs} buffers (cap {_config.MAX_BUFFERS})")
        if body_len > self._max:
            raise FrameTooLargeError(
                f"message body of {body_len} bytes exceeds the cap of {self._max}"
            )
        if flags & FLAG_MAC:
            raise ProtocolError(
                "a message carries a MAC, but this link did not negotiate per-frame integrity"
            )
        lens: tuple[int, ...] = ()
        if nbufs:
            lens = self._lengths(nbufs)
            self._start += 8 * nbufs
        body = self._take(body_len)
        buffers = [self._take(n) for n in lens]
        return Frame(tag, flags, seq, rid, nid, body, buffers)

    @property
    def buffered(self) -> bool:
        """Whether bytes of a next message are already here (the socket would not tell)."""
        return self._end > self._start

    def poll(self, seconds: float) -> bool:
        """Watch the socket for up to *seconds* for the next message, without sleeping; True
        once bytes of it are here (or the peer closed: the next read says so).

        A blocked reader whose CPU goes idle is woken slowly on a small VM (tens of us: the
        idle vCPU halts). When the next message is due within microseconds, polling keeps
        the CPU awake and catches it at once. Polls that see nothing make the next ones be
        skipped (2, 4, ... up to 64 of them), so a peer that is slow to answer costs
        little. A plain socket is polled here, a TLS stream by its ``watch``; for other
        streams this returns False.
        """
        if self._end > self._start:
            return True
        if self._skip:
            self._skip -= 1
            return False
        sock = self._sock
        if type(sock) is socket.socket:
            caught = _DONTWAIT != 0 and self._poll_socket(sock, seconds)
        else:
            watch = getattr(sock, "watch", None)  # a TLS stream watches its own socket
            if watch is None:
                return False
            caught = watch(seconds)
        if caught:
            self._misses = 0
        else:
            self._misses = misses = min(self._misses + 1, 6)
            self._skip = 1 << misses
        return caught

    def _poll_socket(self, sock: socket.socket, seconds: float) -> bool:
        self._start = self._end = 0  # nothing is staged: receive at the front
        view = self._view
        deadline = _clock() + seconds
        while True:
            try:
                got = sock.recv_into(view, 0, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if _clock() < deadline:
                    continue
                return False
            self._end = got
            return True

    def read_if_small(self) -> Frame | None:
        """:meth:`read` a message that fits the staging buffer; None if the next one does not.

        It blocks only to fill the staging buffer, which keeps its bytes between calls, so an
        exception while it waits (a ``KeyboardInterrupt`` in the main thread) loses nothing:
        the next read starts where this one stopped. None leaves the stream untouched.
        """
        self._fill(HEADER_SIZE)
        _tag, _flags, nbufs, _seq, body_len, _rid, _nid = HEADER.unpack_from(self._buf, self._start)
        size = HEADER_SIZE + body_len + (MAC_SIZE if self._mac is not None else 0)
        if nbufs or size > len(self._buf) or size > _MAC_STEP:
            return None
        self._fill(size)
        return self.read()  # all of it is staged: this no longer blocks

    def _read_sealed(self, mac: Keyed) -> Frame:
        """:meth:`read` on an integrity link: everything read goes through the MAC, which is
        checked (``compare_digest``) before the message leaves here; then its ``seq``."""
        expected = self._seq
        self._fill(HEADER_SIZE)
        start = self._start
        tag, flags, nbufs, seq, body_len, rid, nid = HEADER.unpack_from(self._buf, start)
        if not flags & FLAG_MAC:
            raise ProtocolError(
                f"frame {expected} from {self._peer} carries no MAC on a link that negotiated "
                "per-frame integrity"
            )
        end = HEADER_SIZE + body_len
        if not nbufs and end <= SMALL_MAX and body_len <= self._max:
            # The common small message: hashed in one piece in the staging buffer.
            stop = end + MAC_SIZE
            if self._end - start < stop:
                self._fill(stop)
                start = self._start
            view = self._view
            small = mac.small.copy()
            small.update(view[start : start + end])
            ok = hmac.compare_digest(small.digest(), view[start + end : start + stop])
            body = memoryview(bytes(view[start + HEADER_SIZE : start + end]))
            buffers: list[memoryview] = []
            self._start = start + stop
        else:
            self._check_header(nbufs, body_len)
            h = mac.large.copy()
            h.update(self._view[start : start + HEADER_SIZE])
            self._start += HEADER_SIZE
            lens: tuple[int, ...] = ()
            if nbufs:
                lens = self._lengths(nbufs)
                h.update(self._view[self._start : self._start + 8 * nbufs])
                self._start += 8 * nbufs
            body = self._take_hashed(body_len, h)
            buffers = [self._take_hashed(n, h) for n in lens]
            self._fill(MAC_SIZE)
            theirs = self._view[self._start : self._start + MAC_SIZE]
            ok = hmac.compare_digest(h.digest(), theirs)
            self._start += MAC_SIZE
        if not ok:
            raise ProtocolError(
                f"frame {expected} from {self._peer} failed its integrity check (its MAC does "
                "not match: corrupted, forged, or sent on another link)"
            )
        if seq != expected & SEQ_MASK:
            raise ProtocolError(
                f"frame {expected} from {self._peer} is numbered {seq}: a replayed, lost or "
                "reordered frame"
            )
        self._seq = expected + 1
        if not self._seq & SEQ_MASK:  # a new 2**32 epoch: a new key
            self._mac = keyed(self._mac_key, self._seq)
        return Frame(tag, flags, seq, rid, nid, body, buffers)

    def read_exact(self, n: int) -> bytes:
        """Read exactly *n* raw bytes (handshake use, before framing starts)."""
        if n > len(self._buf):
            raise ProtocolError(f"pre-frame read of {n} bytes is too large")
        self._fill(n)
        out = bytes(self._view[self._start : self._start + n])
        self._start += n
        return out


def tune(sock: socket.socket, link_timeout: float | None = None) -> None:
    """Socket options for request/response traffic: no Nagle delay, and a silently dead link
    noticed by the kernel within about *link_timeout* seconds.

    Keepalive probes find a dead peer on an idle link (``TCP_KEEPIDLE`` + ``TCP_KEEPCNT`` x
    ``TCP_KEEPINTVL``); ``TCP_USER_TIMEOUT`` ends a link whose data goes unacknowledged that
    long (it also ends one whose receiver has stopped reading: a zero window counts). Either
    way the reader or writer gets ``ETIMEDOUT`` and the peer is lost. A stopped or GIL-bound
    process does not trigger them (its kernel still acknowledges); heartbeats cover that.

    *link_timeout* defaults to ``DISTEXEC_LINK_TIMEOUT`` (seconds, 30); ``0`` keeps the
    kernel's defaults (keepalive after 2 hours). AF_UNIX sockets need none of this.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if link_timeout is None:
        import os

        try:
            link_timeout = float(os.environ.get("DISTEXEC_LINK_TIMEOUT", "30"))
        except ValueError:
            link_timeout = 30.0
    if link_timeout <= 0 or not hasattr(socket, "TCP_KEEPIDLE"):
        return
    idle = max(1, round(link_timeout / 3))
    count = max(1, min(3, int(link_timeout - idle)))
    interval = max(1, round((link_timeout - idle) / count))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(link_timeout * 1000))
    except OSError:  # pragma: no cover - a platform without these options
        pass
