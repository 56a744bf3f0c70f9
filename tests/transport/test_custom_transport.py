"""Custom transports: the whole protocol over a subprocess's stdin/stdout, no TCP.

Layer: tests. Imports: stdlib, pytest, cloudpickle, distexec.

``PipeManager`` is what a user would write (Julia's "ClusterManagers with custom
transports"): ``launch`` starts a program that calls ``init_worker`` and
``process_messages(sys.stdin.buffer, sys.stdout.buffer)``; ``connect`` returns the
subprocess's ``(stdout, stdin)``.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import cloudpickle
import pytest
from helpers import wait_until

import distexec as dx
from distexec._transport.streams import StreamSocket
from distexec.managers.base import ClusterManager, WorkerConfig

pytestmark = [pytest.mark.timeout(90)]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORKER = """\
import sys
import distexec as dx

cookie = sys.stdin.buffer.readline()  # the manager writes it first, then the protocol follows
dx.init_worker(cookie)
dx.process_messages(sys.stdin.buffer, sys.stdout.buffer, True)
print("process_messages returned", file=sys.stderr)
"""


class PipeManager(ClusterManager):
    """Workers reached only through their stdin and stdout."""

    def __init__(self, n: int, script: str = WORKER) -> None:
        self.n = n
        self.script = script
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ops: list[tuple[int, str]] = []

    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        for _ in range(self.n):
            proc = subprocess.Popen(
                [sys.executable, "-c", self.script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            self.procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(params["cookie"] + b"\n")
            proc.stdin.flush()
            with launch_ntfy:
                launched.append(WorkerConfig(process=proc, ospid=proc.pid))
                launch_ntfy.notify_all()

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        return config.process.stdout, config.process.stdin

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        self.ops.append((pid, op))


@pytest.fixture
def manager() -> Iterator[PipeManager]:
    mgr = PipeManager(2)
    yield mgr
    live = [p for p in dx.workers() if p != 1]
    if live:
        dx.rmprocs(live)
    for proc in mgr.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def worker_side() -> dict[str, Any]:
    """Run on a custom worker: what it sees of its stdio and its link."""
    import os
    import sys

    from distexec import _cluster

    print("printed by user code")  # must not reach the link
    os.write(1, b"written to fd 1 by C code\n")
    return {
        "pid": os.getpid(),
        "stdin": sys.stdin.read(),
        "link": type(_cluster.group().peer(1).conn.sock).__name__,  # type: ignore[union-attr]
    }


def test_the_whole_protocol_over_pipes(manager: PipeManager) -> None:
    pids = dx.addprocs(manager)
    assert len(pids) == 2
    assert [dx.remotecall_fetch(dx.myid, p) for p in pids] == pids
    facts = [dx.remotecall_fetch(worker_side, p) for p in pids]
    assert [f["pid"] for f in facts] == [p.pid for p in manager.procs]
    assert all(f["stdin"] == "" and f["link"] == "StreamSocket" for f in facts)
    # Futures, big buffers, and the default pool work as over TCP.
    fut = dx.remotecall(sum, pids[0], range(1000))
    assert fut.result(timeout=30) == 499500
    blob = os.urandom(5 << 20)
    assert dx.remotecall_fetch(bytes, pids[1], bytearray(blob)) == blob
    assert sorted(dx.default_worker_pool().workers()) == pids
    assert dx.pmap(abs, range(-5, 5)) == [abs(x) for x in range(-5, 5)]
    assert {(p, "register") for p in pids} <= set(manager.ops)
    # No socket at all: the worker processes have none open.
    import psutil

    for proc in manager.procs:
        assert psutil.Process(proc.pid).net_connections() == []


def test_worker_death_is_detected(manager: PipeManager) -> None:
    pids = dx.addprocs(manager)
    slow = dx.remotecall(time.sleep, pids[0], 60)
    dx.remote_do(os._exit, pids[0], 3)
    with pytest.raises(dx.ProcessExitedException, match="exited with code 3"):
        slow.result(timeout=30)
    wait_until(lambda: dx.workers() == [pids[1]], timeout=10, what="the dead worker to leave")
    assert dx.remotecall_fetch(dx.myid, pids[1]) == pids[1]


def test_rmprocs_ends_the_worker_program(manager: PipeManager) -> None:
    pids = dx.addprocs(manager)
    started = time.monotonic()
    dx.rmprocs(pids)
    assert time.monotonic() - started < 5  # the program heard the exit message: no SIGTERM
    assert dx.workers() == [1]
    for proc in manager.procs:
        assert proc.wait(10) == 0
        assert proc.stderr is not None
    with pytest.raises(dx.ProcessExitedException):
        dx.remotecall_fetch(dx.myid, pids[0])
    assert {(p, "deregister") for p in pids} <= set(manager.ops)


def dial_through_streams(address: Any, pid: int) -> int:
    """Run on a custom worker: link to worker *pid* by our own means, then call it."""
    import threading

    import distexec as dx

    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
    else:
        sock = socket.create_connection(tuple(address))
    r, w = sock.makefile("rb", buffering=0), sock.makefile("wb", buffering=0)
    sock.close()  # the files keep the descriptor
    threading.Thread(
        target=dx.process_messages, args=(r, w, False), kwargs={"pid": pid}, daemon=True
    ).start()
    from distexec import _cluster

    peer = _cluster.group().peer(pid)
    for _ in range(1000):  # process_messages serves the link: wait until it is up
        if peer is not None and peer.state is _cluster.PeerState.CONNECTED:
            break
        time.sleep(0.01)
    return dx.remotecall_fetch(dx.myid, pid)


def ask(pid: int) -> int:
    import distexec as dx

    return dx.remotecall_fetch(dx.myid, pid)


def test_links_between_workers(manager: PipeManager) -> None:
    from distexec import _cluster

    manager.n = 1
    [piped] = dx.addprocs(manager)
    [tcp] = dx.addprocs(1)
    # The piped worker has no address: the TCP worker (higher pid: it dials) cannot reach it...
    with pytest.raises(dx.RemoteException, match=f"no address known for worker {piped}"):
        dx.remotecall_fetch(ask, tcp, piped)
    # ...but the piped worker can make the link itself (process_messages, incoming=False).
    address = _cluster.group().peer(tcp).address  # type: ignore[union-attr]
    assert dx.remotecall_fetch(dial_through_streams, piped, address, tcp) == tcp
    assert dx.remotecall_fetch(ask, tcp, piped) == piped  # the link serves both ways


def test_a_program_that_prints_first_breaks_its_link_clearly(manager: PipeManager) -> None:
    manager.n = 1
    manager.script = WORKER.replace(
        "dx.init_worker(cookie)", "print('noise'); dx.init_worker(cookie)"
    )
    with pytest.raises(dx.ProtocolError, match="does not speak distexec's protocol"):
        dx.addprocs(manager)
    assert dx.workers() == [1]


def test_a_wrong_cookie_over_pipes(manager: PipeManager) -> None:
    manager.n = 1
    manager.script = WORKER.replace("dx.init_worker(cookie)", "dx.init_worker(b'wrong')")
    with pytest.raises(dx.AuthenticationError, match="does not know the cluster cookie"):
        dx.addprocs(manager)
    assert dx.workers() == [1]


def test_connect_must_return_a_pair() -> None:
    class Bad(PipeManager):
        def connect(self, pid: int, config: WorkerConfig) -> Any:
            return "nope"

    bad = Bad(1)
    try:
        with pytest.raises(dx.LaunchError, match=r"must return \(instream, outstream\)"):
            dx.addprocs(bad)
    finally:
        for proc in bad.procs:
            proc.wait(10)
    assert dx.workers() == [1]


def test_process_messages_misuse() -> None:
    with pytest.raises(dx.ClusterError, match="incoming=False"):
        dx.process_messages(io.BytesIO(), io.BytesIO(), False)
    with pytest.raises(ValueError, match="cookie is empty"):
        dx.init_worker(b"  ")


# --------------------------------------------------------------------------------------
# The stream adapter
# --------------------------------------------------------------------------------------


def test_stream_socket_takes_over_buffered_bytes_and_closes_a_blocked_read() -> None:
    r_fd, w_fd = os.pipe()
    os.write(w_fd, b"cookie\nPROTOCOL")
    reader = os.fdopen(r_fd, "rb")
    assert reader.readline() == b"cookie\n"  # "PROTOCOL" now sits in the reader's buffer
    out_r, out_w = os.pipe()
    sock = StreamSocket(reader, os.fdopen(out_w, "wb"))
    buf = bytearray(64)
    n = sock.recv_into(buf)
    assert bytes(buf[:n]) == b"PROTOCOL"
    sock.sendmsg([b"a", memoryview(b"bc")])
    sock.sendall(b"d")
    assert os.read(out_r, 10) == b"abcd"
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(sock.recv_into(buf)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # blocked: the writer end is open and silent
    sock.close()
    t.join(5)
    assert got == [0]  # closed here: EOF, not a hang
    assert os.read(out_r, 10) == b""  # and the other side sees EOF
    os.close(w_fd)
    os.close(out_r)


def test_stream_socket_without_descriptors() -> None:
    inp, out = io.BytesIO(b"abc"), io.BytesIO()
    sock = StreamSocket(inp, out)
    buf = bytearray(8)
    assert sock.recv_into(buf) == 3 and bytes(buf[:3]) == b"abc"
    assert sock.recv_into(buf) == 0
    sock.sendmsg([b"x", b"yz"])
    assert out.getvalue() == b"xyz"
    sock.settimeout(1)
    assert sock.getpeername() == "pipe"


# --------------------------------------------------------------------------------------
# start_worker: the TCP entry point, from a program of one's own
# --------------------------------------------------------------------------------------


class BannerManager(PipeManager):
    """Runs *script* (which calls ``start_worker``) and reads its banner, as LocalManager does."""

    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        super().launch(params, [], threading.Condition())
        for proc in self.procs:
            with launch_ntfy:
                launched.append(
                    WorkerConfig(io=proc.stdout, process=proc, ospid=proc.pid, host="127.0.0.1")
                )
                launch_ntfy.notify_all()

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        raise NotImplementedError  # TCP to the address in the banner


def test_start_worker_is_the_tcp_entry_point() -> None:
    manager = BannerManager(1, "import distexec as dx\ndx.start_worker()\n")
    try:
        [pid] = dx.addprocs(manager)
        assert dx.remotecall_fetch(os.getpid, pid) == manager.procs[0].pid
        dx.rmprocs(pid)
        assert manager.procs[0].wait(10) == 0
    finally:
        for proc in manager.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_start_worker_with_tls(certs: Any) -> None:
    from distexec import _cluster
    from distexec._transport.tls import TLSStream

    cfg = certs.config()
    script = (
        "import distexec as dx\n"
        f"dx.start_worker(tls=dx.TLSConfig(ca={str(certs.ca)!r}, cert={str(certs.node)!r}))\n"
    )
    manager = BannerManager(1, script)
    try:
        [pid] = dx.addprocs(manager, tls=cfg)
        assert isinstance(_cluster.group().peer(pid).conn.sock, TLSStream)  # type: ignore[union-attr]
        assert dx.remotecall_fetch(dx.myid, pid) == pid
        dx.rmprocs(pid)
    finally:
        for proc in manager.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_start_worker_refuses_a_plain_non_loopback_bind() -> None:
    with pytest.raises(dx.ClusterError, match=r"refusing to listen on 0\.0\.0\.0 without TLS"):
        dx.start_worker(cookie="x", bind="0.0.0.0")
