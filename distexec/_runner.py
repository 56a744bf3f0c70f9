"""Runs incoming calls on threads that grow on demand and retire when idle.

Layer: L0 leaf. Imports: stdlib.

Julia runs each incoming call as a task; a call that blocks (on a channel, on another
process) must never keep the next one from starting, so a call never waits for a busy
thread: if no thread is idle, a new one starts.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from queue import Empty, SimpleQueue

_IDLE_SECONDS = 2.0  # idle threads go soon: leader/follower reuses busy ones

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int

Job = tuple[Callable[..., object], tuple[object, ...]]


class Runner:
    """An unbounded, self-shrinking thread pool for calls that may block."""

    def __init__(self, name: str = "distexec-call", idle_seconds: float = _IDLE_SECONDS) -> None:
        self._name = name
        self._idle_seconds = idle_seconds
        self._jobs: SimpleQueue[Job | None] = SimpleQueue()
        self._lock = threading.Lock()  # guards: _idle, _threads, _closed
        self._idle = 0  # idle threads not yet promised to a queued job
        self._threads = 0
        self._closed = False
        #: thread ident -> the user function running there (for interrupt)
        self.running: dict[int, object] = {}
        self._interrupt_lock = threading.Lock()  # guards: delivering/clearing interrupts

    def interrupt(self, exclude: int | None = None) -> int:
        """Raise ``KeyboardInterrupt`` in every thread running a user call; returns how many."""
        hit = 0
        with self._interrupt_lock:
            for ident in list(self.running):
                if ident != exclude:
                    hit += _set_async_exc(ident, KeyboardInterrupt)
        return hit

    def finished(self, ident: int) -> None:
        """The call on thread *ident* is over: stop tracking it and drop a late interrupt."""
        with self._interrupt_lock:
            self.running.pop(ident, None)
            _set_async_exc(ident, ctypes.py_object())  # NULL: clear a pending interrupt

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on a runner thread, starting one if none is idle."""
        with self._lock:
            if self._closed:
                raise RuntimeError("runner is closed")
            self._jobs.put((fn, args))
            if self._idle > 0:
                self._idle -= 1
                return
            self._threads += 1
            n = self._threads
        threading.Thread(target=self._loop, name=f"{self._name}-{n}", daemon=True).start()

    def _loop(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=self._idle_seconds)
            except Empty:
                with self._lock:
                    # Retire only if no queued job was promised to an idle thread like us.
                    if self._idle > 0 and jobs.empty():
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if job is None:
                with self._lock:
                    self._threads -= 1
                return
            fn, args = job
            try:
                fn(*args)
            except BaseException:
                pass
            del job, fn, args
            with self._lock:
                if self._closed:
                    self._threads -= 1
                    return
                self._idle += 1

    @property
    def threads(self) -> int:
        return self._threads

    def close(self) -> None:
        """Stop idle threads; running jobs finish on their own."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            n = self._threads
        for _ in range(n):
            self._jobs.put(None)
