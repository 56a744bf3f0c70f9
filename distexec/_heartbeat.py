"""Heartbeats: pid 1 pings every worker, and kills one that stops answering.

Layer: L6 runtime (beside ``_api``). Imports: L0-L3, distexec._timeouts.

There is no new message: a ping is an ordinary call of a system function (marked
``distexec_system``, so ``interrupt`` never hits it), answered by the worker's reader like
any other call. A worker busy in Python code answers, since its threads take turns with the
GIL; a worker that is stopped (``SIGSTOP``), stuck in a C call that holds the GIL, or cut
off behind a link that drops everything silently does not. When a ping has gone unanswered
for ``timeout`` seconds and nothing else arrived from the worker meanwhile (a large result
streaming in over a slow link is a sign of life), the worker is declared unresponsive: it
is killed (:func:`distexec._timeouts.kill_worker`) and the calls it held fail with
``WorkerUnresponsiveError``.

A single thread per process does the pinging; it starts with the first worker and ends
with the last. If that thread itself was held up (this process was stopped or starved) for
longer than half the timeout, the pings in flight are forgotten rather than blamed on the
workers. Settings are process-wide: :func:`configure`. Julia has no heartbeats
(Distributed.jl#18); Dask's is ``worker-ttl``, Ray's the raylet health check.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

from . import _cluster
from ._cluster import ExitReason, Peer, PeerState
from ._ids import MASTER, WorkerId
from ._timeouts import kill_worker

#: Production defaults; the test suite runs them at 0.2 s / 1 s.
DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """How often pid 1 pings each worker (``interval``; ``None``: never) and how long an
    unanswered ping is tolerated (``timeout``)."""

    interval: float | None = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class HeartbeatStatistics:
    """What the heartbeat thread has done in this process."""

    pings_sent: int
    unresponsive: int
    running: bool


_settings = HeartbeatSettings()


def configure(
    *, interval: float | None = DEFAULT_INTERVAL, timeout: float = DEFAULT_TIMEOUT
) -> HeartbeatSettings:
    """Set the heartbeat *interval* and *timeout* (seconds) for this process; returns the old
    settings. ``interval=None`` turns heartbeats off. A worker is declared unresponsive
    between *timeout* and *timeout* + *interval* after it stopped answering.

    A call that holds the GIL longer than *timeout* (a C extension that never releases it)
    cannot be told from a hang: raise *timeout* for such work, or turn heartbeats off.
    """
    global _settings
    if interval is not None and (isinstance(interval, bool) or not interval > 0):
        raise ValueError(f"interval must be a positive number of seconds or None, not {interval!r}")
    if isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    old = _settings
    _settings = HeartbeatSettings(None if interval is None else float(interval), float(timeout))
    _monitor.wake()
    return old


def settings() -> HeartbeatSettings:
    """The heartbeat settings in force."""
    return _settings


def statistics() -> HeartbeatStatistics:
    """Pings sent and workers declared unresponsive so far, and whether the thread runs."""
    m = _monitor
    return HeartbeatStatistics(m.pings_sent, m.unresponsive, m.running)


def _sys_ping() -> None:
    """On a worker: answer pid 1's heartbeat."""
    return None


_sys_ping.distexec_system = True  # type: ignore[attr-defined]


class _Ping:
    """One heartbeat in flight; its ``set`` is the answer (called on a reader thread)."""

    __slots__ = ("answered", "received", "sent_at", "started")

    def __init__(self, now: float, received: int) -> None:
        self.started = now
        self.sent_at: float | None = None  # None while the ping waits to be written
        self.received = received  # bytes received from the worker when the clock started
        self.answered = False

    def set(self, ok: bool, value: object) -> None:
        self.answered = True


