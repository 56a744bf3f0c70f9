"""The systems the benchmark compares, each behind one small interface.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib at import time; each backend
imports its library (concurrent.futures, loky, distexec) in ``prepare``, inside the driver
process that measures it.

A backend goes through ``prepare`` (imports, not timed) → ``start(n)`` (n workers exist) →
``ping_all`` (each worker answered one call) → ``settle`` → any number of ``call`` / ``map``
→ ``stop`` (idempotent). To add one: subclass ``Backend``, set the class attributes, and
decorate it with ``@register``. Cases without a measurement for it show ``n/a``.
"""

from __future__ import annotations

import abc
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal, TypeVar

#: Directory of the stdlib-only modules; see ``_standalone/__init__.py``.
STANDALONE_DIR = Path(__file__).resolve().parent / "_standalone"

Kind = Literal["floor", "peer", "distexec"]

#: Seconds ``start``/``ping_all`` wait for workers before giving up.
START_TIMEOUT = 60.0


class BenchUnavailable(Exception):
    """A backend or case cannot run here; the message is shown as the cell's error."""


class RemoteCallError(Exception):
    """A raw-floor worker answered with an error instead of a value."""


def standalone_module(name: str) -> ModuleType:
    """Import ``_standalone/<name>.py`` as the top-level module *name*.

    Functions from it pickle by reference as ``<name>.fn``, which a worker resolves without
    importing the distexec package (loky ships ``sys.path`` to its workers; forked workers
    already have the module; the raw worker runs from that directory).
    """
    d = str(STANDALONE_DIR)
    if d not in sys.path:
        sys.path.insert(0, d)
    return importlib.import_module(name)


class Backend(abc.ABC):
    """One system under test: a driver and its workers."""

    #: Name used on the command line, in tables and in JSON.
    name: ClassVar[str]
    #: ``floor`` backends are the physical baseline; the best of them is each case's floor.
    kind: ClassVar[Kind]
    #: One line for ``--list`` and the JSON document.
    description: ClassVar[str]
    #: Statement whose cost is the backend's import time (timed in a fresh interpreter).
    import_stmt: ClassVar[str]

    def __init__(self) -> None:
        #: Module with ``identity``, ``nbytes``, ``worker_pid``: set by ``prepare``.
        self.tasks: Any = None

    def prepare(self) -> None:
        """Import what the backend needs. Not timed. Default: the standalone tasks."""
        self.tasks = standalone_module("dxb_tasks")

    @abc.abstractmethod
    def start(self, nworkers: int) -> None:
        """Start *nworkers* workers (they need not have answered anything yet)."""

    @abc.abstractmethod
    def ping_all(self) -> list[int]:
        """Return once every worker answered one call; the workers' OS pids."""

    def settle(self) -> None:  # noqa: B027  optional hook: most backends leave nothing in flight
        """Wait for calls ``ping_all`` left in flight. Not timed."""

    @abc.abstractmethod
    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """One round trip: ``fn(arg)`` on a worker, its value here."""

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int) -> list[Any]:
        """``[fn(x) for x in items]`` across the workers, *chunksize* items per task."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Shut the workers down and wait for them. Safe to call more than once, or unstarted."""

    def info(self) -> dict[str, object]:
        """Facts worth keeping with the numbers (versions, start method)."""
        return {}


BACKENDS: dict[str, type[Backend]] = {}


_B = TypeVar("_B", bound=type[Backend])


def register(cls: _B) -> _B:
    """Class decorator: make *cls* available as ``--backends cls.name``."""
    if cls.name in BACKENDS:
        raise ValueError(f"backend {cls.name!r} is registered twice")
    BACKENDS[cls.name] = cls
    return cls


# -- executors: ProcessPoolExecutor, loky, DistributedExecutor -------------------------------


class ExecutorBackend(Backend):
    """A ``concurrent.futures.Executor`` with ``max_workers`` workers."""

    def __init__(self) -> None:
        super().__init__()
        self._ex: Executor | None = None
        self._nworkers = 0
        self._stragglers: set[Future[Any]] = set()

    @abc.abstractmethod
    def make_executor(self, nworkers: int) -> Executor:
        """Create the executor (timed by the startup case)."""

    def _executor(self) -> Executor:
        if self._ex is None:
            raise RuntimeError(f"{self.name}: start() was not called")
        return self._ex

    def start(self, nworkers: int) -> None:
        self._nworkers = nworkers
        self._ex = self.make_executor(nworkers)

    def ping_all(self) -> list[int]:
        # An executor picks the worker itself: keep a call per worker in flight until every
        # worker has answered one. No sleeps, so a fast worker may answer several first.
        ex = self._executor()
        seen: set[int] = set()
        pending: set[Future[Any]] = set()
        deadline = time.monotonic() + START_TIMEOUT
        while len(seen) < self._nworkers:
            while len(pending) < self._nworkers:
                pending.add(ex.submit(self.tasks.worker_pid))
            done, pending = wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED
            )
            if not done:
                raise TimeoutError(
                    f"{self.name}: {len(seen)} of {self._nworkers} workers answered "
                    f"within {START_TIMEOUT:.0f} s"
                )
            seen.update(f.result() for f in done)
        self._stragglers = pending
        return sorted(seen)

    def settle(self) -> None:
        for f in self._stragglers:
            f.result()
        self._stragglers = set()

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self._executor().submit(fn, arg).result()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int) -> list[Any]:
        return list(self._executor().map(fn, items, chunksize=chunksize))

    def stop(self) -> None:
        ex, self._ex = self._ex, None
        if ex is not None:
            ex.shutdown(wait=True)


