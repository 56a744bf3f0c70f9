"""Mutual TLS 1.3 on every link: local workers, bad certificates, the listener, the rules.

Layer: tests. Imports: stdlib, pytest, psutil, helpers, distexec.

Certificates come from the ``certs`` fixture (trustme). Each failure case checks what the
user sees (the exception and the cause it names), that it comes fast, that nothing from
the failed link was unpickled here, and that no worker is left behind.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import helpers
import psutil
import pytest
from tlscerts import Certs

import distexec as dx
from distexec import _cluster
from distexec._protocol import codec
from distexec._transport import connection as _conn
from distexec._transport import framing
from distexec._transport.tls import TLSListener, TLSStream

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaked_workers")]

# Workers need not import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def _no_workers_left(no_leaked_workers: None) -> Iterator[None]:
    yield
    live = [p for p in dx.workers() if p != 1]
    if live:
        dx.rmprocs(live)


def link_of(pid: int) -> Any:
    """What pid 1's link to *pid* runs over (a TLSStream when TLS is on)."""
    peer = _cluster.group().peer(pid)
    assert peer is not None and peer.conn is not None
    return peer.conn.sock


def master_link_kind() -> str:
    """Run on a worker: the kind and TLS version of its link to pid 1."""
    from distexec import _cluster

    sock = _cluster.group().peer(1).conn.sock  # type: ignore[union-attr]
    version = sock.version() if hasattr(sock, "version") else None
    return f"{type(sock).__name__} {version}"


def ask_peer(other: int) -> int:
    import distexec

    return distexec.remotecall_fetch(distexec.myid, other)


# --------------------------------------------------------------------------------------
# Working links
# --------------------------------------------------------------------------------------


def test_local_workers_over_tls(certs: Certs) -> None:
    pids = dx.addprocs(2, tls=certs.config())
    assert [dx.remotecall_fetch(dx.myid, p) for p in pids] == pids
    for p in pids:
        link = link_of(p)
        assert isinstance(link, TLSStream) and link.version() == "TLSv1.3"
        assert dx.remotecall_fetch(master_link_kind, p) == "TLSStream TLSv1.3"
    # Worker to worker: the higher pid dials the lower one, over TLS as well.
    assert dx.remotecall_fetch(ask_peer, pids[1], pids[0]) == pids[0]
    # Large buffers cross intact (many TLS records, out-of-band pickle buffers).
    blob = os.urandom(3 << 20)
    assert dx.remotecall_fetch(bytes, pids[0], bytearray(blob)) == blob
    # The workers listen on TCP only (no AF_UNIX shortcut around TLS) and got file paths,
    # not key material, on their command line and in their environment.
    for p in pids:
        assert isinstance(_cluster.group().peer(p).address, tuple)  # type: ignore[union-attr]
        proc = psutil.Process(dx.remotecall_fetch(os.getpid, p))
        assert "--unix" in proc.cmdline()  # asked for, and ignored under TLS
        assert proc.environ()["DISTEXEC_TLS_CERT"] == str(certs.node)
        assert not any("PRIVATE KEY" in a for a in proc.cmdline())
    assert sorted(dx.default_worker_pool().workers()) == pids
    dx.rmprocs(pids)
    assert dx.workers() == [1]


def test_a_plain_client_cannot_talk_to_a_tls_worker(certs: Certs) -> None:
    [pid] = dx.addprocs(1, tls=certs.config())
    address = _cluster.group().peer(pid).address  # type: ignore[union-attr]
    with pytest.raises((dx.ProtocolError, OSError)):
        _conn.dial(address, dx.cluster_cookie().encode(), {}, timeout=5, peer="test")
    assert dx.remotecall_fetch(dx.myid, pid) == pid  # the worker is unharmed


def test_later_workers_join_the_clusters_tls(certs: Certs) -> None:
    first = dx.addprocs(1, tls=certs.config())
    second = dx.addprocs(1)  # tls=None keeps what live workers use
    assert isinstance(link_of(second[0]), TLSStream)
    assert dx.remotecall_fetch(ask_peer, second[0], first[0]) == first[0]
    with pytest.raises(dx.ClusterError, match="TLS with another TLSConfig"):
        dx.addprocs(1, tls=certs.config(check_hostname=False))
    dx.rmprocs(first + second)
    # With no workers left the cluster may change its mind.
    [plain] = dx.addprocs(1)
    assert not isinstance(link_of(plain), TLSStream)
    with pytest.raises(dx.ClusterError, match="links are plain"):
        dx.addprocs(1, tls=certs.config())


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"cert_from": "othername", "hostname": "other.example"}, id="hostname"),
        pytest.param({"cert_from": "othername", "check_hostname": False}, id="no-name-check"),
    ],
)
def test_names_other_than_the_address(certs: Certs, kw: dict[str, Any]) -> None:
    cfg = certs.config(cert=getattr(certs, kw.pop("cert_from")), **kw)
    [pid] = dx.addprocs(1, tls=cfg)
    assert dx.remotecall_fetch(dx.myid, pid) == pid


