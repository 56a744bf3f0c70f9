"""Once the last worker is gone, distexec leaves no thread behind.

``ProcessPoolExecutor.shutdown(wait=True)`` joins its threads, and CPython's own executor
tests check (``threading_cleanup``) that the thread count and the thread objects alive are
what they were before the test, first without a garbage collection. So when ``rmprocs`` or
an executor's shutdown removes the last worker, our threads must have ended by the time it
returns, and nothing may keep their Thread objects (not even a reference cycle).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import helpers
import pytest

import distexec as dx

pytestmark = pytest.mark.timeout(60)


class _Baseline:
    """What ``threading_cleanup`` compares: threads running, and Thread objects alive (no gc
    first), taken before the test; ``new()`` gives distexec's that were not there then."""

    def __init__(self) -> None:
        self.before = weakref.WeakSet(threading._dangling)  # type: ignore[attr-defined]

    def new(self) -> tuple[list[str], list[str]]:
        def ours(threads: Iterable[threading.Thread]) -> list[str]:
            return [
                t.name for t in threads if t.name.startswith("distexec") and t not in self.before
            ]

        alive = list(threading._dangling)  # type: ignore[attr-defined]
        return ours(threading.enumerate()), ours(alive)


def _ours() -> tuple[list[str], list[str]]:
    return _BASELINE.new()


_BASELINE = _Baseline()


@pytest.fixture(autouse=True)
def _baseline() -> None:
    global _BASELINE
    _BASELINE = _Baseline()


def test_rmprocs_of_the_last_workers_leaves_no_thread(no_leaked_workers: None) -> None:
    assert dx.workers() == [1]
    pids = dx.addprocs(2)
    assert [dx.remotecall_fetch(helpers.identity, p, p) for p in pids] == pids
    assert dx.remotecall(helpers.identity, pids[0], 5).fetch() == 5
    assert dx.pmap(abs, [-1, -2, -3]) == [1, 2, 3]
    assert _ours()[0]  # the test sees them while workers live
    dx.rmprocs(pids)
    assert _ours() == ([], [])
    # ... and everything starts again on demand.
    (w,) = dx.addprocs(1)
    assert dx.remotecall_fetch(helpers.identity, w, "again") == "again"
    dx.rmprocs(w)
    assert _ours() == ([], [])


def test_an_executor_shut_down_leaves_no_thread(no_leaked_workers: None) -> None:
    assert dx.workers() == [1]
    with dx.DistributedExecutor(3) as ex:
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]
        assert ex.submit(pow, 2, 5).result() == 32
    assert ex._executor_manager_thread is None
    assert _ours() == ([], [])


def test_threads_stay_while_a_worker_is_left(no_leaked_workers: None) -> None:
    pids = dx.addprocs(2)
    try:
        dx.rmprocs(pids[0])
        assert dx.remotecall_fetch(helpers.identity, pids[1], 1) == 1
        running, _ = _ours()
        assert running  # the link to the worker left still has what it needs
    finally:
        dx.rmprocs(pids[1])
    assert _ours() == ([], [])
