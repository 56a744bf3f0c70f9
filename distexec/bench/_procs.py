"""Find and end the processes a benchmark run left behind, by pid.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib.

Reads ``/proc`` (Linux). Elsewhere every lookup returns nothing, so the benchmark still runs
but cannot report or reap leftovers. Nothing here matches processes by name: a driver ends its
own descendants, and the orchestrator ends the processes that carry its run's marker variable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

_PROC = Path("/proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of *pid*, or None if it is gone or unreadable."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def _all_pids() -> list[int]:
    try:
        return [int(p.name) for p in _PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []


def is_alive(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie waiting to be reaped."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(root: int) -> list[int]:
    """Live descendants of *root*, parents before children."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[0] not in ("Z", "X"):
            children.setdefault(st[1], []).append(pid)
    out: list[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def describe(pid: int) -> str:
    """A short command line for *pid*: what a reader needs to recognise it."""
    try:
        argv = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [os.path.basename(a.decode(errors="replace")) for a in argv[:1] if a]
    words += [a.decode(errors="replace") for a in argv[1:4] if a]
    return " ".join(words)[:120] or "?"


def carrying(key: str, value: str) -> list[int]:
    """Live pids whose environment holds ``key=value`` (other users' processes are skipped)."""
    needle = f"{key}={value}".encode()
    me = os.getpid()
    out = []
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            env = (_PROC / str(pid) / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and is_alive(pid):
            out.append(pid)
    return out


def wait_gone(
    pids: Iterable[int], timeout: float, *, clock: Callable[[], float] = time.monotonic
) -> list[int]:
    """Poll until none of *pids* is alive or *timeout* seconds pass; return those still alive."""
    left = [p for p in pids if is_alive(p)]
    deadline = clock() + timeout
    while left and clock() < deadline:
        time.sleep(0.01)
        left = [p for p in left if is_alive(p)]
    return left


def end(pids: Iterable[int], *, term_grace: float = 0.5) -> list[dict[str, object]]:
    """End *pids*: SIGTERM, then SIGKILL whatever is alive after *term_grace* seconds.

    Returns one record per pid: ``{"pid", "cmd", "signal"}`` with the last signal sent.
    """
    records: dict[int, dict[str, object]] = {}
    for pid in pids:
        records[pid] = {"pid": pid, "cmd": describe(pid), "signal": "SIGTERM"}
        _signal(pid, signal.SIGTERM)
    for pid in wait_gone(records, term_grace):
        records[pid]["signal"] = "SIGKILL"
        _signal(pid, signal.SIGKILL)
    return list(records.values())


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
