"""Killing a worker for a reason, and the deadlines that decide when to.

Layer: L6 runtime (beside ``_api``). Imports: L0-L3, distexec.managers.

A thread cannot be stopped safely, a process can: a call that runs past its task timeout,
a cancelled call that ignores its interrupt, and a worker that stops answering heartbeats
all end the same way, in :func:`kill_worker`. It records why (an ``ExitReason``), kills
the process (SIGKILL for a local worker; the manager's ``kill`` for the others), and
declares the peer lost at once, without waiting for the link to say so: every call the
worker held fails, the one it was killed for with its own error (``TaskTimeoutError``).

:class:`Deadlines` is one timer thread over a heap, for timeouts that have no loop of
their own to live in (calls made through a ``WorkerPool``); an entry costs a heap push,
and a cancelled one is dropped lazily.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import _cluster
from ._cluster import ExitReason, PeerState, Reply
from ._ids import MASTER, RRID, WorkerId
from .errors import TaskTimeoutError

if TYPE_CHECKING:
    import subprocess  # imported where a process is killed: a worker starts without it


def kill_worker(pid: WorkerId, reason: ExitReason) -> bool:
    """Kill worker *pid* because of *reason*, and fail what it held; ``False`` if it was gone.

    On pid 1 the process itself is killed: ``SIGKILL`` when pid 1 started it (its exit code
    and stderr tail join the reason), else the manager's ``kill`` (an SSH worker). On another
    process the peer is dropped here and pid 1 is asked to do the killing.
    """
    import subprocess

    g = _cluster.group()
    peer = g.peer(pid)
    if peer is None or peer.state is PeerState.TERMINATED or peer.closing or pid == g.myid:
        return False
    peer.exit_reason = reason
    if g.myid != MASTER:
        try:
            g.call_do(MASTER, _sys_kill_worker, (pid, str(reason), reason.kind), {})
        except Exception as exc:
            _cluster._log(f"could not ask pid 1 to kill worker {pid}: {exc}")
        g._peer_lost(peer, peer.conn, None)
        return True
    config, manager = peer.config, peer.manager
    proc = config.process if config is not None else None
    if isinstance(proc, subprocess.Popen):
        try:
            proc.kill()
        except OSError:  # pragma: no cover - already reaped
            pass
    elif manager is not None and config is not None:
        # A manager's kill may block (ssh); the link is dropped below either way.
        threading.Thread(
            target=_manager_kill, args=(manager, pid, config), name="distexec-kill", daemon=True
        ).start()
    g._peer_lost(peer, peer.conn, None)
    if isinstance(proc, subprocess.Popen) and proc.returncode is None:
        threading.Thread(target=_reap, args=(proc,), name="distexec-reap", daemon=True).start()
    return True


def _manager_kill(manager: Any, pid: WorkerId, config: Any) -> None:
    try:
        manager.kill(pid, config)
    except Exception as exc:
        _cluster._log(f"{type(manager).__name__}.kill({pid}) failed: {exc}")


def _reap(proc: subprocess.Popen[bytes]) -> None:
    import subprocess

    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process in uninterruptible sleep
        _cluster._log(f"process {proc.pid} did not exit 30 s after SIGKILL")


def _sys_kill_worker(pid: WorkerId, text: str, kind: str) -> None:
    """On pid 1: a worker asks it to kill worker *pid* (only pid 1 holds the process)."""
    kill_worker(pid, ExitReason(text, kind=kind))


_sys_kill_worker.distexec_system = True  # type: ignore[attr-defined]


def timeout_reason(
    pid: WorkerId,
    timeout: float,
    what: str,
    *,
    call_id: int | None = None,
    rrid: RRID | None = None,
) -> tuple[ExitReason, TaskTimeoutError]:
    """The reason to kill *pid* for a call (*what*) that ran past *timeout*, and its error."""
    err = TaskTimeoutError(
        f"{what} ran longer than its task timeout of {timeout:g} s on worker {pid}; "
        "the worker was killed to stop it",
        pid=pid,
        timeout=timeout,
    )
    calls: Mapping[int, BaseException] = {call_id: err} if call_id is not None else {}
    refs: Mapping[RRID, BaseException] = {rrid: err} if rrid is not None else {}
    reason = ExitReason(
        f"a call ran past its task timeout of {timeout:g} s",
        kind="timeout",
        call_errors=calls,
        ref_errors=refs,
    )
    return reason, err


def describe_call(fn: object) -> str:
    """``the call to mod.fn`` for messages."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    mod = getattr(fn, "__module__", None)
    return f"the call to {mod}.{name}" if mod and mod != "builtins" else f"the call to {name}"


