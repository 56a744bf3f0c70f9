"""Raise ``KeyboardInterrupt`` inside the calls running in this process, and only there.

Layer: L3 (beside the cluster). Imports: stdlib, distexec._cluster.

Julia's ``interrupt(pids...)`` interrupts the task a worker is running; here each incoming call
runs on a runner thread that records itself while user code runs, and gets an asynchronous
``KeyboardInterrupt`` (``PyThreadState_SetAsyncExc``). The message loop, idle threads and
distexec's own system calls are never touched. A thread blocked inside a C call sees the
interrupt when it returns to Python code.
"""

from __future__ import annotations

import signal
import threading

from . import _cluster


def _sys_interrupt() -> int:
    """On a worker: interrupt its running user calls (not this one)."""
    return _cluster.group().runner.interrupt(exclude=threading.get_ident())


_sys_interrupt.distexec_system = True  # type: ignore[attr-defined]


def install_worker_handler() -> None:
    """On a worker, SIGINT interrupts the running calls instead of killing the process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda signum, frame: _cluster.group().runner.interrupt())
