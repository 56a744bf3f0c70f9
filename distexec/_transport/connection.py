"""An authenticated message connection: socket, reader, send lock.

Layer: L1 transport. Imports: stdlib, distexec.errors, framing, handshake.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from typing import Any

from .. import _config
from . import framing, handshake
from .framing import Frame, FrameReader


class Connection:
    """One authenticated link to a peer process.

    Senders pickle outside any lock and then write whole messages under ``_send_lock``, so
    messages never interleave. Exactly one thread (the connection's reader) calls :meth:`read`.
    """

    __slots__ = (
        "_closed",
        "_reader",
        "_send_lock",
        "bytes_received",
        "bytes_sent",
        "peer",
        "peer_info",
        "session_key",
        "sock",
    )

    def __init__(
        self, sock: socket.socket, reader: FrameReader, hello: handshake.PeerHello
    ) -> None:
        self.sock = sock
        self._reader = reader
        self._send_lock = threading.Lock()  # guards: writes to sock, bytes_sent
        self._closed = False
        self.peer_info: dict[str, Any] = hello.info
        self.session_key = hello.session_key
        self.peer = _peer_name(sock)
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write one packed message (see :func:`framing.pack`); ``OSError`` if the link is gone."""
        with self._send_lock:
            framing.send_parts(self.sock, parts)
            self.bytes_sent += sum(memoryview(p).nbytes for p in parts)

    def read(self) -> Frame:
        """Read the next message; only the connection's reader thread calls this."""
        frame = self._reader.read()
        self.bytes_received += (
            framing.HEADER_SIZE + frame.body.nbytes + sum(b.nbytes for b in frame.buffers)
        )
        return frame

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
        return f"<Connection peer={self.peer} {'closed' if self._closed else 'open'}>"


def _peer_name(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "unix"


def dial(
    address: tuple[str, int] | str,
    cookie: bytes,
    info: dict[str, Any],
    *,
    timeout: float,
    peer: str,
) -> Connection:
    """Connect to *address* (``(host, port)`` or an AF_UNIX path) and authenticate as initiator."""
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
    try:
        framing.tune(sock)
        reader = FrameReader(sock)
        hello = handshake.initiate(sock, reader, cookie, info, timeout=timeout, peer=peer)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, reader, hello)


def accept(
    sock: socket.socket, cookie: bytes, info: dict[str, Any], *, timeout: float | None = None
) -> Connection:
    """Authenticate an accepted socket as responder. Closes it on any failure."""
    try:
        framing.tune(sock)
        reader = FrameReader(sock)
        hello = handshake.respond(
            sock,
            reader,
            cookie,
            info,
            timeout=_config.HANDSHAKE_TIMEOUT if timeout is None else timeout,
            peer=_peer_name(sock),
        )
    except BaseException:
        sock.close()
        raise
    return Connection(sock, reader, hello)
