"""Group C of the reliability study: link faults, through a userspace fault proxy.

Each worker here is a ``python -m distexec.worker`` over TCP whose master dials a
:class:`faultproxy.FaultProxy` instead of the worker itself. Faults: reset, blackhole (with
heartbeats, and with only the kernel's TCP_USER_TIMEOUT), a short blip, a slow link,
garbage and flipped bits. Detection times are printed.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Iterator

import helpers
import pytest
from conftest import HB_INTERVAL, HB_TIMEOUT
from faultproxy import FaultProxy, ProxiedWorkers

import distexec as dx
from distexec import _cluster, _heartbeat
from distexec._protocol import codec
from distexec._transport import framing
from distexec._transport.connection import Connection

pytestmark = pytest.mark.timeout(180)


def _proxied(env: dict[str, str] | None = None) -> Iterator[tuple[int, FaultProxy]]:
    manager = ProxiedWorkers(1, env={"DISTEXEC_LINK_TIMEOUT": "2", **(env or {})})
    (pid,) = dx.addprocs(manager)
    try:
        yield pid, manager.proxies[0]
    finally:
        manager.proxies[0].pass_through()
        if pid in dx.workers():
            dx.rmprocs(pid, waitfor=30)
        manager.close()


@pytest.fixture
def proxied(no_leaked_workers: None) -> Iterator[tuple[int, FaultProxy]]:
    """One worker behind a fault proxy; removed (and the proxy closed) afterwards."""
    yield from _proxied()


@pytest.fixture
def proxied_mac(
    no_leaked_workers: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, FaultProxy]]:
    """The same with per-frame MACs: the master asks for them (DISTEXEC_INTEGRITY=frame)
    before the link is made; the worker says ``auto`` (off on loopback), and one side's
    wish is enough."""
    monkeypatch.setenv("DISTEXEC_INTEGRITY", "frame")
    yield from _proxied({"DISTEXEC_INTEGRITY": "auto"})


@pytest.fixture
def proxied_no_mac(
    no_leaked_workers: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, FaultProxy]]:
    """The same with integrity from the handshake only (``auto`` on a loopback link), so a
    corrupted frame meets the checks behind the MAC."""
    monkeypatch.setenv("DISTEXEC_INTEGRITY", "auto")
    yield from _proxied({"DISTEXEC_INTEGRITY": "auto"})


def _link_has_mac(pid: int) -> bool:
    peer = _cluster.group().peer(pid)
    assert peer is not None and peer.conn is not None
    return peer.conn.integrity


@pytest.fixture
def count_unpickles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every unpickling of a message body in this process (the study's "0 unpickle")."""
    calls = [0]
    real = codec.loads

    def counting(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "loads", counting)
    return calls


def _quiet(pid: int) -> None:
    """Let the group's own traffic (membership, refs) settle, so offsets count from a frame."""
    for _ in range(3):
        assert dx.remotecall_fetch(abs, pid, -1) == 1


def test_calls_pass_through_the_proxy(proxied: tuple[int, FaultProxy]) -> None:
    pid, proxy = proxied
    assert dx.remotecall_fetch(os.getpid, pid) != os.getpid()
    assert proxy.forwarded["up"] > 0 and proxy.forwarded["down"] > 0
    peer = _cluster.group().peer(pid)
    assert peer is not None and peer.conn is not None
    sock = peer.conn.sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) > 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_reset_fails_the_calls_at_once(proxied: tuple[int, FaultProxy]) -> None:
    """C2: an RST on the link: WorkerDiedError within a second, saying "reset"."""
    pid, proxy = proxied
    fut = dx.remotecall(time.sleep, pid, 60)
    t0 = time.monotonic()
    proxy.reset()
    with pytest.raises(dx.WorkerDiedError) as info:
        fut.fetch(timeout=30)
    elapsed = time.monotonic() - t0
    print(f"connection reset noticed after {elapsed:.3f} s (target <= 1 s): {info.value}")
    assert "reset" in str(info.value) or "closed" in str(info.value)
    assert pid not in dx.workers()


