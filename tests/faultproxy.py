"""A userspace TCP proxy that breaks links on purpose, and a manager that puts workers behind it.

The master dials the proxy instead of the worker; the proxy relays both ways and, on
command, delays, throttles, blackholes (stops relaying and reading, sockets left open),
resets (RST both ways), flips a bit at a chosen offset, or injects bytes. Directions:
``"up"`` is master -> worker, ``"down"`` worker -> master. No privileges needed; tc netem
is not available on the CI machines (see the reliability study, section 4.5).

``ProxiedWorkers(n)`` is a ``ClusterManager``: ``addprocs(ProxiedWorkers(1))`` starts a
``python -m distexec.worker`` over TCP (no AF_UNIX shortcut) and reports the proxy's port.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

from distexec.managers.base import ClusterManager, WorkerConfig
from distexec.managers.local import stop_process, worker_argv, worker_env

DIRECTIONS = ("up", "down")


class _Link:
    """One relayed connection: the client side (master) and the upstream side (worker)."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.socks = {"up": (client, upstream), "down": (upstream, client)}
        self.send_locks = {"up": threading.Lock(), "down": threading.Lock()}
        self.closed = False

    def close(self, rst: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for s in {self.socks["up"][0], self.socks["up"][1]}:
            try:
                if rst:  # linger 0: the close sends RST; SHUT_RD wakes a blocked recv first
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class FaultProxy:
    """Relays 127.0.0.1:``port`` to *upstream*, with faults on demand (see the module doc)."""

    def __init__(self, upstream: tuple[str, int], on_connect: str = "pass") -> None:
        self.upstream = upstream
        self.on_connect = on_connect  # "pass", "reset" (RST at once), "blackhole" (silence)
        self._silent: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._cond = threading.Condition()  # guards: everything below
        self._mode = "pass"
        self._delay = 0.0
        self._rate: float | None = None
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._flips: dict[str, list[tuple[int, int]]] = {"up": [], "down": []}
        self.forwarded = {"up": 0, "down": 0}
        self._closed = False
        self._start(self._accept_loop, "faultproxy-accept")

    def __repr__(self) -> str:
        return f"<FaultProxy :{self.port} -> {self.upstream[0]}:{self.upstream[1]} {self._mode}>"

    # -- faults
    def pass_through(self) -> None:
        """Relay everything again, at full speed."""
        self._set("pass", 0.0, None)

    def delay(self, seconds: float) -> None:
        """Hold each chunk *seconds* before relaying it."""
        self._set("pass", seconds, None)

    def throttle(self, bytes_per_second: float) -> None:
        """Relay at most *bytes_per_second* in each direction."""
        self._set("pass", 0.0, bytes_per_second)

    def blackhole(self) -> None:
        """Stop relaying and stop reading, both ways; both sockets stay open (a silent cut)."""
        self._set("blackhole", 0.0, None)

    def reset(self) -> None:
        """Send an RST both ways on every link (SO_LINGER 0, then close)."""
        with self._cond:
            links, self._links = list(self._links), []
        for link in links:
            link.close(rst=True)

    def flip_bit(self, direction: str, offset: int, bit: int = 0) -> None:
        """Flip *bit* of the byte *offset* bytes from now in *direction*'s stream."""
        with self._cond:
            self._flips[direction].append((self.forwarded[direction] + offset, 1 << bit))

    def inject(self, direction: str, data: bytes) -> None:
        """Write *data* into *direction*'s stream now, between whole relayed chunks."""
        with self._cond:
            links = list(self._links)
        for link in links:
            _, dst = link.socks[direction]
            with link.send_locks[direction]:
                try:
                    dst.sendall(data)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop everything and join the proxy's threads."""
        with self._cond:
            self._closed = True
            links, self._links = list(self._links), []
            self._cond.notify_all()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        for link in links:
            link.close()
        for s in self._silent:
            s.close()
        for t in list(self._threads):
            t.join(10)

    # -- machinery
    def _set(self, mode: str, delay: float, rate: float | None) -> None:
        with self._cond:
            self._mode, self._delay, self._rate = mode, delay, rate
            self._cond.notify_all()

    def _start(self, target: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.on_connect == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            if self.on_connect == "blackhole":
                self._silent.append(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._cond:
                if self._closed:
                    link.close()
                    return
                self._links.append(link)
            for direction in DIRECTIONS:
                self._start(self._pump, f"faultproxy-{direction}", link, direction)

    def _pump(self, link: _Link, direction: str) -> None:
        src, dst = link.socks[direction]
        try:
            while True:
                with self._cond:
                    while self._mode == "blackhole" and not self._closed and not link.closed:
                        self._cond.wait(0.1)
                    if self._closed or link.closed:
                        return
                data = src.recv(65536)
                if not data:
                    return
                with self._cond:
                    while self._mode == "blackhole" and not self._closed and not link.closed:
                        self._cond.wait(0.1)  # a chunk read just before the cut is held
                    delay, rate = self._delay, self._rate
                    data = self._corrupt(direction, data)
                if delay:
                    time.sleep(delay)
                step = len(data) if rate is None else max(1, int(rate / 20))
                for i in range(0, len(data), step):
                    with link.send_locks[direction]:
                        dst.sendall(data[i : i + step])
                    if rate is not None:
                        time.sleep(step / rate)
        except OSError:
            return
        finally:
            with self._cond:
                if link in self._links:
                    self._links.remove(link)
            link.close()

    def _corrupt(self, direction: str, data: bytes) -> bytes:
        start = self.forwarded[direction]
        end = start + len(data)
        self.forwarded[direction] = end
        flips = self._flips[direction]
        if not any(start <= at < end for at, _ in flips):
            return data
        buf = bytearray(data)
        for at, mask in [f for f in flips if start <= f[0] < end]:
            buf[at - start] ^= mask
            flips.remove((at, mask))
        return bytes(buf)


class ProxiedWorkers(ClusterManager):
    """Starts *n* local workers over TCP, each behind its own :class:`FaultProxy`.

    ``env`` adds to each worker's environment (e.g. ``DISTEXEC_LINK_TIMEOUT``);
    ``on_connect`` is the proxies' way with new connections (see :class:`FaultProxy`).
    """

    def __init__(
        self, n: int = 1, env: Mapping[str, str] | None = None, on_connect: str = "pass"
    ) -> None:
        self.n = n
        self.env = dict(env or {})
        self.on_connect = on_connect
        self.proxies: list[FaultProxy] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        # No --parent-death: PR_SET_PDEATHSIG fires when the *thread* that started the
        # worker ends, and this launch thread outlives it (stdin EOF still ends the worker).
        argv = worker_argv(None, None, "--bind", "127.0.0.1")
        env = worker_env({**dict(params.get("env") or {}), **self.env})
        for _ in range(self.n):
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(params["cookie"] + b"\n")
            proc.stdin.flush()
            self.procs.append(proc)
            banner = proc.stdout.readline().decode().strip()
            if not banner.startswith("distexec-worker "):
                raise RuntimeError(f"worker said {banner!r} instead of its address")
            host, _, port = banner.split()[1].rpartition(":")
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            proxy = FaultProxy((host, int(port)), self.on_connect)
            self.proxies.append(proxy)
            config = WorkerConfig(host="127.0.0.1", port=proxy.port, process=proc, ospid=proc.pid)
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def kill(self, pid: int, config: WorkerConfig) -> None:
        return None  # the cluster stops config.process (SIGTERM, then SIGKILL)

    def close(self) -> None:
        """Stop the proxies, and any worker process still running."""
        for proxy in self.proxies:
            proxy.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            stop_process(proc, grace=5.0)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass


def _drain(stream: Any) -> None:
    try:
        while stream.read1(65536):
            pass
    except (OSError, ValueError):
        pass