@register
class PPEBackend(ExecutorBackend):
    """``concurrent.futures.ProcessPoolExecutor`` with the platform's default context."""

    name = "ppe"
    kind = "peer"
    description = "concurrent.futures.ProcessPoolExecutor(max_workers=2), default start method"
    import_stmt = "from concurrent.futures import ProcessPoolExecutor"

    def make_executor(self, nworkers: int) -> Executor:
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=nworkers)

    def info(self) -> dict[str, object]:
        import multiprocessing

        return {"start_method": multiprocessing.get_start_method()}


@register
class LokyBackend(ExecutorBackend):
    """loky's ``ProcessPoolExecutor`` (its own ``loky`` start method, cloudpickle)."""

    name = "loky"
    kind = "peer"
    description = "loky.ProcessPoolExecutor(max_workers=2)"
    import_stmt = "import loky"

    def prepare(self) -> None:
        super().prepare()
        importlib.import_module("loky")

    def make_executor(self, nworkers: int) -> Executor:
        import loky

        ex: Executor = loky.ProcessPoolExecutor(max_workers=nworkers)
        return ex

    def info(self) -> dict[str, object]:
        import loky

        return {"loky": getattr(loky, "__version__", "?")}


# -- distexec, the Julia way ------------------------------------------------------------------


@register
class DistexecBackend(Backend):
    """``addprocs`` / ``remotecall_fetch`` / ``pmap(batch_size=)`` / ``rmprocs``."""

    name = "distexec"
    kind = "distexec"
    description = "distexec: addprocs(2), remotecall_fetch(f, pid, x), pmap(f, xs, batch_size=N)"
    import_stmt = "import distexec"

    def __init__(self) -> None:
        super().__init__()
        self._dx: Any = None
        self._pids: list[int] = []
        self._started: list[int] = []

    def prepare(self) -> None:
        # Workers are distexec's own: they import distexec anyway, so use the package path.
        self.tasks = importlib.import_module("distexec.bench._standalone.dxb_tasks")
        self._dx = importlib.import_module("distexec")
        for attr in ("addprocs", "rmprocs", "remotecall", "remotecall_fetch", "fetch"):
            getattr(self._dx, attr)  # AttributeError names what the core does not have yet

    def start(self, nworkers: int) -> None:
        self._pids = list(self._dx.addprocs(nworkers))
        self._started = list(self._pids)

    def ping_all(self) -> list[int]:
        futures = [self._dx.remotecall(self.tasks.worker_pid, pid) for pid in self._pids]
        return sorted(self._dx.fetch(f) for f in futures)

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self._dx.remotecall_fetch(fn, self._pids[0], arg)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int) -> list[Any]:
        return list(self._dx.pmap(fn, items, batch_size=chunksize))

    def stop(self) -> None:
        pids, self._pids = self._pids, []
        if pids:
            self._dx.rmprocs(*pids)

    def info(self) -> dict[str, object]:
        return {"distexec": getattr(self._dx, "__version__", "?"), "pids": self._started}


@register
class DistributedExecutorBackend(ExecutorBackend):
    """``distexec.DistributedExecutor``, used exactly like ``ProcessPoolExecutor``."""

    name = "distexec_executor"
    kind = "distexec"
    description = "distexec.DistributedExecutor(max_workers=2): submit().result(), map(chunksize=)"
    import_stmt = "import distexec"

    def __init__(self) -> None:
        super().__init__()
        self._dx: Any = None

    def prepare(self) -> None:
        self.tasks = importlib.import_module("distexec.bench._standalone.dxb_tasks")
        self._dx = importlib.import_module("distexec")
        self._dx.DistributedExecutor  # noqa: B018  fail here, not in the timed region

    def make_executor(self, nworkers: int) -> Executor:
        ex: Executor = self._dx.DistributedExecutor(max_workers=nworkers)
        return ex

    def info(self) -> dict[str, object]:
        return {"distexec": getattr(self._dx, "__version__", "?")}


# -- raw floors -------------------------------------------------------------------------------


#: Bytes of requests a raw worker may have in flight (and so of replies the driver has unread).
PIPELINE_BYTES = 1 << 16