def test_blackhole_is_found_by_heartbeats(
    proxied: tuple[int, FaultProxy], fast_heartbeat: object
) -> None:
    """C1: the link goes silent both ways (no FIN, no RST): heartbeats find it within the
    heartbeat timeout; the calls fail and the worker is killed."""
    pid, proxy = proxied
    fut = dx.remotecall(time.sleep, pid, 60)
    _quiet_ok = dx.remotecall_fetch(abs, pid, -2)
    assert _quiet_ok == 2
    t0 = time.monotonic()
    proxy.blackhole()
    with pytest.raises(dx.WorkerUnresponsiveError):
        fut.fetch(timeout=30)
    elapsed = time.monotonic() - t0
    print(
        f"blackholed link found by heartbeats after {elapsed:.2f} s "
        f"(interval {HB_INTERVAL} s, timeout {HB_TIMEOUT} s)"
    )
    assert elapsed < HB_TIMEOUT + 10


def test_blackhole_with_data_in_flight_is_found_by_tcp_user_timeout(
    proxied: tuple[int, FaultProxy], no_heartbeat: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C1, the kernel's part: heartbeats off, a large send into a silent link. The proxy
    stops reading, the window closes, and TCP_USER_TIMEOUT (the link timeout, 1 s here)
    ends the link: WorkerDiedError saying the link timed out."""
    pid, proxy = proxied
    peer = _cluster.group().peer(pid)
    assert peer is not None and peer.conn is not None
    # The master's link timeout, shorter than the worker's 2 s: otherwise the worker's own
    # keepalive may end its side first and the master sees the proxy close (a broken pipe),
    # not its kernel's verdict, which is what this test is about.
    framing.tune(peer.conn.sock, 1.0)
    proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises(dx.WorkerDiedError) as info:
        dx.remotecall_fetch(len, pid, bytes(256 << 20))
    elapsed = time.monotonic() - t0
    print(
        f"silent link with data in flight ended by the kernel after {elapsed:.2f} s: {info.value}"
    )
    assert "timed out" in str(info.value)
    assert elapsed < 60


def _link(pid: int) -> tuple[_cluster.ProcessGroup, _cluster.Peer, Connection]:
    """This process's group, *pid*'s peer record and its live connection."""
    group = _cluster.group()
    peer = group.peer(pid)
    assert peer is not None and peer.conn is not None
    return group, peer, peer.conn


def test_a_writers_broken_pipe_lets_the_reader_tell_the_cause(
    proxied: tuple[int, FaultProxy], no_heartbeat: None
) -> None:
    """The kernel reports a socket's error once: when a link's reader takes it (a timeout, a
    reset), a writer blocked on the same link gets a bare EPIPE. The loss must be told by
    the reader's cause, whichever thread reports first. The race is forced here: the writer's
    echo first, the reader's verdict a moment later, on a real link."""
    pid, _proxy = proxied
    group, peer, conn = _link(pid)
    fut = dx.remotecall(time.sleep, pid, 60)
    echo = BrokenPipeError(errno.EPIPE, "Broken pipe")
    writer = threading.Thread(target=group._write_failed, args=(peer, conn, echo, True))
    t0 = time.monotonic()
    writer.start()
    time.sleep(0.2)  # the fault's order (the echo first), not a wait for a condition
    group._peer_lost(peer, conn, TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
    writer.join(10)
    assert not writer.is_alive()
    with pytest.raises(dx.WorkerDiedError) as info:
        fut.fetch(timeout=10)
    assert "timed out" in str(info.value), info.value
    assert "Broken pipe" not in str(info.value)
    assert time.monotonic() - t0 < 5


def test_a_writers_timeout_is_told_when_the_reader_saw_only_the_close(
    proxied: tuple[int, FaultProxy], no_heartbeat: None
) -> None:
    """The other way round: a writer took the kernel's verdict (a timeout) and the reader
    then saw only the close. The loss is told by the writer's cause, and the calls fail
    through the reader, which declares the loss."""
    pid, _proxy = proxied
    group, peer, conn = _link(pid)
    fut = dx.remotecall(time.sleep, pid, 60)
    group._write_failed(peer, conn, TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
    assert pid in dx.workers()  # not declared by the writer: the reader does that
    group._peer_lost(peer, conn, EOFError("the peer closed the connection"))
    with pytest.raises(dx.WorkerDiedError) as info:
        fut.fetch(timeout=10)
    assert "timed out" in str(info.value), info.value


def test_short_blip_is_no_error(proxied: tuple[int, FaultProxy], fast_heartbeat: object) -> None:
    """C3: the link goes silent for a third of the heartbeat timeout, five times: no error,
    no unresponsive verdict, every call correct."""
    pid, proxy = proxied
    before = _heartbeat.statistics().unresponsive
    for i in range(5):
        fut = dx.remotecall(helpers.sleep_and_return, pid, 0.1)
        proxy.blackhole()
        time.sleep(HB_TIMEOUT / 3)  # the fault's duration, not a wait for a condition
        proxy.pass_through()
        assert fut.fetch(timeout=30) == 0.1
        assert dx.remotecall_fetch(abs, pid, -i) == i
    false_positives = _heartbeat.statistics().unresponsive - before
    print(f"blips of {HB_TIMEOUT / 3:.2f} s: {false_positives} false unresponsive verdicts")
    assert false_positives == 0


def test_slow_link_is_not_a_dead_one(
    proxied: tuple[int, FaultProxy], fast_heartbeat: object
) -> None:
    """C4: 2 MB/s both ways, 4 MiB each way (about 2 s, past the heartbeat timeout), while
    heartbeats run: no false verdict (data arriving counts as a sign of life)."""
    pid, proxy = proxied
    before = _heartbeat.statistics().unresponsive
    proxy.throttle(2 << 20)
    t0 = time.monotonic()
    assert dx.remotecall_fetch(bytes, pid, 4 << 20) == bytes(4 << 20)
    down = time.monotonic() - t0
    t0 = time.monotonic()
    assert dx.remotecall_fetch(len, pid, bytes(4 << 20)) == 4 << 20
    up = time.monotonic() - t0
    proxy.pass_through()
    print(f"slow link: 4 MiB down in {down:.1f} s, 4 MiB up in {up:.1f} s, heartbeat timeout 1.5 s")
    assert _heartbeat.statistics().unresponsive == before
    assert pid in dx.workers()


def test_garbage_into_the_master_closes_the_link_unread(
    proxied: tuple[int, FaultProxy], no_heartbeat: None, count_unpickles: list[int]
) -> None:
    """Garbage bytes where the master expects a frame: the header is refused, the link is
    dropped, nothing is unpickled, nothing hangs."""
    pid, proxy = proxied
    _quiet(pid)
    count_unpickles[0] = 0
    fut = dx.remotecall(time.sleep, pid, 60)
    before = count_unpickles[0]
    proxy.inject("down", b"\xff" * 64)
    with pytest.raises(dx.WorkerDiedError, match="dropped the link") as info:
        fut.fetch(timeout=30)
    print(f"garbage into the master: {info.value}")
    assert count_unpickles[0] == before


def test_garbage_into_the_worker_closes_the_link_unread(
    proxied: tuple[int, FaultProxy], no_heartbeat: None
) -> None:
    """The same into the worker: it refuses the header, drops the link and exits (status 0:
    losing pid 1 is a normal end for a worker); the call fails at once."""
    pid, proxy = proxied
    _quiet(pid)
    fut = dx.remotecall(time.sleep, pid, 60)
    proxy.inject("up", b"\xff" * 64)
    with pytest.raises(dx.WorkerDiedError) as info:
        fut.fetch(timeout=30)
    print(f"garbage into the worker: {info.value}")
    assert info.value.exitcode == 0


def test_flipped_length_bit_closes_the_link_unread(
    proxied: tuple[int, FaultProxy], no_heartbeat: None, count_unpickles: list[int]
) -> None:
    """A flipped high bit in a reply's length prefix: refused before any allocation or
    unpickling; the link is dropped and the caller gets WorkerDiedError, not a hang."""
    pid, proxy = proxied
    _quiet(pid)
    before = count_unpickles[0]
    proxy.flip_bit("down", 8, 7)  # the top bit of body_len in the next frame's header
    with pytest.raises(dx.WorkerDiedError, match="exceeds the cap"):
        dx.remotecall_fetch(abs, pid, -1)
    assert count_unpickles[0] == before


def test_flipped_body_bit_is_caught_before_unpickling(
    proxied_mac: tuple[int, FaultProxy], no_heartbeat: None, count_unpickles: list[int]
) -> None:
    """D7: with per-frame MACs, a flipped bit inside a reply's body fails its MAC: the link
    is dropped before the body is unpickled, and the caller gets WorkerDiedError naming the
    integrity check, not a corrupted value."""
    pid, proxy = proxied_mac
    assert _link_has_mac(pid)
    _quiet(pid)
    before = count_unpickles[0]
    proxy.flip_bit("down", framing.HEADER_SIZE + 600, 0)  # inside the 1000 zero bytes
    with pytest.raises(dx.WorkerDiedError, match="failed its integrity check") as info:
        assert dx.remotecall_fetch(bytes, pid, 1000) == bytes(1000)
    print(f"flipped body bit: {info.value}")
    assert count_unpickles[0] == before


def test_flipped_tag_bit_fails_the_call(
    proxied_no_mac: tuple[int, FaultProxy], no_heartbeat: None
) -> None:
    """Without frame MACs (loopback, ``auto``), a reply whose tag is corrupted into an
    unknown one drops the link: its caller gets WorkerDiedError naming the tag, not a hang."""
    pid, proxy = proxied_no_mac
    assert not _link_has_mac(pid)  # so this is the tag check, not the MAC
    _quiet(pid)
    proxy.flip_bit("down", 0, 7)  # tag 2 (a reply) becomes 130
    with pytest.raises(dx.WorkerDiedError, match="unknown message tag 130") as info:
        _cluster.group().call_fetch(pid, abs, (-1,), {}, timeout=5)
    print(f"flipped tag bit: {info.value}")


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_worker_lost_during_the_handshake(mode: str, no_leaked_workers: None) -> None:
    """C7: the link fails while the master authenticates the worker: addprocs raises within
    its timeout, the worker process is stopped, and the next addprocs works."""
    manager = ProxiedWorkers(1, on_connect=mode)
    t0 = time.monotonic()
    try:
        with pytest.raises((dx.LaunchError, dx.ProtocolError, TimeoutError)) as info:
            dx.addprocs(manager, timeout=3)
        print(f"handshake {mode}: {type(info.value).__name__} after {time.monotonic() - t0:.2f} s")
    finally:
        manager.close()
    (pid,) = dx.addprocs(1)
    assert dx.remotecall_fetch(abs, pid, -1) == 1
    dx.rmprocs(pid)


def test_tune_sets_the_link_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keepalive and TCP_USER_TIMEOUT follow the link timeout (DISTEXEC_LINK_TIMEOUT)."""
    for value, expect_ms in (("2", 2000), ("15", 15000)):
        monkeypatch.setenv("DISTEXEC_LINK_TIMEOUT", value)
        with socket.socket() as s:
            framing.tune(s)
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == expect_ms
            idle = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            intvl = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            cnt = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + intvl * cnt <= expect_ms / 1000 + 1
    monkeypatch.setenv("DISTEXEC_LINK_TIMEOUT", "0")
    with socket.socket() as s:
        framing.tune(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


def test_a_peer_that_authenticates_and_says_nothing_is_dropped(no_leaked_workers: None) -> None:
    """A peer that passes the cookie handshake must then say who it is at once. One that
    says nothing is dropped after the handshake timeout, instead of keeping a thread of the
    worker waiting for it forever."""
    from distexec._transport import connection

    def quick_first_message(seconds: float) -> None:  # (local: it travels by value)
        from distexec import _config

        _config.HANDSHAKE_TIMEOUT = seconds

    (w,) = dx.addprocs(1)
    try:
        dx.remotecall_fetch(quick_first_message, w, 0.5)
        g = _cluster.group()
        peer = g.peer(w)
        assert peer is not None
        silent = connection.dial(
            _cluster._address(peer.address), g.cookie(), g._hello(), timeout=10, peer="test"
        )
        try:
            silent.sock.settimeout(15)
            started = time.monotonic()
            with pytest.raises(EOFError):
                silent.read()  # the worker closes it
            assert time.monotonic() - started < 10
        finally:
            silent.close()
        assert dx.remotecall_fetch(helpers.identity, w, 7) == 7  # the worker is fine
    finally:
        dx.rmprocs(w)