def test_tls_config_is_paths_only(certs: Certs) -> None:
    cfg = certs.config()
    ctx = cfg.client_context()
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert cfg.server_context().verify_mode is ssl.CERT_REQUIRED
    back = pickle.loads(pickle.dumps(cfg))  # no context (with its key) inside
    assert back == cfg and b"PRIVATE" not in pickle.dumps(cfg)
    with pytest.raises(TypeError):
        pickle.dumps(ctx)
    assert set(cfg.to_env()) == {
        "DISTEXEC_TLS_CA",
        "DISTEXEC_TLS_CERT",
        "DISTEXEC_TLS_CHECK_HOSTNAME",
    }
    assert dx.TLSConfig.from_env(cfg.to_env()) == dx.TLSConfig(
        ca=str(certs.ca), cert=str(certs.node)
    )


# --------------------------------------------------------------------------------------
# Failures: wrong CA, expired, wrong name, missing files
# --------------------------------------------------------------------------------------

tls_failures: list[Any] = [
    pytest.param(
        lambda c: c.config(worker_cert=c.foreign),
        "issued by a CA that is not the one configured here",
        id="worker-cert-from-another-ca",
    ),
    pytest.param(
        lambda c: c.config(worker_ca=c.foreign_ca),
        r"does not trust our certificate.*UNKNOWN_CA",
        id="worker-trusts-another-ca",
    ),
    pytest.param(
        lambda c: c.config(worker_cert=c.expired),
        "certificate has expired",
        id="worker-cert-expired",
    ),
    pytest.param(
        lambda c: c.config(cert=c.expired, worker_cert=c.node),
        r"rejected our certificate: it has expired",
        id="master-cert-expired",
    ),
    pytest.param(
        lambda c: c.config(cert=c.othername),
        "mismatch, certificate is not valid for '127.0.0.1'",
        id="wrong-name",
    ),
]


@pytest.mark.parametrize(("make", "cause"), tls_failures)
def test_tls_failures_are_clear_fast_and_unpickle_nothing(
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Certs], dx.TLSConfig],
    cause: str,
) -> None:
    decoded: list[object] = []
    real_decode = codec.decode
    monkeypatch.setattr(codec, "decode", lambda *a, **k: decoded.append(a) or real_decode(*a, **k))
    started = time.monotonic()
    with pytest.raises(dx.AuthenticationError, match=cause) as info:
        dx.addprocs(1, tls=make(certs))
    assert time.monotonic() - started < 15
    assert "TLS with worker" in str(info.value)  # says which link
    assert decoded == []
    assert dx.workers() == [1]


def test_unloadable_files_fail_before_anything_starts(certs: Certs, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="cannot load the certificate"):
        dx.addprocs(1, tls=certs.config(cert=tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="cannot load the CA file"):
        dx.addprocs(1, tls=certs.config(ca=certs.node.parent / "nope.pem"))
    with pytest.raises(TypeError, match="tls must be a TLSConfig"):
        dx.addprocs(1, tls="yes")
    # A worker whose files do not load (its own paths) says so and exits.
    with pytest.raises(dx.LaunchError, match="cannot load the certificate"):
        dx.addprocs(1, tls=certs.config(worker_cert=tmp_path / "gone.pem"))
    assert dx.workers() == [1]


# --------------------------------------------------------------------------------------
# A TLS worker on its own: no certificate, no TLS
# --------------------------------------------------------------------------------------


@pytest.fixture
def tls_worker(certs: Certs) -> Iterator[tuple[tuple[str, int], bytes, subprocess.Popen[bytes]]]:
    """A bare ``python -m distexec.worker`` with TLS flags: (address, cookie, process)."""
    cookie = b"standalone-test-cookie"
    argv = [sys.executable, "-m", "distexec.worker"]
    argv += ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.node)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(cookie + b"\n")
    proc.stdin.flush()
    banner = proc.stdout.readline().decode()
    assert banner.startswith("distexec-worker 127.0.0.1:"), banner
    assert "unix=" not in banner
    address = ("127.0.0.1", int(banner.split(":")[1]))
    try:
        yield address, cookie, proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def _client_context(certs: Certs, *, cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(certs.ca))
    if cert:
        ctx.load_cert_chain(str(certs.node))
    return ctx


