"""An authenticated message connection: socket, reader, send lock.

Layer: L1 transport. Imports: stdlib, distexec.errors, framing, handshake, integrity.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import _config
from . import framing, handshake, integrity
from .framing import Frame, FrameReader

if TYPE_CHECKING:
    import ssl  # imported by TLS users; a plain link never needs it


class Connection:
    """One authenticated link to a peer process.

    Senders pickle outside any lock and then write whole messages under ``_send_lock``, so
    messages never interleave. One thread at a time reads (:meth:`read`,
    :meth:`read_if_small`): the cluster layer passes that role around through ``reading``.

    ``integrity`` says whether the link negotiated per-frame MACs (see :mod:`integrity`):
    then each message gets its sequence number and MAC under the send lock, and the reader
    checks both before a message is handed on. ``peer_max_frame`` is the peer's frame cap
    (from its hello): :meth:`send` refuses a message over it with ``FrameTooLargeError``
    before writing a byte, so the link lives on.
    """

    __slots__ = (
        "_closed",
        "_first_cap",
        "_reader",
        "_send_key",
        "_send_lock",
        "_send_mac",
        "_send_seq",
        "_small_max",
        "bytes_received",
        "bytes_sent",
        "integrity",
        "label",
        "peer",
        "peer_info",
        "peer_max_frame",
        "reading",
        "session_key",
        "sock",
        "write_error",
        "write_progress",
    )

    def __init__(
        self,
        sock: socket.socket,
        reader: FrameReader,
        hello: handshake.PeerHello,
        *,
        mac_keys: tuple[bytes, bytes] | None = None,
        label: str = "",
    ) -> None:
        self.sock = sock
        self._reader = reader
        self._send_lock = threading.Lock()  # guards: writes to sock, bytes_sent, _send_seq/_mac
        self._closed = False
        self.peer_info: dict[str, Any] = hello.info
        self.session_key = hello.session_key
        self.peer = _peer_name(sock)
        self.label = label or self.peer  # who the peer is, in error messages
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reading = 0  # who reads: the cluster layer's business (see _cluster.ReadToken)
        self.write_error: BaseException | None = None  # the first failed write's (ditto)
        # While a large message is being written: when the link last took a piece of it
        # (monotonic seconds); 0.0 otherwise. A peer that stopped reading stops it moving.
        self.write_progress = 0.0
        cap = hello.info.get("max_frame")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            cap = _config.MAX_FRAME_BYTES  # a peer that does not say: assume ours
        self.peer_max_frame: int = cap
        # A one-part message (no buffers) whose first part is at most this is under the cap.
        self._first_cap = cap + framing.HEADER_SIZE
        # A one-part message up to this goes the short way (no size check, one write).
        self._small_max = min(self._first_cap, _LARGE)
        self._send_seq = 1
        self._send_key = b""
        self._send_mac: integrity.Keyed | None = None
        self.integrity = mac_keys is not None
        if mac_keys is not None:
            send_key, recv_key = mac_keys
            self._send_key = send_key
            self._send_mac = integrity.keyed(send_key, self._send_seq)
            reader.expect_mac(recv_key, self.label)

    def send(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write one packed message (see :func:`framing.pack`); ``OSError`` if the link is gone.

        Raises:
            FrameTooLargeError: the body or a buffer is over the peer's frame cap; nothing
                was written and the link is fine.
        """
        if len(parts) > 1 or len(parts[0]) > self._small_max:
            if len(parts) > 1 or len(parts[0]) > self._first_cap:
                framing.check_sizes(parts, self.peer_max_frame, self.label)
            if len(parts) > 1 or len(parts[0]) > _LARGE:
                self._send_large(parts)
                return
        if self._send_mac is not None:
            self._send_sealed(parts, self.sock)
            return
        with self._send_lock:
            framing.send_parts(self.sock, parts)
            self.bytes_sent += len(parts[0])

    def _send_large(self, parts: Sequence[bytes | memoryview]) -> None:
        """:meth:`send` of a message that may take a while: written in pieces, each noted in
        :attr:`write_progress` (the heartbeat tells a slow link from a peer that stopped
        reading by it)."""
        with self._send_lock:
            self.write_progress = time.monotonic()
            try:
                sock = _Progressing(self.sock, self)
                if self._send_mac is not None:
                    self._write_sealed(parts, sock)
                else:
                    framing.send_parts(sock, parts)
                    self.bytes_sent += sum(memoryview(p).nbytes for p in parts)
            finally:
                self.write_progress = 0.0

    def send_many(self, messages: Sequence[Sequence[bytes | memoryview]]) -> None:
        """Write several packed messages in order, in as few system calls as the kernel
        allows: the peer is woken once for all of them. Each must be one part of at most
        the peer's frame cap (callers send anything else with :meth:`send`)."""
        for parts in messages:
            if len(parts) > 1 or len(parts[0]) > self._first_cap:
                raise ValueError("send_many takes small one-part messages only")
        if self._send_mac is not None:
            for parts in messages:
                self._send_sealed(parts, self.sock)
            return
        pieces = [parts[0] for parts in messages]
        with self._send_lock:
            framing.send_parts(self.sock, pieces)
            self.bytes_sent += sum(len(p) for p in pieces)

    def _send_sealed(self, parts: Sequence[bytes | memoryview], sock: Any) -> None:
        with self._send_lock:  # the sequence number is the order of writing: take it here
            self._write_sealed(parts, sock)

    def _write_sealed(self, parts: Sequence[bytes | memoryview], sock: Any) -> None:
        """Seal *parts* with the next sequence number and write them (under the send lock)."""
        seq = self._send_seq
        mac = self._send_mac
        assert mac is not None
        if len(parts) == 1 and (size := len(parts[0])) <= integrity.SMALL_MAX:
            sock.sendall(framing.seal_one(parts[0], seq, mac))  # the usual message
        else:
            size = sum(memoryview(p).nbytes for p in parts)
            framing.send_sealed(sock, parts, seq, mac, size)
        seq += 1
        self._send_seq = seq
        if not seq & integrity.SEQ_MASK:  # a new 2**32 epoch: a new key
            self._send_mac = integrity.keyed(self._send_key, seq)
        self.bytes_sent += size + integrity.MAC_SIZE

    def name_peer(self, label: str) -> None:
        """Call the peer *label* in error messages from now on (once it is known who it is)."""
        self.label = label
        self._reader.name_peer(label)

    def read(self) -> Frame:
        """Read the next message; only the connection's reader thread calls this.

        Raises ``ProtocolError`` for a message that breaks the protocol (on an integrity
        link also: a bad or missing MAC, a replayed or lost message), before it is unpickled.
        """
        frame = self._reader.read()
        size = framing.HEADER_SIZE + frame.body.nbytes
        if frame.buffers:
            size += sum(8 + b.nbytes for b in frame.buffers)
        if frame.flags & framing.FLAG_MAC:
            size += integrity.MAC_SIZE
        self.bytes_received += size
        return frame

    def read_if_small(self) -> Frame | None:
        """:meth:`read` if the next message is small (see ``FrameReader.read_if_small``): an
        interrupted wait loses nothing, so a caller's own thread may read. None: it is not."""
        frame = self._reader.read_if_small()
        if frame is not None:
            self.bytes_received += (
                framing.HEADER_SIZE
                + frame.body.nbytes
                + (integrity.MAC_SIZE if frame.flags & framing.FLAG_MAC else 0)
            )
        return frame

    def poll(self, seconds: float) -> bool:
        """Watch for the next message for up to *seconds* without sleeping (see
        ``FrameReader.poll``); only the link's reader calls this. True: it is arriving."""
        return self._reader.poll(seconds)

    @property
    def buffered(self) -> bool:
        """Whether the next message has started to arrive (already read from the socket)."""
        return self._reader.buffered

    def idle_fd(self) -> int | None:
        """The descriptor whose readability means a message is coming, or None when the
        stream holds bytes the kernel does not see (a TLS record read but not yet taken) or
        may (custom streams)."""
        if self._closed:
            return None
        sock = self.sock
        if type(sock) is socket.socket:
            return sock.fileno()
        above = getattr(sock, "idle_fd", None)  # a TLS stream knows what it holds
        return above() if above is not None else None

    def close(self) -> None:
        """Shut the link down in both directions; the reader then sees EOF. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        mac = " mac" if self.integrity else ""
        return f"<Connection peer={self.peer}{mac} {'closed' if self._closed else 'open'}>"


def _peer_name(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "unix"


def authenticate(
    sock: Any,
    cookie: bytes,
    info: dict[str, Any],
    *,
    initiator: bool,
    timeout: float,
    peer: str,
    ssl_context: ssl.SSLContext | None = None,
    tls_server_side: bool = False,
    server_hostname: str | None = None,
) -> Connection:
    """Run the handshake on a connected *sock* (TLS first if *ssl_context* is given).

    *sock* is a socket or anything with its ``recv_into``/``sendall``/``sendmsg``/
    ``settimeout``/``shutdown``/``close`` (see :mod:`distexec._transport.streams`). The
    protocol role (*initiator*) and the TLS role (*tls_server_side*) are independent: an
    elastic worker dials pid 1 (TLS client) and then answers its challenge (responder).
    Closes *sock* on any failure. TLS failures raise ``AuthenticationError`` naming the cause.

    Each side adds to its hello *info* its integrity mode and wish and its frame cap
    (``integrity``, ``mac``, ``max_frame``); the link carries frame MACs if either side
    wishes (see :mod:`integrity`).
    """
    deadline = time.monotonic() + timeout
    try:
        mode = _config.integrity_mode()
        wish = integrity.wants_mac(
            mode, link=integrity.link_kind(sock), tls=ssl_context is not None
        )
        info = {**info, **integrity.hello_fields(mode, wish, _config.MAX_FRAME_BYTES)}
        framing.tune(sock)
        if ssl_context is not None:
            from .tls import TLSStream

            sock.settimeout(timeout)
            sock = TLSStream(
                sock,
                ssl_context,
                server_side=tls_server_side,
                server_hostname=None if tls_server_side else server_hostname,
                label=peer,
            )
            try:
                sock.do_handshake()
            except TimeoutError as exc:
                raise TimeoutError(
                    f"TLS handshake with {peer} did not finish within {timeout:g} s"
                ) from exc
        reader = FrameReader(sock)
        run = handshake.initiate if initiator else handshake.respond
        remaining = max(deadline - time.monotonic(), 0.001)
        hello = run(sock, reader, cookie, info, timeout=remaining, peer=peer)
        keys = None
        if integrity.agreed(wish, hello.info):
            keys = integrity.direction_keys(hello.session_key, initiator=initiator)
        return Connection(sock, reader, hello, mac_keys=keys, label=peer)
    except BaseException:
        sock.close()
        raise


def dial(
    address: tuple[str, int] | str,
    cookie: bytes,
    info: dict[str, Any],
    *,
    timeout: float,
    peer: str,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:
    """Connect to *address* (``(host, port)`` or an AF_UNIX path) and authenticate as initiator.

    With *ssl_context* (a client context) the link runs TLS, checking *server_hostname*
    (default: the host dialled) when the context checks names.
    """
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(address, timeout=timeout)
    if ssl_context is not None and server_hostname is None and ssl_context.check_hostname:
        server_hostname = address if isinstance(address, str) else address[0]
    return authenticate(
        sock,
        cookie,
        info,
        initiator=True,
        timeout=timeout,
        peer=peer,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
    )


def accept(
    sock: Any,
    cookie: bytes,
    info: dict[str, Any],
    *,
    timeout: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Connection:
    """Authenticate an accepted socket as responder (TLS server first with *ssl_context*).

    Closes it on any failure.
    """
    try:
        peer = _peer_name(sock)
    except BaseException:
        sock.close()
        raise
    return authenticate(
        sock,
        cookie,
        info,
        initiator=False,
        timeout=_config.HANDSHAKE_TIMEOUT if timeout is None else timeout,
        peer=peer,
        ssl_context=ssl_context,
        tls_server_side=True,
    )


#: A message over this many bytes (or in several parts) is written in pieces, with progress.
_LARGE = 256 * 1024
#: The size of those pieces.
_PIECE = 4 << 20


class _Progressing:
    """*sock* for one large write: each piece that goes out is noted in the connection's
    ``write_progress``. A ``sendall`` of hundreds of megabytes is one system call that may
    block for long; in pieces, a link still taking bytes is told from one that stopped."""

    __slots__ = ("_conn", "_sock")

    def __init__(self, sock: Any, conn: Connection) -> None:
        self._sock = sock
        self._conn = conn

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, view.nbytes, _PIECE):
            self._sock.sendall(view[at : at + _PIECE])
            self._conn.write_progress = time.monotonic()

    def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> int:
        piece: list[bytes | memoryview] = []
        room = _PIECE
        for buf in buffers:
            view = memoryview(buf).cast("B")
            if view.nbytes >= room:
                piece.append(view[:room])
                break
            piece.append(view)
            room -= view.nbytes
        sent: int = self._sock.sendmsg(piece)
        self._conn.write_progress = time.monotonic()
        return sent
