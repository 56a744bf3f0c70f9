"""Mutual TLS 1.3 for links that leave the host; the cookie handshake still runs inside.

Layer: L1 transport. Imports: stdlib, distexec.errors.

:class:`TLSConfig` names files (a CA bundle, a certificate, its key): it holds no key
material, so it may be logged, and workers get it as paths on their command line or in
their environment, never as contents. Contexts are made from it where they are used
(:meth:`TLSConfig.client_context`, :meth:`TLSConfig.server_context`): TLS 1.3 only,
``CERT_REQUIRED`` in both directions, so each side proves it holds a certificate from the
cluster's CA before a single byte of distexec's protocol is read.

:class:`TLSStream` runs TLS over a connected socket through memory BIOs. One lock guards the
TLS state and no socket I/O happens under it, so the connection's reader thread and a sender
may use one stream at once (an ``ssl.SSLSocket`` gives no such promise), and it offers the
``sendmsg`` the framing layer gathers with. The TLS handshake runs at the first read or
write, under the socket's timeout at that moment (the cookie handshake's deadline).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import AuthenticationError, ProtocolError

__all__ = ["TLSConfig", "TLSListener", "TLSStream", "describe_ssl_error"]

_CHUNK = 1 << 17  # plaintext bytes per TLS write (8 records) and per socket read
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_ENV = "DISTEXEC_TLS_"

#: What an OpenSSL alert or error means for a distexec link, in words.
_REASONS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate "
    "(it was issued by a CA the peer does not know)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer rejected our certificate: it has expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a certificate and we sent none",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer rejected our certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer rejected our certificate (signature check failed)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (is TLS configured on both sides?)",
    "HTTP_REQUEST": "the peer does not speak TLS",
    "UNSUPPORTED_PROTOCOL": "the peer does not offer TLS 1.3",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not offer TLS 1.3",
    "NO_PROTOCOLS_AVAILABLE": "the peer does not offer TLS 1.3",
}


#: OpenSSL verification codes that deserve a word on what to check.
_VERIFY_HINTS = {
    18: " (it is self-signed, not issued by the cluster's CA)",
    19: " (it was issued by a CA that is not the one configured here)",
    20: " (it was issued by a CA that is not the one configured here)",
    9: " (check the clocks)",
    10: " (renew it)",
}


@dataclass(frozen=True)
class TLSConfig:
    """Where this cluster's TLS files are, and how to check the peer's name.

    * ``ca``: PEM file of the CA (or CAs) whose certificates are accepted from peers.
    * ``cert``: PEM file with this process's certificate chain (the key may follow it).
    * ``key``: PEM file with the private key, if not in ``cert``.
    * ``hostname``: the name every peer's certificate must carry. ``None`` checks the
      address dialled (an IP address needs an IP entry in the certificate's SAN).
    * ``check_hostname=False`` checks only that the certificate comes from ``ca`` (as dask
      does: a dedicated CA for the cluster); say so explicitly.
    * ``worker_ca``, ``worker_cert``, ``worker_key``: the files the workers use, as seen
      there (remote hosts, or workers with certificates of their own); default: the files
      above (``worker_key`` defaults to ``key`` only while ``worker_cert`` is not given).

    Every certificate is used for both ends of a link (a worker accepts the master and
    dials other workers), so it needs both ``serverAuth`` and ``clientAuth`` usages when it
    restricts them. Keys must not be encrypted.
    """

    ca: str | os.PathLike[str]
    cert: str | os.PathLike[str]
    key: str | os.PathLike[str] | None = None
    hostname: str | None = None
    check_hostname: bool = True
    worker_ca: str | os.PathLike[str] | None = None
    worker_cert: str | os.PathLike[str] | None = None
    worker_key: str | os.PathLike[str] | None = None
    _contexts: dict[bool, ssl.SSLContext] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        for name in ("ca", "cert"):
            if not getattr(self, name):
                raise ValueError(f"TLSConfig needs {name}= (a PEM file path)")
        if not isinstance(self.check_hostname, bool):
            raise TypeError("check_hostname must be True or False")

    def __getstate__(self) -> dict[str, Any]:
        # Paths travel; contexts (which hold the private key) never do.
        return {k: v for k, v in self.__dict__.items() if k != "_contexts"}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_contexts", {})

    # ------------------------------------------------------------------ contexts

    def _context(self, server: bool) -> ssl.SSLContext:
        ctx = self._contexts.get(server)
        if ctx is not None:
            return ctx
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not server:
            ctx.check_hostname = self.check_hostname
        what = "certificate"
        try:
            ctx.load_cert_chain(os.fspath(self.cert), _opt_path(self.key))
            what = "CA file"
            ctx.load_verify_locations(cafile=os.fspath(self.ca))
        except (OSError, ssl.SSLError) as exc:
            files = (
                f"{os.fspath(self.cert)}" + (f" / {os.fspath(self.key)}" if self.key else "")
                if what == "certificate"
                else os.fspath(self.ca)
            )
            raise ValueError(f"TLS: cannot load the {what} {files}: {exc}") from exc
        self._contexts[server] = ctx
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The context for dialling: verifies the peer and presents our certificate."""
        return self._context(False)

    def server_context(self) -> ssl.SSLContext:
        """The context for accepting: requires and verifies the peer's certificate."""
        return self._context(True)

    def server_hostname(self, dialled: str) -> str | None:
        """The name to check in the certificate of the peer at *dialled*."""
        if not self.check_hostname:
            return None
        return self.hostname or dialled

    # ------------------------------------------------------------------ passing to workers

    def for_workers(self) -> TLSConfig:
        """The configuration as the workers see it (their paths)."""
        return TLSConfig(
            ca=self.worker_ca or self.ca,
            cert=self.worker_cert or self.cert,
            key=self.worker_key or (None if self.worker_cert else self.key),
            hostname=self.hostname,
            check_hostname=self.check_hostname,
        )

    def to_env(self) -> dict[str, str]:
        """Environment variables that give a worker this configuration (paths only)."""
        cfg = self.for_workers()
        env = {
            _ENV + "CA": _abs(cfg.ca),
            _ENV + "CERT": _abs(cfg.cert),
            _ENV + "CHECK_HOSTNAME": "1" if cfg.check_hostname else "0",
        }
        if cfg.key:
            env[_ENV + "KEY"] = _abs(cfg.key)
        if cfg.hostname:
            env[_ENV + "HOSTNAME"] = cfg.hostname
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TLSConfig | None:
        """The configuration :meth:`to_env` wrote, or ``None`` if there is none."""
        ca, cert = environ.get(_ENV + "CA"), environ.get(_ENV + "CERT")
        if not ca and not cert:
            return None
        if not ca or not cert:
            raise ValueError(f"{_ENV}CA and {_ENV}CERT must be set together")
        return cls(
            ca=ca,
            cert=cert,
            key=environ.get(_ENV + "KEY") or None,
            hostname=environ.get(_ENV + "HOSTNAME") or None,
            check_hostname=environ.get(_ENV + "CHECK_HOSTNAME", "1") != "0",
        )


def _opt_path(p: str | os.PathLike[str] | None) -> str | None:
    return None if p is None else os.fspath(p)


def _abs(p: str | os.PathLike[str]) -> str:
    # A relative path means the same file to a local worker started in another directory;
    # a remote path (worker_*) is kept as given.
    path = os.fspath(p)
    return path if os.path.isabs(path) or not os.path.exists(path) else os.path.abspath(path)


def describe_ssl_error(exc: BaseException) -> str:
    """What a TLS failure means, in words (the OpenSSL reason kept in brackets)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = _VERIFY_HINTS.get(exc.verify_code, "")
        return f"the peer's certificate was rejected here: {exc.verify_message}{hint}"
    reason = getattr(exc, "reason", None) or ""
    text = _REASONS.get(reason)
    if text:
        return f"{text} [{reason}]"
    return f"TLS failed: {reason or exc}"


class TLSStream:
    """A TLS session over a connected socket, with the socket methods the framing uses.

    ``recv_into``, ``sendall`` and ``sendmsg`` may run on two threads at once (one reader,
    one sender). TLS failures raise :class:`~distexec.errors.AuthenticationError` (a
    certificate problem) or :class:`~distexec.errors.ProtocolError`, both ``OSError``.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        label: str | None = None,
    ) -> None:
        self._raw = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._ssl_lock = threading.Lock()  # guards: _obj, _in, _out
        self._order_lock = threading.Lock()  # held by whoever writes to _raw (keeps the order)
        self._deferred: list[bytes] = []  # under _ssl_lock: output queued behind that writer
        self._handshake_lock = threading.Lock()  # guards: _handshaken (one handshake)
        self._handshaken = False
        self._label = label
        self.family = sock.family
        self._raw_view = memoryview(bytearray(_CHUNK))  # the reader's: socket -> _in

    # ------------------------------------------------------------------ socket surface

    def fileno(self) -> int:
        return self._raw.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._raw.settimeout(timeout)

    def setsockopt(self, *args: Any) -> None:
        self._raw.setsockopt(*args)

    def getpeername(self) -> Any:
        return self._raw.getpeername()

    def getsockname(self) -> Any:
        return self._raw.getsockname()

    def shutdown(self, how: int) -> None:
        self._raw.shutdown(how)

    def close(self) -> None:
        self._raw.close()

    def version(self) -> str | None:
        """The TLS version agreed (``"TLSv1.3"``), or ``None`` before the handshake."""
        return self._obj.version() if self._handshaken else None

    def getpeercert(self) -> dict[str, Any] | None:
        return self._obj.getpeercert() if self._handshaken else None

    def __repr__(self) -> str:
        return f"<TLSStream {self._name()} {self.version() or 'handshake pending'}>"

    # ------------------------------------------------------------------ the TLS handshake

    def _name(self) -> str:
        if self._label:
            return self._label
        try:
            addr = self._raw.getpeername()
        except OSError:
            return "the peer"
        return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)

    def _fail(self, exc: ssl.SSLError) -> OSError:
        text = f"TLS with {self._name()}: {describe_ssl_error(exc)}"
        reason = getattr(exc, "reason", "") or ""
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE" in reason.upper():
            return AuthenticationError(text)
        if "ALERT" in reason.upper() or reason in _REASONS:
            return AuthenticationError(text)
        return ProtocolError(text)

    def do_handshake(self) -> None:
        """Run the TLS handshake now (otherwise it runs at the first read or write)."""
        with self._handshake_lock:
            if self._handshaken:
                return
            while True:
                err: OSError | None = None
                with self._ssl_lock:
                    try:
                        self._obj.do_handshake()
                        done = True
                    except ssl.SSLWantReadError:
                        done = False
                    except ssl.SSLError as exc:
                        err = self._fail(exc)
                        done = True
                    out = self._out.read()
                if out:
                    try:
                        self._raw.sendall(out)  # an alert, too, is worth trying to send
                    except OSError:
                        if err is None:
                            raise
                if err is not None:
                    raise err
                if done:
                    self._handshaken = True
                    return
                data = self._raw.recv(_CHUNK)
                if not data:
                    raise ConnectionResetError(
                        f"{self._name()} closed the connection during the TLS handshake"
                    )
                with self._ssl_lock:
                    self._in.write(data)

    # ------------------------------------------------------------------ reading

    def recv_into(self, buf: memoryview | bytearray, nbytes: int = 0, /) -> int:
        if not self._handshaken:
            self.do_handshake()
        n = nbytes or len(buf)
        if n == 0:
            return 0
        while True:
            got: int | None = None
            mine = False
            with self._ssl_lock:
                if self._held():
                    try:
                        got = cast(int, self._obj.read(n, buf))  # into buf
                    except ssl.SSLWantReadError:
                        pass  # part of a record, or one with no data for us
                    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                        return 0  # close_notify, or EOF without it: both are the end
                    except ssl.SSLError as exc:
                        raise self._fail(exc) from exc
                    out = self._out.read() if self._out.pending else b""
                    # Post-handshake messages may need an answer. The reader never waits
                    # for a busy writer (that writer may be waiting for our peer to read):
                    # it queues the bytes behind it, and the writer sends them before it
                    # lets go.
                    mine = bool(out) and self._order_lock.acquire(blocking=False)
                    if out and not mine:
                        self._deferred.append(out)
            if mine:
                self._write_out(out)
            if got is not None:
                return got
            self._take_raw(self._raw.recv_into(self._raw_view))

    def _held(self) -> bool:
        """Under ``_ssl_lock``: whether TLS holds bytes (raw or decrypted) or the end, so that
        the next read needs nothing from the socket."""
        return bool(self._in.pending or self._in.eof or self._obj.pending())

    def _take_raw(self, got: int) -> None:
        """Hand *got* bytes just read into the raw buffer to TLS (0: the peer closed)."""
        with self._ssl_lock:
            if got:
                self._in.write(self._raw_view[:got])
            else:
                self._in.write_eof()

    def watch(self, seconds: float) -> bool:
        """Watch the socket for up to *seconds* without sleeping (see ``FrameReader.poll``);
        True once bytes of the next record are here, or the peer closed. Reader only."""
        if not self._handshaken:
            return False
        with self._ssl_lock:
            if self._held():
                return True
        raw, view = self._raw, self._raw_view
        deadline = time.perf_counter() + seconds
        while True:
            try:
                got = raw.recv_into(view, 0, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if time.perf_counter() < deadline:
                    continue
                return False
            self._take_raw(got)
            return True

    def idle_fd(self) -> int | None:
        """The socket's descriptor if nothing is held above it (so that its readability
        means a record is coming), else None. Reader only: nobody else moves bytes up."""
        if not self._handshaken:
            return None
        with self._ssl_lock:
            if self._held():
                return None
        return self._raw.fileno()

    # ------------------------------------------------------------------ writing

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None:
        if self._handshaken and type(data) in (bytes, bytearray) and len(data) <= _CHUNK:
            with self._ssl_lock:  # the usual small message: one write, as _send_views does
                try:
                    self._obj.write(data)
                except ssl.SSLError as exc:
                    raise self._fail(exc) from exc
                out = self._out.read()
                self._order_lock.acquire()
            self._write_out(out)
            return
        self._send_views(deque([memoryview(data).cast("B")]))

    def sendmsg(self, buffers: Sequence[bytes | bytearray | memoryview], /) -> int:
        views = deque(memoryview(b).cast("B") for b in buffers)
        total = sum(v.nbytes for v in views)
        self._send_views(views)
        return total

    def _send_views(self, views: deque[memoryview]) -> None:
        if not self._handshaken:
            self.do_handshake()
        while views:
            with self._ssl_lock:
                # Encrypt up to about _CHUNK bytes (small parts share records), then send
                # them outside the TLS lock, holding the order lock from inside it.
                budget = _CHUNK
                while views and budget > 0:
                    v = views[0]
                    if v.nbytes > budget:
                        views[0] = v[budget:]
                        v = v[:budget]
                    else:
                        views.popleft()
                    if v.nbytes:
                        try:
                            self._obj.write(v)
                        except ssl.SSLError as exc:
                            raise self._fail(exc) from exc
                    budget -= v.nbytes
                out = self._out.read()
                self._order_lock.acquire()
            self._write_out(out)

    def _write_out(self, out: bytes) -> None:
        """Send *out* holding the order lock (taken under the TLS lock), then whatever was
        queued behind it, and let go."""
        try:
            while True:
                self._raw.sendall(out)
                with self._ssl_lock:
                    if not self._deferred:
                        self._order_lock.release()
                        return
                    out = b"".join(self._deferred)
                    self._deferred.clear()
        except BaseException:
            self._order_lock.release()
            raise


class TLSListener:
    """A listening socket whose ``accept`` returns :class:`TLSStream` s (server side).

    The handshake runs in whoever first reads the accepted stream (the cookie handshake's
    thread, under its deadline), never in the accept loop.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._context = context
        self.family = sock.family

    def accept(self) -> tuple[TLSStream, Any]:
        s, addr = self._sock.accept()
        try:
            return TLSStream(s, self._context, server_side=True), addr
        except BaseException:
            s.close()
            raise

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        return f"<TLSListener {self._sock.getsockname()}>"