class _Monitor:
    def __init__(self) -> None:
        self._cond = threading.Condition()  # guards: _thread, running
        self._thread: threading.Thread | None = None
        self._pings: dict[WorkerId, _Ping] = {}  # used by the monitor thread only
        self.pings_sent = 0
        self.unresponsive = 0
        self.running = False

    # -- hooks (run on whichever thread adds or loses a worker)
    def on_joined(self, pid: WorkerId) -> None:
        g = _cluster.group()
        if g.myid != MASTER or pid == MASTER:
            return
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="distexec-heartbeat", daemon=True
                )
                self.running = True
                self._thread.start()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def on_lost(self, pid: WorkerId) -> None:
        self.wake()  # the thread drops the worker, and ends with the last one

    # -- the thread
    def quiesce(self, timeout: float) -> None:
        """With no worker left to watch: let the monitor thread see it now and wait for it."""
        with self._cond:
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        g = _cluster.group()
        last_tick = time.monotonic()
        while True:
            with self._cond:
                peers = _live_workers(g)
                if not peers:
                    self._thread = None
                    self.running = False
                    self._pings.clear()
                    return
                s = _settings
                self._cond.wait(s.interval if s.interval is not None else 1.0)
                s = _settings
            now = time.monotonic()
            if s.interval is None:
                self._pings.clear()
                last_tick = now
                continue
            if now - last_tick > s.interval + s.timeout / 2:
                # We were held up ourselves: the silence we measured may be ours.
                self._pings.clear()
            last_tick = now
            peers = _live_workers(g)
            live = {p.pid for p in peers}
            for pid in [p for p in self._pings if p not in live]:
                del self._pings[pid]
            for peer in peers:
                self._check(g, peer, now, s)

    def _check(
        self, g: _cluster.ProcessGroup, peer: Peer, now: float, s: HeartbeatSettings
    ) -> None:
        ping = self._pings.get(peer.pid)
        conn = peer.conn
        if conn is None:
            return
        if ping is None or ping.answered:
            if ping is None or now - ping.started >= (s.interval or 0.0):
                ping = self._pings[peer.pid] = _Ping(now, conn.bytes_received)
                self.pings_sent += 1
                try:
                    g.runner.submit(_send_ping, g, peer.pid, ping)
                except RuntimeError:  # the runner is closed: this process is exiting
                    pass
            return
        sent_at = ping.sent_at
        if sent_at is None:
            # The ping waits to be written, behind a large message or a full socket. Over
            # TCP the kernel ends a link that takes no bytes (TCP_USER_TIMEOUT); over
            # AF_UNIX or a pipe nothing would, so a worker that stopped reading (stopped,
            # hung) is found here: no piece of a write has gone out for a whole timeout.
            if _kernel_times_out(conn):
                return
            moved = max(ping.started, conn.write_progress)
            if now - moved < s.timeout:
                return
            self._unresponsive(
                peer,
                f"it took none of the bytes sent to it for {now - moved:.1f} s (heartbeat "
                f"timeout {s.timeout:g} s): stopped, hung, or holding the GIL in a long C call",
            )
            return
        if now - sent_at < s.timeout:
            return  # not late yet
        silent_for = _silent_for(conn)  # since the kernel last received data from it
        if silent_for is not None and silent_for < now - sent_at:
            # Data arrived after the ping left: a busy link, not a dead worker.
            ping.sent_at = now - silent_for
            return
        if conn.bytes_received != ping.received or _unacknowledged(conn):
            # A message arrived meanwhile, or our own bytes are still on their way (the
            # ping waits behind them). Restart the clock.
            ping.sent_at = now
            ping.received = conn.bytes_received
            return
        self._unresponsive(
            peer,
            f"it did not answer a heartbeat for {now - sent_at:.1f} s (heartbeat timeout "
            f"{s.timeout:g} s): stopped, hung, cut off, or holding the GIL in a long C call",
        )

    def _unresponsive(self, peer: Peer, why: str) -> None:
        del self._pings[peer.pid]
        self.unresponsive += 1
        reason = ExitReason(why, kind="unresponsive")
        _cluster._log(f"worker {peer.pid} is unresponsive; killing it")
        threading.Thread(
            target=kill_worker, args=(peer.pid, reason), name="distexec-kill", daemon=True
        ).start()


def _send_ping(g: _cluster.ProcessGroup, pid: WorkerId, ping: _Ping) -> None:
    try:
        cid, parts = g.prepare_call(_sys_ping, (), {})
        g.send_call(pid, cid, parts, ping)
    finally:
        ping.sent_at = time.monotonic()


def _kernel_times_out(conn: object) -> bool:
    """Whether *conn* runs over TCP, whose kernel ends a link that stops taking bytes."""
    family = getattr(getattr(conn, "sock", None), "family", None)
    return family in (socket.AF_INET, socket.AF_INET6)


def _live_workers(g: _cluster.ProcessGroup) -> list[Peer]:
    return [
        p for p in g.peers() if p.pid != MASTER and p.state is PeerState.CONNECTED and not p.closing
    ]


_TCP_INFO_LAST_DATA_RECV = 52  # offset of tcpi_last_data_recv (ms) in Linux's struct tcp_info


def _silent_for(conn: object) -> float | None:
    """Seconds since the kernel last received data on *conn*'s TCP socket (``None`` when
    it cannot tell): a large message arriving slowly is not visible as whole messages."""
    sock = getattr(conn, "sock", None)
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)  # type: ignore[union-attr]
        (ms,) = struct.unpack_from("I", info, _TCP_INFO_LAST_DATA_RECV)
    except (OSError, AttributeError, struct.error):
        return None
    return float(ms) / 1000.0


def _unacknowledged(conn: object) -> bool:
    """Whether bytes this process wrote on *conn* are not yet acknowledged by the peer's
    kernel (so a ping queued behind them has not arrived). A dead or stopped peer cannot
    hold this true for long: a full window ends the link by ``TCP_USER_TIMEOUT``."""
    sock = getattr(conn, "sock", None)
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False  # AF_UNIX counts what the peer has not *read*: a stopped one never does
    import fcntl  # here, on pid 1's heartbeat thread: every worker imports this module
    import termios

    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # type: ignore[union-attr]
        (queued,) = struct.unpack("i", buf)
    except (OSError, AttributeError, ValueError, struct.error):
        return False
    return bool(queued > 0)


_monitor = _Monitor()


def quiesce(timeout: float) -> None:
    """Let the monitor thread end now if no worker is left to watch (see ``_api.quiesce``)."""
    _monitor.quiesce(timeout)


_installed = False


def install() -> None:
    """Hook the heartbeat thread to this process's group (idempotent; done at import)."""
    global _installed
    if _installed:
        return
    _installed = True
    g = _cluster.group()
    g.on_peer_joined.append(_monitor.on_joined)
    g.on_peer_lost.append(_monitor.on_lost)
