"""Small helpers for tests: waiting on conditions, and functions to run on workers."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable


def run_python(
    code: str, timeout: float = 60, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter (``python -c``, with *env* added to this process's
    environment); with *check*, fail the test with its stderr if it exits non-zero. Its exit
    status, stdout and stderr are in the result."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    if check:
        assert out.returncode == 0, f"exit {out.returncode}:\n{out.stderr}"
    return out


def wait_until(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll *pred* until it is true; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def link_reader(pid: int) -> int:
    """Who reads pid 1's link to worker *pid* now: ``_cluster._THREAD``, ``_IDLE`` (nobody: the
    watchdog watches it) or ``_CALLER`` (a caller, for its own reply)."""
    from distexec import _cluster

    peer = _cluster.group().peer(pid)
    assert peer is not None and peer.conn is not None
    return peer.conn.reading


def interrupt_while_the_caller_reads(pid: int) -> threading.Thread:
    """Start a thread that sends SIGINT to the main thread once that thread is reading its
    own reply from worker *pid* (a little into the read, as a user's Ctrl-C comes)."""
    from distexec import _cluster

    main = threading.get_ident()

    def interrupt() -> None:
        wait_until(lambda: link_reader(pid) == _cluster._CALLER, what="the caller reading")
        time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    t = threading.Thread(target=interrupt)
    t.start()
    return t


class Collector(io.TextIOBase):
    """A text stream that keeps what is written to it, safe to read while another thread writes.

    Tests put one in ``sys.stdout``/``sys.stderr`` before starting a worker, whose output relay
    binds the streams it finds then. Polling ``capfd.readouterr()`` instead races: a line the
    relay writes between pytest's read and truncate of its capture file is lost.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[str] = []
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            self._parts.append(s)
        return len(s)

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)


def identity(x: object) -> object:
    return x


def ospid() -> int:
    return os.getpid()


def die(code: int = 3) -> None:
    os._exit(code)


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


class BadInit(Exception):
    """Pickles but does not unpickle: ``__init__`` takes two arguments, ``args`` holds one."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(f"{a}-{b}")


def raise_bad_init() -> None:
    raise BadInit(1, 2)


class UnpicklableOnLoad:
    """Pickles fine here, raises when unpickled (on the other side)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_fail_on_load, ())


def _fail_on_load() -> None:
    raise RuntimeError("refusing to be unpickled")


class ExitOnLoad:
    """Unpickling it raises SystemExit: it must fail one call, not the process."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_exit_on_load, ())


def _exit_on_load() -> None:
    raise SystemExit(7)


def return_exit_on_load() -> ExitOnLoad:
    return ExitOnLoad()


# -- counters kept in the worker process, for exact-run-count tests
_runs: dict[object, int] = {}


def reset_runs() -> None:
    _runs.clear()


def runs() -> dict[object, int]:
    return dict(_runs)


_attempts: dict[object, int] = {}


def next_attempt(key: object) -> int:
    """Runs on pid 1: the cluster-wide attempt number of *key* (1 for the first)."""
    n = _attempts[key] = _attempts.get(key, 0) + 1
    return n


def reset_attempts() -> None:
    _attempts.clear()


def square_failing_once(x: int, failing: frozenset[int]) -> int:
    """x*x; raises on the first attempt, cluster-wide, of each element in *failing*.

    Every run is counted in the process that ran it; pid 1 numbers the attempts of the
    failing elements so a retry on another worker does not fail again.
    """
    _runs[x] = _runs.get(x, 0) + 1
    if x in failing:
        import distexec as dx

        if dx.remotecall_fetch(next_attempt, 1, x) == 1:
            raise RuntimeError(f"transient failure of {x}")
    return x * x


def sleep_and_return(x: float) -> float:
    time.sleep(x)
    return x


def pid_and_value(x: object) -> tuple[int, object]:
    return os.getpid(), x


def log_and_return(path: str, x: int) -> int:
    """Append *x* to the file *path* (one ``write`` of one line, O_APPEND), then return it:
    a call whose every run leaves a mark."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d\n" % x)
    finally:
        os.close(fd)
    return x
