"""Runs incoming calls on threads that grow on demand and retire when idle.

Layer: L0 leaf. Imports: stdlib.

Julia runs each incoming call as a task; a call that blocks (on a channel, on another
process) must never keep the next one from starting, so a call never waits for a busy
thread: if no thread is idle, a new one starts.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from collections.abc import Callable
from queue import Empty, SimpleQueue

_IDLE_SECONDS = 2.0  # idle threads go soon: leader/follower reuses busy ones
_IDLE_SECONDS_UNNEEDED = 0.05  # ... and at once when ``keep_idle`` says nothing will come
_IDLE_TICK = 0.1  # how often an idle thread asks ``keep_idle``

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
        self._gone = threading.Condition(self._lock)  # notified when a thread retires
        # Retired threads, maybe not yet ended, for quiesce to join; weak, so that a thread
        # that has ended is not kept (test.support's threading_cleanup waits for that).
        self._retired: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._mine = threading.local()
        self._closed = False
        #: thread ident -> the user function running there (for interrupt)
        self.running: dict[int, object] = {}
        #: False when no job can come soon (no peer is connected): idle threads go at once
        self.keep_idle: Callable[[], bool] = lambda: True
        self._interrupt_lock = threading.Lock()  # guards: delivering/clearing interrupts, _hit
        self._hit: set[int] = set()  # threads sent an interrupt that their call may not take

    def interrupt(self, exclude: int | None = None) -> int:
        """Raise ``KeyboardInterrupt`` in every thread running a user call; returns how many."""
        hit = 0
        with self._interrupt_lock:
            for ident in list(self.running):
                if ident != exclude and _set_async_exc(ident, KeyboardInterrupt):
                    hit += 1
                    self._hit.add(ident)
        return hit

    def finished(self, ident: int) -> None:
        """The call on thread *ident* is over: stop tracking it and drop a late interrupt."""
        with self._interrupt_lock:
            self.running.pop(ident, None)
            if ident in self._hit:
                self._hit.discard(ident)
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

    def _retire_locked(self) -> None:
        self._threads -= 1
        self._retired.add(threading.current_thread())
        self._gone.notify_all()

    def quiesce(self, timeout: float) -> bool:
        """Let every idle thread go now, and wait up to *timeout* seconds until no thread is
        left (but the caller's own); True if none is. Busy threads finish their calls."""
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        own = 1 if getattr(self._mine, "runner", False) else 0
        with self._lock:
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0
            while self._threads > own:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._gone.wait(remaining)
            retired = list(self._retired)
            left = self._threads - own
        for t in retired:  # until each has really ended, not just left its loop
            if t is not me:
                t.join(max(deadline - time.monotonic(), 0.0))
        return left == 0

    def _loop(self) -> None:
        self._mine.runner = True
        jobs = self._jobs
        idle_since = time.monotonic()
        while True:
            try:
                job = jobs.get(timeout=min(_IDLE_TICK, self._idle_seconds))
            except Empty:
                limit = self._idle_seconds if self.keep_idle() else _IDLE_SECONDS_UNNEEDED
                if time.monotonic() - idle_since < limit:
                    continue
                with self._lock:
                    # Retire only if no queued job was promised to an idle thread like us.
                    if self._idle > 0 and jobs.empty():
                        self._idle -= 1
                        self._retire_locked()
                        return
                continue
            if job is None:
                with self._lock:
                    self._retire_locked()
                return
            fn, args = job
            try:
                fn(*args)
            except BaseException:
                pass
            del job, fn, args
            with self._lock:
                if self._closed:
                    self._retire_locked()
                    return
                self._idle += 1
            idle_since = time.monotonic()

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
