"""ElasticManager: workers started anywhere join a running cluster by dialling pid 1.

Layer: L3 managers. Imports: stdlib, distexec._config, distexec._transport, .base.

Julia: ``ElasticManager`` (ClusterManagers.jl, now ElasticClusterManager.jl). pid 1 listens
on ``address``; a worker started by anyone, anywhere, with::

    python -m distexec.worker --join HOST:PORT --cookie-file FILE   # or the cookie on stdin

dials it, and joins: it shows up in ``workers()`` and in the default pool, and leaves with
``rmprocs``. Each connection is authenticated before anything else happens: pid 1 runs
the cookie challenge as the initiator, so the dialling side must prove it knows the cookie
before pid 1 proves anything, and nothing is unpickled before both did (with ``tls=``,
inside mutual TLS). At most :attr:`MAX_UNAUTHENTICATED` handshakes run at once; a stranger
costs a thread for at most ``HANDSHAKE_TIMEOUT`` seconds and never a pid.

Every authenticated connection is added by ``addprocs(manager)`` on a background thread
(workers arriving together are added together), so ``addprocs(manager)`` by hand is never
needed; called by hand it adds whatever is waiting and returns at once, as Julia's does.
The worker tells pid 1 in its hello where it listens for the other workers (by default on
the address it reached pid 1 from).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Mapping
from typing import Any

from .. import _config
from .._transport import connection as _conn
from .._transport.connection import Connection
from ..errors import ClusterError
from .base import ClusterManager, WorkerConfig

__all__ = ["ElasticManager"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class ElasticManager(ClusterManager):
    """Listens on *address* (``(host, port)``; port 0: any free one) for joining workers.

    *cookie* sets the cluster cookie (Julia's ``cookie=``); otherwise workers need the one
    ``cluster_cookie()`` returns. *topology*, *lazy* and *tls* (a ``TLSConfig``: the
    listener and every link run mutual TLS) are the ``addprocs`` keywords the joins use.
    Listening on a non-loopback address without *tls* needs ``allow_insecure_network=True``.

    Make it on pid 1; :meth:`close` (or ``with``) stops listening, workers that joined stay.
    """

    #: Handshakes in progress at once; more connections are closed at once.
    MAX_UNAUTHENTICATED = 64

    def __init__(
        self,
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        cookie: str | None = None,
        topology: str = "all_to_all",
        lazy: bool = True,
        tls: Any = None,
        allow_insecure_network: bool = False,
    ) -> None:
        from .. import _api, _cluster

        host, port = address
        if not _is_loopback(str(host)) and tls is None and not allow_insecure_network:
            raise ValueError(
                f"ElasticManager: refusing to listen on {host} without TLS; pass "
                "tls=TLSConfig(...) or allow_insecure_network=True"
            )
        if _cluster.group().myid != 1:
            raise ClusterError("only process 1 can listen for joining workers")
        if cookie is not None:
            _api.cluster_cookie(cookie)
        self.topology = topology
        self.lazy = lazy
        self.tls = tls
        self.allow_insecure_network = allow_insecure_network
        self._server_context = tls.server_context() if tls is not None else None
        family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
        self._sock = socket.create_server((str(host), int(port)), family=family, backlog=128)
        #: Where workers dial: ``(host, port)``; give them ``f"{host}:{port}"`` for --join.
        self.address: tuple[str, int] = (str(host), self._sock.getsockname()[1])
        self._lock = threading.Lock()  # guards: _pending, _closed, _handshakes, active, terminated
        self._wakeup = threading.Condition(self._lock)
        self._pending: list[Connection] = []
        self._handshakes = 0
        self._closed = False
        #: pids that joined and are in the cluster / that left it (Julia's active/terminated).
        self.active: dict[int, WorkerConfig] = {}
        self.terminated: set[int] = set()
        self._threads = [
            threading.Thread(target=self._accept_loop, name="distexec-elastic-accept", daemon=True),
            threading.Thread(target=self._join_loop, name="distexec-elastic-join", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "listening"
        tls = " tls" if self.tls is not None else ""
        return (
            f"<ElasticManager {self.address[0]}:{self.address[1]} {state}{tls} "
            f"active={sorted(self.active)} pending={len(self._pending)}>"
        )

    def __enter__(self) -> ElasticManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening; links still being authenticated or waiting to join are dropped.
        Idempotent. Workers that joined stay in the cluster."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, []
            self._wakeup.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (Linux)
        except OSError:
            pass
        self._sock.close()
        for conn in pending:
            conn.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ listening

    def _accept_loop(self) -> None:
        while True:
            try:
                s, addr = self._sock.accept()
            except OSError:
                return
            with self._lock:
                busy = self._handshakes >= self.MAX_UNAUTHENTICATED or self._closed
                if not busy:
                    self._handshakes += 1
            if busy:
                s.close()
                continue
            threading.Thread(
                target=self._authenticate,
                args=(s, addr),
                name="distexec-elastic-handshake",
                daemon=True,
            ).start()

    def _authenticate(self, s: socket.socket, addr: Any) -> None:
        from .. import _cluster

        g = _cluster.group()
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        try:
            conn = _conn.authenticate(
                s,
                g.cookie(),
                g._hello(),
                initiator=True,
                timeout=_config.HANDSHAKE_TIMEOUT,
                peer=f"a worker joining from {where}",
                ssl_context=self._server_context,
                tls_server_side=True,
            )
        except Exception as exc:
            _cluster._log(f"ElasticManager: rejected a connection from {where}: {exc}")
            return
        finally:
            with self._lock:
                self._handshakes -= 1
        listen = conn.peer_info.get("listen")
        if not (
            isinstance(listen, list)
            and len(listen) == 2
            and isinstance(listen[0], str)
            and isinstance(listen[1], int)
        ):
            _cluster._log(f"ElasticManager: {where} did not say where it listens; dropped")
            conn.close()
            return
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._pending.append(conn)
            self._wakeup.notify_all()

    def _join_loop(self) -> None:
        from .. import _api, _cluster

        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return
            try:
                _api.addprocs(self)
            except Exception as exc:
                # Refused before launch (a topology or TLS clash): drop the waiting links,
                # or this loop would retry them forever.
                with self._lock:
                    dropped, self._pending = self._pending, []
                for conn in dropped:
                    conn.close()
                _cluster._log(f"ElasticManager: a worker could not join: {exc}")

    # ------------------------------------------------------------------ the manager interface

    def default_params(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "lazy": self.lazy,
            "tls": self.tls,
            "allow_insecure_network": self.allow_insecure_network,
        }

    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        """Hand every authenticated, waiting connection to the cluster; return at once."""
        with self._lock:
            pending, self._pending = self._pending, []
        for conn in pending:
            host, port = conn.peer_info["listen"]
            ospid = conn.peer_info.get("ospid")
            config = WorkerConfig(
                host=host,
                port=port,
                connect_at=(host, port),
                ospid=ospid if isinstance(ospid, int) else None,
                userdata={"conn": conn, "from": conn.peer},
            )
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        """The authenticated link the worker opened (pid 1 sends the join over it)."""
        conn = config.userdata["conn"]
        return conn, conn

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        with self._lock:
            if op == "register":
                self.active[pid] = config
            elif op in ("deregister", "finalize"):
                self.active.pop(pid, None)
                self.terminated.add(pid)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """The exit message is on its way; the worker leaves when it reads it (or when its
        link closes, which the cluster does next)."""
        return None
