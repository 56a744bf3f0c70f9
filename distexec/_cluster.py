"""The process group: who is in it, how to reach each member, and what happens when one goes.

Layer: L3 cluster. Imports: L0-L2, distexec.managers.base.

One :class:`ProcessGroup` per process. pid 1 (the master) dials every worker it adds; workers
listen, and connect to each other lazily (the higher pid dials the lower) at their first
message. Each connection has one reader thread that never runs user code: it completes
replies, hands calls to the :class:`~distexec._runner.Runner`, and on EOF fails everything
that waited on that peer with ``ProcessExitedException`` (or ``ClusterClosedError`` when we
closed it ourselves).
"""

from __future__ import annotations

import enum
import os
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import _config, _turns
from ._ids import MASTER, RRID, Counter, WorkerId
from ._protocol import codec
from ._protocol.messages import (
    MSG_TYPES,
    CallMode,
    CallMsg,
    DoneMsg,
    ExitMsg,
    IdentifyMsg,
    JoinAckMsg,
    JoinMsg,
    MembershipMsg,
    Message,
    RefsMsg,
    ResultMsg,
)
from ._runner import Runner
from ._transport import connection as _conn
from ._transport.connection import Connection
from ._transport.framing import FLAG_WAIT, Frame
from .errors import (
    CapturedException,
    ClusterClosedError,
    ClusterError,
    DeserializationError,
    FrameTooLargeError,
    ProcessExitedException,
    ProtocolError,
    RemoteException,
    SerializationError,
)
from .managers.base import ClusterManager, WorkerConfig

TOPOLOGIES = ("all_to_all", "master_worker", "custom")


class PeerState(enum.Enum):
    CREATED = "created"
    CONNECTED = "connected"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


class Peer:
    """Another process of the group, as this process sees it."""

    __slots__ = (
        "address",
        "awaiting",
        "closing",
        "cond",
        "config",
        "conn",
        "connecting",
        "cpu_threads",
        "exit_reason",
        "hostname",
        "manager",
        "ospid",
        "output_tail",
        "pending",
        "pid",
        "private",
        "state",
    )

    def __init__(self, pid: WorkerId, address: Any = None) -> None:
        self.pid = pid
        self.state = PeerState.CREATED
        self.conn: Connection | None = None
        self.address = address
        self.config: WorkerConfig | None = None
        self.manager: ClusterManager | None = None
        self.ospid: int | None = None
        self.hostname = ""
        self.cpu_threads = 0
        self.cond = threading.Condition()  # guards: state, conn, connecting
        self.connecting = False
        self.closing = False  # we asked it to go: its loss is ClusterClosedError, not an exit
        self.pending: set[int] = set()  # call ids waiting for a reply from this peer
        self.awaiting: set[RRID] = set()  # futures whose value this peer will push
        self.exit_reason = ""
        self.output_tail: deque[str] = deque(maxlen=40)
        self.private = False  # owned by an executor: kept out of the default pool

    def __repr__(self) -> str:
        addr = self.address
        if isinstance(addr, tuple):
            addr = f"{addr[0]}:{addr[1]}"
        return f"<Worker id={self.pid} state={self.state.value} addr={addr}>"


class Sink(Protocol):
    """Anything that takes the answer to a call: ``set(ok, value)``, called exactly once."""

    def set(self, ok: bool, value: object) -> None: ...


#: A reader that runs a call itself hands reading to another thread only if the call is
#: still running after this long (or blocks on the cluster sooner): short calls then cost
#: no thread wake-up at all.
_INLINE_GRACE = 0.002
_SPIN = _config.SPIN_SECONDS
_INLINE_POLL = 0.001  # how often the watchdog looks while calls run inline
_IDLE_POLL = 0.01  # ... and while none does

# Who reads a link (``Connection.reading``): a reader thread; nobody, because the link is
# quiet (the watchdog polls it and starts a reader when a message comes); or a thread that
# waits for its own reply and reads the link itself meanwhile, so that the reply costs it no
# thread hand-off (``_read_for``). Changes under ``ProcessGroup._read_lock``.
_THREAD, _IDLE, _CALLER = 0, 1, 2

_tls = threading.local()

#: How long a failed write waits for the link's reader to declare the loss (``_write_failed``).
_ECHO_WAIT = 1.0


class _Inline:
    """A call that a link's reader thread is running itself (see ``_read_loop``)."""

    __slots__ = ("conn", "group", "peer", "promoted", "started")

    def __init__(self, group: ProcessGroup, peer: Peer, conn: Connection) -> None:
        self.group = group
        self.peer = peer
        self.conn = conn
        self.started = time.monotonic()
        self.promoted = False  # a follower reads the link now; set under group._inline_lock


def before_block() -> None:
    """Called before this thread blocks on the cluster: if it is a link's reader running a
    call, another thread must read that link now (the answer may come on it)."""
    tok: _Inline | None = getattr(_tls, "inline", None)
    if tok is not None and not tok.promoted:
        tok.group._promote(tok)


class Reply:
    """A one-shot slot for the answer to a call; the cheapest wait CPython has (a lock)."""

    __slots__ = ("_lock", "ok", "pid", "value")
    #: A sink whose caller may read the link itself (``_read_for``): once its answer is in
    #: and nothing else is due, the reader thread leaves the link quiet for that caller.
    caller_waits = True

    def __init__(self, pid: WorkerId) -> None:
        self.pid = pid
        self.ok = False
        self.value: object = None
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self, ok: bool, value: object) -> None:
        self.ok = ok
        self.value = value
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._lock.acquire(False):
            return True
        before_block()
        return self._lock.acquire(True, -1 if timeout is None else max(timeout, 0))


class Awaitable(Protocol):
    """What a pushed :class:`DoneMsg` completes (implemented by ``refs.Future``)."""

    def _complete(self, ok: bool, value: object, inline: bool, dropped: int = 0) -> None: ...


@dataclass(frozen=True, slots=True)
class GroupStatistics:
    """A snapshot of this process's view of the group (see ``distexec.statistics``)."""

    myid: int
    role: str
    workers: int
    owned_refs: int
    client_refs: int
    pending_calls: int
    awaiting_futures: int
    runner_threads: int
    bytes_sent: int
    bytes_received: int


