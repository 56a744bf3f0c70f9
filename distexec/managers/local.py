"""LocalManager: workers as child processes of this one, on 127.0.0.1.

Layer: L3 managers. Imports: stdlib, distexec.managers.base, L0.

Each worker is ``python -m distexec.worker``: the cookie goes on its stdin (never on a command
line) and stdin stays open, so a worker whose master dies sees EOF and exits; it also asks
the kernel for ``PR_SET_PDEATHSIG``. Workers start in their own session, so a Ctrl-C at the
terminal reaches the master only, which then interrupts the calls it is waiting for.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from queue import Empty, SimpleQueue
from typing import IO, TYPE_CHECKING, Any

from ..errors import LaunchError, WorkerTimeoutError
from .base import ClusterManager, WorkerConfig

if TYPE_CHECKING:
    # Imported where a process is started or stopped: every worker imports this module (the
    # package exports LocalManager), and none starts processes to begin with.
    import subprocess

BANNER = "distexec-worker "


def worker_env(
    env: Mapping[str, str] | None = None, *, enable_threaded_blas: bool = False
) -> dict[str, str]:
    """The environment of a local worker: ours, this interpreter's ``sys.path``, and *env*."""
    out = dict(os.environ)
    out["DISTEXEC_SYS_PATH"] = json.dumps([p for p in sys.path if p])
    out.setdefault("PYTHONUNBUFFERED", "1")
    if not enable_threaded_blas:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            out[var] = "1"
    if env:
        out.update({str(k): str(v) for k, v in dict(env).items()})
    return out


def worker_argv(exename: str | None, exeflags: tuple[str, ...] | None, *extra: str) -> list[str]:
    return [exename or sys.executable, *(exeflags or ()), "-m", "distexec.worker", *extra]


