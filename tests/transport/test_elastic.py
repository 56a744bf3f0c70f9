"""ElasticManager: workers started by anyone join the running cluster with ``--join``.

Layer: tests. Imports: stdlib, pytest, cloudpickle, helpers, tlscerts, distexec.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from helpers import wait_until
from tlscerts import Certs

import distexec as dx

pytestmark = [pytest.mark.timeout(90)]

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def elastic(no_leaked_workers: None) -> Iterator[dx.ElasticManager]:
    mgr = dx.ElasticManager()
    yield mgr
    mgr.close()
    live = [p for p in dx.workers() if p != 1]
    if live:
        dx.rmprocs(live)


@pytest.fixture
def cookie_file(tmp_path: Path) -> Path:
    path = tmp_path / "cookie"
    path.write_text(dx.cluster_cookie() + "\n")
    path.chmod(0o600)
    return path


def join(mgr: dx.ElasticManager, *args: str, stdin: bytes | None = None) -> subprocess.Popen[str]:
    host, port = mgr.address
    proc = subprocess.Popen(
        [sys.executable, "-m", "distexec.worker", "--join", f"{host}:{port}", *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin.decode())
        proc.stdin.close()  # a joined worker does not need stdin: EOF must not end it
    return proc


def errors(proc: subprocess.Popen[str]) -> str:
    """What an ended worker said on stderr."""
    assert proc.stderr is not None
    return proc.stderr.read()


def ospid_of(pid: int) -> int:
    return dx.remotecall_fetch(os.getpid, pid)


def ask(pid: int) -> int:
    import distexec as dx

    return dx.remotecall_fetch(dx.myid, pid)


def test_a_worker_joins_works_and_leaves(elastic: dx.ElasticManager, cookie_file: Path) -> None:
    assert dx.addprocs(elastic) == []  # nothing waiting: returns at once, as in Julia
    proc = join(elastic, "--cookie-file", str(cookie_file))
    wait_until(lambda: dx.workers() != [1], timeout=30, what="the worker to join")
    [pid] = dx.workers()
    assert ospid_of(pid) == proc.pid
    assert dx.remotecall_fetch(dx.myid, pid) == pid
    assert pid in dx.default_worker_pool().workers()
    assert pid in elastic.active
    dx.rmprocs(pid)
    assert dx.workers() == [1] and pid in elastic.terminated
    assert proc.wait(10) == 0
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert f"joined {elastic.address[0]}:{elastic.address[1]} as worker {pid}" in out


def test_several_join_by_stdin_and_reach_each_other(elastic: dx.ElasticManager) -> None:
    cookie = dx.cluster_cookie().encode() + b"\n"
    procs = [join(elastic, stdin=cookie) for _ in range(2)]
    wait_until(lambda: len(dx.workers()) == 2, timeout=30, what="two workers to join")
    a, b = dx.workers()
    assert sorted(ospid_of(p) for p in (a, b)) == sorted(p.pid for p in procs)
    assert dx.remotecall_fetch(ask, b, a) == a  # all_to_all: b dials a where a listens
    assert dx.remotecall_fetch(ask, a, b) == b
    assert dx.pmap(abs, range(-4, 0)) == [4, 3, 2, 1]
    dx.rmprocs(a, b)
    assert [p.wait(10) for p in procs] == [0, 0]


def test_a_readable_cookie_file_is_refused(elastic: dx.ElasticManager, cookie_file: Path) -> None:
    cookie_file.chmod(0o644)
    proc = join(elastic, "--cookie-file", str(cookie_file))
    assert proc.wait(30) == 2
    assert "readable by others; chmod 600" in errors(proc)
    assert dx.workers() == [1]


def test_a_wrong_cookie_does_not_join(elastic: dx.ElasticManager, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not-the-cookie\n")
    bad.chmod(0o600)
    proc = join(elastic, "--cookie-file", str(bad))
    assert proc.wait(30) == 1
    err = errors(proc)
    assert "could not join" in err and "cookie" in err
    assert dx.workers() == [1]
    # pid 1 lost nothing: the next worker to come joins.
    good = join(elastic, stdin=dx.cluster_cookie().encode() + b"\n")
    wait_until(lambda: dx.workers() != [1], timeout=30, what="the good worker to join")
    dx.rmprocs(dx.workers())
    assert good.wait(10) == 0


def test_strangers_get_nothing(elastic: dx.ElasticManager) -> None:
    with socket.create_connection(elastic.address) as s:
        s.settimeout(10)
        challenge = b""
        while len(challenge) < 37:
            chunk = s.recv(37 - len(challenge))
            assert chunk
            challenge += chunk
        assert challenge[:4] == b"DXEC"  # pid 1's nonce: it proves nothing first
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 100)
        assert s.recv(100) == b""  # dropped without a word
    with socket.create_connection(elastic.address) as s:
        s.close()  # and one that just goes away
    assert dx.workers() == [1]
    assert not elastic._pending


def test_an_unreachable_master_is_reported(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cookie = tmp_path / "c"
    cookie.write_text("x\n")
    cookie.chmod(0o600)
    argv = [sys.executable, "-m", "distexec.worker", "--join", f"127.0.0.1:{port}"]
    proc = subprocess.run(
        [*argv, "--cookie-file", str(cookie)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert "cannot reach pid 1 at" in proc.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "distexec.worker",
            "--join",
            "nowhere",
            "--cookie-file",
            str(cookie),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--join wants HOST:PORT" in bad.stderr


def test_non_loopback_needs_tls_or_consent() -> None:
    with pytest.raises(ValueError, match="allow_insecure_network=True"):
        dx.ElasticManager(("0.0.0.0", 0))
    with dx.ElasticManager(("0.0.0.0", 0), allow_insecure_network=True) as mgr:
        assert mgr.address[1] > 0
    assert mgr.closed


def test_elastic_with_tls(
    certs: Certs, no_leaked_workers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distexec import _cluster, _config
    from distexec._transport.tls import TLSStream

    # A plain worker and a TLS listener each wait for the other to speak first: the
    # handshake deadline ends that (shortened here from its 10 s).
    monkeypatch.setattr(_config, "HANDSHAKE_TIMEOUT", 2.0)

    cfg = certs.config()
    cookie = dx.cluster_cookie().encode() + b"\n"
    tls_args = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.node)]
    with dx.ElasticManager(tls=cfg) as mgr:
        try:
            plain = join(mgr, stdin=cookie)  # no TLS: refused
            assert plain.wait(30) == 1
            assert "could not join" in errors(plain)
            procs = [join(mgr, *tls_args, stdin=cookie) for _ in range(2)]
            wait_until(lambda: len(dx.workers()) == 2, timeout=30, what="two TLS workers")
            a, b = dx.workers()
            for p in (a, b):
                sock = _cluster.group().peer(p).conn.sock  # type: ignore[union-attr]
                assert isinstance(sock, TLSStream) and sock.version() == "TLSv1.3"
            assert dx.remotecall_fetch(ask, b, a) == a  # worker to worker: TLS too
        finally:
            live = [p for p in dx.workers() if p != 1]
            if live:
                dx.rmprocs(live)
        assert [p.wait(10) for p in procs] == [0, 0]
        # A worker whose certificate the cluster does not trust is refused.
        foreign = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.foreign)]
        stranger = join(mgr, *foreign, stdin=cookie)
        assert stranger.wait(30) == 1
        assert "could not join" in errors(stranger)
        assert dx.workers() == [1]


def test_a_join_the_cluster_refuses_is_dropped(no_leaked_workers: None) -> None:
    [local] = dx.addprocs(1)  # all_to_all
    try:
        with dx.ElasticManager(topology="master_worker") as mgr:
            proc = join(mgr, stdin=dx.cluster_cookie().encode() + b"\n")
            assert proc.wait(30) == 1
            assert "could not join" in errors(proc)
            assert not mgr._pending and dx.workers() == [local]
    finally:
        dx.rmprocs(local)