def test_a_client_without_certificate_is_refused(
    certs: Certs, tls_worker: tuple[tuple[str, int], bytes, subprocess.Popen[bytes]]
) -> None:
    address, cookie, proc = tls_worker
    started = time.monotonic()
    with pytest.raises(dx.AuthenticationError, match="requires a certificate and we sent none"):
        _conn.dial(
            address,
            cookie,
            {},
            timeout=10,
            peer="the worker",
            ssl_context=_client_context(certs, cert=False),
        )
    assert time.monotonic() - started < 5
    # With a certificate (and the cookie) the same worker answers: it only dropped that link.
    conn = _conn.dial(
        address,
        cookie,
        {},
        timeout=10,
        peer="the worker",
        ssl_context=_client_context(certs, cert=True),
    )
    assert conn.peer_info["ospid"] == proc.pid
    conn.close()
    proc.kill()
    _, err = proc.communicate(timeout=10)
    assert b"rejected a connection" in err and b"sent no certificate" in err


def test_a_wrong_cookie_inside_tls_is_still_refused(
    certs: Certs, tls_worker: tuple[tuple[str, int], bytes, subprocess.Popen[bytes]]
) -> None:
    address, _, _ = tls_worker
    with pytest.raises(dx.AuthenticationError, match="does not know the cluster cookie"):
        _conn.dial(
            address,
            b"not-the-cookie",
            {},
            timeout=10,
            peer="the worker",
            ssl_context=_client_context(certs, cert=True),
        )


def test_tls_listener_hands_out_streams_that_handshake_lazily(certs: Certs) -> None:
    cfg = certs.config()
    server = socket.create_server(("127.0.0.1", 0))
    listener = TLSListener(server, cfg.server_context())
    client = socket.create_connection(server.getsockname())
    stream, _ = listener.accept()
    assert stream.version() is None  # nothing happened yet
    other = TLSStream(client, cfg.client_context(), server_side=False, server_hostname="127.0.0.1")
    t = threading.Thread(target=other.sendall, args=(b"x" * 100_000,))
    t.start()
    buf = bytearray(100_000)
    got = 0
    while got < len(buf):
        got += stream.recv_into(memoryview(buf)[got:])
    t.join()
    assert bytes(buf) == b"x" * 100_000 and stream.version() == "TLSv1.3"
    other.shutdown(socket.SHUT_RDWR)
    assert stream.recv_into(bytearray(10)) == 0  # EOF without close_notify is EOF
    for s in (stream, other, listener):
        s.close()


def _tls_pair(certs: Certs) -> tuple[TLSStream, TLSStream]:
    """A handshaken client and server stream over a loopback TCP connection."""
    cfg = certs.config()
    server = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(server.getsockname())
    server_sock, _ = server.accept()
    server.close()
    a = TLSStream(client_sock, cfg.client_context(), server_side=False, server_hostname="127.0.0.1")
    b = TLSStream(server_sock, cfg.server_context(), server_side=True)
    t = threading.Thread(target=b.do_handshake)
    t.start()
    a.do_handshake()
    t.join(10)
    return a, b


def _message(body: bytes) -> bytes:
    (part,) = framing.pack(2, 7, 0, body)
    return bytes(part)


def test_a_tls_stream_is_polled_and_loses_nothing(certs: Certs) -> None:
    """``FrameReader.poll`` watches a TLS stream's socket as it does a plain one's: it sees
    a record coming, gives up on silence, and a record it pulled in is read whole."""
    a, b = _tls_pair(certs)
    reader = framing.FrameReader(b)
    try:
        b.watch(0.001)  # takes in the server's session tickets, if any, before the check
        assert b.idle_fd() == b.fileno()  # nothing held above the socket
        assert reader.poll(0.02) is False
        for _ in range(2):  # the backoff after that miss
            reader.poll(0.02)
        sender = threading.Timer(0.005, a.sendall, (_message(b"hello"),))
        sender.start()
        started = time.monotonic()
        assert reader.poll(10.0) is True
        assert time.monotonic() - started < 5.0  # when the record came, not at 10 s
        sender.join()
        # Two messages in one go: the poll pulls bytes into TLS, above the socket, so the
        # socket alone no longer tells whether a message waits.
        a.sendall(_message(b"one") + _message(b"two"))
        assert reader.poll(10.0) is True
        assert bytes(reader.read().body) == b"hello"
        assert bytes(reader.read().body) == b"one"
        assert reader.buffered or b.idle_fd() is None  # "two" is here, above the socket
        assert reader.poll(0.0) is True
        assert bytes(reader.read().body) == b"two"
        a.shutdown(socket.SHUT_RDWR)  # the peer goes: the poll ends, the read says so
        assert reader.poll(10.0) is True
        with pytest.raises(EOFError):
            reader.read()
    finally:
        a.close()
        b.close()