class LocalManager(ClusterManager):
    """Launches *np* workers on this machine (Julia's ``LocalManager``).

    ``restrict=True`` (the default) binds them to 127.0.0.1.
    """

    def __init__(self, np: int, restrict: bool = True) -> None:
        if not isinstance(np, int) or isinstance(np, bool):
            raise TypeError(f"the number of workers must be an int, not {type(np).__name__}")
        if np < 0:
            raise ValueError(f"cannot add a negative number of workers ({np})")
        self.np = np
        self.restrict = restrict

    def __repr__(self) -> str:
        return f"LocalManager(np={self.np}, restrict={self.restrict})"

    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        import subprocess

        bind = "127.0.0.1" if self.restrict else str(params.get("bind_addr") or "0.0.0.0")
        exename = params.get("exename")
        exeflags = tuple(params.get("exeflags") or ())
        argv = worker_argv(
            exename, exeflags, "--bind", bind, "--parent-death", "--unix", "--authkey-from-stdin"
        )
        env = worker_env(
            params.get("env"), enable_threaded_blas=bool(params.get("enable_threaded_blas"))
        )
        if not self.restrict:
            env["DISTEXEC_ALLOW_INSECURE_NETWORK"] = "1"
        cookie = params["cookie"]
        # As a multiprocessing child gets it: this process's multiprocessing authkey, so that
        # the pipes and queues of multiprocessing (passed through its resource sharer) and a
        # Manager's proxies work in calls. Like the cookie, on stdin.
        import multiprocessing

        authkey = bytes(multiprocessing.current_process().authkey).hex().encode()
        for _ in range(self.np):
            try:
                proc = spawn(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=params.get("dir") or None,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise LaunchError(f"could not start {argv[0]!r}: {exc}", host="localhost") from exc
            assert proc.stdin is not None
            proc.stdin.write(cookie + b"\n" + authkey + b"\n")
            proc.stdin.flush()
            config = WorkerConfig(
                io=proc.stdout,
                process=proc,
                ospid=proc.pid,
                host="127.0.0.1",
                exename=argv[0],
                exeflags=exeflags,
                enable_threaded_blas=bool(params.get("enable_threaded_blas")),
            )
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()

    def kill(self, pid: int, config: WorkerConfig) -> None:
        # The exit message is on its way; stop_process escalates if it is not heeded.
        return None


# ---------------------------------------------------------------------------- process helpers


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kwargs)``, run on a thread that lives as long as its children.

    A worker started with ``--parent-death`` asks Linux (``PR_SET_PDEATHSIG``) to kill it
    when its parent dies, and to Linux the parent is the *thread* that forked it, or,
    once that thread is gone, whichever thread of ours it was handed to. Forked from a
    short-lived thread (addprocs launches on one), a worker could be killed whenever some
    thread of ours ended, even right after printing its address. Forked from here, only
    the death of this process kills it. The thread ends once every process it started has
    been reaped and nothing is queued (a process with no workers keeps no thread for them);
    the next call starts another.
    """
    global _spawner
    done: SimpleQueue[tuple[bool, Any]] = SimpleQueue()
    with _spawner_lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_spawn_loop, name="distexec-spawner", daemon=True)
            _spawner.start()
        _spawn_jobs.put((argv, kwargs, done))
    ok, value = done.get()
    if not ok:
        raise value
    proc: subprocess.Popen[bytes] = value
    return proc


def quiesce(timeout: float) -> None:
    """End the spawner now if none of its children lives, and wait for the relay threads of
    workers that are gone: a process whose last worker went keeps no thread for them."""
    deadline = time.monotonic() + timeout
    with _spawner_lock:
        spawner = _spawner
        if any(p.poll() is None for p in _children):
            spawner = None  # it stays for them: nothing to wait for
        elif spawner is not None:
            _spawn_jobs.put(None)  # look at the children now
    if spawner is not None and spawner is not threading.current_thread():
        spawner.join(timeout)
    with _relays_lock:
        relays = list(_relays)
    for t in relays:
        t.join(max(deadline - time.monotonic(), 0.0))


def _spawn_loop() -> None:
    global _spawner
    import subprocess

    while True:
        try:
            job = _spawn_jobs.get(timeout=_SPAWNER_POLL if _children else 0.05)
            if job is None:
                raise Empty  # quiesce(): look now
            argv, kwargs, done = job
            del job
        except Empty:
            with _spawner_lock:
                _sweep_locked()
                if not _children and _spawn_jobs.empty():
                    _spawner = None
                    return
            continue
        try:
            proc = subprocess.Popen(argv, **kwargs)
        except BaseException as exc:
            done.put((False, exc))
        else:
            with _spawner_lock:
                _children.append(proc)
                _sweep_locked()  # under steady churn the loop never idles to sweep
            done.put((True, proc))
            del proc
        del argv, kwargs, done


def _sweep_locked() -> None:
    """Forget the children that have exited (``poll()`` may reap one; Popen keeps its code
    for whoever stops it), and close their lifelines."""
    gone = [p for p in _children if p.poll() is not None]
    if gone:
        _children[:] = [p for p in _children if p.returncode is None]
        for p in gone:
            _close_lifeline(p)


def _close_lifeline(proc: subprocess.Popen[bytes]) -> None:
    """Close our end of an exited worker's stdin (its lifeline: a worker ends at EOF there).
    Its Popen outlives it (the group keeps its config), and the pipe would stay open with
    it, one descriptor per worker ever started. stdout and stderr are their readers'."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:  # pragma: no cover - a write to it had failed half-way
            pass


_SPAWNER_POLL = 0.2  # how often the spawner looks whether its children are all gone
# Relay threads, for quiesce() to join; weak, so that one that has ended is not kept.
_relays: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_relays_lock = threading.Lock()


_spawn_jobs: SimpleQueue[tuple[list[str], dict[str, Any], SimpleQueue[tuple[bool, Any]]] | None] = (
    SimpleQueue()
)
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()  # guards: _spawner, _children
_children: list[subprocess.Popen[bytes]] = []  # the spawner's, until seen reaped


def read_banner(
    stream: IO[bytes], deadline: float, on_line: Callable[[str], None]
) -> tuple[str, int, dict[str, str]]:
    """Read lines from a worker's stdout until ``distexec-worker HOST:PORT [key=value ...]``;
    other lines go to *on_line*. Returns ``(host, port, extras)``. Raises
    ``WorkerTimeoutError`` at *deadline*, ``LaunchError`` at EOF."""
    fd = stream.fileno()
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").rstrip("\r")
                if text.startswith(BANNER):
                    _push_back(stream, buf)
                    return parse_banner(text)
                on_line(text)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeoutError("worker did not report its address in time")
            if not sel.select(remaining):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise LaunchError("worker exited before reporting its address")
            buf += chunk
    finally:
        sel.close()


