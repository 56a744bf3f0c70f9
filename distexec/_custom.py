"""Custom transports: workers whose links are streams the manager provides, not TCP.

Layer: L6 runtime/API. Imports: L0-L3 (cluster, transport, refs).

Julia: ``init_worker(cookie, manager)``, ``start_worker(out, cookie)``,
``process_messages(r_stream, w_stream, incoming)``. The wire is the same as over TCP
(cookie handshake, then framed messages); only the byte carrier differs.

On pid 1, ``addprocs(manager)`` calls ``manager.connect(pid, config)``; when that returns
``(instream, outstream)`` the master authenticates over them as the initiator and sends the
join, exactly as it does over a socket (:func:`master_link`). A worker's program does::

    import sys, distexec as dx
    cookie = sys.stdin.buffer.readline().strip()     # however the manager delivers it
    dx.init_worker(cookie)
    dx.process_messages(sys.stdin.buffer, sys.stdout.buffer)   # serves until let go

When the streams are this process's stdin/stdout, :func:`process_messages` moves them out of
the way first: ``print`` and anything written to file descriptor 1 then go to stderr, and
reading ``sys.stdin`` reads nothing, so user code cannot corrupt the link.

Links between workers still use TCP (the lower pid's listening address): a worker reached
only through its manager's streams has no address, so only pid 1 talks to it unless it
also listens (its ``WorkerConfig.connect_at``), or the program dials its peers itself with
``process_messages(r, w, incoming=False, pid=peer)``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import _cluster, _config, refs
from ._ids import MASTER, WorkerId
from ._transport import connection as _conn
from ._transport.connection import Connection
from ._transport.streams import StreamSocket, take_buffered
from .errors import ClusterError
from .managers.base import ClusterManager, WorkerConfig

__all__ = ["init_worker", "master_link", "process_messages", "start_worker"]

#: The manager a custom worker was started by (Julia keeps it for connect_to_peer).
_worker_manager: ClusterManager | None = None


def _group() -> _cluster.ProcessGroup:
    refs.store()  # wire the owner side before any message can arrive
    return _cluster.group()


def init_worker(cookie: str | bytes, manager: ClusterManager | None = None) -> None:
    """Make this process a worker-to-be: set the cluster cookie, keep *manager*.

    Julia: ``init_worker(cookie, manager)``. Call it once, before :func:`process_messages`
    (or use :func:`start_worker`, which does everything over TCP).

    Raises:
        ClusterError: this process already has workers or is a worker already.
        ValueError: an empty cookie.
    """
    global _worker_manager
    g = _group()
    if g.joined.is_set() or any(p.state is not _cluster.PeerState.TERMINATED for p in g.peers()):
        raise ClusterError("init_worker: this process is already part of a cluster")
    raw = cookie.encode() if isinstance(cookie, str) else bytes(cookie)
    raw = raw.strip()
    if not raw:
        raise ValueError("init_worker: the cookie is empty")
    g.set_cookie(raw)
    _worker_manager = manager
    from . import _interrupt

    _interrupt.install_worker_handler()


def _is_stdio(stream: Any, fd: int) -> bool:
    try:
        return int(stream if isinstance(stream, int) else stream.fileno()) == fd
    except (AttributeError, OSError, ValueError):
        return False


def _stream_socket(instream: Any, outstream: Any, name: str) -> StreamSocket:
    """A StreamSocket; this process's own stdin/stdout are first moved out of user code's way."""
    take_in, take_out = _is_stdio(instream, 0), _is_stdio(outstream, 1)
    pending = b""
    in_arg: Any = instream
    out_arg: Any = outstream
    if take_in:
        pending = take_buffered(instream)  # e.g. what followed the cookie line
        in_arg = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # user code reading stdin reads nothing, not our link
        os.close(devnull)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - this process's stdin from now on
    if take_out:
        for stream in (sys.stdout, outstream):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        out_arg = os.dup(1)
        os.dup2(2, 1)  # print() and C-level writes to fd 1 land on stderr
        sys.stdout = sys.stderr
    return StreamSocket(in_arg, out_arg, name=name, pending=pending)


def process_messages(
    instream: Any, outstream: Any, incoming: bool = True, *, pid: WorkerId | None = None
) -> None:
    """Serve one link carried by *instream* (read) and *outstream* (write); return when it
    ends, or when pid 1 lets this worker go.

    Julia: ``process_messages(r_stream, w_stream, incoming)``, which returns at once; here
    it blocks (a Python program ends with its main thread): run it on a thread to serve
    several links. ``incoming=True``: the other side initiated (pid 1 joining this worker,
    or a worker identifying itself); call :func:`init_worker` first. ``incoming=False``:
    this worker made the link to worker *pid* and authenticates as the initiator.

    Raises:
        AuthenticationError, VersionMismatchError, ProtocolError: the handshake failed.
        ClusterError: misuse (no cookie yet; ``incoming=False`` without *pid* or on pid 1).
    """
    g = _group()
    if g._cookie is None:
        raise ClusterError("process_messages: call init_worker(cookie) first")
    if not incoming and (pid is None or not g.joined.is_set()):
        raise ClusterError(
            "process_messages(incoming=False) is for a worker dialling worker pid=...; "
            "on pid 1, addprocs(manager) uses the streams manager.connect returns"
        )
    sock = _stream_socket(instream, outstream, "the manager's streams")
    if incoming:
        conn = _conn.accept(sock, g.cookie(), g._hello())
        peer = g.serve_link(conn)
    else:
        assert pid is not None
        conn = _conn.authenticate(
            sock,
            g.cookie(),
            g._hello(),
            initiator=True,
            timeout=_config.worker_timeout(),
            peer=f"worker {pid}",
        )
        peer = g.attach_link(pid, conn)
    while not (conn.closed or peer.state is _cluster.PeerState.TERMINATED):
        if peer.pid == MASTER and g.exit_requested.wait(0.05):
            break
        if peer.pid != MASTER:
            time.sleep(0.05)


def start_worker(
    out: Any = None,
    cookie: str | bytes | None = None,
    *,
    bind: str = "127.0.0.1",
    port: int = 0,
    tls: Any = None,
    allow_insecure_network: bool = False,
) -> NoReturn:
    """Be a TCP worker: listen, print ``distexec-worker HOST:PORT`` to *out*, serve pid 1,
    exit when it lets go. Never returns. What ``python -m distexec.worker`` does.

    Julia: ``start_worker(out=stdout, cookie=readline(stdin))``. *cookie* defaults to the
    first line of stdin. A non-loopback *bind* needs *tls* (a ``TLSConfig``) or
    ``allow_insecure_network=True``. The process exits (status 1) when pid 1 has not
    joined within ``DISTEXEC_WORKER_TIMEOUT`` seconds.
    """
    if cookie is None:
        cookie = sys.stdin.buffer.readline().strip()
    if not _is_loopback(bind) and tls is None and not allow_insecure_network:
        raise ClusterError(
            f"start_worker: refusing to listen on {bind} without TLS; pass tls=TLSConfig(...) "
            "or allow_insecure_network=True"
        )
    init_worker(cookie)
    g = _cluster.group()
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.create_server((bind, port), family=family, backlog=128)
    address = (bind, sock.getsockname()[1])
    listener: Any = sock
    if tls is not None:
        from ._transport.tls import TLSListener

        g.set_tls(tls)
        listener = TLSListener(sock, tls.server_context())
    banner = f"distexec-worker {bind}:{address[1]}\n"
    stream: Any = sys.stdout if out is None else out
    try:
        stream.write(banner)
    except TypeError:
        stream.write(banner.encode())
    stream.flush()
    g.serve(listener, address)
    serve_until_released(g)


def serve_until_released(
    g: _cluster.ProcessGroup, cleanup: Callable[[], None] = lambda: None
) -> NoReturn:
    """A serving worker's last steps: exit with status 1 if pid 1 has not joined within
    ``DISTEXEC_WORKER_TIMEOUT``; then wait until released (or until nobody can come: the
    exit was requested before pid 1 joined), run *cleanup*, flush and exit with status 0."""
    timeout = _config.worker_timeout()
    deadline = time.monotonic() + timeout
    while not g.joined.wait(0.05) and not g.exit_requested.is_set():
        if time.monotonic() > deadline:
            print(
                f"distexec-worker: the master did not connect within {timeout:g} seconds; exiting",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)
    g.exit_requested.wait()
    exit_now(cleanup)


def exit_now(cleanup: Callable[[], None] = lambda: None) -> NoReturn:
    """Run *cleanup*, flush stdout and stderr, and end the process with status 0."""
    cleanup()
    for std in (sys.stdout, sys.stderr):
        try:
            std.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def master_link(
    g: _cluster.ProcessGroup,
    pid: WorkerId,
    config: WorkerConfig,
    streams: Any,
    timeout: float,
) -> Connection:
    """On pid 1: the authenticated link over what ``manager.connect`` returned.

    Accepted: ``(instream, outstream)`` byte streams; ``(sock, sock)``, one connected socket
    (or anything with ``recv_into``/``sendall``) for both directions; or an authenticated
    :class:`Connection` (``(conn, conn)``, as :class:`~distexec.ElasticManager` returns).
    pid 1 initiates the handshake, as it does over TCP.
    """
    try:
        instream, outstream = streams
    except (TypeError, ValueError):
        raise TypeError(
            f"connect() must return (instream, outstream), not {type(streams).__name__}"
        ) from None
    if isinstance(instream, Connection):
        return instream
    name = f"worker {pid} (custom transport)"
    if instream is outstream and hasattr(instream, "recv_into") and hasattr(instream, "sendall"):
        sock: Any = instream
        if not hasattr(sock, "sendmsg") or _is_ssl(sock):
            sock = _SendAll(sock)
    else:
        sock = StreamSocket(instream, outstream, name=name)
    return _conn.authenticate(
        sock, g.cookie(), g._hello(), initiator=True, timeout=timeout, peer=name
    )


def _is_ssl(sock: Any) -> bool:
    import ssl

    return isinstance(sock, ssl.SSLSocket)


class _SendAll:
    """A socket-like object without a usable ``sendmsg``: gather with ``sendall`` instead."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.family = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendmsg(self, buffers: Any, /) -> int:
        total = 0
        for b in buffers:
            self._sock.sendall(b)
            total += memoryview(b).nbytes
        return total