def pipeline_depth(chunksize: int) -> int:
    """Requests kept in flight per raw worker: 8 for small messages, down to 1 for large ones.

    The driver sends and receives on blocking sockets from one thread. Keeping what is in
    flight per worker under ``PIPELINE_BYTES`` (a small int pickles to at most 6 bytes) means
    it always fits in the socket buffers (about 200 KiB for AF_UNIX, 64 KiB and growing for
    loopback TCP), so the driver writing a request and the worker writing a reply can never
    both wait for room, which would deadlock.
    """
    est = 6 * chunksize + 64
    return max(1, min(8, PIPELINE_BYTES // est))


class RawBackend(Backend):
    """Worker processes started with ``subprocess`` that connect back over one socket each."""

    family: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._chans: list[Any] = []
        self._tmpdir: str | None = None

    def prepare(self) -> None:
        super().prepare()
        self._echo = standalone_module("dxb_echo")

    def _listen(self) -> tuple[socket.socket, list[str]]:
        if self.family == "tcp":
            lsock = socket.create_server(("127.0.0.1", 0))
            return lsock, ["tcp", "127.0.0.1", str(lsock.getsockname()[1])]
        self._tmpdir = tempfile.mkdtemp(prefix="dxb-")
        path = os.path.join(self._tmpdir, "s")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen()
        return lsock, ["unix", path]

    def start(self, nworkers: int) -> None:
        lsock, addr = self._listen()
        script = str(STANDALONE_DIR / "dxb_echo.py")
        try:
            for _ in range(nworkers):
                self._procs.append(
                    subprocess.Popen([sys.executable, script, *addr], stdin=subprocess.DEVNULL)
                )
            lsock.settimeout(0.2)
            deadline = time.monotonic() + START_TIMEOUT
            while len(self._chans) < nworkers:
                try:
                    conn, _ = lsock.accept()
                except TimeoutError:
                    dead = [p.args for p in self._procs if p.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{self.name}: {len(self._chans)} of {nworkers} workers connected"
                            + (f"; exited early: {dead}" if dead else "")
                        ) from None
                    continue
                conn.setblocking(True)
                if self.family == "tcp":
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._chans.append(self._echo.Chan(conn))
        finally:
            lsock.close()

    def _roundtrip(self, i: int, fn: Callable[[Any], Any], arg: Any) -> Any:
        chan = self._chans[i]
        chan.send((self._echo.CALL, fn, arg))
        return self._reply(chan.recv())

    def _reply(self, reply: Any) -> Any:
        ok, value = reply
        if not ok:
            raise RemoteCallError(f"{self.name} worker: {value}")
        return value

    def ping_all(self) -> list[int]:
        for chan in self._chans:
            chan.send((self._echo.CALL, self.tasks.worker_pid, None))
        return sorted(self._reply(chan.recv()) for chan in self._chans)

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self._roundtrip(0, fn, arg)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int) -> list[Any]:
        # Task i goes to worker i % n; replies are read in task order, and each reply read
        # frees its worker for the next task, so every worker keeps `depth` tasks in flight.
        chans = self._chans
        nw = len(chans)
        cs = max(1, chunksize)
        ntasks = -(-len(items) // cs)
        call_op, map_op = self._echo.CALL, self._echo.MAP

        def request(i: int) -> tuple[int, Callable[[Any], Any], Any]:
            if cs == 1:
                return (call_op, fn, items[i])
            return (map_op, fn, items[i * cs : (i + 1) * cs])

        sent = min(ntasks, nw * pipeline_depth(cs))
        for i in range(sent):
            chans[i % nw].send(request(i))
        out: list[Any] = []
        for i in range(ntasks):
            value = self._reply(chans[i % nw].recv())
            if sent < ntasks:
                chans[sent % nw].send(request(sent))
                sent += 1
            if cs == 1:
                out.append(value)
            else:
                out.extend(value)
        return out

    def stop(self) -> None:
        chans, self._chans = self._chans, []
        for chan in chans:
            chan.close()  # the worker reads EOF and exits
        procs, self._procs = self._procs, []
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def info(self) -> dict[str, object]:
        return {"transport": self.family, "pickle": "protocol 5, numpy buffers out of band"}


@register
class RawTcpBackend(RawBackend):
    """Raw floor over loopback TCP."""

    name = "raw_tcp"
    kind = "floor"
    family = "tcp"
    description = "floor: 2 `python dxb_echo.py` workers, pickle 5 + u64 frames over loopback TCP"
    import_stmt = "import mmap, pickle, socket, struct, subprocess"


@register
class RawUnixBackend(RawBackend):
    """Raw floor over an AF_UNIX stream socket."""

    name = "raw_unix"
    kind = "floor"
    family = "unix"
    description = "floor: 2 `python dxb_echo.py` workers, pickle 5 + u64 frames over AF_UNIX"
    import_stmt = "import mmap, pickle, socket, struct, subprocess"