class ProcessGroup:
    """This process's membership in a cluster, and the machinery that moves its messages."""

    def __init__(self) -> None:
        self.myid: WorkerId = MASTER
        self.role = "master"
        self._cookie: bytes | None = None
        self._lock = threading.RLock()  # guards: _peers, _removed, topology, lazy, listener
        self._peers: dict[WorkerId, Peer] = {}
        self._removed: set[WorkerId] = set()
        self._next_pid = Counter(2)
        self._call_ids = Counter(1)
        self._pending: dict[int, Sink] = {}
        self._pending_lock = threading.Lock()  # guards: _pending, Peer.pending, Peer.awaiting
        self.awaiting: dict[RRID, Awaitable] = {}
        self.topology = "all_to_all"
        self.lazy = True
        self.runner = Runner()
        self.runner.keep_idle = self.has_links
        self._inline: set[_Inline] = set()  # calls readers run themselves
        self._inline_lock = threading.Lock()  # guards: _inline, _Inline.promoted, _watchdog
        self._watchdog: threading.Thread | None = None
        self._read_lock = threading.Lock()  # guards: Connection.reading, _idle, _poll
        self._idle: dict[int, tuple[Peer, Connection]] = {}  # fd -> a link nobody reads
        self._poll: Any = None  # select.epoll of the _idle links, made with the watchdog
        self.listen_address: Any = None
        self._listener: socket.socket | None = None
        self.joined = threading.Event()
        self.exit_requested = threading.Event()
        self.extra_handlers: dict[int, Callable[[Peer, Frame], None]] = {}
        # Hooks for higher layers (refs, pools); set by _runtime.
        self.on_peer_lost: list[Callable[[WorkerId], None]] = []
        self.on_peer_joined: list[Callable[[WorkerId], None]] = []
        self.refs_handler: Callable[[Peer, RefsMsg], None] = lambda peer, msg: None
        self.owner_complete: Callable[[RRID, WorkerId, bool, object], None] = (
            lambda rrid, creator, ok, value: None
        )
        self.owner_register: Callable[[RRID, WorkerId], None] = lambda rrid, creator: None
        self.stats_hook: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.worker_options: dict[str, object] = {}
        self._closed_bytes = [0, 0]

    # ------------------------------------------------------------------ identity

    def cookie(self) -> bytes:
        """The cluster cookie, made on first use (random, 32 bytes of entropy)."""
        with self._lock:
            if self._cookie is None:
                import secrets  # here: a worker is given its cookie and never makes one

                self._cookie = secrets.token_hex(16).encode()
            return self._cookie

    def set_cookie(self, cookie: str | bytes) -> None:
        with self._lock:
            if any(p.state is not PeerState.TERMINATED for p in self._peers.values()):
                raise ClusterError("cannot change the cluster cookie while workers exist")
            self._cookie = cookie.encode() if isinstance(cookie, str) else bytes(cookie)

    def _hello(self) -> dict[str, Any]:
        return {"myid": self.myid, "role": self.role, "ospid": os.getpid()}

    # ------------------------------------------------------------------ membership

    def peer(self, pid: WorkerId) -> Peer | None:
        return self._peers.get(pid)

    def peers(self) -> list[Peer]:
        with self._lock:
            return list(self._peers.values())

    def procs(self) -> list[WorkerId]:
        """pid 1 and every member this process counts, sorted (Julia's ``procs()``)."""
        with self._lock:
            if self.role == "master":
                # An executor's own workers are members, but not the user's to hand out.
                ids = [
                    p.pid
                    for p in self._peers.values()
                    if p.state is PeerState.CONNECTED and not p.private
                ]
            else:
                ids = [p.pid for p in self._peers.values() if p.state is not PeerState.TERMINATED]
        ids.append(self.myid)
        return sorted(set(ids))

    def worker_ids(self) -> list[WorkerId]:
        ids = [p for p in self.procs() if p != MASTER]
        return ids or [MASTER]

    def is_removed(self, pid: WorkerId) -> bool:
        return pid in self._removed

    def check_pid(self, pid: object) -> WorkerId:
        """Validate *pid* for a call: a clear error for a bad or unknown one, fast."""
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"a process id must be an int, not {type(pid).__name__}")
        if pid == self.myid:
            return pid
        peer = self._peers.get(pid)
        if peer is None or peer.state is PeerState.TERMINATED or pid in self._removed:
            if peer is not None and not peer.closing and peer.state is PeerState.TERMINATED:
                raise self._lost_error(peer)  # it died: how (WorkerDiedError, with its cause)
            if pid in self._removed or (peer is not None):
                reason = peer.exit_reason if peer is not None and peer.exit_reason else "removed"
                raise ProcessExitedException(
                    f"worker {pid} is no longer part of the group ({reason})", pid=pid
                )
            raise ValueError(
                f"no process with id {pid} in this group (known: {self.procs()}); "
                "ids come from addprocs() and are never reused"
            )
        return pid

    # ------------------------------------------------------------------ connections

    def has_links(self) -> bool:
        """Whether any peer is connected (else idle threads have nothing to wait for)."""
        return any(p.state is PeerState.CONNECTED for p in list(self._peers.values()))

    def quiesce(self, timeout: float) -> bool:
        """With no peer connected, end this process's idle threads (call threads and the
        watchdog) now and wait up to *timeout* seconds for them; True if none is left.
        ``ProcessPoolExecutor.shutdown(wait=True)`` joins its threads: so do we, once the
        last worker is gone. Threads start again on demand."""
        if self.has_links():
            return False
        deadline = time.monotonic() + timeout
        done = self.runner.quiesce(timeout)
        with self._inline_lock:
            watchdog = self._watchdog
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(max(deadline - time.monotonic(), 0.0))  # it looks every 10 ms
            done = done and not watchdog.is_alive()
        return done

    def _start_reader(self, peer: Peer, conn: Connection) -> None:
        conn.reading = _THREAD
        self.runner.submit(self._read_loop, peer, conn)

    def connection_to(self, pid: WorkerId) -> Connection:
        """The live connection to *pid*, connecting lazily if this is a worker.

        Raises:
            ProcessExitedException: *pid* is gone.
            ClusterError: the topology forbids a link to *pid*.
        """
        peer = self._peers.get(pid)
        if peer is not None:
            conn = peer.conn
            if conn is not None and peer.state is PeerState.CONNECTED:
                return conn
        self.check_pid(pid)
        peer = self._peers[pid]
        return self._lazy_connect(peer)

    def _lazy_connect(self, peer: Peer) -> Connection:
        deadline = time.monotonic() + _config.worker_timeout()
        with peer.cond:
            while True:
                if peer.state is PeerState.TERMINATED:
                    raise self._lost_error(peer)
                if peer.conn is not None and peer.state is PeerState.CONNECTED:
                    return peer.conn
                if self.role == "master":
                    # The master dials workers when it adds them; wait for that to finish.
                    pass
                elif self.topology != "all_to_all" and MASTER not in (peer.pid, self.myid):
                    if self.topology == "custom" and peer.connecting:
                        pass  # a configured link is being dialled: wait for it
                    else:
                        raise ClusterError(
                            f"peer {peer.pid} is not connected to {self.myid}. "
                            f"Topology : {self.topology}"
                        )
                elif not peer.connecting:
                    peer.connecting = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProcessExitedException(
                        f"peer {peer.pid} didn't connect to {self.myid} within "
                        f"{_config.worker_timeout():g} seconds",
                        pid=peer.pid,
                    )
                peer.cond.wait(remaining)
        try:
            if self.myid > peer.pid:
                self.dial_peer(peer.pid)
            else:
                # Ask the master to ask the higher pid to dial us (Julia's rule).
                self.call_fetch(MASTER, _sys_relay_connect, (peer.pid, self.myid), {})
            with peer.cond:
                while peer.conn is None or peer.state is not PeerState.CONNECTED:
                    if peer.state is PeerState.TERMINATED:  # type: ignore[comparison-overlap]
                        raise self._lost_error(peer)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ProcessExitedException(
                            f"peer {peer.pid} didn't connect to {self.myid} in time", pid=peer.pid
                        )
                    peer.cond.wait(remaining)
                return peer.conn
        finally:
            with peer.cond:
                peer.connecting = False
                peer.cond.notify_all()

    def dial_peer(self, pid: WorkerId) -> None:
        """Connect this worker to worker *pid* (we have the higher pid) and identify."""
        peer = self._peers[pid]
        if peer.conn is not None and peer.state is PeerState.CONNECTED:
            return
        if peer.address is None:
            raise ClusterError(f"no address known for worker {pid}")
        conn = _conn.dial(
            _address(peer.address),
            self.cookie(),
            self._hello(),
            timeout=_config.worker_timeout(),
            peer=f"worker {pid}",
            **self.tls_dial_args(peer.address),
        )
        self._attach(peer, conn, identify=True)

    def _attach(self, peer: Peer, conn: Connection, *, identify: bool = False) -> None:
        """Make *conn* the link to *peer* and start reading it. *identify*: we dialled it,
        and tell the peer who we are first (its first message must be that).

        A peer has one link. A second one (two dials crossed: a worker's own lazy connect
        and the one pid 1 relays for the other side) is closed, and the first one kept, on
        both sides: the dialler closes its second link before it says who it is, so the
        other side never takes it; and a second link that did say so is closed there too.
        """
        with peer.cond:
            if peer.state is PeerState.TERMINATED:
                conn.close()
                raise self._lost_error(peer)
            if peer.conn is not None and peer.state is PeerState.CONNECTED:
                conn.close()
                return
            if identify:  # before anyone can send on it: the peer reads this first
                try:
                    conn.send(codec.encode(IdentifyMsg(self.myid)))
                except BaseException:
                    conn.close()
                    raise
            peer.conn = conn
            peer.state = PeerState.CONNECTED
            peer.cond.notify_all()
        if conn.label == conn.peer:  # an accepted link: its address says little
            conn.name_peer(_who(peer.pid))
        self._start_reader(peer, conn)

    # ------------------------------------------------------------------ listening (workers)

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Open this worker's listening socket and start accepting authenticated peers."""
        sock = socket.create_server((host, port), backlog=128)
        address = (host, sock.getsockname()[1])
        self.serve(sock, address)
        return address

    def serve(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Accept authenticated peers on an already listening *sock* reachable at *address*."""
        self._listener = sock
        self.listen_address = address
        threading.Thread(
            target=self._accept_loop, args=(sock,), name="distexec-accept", daemon=True
        ).start()

    def serve_also(self, sock: socket.socket) -> None:
        """Accept authenticated peers on a second listening socket (an AF_UNIX one)."""
        threading.Thread(
            target=self._accept_loop, args=(sock,), name="distexec-accept-unix", daemon=True
        ).start()

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                s, _ = sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._handle_incoming, args=(s,), name="distexec-handshake", daemon=True
            ).start()

    def _handle_incoming(self, s: socket.socket) -> None:
        try:
            conn = _conn.accept(s, self.cookie(), self._hello())
        except (OSError, EOFError, ProtocolError, TimeoutError) as exc:
            _log(f"rejected a connection: {exc}")
            return  # (accept closed it)
        try:
            conn.sock.settimeout(_config.HANDSHAKE_TIMEOUT)  # its first message comes at once
            frame = conn.read()
            conn.sock.settimeout(None)
            msg = codec.decode(frame)
        except EOFError:
            # It proved it knows the cookie, then left without a word: a worker whose dial
            # crossed another one to us, keeping that one (see _attach). Nothing to report.
            conn.close()
            return
        except TimeoutError:
            _log(
                f"rejected a connection from {conn.peer}: it sent nothing within "
                f"{_config.HANDSHAKE_TIMEOUT:g} s of the handshake"
            )
            conn.close()
            return
        except (OSError, ProtocolError) as exc:
            _log(f"rejected a connection: {exc}")
            conn.close()
            return
        except BaseException as exc:  # a first message that does not decode
            _log(f"rejected a connection: bad first message ({type(exc).__name__}: {exc})")
            conn.close()
            return
        if isinstance(msg, JoinMsg):
            self._join(conn, frame, msg)
        elif isinstance(msg, IdentifyMsg):
            with self._lock:
                peer = self._peers.get(msg.from_pid)
                if peer is None:
                    peer = self._peers[msg.from_pid] = Peer(msg.from_pid)
            try:
                self._attach(peer, conn)
            except ProcessExitedException:
                pass
        else:
            _log(f"rejected a connection whose first message was {type(msg).__name__}")
            conn.close()

    def _join(self, conn: Connection, frame: Frame, msg: JoinMsg) -> None:
        with self._lock:
            if self.joined.is_set():
                _log("rejected a second master")
                conn.close()
                return
            self.myid = msg.self_pid
            self.role = "worker"
            self.topology = msg.topology
            self.lazy = msg.lazy
            self.worker_options = dict(msg.options)
            master = self._peers[MASTER] = Peer(MASTER)
            for pid, address in msg.members:
                if pid not in self._peers:
                    self._peers[pid] = Peer(pid, address)
        for hook in self.on_peer_joined:
            hook(MASTER)
        self._attach(master, conn)
        ack = JoinAckMsg(usable_cpus(), os.getpid(), socket.gethostname())
        conn.send(codec.encode(ack, response_id=frame.response_id))
        self.joined.set()
        if not msg.lazy and msg.topology == "all_to_all":
            for pid, _ in msg.members:
                if pid < self.myid:
                    self.runner.submit(self._eager_connect, pid)
        elif msg.topology == "custom":
            for pid in msg.options.get("connect_to", ()):  # type: ignore[attr-defined]
                self.runner.submit(self._eager_dial, pid)

    def _eager_dial(self, pid: WorkerId) -> None:
        try:
            self.dial_peer(pid)
        except Exception as exc:
            _log(f"could not connect to worker {pid}: {exc}")

    def _custom_links(self, config: WorkerConfig) -> list[WorkerId]:
        """Topology "custom": the connected workers whose ``ident`` this one should dial."""
        if self.topology != "custom" or not config.connect_idents:
            return []
        wanted = list(config.connect_idents)
        return [
            p.pid
            for p in self.peers()
            if p.state is PeerState.CONNECTED and p.config is not None and p.config.ident in wanted
        ]

    def _eager_connect(self, pid: WorkerId) -> None:
        try:
            self.connection_to(pid)
        except Exception as exc:
            _log(f"could not connect to worker {pid}: {exc}")

    def apply_membership(self, msg: MembershipMsg) -> None:
        """A worker learns who else is in the group (pushed by pid 1 after each change)."""
        with self._lock:
            for pid, address in msg.members:
                if pid == self.myid or pid in self._removed:
                    continue
                peer = self._peers.get(pid)
                if peer is None:
                    self._peers[pid] = Peer(pid, address)
                elif peer.address is None:
                    peer.address = address
        for pid in msg.removed:
            self._removed.add(pid)
            peer = self._peers.get(pid)
            if peer is not None:
                peer.closing = True
                self._peer_lost(peer, peer.conn, None)

    # ------------------------------------------------------------------ adding workers (master)

    def new_pid(self) -> WorkerId:
        return self._next_pid.next()

    def connect_worker(
        self,
        pid: WorkerId,
        address: Any,
        config: WorkerConfig,
        manager: ClusterManager,
        *,
        timeout: float,
        conn: Connection | None = None,
        private: bool = False,
    ) -> Peer:
        """Dial a launched worker, make it pid *pid*, and wait until it answers (master only)."""
        peer = Peer(pid, address)
        peer.config = config
        peer.manager = manager
        peer.private = private
        with self._lock:
            self._peers[pid] = peer
        deadline = time.monotonic() + timeout
        try:
            if conn is None:
                conn = _conn.dial(
                    _address(address),
                    self.cookie(),
                    self._hello(),
                    timeout=timeout,
                    peer=f"worker {pid} at {_fmt_addr(address)}",
                    **self.tls_dial_args(address),
                )
            with peer.cond:
                peer.conn = conn
            members = tuple(
                (p.pid, p.address)
                for p in self.peers()
                if p.pid != pid and p.state is PeerState.CONNECTED
            )
            cid = self._call_ids.next()
            reply = self._register(peer, cid)
            self._start_reader(peer, conn)
            conn.send(
                codec.encode(
                    JoinMsg(
                        pid,
                        members,
                        self.topology,
                        self.lazy,
                        {**self.worker_options, "connect_to": self._custom_links(config)},
                    ),
                    response_id=cid,
                )
            )
            if not reply.wait(max(0.0, deadline - time.monotonic())):
                self._unregister(peer, cid)
                raise TimeoutError(f"worker {pid} did not join within {timeout:g} seconds")
            if not reply.ok:
                raise reply.value  # type: ignore[misc]
            ack = reply.value
            assert isinstance(ack, JoinAckMsg)
            peer.ospid = ack.ospid
            peer.hostname = ack.hostname
            peer.cpu_threads = ack.cpu_threads
            config.ospid = ack.ospid
            config.environ = {"cpu_threads": ack.cpu_threads, "hostname": ack.hostname}
            with peer.cond:
                if peer.state is PeerState.TERMINATED:
                    raise self._lost_error(peer)
                peer.state = PeerState.CONNECTED
                peer.cond.notify_all()
        except BaseException:
            with self._lock:
                self._removed.add(pid)
            peer.closing = True
            self._peer_lost(peer, peer.conn, None)
            raise
        for hook in self.on_peer_joined:
            hook(pid)
        return peer

    def push_membership(self, removed: Iterable[WorkerId] = ()) -> None:
        """Tell every worker who is in the group now (after addprocs / rmprocs)."""
        members = tuple((p.pid, p.address) for p in self.peers() if p.state is PeerState.CONNECTED)
        msg = MembershipMsg(members, tuple(removed))
        parts = codec.encode(msg)
        for p in self.peers():
            if p.state is PeerState.CONNECTED and p.conn is not None:
                try:
                    p.conn.send(parts)
                except OSError:
                    pass

    def send_exit(self, pid: WorkerId) -> None:
        """Ask worker *pid* to exit (the first rung of rmprocs' ladder)."""
        peer = self._peers.get(pid)
        if peer is None or peer.conn is None:
            return
        peer.closing = True
        try:
            peer.conn.send(codec.encode(ExitMsg()))
        except OSError:
            pass

    def forget(self, pid: WorkerId, reason: str = "removed") -> None:
        """Mark *pid* removed by us: close its link; waiters get ``ClusterClosedError``."""
        with self._lock:
            self._removed.add(pid)
            peer = self._peers.get(pid)
        if peer is None:
            return
        peer.closing = True
        if not peer.exit_reason:
            peer.exit_reason = reason
        self._peer_lost(peer, peer.conn, None)

    # ------------------------------------------------------------------ sending and calling

    def _register(self, peer: Peer, cid: int) -> Reply:
        reply = Reply(peer.pid)
        with self._pending_lock:
            self._pending[cid] = reply
            peer.pending.add(cid)
        return reply

    def _unregister(self, peer: Peer, cid: int) -> None:
        with self._pending_lock:
            self._pending.pop(cid, None)
            peer.pending.discard(cid)

    def send(self, pid: WorkerId, parts: list[bytes | memoryview]) -> None:
        """Write an encoded message to *pid*."""
        conn = self.connection_to(pid)
        try:
            conn.send(parts)
        except FrameTooLargeError:
            raise  # over the peer's frame cap: nothing was sent, the link is fine
        except OSError as exc:
            peer = self._peers[pid]
            self._write_failed(peer, conn, exc, wait=True)
            raise self._lost_error(peer) from exc

    def prepare_call(
        self,
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
        ordered: bool = False,
        waiting: bool = False,
    ) -> tuple[int, list[bytes | memoryview]]:
        """Pickle a call whose value comes back (FETCH): ``(call id, frame parts)``.

        The parts do not depend on the destination, so a retried call is pickled once.
        *ordered*: the receiver runs it after the ordered calls that reached it before
        (``CallMode.ORDERED``, an executor's calls). *waiting*: the caller waits for this
        answer with nothing else to do (``FLAG_WAIT``: both ends poll rather than sleep).

        Raises:
            SerializationError: the call would not pickle; nothing was sent.
        """
        cid = self._call_ids.next()
        mode = CallMode.ORDERED if ordered else CallMode.FETCH
        flags = FLAG_WAIT if waiting and _SPIN else 0
        return cid, codec.encode(CallMsg(fn, args, kwargs, mode), response_id=cid, flags=flags)

    def send_call(
        self, pid: WorkerId, cid: int, parts: list[bytes | memoryview], sink: Sink
    ) -> None:
        """Send a prepared call to *pid*; its answer goes to ``sink.set(ok, value)``.

        ``sink.set`` runs on the connection's reader thread (or here, if *pid* is already
        gone): it must be quick and never block. A lost peer fails the sink with
        ``ProcessExitedException``; it never raises here.
        """
        try:
            conn = self.connection_to(pid)
        except Exception as exc:
            sink.set(False, exc)
            return
        peer = self._peers[pid]
        with self._pending_lock:
            self._pending[cid] = sink
            peer.pending.add(cid)
        if peer.state is PeerState.TERMINATED:
            self._fail_pending(peer, cid)
            return
        try:
            conn.send(parts)
        except FrameTooLargeError as exc:  # nothing was sent: this call fails, the link lives
            with self._pending_lock:
                sink_ = self._pending.pop(cid, None)
                peer.pending.discard(cid)
            if sink_ is not None:
                sink_.set(False, exc)
        except OSError as exc:
            self._write_failed(peer, conn, exc)  # its reader fails the call with the others

    def send_calls(
        self, pid: WorkerId, calls: Sequence[tuple[int, list[bytes | memoryview], Sink]]
    ) -> None:
        """:meth:`send_call` for several prepared calls to *pid*, written together (one
        wake-up of the worker for all): each must be one small part (``Connection.send_many``)."""
        try:
            conn = self.connection_to(pid)
        except Exception as exc:
            for _cid, _parts, sink in calls:
                sink.set(False, exc)
            return
        peer = self._peers[pid]
        with self._pending_lock:
            for cid, _parts, sink in calls:
                self._pending[cid] = sink
                peer.pending.add(cid)
        if peer.state is PeerState.TERMINATED:
            for cid, _parts, _sink in calls:
                self._fail_pending(peer, cid)
            return
        try:
            conn.send_many([parts for _cid, parts, _sink in calls])
        except OSError as exc:
            self._write_failed(peer, conn, exc)  # its reader fails the calls with the others

    def _fail_pending(self, peer: Peer, cid: int) -> None:
        with self._pending_lock:
            sink = self._pending.pop(cid, None)
            peer.pending.discard(cid)
        if sink is not None:
            sink.set(False, self._lost_error(peer))

    def call_fetch(
        self,
        pid: WorkerId,
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: Mapping[str, object],
        timeout: float | None = None,
    ) -> object:
        """Run ``fn(*args, **kwargs)`` on *pid* (not this process) and return its value.

        Raises:
            RemoteException: *fn* raised there.
            ProcessExitedException: *pid* went away before answering.
            SerializationError: the call would not pickle; nothing was sent.
        """
        cid, parts = self.prepare_call(fn, args, kwargs, waiting=True)
        reply = Reply(pid)
        # A quiet link: this thread reads the reply itself (taken before sending, or the
        # watchdog could see the reply first and start a reader).
        peer = self._peers.get(pid)
        conn = None if peer is None or timeout is not None else peer.conn
        if conn is not None and conn.reading == _IDLE and self._take_read(conn):
            assert peer is not None
            try:
                self.send_call(pid, cid, parts, reply)
            finally:
                self._read_for(peer, conn, reply._lock.locked)
        else:
            self.send_call(pid, cid, parts, reply)
        if not reply.wait(timeout):
            peer = self._peers.get(pid)
            if peer is not None:
                self._unregister(peer, cid)
            raise TimeoutError(f"no answer from worker {pid} within {timeout:g} s")
        if reply.ok:
            return reply.value
        raise reply.value  # type: ignore[misc]

    def call_future(
        self,
        pid: WorkerId,
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        rrid: RRID,
        target: Awaitable,
    ) -> None:
        """Start ``fn`` on *pid*; the value stays there under *rrid*; *target* hears when ready."""
        parts = codec.encode(CallMsg(fn, args, kwargs, CallMode.FUTURE, rrid), notify_id=rrid.id)
        conn = self.connection_to(pid)
        peer = self._peers[pid]
        with self._pending_lock:
            self.awaiting[rrid] = target
            peer.awaiting.add(rrid)
        if peer.state is PeerState.TERMINATED:
            self._drop_awaiting(peer, rrid)
            raise self._lost_error(peer)
        try:
            conn.send(parts)
        except FrameTooLargeError:
            self._drop_awaiting(peer, rrid)
            raise  # nothing was sent: this call fails, the link lives
        except OSError as exc:
            self._drop_awaiting(peer, rrid)
            self._write_failed(peer, conn, exc, wait=True)
            raise self._lost_error(peer) from exc

    def await_from(self, pid: WorkerId, rrid: RRID, target: Awaitable) -> None:
        """*target* is completed by a DoneMsg for *rrid* from *pid* (or fails if *pid* dies)."""
        peer = self._peers.get(pid)
        if peer is None or peer.state is PeerState.TERMINATED:
            err = (
                self._lost_error(peer)
                if peer is not None
                else ProcessExitedException(f"worker {pid} is gone", pid=pid)
            )
            target._complete(False, err, True, -1)
            return
        with self._pending_lock:
            self.awaiting[rrid] = target
            peer.awaiting.add(rrid)
        # (another thread may have lost the peer since the check above)
        if peer.state is PeerState.TERMINATED:  # type: ignore[comparison-overlap]
            self._drop_awaiting(peer, rrid)
            target._complete(False, self._lost_error(peer), True, -1)

    def _drop_awaiting(self, peer: Peer, rrid: RRID) -> None:
        with self._pending_lock:
            self.awaiting.pop(rrid, None)
            peer.awaiting.discard(rrid)

    def call_do(
        self,
        pid: WorkerId,
        fn: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        """Run ``fn`` on *pid* and expect nothing back (Julia's ``remote_do``)."""
        self.send(pid, codec.encode(CallMsg(fn, args, kwargs, CallMode.DO)))

    def send_refs(self, owner: WorkerId, msg: RefsMsg) -> None:
        peer = self._peers.get(owner)
        if peer is None or peer.state is PeerState.TERMINATED:
            return
        try:
            self.send(owner, codec.encode(msg))
        except (ProcessExitedException, ClusterError, ValueError):
            pass

    def push_done(self, to: WorkerId, msg: DoneMsg) -> None:
        """Tell *to* that a Future it created is ready (called on the owner)."""
        try:
            parts = codec.encode(msg, notify_id=msg.rrid.id)
        except SerializationError as exc:
            err = _remote_error(self.myid, exc)
            parts = codec.encode(DoneMsg(msg.rrid, False, err, True), notify_id=msg.rrid.id)
        try:
            try:
                self.send(to, parts)
            except FrameTooLargeError as exc:  # a value over *to*'s frame cap: say so instead
                why = self.value_too_large(exc, to)
                done = DoneMsg(msg.rrid, False, why, True, msg.dropped)
                self.send(to, codec.encode(done, notify_id=msg.rrid.id))
        except (ProcessExitedException, ClusterError, ValueError, FrameTooLargeError):
            pass

    # ------------------------------------------------------------------ receiving

    def _read_loop(self, peer: Peer, conn: Connection) -> None:
        """Read messages from *peer* until the link drops (leader/follower for calls).

        A call is decoded here, in arrival order, and this thread runs it itself: no thread
        hand-off sits between a call's arrival and its execution. If the call is still
        running after ``_INLINE_GRACE`` seconds, or blocks on the cluster (its answer may
        come on this very link), a runner thread takes over reading (``_promote``) and this
        one leaves the loop once the call is done; otherwise it reads on. So a short call
        costs no thread wake-up, and a blocked one holds up the link for milliseconds only.
        """
        error: BaseException | None = None
        _tls.reads = conn
        try:
            while True:
                # No message outlives its handling: the next read may block for long, and a
                # call's arguments held meanwhile would not be freed (nor their __del__ run).
                frame = conn.read()
                flags = frame.flags
                if frame.tag == CallMsg.TAG:
                    call = self._decode_call(peer, frame)
                    rid = frame.response_id
                    del frame
                    if call is None:
                        continue
                    waiting = flags & FLAG_WAIT
                    passed = self._run_inline(peer, conn, call, rid, waiting)
                    del call
                    if passed:
                        return  # a follower reads on
                    if waiting and _SPIN:
                        # Its caller waited for it alone: a sequential caller's next call
                        # follows within microseconds.
                        conn.poll(_SPIN)
                    continue
                answered = self._dispatch(peer, conn, frame)
                del frame
                if (
                    answered
                    and not (peer.pending or peer.awaiting or conn.buffered)
                    and self._go_idle(peer, conn)
                ):
                    # It answered a call a caller may wait for, and nothing else is
                    # expected: the link is quiet until the next such call, whose thread
                    # may read it itself.
                    return
        except ProtocolError as exc:  # before OSError: a ProtocolError is a ConnectionError
            error = exc
            _log(f"closing the link to {_who(peer.pid)}: {exc}")
        except (EOFError, OSError) as exc:
            error = exc
        except BaseException as exc:  # pragma: no cover - a bug in dispatch
            error = exc
            _log(f"reader for worker {peer.pid} crashed: {type(exc).__name__}: {exc}")
        finally:
            _tls.reads = None
        try:
            self._peer_lost(peer, conn, error)
        finally:
            # The error's traceback holds this frame, which holds the error: a cycle that,
            # through the frames above, would keep this thread's Thread object until the
            # next garbage collection.
            error = None

    def _run_inline(
        self, peer: Peer, conn: Connection, call: CallMsg, response_id: int, flags: int = 0
    ) -> bool:
        """Run *call* on this reader thread; True if reading passed to a follower meanwhile.
        *flags* go on the answer (``FLAG_WAIT``: the caller waits for it alone)."""
        tok = _Inline(self, peer, conn)
        with self._inline_lock:
            self._inline.add(tok)
            if self._watchdog is None:
                self._start_watchdog()
        _tls.inline = tok
        try:
            self._execute(peer, call, response_id, flags)
        finally:
            _tls.inline = None
            with self._inline_lock:
                self._inline.discard(tok)
        return tok.promoted

    def _promote(self, tok: _Inline) -> None:
        """Hand reading *tok*'s link to a runner thread (once)."""
        with self._inline_lock:
            if tok.promoted or tok not in self._inline:
                return
            tok.promoted = True
        self.runner.submit(self._read_loop, tok.peer, tok.conn)

    def _start_watchdog(self) -> None:
        """Start the thread that promotes followers and polls quiet links (under _inline_lock)."""
        self._watchdog = threading.Thread(target=self._watch, name="distexec-watch", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        """Start a reader for every quiet link a message arrives on, and promote a follower
        for every call that runs inline longer than the grace. Ends when there is nothing to
        watch and no peer is connected (``_go_idle``/``_run_inline`` start it again)."""
        while True:
            wait = _INLINE_POLL if self._inline else _IDLE_POLL
            poll = self._poll  # made by the first _go_idle
            if poll is None:
                time.sleep(wait)
            else:
                for fd, _events in poll.poll(wait):
                    try:
                        self._wake_idle(fd)
                    except Exception as exc:  # pragma: no cover - the runner is closed
                        # This thread must live on: quiet links have no other reader.
                        _log(f"watchdog: no reader for a quiet link: {exc}")
            if not self._inline:
                if not self._idle and not self.has_links():
                    with self._inline_lock, self._read_lock:
                        if not self._inline and not self._idle:
                            self._watchdog = None
                            return
                continue
            now = time.monotonic()
            with self._inline_lock:
                late = [t for t in self._inline if now - t.started >= _INLINE_GRACE]
            for tok in late:
                self._promote(tok)

    # -- who reads a link: a thread, nobody (quiet, polled), or a caller for its own reply

    def _go_idle(self, peer: Peer, conn: Connection) -> bool:
        """Stop reading *conn*, quiet and expecting nothing: the watchdog polls it from now on.
        False if it cannot be polled (TLS, custom streams) or is going: keep reading it."""
        if conn.idle_fd() is None or not hasattr(select, "epoll"):
            return False
        with self._read_lock:
            fd = conn.idle_fd()
            if fd is None or peer.conn is not conn or peer.state is not PeerState.CONNECTED:
                return False
            if self._poll is None:
                self._poll = select.epoll()
            conn.reading = _IDLE
            self._idle[fd] = (peer, conn)
            self._poll.register(fd, select.EPOLLIN)
        # After registering: a watchdog that saw nothing to watch has ended, or sees this.
        with self._inline_lock:
            if self._watchdog is None:
                self._start_watchdog()
        return True

    def _unpoll(self, fd: int) -> None:
        try:
            self._poll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed meanwhile: epoll forgot it by itself

    def _wake_idle(self, fd: int) -> None:
        """A message (or EOF) arrived on a quiet link: a reader thread takes it."""
        with self._read_lock:
            entry = self._idle.pop(fd, None)
            if entry is None:
                return  # a caller took the link first
            self._unpoll(fd)
            peer, conn = entry
            conn.reading = _THREAD
        self.runner.submit(self._read_loop, peer, conn)

    def _take_read(self, conn: Connection) -> bool:
        """Make this thread *conn*'s reader if nobody reads it now."""
        with self._read_lock:
            fd = conn.idle_fd()
            if (
                conn.reading != _IDLE
                or fd is None
                or self._idle.get(fd, (None, None))[1] is not conn
            ):
                return False
            del self._idle[fd]
            self._unpoll(fd)
            conn.reading = _CALLER
        return True

    def _drop_idle(self, conn: Connection) -> None:
        """Forget *conn* among the quiet links (it is closing)."""
        with self._read_lock:
            if conn.reading != _IDLE:
                return
            for fd, (_peer, c) in list(self._idle.items()):
                if c is conn:
                    del self._idle[fd]
                    self._unpoll(fd)
            conn.reading = _THREAD

    def read_briefly(self, pid: WorkerId, waiting: Callable[[], bool]) -> None:
        """Read *pid*'s link on this thread while ``waiting()`` and messages keep coming
        within ``DISTEXEC_SPIN_US``, if the link is quiet (nobody reads it): a caller whose
        answer is due any moment takes it without a thread hand-off. It never blocks for
        longer: whatever else the caller waits for (a timeout, a cancel) still reaches it."""
        peer = self._peers.get(pid)
        conn = None if peer is None or not _SPIN else peer.conn
        if conn is not None and conn.reading == _IDLE and self._take_read(conn):
            assert peer is not None
            self._read_for(peer, conn, waiting, brief=True)

    def _read_for(
        self, peer: Peer, conn: Connection, waiting: Callable[[], bool], brief: bool = False
    ) -> None:
        """Read *conn* on this thread, which ``_take_read`` made its reader, while
        ``waiting()`` (the caller's reply has not come); then let the link go: back to the
        watchdog if it is quiet, else to a reader thread. *brief*: stop as soon as nothing
        arrives within the poll time. Whatever else arrives meanwhile is handled as a reader
        thread would, except that calls go to the runner. A large message goes to a reader
        thread: only small ones are read here, where a ``KeyboardInterrupt`` may stop the
        read at any point and must not lose part of a message."""
        error: BaseException | None = None
        to_thread = True
        try:
            while waiting():
                # The answer is due any moment: stay awake for it.
                if _SPIN and not conn.poll(_SPIN) and brief:
                    break
                frame = conn.read_if_small()
                if frame is None:
                    break
                if frame.tag == CallMsg.TAG:
                    call = self._decode_call(peer, frame)
                    if call is not None:
                        self.runner.submit(self._execute, peer, call, frame.response_id)
                    continue
                self._dispatch(peer, conn, frame)
            else:
                to_thread = bool(peer.pending or peer.awaiting or conn.buffered)
        except ProtocolError as exc:  # before OSError: a ProtocolError is a ConnectionError
            error = exc
            _log(f"closing the link to {_who(peer.pid)}: {exc}")
        except (EOFError, OSError) as exc:
            error = exc
        finally:
            if error is None and (to_thread or not self._go_idle(peer, conn)):
                conn.reading = _THREAD
                self.runner.submit(self._read_loop, peer, conn)
        if error is not None:
            try:
                self._peer_lost(peer, conn, error)
            finally:
                error = None  # see _read_loop

    def _decode_call(self, peer: Peer, frame: Frame) -> CallMsg | None:
        try:
            msg = codec.decode(frame)
        except BaseException as exc:
            self._answer_undecodable_call(peer, frame, exc)
            return None
        assert isinstance(msg, CallMsg)
        if msg.mode is CallMode.FUTURE and msg.rrid is not None:
            self.owner_register(msg.rrid, peer.pid)
        elif msg.mode is CallMode.ORDERED:
            msg.ticket = _turns.take()  # here, on the link's reader: in arrival order
        return msg

    def _dispatch(self, peer: Peer, conn: Connection, frame: Frame) -> bool:
        """Handle a message that is not a call; True if it answered a blocking call."""
        tag = frame.tag
        if tag == ResultMsg.TAG or tag == JoinAckMsg.TAG:
            with self._pending_lock:
                reply = self._pending.pop(frame.response_id, None)
                peer.pending.discard(frame.response_id)
            if reply is None:
                return False  # the caller gave up waiting
            try:
                msg = codec.decode(frame)
            except BaseException as exc:
                reply.set(False, _decode_error(peer.pid, "the reply", exc))
                return False
            if isinstance(msg, ResultMsg):
                reply.set(msg.ok, msg.value)
            else:
                reply.set(True, msg)
            return getattr(reply, "caller_waits", False)
        if tag == CallMsg.TAG:
            call = self._decode_call(peer, frame)
            if call is not None:
                self.runner.submit(self._execute, peer, call, frame.response_id)
            return False
        if tag == DoneMsg.TAG:
            self._handle_done(peer, frame)
            return False
        handler = self.extra_handlers.get(tag)
        if handler is not None:
            handler(peer, frame)
            return False
        if tag not in MSG_TYPES:  # a caller may be waiting for what this was: drop the link
            raise ProtocolError(f"unknown message tag {tag} from {_who(peer.pid)}")
        try:
            msg = codec.decode(frame)
        except BaseException as exc:
            _log(f"dropped an undecodable message from {peer.pid}: {type(exc).__name__}: {exc}")
            return False
        if isinstance(msg, RefsMsg):
            self.refs_handler(peer, msg)
        elif isinstance(msg, ExitMsg):
            self.exit_requested.set()
        elif isinstance(msg, MembershipMsg):
            self.apply_membership(msg)
        else:
            _log(f"unexpected {type(msg).__name__} from {peer.pid}")
        return False

    def _handle_done(self, peer: Peer, frame: Frame) -> None:
        try:
            msg = codec.decode(frame)
        except BaseException as exc:
            # The header cannot say which future; the body is unreadable. Find it by id.
            err = _decode_error(peer.pid, "a Future's value", exc)
            with self._pending_lock:
                matches = [r for r in peer.awaiting if r.id == frame.notify_id]
            for rrid in matches:
                self._finish_awaiting(peer, rrid, False, err, True, -1)
            return
        assert isinstance(msg, DoneMsg)
        self._finish_awaiting(peer, msg.rrid, msg.ok, msg.value, msg.inline, msg.dropped)

    def _finish_awaiting(
        self, peer: Peer, rrid: RRID, ok: bool, value: object, inline: bool, dropped: int = 0
    ) -> None:
        with self._pending_lock:
            target = self.awaiting.pop(rrid, None)
            peer.awaiting.discard(rrid)
        if target is not None:
            target._complete(ok, value, inline, dropped)

    def _answer_undecodable_call(self, peer: Peer, frame: Frame, exc: BaseException) -> None:
        err = _decode_error(self.myid, "the call's function or arguments", exc, remote=True)
        if frame.response_id:
            self._reply(peer, frame.response_id, False, err)
        elif frame.notify_id:
            rrid = RRID(peer.pid, frame.notify_id)
            self.owner_register(rrid, peer.pid)
            self.owner_complete(rrid, peer.pid, False, err)

    def _execute(self, peer: Peer, msg: CallMsg, response_id: int, flags: int = 0) -> None:
        fn = msg.fn
        track = not getattr(fn, "distexec_system", False)
        running = self.runner.running
        ident = threading.get_ident()
        turn = False
        try:
            try:
                if track:
                    running[ident] = fn
                if msg.ticket >= 0:
                    _turns.wait(msg.ticket)
                    turn = True
                value = fn(*msg.args, **msg.kwargs)
                ok = True
            finally:
                if track:
                    self.runner.finished(ident)
        except BaseException as exc:  # SystemExit / KeyboardInterrupt fail this call only
            value = RemoteException(self.myid, CapturedException.capture(exc))
            ok = False
        if turn:  # the next ordered call starts once this answer is written (see _turns)
            try:
                self._reply(peer, response_id, ok, value, flags)
            finally:
                _turns.done()
            return
        if msg.mode is CallMode.FETCH or msg.mode is CallMode.ORDERED:
            self._reply(peer, response_id, ok, value, flags)
        elif msg.mode is CallMode.FUTURE:
            assert msg.rrid is not None
            self.owner_complete(msg.rrid, peer.pid, ok, value)
        elif not ok:
            _log(f"remote_do from {peer.pid} failed: {value}")

    def _reply(self, peer: Peer, response_id: int, ok: bool, value: object, flags: int = 0) -> None:
        try:
            parts = codec.encode(ResultMsg(ok, value), response_id=response_id, flags=flags)
        except SerializationError as exc:
            parts = codec.encode(
                ResultMsg(False, _remote_error(self.myid, exc)), response_id=response_id
            )
        conn = peer.conn
        if conn is None:
            return
        try:
            try:
                conn.send(parts)
            except FrameTooLargeError as exc:  # the value is over the caller's frame cap
                err = self.value_too_large(exc, peer.pid)
                conn.send(codec.encode(ResultMsg(False, err), response_id=response_id))
        except OSError as exc:
            self._write_failed(peer, conn, exc)

    def value_too_large(self, exc: FrameTooLargeError, to: WorkerId) -> FrameTooLargeError:
        """The error a caller gets for a value this process could not send it (over the
        caller's frame cap); the link and this process live on."""
        return FrameTooLargeError(
            f"{_who(self.myid)} could not send this value to {_who(to)}: {exc}"
        )

    # ------------------------------------------------------------------ losing peers

    def _lost_error(self, peer: Peer) -> Exception:
        if peer.closing:
            return ClusterClosedError(
                f"worker {peer.pid} was removed from the group"
                + (f" ({peer.exit_reason})" if peer.exit_reason not in ("", "removed") else "")
            )
        from .errors import WorkerDiedError, WorkerUnresponsiveError

        settling = _settling.get(peer)
        if settling is not None:  # another thread is finding out why: wait for the words
            settling.wait(2.0)
        reason = peer.exit_reason
        kind = reason.kind if isinstance(reason, ExitReason) else "exited"
        what = _LOST_WORDS.get(kind, _LOST_WORDS["exited"])
        where = _fmt_addr(peer.address)
        if isinstance(peer.address, str) and peer.ospid:
            where = f"os pid {peer.ospid}"  # an AF_UNIX path says nothing to the reader
        cls = WorkerUnresponsiveError if kind == "unresponsive" else WorkerDiedError
        return cls(
            f"worker {peer.pid} ({where}) {what}" + (f": {reason}" if reason else ""),
            pid=peer.pid,
            exitcode=reason.exitcode if isinstance(reason, ExitReason) else None,
            stderr_tail=reason.stderr_tail if isinstance(reason, ExitReason) else "",
            reason=str(reason),
        )

    def _explain_loss(self, peer: Peer, error: BaseException | None) -> None:
        """Set ``peer.exit_reason``: the hook asks the process (exit code, stderr tail) and
        keeps a cause set beforehand (``kill_worker``); the link's own error fills in."""
        exit_hook = _exit_reason_hook
        if exit_hook is not None:
            try:
                peer.exit_reason = exit_hook(peer)
            except Exception as exc:  # pragma: no cover - a bug in the hook
                _log(f"exit-reason hook failed: {exc}")
        known = peer.exit_reason
        kind = getattr(known, "kind", "")
        if error is None or (known and isinstance(error, EOFError)):
            return  # a plain close: what the process says is the news
        if kind not in ("", "link", "exited"):
            return  # killed by us (heartbeat, timeout, cancel): the cause says more
        words = _describe_link_error(error)  # a reset, a timeout, a protocol error
        peer.exit_reason = ExitReason(
            f"{words}; then {known}" if known else words,
            kind="exited" if kind == "exited" else "link",
            exitcode=getattr(known, "exitcode", None),
            stderr_tail=getattr(known, "stderr_tail", ""),
        )

    def _write_failed(
        self, peer: Peer, conn: Connection, error: BaseException, wait: bool = False
    ) -> None:
        """A write to *peer* on *conn* failed: the link is gone. Its reader declares the
        loss, once it has read what the peer wrote before (answers in the socket are not
        thrown away: an executor relies on them), and tells *error* as the cause unless it
        holds a better one: the kernel reports a socket's error once, so a writer may get a
        bare EPIPE while the reader got the timeout or the reset.

        *wait*: return once the loss is declared, for a caller that raises it now (at most
        ``_ECHO_WAIT`` s; then, or if this thread reads the link, it declares it itself).
        Else a watcher declares it if the reader has not within ``_ECHO_WAIT`` s."""
        first = conn.write_error is None
        if first:
            conn.write_error = error
        if peer.state is PeerState.TERMINATED or peer.conn is not conn:
            return
        if wait:
            if conn.reading != _CALLER and getattr(_tls, "reads", None) is not conn:
                self._await_verdict(peer, conn)
            self._peer_lost(peer, conn, error)
        elif first:
            try:
                self.runner.submit(self._declare_unheard, peer, conn, error)
            except RuntimeError:  # the runner is closed: this process is ending
                self._peer_lost(peer, conn, error)

    def _await_verdict(self, peer: Peer, conn: Connection) -> None:
        with peer.cond:
            peer.cond.wait_for(
                lambda: peer.state is PeerState.TERMINATED or peer.conn is not conn,
                _ECHO_WAIT,
            )

    def _declare_unheard(self, peer: Peer, conn: Connection, error: BaseException) -> None:
        self._await_verdict(peer, conn)
        self._peer_lost(peer, conn, error)  # (nothing, if the reader has)

    def _peer_lost(self, peer: Peer, conn: Connection | None, error: BaseException | None) -> None:
        if conn is not None and conn.write_error is not None:
            error = _telling(error, conn.write_error)
        with peer.cond:
            if conn is not None and peer.conn is not None and peer.conn is not conn:
                conn.close()  # a duplicate link went away; the peer lives on
                return
            if peer.state is PeerState.TERMINATED:
                return
            peer.state = PeerState.TERMINATED
            settled = _settling[peer] = threading.Event()
            if conn is not None:
                self._closed_bytes[0] += conn.bytes_sent
                self._closed_bytes[1] += conn.bytes_received
            peer.cond.notify_all()
        if peer.conn is not None:
            self._drop_idle(peer.conn)
            peer.conn.close()
        try:
            if not peer.closing:
                self._explain_loss(peer, error)
        finally:
            settled.set()
            _settling.pop(peer, None)
        reason = peer.exit_reason
        call_errors = reason.call_errors if isinstance(reason, ExitReason) else {}
        ref_errors = reason.ref_errors if isinstance(reason, ExitReason) else {}
        err = self._lost_error(peer)
        with self._pending_lock:
            replies = [(cid, self._pending.pop(cid, None)) for cid in peer.pending]
            peer.pending.clear()
            targets = [(r, self.awaiting.pop(r, None)) for r in peer.awaiting]
            peer.awaiting.clear()
        # Pools, executors and heartbeats hear of the loss before any of its calls fails:
        # code woken by a failure (a done callback, pmap's retry) must not see the dead
        # worker still in a pool, nor an executor that does not know yet.
        with self._lock:
            self._removed.add(peer.pid)
        for hook in self.on_peer_lost:
            try:
                hook(peer.pid)
            except Exception as exc:  # pragma: no cover
                _log(f"peer-lost hook failed: {exc}")
        for cid, reply in replies:
            if reply is not None:
                reply.set(False, call_errors.get(cid, err))
        for rrid, target in targets:
            if target is not None:
                # -1: the owner is gone, counts too
                target._complete(False, ref_errors.get(rrid, err), True, -1)
        if self.role == "worker" and peer.pid == MASTER:
            self.exit_requested.set()

    # ------------------------------------------------------------------ introspection

    def statistics(self) -> GroupStatistics:
        owned, client = self.stats_hook()
        sent, received = self._closed_bytes
        for p in self.peers():
            if p.conn is not None and p.state is not PeerState.TERMINATED:
                sent += p.conn.bytes_sent
                received += p.conn.bytes_received
        return GroupStatistics(
            myid=self.myid,
            role=self.role,
            workers=len([p for p in self.procs() if p != MASTER]),
            owned_refs=owned,
            client_refs=client,
            pending_calls=len(self._pending),
            awaiting_futures=len(self.awaiting),
            runner_threads=self.runner.threads,
            bytes_sent=sent,
            bytes_received=received,
        )

    # ------------------------------------------------------------------ TLS; links made elsewhere

    #: The cluster's ``TLSConfig`` while its links run TLS (see :meth:`set_tls`).
    _tls: Any = None

    def set_tls(self, config: Any) -> None:
        """Run every link this process dials from now on over TLS per *config* (a
        ``TLSConfig``), or plain when ``None``. A listener gets its TLS where it is made."""
        self._tls = config

    @property
    def tls(self) -> Any:
        """The cluster's ``TLSConfig``, or ``None`` when its links are plain."""
        return self._tls

    def tls_dial_args(self, address: Any) -> dict[str, Any]:
        """Keyword arguments for ``connection.dial`` to *address*: the TLS context, the name."""
        config = self._tls
        if config is None:
            return {}
        host = address if isinstance(address, str) else str(address[0])
        return {
            "ssl_context": config.client_context(),
            "server_hostname": config.server_hostname(host),
        }

    def serve_link(self, conn: Connection, *, join_only: bool = False) -> Peer:
        """Take an authenticated link made outside the listener (a custom transport, an
        elastic join) as if it had been accepted: its first message is pid 1's JoinMsg
        (this process becomes that worker) or, unless *join_only*, a worker's IdentifyMsg.

        Raises:
            ProtocolError: the first message is neither, or does not decode.
            ClusterError: a JoinMsg, but this process is already in a cluster.
        """
        try:
            frame = conn.read()
            msg = codec.decode(frame)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, (OSError, EOFError)):
                raise ProtocolError(
                    f"{conn.peer} closed the link before its first message"
                ) from exc
            raise ProtocolError(f"bad first message from {conn.peer}: {exc}") from exc
        if isinstance(msg, JoinMsg):
            if self.joined.is_set() or any(
                p.state is not PeerState.TERMINATED for p in self.peers()
            ):
                conn.close()
                raise ClusterError("this process is in a cluster already: it cannot join another")
            self._join(conn, frame, msg)
            return self._peers[MASTER]
        if isinstance(msg, IdentifyMsg) and not join_only:
            return self.attach_link(msg.from_pid, conn, identify=False)
        conn.close()
        raise ProtocolError(f"{conn.peer} opened with {type(msg).__name__}, not a join")

    def attach_link(self, pid: WorkerId, conn: Connection, *, identify: bool = True) -> Peer:
        """Use the authenticated *conn* as this process's link to worker *pid*; with
        *identify*, first tell *pid* who we are (we made the link, as ``dial_peer`` does)."""
        with self._lock:
            peer = self._peers.get(pid)
            if peer is None:
                peer = self._peers[pid] = Peer(pid)
        self._attach(peer, conn, identify=identify)
        return peer

    def close_all(self) -> None:
        """Drop every link (process exit)."""
        for p in self.peers():
            p.closing = True
            if p.conn is not None:
                p.conn.close()
        if self._listener is not None:
            self._listener.close()


class ExitReason(str):
    """Why a peer was lost, in words, with what is known besides (``Peer.exit_reason``).

    A ``str``, so code that prints or compares ``exit_reason`` keeps working. ``kind`` is
    ``"exited"`` (it died on its own), ``"link"`` (its link failed; the process may live),
    ``"unresponsive"`` (heartbeats went unanswered, so it was killed), ``"timeout"`` or
    ``"cancelled"`` (killed for a call that ran too long or was cancelled). ``exitcode`` is
    the process's status when this process started it (negative: ``-signal``).
    ``call_errors`` / ``ref_errors`` name the calls (by call id / by Future RRID) that get
    another error than the peer's loss: the call that timed out gets ``TaskTimeoutError``.
    """

    kind: str
    exitcode: int | None
    stderr_tail: str
    call_errors: Mapping[int, BaseException]
    ref_errors: Mapping[RRID, BaseException]

    def __new__(
        cls,
        text: str,
        *,
        kind: str = "exited",
        exitcode: int | None = None,
        stderr_tail: str = "",
        call_errors: Mapping[int, BaseException] | None = None,
        ref_errors: Mapping[RRID, BaseException] | None = None,
    ) -> ExitReason:
        self = super().__new__(cls, text)
        self.kind = kind
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail
        self.call_errors = call_errors or {}
        self.ref_errors = ref_errors or {}
        return self

    def __reduce__(self) -> tuple[object, ...]:
        return (str, (str(self),))  # only the words travel


#: Peers whose loss is being explained right now (the hook may wait on the process).
_settling: dict[Peer, threading.Event] = {}

#: How a lost worker is described, by ``ExitReason.kind``.
_LOST_WORDS = {
    "exited": "exited or lost its connection",
    "link": "lost its connection",
    "unresponsive": "stopped responding and was killed",
    "timeout": "was killed",
    "cancelled": "was killed",
}


def _telling(read: BaseException | None, written: BaseException) -> BaseException | None:
    """The cause to tell of a lost link, from its reader's error and its first writer's: a
    timeout, a reset or a protocol error says more than a broken pipe, which says more than
    an EOF (the reader's, on a tie)."""

    def rank(error: BaseException | None) -> int:
        if error is None or isinstance(error, EOFError):
            return 0
        return 1 if isinstance(error, BrokenPipeError) else 2

    return written if rank(written) > rank(read) else read


def _describe_link_error(error: BaseException) -> str:
    """The words for why a link failed, from the error its reader or writer got."""
    import errno

    if isinstance(error, ProtocolError):
        return f"this process dropped the link: {type(error).__name__}: {error}"
    if isinstance(error, EOFError):
        return "its connection was closed"
    if isinstance(error, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(error, OSError) and error.errno == errno.ETIMEDOUT:
        return "the link timed out (nothing acknowledged within the link timeout)"
    return f"{type(error).__name__}: {error}"


#: Set by the runtime (``_api``): explains a lost peer (exit code, signal, stderr tail). It
#: sees ``peer.exit_reason`` as set before the loss (an ``ExitReason`` from whoever killed
#: it, or empty) and returns the reason to keep: an ``ExitReason`` or plain words.
_exit_reason_hook: Callable[[Peer], str] | None = None


def set_exit_reason_hook(hook: Callable[[Peer], str] | None) -> None:
    global _exit_reason_hook
    _exit_reason_hook = hook


def usable_cpus() -> int:
    """CPUs this process may use (affinity aware; cgroup quotas via loky where it is loaded)."""
    loky = sys.modules.get("loky")
    if loky is not None:
        return int(loky.cpu_count())
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _address(address: Any) -> tuple[str, int] | str:
    if isinstance(address, str):
        return address
    host, port = address
    return (str(host), int(port))


def _fmt_addr(address: Any) -> str:
    if isinstance(address, tuple) and len(address) == 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _remote_error(pid: WorkerId, exc: BaseException) -> RemoteException:
    return RemoteException(pid, CapturedException.capture(exc))


def _decode_error(
    pid: WorkerId, what: str, exc: BaseException, *, remote: bool = False
) -> BaseException:
    import traceback

    tb = "".join(traceback.format_exception(exc))
    type_name = type(exc).__qualname__
    err = DeserializationError(
        f"{what} could not be unpickled {'on worker ' + str(pid) if remote else 'here'}: "
        f"{type_name}: {exc}",
        type_name=type_name,
        tb_text=tb,
    )
    if remote:
        return RemoteException(pid, CapturedException(err, tb, type_name))
    return err


def _who(pid: WorkerId) -> str:
    return "the master (pid 1)" if pid == MASTER else f"worker {pid}"


def _log(message: str) -> None:
    try:
        print(f"distexec: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # pragma: no cover - stderr closed
        pass


_GROUP: ProcessGroup | None = None
_GROUP_LOCK = threading.Lock()


def group() -> ProcessGroup:
    """This process's group, made on first use (one per process: it *is* the process's identity)."""
    global _GROUP
    g = _GROUP
    if g is None:
        with _GROUP_LOCK:
            if _GROUP is None:
                _GROUP = ProcessGroup()
            g = _GROUP
    return g


def _sys_relay_connect(target: WorkerId, requester: WorkerId) -> None:
    """On pid 1: ask worker *target* (higher pid) to dial worker *requester*."""
    group().call_fetch(target, _sys_dial, (requester,), {})


def _sys_dial(pid: WorkerId) -> None:
    """On a worker: connect to worker *pid* (which has the lower id), unless this worker
    is connected to it or connecting already (its own calls to *pid* may have started it)."""
    group().connection_to(pid)


def _sys_noop() -> None:
    return None


for _f in (_sys_relay_connect, _sys_dial, _sys_noop):
    setattr(_f, "distexec_system", True)  # noqa: B010 - a mark on several function types


__all__ = ["Message", "PeerState", "ProcessGroup", "Reply"]