_pushed_back: dict[int, bytes] = {}


def _push_back(stream: IO[bytes], data: bytes) -> None:
    if data:
        _pushed_back[stream.fileno()] = data


def parse_banner(text: str) -> tuple[str, int, dict[str, str]]:
    """Split ``distexec-worker HOST:PORT [key=value ...]`` into its parts."""
    fields = text[len(BANNER) :].split()
    if not fields:
        raise LaunchError(f"malformed worker banner {text!r}")
    host, _, port = fields[0].rpartition(":")
    extras = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    try:
        return host.strip("[]"), int(port), extras
    except ValueError:
        raise LaunchError(f"malformed worker banner {text!r}") from None


class OutputRelay:
    """Copies a worker's stdout and stderr to ours, line by line, as ``From worker N: ...``.

    Keeps the last lines of stderr for diagnostics when the worker dies.
    """

    def __init__(
        self, pid: int, streams: list[tuple[IO[bytes], IO[str]]], prefix: str | None = None
    ) -> None:
        self.pid = pid
        self.prefix = f"From worker {pid}: " if prefix is None else prefix
        self.tail: deque[str] = deque(maxlen=40)
        self._streams = streams
        self.done = threading.Event()
        # Not kept here: a finished thread must not outlive its run (test.support's
        # threading_cleanup waits for the thread objects to go); quiesce() joins it.
        thread = threading.Thread(target=self._run, name=f"distexec-output-w{pid}", daemon=True)
        with _relays_lock:
            _relays.add(thread)
        thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        bufs: dict[int, bytes] = {}
        outs: dict[int, IO[str]] = {}
        for stream, out in self._streams:
            fd = stream.fileno()
            sel.register(fd, selectors.EVENT_READ)
            bufs[fd] = _pushed_back.pop(fd, b"")
            outs[fd] = out
        try:
            for fd in list(bufs):
                self._emit(fd, bufs, outs, final=False)
            while sel.get_map():
                for key, _ in sel.select():
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sel.unregister(fd)
                        self._emit(fd, bufs, outs, final=True)
                        continue
                    bufs[fd] += chunk
                    self._emit(fd, bufs, outs, final=False)
        finally:
            sel.close()
            for stream, _ in self._streams:  # the pipes are ours to close once drained
                try:
                    stream.close()
                except OSError:
                    pass
            self.done.set()

    def _emit(self, fd: int, bufs: dict[int, bytes], outs: dict[int, IO[str]], final: bool) -> None:
        data = bufs[fd]
        lines = data.split(b"\n")
        bufs[fd] = b"" if final else lines.pop()
        out = outs[fd]
        for raw in lines:
            if final and not raw:
                continue
            text = raw.decode(errors="replace").rstrip("\r")
            if out is sys.stderr or getattr(out, "_distexec_err", False):
                self.tail.append(text)
            try:
                print(f"{self.prefix}{text}", file=out, flush=True)
            except (OSError, ValueError):
                pass


def exit_description(proc: subprocess.Popen[bytes], wait: float = 0.5) -> tuple[int | None, str]:
    """The exit code of *proc* (waiting briefly) and a phrase describing it."""
    import subprocess

    try:
        code = proc.wait(wait)
    except subprocess.TimeoutExpired:
        return None, "its connection dropped but the process is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return code, f"killed by {name}"
    return code, f"exited with code {code}"


def stop_process(
    proc: subprocess.Popen[bytes], *, grace: float = 2.0, term_grace: float = 2.0
) -> int:
    """Wait for *proc* to exit after it was asked to; then SIGTERM, then SIGKILL. Reaps it."""
    import subprocess

    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        proc.terminate()
        return proc.wait(term_grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:  # pragma: no cover
        return proc.wait()
    proc.kill()
    return proc.wait()


def _parse_banner(text: str) -> tuple[str, int]:
    """``(host, port)`` of a banner (kept for callers that need no extras)."""
    host, port, _ = parse_banner(text)
    return host, port