def test_a_caller_reads_its_own_reply_over_tls(certs: Certs) -> None:
    """A quiet TLS link is watched like a plain one, so a blocking caller reads its own reply
    instead of waiting for a reader thread to hand it over; an interrupt in the middle of
    that read leaves the link whole; a worker killed while its link is quiet is noticed."""
    [w] = dx.addprocs(1, tls=certs.config())
    for i in range(50):
        assert dx.remotecall_fetch(helpers.identity, w, i) == i
    helpers.wait_until(lambda: helpers.link_reader(w) == _cluster._IDLE, what="a quiet link")
    t = helpers.interrupt_while_the_caller_reads(w)
    with pytest.raises(KeyboardInterrupt):
        dx.remotecall_fetch(time.sleep, w, 1.0)
    t.join(10)
    for size in (10, 300_000, 10, 3_000_000, 10):  # large replies go to a reader thread
        data = os.urandom(size)
        assert dx.remotecall_fetch(helpers.identity, w, data) == data
    for i in range(20):
        assert dx.remotecall_fetch(helpers.identity, w, ("after", i)) == ("after", i)
    helpers.wait_until(lambda: helpers.link_reader(w) == _cluster._IDLE, what="quiet again")
    os.kill(dx.remotecall_fetch(os.getpid, w), signal.SIGKILL)
    helpers.wait_until(lambda: w not in dx.workers(), what="the loss to be noticed")


# --------------------------------------------------------------------------------------
# Non-loopback listeners need TLS or an explicit opt-in
# --------------------------------------------------------------------------------------


def test_a_non_loopback_bind_needs_tls_or_explicit_consent(certs: Certs) -> None:
    with pytest.raises(ValueError, match="allow_insecure_network=True"):
        dx.addprocs(1, restrict=False)
    assert dx.workers() == [1]
    [insecure] = dx.addprocs(1, restrict=False, allow_insecure_network=True)
    assert not isinstance(link_of(insecure), TLSStream)
    dx.rmprocs(insecure)
    # 0.0.0.0 is no name a certificate carries: check the CA only.
    [secure] = dx.addprocs(1, restrict=False, tls=certs.config(check_hostname=False))
    assert isinstance(link_of(secure), TLSStream)
    with pytest.raises(TypeError, match="allow_insecure_network must be True or False"):
        dx.addprocs(1, allow_insecure_network="yes")


def test_the_worker_refuses_a_plain_non_loopback_bind(certs: Certs) -> None:
    argv = [sys.executable, "-m", "distexec.worker", "--bind", "0.0.0.0"]
    proc = subprocess.run(
        argv, input=b"c\n", capture_output=True, timeout=30, env=_env_without_tls()
    )
    assert proc.returncode == 2
    assert b"refusing to listen on 0.0.0.0 without TLS" in proc.stderr
    # With TLS files it listens there.
    tls_argv = [*argv, "--tls-ca", str(certs.ca), "--tls-cert", str(certs.node)]
    worker = subprocess.Popen(
        tls_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env_without_tls()
    )
    try:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(b"c\n")
        worker.stdin.flush()
        assert worker.stdout.readline().startswith(b"distexec-worker 0.0.0.0:")
    finally:
        worker.kill()
        worker.communicate(timeout=10)


def _env_without_tls() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISTEXEC_TLS_") and k != "DISTEXEC_ALLOW_INSECURE_NETWORK"
    }


def test_worker_tls_errors_exit_with_a_message(certs: Certs, tmp_path: Any) -> None:
    argv = [sys.executable, "-m", "distexec.worker", "--tls-ca", str(certs.ca)]
    argv += ["--tls-cert", str(tmp_path / "none.pem")]
    proc = subprocess.run(argv, input=b"c\n", capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"cannot load the certificate" in proc.stderr