def check_timeout(value: float | None, name: str) -> float | None:
    """Validate a timeout keyword: ``None`` or a positive number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return float(value)


def call_fetch(
    pid: WorkerId,
    fn: Callable[..., object],
    args: tuple[object, ...],
    kwargs: Mapping[str, object],
    timeout: float,
) -> object:
    """``remotecall_fetch`` with a task timeout: past it, *pid* is killed and this raises
    ``TaskTimeoutError`` (unless the answer won the race).

    Raises:
        TaskTimeoutError: no answer within *timeout*.
        RemoteException, ProcessExitedException, SerializationError: as remotecall_fetch.
    """
    g = _cluster.group()
    cid, parts = g.prepare_call(fn, args, kwargs)
    reply = Reply(pid)
    g.send_call(pid, cid, parts, reply)
    if not reply.wait(timeout):
        reason, err = timeout_reason(pid, timeout, describe_call(fn), call_id=cid)
        kill_worker(pid, reason)
        if not reply.wait(5.0):  # pragma: no cover - the loss fails the reply at once
            raise err
    if reply.ok:
        return reply.value
    raise reply.value  # type: ignore[misc]


class Deadlines:
    """Callbacks due at given times, run on one thread that lives only while some are due."""

    def __init__(self, name: str = "distexec-deadlines") -> None:
        self._name = name
        self._cond = threading.Condition()  # guards: _heap, _thread, _dropped
        self._heap: list[list[Any]] = []  # [when, seq, callback or None]
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._dropped = 0

    def add(self, delay: float, callback: Callable[[], object]) -> list[Any]:
        """Run *callback* (on the timer thread) in *delay* seconds; returns a handle."""
        entry = [time.monotonic() + delay, next(self._seq), callback]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """Forget *entry* if it has not run (cheap: it is dropped when it comes due)."""
        with self._cond:
            if entry[2] is None:
                return
            entry[2] = None
            self._dropped += 1
            if self._dropped > 256 and self._dropped * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._dropped = 0

    def __len__(self) -> int:
        return len(self._heap) - self._dropped

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            due: list[Callable[[], object]] = []
            with self._cond:
                heap = self._heap
                now = time.monotonic()
                while heap and (heap[0][2] is None or heap[0][0] <= now):
                    entry = heapq.heappop(heap)
                    if entry[2] is None:
                        self._dropped = max(0, self._dropped - 1)
                    else:
                        due.append(entry[2])
                        entry[2] = None
                if not due:
                    if not heap:
                        if idle_since is None:
                            idle_since = now
                        elif now - idle_since >= 1.0:
                            self._thread = None  # the next add() starts another
                            return
                        self._cond.wait(1.0)
                    else:
                        idle_since = None
                        self._cond.wait(heap[0][0] - now)
                    continue
            idle_since = None
            for callback in due:
                try:
                    callback()
                except Exception as exc:  # pragma: no cover - callbacks catch their own
                    _cluster._log(f"a deadline callback failed: {exc}")


#: Deadlines of calls made through pools (the executor and pmap keep their own).
pool_deadlines = Deadlines("distexec-pool-deadlines")
