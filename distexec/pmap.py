"""pmap: a parallel map over workers with batching, error handlers and retries.

Layer: L8. Imports: L0-L7, distexec.retry.

Julia composes ``retry ∘ on_error ∘ remote``; so does this, element by element:

* **remote** sends elements to workers (``batch_size`` at a time), a few calls in flight per
  worker, and a bounded number of elements in flight overall, so a generator of unknown
  length is consumed lazily;
* **on_error** runs here, on the caller, for every failure, a worker's death included
  (Julia runs it on the worker, where it cannot see that). It gets the exception the
  element's code raised (``RemoteException.captured.ex``), as Julia's does. If it returns,
  the value takes the element's place; if it raises, that exception goes on to retry;
* **retry** re-sends the element to any free worker after the next of ``retry_delays``
  (any iterable; ``retry_check(state, exc)`` may stop it); once the delays are spent,
  pmap stops feeding new elements, lets the ones in flight finish, and raises.

A failed batch is retried element by element, and only its failed elements: the others
do not run twice. Results come back in input order.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, SimpleQueue
from typing import Any

from . import _cluster, _timeouts
from ._ids import WorkerId
from .errors import (
    CapturedException,
    ClusterClosedError,
    ClusterError,
    ProcessExitedException,
    RemoteException,
    TaskTimeoutError,
)
from .retry import validate_delays
from .workerpool import AbstractWorkerPool, CachingPool, WorkerPool, default_worker_pool

#: Calls in flight per worker: enough to hide a round trip, few enough to lose little.
_DEPTH_UNBATCHED = 4
_GROUP_MAX_BYTES = 64 * 1024  # calls up to this size go out together (see PMap._flush)
_DEPTH_BATCHED = 2
#: Inputs cut into batches by slicing; subclasses may slice differently, so exact types only.
_SLICED = (list, tuple, range)


def pmap(
    f: Callable[..., Any],
    *iterables: Iterable[Any],
    pool: AbstractWorkerPool | None = None,
    distributed: bool = True,
    batch_size: int | str = 1,
    on_error: Callable[[BaseException], Any] | None = None,
    retry_delays: Iterable[float] = (),
    retry_check: Callable[[Any, BaseException], Any] | None = None,
    progress: bool = False,
    timeout: float | None = None,
) -> list[Any]:
    """Apply *f* to each element of *iterables* (zipped, shortest wins) on the workers.

    Julia: ``pmap(f, [pool], c...; distributed, batch_size, on_error, retry_delays,
    retry_check)``. With no workers (or ``distributed=False``) it runs on threads here.

    Args:
        pool: where to run (default: a :class:`CachingPool` over the default pool's workers,
            so *f* and its closure are shipped once per worker).
        batch_size: elements per message, or ``"auto"`` (about four batches per worker
            when the input's length is known, 100 otherwise).
        on_error: called here with each failure; its value replaces the element's.
        retry_delays: seconds to wait before each retry of a failed element
            (``n`` delays: up to ``n + 1`` attempts), e.g. ``ExponentialBackOff(n=3)``.
        retry_check: ``check(state, exc)`` -> ``bool`` or ``(state, bool)``: retry or not.
        progress: show a progress bar (tqdm if installed, else a one-line counter).
        timeout: seconds one message (an element, or a batch) may run on its worker (default:
            the pool's ``task_timeout``). Past it, that worker is killed and the message's
            elements fail with ``TaskTimeoutError``, which ``on_error`` and ``retry_delays``
            see like any failure (a retry runs on another worker). Other elements that were
            running on the killed worker are not failed: they are sent again. Not applied
            when pmap runs on threads here (threads cannot be killed).

    Raises:
        RemoteException: an element failed on a worker and was not handled or retried away.
        ProcessExitedException: a worker died with an element that was not retried.
        ClusterClosedError: a worker was removed (``rmprocs``) with an element that was not
            retried.
        TaskTimeoutError: an element ran past *timeout* and was not handled or retried away.
        ValueError, TypeError: bad arguments, before anything is sent.
    """
    if not callable(f):
        raise TypeError(f"pmap needs a callable, got {type(f).__name__}")
    if not iterables:
        raise TypeError("pmap needs at least one iterable")
    if batch_size != "auto" and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ValueError(
            f"batch_size must be specified as a positive integer or 'auto', not {batch_size!r}"
        )
    retry_delays = validate_delays(retry_delays)
    if on_error is not None and not callable(on_error):
        raise TypeError("on_error must be callable")
    if retry_check is not None and not callable(retry_check):
        raise TypeError("retry_check must be callable")
    timeout = _timeouts.check_timeout(timeout, "timeout")
    if timeout is None and pool is not None:
        timeout = getattr(pool, "task_timeout", None)

    g = _cluster.group()
    own_pool = None
    if pool is None and distributed:
        default = default_worker_pool()
        live = [p for p in default.live_workers() if p != g.myid]
        pool = own_pool = CachingPool(live) if live else None
    if pool is not None and not pool.workers():
        raise ClusterError("No active worker available in pool")
    local = (not distributed) or pool is None
    if local:
        batch_size = 1
    elif batch_size == "auto":
        batch_size = _auto_batch_size(iterables, len(pool.workers()))  # type: ignore[union-attr]
    engine = _Engine(
        f,
        iterables,
        pool=None if local else pool,
        batch_size=int(batch_size),
        on_error=on_error,
        retry_delays=retry_delays,
        retry_check=retry_check,
        progress=progress,
        timeout=timeout,
    )
    try:
        return engine.run()
    finally:
        if own_pool is not None:
            own_pool.clear()  # free the shipped function on the workers


def _auto_batch_size(iterables: tuple[Iterable[Any], ...], nworkers: int) -> int:
    try:
        n = min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return 100
    return max(1, math.ceil(n / (4 * max(1, nworkers))))


def batchsplit(items: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Split *items* into lists of *batch_size* (the last may be shorter)."""
    it = iter(items)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch


# ---------------------------------------------------------------------------- worker side


def _run_batch(fn: Callable[..., Any], items: list[Any], star: bool) -> tuple[list[Any], Any]:
    """On a worker: apply *fn* to each item; failures are captured one by one, so the other
    items' results survive and only the failed ones are retried."""
    values: list[Any] = []
    errors: dict[int, RemoteException] | None = None
    append = values.append
    # The loops hold no index and no try of their own (a third less time per item): after a
    # failure the next item's index is len(values), and the loop resumes on the same iterator.
    rest = iter(items)
    while True:
        try:
            if star:
                for item in rest:
                    append(fn(*item))
            else:
                for item in rest:
                    append(fn(item))
            return values, errors
        except BaseException as exc:
            if errors is None:
                errors = {}
            errors[len(values)] = RemoteException(
                _cluster.group().myid, CapturedException.capture(exc)
            )
            append(None)


# ---------------------------------------------------------------------------- caller side


class _Unit:
    """One message's worth of elements, and the sink its answer arrives in."""

    __slots__ = ("cid", "done", "indices", "items", "pid")

    def __init__(
        self,
        indices: range | list[int],
        items: list[Any],
        pid: WorkerId,
        done: SimpleQueue[Any],
    ) -> None:
        self.indices = indices
        self.items = items
        self.pid = pid
        self.done = done
        self.cid = 0  # its call id, kept when a timeout must find it

    def set(self, ok: bool, value: object) -> None:  # runs on a reader thread: no blocking
        self.done.put((self, ok, value))


# Calls prepared by _Engine._send and not yet written, per worker: (call id, parts, unit).
_Group = dict[WorkerId, list[tuple[int, list[bytes | memoryview], _Unit]]]


class _Engine:
    def __init__(
        self,
        f: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        *,
        pool: AbstractWorkerPool | None,
        batch_size: int,
        on_error: Callable[[BaseException], Any] | None,
        retry_delays: Iterable[float],
        retry_check: Callable[[Any, BaseException], Any] | None,
        progress: bool,
        timeout: float | None = None,
    ) -> None:
        self.f = f
        # Task timeouts: a heap of (deadline, call id), the units still out by call id, and
        # the workers killed for one (whose other units are sent again, not failed).
        self.timeout = timeout
        self.deadlines: list[tuple[float, int]] = []
        self.open: dict[int, _Unit] = {}
        self.killed: set[WorkerId] = set()
        self.star = len(iterables) > 1
        # zip stops at the shortest input, as map() does
        src: Iterator[Any] = (
            iter(zip(*iterables, strict=False)) if self.star else iter(iterables[0])
        )
        self.source = src
        # One list, tuple or range is cut into batches by slicing (a copy in C), not islice.
        one = iterables[0]
        self.seq: list[Any] | tuple[Any, ...] | range | None = None
        if not self.star and isinstance(one, list | tuple | range) and type(one) in _SLICED:
            self.seq = one
        self.taken = 0  # elements taken from the input so far (the next one's index)
        self.pool = pool
        self.batch_size = batch_size
        self.on_error = on_error
        self.retry_delays = retry_delays
        self.retry_check = retry_check
        self.done: SimpleQueue[tuple[_Unit, bool, object]] = SimpleQueue()
        self.results: dict[int, Any] = {}  # index -> value, element by element
        self.chunks: dict[int, list[Any]] = {}  # first index -> values of a whole batch
        self.retry_state: dict[int, tuple[Iterator[float], Any]] = {}
        self.due: list[tuple[float, int, Any]] = []  # heap of (when, index, item)
        self.ready: deque[tuple[int, Any]] = deque()  # retries whose delay has passed
        self.inflight: dict[WorkerId, int] = {}
        self.units_inflight = 0
        self.exhausted = False
        self.error: BaseException | None = None
        self.g = _cluster.group()
        self.local_exec: ThreadPoolExecutor | None = None
        self.progress = _Progress(_length(iterables)) if progress else None
        if pool is None:
            n = max(1, len([p for p in self.g.procs() if p != self.g.myid]))
            self.local_exec = ThreadPoolExecutor(n, thread_name_prefix="distexec-pmap")
            self.workers = [self.g.myid]
            self.depth = n
        else:
            self.workers = [p for p in _live(pool) if True]
            self.depth = _DEPTH_UNBATCHED if batch_size == 1 else _DEPTH_BATCHED

    # -- scheduling
    def _pick_worker(self) -> WorkerId | None:
        best, best_n = None, self.depth
        for pid in self.workers:
            n = self.inflight.get(pid, 0)
            if n < best_n:
                best, best_n = pid, n
                if n == 0:
                    break
        return best

    def _next_unit_items(self) -> tuple[range | list[int], list[Any]]:
        if self.ready:  # retried elements go alone
            idx, item = self.ready.popleft()
            return [idx], [item]
        if self.exhausted:
            return [], []
        items: list[Any]
        if self.seq is not None:
            cut = self.seq[self.taken : self.taken + self.batch_size]
            items = cut if type(cut) is list else list(cut)
        else:
            items = list(itertools.islice(self.source, self.batch_size))
        if len(items) < self.batch_size:
            self.exhausted = True
        start = self.taken
        self.taken += len(items)
        return range(start, self.taken), items

    def _work_left(self) -> bool:
        """Whether elements remain to be sent (peeks one from the input if it must)."""
        if self.ready or self.due:
            return True
        if self.exhausted:
            return False
        if self.seq is not None:
            return self.taken < len(self.seq)
        for item in self.source:
            self.ready.append((self.taken, item))
            self.taken += 1
            return True
        self.exhausted = True
        return False

    def _send(self, unit: _Unit, group: _Group | None = None) -> None:
        """Start *unit* on its worker; small calls wait in *group* for :meth:`_flush`."""
        self.inflight[unit.pid] = self.inflight.get(unit.pid, 0) + 1
        self.units_inflight += 1
        if self.local_exec is not None:
            self.local_exec.submit(self._run_local, unit)
            return
        assert self.pool is not None
        fn = self.pool._prepare_fn(self.f, unit.pid)
        try:
            if len(unit.items) == 1 and self.batch_size == 1:
                args = tuple(unit.items[0]) if self.star else (unit.items[0],)
                cid, parts = self.g.prepare_call(fn, args, {})
            else:
                cid, parts = self.g.prepare_call(_run_batch, (fn, unit.items, self.star), {})
        except BaseException as exc:
            unit.set(False, exc)
            return
        if self.timeout is not None:
            unit.cid = cid
            self.open[cid] = unit
            heapq.heappush(self.deadlines, (time.monotonic() + self.timeout, cid))
        if group is not None and len(parts) == 1 and len(parts[0]) <= _GROUP_MAX_BYTES:
            group.setdefault(unit.pid, []).append((cid, parts, unit))
            return
        self.g.send_call(unit.pid, cid, parts, unit)

    def _flush(self, group: _Group) -> None:
        """Send the calls :meth:`_send` grouped, each worker's in one write: the worker is
        woken once for all of them (on these VMs waking a process costs more than anything
        else a message does)."""
        for pid, calls in group.items():
            if len(calls) == 1:
                cid, parts, unit = calls[0]
                self.g.send_call(pid, cid, parts, unit)
            else:
                self.g.send_calls(pid, calls)
        group.clear()

    def _run_local(self, unit: _Unit) -> None:
        item = unit.items[0]
        try:
            value = self.f(*item) if self.star else self.f(item)
        except BaseException as exc:
            unit.set(False, RemoteException(self.g.myid, CapturedException.capture(exc)))
            return
        unit.set(True, value)

    # -- completion
    def _handle(self, unit: _Unit, ok: bool, value: object) -> None:
        self.inflight[unit.pid] -= 1
        self.units_inflight -= 1
        if self.open:
            self.open.pop(unit.cid, None)
        batched = not (len(unit.items) == 1 and self.batch_size == 1) and self.local_exec is None
        if not ok:
            lost = isinstance(value, ProcessExitedException)
            # Its worker died, was killed for a timeout, or was removed (rmprocs): a retry
            # must not go there again.
            gone = lost or isinstance(value, (TaskTimeoutError, ClusterClosedError))
            if gone and self.pool is not None:
                self.workers = _live(self.pool)
            if lost and unit.pid in self.killed:  # killed for another unit's timeout
                self.ready.extend(zip(unit.indices, unit.items, strict=True))
                return
            for idx, item in zip(unit.indices, unit.items, strict=True):
                self._failed(idx, item, value)  # type: ignore[arg-type]
            return
        if not batched:
            self._store(unit.indices[0], value)
            return
        values: list[Any]
        errors: dict[int, BaseException] | None
        values, errors = value  # type: ignore[misc]
        if errors is None and isinstance(unit.indices, range):
            # The common case: a fresh batch, all went well. Its elements have no retry
            # state (retried elements travel alone), so the batch is kept whole.
            self.chunks[unit.indices.start] = values
            if self.progress is not None:
                self.progress.tick(len(values))
            return
        for i, (idx, item) in enumerate(zip(unit.indices, unit.items, strict=True)):
            if errors is not None and i in errors:
                self._failed(idx, item, errors[i])
            else:
                self._store(idx, values[i])

    def _store(self, idx: int, value: object) -> None:
        self.results[idx] = value
        self.retry_state.pop(idx, None)
        if self.progress is not None:
            self.progress.tick()

    def _failed(self, idx: int, item: Any, exc: BaseException) -> None:
        if self.error is not None:
            return
        if self.on_error is not None:
            seen = exc.captured.ex if isinstance(exc, RemoteException) else exc
            try:
                self._store(idx, self.on_error(seen))
                return
            except Exception as handler_exc:
                exc = handler_exc
        state = self.retry_state.get(idx)
        if state is None:
            state = (iter(self.retry_delays), None)
        delays, check_state = state
        delay = next(delays, None)
        if delay is None:
            self.error = exc
            return
        if self.retry_check is not None:
            try:
                verdict = self.retry_check(check_state, exc)
            except Exception as check_exc:
                self.error = check_exc
                return
            if isinstance(verdict, tuple) and len(verdict) == 2:
                check_state, verdict = verdict
            if not verdict:
                self.error = exc
                return
        if delay < 0 or delay != delay:
            self.error = ValueError(f"retry delays must be non-negative numbers, got {delay!r}")
            return
        self.retry_state[idx] = (delays, check_state)
        heapq.heappush(self.due, (time.monotonic() + delay, idx, item))

    # -- the loop
    def run(self) -> list[Any]:
        try:
            while True:
                now = time.monotonic()
                while self.due and self.due[0][0] <= now:
                    _, idx, item = heapq.heappop(self.due)
                    self.ready.append((idx, item))
                group: _Group = {}
                while self.error is None:
                    if not self.workers:
                        if self.pool is not None:
                            self.workers = _live(self.pool)
                        if not self.workers:
                            if self._work_left():
                                self.error = ClusterError(
                                    "pmap: no worker left in the pool to run the remaining elements"
                                )
                            break
                    pid = self._pick_worker()
                    if pid is None:
                        break
                    idxs, items = self._next_unit_items()
                    if not idxs:
                        break
                    self._send(_Unit(idxs, items, pid, self.done), group)
                self._flush(group)
                if self.units_inflight == 0 and (
                    self.error is not None or (self.exhausted and not self.ready and not self.due)
                ):
                    break
                wait = None
                if self.due and self.units_inflight == 0:
                    wait = max(0.0, self.due[0][0] - time.monotonic())
                elif self.due:
                    wait = max(0.0, min(1.0, self.due[0][0] - time.monotonic()))
                if self.deadlines:
                    wait = self._expire(wait)
                try:
                    unit, ok, value = self.done.get(timeout=wait)
                except Empty:
                    continue
                self._handle(unit, ok, value)
                while True:  # drain whatever else arrived, without blocking
                    try:
                        unit, ok, value = self.done.get_nowait()
                    except Empty:
                        break
                    self._handle(unit, ok, value)
        except KeyboardInterrupt:
            self._interrupt_inflight()
            raise
        finally:
            if self.local_exec is not None:
                self.local_exec.shutdown(wait=False)
            if self.progress is not None:
                self.progress.close()
        if self.error is not None:
            raise self.error
        if not self.results and self.chunks:
            # Every element came back in a whole batch (the batches cover 0..taken without
            # gaps): join them in order, growing the first (a fresh list, ours alone).
            starts = sorted(self.chunks)
            joined = self.chunks[starts[0]]
            for start in starts[1:]:
                joined += self.chunks[start]
            return joined
        out: list[Any] = [None] * self.taken
        for start, values in self.chunks.items():
            out[start : start + len(values)] = values
        for idx, value in self.results.items():
            out[idx] = value
        return out

    def _expire(self, wait: float | None) -> float | None:
        """Kill the workers of units past their timeout (their answers then arrive as
        ``TaskTimeoutError``); return how long the loop may wait for the next deadline."""
        now = time.monotonic()
        late: dict[WorkerId, dict[int, BaseException]] = {}
        while self.deadlines and self.deadlines[0][0] <= now:
            _, cid = heapq.heappop(self.deadlines)
            unit = self.open.get(cid)
            if unit is None or unit.pid in self.killed or unit.pid in late:
                continue  # a later one on a worker being killed may only have starved: resent
            timeout = self.timeout or 0.0
            _, err = _timeouts.timeout_reason(unit.pid, timeout, _timeouts.describe_call(self.f))
            late[unit.pid] = {cid: err}
        for pid, blame in late.items():
            self.killed.add(pid)
            text = f"a pmap call ran past its timeout of {self.timeout:g} s"
            _timeouts.kill_worker(pid, _cluster.ExitReason(text, kind="timeout", call_errors=blame))
        if not self.deadlines:
            return wait
        due = max(0.0, self.deadlines[0][0] - time.monotonic())
        return due if wait is None else min(wait, due)

    def _interrupt_inflight(self) -> None:
        busy = [p for p, n in self.inflight.items() if n > 0 and p != self.g.myid]
        if busy and self.g.myid == 1:
            from ._api import interrupt

            try:
                interrupt(busy)
            except Exception:
                pass


def _live(pool: AbstractWorkerPool) -> list[WorkerId]:
    if isinstance(pool, WorkerPool):
        return pool.live_workers()
    g = _cluster.group()
    return [p for p in pool.workers() if not g.is_removed(p)]


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Progress:
    """A progress bar: tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int | None) -> None:
        self.n = 0
        self.total = total
        self._last = 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc="pmap", unit="el")
        self._lock = threading.Lock()

    def tick(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last > 0.1:
            self._last = now
            self._print()

    def _print(self) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\rpmap: {self.n}{total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._print()
            sys.stderr.write("\n")
            sys.stderr.flush()
